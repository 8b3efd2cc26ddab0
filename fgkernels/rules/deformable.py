"""torchvision's deformable convolution, ``torchvision::deform_conv2d`` (DCN v1 and, with a
mask, v2), an op of another library that torch's forward mode does not differentiate
(torchvision registers its reverse-mode formula alone). The primal is torchvision's own.

With kernel taps k, offset group g of each input channel c, and the bilinear sample
``S(x_c, p)`` of channel c at point p (0 outside ``(-1, H) × (-1, W)``):

    y[o, i, j] = Σ_{c, k} W[o, c, k] · m[g, k, i, j] · S(x_c, p_k(i, j) + Δ[g, k, i, j]) + b[o]

is linear in x, in W, in m and in b apart: their terms are torchvision's own op with that
operand's tangent in its place (the input's slots as images of their own, the offsets and mask
repeated for each). The offsets' term is

    Σ_{c, k} W[o, c, k] · m[g, k, i, j] · (∂S/∂p_y · Δ̇_y + ∂S/∂p_x · Δ̇_x)

with ``∂S/∂p`` of the bilinear sample as torchvision's backward takes it: from the four pixels
around p (``floor(p)`` and the next, each 0 off the image), so a point on a pixel row takes the
slope towards the next one, the image's row -1 included (where the sample itself is 0)."""
from __future__ import annotations

import torch

from ..dual import slots as _slots
from ..dual.dtypes import acc_dtype
from ..dual.rule_table import implements_library_op
from ..dual.value import Dual
from .operands import parts

Tensor = torch.Tensor

__all__ = ["deform_conv2d"]


