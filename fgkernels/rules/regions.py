"""Pooling a feature map over regions of interest: torchvision's ``roi_align``, ``roi_pool``,
``ps_roi_align`` and ``ps_roi_pool`` (the box, mask and keypoint heads of Faster, Mask and
Keypoint R-CNN; R-FCN's), ops of another library that torch's forward mode does not
differentiate (torchvision registers their reverse-mode formulas alone). The primal is
torchvision's own.

Each output value is a weighted sum of one channel's feature values in its region's bin
(bilinear samples averaged, a plain average, or the maximum: weight 1 at the value picked),
the weights set by the boxes alone. So the output is linear in the features, and their term
is the same op on the tangent, every slot in one call as images of their own (the boxes
repeated for each slot); the maximum's term is the tangent at the position the primal
picked. Like torchvision, which
gives the boxes no gradient, these rules give them no derivative: boxes with a tangent are
refused by name (the R-CNNs detach their proposals)."""
from __future__ import annotations

import torch

from ..dual import slots as _slots
from ..dual.dtypes import acc_dtype
from ..dual.rule_table import implements_library_op
from ..dual.value import Dual
from .operands import parts

Tensor = torch.Tensor

__all__ = ["ps_roi_align", "ps_roi_pool", "roi_align", "roi_pool"]


def _regions_pooled(name: str, input, rois, pool, term) -> tuple:
    """``pool(x, rois)`` of the primals (the op's outputs: the pooled values first) and its
    Dual, whose tangent is ``term(stack, x, rois, outputs)`` over every slot of the input's;
    ``rois`` is refused where it carries a tangent."""
    x, r = parts(input), parts(rois)
    if r.tangents is not None:
        raise NotImplementedError(
            f"fgkernels.Dual: torchvision::{name} has no derivative in its boxes (torchvision "
            "gives them no gradient either), and these boxes carry a tangent; detach them "
            "(boxes.detach()), as the R-CNNs detach their proposals")
    outputs = pool(x.primal, r.primal)
    y = outputs[0] if isinstance(outputs, tuple) else outputs
    plan = _slots.plan([x.slots], name)
    if plan.count == 0:
        return outputs, Dual._unchecked(y, None, None, False)
    stack = _slots.place(plan.count, [(term(_slots.cast(x.tangents, plan.dtype_for(y.dtype)),
                                            x.primal, r.primal, outputs), plan.positions[0])])
    return outputs, Dual._unchecked(y, stack, plan.directions, plan.single)


def _linear_term(pool):
    """The term of a pooling linear in its input: ``pool`` of the slots as images of their own
    (``(T, N, C, H, W)`` pooled as ``(T·N, C, H, W)``, a view of the stack; slot ``s``'s copy of
    box ``k`` reads image ``s·N + n_k``), in float32 at least (torchvision's kernels take the
    boxes in the input's dtype)."""
    def term(stack: Tensor, x: Tensor, rois: Tensor, outputs) -> Tensor:
        slots, n = stack.shape[:2]
        wide = acc_dtype(stack.dtype)
        boxes = rois.to(wide).repeat(slots, 1)
        boxes[:, 0] += torch.arange(slots, device=rois.device, dtype=wide).repeat_interleave(
            rois.shape[0]) * n
        y = pool(stack.flatten(0, 1).to(wide), boxes)
        y = y[0] if isinstance(y, tuple) else y
        return y.unflatten(0, (slots, -1)).to(stack.dtype)

    return term


def _picked_term(stack: Tensor, x: Tensor, rois: Tensor, outputs) -> Tensor:
    """The maximum's term: ``ẏ[s, k, c, i, j] = ẋ[s, n_k, c, argmax // W, argmax % W]`` for
    box ``k`` of image ``n_k`` where its bin picked a value, 0 where the bin is empty (argmax
    -1, the output 0), read from the stack in place."""
    _, argmax = outputs
    width = x.shape[-1]
    image = rois[:, 0].long().view(-1, 1, 1, 1)
    channel = torch.arange(x.shape[1], device=x.device).view(1, -1, 1, 1)
    at = argmax.clamp(min=0)
    picked = stack[:, image, channel, at.div(width, rounding_mode="floor"), at % width]
    return picked.masked_fill(argmax < 0, 0)


@implements_library_op("torchvision::roi_align")
def roi_align(input, rois, spatial_scale: float, pooled_height: int, pooled_width: int,
              sampling_ratio: int, aligned: bool) -> Dual:
    """Dual ``torch.ops.torchvision.roi_align`` (``torchvision.ops.roi_align``,
    ``MultiScaleRoIAlign``): the input's tangent aligned over the same boxes."""
    def pool(x, r):
        return torch.ops.torchvision.roi_align(x, r, spatial_scale, pooled_height,
                                               pooled_width, sampling_ratio, aligned)
    return _regions_pooled("roi_align", input, rois, pool, _linear_term(pool))[1]


@implements_library_op("torchvision::ps_roi_align")
def ps_roi_align(input, rois, spatial_scale: float, pooled_height: int, pooled_width: int,
                 sampling_ratio: int) -> tuple:
    """Dual ``torch.ops.torchvision.ps_roi_align``: (the Dual of the pooled values, the
    channel mapping torchvision's backward reads)."""
    def pool(x, r):
        return torch.ops.torchvision.ps_roi_align(x, r, spatial_scale, pooled_height,
                                                  pooled_width, sampling_ratio)
    (_, mapping), y = _regions_pooled("ps_roi_align", input, rois, pool, _linear_term(pool))
    return y, mapping


@implements_library_op("torchvision::ps_roi_pool")
def ps_roi_pool(input, rois, spatial_scale: float, pooled_height: int,
                pooled_width: int) -> tuple:
    """Dual ``torch.ops.torchvision.ps_roi_pool`` (an average over each bin): (the Dual of the
    pooled values, the channel mapping)."""
    def pool(x, r):
        return torch.ops.torchvision.ps_roi_pool(x, r, spatial_scale, pooled_height,
                                                 pooled_width)
    (_, mapping), y = _regions_pooled("ps_roi_pool", input, rois, pool, _linear_term(pool))
    return y, mapping


@implements_library_op("torchvision::roi_pool")
def roi_pool(input, rois, spatial_scale: float, pooled_height: int,
             pooled_width: int) -> tuple:
    """Dual ``torch.ops.torchvision.roi_pool`` (the maximum of each bin): (the Dual of the
    pooled values, the position each picked)."""
    def pool(x, r):
        return torch.ops.torchvision.roi_pool(x, r, spatial_scale, pooled_height, pooled_width)
    (_, argmax), y = _regions_pooled("roi_pool", input, rois, pool, _picked_term)
    return y, argmax
