"""Shared fixtures. On a machine without CUDA, Triton kernels run in its interpreter: the
variable must be set before triton is first imported."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fgkernels  # noqa: E402

BACKENDS = [b for b in ("reference", "native", "triton") if b in fgkernels.available_backends()]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=[b for b in BACKENDS if b != "triton"])
def backend(request):
    """Each CPU backend in turn (the Triton backend has its own tests at tiny shapes)."""
    with fgkernels.use_backend(request.param):
        yield request.param