def _position_slopes(x: Tensor, offset: Tensor, kernel: tuple[int, int], stride: tuple,
                     pad: tuple, dilation: tuple, groups: int) -> tuple[Tensor, Tensor]:
    """``(∂S/∂p_y, ∂S/∂p_x)`` of each channel's sample at each tap and output point,
    ``(N, G, C/G, K, Ho, Wo)`` for G offset groups and K taps, as torchvision's backward
    takes them: ``∂S/∂p_y = (1 - l_x)·(v₁₀ - v₀₀) + l_x·(v₁₁ - v₀₁)`` of the pixels
    ``v_ab = x[floor(p_y) + a, floor(p_x) + b]`` (0 off the image), ``l = p - floor(p)``."""
    n, c, h, w = x.shape
    (kh, kw), (ho, wo) = kernel, offset.shape[-2:]
    # p_y = i·stride − pad + a·dilation + Δ_y, for tap k = (a, b); p_x likewise
    rows = torch.arange(ho, device=x.device, dtype=x.dtype) * stride[0] - pad[0]
    cols = torch.arange(wo, device=x.device, dtype=x.dtype) * stride[1] - pad[1]
    tap_rows = torch.arange(kh, device=x.device, dtype=x.dtype) * dilation[0]
    tap_cols = torch.arange(kw, device=x.device, dtype=x.dtype) * dilation[1]
    base_y = (tap_rows.view(kh, 1, 1, 1) + rows.view(1, 1, ho, 1)).expand(kh, kw, ho, wo)
    base_x = (tap_cols.view(1, kw, 1, 1) + cols.view(1, 1, 1, wo)).expand(kh, kw, ho, wo)
    delta = offset.reshape(n, groups, kh * kw, 2, ho, wo)
    py = base_y.reshape(kh * kw, ho, wo) + delta[:, :, :, 0]  # (N, G, K, Ho, Wo)
    px = base_x.reshape(kh * kw, ho, wo) + delta[:, :, :, 1]
    y0, x0 = py.floor(), px.floor()
    ly, lx = py - y0, px - x0
    image = x.reshape(n, groups, 1, c // groups, h * w).expand(-1, -1, kh * kw, -1, -1)

    def pixel(dy: int, dx: int) -> Tensor:
        # x at (y0 + dy, x0 + dx), 0 off the image: (N, G, C/G, K, Ho, Wo)
        yy, xx = y0 + dy, x0 + dx
        valid = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
        at = (yy.clamp(0, h - 1) * w + xx.clamp(0, w - 1)).long()
        # one gather per tap: image (N, G, K, C/G, H·W), at (N, G, K, 1, Ho·Wo)
        picked = image.gather(-1, at.flatten(-2).unsqueeze(3).expand(-1, -1, -1, c // groups,
                                                                       -1))
        picked = picked.view(n, groups, kh * kw, c // groups, ho, wo).transpose(2, 3)
        return picked * valid.unsqueeze(2)

    v00, v01, v10, v11 = pixel(0, 0), pixel(0, 1), pixel(1, 0), pixel(1, 1)
    ly, lx = ly.unsqueeze(2), lx.unsqueeze(2)
    slope_y = (1 - lx) * (v10 - v00) + lx * (v11 - v01)
    slope_x = (1 - ly) * (v01 - v00) + ly * (v11 - v10)
    return slope_y, slope_x


# The offsets' term takes N·C·K·Ho·Wo numbers per slot in each of its slopes, pixels and
# columns: so many images at a time as take about this many, as torchvision's own kernels take
# the images in chunks.
_CHUNK_NUMBERS = 1 << 24


def _offset_term(stack: Tensor, x: Tensor, offset: Tensor, weight: Tensor, mask, kernel, stride,
                 pad, dilation, groups: int, offset_groups: int) -> Tensor:
    """The offsets' term of every slot of ``stack`` (the offsets' tangents),
    ``(T, N, C_out, Ho, Wo)``, a chunk of images at a time."""
    slots, n, _, ho, wo = stack.shape
    per_image = slots * x.shape[1] * kernel[0] * kernel[1] * ho * wo
    chunk = max(1, _CHUNK_NUMBERS // max(1, per_image))
    if n <= chunk:
        return _offset_term_of(stack, x, offset, weight, mask, kernel, stride, pad, dilation,
                               groups, offset_groups)
    return torch.cat([_offset_term_of(stack[:, i:i + chunk], x[i:i + chunk],
                                      offset[i:i + chunk], weight,
                                      None if mask is None else mask[i:i + chunk], kernel,
                                      stride, pad, dilation, groups, offset_groups)
                      for i in range(0, n, chunk)], dim=1)


def _offset_term_of(stack: Tensor, x: Tensor, offset: Tensor, weight: Tensor, mask, kernel,
                    stride, pad, dilation, groups: int, offset_groups: int) -> Tensor:
    """``_offset_term`` of these images at once."""
    slope_y, slope_x = _position_slopes(x, offset, kernel, stride, pad, dilation,
                                        offset_groups)
    slots, n, _, ho, wo = stack.shape
    taps = kernel[0] * kernel[1]
    delta = stack.reshape(slots, n, offset_groups, 1, taps, 2, ho, wo)
    # columns[s, n, g, c, k, i, j] = m · (∂S/∂p_y · Δ̇_y + ∂S/∂p_x · Δ̇_x)
    columns = slope_y * delta[:, :, :, :, :, 0] + slope_x * delta[:, :, :, :, :, 1]
    if mask is not None:
        columns = columns * mask.reshape(1, n, offset_groups, 1, taps, ho, wo)
    c_out, c_in = weight.shape[0], x.shape[1]
    columns = columns.reshape(slots, n, groups, c_in // groups, taps, ho, wo)
    w = weight.reshape(groups, c_out // groups, c_in // groups, taps)
    # y[s, n, o, i, j] = Σ_{c, k} W[o, c, k] · columns[s, n, c, k, i, j], by weight group
    out = torch.einsum("sngckij,gock->sngoij", columns, w)
    return out.reshape(slots, n, c_out, ho, wo)


@implements_library_op("torchvision::deform_conv2d")
def deform_conv2d(input, weight, offset, mask, bias, stride_h: int, stride_w: int, pad_h: int,
                  pad_w: int, dilation_h: int, dilation_w: int, groups: int,
                  offset_groups: int, use_mask: bool) -> Dual:
    """Dual ``torchvision::deform_conv2d`` (arguments as the op's; ``mask`` unused without
    ``use_mask``): torchvision's primal, and the terms of input, weight, mask, bias and offsets
    summed over the slots of each operand that carries a tangent."""
    op = torch.ops.torchvision.deform_conv2d
    x, w, off, m, b = (parts(v) for v in (input, weight, offset, mask, bias))
    geometry = (stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, groups, offset_groups)
    y = op(x.primal, w.primal, off.primal, m.primal, b.primal, *geometry, use_mask)
    if not use_mask:
        m = m._replace(tangents=None, slots=None)  # (a placeholder the op does not read)
    plan = _slots.plan([x.slots, w.slots, off.slots, m.slots, b.slots], "deform_conv2d")
    if plan.count == 0:
        return Dual._unchecked(y, None, None, False)
    dtype = plan.dtype_for(y.dtype)
    wide = acc_dtype(dtype)
    xp, wp, offp, mp = (v.primal.to(wide) for v in (x, w, off, m))
    zero_bias = wp.new_zeros(wp.shape[0])

    def conv(x_, w_, off_, m_):
        return op(x_, w_, off_, m_, zero_bias, *geometry, use_mask)

    def each_slot(stack: Tensor, term) -> Tensor:
        return torch.stack([term(t.to(wide)) for t in stack])

    terms = []  # (a term's slots, the position of its operand among the five)
    if x.tangents is not None:  # the slots as images of their own
        count = x.tangents.shape[0]
        repeat = lambda t: t.repeat(count, *[1] * (t.dim() - 1))  # noqa: E731
        term = conv(x.tangents.flatten(0, 1).to(wide), wp, repeat(offp), repeat(mp))
        terms.append((term.unflatten(0, (count, -1)), 0))
    if w.tangents is not None:
        terms.append((each_slot(w.tangents, lambda t: conv(xp, t, offp, mp)), 1))
    if m.tangents is not None:
        terms.append((each_slot(m.tangents, lambda t: conv(xp, wp, offp, t)), 3))
    if b.tangents is not None:
        terms.append((b.tangents.to(wide)[:, None, :, None, None].expand(-1, *y.shape)
                      .contiguous(), 4))
    if off.tangents is not None:
        terms.append((_offset_term(off.tangents.to(wide), xp, offp, wp,
                                   mp if use_mask else None,
                                   w.primal.shape[-2:], (stride_h, stride_w), (pad_h, pad_w),
                                   (dilation_h, dilation_w), groups, offset_groups), 2))
    stack = _slots.place(plan.count, [(t.to(dtype), plan.positions[k]) for t, k in terms])
    return Dual._unchecked(y, stack, plan.directions, plan.single)
