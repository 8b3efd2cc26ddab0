"""Oracles for the tests: torch's own forward-mode AD (``fgkernels.testing``) on whole models,
and central finite differences."""
from __future__ import annotations

import copy
from typing import Callable, Optional

import torch
from torch.func import functional_call

import fgkernels
from fgkernels.dual.layout import slots_in_format
from fgkernels.testing import forward_ad_jvp

# Every backend that runs here; the op suites take all but Triton, whose own tests keep to the
# tiny shapes its interpreter runs in time (tests/backends/test_triton.py).
BACKENDS = [b for b in ("reference", "native", "triton") if b in fgkernels.available_backends()]
CPU_BACKENDS = [b for b in BACKENDS if b != "triton"]
# Against forward_ad: the tolerance of a float64 or float32 result.
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-4, atol=1e-5)}
# ... and at values and shapes Hypothesis draws (float32 sums over drawn sizes round further).
TOL_DRAWN = {torch.float64: dict(rtol=1e-10, atol=1e-11),
             torch.float32: dict(rtol=2e-4, atol=2e-4)}


def torch_jvp(model: torch.nn.Module, x: torch.Tensor, xt: Optional[torch.Tensor],
              param_tangents: Optional[dict] = None, loss: Optional[Callable] = None):
    """Primal and tangent of ``model(x)`` (or ``loss(model(x))``) by
    ``fgkernels.testing.forward_ad_jvp``, for one tangent. Runs on a copy, so the model's
    buffers are untouched."""
    model = copy.deepcopy(model)
    param_tangents = param_tangents or {}
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach() for _, p in model.named_parameters()]
    buffers = dict(model.named_buffers())

    def call(x_, *ps):
        out = functional_call(model, {**dict(zip(names, ps)), **buffers}, (x_,))
        return out if loss is None else loss(out)

    stack = lambda t: None if t is None else t.unsqueeze(0)
    tangents = [stack(xt), *[stack(param_tangents.get(n)) for n in names]]
    if all(t is None for t in tangents):
        y = call(x, *params)
        return y, torch.zeros_like(y)
    y, yt = forward_ad_jvp(call, [x, *params], tangents)
    return y, yt[0]


def torch_jvp_multi(model, x, xt_stack, param_stacks=None, loss=None):
    """``torch_jvp`` for T tangents, one run per slot; returns (primal, (T, ...) tangents)."""
    T = xt_stack.shape[0] if xt_stack is not None else next(iter(param_stacks.values())).shape[0]
    outs = [torch_jvp(model, x, None if xt_stack is None else xt_stack[t],
                      {n: v[t] for n, v in (param_stacks or {}).items()}, loss)
            for t in range(T)]
    return outs[0][0], torch.stack([o[1] for o in outs])


def elementwise_forward_ad(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                           xt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """forward_ad's ``(y, stacked tangents)`` of an elementwise ``fn``, one element at a time:
    torch's scalar definition of the derivative, which its vectorized CPU loops do not keep at a
    NaN x for every op (hardtanh's gives 0 there in the vector body, ẋ in the scalar tail)."""
    if x.numel() == 0:
        return forward_ad_jvp(fn, [x], [xt])
    flat, flat_t = x.reshape(-1), xt.reshape(len(xt), -1)
    ys, ts = zip(*(forward_ad_jvp(fn, [flat[i:i + 1]], [flat_t[:, i:i + 1]])
                   for i in range(flat.numel())))
    return torch.cat(ys).view_as(x), torch.cat(ts, -1).view_as(xt)


def central_difference(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                       xt: torch.Tensor, h: float = 1e-6) -> torch.Tensor:
    """(f(x + h·ẋ) − f(x − h·ẋ)) / 2h, in float64."""
    return (fn(x + h * xt) - fn(x - h * xt)) / (2 * h)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def laid_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t``'s values laid out ``contiguous``, ``channels_last`` (a 4-D tensor, or a stack of
    4-D slots each channels_last), ``strided`` (every other column of a wider tensor; 4-D and
    up) or ``transposed`` (the last two dims' strides swapped; 2-D and up)."""
    if layout == "transposed":
        return t.transpose(-1, -2).contiguous().transpose(-1, -2) if t.dim() >= 2 else t
    if layout == "contiguous" or t.dim() < 4:
        return t
    if layout == "channels_last":
        if t.dim() == 4:
            return t.contiguous(memory_format=torch.channels_last)
        return slots_in_format(t, torch.channels_last)
    wide = t.new_zeros(*t.shape[:-1], 2 * t.shape[-1])
    wide[..., ::2] = t
    return wide[..., ::2]

