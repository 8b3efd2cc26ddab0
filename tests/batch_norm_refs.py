"""The batch norm's per-channel ops in torch's own ops, slot by slot: oracles of
``dual_bn_coefficients`` and ``bn_update_running_stats_`` (their schemas in csrc/fgkernels.cpp)
for every backend and device."""
from __future__ import annotations

import torch


def dual_bn_coefficients_ref(mean, var, tmean, tcov, weight, weight_t, bias, bias_t, x_pos,
                             p_pos, count, training, eps):
    """scale, shift, t_xscale, t_shift in mean's dtype: with r = 1/√(var + eps), a = weight·r,
    each input slot s adds −a·r²·tcov[s] and −a·tmean[s] to its output slot x_pos[s] (training
    only), each parameter slot p adds weight_t[p]·r and bias_t[p] to p_pos[p]."""
    as_acc = lambda t: t.to(mean.dtype)
    r = 1 / torch.sqrt(as_acc(var) + eps)
    a = r if weight is None else as_acc(weight) * r
    shift = torch.zeros_like(mean) if bias is None else as_acc(bias).clone()
    t_xscale = mean.new_zeros((count, mean.shape[0]))
    t_shift = mean.new_zeros((count, mean.shape[0]))
    if training:
        for s, t in enumerate(x_pos):
            t_xscale[t] -= a * r * r * as_acc(tcov[s])
            t_shift[t] -= a * as_acc(tmean[s])
    for p, t in enumerate(p_pos):
        if weight_t is not None:
            t_xscale[t] += as_acc(weight_t[p]) * r
        if bias_t is not None:
            t_shift[t] += as_acc(bias_t[p])
    return a, shift, t_xscale, t_shift


def bn_update_running_stats_ref(running_mean, running_var, mean, var, n, momentum):
    """The buffers as nn.BatchNorm2d updates them, r ← m·stat + (1 − m)·r with the unbiased
    variance var·n/(n − 1), computed in float64 and cast once to the buffers' dtype (new
    tensors; the buffers stay as they are)."""
    stats = (mean.double(), var.double() * (n / (n - 1)))
    return tuple((momentum * stat + (1 - momentum) * buf.double()).to(buf.dtype)
                 for buf, stat in zip((running_mean, running_var), stats))
