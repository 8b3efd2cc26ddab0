"""Shape-only (fake) implementations of the ``torch.ops.fgkernels`` ops, registered when this
module is imported (right after the ops themselves load), so that the ops trace under
``torch.compile`` and FakeTensor. Each checks what the C++ op checks first: the layer's own
contract where the op is a layer (``contracts``, as its rule does in front), ``torch._check``
for the rest. (The ops declared with their rules, ``KernelOp`` and ``LayerOp``, register their
own.)"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...dual.dtypes import acc_dtype
from ...dual.layout import empty_slots, kernel_format
from ..base import check_stacked_tangent as check_tangent
from ..base import param_slots, shared_tangent_dtype
from ..contracts import check_conv

lib = torch.library


@lib.register_fake("fgkernels::dual_bn_stats")
def _(x, xt):
    torch._check(x.dim() >= 2, lambda: "x must have a channel dimension")
    torch._check(x.numel() > 0, lambda: f"dual_bn_stats: x must not be empty, got shape "
                                        f"{tuple(x.shape)}")
    acc = acc_dtype(x.dtype)
    C, T = x.shape[1], 0 if xt is None else xt.shape[0]
    if xt is not None:
        check_tangent(x, xt)
    return (x.new_empty(C, dtype=acc), x.new_empty(C, dtype=acc),
            x.new_empty((T, C), dtype=acc), x.new_empty((T, C), dtype=acc))


def check_coefficients_args(mean, var, tmean, tcov, weight, weight_t, bias, bias_t, x_pos,
                            p_pos, count, training):
    """dual_bn_coefficients' arguments, as the op checks them (csrc/batch_norm_common.h)."""
    torch._check(mean.dim() == 1, lambda: f"mean must have shape (C), got {tuple(mean.shape)}")
    torch._check(mean.dtype in (torch.float32, torch.float64),
                 lambda: f"mean must be float32 or float64, got {mean.dtype}")
    C, X, P = mean.shape[0], len(x_pos), len(p_pos)
    from_batch = training and X > 0
    torch._check(not from_batch or (tmean is not None and tcov is not None),
                 lambda: "training with input slots needs tmean and tcov")
    torch._check(weight_t is None or weight is not None,
                 lambda: "weight_t was given without weight")
    torch._check(bias_t is None or bias is not None, lambda: "bias_t was given without bias")
    for name, t, rows in (("var", var, None), ("weight", weight, None), ("bias", bias, None),
                          ("weight_t", weight_t, P), ("bias_t", bias_t, P),
                          ("tmean", tmean if from_batch else None, X),
                          ("tcov", tcov if from_batch else None, X)):
        shape = (C,) if rows is None else (rows, C)
        torch._check(t is None or tuple(t.shape) == shape,
                     lambda: f"{name} must have shape {shape}, got {tuple(t.shape)}")
    for name, positions in (("x_pos", x_pos), ("p_pos", p_pos)):
        torch._check(all(0 <= t < count for t in positions) and
                     len(set(positions)) == len(positions),
                     lambda: f"{name} must hold distinct output slots in [0, {count}), got "
                             f"{list(positions)}")


@lib.register_fake("fgkernels::dual_bn_coefficients")
def _(mean, var, tmean, tcov, weight, weight_t, bias, bias_t, x_pos, p_pos, count, training,
      eps):
    check_coefficients_args(mean, var, tmean, tcov, weight, weight_t, bias, bias_t, x_pos,
                            p_pos, count, training)
    C = mean.shape[0]
    return (mean.new_empty(C), mean.new_empty(C), mean.new_empty((count, C)),
            mean.new_empty((count, C)))


def check_running_stats_args(running_mean, running_var, mean, var, n):
    """bn_update_running_stats_'s arguments, as the op checks them (csrc/batch_norm_common.h)."""
    torch._check(n > 1, lambda: f"bn_update_running_stats_: n (values per channel) must be more "
                                f"than 1 for the unbiased variance n / (n - 1), got {n}")
    C = mean.shape[0]
    for name, t in (("var", var), ("running_mean", running_mean),
                    ("running_var", running_var)):
        torch._check(tuple(t.shape) == (C,),
                     lambda: f"{name} must have shape ({C},), got {tuple(t.shape)}")
    torch._check(running_mean.dtype == running_var.dtype,
                 lambda: "running_mean and running_var must share a dtype")
    torch._check(running_mean.dtype.is_floating_point,
                 lambda: f"running_mean and running_var must be floating, got "
                         f"{running_mean.dtype}")


