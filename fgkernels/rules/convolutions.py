"""The convolutions without a kernel of fgkernels' own: ``conv3d`` and the transposed
convolutions (``conv_transpose1d``, ``2d``, ``3d``). Each is linear in its input and in its
weight, so ``ẏ = conv(ẋ, W) + conv(x, Ẇ) + ḃ``: torch's own convolution vmapped over the slots of
each operand that has a tangent (one call per operand), the value and the argument checks
torch's."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..dual.rule_table import implements
from ..dual.value import Dual
from .products import _product

Tensor = torch.Tensor


def _linear_layer(name: str, op: Callable, spatial_dims: int) -> Callable:
    """The rule of ``op(input, weight, bias=None, *options)``, a convolution over
    ``spatial_dims`` dims whose output has channels at dim 1 (dim 0 for an unbatched input)."""

    def rule(input, weight, bias=None, *args, **kwargs) -> Dual:
        def term(i: int, stack: Tensor, factors: list) -> Tensor:
            x, w, _ = factors
            if i == 0:  # conv(ẋ, W): the slots a batch dim of the same call
                return torch.vmap(lambda s: op(s, w, None, *args, **kwargs))(stack)
            if i == 1:  # conv(x, Ẇ)
                return torch.vmap(lambda s: op(x, s, None, *args, **kwargs))(stack)
            # ḃ (T, C_out) along the output's channel dim
            lead = x.dim() - spatial_dims - 1  # 1 with a batch dim, else 0
            return stack.reshape(stack.shape[0], *[1] * lead, -1, *[1] * spatial_dims)

        return _product(name, [input, weight, bias], lambda p: op(*p, *args, **kwargs), term)

    rule.__name__ = name
    rule.__doc__ = f"Dual ``{name}`` (arguments as ``F.{name}``)."
    return rule


conv3d = implements(torch.conv3d)(_linear_layer("conv3d", F.conv3d, 3))
conv_transpose1d = implements(torch.conv_transpose1d)(
    _linear_layer("conv_transpose1d", F.conv_transpose1d, 1))
conv_transpose2d = implements(torch.conv_transpose2d)(
    _linear_layer("conv_transpose2d", F.conv_transpose2d, 2))
conv_transpose3d = implements(torch.conv_transpose3d)(
    _linear_layer("conv_transpose3d", F.conv_transpose3d, 3))
