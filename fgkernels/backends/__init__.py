"""Backend registry: which implementation runs the dual ops for a given device.

Backends (``base.Backend`` is the contract): ``reference`` (plain PyTorch, always there),
``native`` (the compiled ``fgkernels._C`` ops) and ``triton`` (Triton kernels, on CUDA or on the
CPU under ``TRITON_INTERPRET=1``, where the native backend loads: it runs what Triton has no
kernel for). The default is, per device, the backend measured fastest
there: native on the CPU; on CUDA, per fused op, the backend ``cuda_defaults.CUDA_DEFAULTS``
names (native for every op until a GPU run of the benchmarks shows a Triton kernel faster,
``benchmarks/RESULTS-gpu.md``); reference when nothing else is built. ``FGKERNELS_BACKEND`` or
``use_backend(name)`` forces one backend for every op (``triton`` is opt-in).
"""
from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections.abc import Iterator
from typing import Optional

import torch

from ..dual.dynamo import when_dynamo_loads
from . import native
from .base import Backend
from .cuda_defaults import cuda_default
from .reference import ReferenceBackend

BACKENDS = ("reference", "native", "triton")


class _Forced(threading.local):
    """The backends ``use_backend`` forces in this thread, innermost last. (Set on the instance
    at each thread's first use: Dynamo guards on the list, so a compiled pass traced before any
    ``use_backend`` is traced again inside one.)"""

    def __init__(self):
        self.stack: list[str] = []


_local = _Forced()
if native.required():  # fail at import, not at the first op
    native.load()


def _check_name(name: str, where: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{where}: unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


# name -> the backend instance, or None where it cannot run. A plain dict, not an lru_cache:
# torch.compile reads it as it is, where it would trace through a cache wrapper.
_loaded: dict[str, Optional[Backend]] = {}


def _load(name: str) -> Optional[Backend]:
    """The backend instance, or None when it cannot run on this install."""
    if name not in _loaded:
        _loaded[name] = _instantiate(name)
    return _loaded[name]


def _instantiate(name: str) -> Optional[Backend]:
    if name == "reference":
        return ReferenceBackend()
    if name == "native":
        from .native.backend import NativeBackend
        return NativeBackend() if native.native_available() else None
    from .triton import triton_available
    fallback = _load("native")  # what Triton has no kernel for runs there: loaded first
    if fallback is None or not triton_available():
        return None
    from .triton.backend import TritonBackend
    return TritonBackend(fallback)


def available_backends() -> list[str]:
    """The names of the backends that can run here."""
    return [name for name in BACKENDS if _load(name) is not None]


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the dual ops inside the ``with`` block on backend ``name``, whatever the device."""
    _check_name(name, "use_backend")
    if _load(name) is None:
        raise RuntimeError(f"backend {name!r} is not available here; available: "
                           f"{', '.join(available_backends())}")
    _local.stack.append(name)
    try:
        yield
    finally:
        _local.stack.pop()


def _load_before_tracing() -> None:
    """Loads the backends a dual pass would take, run when Dynamo loads (before it traces
    anything): it cannot trace their loading, which registers the library's ops and fakes, so a
    plain ``torch.compile`` whose trace holds the process's first dual op would fail. A backend
    that fails to load here is left unloaded: the first op that needs it raises, not Dynamo's
    import."""
    try:
        name = os.environ.get("FGKERNELS_BACKEND")
        if name in BACKENDS:
            _load(name)
        _load("native")
        if torch.cuda.is_available() and "cuda-default" not in _loaded:
            _loaded["cuda-default"] = cuda_default(_load)
    except Exception:  # nothing was recorded for it: the first op's load raises it again
        pass


when_dynamo_loads(_load_before_tracing)

_warned: list[bool] = []


def _warn_unbuilt() -> None:
    if _warned:
        return
    _warned.append(True)
    reason = native.native_load_error() or "not built"
    warnings.warn(f"the compiled extension fgkernels._C did not load ({reason}), so the dual "
                  f"ops run on the slower reference backend; reinstall fgkernels to build it "
                  f"for this environment's torch (`pip install .` from a checkout or an sdist; "
                  f"README: Installing)", stacklevel=4)


def current_backend(device: torch.device | str) -> Backend:
    """The backend that runs ops on ``device`` (a torch.device or its name) now."""
    device = torch.device(device)
    stack = _local.stack
    name = stack[-1] if stack else os.environ.get("FGKERNELS_BACKEND")
    if name:
        backend = _load(_check_name(name, "FGKERNELS_BACKEND"))
        if backend is None:
            raise RuntimeError(f"FGKERNELS_BACKEND={name} is not available here; available: "
                               f"{', '.join(available_backends())}")
        return backend
    if device.type == "cuda":
        if "cuda-default" not in _loaded:
            _loaded["cuda-default"] = cuda_default(_load)
        backend = _loaded["cuda-default"]
    else:
        backend = _load("native")
    if backend is not None:
        return backend
    _warn_unbuilt()
    return _load("reference")
