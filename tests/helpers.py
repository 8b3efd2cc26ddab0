"""Oracles for the tests: torch's own forward-mode AD (``fgkernels.testing``) on whole models,
and central finite differences."""
from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, Callable, Optional

import torch
from torch.func import functional_call

import fgkernels
from fgkernels.dual.layout import slots_in_format
from fgkernels.testing import forward_ad_jvp

# Every backend that runs here; the op suites take all but Triton, whose own tests keep to the
# tiny shapes its interpreter runs in time (tests/backends/test_triton.py).
BACKENDS = [b for b in ("reference", "native", "triton") if b in fgkernels.available_backends()]
CPU_BACKENDS = [b for b in BACKENDS if b != "triton"]
# Against forward_ad: the tolerance of a float64 result (a narrower one is held to torch's own
# error in its dtype: assert_within_torch_error) ...
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12)}
# ... and at values and shapes Hypothesis draws.
TOL_DRAWN = {torch.float64: dict(rtol=1e-10, atol=1e-11)}
# A narrower result's error may be twice that of torch's own forward mode in its dtype plus this
# relative floor: the slack where torch's result happens to round well (a few terms, a lucky sum).
FLOOR = {torch.float32: 1e-5, torch.bfloat16: 2e-3, torch.float16: 1e-3}


class ForwardADOracle:
    """forward_ad's result of ``fn`` at ``primals`` along stacked ``tangents`` (None: a constant),
    computed in any dtype: ``oracle(dtype)`` casts every floating operand to ``dtype`` (and lays
    it out contiguous: torch's own forward mode refuses some layouts). The oracle of
    ``assert_within_torch_error``."""

    def __init__(self, fn: Callable[..., Any], primals: Sequence[Optional[torch.Tensor]],
                 tangents: Sequence[Optional[torch.Tensor]]):
        self.fn, self.primals, self.tangents = fn, list(primals), list(tangents)

    def __call__(self, dtype: torch.dtype):
        cast = lambda t: t.to(dtype).contiguous() if _floating(t) else t
        return forward_ad_jvp(self.fn, [cast(p) for p in self.primals],
                              [cast(t) for t in self.tangents])

    def nudged(self, seed: int) -> ForwardADOracle:
        """The same oracle at operands one unit in the last place away, in random directions
        (drawn from ``seed``): torch's error there is another sample of its rounding at the
        same conditioning."""
        g = torch.Generator().manual_seed(seed)

        def nudge(t):
            if not _floating(t):
                return t
            step = torch.randint(-1, 2, t.shape, generator=g).to(t.device, t.dtype)
            return torch.where(step == 0, t, torch.nextafter(t, step * torch.inf))
        return ForwardADOracle(self.fn, [nudge(p) for p in self.primals],
                               [nudge(t) for t in self.tangents])