@lib.register_fake("fgkernels::bn_update_running_stats_")
def _(running_mean, running_var, mean, var, n, momentum):
    check_running_stats_args(running_mean, running_var, mean, var, n)
    return None


def check_apply_args(x, xt, x_slot, **coefficients):
    """The apply ops' arguments, as the ops check them (csrc/batch_norm_common.h): xt stacks
    tangents of x, each coefficient of shape (C,) or (T, C) (t_xscale, t_shift) on x's device,
    x_slot's entries -1 (no input slot) or below xt's T."""
    C, T, X = x.shape[1], len(x_slot), 0 if xt is None else xt.shape[0]
    if xt is not None:
        check_tangent(x, xt)
    for name, t in coefficients.items():
        shape = (T, C) if name.startswith("t_") else (C,)
        torch._check(tuple(t.shape) == shape,
                     lambda: f"{name} must have shape {shape}, got {tuple(t.shape)}")
        torch._check(t.device == x.device,
                     lambda: f"{name} must be on x's device {x.device}, got {t.device}")
    torch._check(all(-1 <= s < X for s in x_slot),
                 lambda: f"x_slot entries must be -1 (no input slot) or < T of xt ({X}), got "
                         f"{list(x_slot)}")


@lib.register_fake("fgkernels::dual_bn_apply")
def _(x, xt, x_slot, center, scale, shift, t_xscale, t_shift, relu, tangent_dtype=None):
    check_apply_args(x, xt, x_slot, center=center, scale=scale, shift=shift,
                     t_xscale=t_xscale, t_shift=t_shift)
    dtype = tangent_dtype or (xt.dtype if xt is not None else x.dtype)
    x = x.contiguous(memory_format=kernel_format(x))
    return torch.empty_like(x), empty_slots(len(x_slot), x, dtype)


@lib.register_fake("fgkernels::dual_bn_apply_")
def _(x, xt, center, scale, shift, t_xscale, t_shift, relu):
    torch._check(x.is_contiguous(memory_format=kernel_format(x)),
                 lambda: "x must be contiguous or channels_last to be updated in place")
    check_apply_args(x, xt, range(0 if xt is None else xt.shape[0]), center=center,
                     scale=scale, shift=shift, t_xscale=t_xscale, t_shift=t_shift)
    return None


@lib.register_fake("fgkernels::dual_conv2d")
def _(x, xt, w, wt, b, bt, stride, padding, dilation, groups):
    check_conv(x, w, b, groups, tuple(stride), tuple(padding), tuple(dilation))
    y = F.conv2d(x, w, b, stride, padding, dilation, groups)
    return (y, *_conv_tangents(x, y, xt, w, wt, bt, stride, padding, dilation, groups))


def _conv_tangents(x, y, xt, w, wt, bt, stride, padding, dilation, groups):
    dtype = shared_tangent_dtype(x, xt, wt, bt)
    P = param_slots(wt, bt)
    p_part = empty_slots(P, y, dtype) if P else y.new_empty(0, dtype=dtype)
    if xt is None:
        return y.new_empty(0, dtype=dtype), p_part
    check_tangent(x, xt)
    return empty_slots(xt.shape[0], y, dtype), p_part


@lib.register_fake("fgkernels::dual_conv2d_tangents")
def _(x, y, xt, w, wt, bt, stride, padding, dilation, groups):
    check_conv(x, w, None, groups, tuple(stride), tuple(padding), tuple(dilation))
    torch._check(y.dim() == 4 and y.shape[:2] == (x.shape[0], w.shape[0]),
                 lambda: f"y must have shape ({x.shape[0]}, {w.shape[0]}, H_out, W_out), "
                         f"got {tuple(y.shape)}")
    return _conv_tangents(x, y, xt, w, wt, bt, stride, padding, dilation, groups)
