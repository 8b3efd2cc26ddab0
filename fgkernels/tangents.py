"""Parameter tangents: the per-step directions ``Ẇ`` that the Dual layers feed into the pass."""
from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple, Optional

import torch
from torch import nn

from .backends.base import acc_dtype
from .dual import _check_tangent
from .nn import DualModule
from .precision import resolve_tangent_dtype

Tensor = torch.Tensor


class ParameterTangent(NamedTuple):
    """A parameter's tangent as the Dual layers keep it: stacked, with its slots' labels, and
    the parameter it was set for (a replaced parameter must not inherit it)."""

    stack: Tensor
    directions: Optional[tuple[int, ...]]
    single: bool
    parameter: Tensor


def _owner(module: nn.Module, name: str, params: Mapping[str, Tensor]):
    """The Dual layer that a parameter's tangent is set on, and the parameter's name there:
    its own module, or for a parametrization's source (``conv.parametrizations.weight.original``)
    the parametrized layer."""
    if name not in params:
        known = ", ".join(list(params)[:12]) + (", ..." if len(params) > 12 else "")
        raise KeyError(f"set_tangents: unknown parameter name {name!r}; the module's parameters "
                       f"are: {known}")
    owner_path, leaf = _split_owner(name)
    owner = module.get_submodule(owner_path) if owner_path else module
    if not isinstance(owner, DualModule):
        raise TypeError(f"set_tangents: parameter {name!r} belongs to {type(owner).__name__}, "
                        "which is not a Dual layer; run fgkernels.convert(model) first")
    return owner, leaf


def _split_owner(name: str) -> tuple[str, str]:
    """(path of the layer owning parameter ``name``, its name relative to that layer)."""
    parts = name.split(".")
    if "parametrizations" in parts:
        i = len(parts) - 1 - parts[::-1].index("parametrizations")
        return ".".join(parts[:i]), ".".join(parts[i:])
    return ".".join(parts[:-1]), parts[-1]


def set_tangents(module: nn.Module, tangents: Mapping[str, Tensor],
                 direction: Optional[int] = None) -> None:
    """Give parameters of ``module`` a tangent for the next dual passes.

    ``tangents`` maps names as in ``module.named_parameters()`` to a tensor of the parameter's
    shape (one tangent) or ``(T, *shape)`` (T tangents). With ``direction=j`` each (single)
    tangent belongs to direction j alone: the layer's output gains a slot for j while its input
    carries none. The parameters of one layer must share one layout. Everything is checked before
    anything is set.
    """
    if direction is not None and (not isinstance(direction, int) or direction < 0):
        raise ValueError(f"set_tangents: direction must be a non-negative int, got {direction!r}")
    params = dict(module.named_parameters())
    staged: dict[int, tuple[nn.Module, dict]] = {}
    for name, tangent in tangents.items():
        owner, leaf = _owner(module, name, params)
        single = _check_tangent(params[name].detach(), tangent, f"tangent of {name!r}")
        if direction is not None:
            if not single:
                raise ValueError(f"set_tangents: with direction={direction}, the tangent of "
                                 f"{name!r} must have the parameter's shape "
                                 f"{tuple(params[name].shape)}")
            entry = ParameterTangent(tangent.unsqueeze(0), (direction,), False, params[name])
        else:
            entry = ParameterTangent(tangent.unsqueeze(0) if single else tangent, None, single,
                                     params[name])
        staged.setdefault(id(owner), (owner, {}))[1][leaf] = entry
    for owner, new in staged.values():
        merged = {**owner.__dict__.get("_fg_tangents", {}), **new}
        layouts = {(e.stack.shape[0], e.directions, e.single) for e in merged.values()}
        if len(layouts) > 1:
            raise ValueError(f"set_tangents: the tangents of one {type(owner).__name__} must share "
                             f"T and direction; got {sorted(map(str, layouts))}")
    for owner, new in staged.values():
        owner.__dict__.setdefault("_fg_tangents", {}).update(new)


def random_tangents(module: nn.Module, num_tangents: Optional[int] = None,
                    generator: Optional[torch.Generator] = None,
                    direction: Optional[int] = None,
                    dtype: Optional[torch.dtype] = None) -> dict[str, Tensor]:
    """Draw a standard normal tangent for every parameter of the Dual layers of ``module``
    (``(num_tangents, *shape)`` when given), set them, and return them by name.

    ``dtype``: the tangents' dtype (default: that of an enclosing ``fgkernels.tangent_dtype``
    block, else the parameter's); drawn in float32 and rounded, so that a bfloat16 draw is the
    rounding of the float32 one from the same generator state."""
    if num_tangents is not None and (not isinstance(num_tangents, int) or num_tangents < 1):
        raise ValueError(f"random_tangents: num_tangents must be a positive int, "
                         f"got {num_tangents!r}")
    drawn = {}
    for name, p in module.named_parameters():
        owner_path, _ = _split_owner(name)
        if not isinstance(module.get_submodule(owner_path) if owner_path else module,
                          DualModule):
            continue
        shape = p.shape if num_tangents is None else (num_tangents, *p.shape)
        target = resolve_tangent_dtype(p.dtype, dtype)
        draw_dtype = p.dtype if target == p.dtype else acc_dtype(target)
        t = torch.randn(shape, generator=generator, dtype=draw_dtype, device=p.device)
        drawn[name] = _laid_out_like(t, p).to(target)
    set_tangents(module, drawn, direction=direction)
    return drawn


def _laid_out_like(t: Tensor, p: Tensor) -> Tensor:
    """``t`` (p's shape, or a stack of them) with every slot in p's memory format, so that the
    kernels take it as it is: a channels_last weight gets channels_last tangents (the values
    are those of the contiguous draw, whatever the layout)."""
    if p.dim() != 4 or p.is_contiguous() or not p.is_contiguous(memory_format=torch.channels_last):
        return t
    if t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    return t.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)


def clear_tangents(module: nn.Module) -> None:
    """Remove every parameter tangent set on ``module`` and its children."""
    for m in module.modules():
        m.__dict__.pop("_fg_tangents", None)
