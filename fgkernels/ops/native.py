"""The native backend: the compiled ``torch.ops.fgkernels`` ops (C++ on the CPU, CUDA on GPUs).

Batch norm runs as one statistics pass and one apply pass that writes the primal and every
tangent slot together (ReLU fused); the convolution and linear ops make three library calls
whatever the number of tangents (``csrc/composite.cpp``), two when the caller already has the
convolution's primal output. An op with no tangent in or out runs
the plain torch op.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from .._slots import place
from .bn_math import bn_coefficients, update_running_stats
from .layout import empty_slots, in_kernel_layout, kernel_format, slots_in_format
from .reference import ReferenceBackend

Tensor = torch.Tensor
Opt = Optional[Tensor]


@functools.lru_cache(maxsize=None)
def native_available() -> bool:
    """True when the compiled extension ``fgkernels._C`` loads (it registers the ops)."""
    try:
        from .. import _C  # noqa: F401
    except ImportError:
        return False
    _register_fakes()
    return True


def _register_fakes() -> None:
    """Shape-only (meta) implementations, so the ops trace under torch.compile / FakeTensor."""
    lib = torch.library

    def check_tangent(x, xt, name="xt"):
        torch._check(xt.dim() == x.dim() + 1 and xt.shape[1:] == x.shape,
                     lambda: f"{name} must have shape (T, *{tuple(x.shape)}), "
                             f"got {tuple(xt.shape)}")

    @lib.register_fake("fgkernels::dual_relu")
    def _(x, xt):
        check_tangent(x, xt)
        x = x.contiguous(memory_format=kernel_format(x))
        return torch.empty_like(x), empty_slots(xt.shape[0], x)

    @lib.register_fake("fgkernels::dual_max_pool2d")
    def _(x, xt, kernel_size, stride, padding, dilation, ceil_mode):
        check_tangent(x, xt)
        y = F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)
        return y, y.new_empty((xt.shape[0], *y.shape))

    @lib.register_fake("fgkernels::dual_bn_stats")
    def _(x, xt):
        torch._check(x.dim() >= 2, lambda: "x must have a channel dimension")
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        C, T = x.shape[1], 0 if xt is None else xt.shape[0]
        if xt is not None:
            check_tangent(x, xt)
        return (x.new_empty(C, dtype=acc), x.new_empty(C, dtype=acc),
                x.new_empty((T, C), dtype=acc), x.new_empty((T, C), dtype=acc))

    @lib.register_fake("fgkernels::dual_bn_apply")
    def _(x, xt, x_slot, center, scale, shift, t_xscale, t_shift, relu):
        C, T = x.shape[1], len(x_slot)
        torch._check(center.shape == (C,), lambda: f"center must have shape ({C},)")
        torch._check(scale.shape == (C,), lambda: f"scale must have shape ({C},)")
        torch._check(t_xscale.shape == (T, C), lambda: f"t_xscale must have shape ({T}, {C})")
        x = x.contiguous(memory_format=kernel_format(x))
        return torch.empty_like(x), empty_slots(T, x)

    def param_slots(wt, bt):
        return wt.shape[0] if wt is not None else (bt.shape[0] if bt is not None else 0)

    @lib.register_fake("fgkernels::dual_bn_apply_")
    def _(x, xt, center, scale, shift, t_xscale, t_shift, relu):
        return None

    @lib.register_fake("fgkernels::dual_conv2d")
    def _(x, xt, w, wt, b, bt, stride, padding, dilation, groups):
        y = F.conv2d(x, w, b, stride, padding, dilation, groups)
        P = param_slots(wt, bt)
        p_part = empty_slots(P, y) if P else y.new_empty(0)
        if xt is None:
            return y, y.new_empty(0), p_part
        x_part = F.conv2d(slots_in_format(xt, kernel_format(x)).flatten(0, 1), w, None, stride,
                          padding, dilation, groups).unflatten(0, xt.shape[:2])
        return y, x_part, p_part

    @lib.register_fake("fgkernels::dual_conv2d_tangents")
    def _(x, y, xt, w, wt, bt, stride, padding, dilation, groups):
        torch._check(y.dim() == 4 and y.shape[:2] == (x.shape[0], w.shape[0]),
                     lambda: f"y must have shape ({x.shape[0]}, {w.shape[0]}, H_out, W_out), "
                             f"got {tuple(y.shape)}")
        P = param_slots(wt, bt)
        p_part = empty_slots(P, y) if P else y.new_empty(0)
        if xt is None:
            return y.new_empty(0), p_part
        check_tangent(x, xt)
        x_part = F.conv2d(slots_in_format(xt, kernel_format(x)).flatten(0, 1), w, None, stride,
                          padding, dilation, groups).unflatten(0, xt.shape[:2])
        return x_part, p_part

    @lib.register_fake("fgkernels::dual_linear")
    def _(x, xt, w, wt, b, bt):
        y = F.linear(x, w)
        P = param_slots(wt, bt)
        p_part = y.new_empty((P, *y.shape)) if P else y.new_empty(0)
        x_part = y.new_empty((xt.shape[0], *y.shape)) if xt is not None else y.new_empty(0)
        return y, x_part, p_part


def _numeric_padding(padding, w: Tensor, dilation) -> Optional[tuple[int, int]]:
    """Explicit symmetric padding for ``padding`` ('same'/'valid'/ints), None if asymmetric."""
    if not isinstance(padding, str):
        return tuple(padding)
    if padding == "valid":
        return (0, 0)
    total = [d * (k - 1) for d, k in zip(dilation, w.shape[2:])]
    return None if any(t % 2 for t in total) else tuple(t // 2 for t in total)


class NativeBackend(ReferenceBackend):
    """Ops of ``torch.ops.fgkernels``; what they do not cover falls back to the reference."""

    name = "native"

    def conv2d(self, x, xt, w, wt, b, bt, x_pos, p_pos, count, stride, padding, dilation,
               groups, y=None):
        pad = _numeric_padding(padding, w, dilation)
        if pad is None:
            return super().conv2d(x, xt, w, wt, b, bt, x_pos, p_pos, count, stride, padding,
                                  dilation, groups, y)
        if count == 0:
            return (F.conv2d(x, w, b, stride, pad, dilation, groups) if y is None else y), None
        if y is None:
            y, x_part, p_part = torch.ops.fgkernels.dual_conv2d(x, xt, w, wt, b, bt, stride, pad,
                                                                dilation, groups)
        else:
            x_part, p_part = torch.ops.fgkernels.dual_conv2d_tangents(
                x, y, xt, w, wt, bt, stride, pad, dilation, groups)
        return y, place(count, [(x_part, x_pos), (p_part, p_pos)], owned=True)

    def linear(self, x, xt, w, wt, b, bt, x_pos, p_pos, count):
        if count == 0:
            return F.linear(x, w, b), None
        y, x_part, p_part = torch.ops.fgkernels.dual_linear(x, xt, w, wt, b, bt)
        return y, place(count, [(x_part, x_pos), (p_part, p_pos)], owned=True)

    def batch_norm(self, x, xt, w, b, wt, bt, x_pos, p_pos, count, running_mean, running_var,
                   training, momentum, eps, relu):
        if count == 0:
            y = F.batch_norm(x, running_mean, running_var, w, b, training, momentum, eps)
            return (torch.relu(y) if relu else y), None
        c = self.bn_coefficients(x, xt, w, b, wt, bt, x_pos, p_pos, count, running_mean,
                                 running_var, training, momentum, eps)
        return torch.ops.fgkernels.dual_bn_apply(x, xt, c.x_slot, *c.apply_args(), relu)

    def conv2d_batch_norm(self, x, xt, w, wt, cb, cbt, x_pos, conv_pos, count, stride, padding,
                          dilation, groups, g, bb, gt, bbt, bn_pos, running_mean, running_var,
                          training, momentum, eps, relu, conv_y=None):
        """The convolution, then batch norm (and ReLU) applied in place on its fresh output:
        one activation-sized buffer less at the peak of every Conv→BN run. A given ``conv_y``
        is the caller's to hand over: it is overwritten too."""
        h, ht = self.conv2d(x, xt, w, wt, cb, cbt, x_pos, conv_pos, count, stride, padding,
                            dilation, groups, conv_y)
        x_slots = tuple(range(count))
        # Only the compiled convolution's output is surely fresh (the reference one may hand
        # back an expanded bias tangent).
        owned = _numeric_padding(padding, w, dilation) is not None and in_kernel_layout(h, ht)
        if count == 0 or not owned:
            return self.batch_norm(h, ht, g, bb, gt, bbt, x_slots, bn_pos, count, running_mean,
                                   running_var, training, momentum, eps, relu)
        c = self.bn_coefficients(h, ht, g, bb, gt, bbt, x_slots, bn_pos, count, running_mean,
                                 running_var, training, momentum, eps)
        torch.ops.fgkernels.dual_bn_apply_(h, ht, *c.apply_args(), relu)
        return h, ht

    def bn_coefficients(self, x, xt, w, b, wt, bt, x_pos, p_pos, count, running_mean,
                        running_var, training, momentum, eps, stats=None):
        """Statistics (from ``stats`` when a fused producer computed them, else one pass over
        x and ẋ), the running-stat update, and the per-channel affine coefficients."""
        if training:
            mean, var, tmean, tcov = stats if stats is not None else \
                torch.ops.fgkernels.dual_bn_stats(x, xt)
            update_running_stats(running_mean, running_var, mean, var, x.numel() // x.shape[1],
                                 momentum)
        else:
            acc = torch.float64 if x.dtype == torch.float64 else torch.float32
            mean, var = running_mean.to(acc), running_var.to(acc)
            tmean = tcov = None
        return bn_coefficients(mean, var, tmean, tcov, w, b, wt, bt, x_pos, p_pos, count,
                               training, eps)

    def relu(self, x, xt):
        if xt is None:
            return torch.relu(x), None
        return torch.ops.fgkernels.dual_relu(x, xt)

    def max_pool2d(self, x, xt, kernel_size, stride, padding, dilation, ceil_mode):
        if xt is None or x.dim() != 4:
            return super().max_pool2d(x, xt, kernel_size, stride, padding, dilation, ceil_mode)
        pair = torch.nn.modules.utils._pair
        return torch.ops.fgkernels.dual_max_pool2d(x, xt, pair(kernel_size), pair(stride),
                                                   pair(padding), pair(dilation), ceil_mode)
