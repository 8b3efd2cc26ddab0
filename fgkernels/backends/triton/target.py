"""The GPU a launch is planned for: its compute capability and the shared memory a block may use.

Launch plans (tile sizes, pipeline depth) depend on the target. On CUDA it is the tensor's
device; ``assumed_target(arch)`` overrides it, so that a launcher called on ``meta`` tensors
plans exactly what it would launch on that GPU (the kernel report compiles those launches
ahead of time, without a GPU).
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

# Shared memory a block may opt in to, in bytes, per compute capability (major*10 + minor):
# A100 163 KiB, the other Ampere chips and Ada 99 KiB, Hopper 227 KiB.
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024,
                90: 227 * 1024}
# The target planned for where no GPU says otherwise (the interpreter, meta tensors).
DEFAULT_ARCH = 90

_local = threading.local()


@contextlib.contextmanager
def assumed_target(arch: int) -> Iterator[None]:
    """Plan every launch inside the block for compute capability ``arch`` (e.g. 80, 89, 90)."""
    if arch not in SHARED_LIMIT:
        raise ValueError(f"assumed_target: no shared-memory figure for sm_{arch}; known: "
                         f"{', '.join(f'sm_{a}' for a in SHARED_LIMIT)}")
    previous = getattr(_local, "arch", None)
    _local.arch = arch
    try:
        yield
    finally:
        _local.arch = previous


def target_arch(device: torch.device) -> int:
    """The compute capability launches on ``device`` are planned for."""
    assumed = getattr(_local, "arch", None)
    if assumed is not None:
        return assumed
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return major * 10 + minor
    return DEFAULT_ARCH


def shared_limit(arch: int, device: torch.device) -> int:
    """The bytes of shared memory one block may use on ``device`` (planned as ``arch``)."""
    if device.type == "cuda" and getattr(_local, "arch", None) is None:
        props = torch.cuda.get_device_properties(device)
        optin = getattr(props, "shared_memory_per_block_optin", None)
        if optin:
            return int(optin)
    return SHARED_LIMIT.get(arch, min(SHARED_LIMIT.values()))