def _floating(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point()


def _parts(result) -> list:
    """A Dual as [primal, stacked tangents], a tensor as [itself], a tuple or list flattened."""
    if isinstance(result, (tuple, list)):
        return [part for r in result for part in _parts(r)]
    if isinstance(result, fgkernels.Dual):
        return [result.primal, result.tangents]
    return [result]


def _finite_err(ours: torch.Tensor, want: torch.Tensor, mask: torch.Tensor) -> float:
    return rel_err(ours[mask], want[mask])


def assert_within_torch_error(actual, oracle: Any,
                              tol: dict = TOL[torch.float64],
                              also: Optional[Callable[[torch.dtype], Any]] = None) -> None:
    """``actual`` (a Dual, a tensor, or a tuple of them) against ``oracle(dtype)``, torch's
    forward mode computing the same result in ``dtype`` (a ``ForwardADOracle`` or any function
    of the dtype), or against ``oracle`` itself, a float64 result, when every part of ``actual``
    is float64.

    A float64 part equals the float64 oracle within ``tol`` (its ``atol`` times the part's
    largest finite magnitude, when above 1). A part of a narrower dtype d is non-finite where
    torch's in d is, with its values there, and elsewhere within twice torch's own error in d
    plus a floor, both errors relative to the float64 oracle (``err ≤
    2·err_torch + FLOOR[d]``). ``err_torch`` is the largest of torch's errors at the operands and,
    for a ``ForwardADOracle``, at two sets of operands one rounding away (``nudged``): the error
    of a result of a few elements that cancel is one sample of rounding luck, which a bound by
    one sample would fail by luck too. ``also(d)``: one more yardstick in d (the TF32 products
    cuDNN may take)."""
    if not callable(oracle):  # the float64 result itself
        result, oracle = oracle, lambda dt: result if dt == torch.float64 else None
    exact = _parts(oracle(torch.float64))
    ours_parts = _parts(actual)
    assert len(ours_parts) == len(exact), (len(ours_parts), len(exact))
    yardsticks: dict = {}  # dtype -> [(torch's parts in it, the float64 parts they miss)]

    def samples(dt):
        if dt not in yardsticks:
            found = [(_parts(oracle(dt)), exact)]
            if isinstance(oracle, ForwardADOracle):
                for nudged in (oracle.nudged(0), oracle.nudged(1)):
                    found.append((_parts(nudged(dt)), _parts(nudged(torch.float64))))
            if also is not None:
                found.append((_parts(also(dt)), exact))
            yardsticks[dt] = found
        return yardsticks[dt]

    for index, (ours, want) in enumerate(zip(ours_parts, exact)):
        assert ours is not None and ours.shape == want.shape, \
            (index, None if ours is None else ours.shape, want.shape)
        if ours.dtype == torch.float64:
            # The absolute floor scales with the part's largest finite value: an element that
            # cancels to near 0 keeps the rounding of the terms it cancels, of that size (a
            # batch norm's tangents are its input's over a spread of 1e-2: some 100).
            finite = want[torch.isfinite(want)]
            scale = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
            torch.testing.assert_close(ours, want, rtol=tol["rtol"], atol=tol["atol"] * scale,
                                       equal_nan=True, msg=lambda m: f"part {index}: {m}")
            continue
        dt = ours.dtype
        (theirs, _), *others = samples(dt)
        theirs = theirs[index]
        finite = torch.isfinite(theirs) & torch.isfinite(want)
        assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs)), index
        torch.testing.assert_close(ours[~finite], theirs[~finite], rtol=0, atol=0,
                                   equal_nan=True)
        err, err_torch = _finite_err(ours, want, finite), _finite_err(theirs, want, finite)
        for other, other_exact in others:
            o, e = other[index], other_exact[index]
            err_torch = max(err_torch, _finite_err(o, e, torch.isfinite(o) & torch.isfinite(e)))
        assert err <= 2 * err_torch + FLOOR[dt], (f"part {index} ({dt})", err, err_torch)


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


def recording_backend(graphs: list) -> Callable:
    """A torch.compile backend that appends every graph it is given to ``graphs`` and runs it
    as traced."""
    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    return backend


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def held_by_bfloat16(t: torch.Tensor) -> bool:
    """Whether every value of ``t`` is one a bfloat16 holds (``t`` survives the round trip)."""
    return torch.equal(t, t.to(torch.bfloat16).to(t.dtype))


