"""The native backend: the compiled ``torch.ops.fgkernels`` ops (C++ on the CPU, CUDA on GPUs).

The extension loads on first use (``load``: the registry asks for it at the first op on a
device, or in ``available_backends``), or when Dynamo loads (a trace cannot load it), so that
importing fgkernels, or only its value (``fgkernels.dual``), loads no compiled code unless
Dynamo is already loaded. Loading ``fgkernels._C`` registers the ops; their
fake implementations are registered right after (``fakes``), so that they trace under
``torch.compile``. Without the extension fgkernels runs on the reference backend and
says so once; ``FGKERNELS_REQUIRE_NATIVE=1`` (set by the project's set-up and CI) loads it at
``import fgkernels`` and makes a missing or broken extension an ImportError there.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

REQUIRE_VARIABLE = "FGKERNELS_REQUIRE_NATIVE"


def _load_extension() -> Optional[str]:
    """Loads ``fgkernels._C``; returns why it could not be loaded, or None."""
    try:
        from ... import _C
        reason = _other_torch(getattr(_C, "TORCH_VERSION", "an unknown torch"))
        error = None
    except ImportError as e:
        # Not built, or built against another torch (an undefined symbol).
        reason, error = f"{type(e).__name__}: {e}", e
    if reason is not None:
        if required():
            raise ImportError(f"{REQUIRE_VARIABLE}=1, but the compiled extension fgkernels._C "
                              f"does not load ({reason})") from error
        return reason
    from . import fakes  # noqa: F401
    for callback in _on_load:
        callback()
    return None


def _other_torch(built_with: str) -> Optional[str]:
    """Why an extension built against torch ``built_with`` must not run beside this torch (a
    C++ extension links with one release: a wheel installed beside a newer torch may load and
    misbehave), or None when the releases agree (a local tag, +cpu or +cu128, aside)."""
    import torch
    if built_with.split("+")[0] == torch.__version__.split("+")[0]:
        return None
    return (f"fgkernels._C was built against torch {built_with}, and this is torch "
            f"{torch.__version__}: reinstall fgkernels to build it against this torch")


# What runs once the library has loaded (registering an op's fake, say).
_on_load: list[Callable[[], None]] = []


def on_load(callback: Callable[[], None]) -> None:
    """Runs ``callback`` once ``fgkernels._C`` has loaded: now, if it has."""
    _on_load.append(callback)
    if _loaded.get("error", "not loaded") is None:
        callback()


# "error": why the one attempt to load fgkernels._C failed, or None when it loaded. A plain dict
# (torch.compile reads it as it is).
_loaded: dict[str, Optional[str]] = {}


def load() -> Optional[str]:
    """Loads ``fgkernels._C`` (once; it registers ``torch.ops.fgkernels``); returns why it could
    not be loaded, or None."""
    if "error" not in _loaded:
        _loaded["error"] = _load_extension()
    return _loaded["error"]


def register_fake(name: str, fake: Callable) -> frozenset:
    """Registers ``fake`` as the fake of ``torch.ops.fgkernels.<name>`` and returns the device
    types the loaded library has a kernel of that op for (an op registered as a composite of
    torch's ops serves every device); registers nothing and returns no device where the library
    lacks the op (built before it was declared)."""
    import torch

    if not hasattr(torch.ops.fgkernels, name):
        return frozenset()
    qualname = f"fgkernels::{name}"
    has = lambda key: torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key)
    composite = has("CompositeExplicitAutograd")
    torch.library.register_fake(qualname)(fake)
    return frozenset(d for d in ("cpu", "cuda") if composite or has(d.upper()))


def required() -> bool:
    """Whether ``FGKERNELS_REQUIRE_NATIVE=1`` asks for the extension at ``import fgkernels``."""
    return os.environ.get(REQUIRE_VARIABLE) == "1"


def native_available() -> bool:
    """True when the compiled extension ``fgkernels._C`` loads (loading it on first call)."""
    return load() is None


def native_load_error() -> Optional[str]:
    """Why ``fgkernels._C`` did not load (the ImportError's message), or None when it did."""
    return load()
