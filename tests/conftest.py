"""Shared fixtures. On a machine without CUDA, Triton kernels run in its interpreter: the
variable must be set before triton is first imported. Hypothesis draws the same examples on
every local run (profile ``dev``) and new ones in CI (``HYPOTHESIS_PROFILE=ci`` with
``--hypothesis-seed``, printed, so that a failure can be replayed)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fgkernels  # noqa: E402

try:
    from hypothesis import settings
except ImportError:  # the property tests skip themselves
    settings = None
if settings is not None:
    settings.register_profile("dev", derandomize=True)
    settings.register_profile("ci", derandomize=False, print_blob=True)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

BACKENDS = [b for b in ("reference", "native", "triton") if b in fgkernels.available_backends()]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=[b for b in BACKENDS if b != "triton"])
def backend(request):
    """Each CPU backend in turn (the Triton backend has its own tests at tiny shapes)."""
    with fgkernels.use_backend(request.param):
        yield request.param
