"""Parameter tangents: the per-step directions ``Ẇ`` of a forward-mode pass, kept against the
parameter tensors themselves.

``set_tangents(model, {name: Ẇ})`` records ``Ẇ`` for the tensor ``model.<name>``
(``tangent_store``); wherever the model reads that tensor during a dual pass (``passes``), it is
a Dual. ``random_tangents`` draws and sets them; ``clear_tangents`` removes them.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

import torch
from torch import nn

from . import tangent_store
from .dtypes import acc_dtype
from .module_state import check_module
from .passes import hooks, refuse_script_module
from .precision import check_dtype, resolve_tangent_dtype
from .tangent_store import (
    ParameterTangent,
    bind,
    bindings_changed,
    drop_tangent,
    has_tangent,
    record_tangent,
    tangent_of,
    unbind,
    unbind_removed,
)
from .value import check_direction, check_tangent, in_primal_layout

Tensor = torch.Tensor

__all__ = ["set_tangents", "random_tangents", "clear_tangents", "tangent_of", "has_tangent",
           "ParameterTangent"]

# A model pickled with a tangent on a tensor names the tangent's stand-in (None) here.
_no_tangent = tangent_store._no_tangent


@torch.no_grad()
def _stack_parameter(name: str, p: Tensor, tangent, direction: Optional[int]):
    """A parameter's tangent stacked, each slot in the parameter's layout (``Dual``'s rule)."""
    if tangent is None:
        raise TypeError(f"set_tangents: the tangent of {name!r} is None; give a tensor, or "
                        f"leave the parameter out (clear_tangents removes tangents)")
    single = check_tangent(p.detach(), tangent, f"set_tangents: the tangent of {name!r}")
    stack = in_primal_layout(tangent.unsqueeze(0) if single else tangent, p)
    if direction is None:
        return ParameterTangent(stack, None, single)
    if not single:
        raise ValueError(f"set_tangents: with direction={direction}, the tangent of {name!r} "
                         f"must have the parameter's shape {tuple(p.shape)}")
    return ParameterTangent(stack, (direction,), False)


def _owner_and_leaf(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    if not path:
        return module, leaf
    owner = module
    for part in path.split("."):  # (not get_submodule, which a TorchScript module refuses)
        owner = owner._modules[part]
    return owner, leaf


def set_tangents(module: nn.Module, tangents: Mapping[str, Tensor],
                 direction: Optional[int] = None) -> None:
    """Give parameters of ``module`` a tangent for the next dual passes.

    ``tangents`` maps names as in ``module.named_parameters()`` (a tied parameter by any of its
    names, or by several with the same tensor) to a tensor of the parameter's shape (one
    tangent) or ``(T, *shape)`` (T tangents); every tangent of one call has the same T. With
    ``direction=j`` each (single) tangent belongs to direction j alone: the outputs it reaches
    gain a slot for j while the input carries none. The tangent belongs to the tensor: wherever
    the model reads it during a dual pass, it is a Dual. Everything is checked before anything
    is set.
    """
    check_module(module, "set_tangents")
    check_direction(direction, "set_tangents")
    hooks.end_stale()
    if not isinstance(tangents, Mapping):
        raise TypeError(f"set_tangents: tangents must map parameter names to tensors, got "
                        f"{type(tangents).__name__}")
    params = dict(module.named_parameters(remove_duplicate=False))
    staged: dict[int, tuple[Tensor, ParameterTangent, str]] = {}
    for name, tangent in tangents.items():
        if name not in params:
            known = ", ".join(list(dict(module.named_parameters()))[:12])
            raise KeyError(f"set_tangents: unknown parameter name {name!r}; the module's "
                           f"parameters are: {known}{', ...' if len(params) > 12 else ''}")
        p = params[name]
        earlier = staged.get(id(p))
        if earlier is not None:  # a tied parameter by another name: the same tangent only
            if tangent is not tangents[earlier[2]]:
                raise ValueError(f"set_tangents: {earlier[2]!r} and {name!r} are the same (tied) "
                                 "parameter; give its tangent once")
            continue
        owner, _ = _owner_and_leaf(module, name)
        if isinstance(owner, torch.jit.ScriptModule):
            refuse_script_module(owner, name)
        staged[id(p)] = (p, _stack_parameter(name, p, tangent, direction), name)
    counts = {e.stack.shape[0] for _, e, _ in staged.values() if e.directions is None}
    if len(counts) > 1:
        raise ValueError(f"set_tangents: the tangents of one call must share T, got "
                         f"{sorted(counts)}")
    if len({e.single for _, e, _ in staged.values() if e.directions is None}) > 1:
        raise ValueError("set_tangents: give every tangent of one call in its parameter's shape "
                         "(one tangent) or every one stacked (T, *shape), not both")
    # A parameter removed since its tangent was set (a prune or a parametrization moves it
    # under another name, whose tangent this call gives) is no longer refused.
    unbind_removed(module)
    for p, entry, _ in staged.values():
        record_tangent(p, entry)
    for name, p in params.items():
        if id(p) in staged:
            bind(*_owner_and_leaf(module, name), p)
    bindings_changed()
    hooks.sync()


def random_tangents(module: nn.Module, num_tangents: Optional[int] = None,
                    generator: Optional[torch.Generator] = None,
                    direction: Optional[int] = None,
                    dtype: Optional[torch.dtype] = None) -> dict[str, Tensor]:
    """Draw a standard normal tangent for every parameter of ``module`` (``(num_tangents,
    *shape)`` when given; a tied parameter once, under its first name), set them, and return
    them by name.

    ``dtype``: the tangents' dtype (default: that of an enclosing ``fgkernels.tangent_dtype``
    block, else the parameter's); drawn in float32 and rounded, so that a bfloat16 draw is the
    rounding of the float32 one from the same generator state. Each tangent is laid out like its
    parameter (a channels_last weight gets channels_last slots). Every argument is checked
    before anything is drawn (the generator moves only for a call that sets tangents)."""
    check_module(module, "random_tangents")
    if num_tangents is not None and (isinstance(num_tangents, bool)
                                     or not isinstance(num_tangents, int) or num_tangents < 1):
        raise ValueError(f"random_tangents: num_tangents must be a positive int, "
                         f"got {num_tangents!r}")
    check_direction(direction, "random_tangents")
    if direction is not None and num_tangents is not None:
        raise ValueError("random_tangents: a direction holds one tangent per parameter; give "
                         "direction or num_tangents, not both")
    check_dtype(dtype, "random_tangents")
    hooks.end_stale()
    targets = {}  # (every dtype resolved before the first draw)
    for name, p in module.named_parameters():
        try:
            targets[name] = resolve_tangent_dtype(p.dtype, dtype)
        except TypeError as e:
            raise TypeError(f"random_tangents: {name}: {e}") from None
    drawn = {}
    for name, p in module.named_parameters():
        shape = p.shape if num_tangents is None else (num_tangents, *p.shape)
        target = targets[name]
        # a narrower tangent is the rounding of the draw at the parameter's precision (a
        # complex one drawn complex: acc_dtype(complex64) is real)
        draw_dtype = p.dtype if target == p.dtype or target.is_complex else acc_dtype(target)
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
    """Remove the tangent of every parameter of ``module`` and its children."""
    check_module(module, "clear_tangents")
    hooks.end_stale()
    for p in module.parameters():
        drop_tangent(p)
    unbind(module)
    bindings_changed()
    hooks.sync()
