"""Parameters computed from other parameters: ``torch.nn.utils.parametrize`` (weight_norm,
spectral_norm and orthogonal of ``torch.nn.utils.parametrizations`` included), and the older
forward pre-hooks of ``torch.nn.utils.weight_norm`` and ``torch.nn.utils.prune``.

A layer's ``weight`` is then a function of its *sources* (``parametrizations.weight.original``,
``weight_g`` and ``weight_v``, ``weight_orig``), which are what ``named_parameters()`` lists and
what tangents are set on. The weight's tangent is the JVP of that function along the sources'
tangents, by PyTorch's forward-mode AD, one slot per vmapped lane.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
from torch import nn
from torch.nn.utils import parametrize, prune
from torch.nn.utils.stateless import _reparametrize_module
from torch.nn.utils.weight_norm import WeightNorm

from ._fallback import jvp_over_slots

Tensor = torch.Tensor


class Derivation(NamedTuple):
    """How a computed parameter comes from its sources."""

    sources: tuple[str, ...]          # parameter names relative to the module
    compute: Callable[[], Tensor]     # the parameter from the sources as they stand


def derivation(module: nn.Module, name: str) -> Optional[Derivation]:
    """How ``module.<name>`` is computed from other parameters, or None when it is a parameter
    of its own."""
    if parametrize.is_parametrized(module, name):
        plist = module.parametrizations[name]
        keys = [k for k, _ in plist.named_parameters(recurse=False) if k.startswith("original")]
        return Derivation(tuple(f"parametrizations.{name}.{k}" for k in keys),
                          lambda: getattr(module, name))
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, WeightNorm) and hook.name == name:
            return Derivation((f"{name}_g", f"{name}_v"), lambda: _weight_norm(
                getattr(module, f"{name}_v"), getattr(module, f"{name}_g"), hook.dim))
        if isinstance(hook, prune.BasePruningMethod) and hook._tensor_name == name:
            return Derivation((f"{name}_orig",), lambda: hook.apply_mask(module))
        if type(hook).__name__ == "SpectralNorm" and getattr(hook, "name", None) == name:
            raise NotImplementedError(
                f"{type(module).__name__}.{name} is computed by torch.nn.utils.spectral_norm's "
                "hook, whose power iteration has no tangent rule here; use "
                "torch.nn.utils.parametrizations.spectral_norm, which fgkernels differentiates")
    return None


def _weight_norm(v: Tensor, g: Tensor, dim: int) -> Tensor:
    """``g·v/‖v‖``, the norm over every dim but ``dim`` (all of them for dim = -1): the hook's
    computation written in ops that have a forward-mode rule (its fused kernel has none)."""
    if dim == -1:
        return v * (g / v.norm())
    others = [d for d in range(v.dim()) if d != dim % v.dim()]
    return v * (g / torch.linalg.vector_norm(v, dim=others, keepdim=True))


def derived_tangent(module: nn.Module, how: Derivation, sources: dict[str, Tensor],
                    stacks: dict[str, Tensor]) -> Tensor:
    """The stacked tangent of the parameter ``how`` computes, given its sources' values and the
    stacked tangents ``stacks`` of some of them (the others are constant)."""
    keys = list(stacks)

    def weight_of(*values):
        with _reparametrize_module(module, {**sources, **dict(zip(keys, values))}):
            return how.compute()

    primals = tuple(sources[k].detach() for k in keys)
    # Forward AD wants each tangent in its source's dtype; the result keeps the tangents' dtype.
    dtype = stacks[keys[0]].dtype
    with torch.no_grad():
        tangent = jvp_over_slots(weight_of, primals,
                                 tuple(stacks[k].to(p.dtype) for k, p in zip(keys, primals)))[1]
    return tangent.to(dtype)