def laid_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t``'s values laid out ``contiguous``, ``channels_last`` (a 4-D tensor, or a stack of
    4-D slots each channels_last; other ranks as they are), ``strided`` (every other column of
    a wider tensor; 4-D and up) or ``transposed`` (the last two dims' strides swapped; 2-D and
    up)."""
    if layout == "transposed":
        return t.transpose(-1, -2).contiguous().transpose(-1, -2) if t.dim() >= 2 else t
    if layout == "contiguous" or t.dim() < 4:
        return t
    if layout == "channels_last":
        if t.dim() == 4:
            return t.contiguous(memory_format=torch.channels_last)
        return slots_in_format(t, torch.channels_last) if t.dim() == 5 else t
    wide = t.new_zeros(*t.shape[:-1], 2 * t.shape[-1])
    wide[..., ::2] = t
    return wide[..., ::2]


class BiasedAttention(torch.nn.Module):
    """Self-attention whose additive mask carries a tangent: a learned bias over (query, key)
    pairs (``"bias"``; ``"closure"``: read from a closure, which the pass does not substitute),
    a learned float padding mask (``"padding"``), or a per-head bias computed from the tokens
    (``"tokens"``)."""

    def __init__(self, mask: str, need_weights: bool, batch_first: bool, length: int = 5,
                 batch: int = 2, heads: int = 2):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(8, heads, batch_first=batch_first)
        self.mask, self.need_weights, self.batch_first = mask, need_weights, batch_first
        self.bias = torch.nn.Parameter(torch.randn(length, length))
        self.padding = torch.nn.Parameter(torch.randn(batch, length))
        bias = self.bias
        self.read_bias = lambda: bias

    def forward(self, x):
        masks = {}
        if self.mask == "bias":
            masks["attn_mask"] = self.bias
        elif self.mask == "closure":
            masks["attn_mask"] = self.read_bias()
        elif self.mask == "padding":
            masks["key_padding_mask"] = self.padding
        else:
            tokens = x if self.batch_first else x.transpose(0, 1)
            scores = tokens @ tokens.transpose(1, 2) / 8
            masks["attn_mask"] = scores.repeat_interleave(self.attn.num_heads, 0)
        out, weights = self.attn(x, x, x, need_weights=self.need_weights, **masks)
        return out if weights is None else out * weights.mean()


class BiasedTransformer(torch.nn.Module):
    """torch's transformer layers given a learned additive bias as the mask of their
    self-attention: an encoder layer (``"layer"``, its ``src_mask``), an encoder of two layers
    with a final norm (``"encoder"``, its ``mask``), or a whole ``nn.Transformer`` (``"source"``:
    its ``src_mask``; ``"target"``: its ``tgt_mask``; ``"memory"``: its ``memory_mask``), the
    input taken as source and target; with ``padding``, a bool padding mask of the last key of
    the first sequence beside it; ``is_causal``, the layer's or the encoder's hint (None: their
    default)."""

    def __init__(self, which: str, norm_first: bool, batch_first: bool, padding: bool,
                 length: int = 5, batch: int = 2, is_causal: Optional[bool] = None):
        super().__init__()
        self.hint = {} if is_causal is None else {"is_causal": is_causal}
        nn = torch.nn
        options = dict(dim_feedforward=16, dropout=0.0, batch_first=batch_first,
                       norm_first=norm_first)
        if which == "layer":
            self.net = nn.TransformerEncoderLayer(8, 2, **options)
        elif which == "encoder":
            self.net = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, **options), 2,
                                             norm=nn.LayerNorm(8), enable_nested_tensor=False)
        else:
            self.net = nn.Transformer(8, 2, 1, 1, **options)
        self.which, self.batch_first = which, batch_first
        self.bias = nn.Parameter(torch.randn(length, length))
        pad = torch.zeros(batch, length, dtype=torch.bool)
        pad[0, -1] = True
        self.register_buffer("pad", pad if padding else None)

    def forward(self, x):
        if self.which == "layer":
            return self.net(x, src_mask=self.bias, src_key_padding_mask=self.pad, **self.hint)
        if self.which == "encoder":
            return self.net(x, mask=self.bias, src_key_padding_mask=self.pad, **self.hint)
        mask = {"source": "src_mask", "target": "tgt_mask", "memory": "memory_mask"}[self.which]
        pad = {"source": "src_key_padding_mask", "target": "tgt_key_padding_mask",
               "memory": "memory_key_padding_mask"}[self.which]
        return self.net(x, x, **{mask: self.bias, pad: self.pad})
