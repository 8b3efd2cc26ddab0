"""Property-based tests: Hypothesis draws shapes (empty and size-1 dims included), layouts,
dtypes, slot counts, directions and broadcast patterns, and every op's primal and tangents must
equal torch.autograd.forward_ad's, slot by slot, on every CPU backend."""
import copy
import math
import re
import warnings
from collections import OrderedDict, namedtuple
from unittest import mock

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import fgkernels  # noqa: E402
import fgkernels.functional as DF  # noqa: E402
from fgkernels import Dual  # noqa: E402
from fgkernels.testing import (  # noqa: E402
    compare_with_forward_ad,
    forward_ad_jvp,
    reads_padding_only,
)

from helpers import (  # noqa: E402
    CPU_BACKENDS,
    ForwardADOracle,
    assert_within_torch_error,
    elementwise_forward_ad,
    laid_out,
)
from helpers import TOL_DRAWN as TOL  # noqa: E402
from op_table import OPS, inputs  # noqa: E402

# Random draws in CI (HYPOTHESIS_PROFILE=ci, the seed printed), the same draws locally: the
# profiles are in conftest.py.
PROFILE = settings(max_examples=40, deadline=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

dims = st.integers(min_value=1, max_value=4)
dtypes = st.sampled_from([torch.float64, torch.float32])
slots = st.integers(min_value=1, max_value=3)
layouts = st.sampled_from(["contiguous", "channels_last", "strided", "transposed"])
backends = st.sampled_from(CPU_BACKENDS)


def _tensor(draw, shape, dtype, layout="contiguous"):
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    return laid_out(torch.randn(shape, generator=g, dtype=dtype), layout)


def _close(actual, oracle):
    """``actual`` against ``oracle`` (forward_ad's result in a dtype, or in float64 itself):
    equal in float64, within twice torch's own error in float32."""
    assert_within_torch_error(actual, oracle, TOL[torch.float64])


@st.composite
def conv_cases(draw):
    dtype, layout, T = draw(dtypes), draw(layouts), draw(slots)
    groups = draw(st.sampled_from([1, 1, 2]))
    n = draw(st.integers(0, 3))
    cin, cout = groups * draw(dims), groups * draw(dims)
    # Kernels up to 7x7 with up to 3 padding on maps from 1x1: kernels that overhang the
    # padded input among them.
    k = draw(st.sampled_from([1, 2, 3, 3, 5, 7]))
    stride, dilation = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    padding = draw(st.integers(0, 3))
    least = max(1, dilation * (k - 1) + 1 - 2 * padding)  # the smallest map with an output
    size = lambda: draw(st.integers(least, least + 6))
    height, width = size(), size()
    biased = draw(st.booleans())
    # torch's own oneDNN convolution (x86, float32, channels_last, with a bias) kills the process
    # with SIGSEGV when every output column reads padding only; F.conv2d alone does it.
    assume(not (biased and dtype == torch.float32 and layout == "channels_last"
                and reads_padding_only(width, k, stride, padding, dilation)))
    x = _tensor(draw, (n, cin, height, width), dtype, layout)
    w = _tensor(draw, (cout, cin // groups, k, k), dtype)
    b = _tensor(draw, (cout,), dtype) if biased else None
    which = draw(st.sampled_from(["x", "params", "all"]))
    xt = _tensor(draw, (T, *x.shape), dtype) if which != "params" else None
    wt = _tensor(draw, (T, *w.shape), dtype) if which != "x" else None
    bt = _tensor(draw, (T, cout), dtype) if b is not None and which != "x" else None
    return dtype, (x, xt), (w, wt), (b, bt), (stride, padding, dilation, groups)


@PROFILE
@given(case=conv_cases(), backend=backends)
def test_conv2d(case, backend):
    dtype, (x, xt), (w, wt), (b, bt), (s, p, d, g) = case
    with fgkernels.use_backend(backend):
        out = DF.conv2d(Dual(x, xt), Dual(w, wt), None if b is None else Dual(b, bt), s, p, d, g)
    fn = (lambda x_, w_, b_: F.conv2d(x_, w_, b_, s, p, d, g))
    _close(out, ForwardADOracle(fn, [x, w, b], [xt, wt, bt]))


@PROFILE
@given(size=st.integers(1, 8), k=st.integers(1, 4), stride=st.integers(1, 3),
       padding=st.integers(0, 4), dilation=st.integers(1, 3))
def test_reads_padding_only_finds_the_convolutions_of_padding(size, k, stride, padding,
                                                               dilation):
    """The guard the draws keep out of torch's crash with: true exactly where a convolution of
    ones over an input of ones is all zero (every tap in the zero padding)."""
    assume(dilation * (k - 1) + 1 <= size + 2 * padding)
    ones = lambda n: torch.ones(1, 1, n, dtype=torch.float64)
    y = F.conv1d(ones(size), ones(k), None, stride, padding, dilation)
    assert reads_padding_only(size, k, stride, padding, dilation) == bool((y == 0).all())


# The Triton kernels in its interpreter (CPU tensors; on a GPU tests/backends/test_triton.py runs
# them): fewer examples, each launch being interpreted.
INTERPRETED_TRITON = "triton" in fgkernels.available_backends() and not torch.cuda.is_available()
TRITON_PROFILE = settings(max_examples=12, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.mark.skipif(not INTERPRETED_TRITON, reason="needs Triton's interpreter (no CUDA)")
@TRITON_PROFILE
@given(case=conv_cases())
def test_conv2d_on_triton(case):
    """The property suite's convolutions on the Triton backend (the cases it does not take,
    such as groups > 1, go to the native one), against forward_ad."""
    dtype, (x, xt), (w, wt), (b, bt), (s, p, d, g) = case
    with fgkernels.use_backend("triton"):
        out = DF.conv2d(Dual(x, xt), Dual(w, wt), None if b is None else Dual(b, bt), s, p, d, g)
    fn = (lambda x_, w_, b_: F.conv2d(x_, w_, b_, s, p, d, g))
    _close(out, ForwardADOracle(fn, [x, w, b], [xt, wt, bt]))


@st.composite
def batch_norm_cases(draw):
    dtype, layout, T = draw(dtypes), draw(layouts), draw(slots)
    c = draw(dims)
    shape = (draw(st.integers(1, 4)), c, draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    training = draw(st.booleans())
    # Near-constant channels (a spread far below eps) and means far from zero beside the spread.
    # In float32 both are ill-conditioned for torch as for any kernel (the mean rounds to within
    # ulp(mean)/σ of the centred values; a channel of two values has a tangent of order eps/σ²
    # times ẋ's), so which of two correct results errs less is chance: float32 draws keep
    # |mean| ≤ σ and three values a channel, and the far cases are float64's (and the float32
    # ones of tests/rules/test_hostile_inputs.py, one case each).
    wide = dtype == torch.float64
    least = 2 if wide else 3
    if training and shape[0] * shape[2] * shape[3] < least:
        shape = (least, *shape[1:])
    scale = draw(st.sampled_from([1e-4, 1e-2, 1.0, 1e2] if wide else [1e-2, 1.0, 1e2]))
    offset = draw(st.sampled_from([0.0, 1.0, 30.0] if wide else [0.0, scale]))
    x = _tensor(draw, shape, dtype, layout) * scale + offset
    affine = draw(st.booleans())
    which = draw(st.sampled_from(["x", "params", "all"])) if affine else "x"
    xt = _tensor(draw, (T, *shape), dtype) if which != "params" else None
    # A tangent drawn from x's own seed is x shifted and scaled, along which batch norm's
    # output does not move: its tangent is 0 up to rounding, whose size, relative to nothing,
    # is chance in float32 (float64 keeps such draws).
    assume(wide or xt is None or not any(torch.equal(s * scale + offset, x) for s in xt))
    pt = {n: _tensor(draw, (T, c), dtype) for n in ("weight", "bias")} if which != "x" else {}
    return dtype, x, xt, pt, training, affine, draw(st.booleans())


def _running_stats_after(bn: nn.BatchNorm2d, x: torch.Tensor, dtype: torch.dtype):
    """The running statistics of a copy of ``bn`` in ``dtype`` after one pass over ``x``."""
    bn = copy.deepcopy(bn).to(dtype)
    with torch.no_grad():
        bn(x.to(dtype))
    return bn.running_mean, bn.running_var


@PROFILE
@given(case=batch_norm_cases(), backend=backends)
def test_batch_norm_and_relu(case, backend):
    """Output, tangents and running statistics, BN alone or fused with a ReLU."""
    dtype, x, xt, pt, training, affine, relu = case
    c = x.shape[1]
    ref = nn.BatchNorm2d(c, affine=affine).to(dtype).train(training)
    ref.running_mean.uniform_(-1, 1)
    ref.running_var.uniform_(0.5, 2)
    if affine:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.uniform_(-1, 1)
    net = fgkernels.convert(nn.Sequential(copy.deepcopy(ref), *([nn.ReLU()] if relu else [])))
    if pt:
        fgkernels.set_tangents(net, {f"0.{n}": t for n, t in pt.items()})
    with fgkernels.use_backend(backend):
        out = net(Dual(x, xt))
    params = [ref.weight.detach(), ref.bias.detach()] if affine else []
    stats = ref.running_mean, ref.running_var
    fn = lambda x_, *p_: (F.relu if relu else (lambda v: v))(F.batch_norm(
        x_, *(s.to(x_.dtype, copy=True) for s in stats), *(p_ or (None, None)), training,
        0.1, ref.eps))  # fresh running stats for each slot's call
    _close(out, ForwardADOracle(fn, [x, *params],
                                  [xt, *[pt.get(n) for n in ("weight", "bias") if affine]]))
    _close((net[0].running_mean, net[0].running_var),
           lambda dt: _running_stats_after(ref, x, dt))


BINARY = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div,
          "pow": lambda a, b: torch.pow(a * a + 0.25, b),  # a base above 0
          "maximum": torch.maximum, "minimum": torch.minimum}


@st.composite
def broadcast_pairs(draw):
    """Two shapes that broadcast together: the second drops leading dims and sets some to 1."""
    rank = draw(st.integers(0, 4))
    full = [draw(st.integers(0, 3)) for _ in range(rank)]
    other = [1 if draw(st.booleans()) else d for d in full][draw(st.integers(0, rank)):]
    return (full, other) if draw(st.booleans()) else (other, full)


@PROFILE
@given(shapes=broadcast_pairs(), op=st.sampled_from(sorted(BINARY)), T=slots,
       which=st.sampled_from(["both", "left", "right"]), dtype=dtypes, seed=st.integers(0, 99))
def test_broadcasting_arithmetic(shapes, op, T, which, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    (sa, sb), fn = shapes, BINARY[op]
    a = torch.randn(sa, generator=g, dtype=dtype)
    # |b| ≥ 0.5 of either sign: a quotient's tangent that lost b's sign shows
    sign = torch.randint(0, 2, sb, generator=g).to(dtype) * 2 - 1
    b = (torch.rand(sb, generator=g, dtype=dtype) + 0.5) * sign
    at = torch.randn(T, *sa, generator=g, dtype=dtype) if which != "right" else None
    bt = torch.randn(T, *sb, generator=g, dtype=dtype) if which != "left" else None
    out = fn(Dual(a, at) if at is not None else a, Dual(b, bt) if bt is not None else b)
    _close(out, ForwardADOracle(fn, [a, b], [at, bt]))


@PROFILE
@given(shapes=broadcast_pairs(), op=st.sampled_from(sorted(BINARY)), T=slots,
       which=st.sampled_from(["both", "left", "right"]),
       wide=st.sampled_from(["left", "right"]), seed=st.integers(0, 99))
def test_arithmetic_across_dtypes(shapes, op, T, which, wide, seed):
    """A float32 and a float64 operand, each with or without a tangent of its own dtype, any
    broadcast (a 0-d float64 one keeps the result float32, as torch promotes): the output's
    tangent has forward_ad's dtype, and its values within a few roundings of that dtype."""
    g = torch.Generator().manual_seed(seed)
    (sa, sb), fn = shapes, BINARY[op]
    da, db = (torch.float64, torch.float32) if wide == "left" else (torch.float32, torch.float64)
    a = torch.randn(sa, generator=g, dtype=torch.float64).to(da)
    sign = torch.randint(0, 2, sb, generator=g).to(torch.float64) * 2 - 1
    b = ((torch.rand(sb, generator=g, dtype=torch.float64) + 0.5) * sign).to(db)
    at = torch.randn(T, *sa, generator=g, dtype=torch.float64).to(da) \
        if which != "right" else None
    bt = torch.randn(T, *sb, generator=g, dtype=torch.float64).to(db) \
        if which != "left" else None
    out = fn(Dual(a, at) if at is not None else a, Dual(b, bt) if bt is not None else b)
    y, yt = forward_ad_jvp(fn, [a, b], [at, bt])
    assert out.primal.dtype == y.dtype and out.tangents.dtype == yt.dtype
    tol = 64 * torch.finfo(yt.dtype).eps
    scale = max(1.0, yt.abs().max().item()) if yt.numel() else 1.0
    torch.testing.assert_close(out.primal, y, rtol=0, atol=0)
    torch.testing.assert_close(out.tangents, yt, rtol=tol, atol=tol * scale)


def _distances_by_definition(a, b, p):
    """‖a_i − b_j‖_p over every pair of rows: the oracle's cdist (torch's forward mode has no
    rule for cdist)."""
    return torch.linalg.vector_norm(a.unsqueeze(-2) - b.unsqueeze(-3), ord=p, dim=-1)


@PROFILE
@given(shapes=broadcast_pairs(), rows=st.tuples(st.integers(0, 5), st.integers(0, 30)),
       width=st.integers(0, 4), p=st.sampled_from([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, math.inf]),
       mode=st.sampled_from(["use_mm_for_euclid_dist_if_necessary", "use_mm_for_euclid_dist",
                             "donot_use_mm_for_euclid_dist"]),
       T=slots, which=st.sampled_from(["both", "left", "right"]), dtype=dtypes,
       by_products=st.booleans(), seed=st.integers(0, 99))
def test_cdist(shapes, rows, width, p, mode, T, which, dtype, by_products, seed):
    """cdist of broadcast batches, every p and compute mode, against forward_ad of the
    distances' definition; at p = 2 also by products (float64: their cancellation, where two
    rows are near, is beyond twice the definition's float32 error)."""
    assume(width > 0 or not math.isinf(p))  # (the definition's inf norm of no coordinates)
    from fgkernels.rules import distances
    budget = 0 if by_products and dtype == torch.float64 else distances.EXACT_BUDGET
    g = torch.Generator().manual_seed(seed)
    (sa, sb), (P, R) = shapes, rows
    a = torch.randn(*sa, P, width, generator=g, dtype=dtype)
    b = torch.randn(*sb, R, width, generator=g, dtype=dtype)
    at = torch.randn(T, *a.shape, generator=g, dtype=dtype) if which != "right" else None
    bt = torch.randn(T, *b.shape, generator=g, dtype=dtype) if which != "left" else None
    with mock.patch.object(distances, "EXACT_BUDGET", budget):
        out = torch.cdist(Dual(a, at) if at is not None else a,
                          Dual(b, bt) if bt is not None else b, p, mode)
    assert torch.equal(out.primal, torch.cdist(a, b, p, mode))
    _close(out, ForwardADOracle(lambda a, b: _distances_by_definition(a, b, p), [a, b],
                                [at, bt]))


@PROFILE
@given(a=st.lists(st.integers(0, 6), min_size=1, max_size=3, unique=True),
       b=st.lists(st.integers(0, 6), min_size=1, max_size=3, unique=True), seed=st.integers(0, 99))
def test_directions_enter_part_way(a, b, seed):
    """Operands labelled with different directions: the output carries their union, a slot
    an operand lacks being zero for it."""
    g = torch.Generator().manual_seed(seed)
    a, b = sorted(a), sorted(b)
    x, y = (torch.randn(2, 3, generator=g, dtype=torch.float64) for _ in range(2))
    xt = torch.randn(len(a), 2, 3, generator=g, dtype=torch.float64)
    yt = torch.randn(len(b), 2, 3, generator=g, dtype=torch.float64)
    out = Dual(x, xt, directions=a) * Dual(y, yt, directions=b)
    union = sorted(set(a) | set(b))
    assert out.directions == tuple(union)
    for i, d in enumerate(union):
        ta = xt[a.index(d)] if d in a else torch.zeros_like(x)
        tb = yt[b.index(d)] if d in b else torch.zeros_like(y)
        torch.testing.assert_close(out.tangents[i], ta * y + x * tb)


@PROFILE
@given(mode=st.sampled_from(["LSTM", "GRU"]),
       a=st.lists(st.integers(0, 6), min_size=1, max_size=3, unique=True),
       b=st.lists(st.integers(0, 6), min_size=1, max_size=3, unique=True), seed=st.integers(0, 99))
def test_recurrent_directions_enter_part_way(mode, a, b, seed):
    """An LSTM whose input and initial cell state (a GRU: hidden state) carry tangents of
    different directions: every output's slots are their union, each against forward_ad with
    the operands that lack the direction constant."""
    from fgkernels.testing import oracle_mode
    g = torch.Generator().manual_seed(seed)
    a, b = sorted(a), sorted(b)
    draw = lambda *shape: torch.randn(shape, generator=g, dtype=torch.float64)
    gates = 12 if mode == "LSTM" else 9
    x, h0, c0 = draw(3, 2, 4), draw(1, 2, 3), draw(1, 2, 3)
    weights = [draw(gates, 4), draw(gates, 3), draw(gates), draw(gates)]
    xt, st_ = draw(len(a), *x.shape), draw(len(b), *c0.shape)
    if mode == "LSTM":  # the state that carries b: c0
        run = lambda x, c: torch.lstm(x, (h0, c), weights, True, 1, 0.0, False, False, False)
    else:  # h0, c0 standing for it
        run = lambda x, h: torch.gru(x, h, weights, True, 1, 0.0, False, False, False)
    out = run(Dual(x, xt, directions=a), Dual(c0, st_, directions=b))
    union = sorted(set(a) | set(b))
    for d in union:
        tx = xt[a.index(d)] if d in a else torch.zeros_like(x)
        tc = st_[b.index(d)] if d in b else torch.zeros_like(c0)
        with oracle_mode():
            expected = torch.func.jvp(run, (x, c0), (tx, tc))[1]
        for o, e in zip(out, expected):
            assert o.directions == tuple(union)
            torch.testing.assert_close(o.tangents[union.index(d)], e)


ACTIVATIONS = {
    "relu": F.relu, "relu6": F.relu6, "hardtanh": lambda v: F.hardtanh(v, -0.5, 1.5),
    "leaky_relu": lambda v: F.leaky_relu(v, 0.2), "elu": F.elu, "silu": F.silu,
    "gelu": F.gelu, "gelu_tanh": lambda v: F.gelu(v, approximate="tanh"),
    "sigmoid": torch.sigmoid, "tanh": torch.tanh, "hardsigmoid": F.hardsigmoid,
    "hardswish": F.hardswish, "mish": F.mish, "clamp": lambda v: v.clamp(-1, 2),
    "softplus": lambda v: F.softplus(v, beta=2.0, threshold=1.0), "selu": F.selu,
    "celu": lambda v: F.celu(v, 0.5), "hardshrink": F.hardshrink, "softshrink": F.softshrink,
    "logsigmoid": F.logsigmoid, "erf": torch.erf, "sign": torch.sign, "expm1": torch.expm1,
    "log1p_abs": lambda v: torch.log1p(v.abs()), "clamp_min": lambda v: v.clamp_min(0.5),
    "clamp_max": lambda v: torch.clamp_max(v, 1.5), "floor": torch.floor, "round": torch.round,
    "softsign": F.softsign,
}
KINKS = [0.0, 3.0, -3.0, 6.0, -1.0, 2.0, -0.5, 1.5, 0.5]  # of the activations above
NON_FINITE = [float("nan"), float("inf"), -float("inf")]


# The activations whose derivative fgkernels computes as a select (the others run torch's
# derivative kernel on the whole tensor, as forward_ad does).
SELECTS = {"relu", "relu6", "hardtanh"}


def activation_oracle(name, x, xt):
    """forward_ad's ``(y, stacked tangents)`` of activation ``name``; for those of ``SELECTS``
    one element at a time (``elementwise_forward_ad``: torch's scalar definition; ELU's, GELU's
    and hardswish's vectorized loops differ from theirs at a NaN x too, and run as forward_ad
    runs them)."""
    fn = ACTIVATIONS[name]
    return elementwise_forward_ad(fn, x, xt) if name in SELECTS else \
        forward_ad_jvp(fn, [x], [xt])


@PROFILE
@given(name=st.sampled_from(sorted(ACTIVATIONS)), shape=st.lists(st.integers(0, 4), max_size=4),
       T=slots, dtype=dtypes, seed=st.integers(0, 99), backend=backends,
       special=st.sampled_from([None, "kinks", "nonfinite"]))
def test_activations(name, shape, T, dtype, seed, backend, special):
    """At random points, at the kinks (0, ±3, ±6, the bounds) and at NaN/±Inf."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=dtype) * 4
    if special and x.numel():
        values = KINKS if special == "kinks" else NON_FINITE
        flat = x.view(-1)
        flat[: len(values)] = torch.tensor(values, dtype=dtype)[: flat.numel()]
    xt = torch.randn(T, *shape, generator=g, dtype=dtype)
    fn = ACTIVATIONS[name]
    with fgkernels.use_backend(backend):
        out = fn(Dual(x, xt))
    _close(out, lambda dt: activation_oracle(name, x.to(dt), xt.to(dt)))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activations_at_every_kink(name, backend, dtype):
    """Every activation at each of its kinks and at ±0, NaN and ±Inf (which random draws rarely
    hit), with finite, NaN and infinite tangents: torch's own convention at each."""
    points = [*KINKS, -0.0, *NON_FINITE]
    x = torch.tensor(points, dtype=dtype).repeat(3)
    xt = torch.randn(2, x.numel(), generator=torch.Generator().manual_seed(0), dtype=dtype)
    xt[0, len(points):] = float("nan")
    xt[1, 2 * len(points):] = float("inf")
    fn = ACTIVATIONS[name]
    with fgkernels.use_backend(backend):
        out = fn(Dual(x, xt))
    _close(out, lambda dt: activation_oracle(name, x.to(dt), xt.to(dt)))


# Ops whose tangent at one place reads every tangent of a row, a channel or the whole input
# (a mean taken out, a sum, a max over everything): one NaN or Inf tangent there makes torch's
# forward mode give NaN or ±Inf across it, by its own formula's 0·Inf and Inf − Inf.
_TARGETS = torch.tensor([1, -100, 0, 2])
ROW_READERS = {
    "batch_norm": lambda v: F.batch_norm(v, None, None, training=True),
    "batch_norm_affine": lambda v: F.batch_norm(v, None, None, torch.linspace(
        0.5, 2, v.shape[1], dtype=v.dtype), None, training=True),
    "instance_norm": lambda v: F.instance_norm(v),
    "group_norm": lambda v: F.group_norm(v, 1),
    "layer_norm": lambda v: F.layer_norm(v, v.shape[-2:]),
    "softmax": lambda v: v.softmax(1), "log_softmax": lambda v: F.log_softmax(v, -1),
    "softmin": lambda v: F.softmin(v, 1),
    "cross_entropy": lambda v: F.cross_entropy(v.flatten(1), _TARGETS[:v.shape[0]] % v[0].numel(),
                                               reduction="none"),
    "cross_entropy_ignored": lambda v: F.cross_entropy(
        v.flatten(1), torch.where(_TARGETS[:v.shape[0]] < 0, -100,
                                  _TARGETS[:v.shape[0]] % v[0].numel()), reduction="sum"),
    "cross_entropy_smoothed": lambda v: F.cross_entropy(
        v.flatten(1), _TARGETS[:v.shape[0]] % v[0].numel(), reduction="none",
        label_smoothing=0.2),
    "max": torch.max, "min": torch.min, "amax": lambda v: v.amax((1, 2)),
    "maximum": lambda v: torch.maximum(v, v.flip(-1)),  # (the middle of an odd row ties itself)
    "minimum": lambda v: torch.minimum(v.flip(0), v),
}


@PROFILE
@given(name=st.sampled_from(sorted(ROW_READERS)),
       shape=st.tuples(st.integers(1, 4), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)),
       T=slots, where=st.integers(0, 2**31 - 1), value=st.sampled_from(NON_FINITE),
       dtype=dtypes, seed=st.integers(0, 99), backend=backends)
def test_a_non_finite_tangent_spreads_as_in_torch(name, shape, T, where, value, dtype, seed,
                                                  backend):
    """One NaN or ±Inf in one slot's tangent, at a drawn place: the output's tangents are NaN
    and ±Inf exactly where forward_ad's are (a norm's channel or row all NaN, a softmax's row
    ∓Inf but NaN at the Inf, an ignored sample's loss 0), and equal elsewhere."""
    n, c, h, w = shape
    normalized = {"batch_norm": n * h * w, "batch_norm_affine": n * h * w,
                  "instance_norm": h * w, "group_norm": c * h * w, "layer_norm": h * w}
    # Training norms refuse one value a channel; in float32 a channel of two has a tangent of
    # order eps/σ² times ẋ's, whose error is chance for any kernel: three, as
    # test_batch_norm_and_relu draws them.
    assume(normalized.get(name, 3) >= (2 if dtype == torch.float64 else 3))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=dtype)
    xt = torch.randn(T, *shape, generator=g, dtype=dtype)
    xt.view(-1)[where % xt.numel()] = value
    fn = ROW_READERS[name]
    with fgkernels.use_backend(backend):
        out = fn(Dual(x, xt))
    ours, (_, expected) = out.tangents, forward_ad_jvp(fn, [x], [xt])
    assert torch.equal(ours.isnan(), expected.isnan())
    assert torch.equal(ours.isinf(), expected.isinf())
    assert torch.equal(ours[ours.isinf()], expected[expected.isinf()])
    _close(out, lambda dt: forward_ad_jvp(fn, [x.to(dt)], [xt.to(dt)]))


TENSOR_METHODS = {
    "permute": lambda v: v.permute(*reversed(range(v.dim()))),
    "transpose": lambda v: v.transpose(0, -1), "flatten": lambda v: v.flatten(),
    "chunk": lambda v: v.chunk(2, dim=-1), "split": lambda v: v.split(1, dim=0),
    "mean": lambda v: v.mean(-1, keepdim=True), "sum": lambda v: v.sum((0, -1)),
    "getitem": lambda v: v[..., ::2], "unsqueeze": lambda v: v.unsqueeze(1),
    "contiguous": lambda v: v.transpose(0, -1).contiguous(), "view": lambda v: v.reshape(-1, 1),
    "expand": lambda v: v.unsqueeze(0).expand(2, *v.shape), "squeeze": lambda v: v.squeeze(),
    "pow": lambda v: v ** 2, "softmax": lambda v: v.softmax(-1),
    "log_softmax": lambda v: F.log_softmax(v, 0), "matmul": lambda v: v @ v.transpose(-1, -2),
    "einsum": lambda v: torch.einsum("i...,i...->...", v, v), "norm": lambda v: v.norm(dim=-1),
    "max_dim": lambda v: v.max(-1).values, "min_dim": lambda v: torch.min(v, 0, True)[0],
    "sort": lambda v: v.sort(1, descending=True).values, "topk": lambda v: v.topk(1, 0).values,
    "gather": lambda v: v.gather(-1, v.detach().argsort(-1)),
    "masked_fill": lambda v: v.masked_fill(v.detach() > 0.5, -1.0),
}


@PROFILE
@given(name=st.sampled_from(sorted(TENSOR_METHODS)),
       shape=st.lists(st.integers(1, 4), min_size=2, max_size=4), T=slots,
       seed=st.integers(0, 99))
def test_tensor_methods(name, shape, T, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    xt = torch.randn(T, *shape, generator=g, dtype=torch.float64)
    fn = TENSOR_METHODS[name]
    out = fn(Dual(x, xt))
    y, yt = forward_ad_jvp(fn, [x], [xt])
    if not isinstance(out, tuple):
        out, y, yt = (out,), (y,), (yt,)
    assert len(out) == len(y)
    for o, yi, ti in zip(out, y, yt):
        _close(o, (yi, ti))


# Views of a tensor of at least one dim, each giving one of at least one dim (the op itself
# where it does not apply): rules' views and the forward-AD fallback's alike.
VIEWS = {
    "reshape": lambda v: v.reshape(-1), "transpose": lambda v: v.transpose(0, -1),
    "moveaxis": lambda v: v.moveaxis(0, -1), "adjoint": lambda v: v.adjoint() if v.dim() > 1
    else v, "narrow": lambda v: v.narrow(-1, v.shape[-1] // 2, (v.shape[-1] + 1) // 2),
    "select": lambda v: v.select(0, v.shape[0] - 1) if v.dim() > 1 else v,
    "unsqueeze": lambda v: v.unsqueeze(1), "squeeze": lambda v: v.squeeze(0) if v.dim() > 1
    else v, "step": lambda v: v[..., ::2], "diagonal": lambda v: v.diagonal(0, 0, -1)
    if v.dim() > 1 else v, "chunk": lambda v: v.chunk(2, -1)[-1],
    "split_with_sizes": lambda v: v.split_with_sizes([1, v.shape[0] - 1], 0)[1]
    if v.shape[0] > 1 else v, "unbind": lambda v: v.unbind(0)[0] if v.dim() > 1 else v,
    "atleast_3d": torch.atleast_3d, "mT": lambda v: v.mT if v.dim() > 1 else v,
}
WRITES = {
    "mul_": lambda v: v.mul_(2.5), "add_ itself": lambda v: v.add_(v * v),
    "zero_": lambda v: v.zero_(), "relu_": lambda v: v.relu_(),
    "clamp_": lambda v: v.clamp_(-0.5, 0.5), "copy_": lambda v: v.copy_(v.detach() * 0.5 + v),
}


@PROFILE
@given(chain=st.lists(st.sampled_from(sorted(VIEWS)), min_size=1, max_size=3),
       write=st.sampled_from(sorted(WRITES)),
       shape=st.lists(st.integers(1, 4), min_size=1, max_size=3), T=slots,
       seed=st.integers(0, 99))
def test_in_place_writes_through_chains_of_views(chain, write, shape, T, seed):
    """An in-place op on a view of a view (of a view) of a Dual reaches the Dual and every view
    between, primal and tangent, as on forward_ad's dual tensors; a view that copies (a reshape
    of a transposed view) is a copy of both."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    xt = torch.randn(T, *shape, generator=g, dtype=torch.float64)

    def fn(v):
        y = v * 1.0
        views = [y]
        for name in chain:
            views.append(VIEWS[name](views[-1]))
        WRITES[write](views[-1])
        return tuple(views)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's notice (atleast_3d)
        out = fn(Dual(x, xt))
    y, yt = forward_ad_jvp(fn, [x], [xt])
    assert len(out) == len(y)
    for o, yi, ti in zip(out, y, yt):  # (a zeroed tangent is None: zero)
        torch.testing.assert_close(o.primal, yi, rtol=1e-13, atol=1e-14)
        torch.testing.assert_close(torch.zeros_like(ti) if o.tangents is None else o.tangents,
                                   ti, rtol=1e-12, atol=1e-13)


@PROFILE
@given(lead=st.lists(st.integers(0, 3), min_size=1, max_size=3), fin=dims, fout=dims, T=slots,
       dtype=dtypes, bias=st.booleans(), which=st.sampled_from(["x", "params", "all"]),
       seed=st.integers(0, 99), backend=backends)
def test_linear(lead, fin, fout, T, dtype, bias, which, seed, backend):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=dtype)
    x, w, b = rand(*lead, fin), rand(fout, fin), rand(fout) if bias else None
    xt = rand(T, *x.shape) if which != "params" else None
    wt = rand(T, *w.shape) if which != "x" else None
    bt = rand(T, fout) if bias and which != "x" else None
    with fgkernels.use_backend(backend):
        out = F.linear(Dual(x, xt), Dual(w, wt), None if b is None else Dual(b, bt))
    _close(out, ForwardADOracle(F.linear, [x, w, b], [xt, wt, bt]))


@PROFILE
@given(lead=st.lists(st.integers(1, 3), max_size=2), fin=dims, fout=dims, T=slots,
       form=st.sampled_from(["vector weight", "bias (1,)", "0-d bias", "a bias per row"]),
       seed=st.integers(0, 99))
def test_linear_in_torchs_other_forms(lead, fin, fout, T, form, seed):
    """A 1-D weight (the last dim contracted away) and a bias that broadcasts to the output."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    x = rand(*lead, fin)
    w = rand(fin) if form == "vector weight" else rand(fout, fin)
    b = {"vector weight": None, "bias (1,)": rand(1), "0-d bias": rand(()),
         "a bias per row": rand(*lead, fout)}[form]
    xt, wt = rand(T, *x.shape), rand(T, *w.shape)
    bt = None if b is None else rand(T, *b.shape)
    duals = (Dual(x, xt), Dual(w, wt), None if b is None else Dual(b, bt))
    try:
        F.linear(x, w, b)
    except RuntimeError as refused:  # shapes torch takes on some paths only: refused alike
        with pytest.raises(RuntimeError, match=re.escape(str(refused).splitlines()[0])):
            F.linear(*duals)
        return
    _close(F.linear(*duals), ForwardADOracle(F.linear, [x, w, b], [xt, wt, bt]))


directions = st.lists(st.integers(0, 3), min_size=1, max_size=3, unique=True).map(sorted)


@PROFILE
@given(lead=st.lists(st.integers(0, 3), min_size=1, max_size=2), fin=dims, fout=dims,
       x_dirs=directions, w_dirs=directions, dtype=dtypes, seed=st.integers(0, 99),
       backend=backends)
def test_linear_with_labelled_directions(lead, fin, fout, x_dirs, w_dirs, dtype, seed, backend):
    """Input and parameters on drawn directions, the same, overlapping or apart: their terms
    summed by the op where they fill the same slots, placed apart where they do not; each
    output direction against forward_ad of the tangents it carries (zero where absent)."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=dtype)
    x, w, b = rand(*lead, fin), rand(fout, fin), rand(fout)
    xt, wt, bt = rand(len(x_dirs), *x.shape), rand(len(w_dirs), *w.shape), \
        rand(len(w_dirs), fout)
    out_dirs = sorted(set(x_dirs) | set(w_dirs))

    def spread(t, dirs, like):  # a tangent per output direction, zero where it carries none
        full = torch.zeros(len(out_dirs), *like.shape, dtype=dtype)
        for k, d in enumerate(dirs):
            full[out_dirs.index(d)] = t[k]
        return full

    with fgkernels.use_backend(backend):
        out = F.linear(Dual(x, xt, directions=x_dirs), Dual(w, wt, directions=w_dirs),
                       Dual(b, bt, directions=w_dirs))
    assert out.directions == tuple(out_dirs)
    _close(out, ForwardADOracle(F.linear, [x, w, b], [spread(xt, x_dirs, x),
                                                      spread(wt, w_dirs, w),
                                                      spread(bt, w_dirs, b)]))


@PROFILE
@given(shape=st.tuples(st.integers(0, 2), dims, st.integers(3, 7), st.integers(3, 7)),
       k=st.integers(1, 3), stride=st.integers(1, 2), padding=st.integers(0, 1),
       dilation=st.integers(1, 2), ceil=st.booleans(), layout=layouts, T=slots,
       seed=st.integers(0, 99), backend=backends,
       values=st.sampled_from(["ties", "nonfinite", "normal"]))
def test_max_pool2d(shape, k, stride, padding, dilation, ceil, layout, T, seed, backend, values):
    """Random values, and windows whose argmax is torch's choice among equals: ties (the first
    largest), NaNs (the last) and -inf (the window's first place), which the tangent follows."""
    padding = min(padding, k // 2)  # torch: padding at most half the kernel
    if dilation * (k - 1) + 1 > min(shape[2:]) + 2 * padding:
        dilation = 1
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    if values != "normal":
        x = torch.randint(-2, 2, shape, generator=g).to(torch.float64)
    if values == "nonfinite":
        x[x == -2], x[x == 1] = float("-inf"), float("nan")
    x = laid_out(x, layout)
    xt = torch.randn(T, *shape, generator=g, dtype=torch.float64)
    fn = lambda v: F.max_pool2d(v, k, stride, padding, dilation, ceil_mode=ceil)
    with fgkernels.use_backend(backend):
        out = fn(Dual(x, xt))
    _close(out, forward_ad_jvp(fn, [x], [xt]))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("pool", [(2,), (3, 2, 1), (3, 1, 1, 2), (2, 2, 1, 1, True)])
def test_max_pool2d_where_the_argmax_is_a_choice(pool, backend, layout):
    """Every window holds ties, NaNs or -inf only: the tangent is taken where torch's argmax
    is (the first of equal largest values, the last NaN, the first place of a window of -inf),
    exactly, as forward_ad takes it."""
    x = torch.tensor([[0.0, 1.0, 1.0, 0.0, 1.0, 1.0, -1.0],
                      [1.0, 1.0, math.nan, 1.0, math.nan, -1.0, -1.0],
                      [-math.inf, -math.inf, 1.0, math.nan, math.nan, 1.0, 0.0],
                      [-math.inf, -math.inf, -math.inf, 0.0, 0.0, 1.0, 1.0],
                      [-math.inf, -math.inf, -math.inf, -math.inf, 1.0, 0.0, 1.0],
                      [1.0, -math.inf, math.nan, -math.inf, 1.0, 1.0, 1.0]], dtype=torch.float64)
    x = laid_out(torch.stack([x, x.flip(1), x.flip(0)]).repeat(2, 1, 1, 1), layout)
    xt = torch.randn(2, *x.shape, dtype=torch.float64)
    fn = lambda v: F.max_pool2d(v, *pool)  # noqa: E731
    with fgkernels.use_backend(backend):
        out = fn(Dual(x, xt))
    y, yt = forward_ad_jvp(fn, [x], [xt])
    torch.testing.assert_close(out.primal, y, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(out.tangents, yt, rtol=0, atol=0)


@PROFILE
@given(n=st.integers(1, 5), c=st.integers(2, 5), T=slots, smoothing=st.sampled_from([0.0, 0.1]),
       reduction=st.sampled_from(["mean", "sum", "none"]), ignored=st.integers(0, 5),
       seed=st.integers(0, 99))
def test_cross_entropy(n, c, T, smoothing, reduction, ignored, seed):
    """Ignored targets included, all of them too (a NaN mean, as forward_ad's)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, generator=g, dtype=torch.float64)
    zt = torch.randn(T, n, c, generator=g, dtype=torch.float64)
    target = torch.randint(0, c, (n,), generator=g)
    target[:ignored] = -100
    fn = lambda v: F.cross_entropy(v, target, reduction=reduction, label_smoothing=smoothing)
    _close(fn(Dual(z, zt)), forward_ad_jvp(fn, [z], [zt]))


@st.composite
def attention_cases(draw):
    dtype, T = torch.float64, draw(slots)
    n, heads, kv_heads = draw(st.integers(1, 2)), draw(st.sampled_from([1, 2, 4])), 1
    gqa = draw(st.booleans()) and heads > 1
    kv_heads = heads // 2 if gqa else heads
    L, S, E = draw(st.integers(1, 5)), draw(st.integers(1, 5)), draw(st.integers(1, 4))
    mask = draw(st.sampled_from([None, "bool", "float", "causal"]))
    q = _tensor(draw, (n, heads, L, E), dtype)
    k, v = (_tensor(draw, (n, kv_heads, S, E), dtype) for _ in range(2))
    which = draw(st.sampled_from(["q", "k", "v", "all"]))
    tangents = [_tensor(draw, (T, *t.shape), dtype) if which in (name, "all") else None
                for name, t in (("q", q), ("k", k), ("v", v))]
    scale = draw(st.sampled_from([None, 0.3]))
    m = None
    if mask == "bool":
        m = _tensor(draw, (L, S), dtype) > -0.5
    elif mask == "float":
        m = _tensor(draw, (L, S), dtype)
    return (q, k, v), tangents, m, mask == "causal", scale, gqa


@PROFILE
@given(case=attention_cases())
def test_scaled_dot_product_attention(case):
    """Against forward_ad of torch's math attention (its fused CPU kernel has no forward
    mode), masks of every kind, causal, grouped-query and empty rows included; the primal is
    torch's own attention's to the bit."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    (q, k, v), (qt, kt, vt), mask, causal, scale, gqa = case
    fn = lambda q_, k_, v_: F.scaled_dot_product_attention(
        q_, k_, v_, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa)
    duals = [Dual(a, t) if t is not None else a for a, t in ((q, qt), (k, kt), (v, vt))]
    if all(t is None for t in (qt, kt, vt)):
        return
    out = fn(*duals)
    assert torch.equal(out.primal, fn(q, k, v))
    with sdpa_kernel(SDPBackend.MATH):
        y, yt = forward_ad_jvp(fn, [q, k, v], [qt, kt, vt])
    y, yt = torch.nan_to_num(y), torch.nan_to_num(yt)  # rows with nothing to attend to: 0
    _close(out, (y, yt))


_Pair = namedtuple("_Pair", "token mat")

# Where a model keeps the parameters it reads outside its layers (the module's attribute, or a
# container of its own) and how it reaches them there.
HOLDERS = {
    "attribute": (lambda ps: None, None),
    "list": (lambda ps: list(ps), lambda h: h),
    "tuple": (lambda ps: tuple(ps), lambda h: h),
    "dict": (lambda ps: {"token": ps[0], "mat": ps[1]}, lambda h: (h["token"], h["mat"])),
    "nested": (lambda ps: ([{"token": ps[0]}], (ps[1],)), lambda h: (h[0][0]["token"], h[1][0])),
    "ordered dict": (lambda ps: OrderedDict(token=ps[0], mat=ps[1]),
                     lambda h: (h["token"], h["mat"])),
    "named tuple": (lambda ps: _Pair(*ps), lambda h: (h.token, h.mat)),
    # what the pass does not look into: it lifts the tensors themselves
    "closure": (lambda ps: lambda: ps, lambda h: h()),
    "torch.nn module's list": (lambda ps: _holding(list(ps)), lambda h: h.held),
    "nested six deep": (lambda ps: [[[[[list(ps)]]]]], lambda h: h[0][0][0][0][0]),
}


def _holding(held) -> nn.Module:
    m = nn.Module()
    m.held = held
    return m


class _SharedParameters(nn.Module):
    """A token network whose parameters are read in every way a model reads them: tied
    linear layers, a ParameterList, a class token expanded, an attention block (with a learned
    additive mask, ``masked``); the token and the list's matrix read from the module itself or
    from a container of its own."""

    def __init__(self, dim: int, heads: int, tied: bool, need_weights: bool, batch_first: bool,
                 held: str = "attribute", masked: bool = False):
        super().__init__()
        self.inp, self.out = nn.Linear(dim, dim), nn.Linear(dim, dim)
        if tied:
            self.out.weight = self.inp.weight
        self.mats = nn.ParameterList([nn.Parameter(torch.randn(dim, dim) / dim)])
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=batch_first)
        self.need_weights, self.batch_first = need_weights, batch_first
        self.mask = nn.Parameter(torch.randn(8, 8) / 4) if masked else None
        make, self.reach = HOLDERS[held]
        self.holder = make([self.cls_token, self.mats[0]])

    def forward(self, x):
        token, mat = (self.cls_token, self.mats[0]) if self.holder is None \
            else self.reach(self.holder)
        x = torch.cat([token.expand(x.shape[0], -1, -1), self.inp(x)], 1)
        x = x @ mat
        tokens = x.shape[1]
        if not self.batch_first:
            x = x.transpose(0, 1)
        mask = None if self.mask is None else self.mask[:tokens, :tokens]
        a, w = self.attn(x, x, x, need_weights=self.need_weights, attn_mask=mask)
        if not self.batch_first:
            a = a.transpose(0, 1)
        out = self.out(F.gelu(a))
        return out if w is None else out * w.mean()


@PROFILE
@given(heads=st.sampled_from([1, 2]), tied=st.booleans(), need_weights=st.booleans(),
       batch_first=st.booleans(), convert=st.booleans(), T=slots, n=st.integers(1, 3),
       length=st.integers(1, 4), seed=st.integers(0, 99),
       direction=st.sampled_from([None, 3]), held=st.sampled_from(sorted(HOLDERS)),
       masked=st.booleans())
def test_models_reading_parameters_every_way(heads, tied, need_weights, batch_first, convert, T,
                                             n, length, seed, direction, held, masked):
    """Tied, listed, token and attention parameters (an attention mask among them), some held
    in a container of the model's own, converted or not, every slot of their tangents against
    forward_ad; with a direction label the input carries none."""
    from fgkernels.testing import model_jvp_in_place
    # (built twice, not copied: a copy's closure would still read the first one's parameters,
    # and so would model_jvp's)
    model, ref = [_SharedParameters(4, heads, tied, need_weights, batch_first, held,
                                    masked).double()
                  for _ in range(2) if torch.manual_seed(seed)]
    if convert:
        fgkernels.convert(model)
    g = torch.Generator().manual_seed(seed)
    count = 1 if direction is not None else T
    tangents = {name: torch.randn(count, *p.shape, generator=g, dtype=torch.float64)
                for name, p in model.named_parameters()}
    fgkernels.set_tangents(model, {k: v[0] for k, v in tangents.items()} if direction is not None
                           else tangents, direction=direction)
    x = torch.randn(n, length, 4, generator=g, dtype=torch.float64)
    xt = None if direction is not None else torch.randn(T, *x.shape, generator=g,
                                                        dtype=torch.float64)
    out = model(Dual(x, xt))
    y, yt = model_jvp_in_place(ref, [x], [xt], tangents)
    _close(out, (y, yt))
    assert out.directions == (None if direction is None else (direction,))


class _BiasedEncoder(nn.Module):
    """An nn.TransformerEncoder whose self-attention takes a learned additive bias sliced to
    the tokens (``masked``) and a bool padding mask of each sequence's last key (``padded``:
    where it has more than one)."""

    def __init__(self, heads: int, layers: int, norm_first: bool, batch_first: bool,
                 activation: str, masked: bool, padded: bool):
        super().__init__()
        layer = nn.TransformerEncoderLayer(4, heads, 8, dropout=0.0, activation=activation,
                                           batch_first=batch_first, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.bias = nn.Parameter(torch.randn(4, 4) / 4) if masked else None
        self.padded, self.batch_first = padded, batch_first

    def forward(self, x):
        n, tokens = x.shape[:2] if self.batch_first else x.shape[1::-1]
        mask = None if self.bias is None else self.bias[:tokens, :tokens]
        pad = None
        if self.padded:
            pad = torch.zeros(n, tokens, dtype=torch.bool)
            pad[:, -1] = tokens > 1
        return self.encoder(x, mask=mask, src_key_padding_mask=pad)


@PROFILE
@given(heads=st.sampled_from([1, 2]), layers=st.integers(1, 2), norm_first=st.booleans(),
       batch_first=st.booleans(), activation=st.sampled_from(["relu", "gelu"]),
       masked=st.booleans(), padded=st.booleans(), convert=st.booleans(), T=slots,
       n=st.integers(1, 3), length=st.integers(1, 4), seed=st.integers(0, 99))
def test_transformer_encoders_with_learned_masks(heads, layers, norm_first, batch_first,
                                                 activation, masked, padded, convert, T, n,
                                                 length, seed):
    """nn.TransformerEncoder in every form torch builds, a learned bias as its mask or none,
    a padding mask beside or not, converted or not: every slot against forward_ad."""
    torch.manual_seed(seed)
    model = _BiasedEncoder(heads, layers, norm_first, batch_first, activation, masked,
                           padded).double()
    if convert:
        fgkernels.convert(model)
    x = torch.randn(*((n, length) if batch_first else (length, n)), 4, dtype=torch.float64)
    with warnings.catch_warnings():
        # torch warns of a bool padding mask beside a float mask, its own forward as ours
        warnings.simplefilter("ignore", UserWarning)
        errors = compare_with_forward_ad(model, [x], num_tangents=T, seed=seed)
    assert errors["primal"] < 1e-12 and errors["tangent"] < 1e-12, errors
    assert errors["fallback"] == {}, errors


class _Recurrent(nn.Module):
    """An nn.LSTM, nn.GRU or nn.RNN called with its initial states as separate arguments (an
    LSTM's (h, c) as two), so that the oracle sees every input tensor."""

    def __init__(self, mode: str, bias: bool, layers: int, bidirectional: bool,
                 batch_first: bool, proj: bool):
        super().__init__()
        common = dict(num_layers=layers, bias=bias, bidirectional=bidirectional,
                      batch_first=batch_first)
        if mode == "LSTM":
            self.rnn = nn.LSTM(4, 3, proj_size=2 if proj else 0, **common)
        elif mode == "GRU":
            self.rnn = nn.GRU(4, 3, **common)
        else:
            self.rnn = nn.RNN(4, 3, nonlinearity="tanh" if mode == "RNN_TANH" else "relu",
                              **common)

    def forward(self, x, *states):
        if not states:
            return self.rnn(x)
        return self.rnn(x, states if isinstance(self.rnn, nn.LSTM) else states[0])


@PROFILE
@given(mode=st.sampled_from(["LSTM", "GRU", "RNN_TANH", "RNN_RELU"]), bias=st.booleans(),
       layers=st.integers(1, 2), bidirectional=st.booleans(), batch_first=st.booleans(),
       proj=st.booleans(), batched=st.booleans(), states=st.booleans(), T=slots,
       length=st.integers(1, 4), n=st.integers(1, 3), seed=st.integers(0, 99))
def test_recurrent_layers(mode, bias, layers, bidirectional, batch_first, proj, batched, states,
                          T, length, n, seed):
    """nn.LSTM, nn.GRU and nn.RNN (tanh, relu) of drawn depth, directions, biases, projection
    and layout, batched or not, with initial states that carry tangents or none: the output
    and the final states, every slot, against forward_ad, on rules alone."""
    from fgkernels.rules.fallback import strict_rules
    from fgkernels.testing import model_jvp
    torch.manual_seed(seed)
    model = _Recurrent(mode, bias, layers, bidirectional, batch_first, proj).double()
    g = torch.Generator().manual_seed(seed)
    draw = lambda *shape: torch.randn(shape, generator=g, dtype=torch.float64)
    tangents = {name: draw(T, *p.shape) for name, p in model.named_parameters()}
    args = [draw(*(((n, length) if batch_first else (length, n)) if batched else (length,)), 4)]
    if states:
        lead = (layers * (2 if bidirectional else 1),) + ((n,) if batched else ())
        args.append(draw(*lead, 2 if mode == "LSTM" and proj else 3))
        if mode == "LSTM":
            args.append(draw(*lead, 3))
    arg_tangents = [draw(T, *a.shape) for a in args]
    y, yt = model_jvp(model, args, arg_tangents, tangents)
    # (output, h_n[, c_n]) of primals and of tangents: as pairs, the order of the Duals' parts
    expected = [v for pair in zip(*map(torch.utils._pytree.tree_leaves, (y, yt))) for v in pair]
    fgkernels.set_tangents(model, tangents)
    with strict_rules():
        out = model(*map(Dual, args, arg_tangents))
    _close(out, expected)


class _PackedRecurrent(_Recurrent):
    """The same layers on a packed batch of sequences of the given lengths: packed
    (``pack_padded_sequence``, sorted or not), run, and padded back (``pad_packed_sequence``)."""

    def forward(self, x, lengths, enforce_sorted, *states):
        rnn = nn.utils.rnn
        batch_first = self.rnn.batch_first
        packed = rnn.pack_padded_sequence(x, lengths, batch_first, enforce_sorted)
        out, final = super().forward(packed, *states)
        padded, _ = rnn.pad_packed_sequence(out, batch_first,
                                            total_length=x.shape[1 if batch_first else 0])
        return padded, *torch.utils._pytree.tree_leaves(final)


@PROFILE
@given(mode=st.sampled_from(["LSTM", "GRU", "RNN_TANH", "RNN_RELU"]), bias=st.booleans(),
       layers=st.integers(1, 2), bidirectional=st.booleans(), batch_first=st.booleans(),
       proj=st.booleans(), states=st.booleans(), T=slots,
       lengths=st.lists(st.integers(1, 4), min_size=1, max_size=3), sort=st.booleans(),
       seed=st.integers(0, 99))
def test_packed_recurrent_layers(mode, bias, layers, bidirectional, batch_first, proj, states, T,
                                 lengths, sort, seed):
    """nn.LSTM, nn.GRU and nn.RNN on packed sequences of drawn lengths (torch's forward mode
    cannot differentiate packing): the padded output (zero past each sequence's end, in value
    and tangent) and the final states, every slot, against forward_ad of the same layers run
    on each sequence alone, unpacked, with its own initial states; on rules alone."""
    from fgkernels.rules.fallback import strict_rules
    from fgkernels.testing import model_jvp
    torch.manual_seed(seed)
    if sort:
        lengths = sorted(lengths, reverse=True)
    model = _PackedRecurrent(mode, bias, layers, bidirectional, batch_first, proj).double()
    g = torch.Generator().manual_seed(seed)
    draw = lambda *shape: torch.randn(shape, generator=g, dtype=torch.float64)
    tangents = {name: draw(T, *p.shape) for name, p in model.named_parameters()}
    n, length = len(lengths), max(lengths)
    x = draw(*((n, length) if batch_first else (length, n)), 4)
    lead = (layers * (2 if bidirectional else 1), n)
    initial = [draw(*lead, 2 if mode == "LSTM" and proj else 3)] if states else []
    if states and mode == "LSTM":
        initial.append(draw(*lead, 3))
    xt, initial_t = draw(T, *x.shape), [draw(T, *h.shape) for h in initial]
    # The oracle: each sequence alone (batch of one, unpacked), its states and slots with it.
    along = 1 if batch_first else 0  # the time dim of x; its batch dim is the other one
    one = lambda v, b, dim: v.narrow(dim, b, 1)
    alone = _Recurrent(mode, bias, layers, bidirectional, batch_first, proj).double()
    alone.load_state_dict(model.state_dict())
    outs, outs_t, finals, finals_t = [], [], [], []
    for b, k in enumerate(lengths):
        xb = one(x, b, 1 - along).narrow(along, 0, k)
        xbt = one(xt, b, 2 - along).narrow(along + 1, 0, k)
        y, yt = model_jvp(alone, [xb, *(one(h, b, 1) for h in initial)],
                          [xbt, *(one(h, b, 2) for h in initial_t)], tangents)
        grow = lambda v, dim: torch.cat([v, v.new_zeros(*v.shape[:dim], length - k,
                                                          *v.shape[dim + 1:])], dim)
        outs.append(grow(y[0], along))
        outs_t.append(grow(yt[0], along + 1))
        finals.append(torch.utils._pytree.tree_leaves(y[1]))
        finals_t.append(torch.utils._pytree.tree_leaves(yt[1]))
    expected = [torch.cat(outs, 1 - along), torch.cat(outs_t, 2 - along)]
    for i in range(len(finals[0])):
        expected += [torch.cat([f[i] for f in finals], 1),
                     torch.cat([f[i] for f in finals_t], 2)]
    fgkernels.set_tangents(model, tangents)
    with strict_rules():
        out = model(Dual(x, xt), torch.tensor(lengths), sort,
                    *map(Dual, initial, initial_t))
    _close(out, expected)


SMOOTH_OPS = {  # rules of their own, and asinh, which has none (forward AD on the op)
    "sin": torch.sin, "cos": torch.cos, "cumsum": lambda v: v.cumsum(-1),
    "logsumexp": lambda v: v.logsumexp(-1), "var": lambda v: v.var(-1, correction=0),
    "std": lambda v: v.std(-1, correction=0), "rms_norm": lambda v: F.rms_norm(v, v.shape[-1:]),
    "cube": lambda v: v ** 3, "exp2": lambda v: 2 ** v, "atan": torch.atan, "asinh": torch.asinh,
    "torch_exp2": torch.exp2, "tan": lambda v: torch.tan(v * 0.3), "sinh": torch.sinh,
    "cosh": torch.cosh, "asin": lambda v: torch.asin(torch.tanh(v) * 0.9),
    "log2": lambda v: torch.log2(v.abs() + 0.5),
}


@PROFILE
@given(name=st.sampled_from(sorted(ACTIVATIONS) + sorted(SMOOTH_OPS)),
       shape=st.lists(st.integers(1, 4), min_size=1, max_size=3), seed=st.integers(0, 999))
def test_rules_match_central_differences(name, shape, seed):
    """A second, independent oracle: (f(x + hẋ) − f(x − hẋ)) / 2h in float64, at points at
    least 1e-2 away from every kink (where the derivative is defined and smooth)."""
    from helpers import central_difference
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 4
    near = (x.unsqueeze(-1) - torch.tensor(KINKS, dtype=torch.float64)).abs().min(-1).values < 1e-2
    x = torch.where(near, x + 0.05, x)
    xt = torch.randn(shape, generator=g, dtype=torch.float64)
    fn = ACTIVATIONS.get(name) or SMOOTH_OPS[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = fn(Dual(x, xt))
    fd = central_difference(fn, x, xt, h=1e-5)
    torch.testing.assert_close(out.tangent, fd, rtol=1e-6, atol=1e-7)


@given(st.floats(min_value=-2.0 ** 127, max_value=2.0 ** 127, width=32))  # below the overflow
def test_tf32_rounding_keeps_ten_mantissa_bits(value):
    """round_to_tf32 gives a value with 10 mantissa bits: to nearest (within half a TF32 unit,
    2⁻¹¹ relative) or truncated (toward zero, within one unit, 2⁻¹⁰); subnormals in units of
    2⁻¹³⁶."""
    from fgkernels.testing import round_to_tf32
    x = torch.tensor([value], dtype=torch.float32)
    for truncate, bound in ((False, 2.0 ** -11), (True, 2.0 ** -10)):
        r = round_to_tf32(x, truncate)
        assert int(r.view(torch.int32)) & 0x1FFF == 0
        assert abs(float(r) - value) <= bound * abs(value) + 2.0 ** -136  # + a subnormal unit
        if truncate:
            assert abs(float(r)) <= abs(value)


@settings(PROFILE, max_examples=4 * len(OPS))  # each row a few times
@given(case=st.sampled_from(sorted(OPS)), backend=backends, dtype=dtypes, T=slots,
       which=st.sampled_from(["x", "w", "both"]), layout=layouts,
       seed=st.integers(0, 2**31 - 1))
def test_op_table_at_drawn_points(case, backend, dtype, T, which, layout, seed):
    """Every row of the op table (tests/op_table.py) at drawn values, slot counts, dtypes,
    layouts of x and choices of the operands that carry tangents."""
    op = OPS[case]
    x, w, xt, wt = inputs(op, slots=T, seed=seed, dtype=dtype)
    xt, wt = (None if which == "w" else xt), (None if which == "x" else wt)
    x = laid_out(x, layout)
    with fgkernels.use_backend(backend), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback row says it takes torch's rule
        out = op.fn(x if xt is None else Dual(x, xt), w if wt is None else Dual(w, wt))
    _close(out, op.oracle(x, w, xt, wt))
