"""The compiled ops (torch.ops.fgkernels): schema/fake checks, numerics against forward_ad,
and argument checks."""
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch._prims_common import suggest_memory_format

import fgkernels
import fgkernels.functional as DF
from fgkernels import Dual
from fgkernels.dual.layout import empty_slots, kernel_format, slots_in_format
from fgkernels.testing import forward_ad_jvp

from batch_norm_refs import bn_update_running_stats_ref, dual_bn_coefficients_ref
from helpers import ForwardADOracle, assert_within_torch_error

pytestmark = pytest.mark.skipif("native" not in fgkernels.available_backends(),
                                reason="fgkernels._C is not built")
ops = torch.ops.fgkernels


def _slots(T, x):
    return torch.randn(T, *x.shape, dtype=x.dtype)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck(channels_last, batch):
    """Every op passes opcheck, and its outputs are laid out as its fake says wherever the
    layout matters (each dimension longer than 1: what a compiled graph asserts), one image
    included, whose layout is ambiguous."""
    x = torch.randn(batch, 3, 5, 4)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    xt = _slots(2, x)
    w, wt = torch.randn(4, 3, 3, 3), torch.randn(2, 4, 3, 3, 3)
    b, bt = torch.randn(4), torch.randn(2, 4)
    C = x.shape[1]
    cases = [
        (ops.dual_relu, (x, xt)),
        (ops.dual_max_pool2d, (x, xt, [2, 2], [2, 2], [0, 0], [1, 1], False)),
        (ops.dual_bn_stats, (x, xt)),
        (ops.dual_bn_stats, (x, None)),
        (ops.dual_bn_apply, (x, xt, [1, -1, 0], torch.randn(C), torch.randn(C), torch.randn(C),
                             torch.randn(3, C), torch.randn(3, C), True)),
        (ops.dual_bn_apply_, (x.clone(), empty_slots(2, x).copy_(xt), torch.randn(C),
                              torch.randn(C), torch.randn(C), torch.randn(2, C),
                              torch.randn(2, C), True)),
        (ops.dual_conv2d, (x, xt, w, wt, b, bt, [1, 1], [1, 1], [1, 1], 1)),
        (ops.dual_conv2d, (x, None, w, None, None, bt, [2, 1], [0, 1], [1, 1], 1)),
        (ops.dual_conv2d, (x, xt[:1], w, wt[:1], b, bt[:1], [1, 1], [1, 1], [1, 1], 1)),
        (ops.dual_conv2d, (x, xt[:1], torch.randn(3, 1, 3, 3), None, None, None, [1, 1],
                           [1, 1], [1, 1], 3)),
        (ops.dual_conv2d_tangents, (x, F.conv2d(x, w, b, 1, 1), xt, w, wt, bt, [1, 1], [1, 1],
                                    [1, 1], 1)),
        (ops.dual_conv2d_tangents, (x, F.conv2d(x, w, None, (2, 1), (0, 1)), None, w, None, bt,
                                    [2, 1], [0, 1], [1, 1], 1)),
        # a primal output laid out otherwise than x: the tangents follow the output
        (ops.dual_conv2d_tangents, (x, F.conv2d(x, w, b, 1, 1).contiguous(), xt, w, wt, bt,
                                    [1, 1], [1, 1], [1, 1], 1)),
        (ops.dual_linear, (x.flatten(1)[:, :7], xt.flatten(2)[..., :7], torch.randn(3, 7),
                           torch.randn(2, 3, 7), None, torch.randn(2, 3), False)),
        (ops.dual_linear, (x.flatten(1)[:, :7], xt.flatten(2)[..., :7], torch.randn(3, 7),
                           torch.randn(2, 3, 7), torch.randn(3), torch.randn(2, 3), True)),
        (ops.dual_linear, (x[0, 0], xt[:, 0, 0], torch.randn(3, 4), None, None,
                           torch.randn(2, 3), True)),
        # layer norm over x's last dim (last two dims: 4 x 4 or 5 x 4): the input's slots
        # and the parameters' summed, apart, the parameters' alone, bfloat16 tangents
        (ops.dual_layer_norm, (x, xt, torch.randn(4), torch.randn(2, 4), torch.randn(4),
                               torch.randn(2, 4), [4], 1e-5, True)),
        (ops.dual_layer_norm, (x, xt, torch.randn(5, 4), None, torch.randn(5, 4),
                               torch.randn(1, 5, 4), [5, 4], 1e-3, False)),
        (ops.dual_layer_norm, (x, None, torch.randn(4), torch.randn(3, 4), None, None, [4],
                               1e-5, False)),
        (ops.dual_layer_norm, (x, xt[:1].bfloat16(), None, None, None, None, [4], 1e-5, False)),
        (ops.dual_bn_coefficients, _coefficient_args(C, training=True)),
        (ops.dual_bn_coefficients, _coefficient_args(C, training=False, params=False)),
        (ops.bn_update_running_stats_, (torch.zeros(C), torch.ones(C), torch.randn(C),
                                        torch.rand(C), 40, 0.1)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)
        _assert_laid_out_as_the_fake(op, args)


def _assert_laid_out_as_the_fake(op, args) -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode
    copies = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    real = op(*copies)
    with FakeTensorMode() as mode:
        fake = op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
    if real is None:  # an in-place op
        return
    real = real if isinstance(real, tuple) else (real,)
    fake = fake if isinstance(fake, tuple) else (fake,)
    for i, (r, f) in enumerate(zip(real, fake)):
        assert r.shape == f.shape, f"{op} output {i}: shape {tuple(r.shape)}, fake {f.shape}"
        for d, size in enumerate(r.shape):
            assert size <= 1 or r.stride(d) == f.stride(d), \
                f"{op} output {i}: strides {r.stride()}, the fake's {f.stride()}"


def _coefficient_args(C, training=True, params=True, dtype=torch.float32, x_pos=(0, 2),
                      p_pos=(1, 2), count=3):
    """Arguments of dual_bn_coefficients: input slots to x_pos, parameter slots to p_pos."""
    X, P = len(x_pos), len(p_pos)
    stats = (torch.randn(C, dtype=dtype), torch.rand(C, dtype=dtype) + 0.1,
             torch.randn(X, C, dtype=dtype), torch.randn(X, C, dtype=dtype))
    p = (torch.randn(C), torch.randn(P, C), torch.randn(C), torch.randn(P, C)) if params else \
        (None, None, None, None)
    return (*stats, *p, list(x_pos), list(p_pos) if params else [], count, training, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("slots", [((0,), (0,), 1), ((0, 2), (1, 2), 3), ((), (0, 1), 2),
                                   ((1, 0), (), 2)], ids=["same", "mixed", "params", "input"])
def test_bn_coefficients_op_matches_its_ref(slots, training, dtype):
    """The op gives the coefficients of torch's ops applied slot by slot (batch_norm_refs), for
    every way input and parameter slots can land (the whole batch norm against forward_ad: the
    tests below and tests/rules/test_functional.py)."""
    x_pos, p_pos, count = slots
    args = _coefficient_args(6, training, bool(p_pos), dtype, x_pos, p_pos, count)
    inputs = [a for a in args if isinstance(a, torch.Tensor)]
    for ours, ref in zip(ops.dual_bn_coefficients(*args), dual_bn_coefficients_ref(*args)):
        assert ours.dtype == dtype
        tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else \
            dict(rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(ours, ref, **tol)
        # Fresh outputs, as the schema promises.
        assert not any(ours.data_ptr() == a.data_ptr() for a in inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_running_stats_update_as_batch_norm_does(dtype):
    """bn_update_running_stats_ gives nn.BatchNorm2d's running statistics (a bfloat16 buffer
    within one unit in its last place: torch rounds its float32 terms, the op rounds once from
    float64), exactly its ref's, and updates the buffers where they are."""
    x = (torch.randn(5, 4, 3, 3) * 3 + 1).to(dtype)
    mean, var = x.double().mean((0, 2, 3)), x.double().var((0, 2, 3), unbiased=False)
    ref = torch.nn.BatchNorm2d(4, momentum=0.3).to(dtype)
    ref.running_mean.normal_(), ref.running_var.uniform_(0.5, 2)
    ours = tuple(b.clone() for b in (ref.running_mean, ref.running_var))
    expected = bn_update_running_stats_ref(*ours, mean, var, 45, 0.3)
    pointers = [b.data_ptr() for b in ours]
    ref(x)
    ops.bn_update_running_stats_(*ours, mean, var, 45, 0.3)
    assert [b.data_ptr() for b in ours] == pointers
    tol = {torch.bfloat16: dict(rtol=2 ** -7, atol=0), torch.float32: dict(rtol=1e-6, atol=1e-6),
           torch.float64: dict(rtol=1e-12, atol=1e-14)}[dtype]
    torch.testing.assert_close(ours[0], ref.running_mean, **tol)
    torch.testing.assert_close(ours[1], ref.running_var, **tol)
    for got, want in zip(ours, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


STRIDED_STATISTICS = {
    "columns of one buffer": lambda c: (lambda s: (s[:, 0], s[:, 1]))(torch.ones(c, 2)),
    "one strided": lambda c: (torch.zeros(2 * c)[::2], torch.ones(c)),
    "rows of one buffer": lambda c: (lambda s: (s[0], s[1]))(torch.ones(2, c)),
}


@pytest.mark.parametrize("fused", [False, True], ids=["batch_norm", "conv2d_batch_norm"])
@pytest.mark.parametrize("layout", sorted(STRIDED_STATISTICS))
def test_running_statistics_strided_or_in_one_buffer_update_where_they_are(layout, fused):
    """Running statistics held strided, or as parts of one buffer that share no element, are
    updated in place as F.batch_norm updates them, on every backend (the native kernels took
    any two such tensors for the same memory and refused them); the outputs are forward_ad's."""
    torch.manual_seed(0)
    x, w = torch.randn(4, 3, 5, 5), torch.randn(3, 3, 3, 3)
    xt = torch.randn(1, *x.shape)
    conv = (lambda v: F.conv2d(v, w, padding=1)) if fused else (lambda v: v)
    mean0, var0 = STRIDED_STATISTICS[layout](3)
    ref_stats = (mean0.clone(), var0.clone())
    y, yt = forward_ad_jvp(lambda v: F.batch_norm(conv(v), *ref_stats, training=True), [x],
                           [xt])
    for backend in fgkernels.available_backends():
        mean, var = STRIDED_STATISTICS[layout](3)
        with fgkernels.use_backend(backend):
            out = DF.conv2d_batch_norm(Dual(x, xt), w, None, 1, 1, 1, 1, mean, var, None, None,
                                       True, 0.1, 1e-5, False) if fused else \
                DF.batch_norm(Dual(x, xt), mean, var, training=True)
        torch.testing.assert_close(out.primal, y, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.tangents, yt, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(mean, ref_stats[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(var, ref_stats[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(3, 5, 6, 7), (1000, 5, 2, 2), (40, 5, 3, 5), (40, 5, 1, 1)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("relu", [False, True])
def test_bn_with_varied_slots_matches_forward_ad(shape, channels_last, relu):
    """Input slots {0, 2}, parameter slots {1, 2}: every combination of terms in one apply.
    NCHW planes of fewer values than the kernels' vector lanes (1x1 to 3x5 maps) are summed
    and applied by rows of C·H·W positions, each channel's shift and coefficients at each of its
    positions; 1000 rows of 5x2x2 take two statistics blocks (819 rows each) and move their
    partials into double sums every 256 rows within one."""
    x = torch.randn(*shape, dtype=torch.float64) * 3 + 2
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    xt = _slots(2, x)
    w, b = torch.rand(5, dtype=x.dtype) + 0.5, torch.randn(5, dtype=x.dtype)
    wt, bt = torch.randn(2, 5, dtype=x.dtype), torch.randn(2, 5, dtype=x.dtype)
    args = (Dual(x, xt, directions=[0, 2]), None, None,
            Dual(w, wt, directions=[1, 2]), Dual(b, bt, directions=[1, 2]), True, 0.1, 1e-5,
            relu)
    with fgkernels.use_backend("native"):
        out = DF.batch_norm(*args)
    # forward_ad over the three directions, each operand zero in the directions it lacks
    zero = lambda t: torch.zeros_like(t[0])
    stacks = [torch.stack([xt[0], zero(xt), xt[1]]), torch.stack([zero(wt), wt[0], wt[1]]),
              torch.stack([zero(bt), bt[0], bt[1]])]
    fn = lambda x_, w_, b_: (F.relu if relu else (lambda v: v))(
        F.batch_norm(x_, None, None, w_, b_, True, 0.1, 1e-5))
    y, yt = forward_ad_jvp(fn, [x, w, b], stacks)
    assert out.directions == (0, 1, 2)
    torch.testing.assert_close(out.primal, y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.tangents, yt, rtol=1e-10, atol=1e-12)
    if channels_last:
        assert out.primal.is_contiguous(memory_format=torch.channels_last)


def test_bn_statistics_are_stable_for_large_means():
    """|mean| ≫ std: the shifted sums keep float32 statistics at float32 accuracy (the naive
    E[x²] − E[x]² would lose every digit of the variance here)."""
    x = torch.randn(8, 4, 16, 16) + 1e4
    xt = _slots(1, x)
    mean, var, tmean, tcov = ops.dual_bn_stats(x, xt)
    x64, xt64 = x.double(), xt.double()
    torch.testing.assert_close(mean.double(), x64.mean((0, 2, 3)), rtol=1e-7, atol=0)
    torch.testing.assert_close(var.double(), x64.var((0, 2, 3), unbiased=False), rtol=1e-4,
                               atol=0)
    centered = (x64 - x64.mean((0, 2, 3), keepdim=True)) * xt64[0]
    torch.testing.assert_close(tcov[0].double(), centered.mean((0, 2, 3)), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(tmean[0].double(), xt64[0].mean((0, 2, 3)), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("shape", [(8192, 1, 1, 2), (16384, 1, 1, 4), (4000, 1, 7, 7)])
def test_bn_statistics_of_many_small_planes_keep_float32_accuracy(shape):
    """Many rows of small planes (the kernel sums several rows of one channel before moving its
    float32 partials into double sums; 7x7 planes leave a tail in some lanes, 4000 rows a
    partial last group): each partial takes few enough values that the rounding of a constant
    square does not pile up (x = 3 ± 0.3, ẋ = ±0.7: every (x − mean)² is 0.09; letting one
    partial take a whole block, 8192 rows of the first shape, costs 5e-5 relative error)."""
    sign = (torch.arange(math.prod(shape)) % 2 * 2 - 1).float().reshape(shape)
    x, xt = 3 + 0.3 * sign, (0.7 * sign).unsqueeze(0)
    mean, var, tmean, tcov = ops.dual_bn_stats(x, xt)
    x64, xt64 = x.double(), xt[0].double()
    centered = x64 - x64.mean((0, 2, 3), keepdim=True)
    torch.testing.assert_close(var.double(), centered.square().mean((0, 2, 3)), rtol=1e-5,
                               atol=0)
    torch.testing.assert_close(tcov[0].double(), (centered * xt64).mean((0, 2, 3)), rtol=1e-5,
                               atol=0)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_bn_parallel_split_matches_forward_ad(channels_last, threads):
    """Large enough to be split over threads, with planes of 4355 values (not a multiple of the
    kernels' vector lanes) and more rows than one statistics block."""
    x = torch.randn(6, 3, 67, 65, dtype=torch.float64) * 2 + 3
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    xt = _slots(2, x)
    w, b = torch.rand(3, dtype=x.dtype) + 0.5, torch.randn(3, dtype=x.dtype)
    args = (Dual(x, xt), None, None, w, b, True, 0.1, 1e-5, True)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with fgkernels.use_backend("native"):
            out = DF.batch_norm(*args)
    finally:
        torch.set_num_threads(previous)
    fn = lambda x_: F.relu(F.batch_norm(x_, None, None, w, b, True, 0.1, 1e-5))
    y, yt = forward_ad_jvp(fn, [x], [xt])
    torch.testing.assert_close(out.primal, y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.tangents, yt, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("tangent_dtype", [torch.float32, torch.bfloat16])
def test_layer_norm_split_over_threads_is_forward_ads(threads, tangent_dtype):
    """The layer-norm kernel on rows enough to be split over threads, of a length (45) no
    multiple of a vector, far from zero mean; its input and parameters with tangents in slots
    of their own (so that it writes the two terms apart), float32 with float32 or bfloat16
    tangents: within twice torch's own error of forward_ad in float64."""
    x = torch.randn(40, 31, 45) * 3 + 5
    xt = _slots(2, x).to(tangent_dtype)
    w, b = torch.rand(45) + 0.5, torch.randn(45)
    wt, bt = torch.randn(1, 45).to(tangent_dtype), torch.randn(1, 45).to(tangent_dtype)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with fgkernels.use_backend("native"):
            out = F.layer_norm(Dual(x, xt, directions=(0, 1)), (45,),
                               Dual(w, wt, directions=(2,)), Dual(b, bt, directions=(2,)))
    finally:
        torch.set_num_threads(previous)
    assert out.directions == (0, 1, 2)
    fn = lambda x_, w_, b_: F.layer_norm(x_, (45,), w_, b_)
    zero = lambda t: torch.zeros(1, *t.shape[1:], dtype=t.dtype)
    oracle = ForwardADOracle(fn, [x, w, b], [torch.cat([xt, zero(xt)]),
                                             torch.cat([zero(wt), zero(wt), wt]),
                                             torch.cat([zero(bt), zero(bt), bt])])
    assert_within_torch_error(out, oracle)


def test_layer_norm_rounds_to_bfloat16_as_torch_does():
    """The kernel's float32 terms become bfloat16 tangents bit for bit as torch's cast rounds
    them (to nearest, ties to even): the parameter term γ̇·x̂ + β̇ stored alone, with γ̇ = 1 and
    β̇ = 0, is x̂ = (x − μ)·r rounded, over 400k values of x̂ (exact ties among them, below
    an even and below an odd bfloat16) next to x̂ cast by torch; and a NaN weight whose low
    mantissa bits are all set (which a rounding by the bits alone carries into the sign:
    0x7FFFFFFF would become −0) gives a NaN input term."""
    torch.manual_seed(0)
    D = 96
    x = torch.randn(4096, D) * 3 + 1
    ones, zeros = torch.ones(1, D, dtype=torch.bfloat16), torch.zeros(1, D, dtype=torch.bfloat16)
    _, _, p_part = ops.dual_layer_norm(x, None, torch.ones(D), ones, torch.zeros(D), zeros, [D],
                                       1e-5, False)
    _, mean, rstd = torch.native_layer_norm(x, [D], None, None, 1e-5)
    xhat = (x - mean) * rstd
    low = xhat.view(torch.int32) & 0x1FFFF  # the bit kept last and the 16 rounded away
    assert (low == 0x08000).any() and (low == 0x18000).any()  # ties to either side
    assert torch.equal(p_part[0].view(torch.int16), xhat.to(torch.bfloat16).view(torch.int16))

    # (x86 keeps a NaN operand's payload through the kernel's products and sums)
    w = torch.rand(D) + 0.5
    w.view(torch.int32)[3] = 0x7FFFFFFF
    xt = torch.randn(1, 8, D, dtype=torch.bfloat16)
    _, x_part, _ = ops.dual_layer_norm(x[:8], xt, w, None, None, None, [D], 1e-5, False)
    assert x_part[..., 3].isnan().all()
    assert not x_part[..., torch.arange(D) != 3].isnan().any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("channels_last", [False, True])
def test_low_precision_error_within_torch_error(dtype, channels_last):
    """err(native) ≤ 2·err(torch's own forward mode in the same dtype) + atol, both against
    forward_ad in float64."""
    x = torch.randn(4, 6, 8, 8, dtype=torch.float64) * 2 + 1
    xt = _slots(2, x)
    w, wt = torch.rand(6, dtype=x.dtype) + 0.5, torch.randn(2, 6, dtype=x.dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    fn = lambda x_, w_: F.relu(F.batch_norm(x_, None, None, w_, None, True, 0.1, 1e-5))
    low = lambda t: t.to(dtype)
    with fgkernels.use_backend("native"):
        out = DF.batch_norm(Dual(low(x), low(xt)), None, None, Dual(low(w), low(wt)), None, True,
                            0.1, 1e-5, relu=True)
    assert_within_torch_error(out, ForwardADOracle(fn, [low(x), low(w)], [low(xt), low(wt)]))


def test_ops_reject_bad_arguments():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(RuntimeError, match=r"xt must have shape \(T, "):
        ops.dual_relu(x, torch.randn(2, 3, 4, 4))
    with pytest.raises(RuntimeError, match="xt must have dtype"):
        ops.dual_bn_stats(x, torch.randn(1, 2, 3, 4, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"scale must have shape \[3\], got \[4\]"):
        ops.dual_bn_apply(x, None, [-1], torch.randn(3), torch.randn(4), torch.randn(3),
                          torch.randn(1, 3), torch.randn(1, 3), False)
    with pytest.raises(RuntimeError, match="x_slot entries must be -1 .* or < T"):
        ops.dual_bn_apply(x, torch.randn(1, 2, 3, 4, 4), [1], torch.randn(3), torch.randn(3),
                          torch.randn(3), torch.randn(1, 3), torch.randn(1, 3), False)
    with pytest.raises(RuntimeError, match="weight must have shape"):
        ops.dual_conv2d(x, None, torch.randn(4, 2, 3, 3), None, None, None, [1, 1], [0, 0],
                        [1, 1], 1)
    with pytest.raises(RuntimeError, match=r"bias_t must have shape \(P, 4\)"):
        ops.dual_conv2d(x, None, torch.randn(4, 3, 3, 3), None, None, torch.randn(1, 5),
                        [1, 1], [0, 0], [1, 1], 1)
    w = torch.randn(4, 3, 3, 3)
    with pytest.raises(RuntimeError, match=r"y must have the convolution's output shape "
                                           r"\(2, 4, 2, 2\), got \[2, 5, 2, 2\]"):
        ops.dual_conv2d_tangents(x, torch.randn(2, 5, 2, 2), None, w, None, torch.randn(1, 4),
                                 [1, 1], [0, 0], [1, 1], 1)
    with pytest.raises(RuntimeError, match="y must have the convolution's output shape"):
        ops.dual_conv2d_tangents(x, torch.randn(2, 4, 3, 3), torch.randn(1, 2, 3, 4, 4), w,
                                 None, None, [1, 1], [0, 0], [1, 1], 1)
    args = list(_coefficient_args(3))
    with pytest.raises(RuntimeError, match=r"p_pos must hold distinct output slots in \[0, 3\)"):
        ops.dual_bn_coefficients(*args[:9], [1, 3], *args[10:])
    with pytest.raises(RuntimeError, match=r"weight_t must have shape \[2, 3\], got \[2, 4\]"):
        ops.dual_bn_coefficients(*args[:5], torch.randn(2, 4), *args[6:])
    with pytest.raises(RuntimeError, match="training with input slots needs tmean and tcov"):
        ops.dual_bn_coefficients(*args[:2], None, None, *args[4:])
    with pytest.raises(RuntimeError, match=r"running_var must have shape \[3\]"):
        ops.bn_update_running_stats_(torch.zeros(3), torch.ones(4), torch.randn(3),
                                     torch.rand(3), 10, 0.1)


def test_native_is_the_cpu_default():
    assert fgkernels.current_backend(torch.device("cpu")).name == "native"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_ops_match_cpu(channels_last):
    x = torch.randn(4, 6, 9, 7) * 2 + 1
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    xt = _slots(3, x)
    C = x.shape[1]
    coef = (torch.randn(C), torch.randn(C), torch.randn(C), torch.randn(4, C), torch.randn(4, C))
    for op, args in [(ops.dual_relu, (x, xt)), (ops.dual_bn_stats, (x, xt)),
                     (ops.dual_bn_apply, (x, xt, [0, 2, -1, 1], *coef, True)),
                     (ops.dual_bn_coefficients, _coefficient_args(C))]:
        cpu = op(*args)
        gpu = op(*[a.cuda() if isinstance(a, torch.Tensor) else a for a in args])
        for a, b in zip(cpu, gpu):
            torch.testing.assert_close(b.cpu(), a, rtol=1e-4, atol=1e-4)
        torch.library.opcheck(op, [a.cuda() if isinstance(a, torch.Tensor) else a for a in args])


def test_relu_keeps_nan_and_its_tangent():
    """As torch.relu and its forward-mode derivative: a NaN primal stays, with its tangent; a
    NaN or Inf tangent where x <= 0 gives 0."""
    x = torch.tensor([[-1.0, float("nan"), 2.0, 0.0]])
    y, yt = ops.dual_relu(x, torch.tensor([[[float("nan"), 5.0, 1.0, float("inf")]]]))
    assert torch.equal(y.isnan(), torch.relu(x).isnan()) and y[0, 2] == 2.0
    assert yt.tolist() == [[[0.0, 5.0, 1.0, 0.0]]]


@pytest.mark.parametrize("channels_last", [False, True])
def test_inplace_apply_equals_out_of_place(channels_last):
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    slots = empty_slots(2, x).copy_(_slots(2, x))
    coef = (torch.randn(4, dtype=x.dtype), torch.randn(4, dtype=x.dtype),
            torch.randn(4, dtype=x.dtype), torch.randn(2, 4, dtype=x.dtype),
            torch.randn(2, 4, dtype=x.dtype))
    y, yt = ops.dual_bn_apply(x, slots, [0, 1], *coef, True)
    ops.dual_bn_apply_(x, slots, *coef, True)
    torch.testing.assert_close(x, y, rtol=0, atol=0)
    torch.testing.assert_close(slots, yt, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="updated in place"):
        ops.dual_bn_apply_(x, slots.transpose(3, 4).contiguous().transpose(3, 4), *coef, True)


def _profiled_conv(*args):
    """``ops.dual_conv2d(*args)`` and the names of the ops it ran, in order (torch.profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = ops.dual_conv2d(*args)
    return out, [e.name for e in prof.events()]


@pytest.mark.parametrize("shape,gemm", [
    ((8, 16, 2, 2), True),      # a small weight (8·16 ≤ 4096): a GEMM on any map
    ((72, 64, 32, 32), True),   # a large weight on a large map (H·W ≥ 1024)
    ((72, 64, 2, 3), False),    # a large weight on a small map: the convolution
    ((72, 64, 1, 1), True),     # one pixel: a linear layer
])
def test_pointwise_conv_takes_a_gemm_where_the_shape_says(shape, gemm):
    """Which pointwise convolutions of NCHW maps run as GEMMs (``convolve``'s shape rule) and
    which as oneDNN's convolution; the result against forward_ad either way."""
    c_in, c_out, h, w_ = shape
    x, w = torch.randn(2, c_in, h, w_), torch.randn(c_out, c_in, 1, 1)
    xt = _slots(1, x)
    (y, x_part, _), ran = _profiled_conv(x, xt, w, None, None, None, [1, 1], [0, 0], [1, 1], 1)
    assert ("aten::mkldnn_convolution" not in ran) == gemm
    y64, yt64 = forward_ad_jvp(lambda x_: F.conv2d(x_, w.double()), [x.double()],
                               [xt.double()])
    torch.testing.assert_close(y, y64.float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(x_part, yt64.float(), atol=1e-4, rtol=1e-4)


# A convolution onto a map of at most 4 pixels with a weight of C_in·C_out ≥ 512·256 (the
# weight tangents' slots stacked along C_out) runs as a GEMM (``convolve``'s tiny-map rule):
# float32 or bfloat16 with the input and the weight channels_last, on any CPU; bfloat16 NCHW
# unfolded by im2col, where oneDNN may use AMX and the extension's compiler could ask the CPU.
# Elsewhere every such convolution stays one.
_AMX = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()


@functools.cache
def _unfolded_gemm_runs() -> bool:
    """Whether the NCHW GEMM runs here at all: a bfloat16 dual convolution it takes, profiled."""
    x = torch.randn(1, 512, 2, 2, dtype=torch.bfloat16)
    w = torch.randn(512, 512, 3, 3, dtype=torch.bfloat16)
    _, ran = _profiled_conv(x, _slots(1, x), w, _slots(1, w), None, None, [1, 1], [1, 1],
                            [1, 1], 1)
    return "aten::im2col" in ran


def test_the_nchw_gemm_runs_only_with_amx():
    assert not _unfolded_gemm_runs() or _AMX


def _predicted_gemms(shape_fits: bool, x_cl: bool, w_cl: bool, dtype: torch.dtype):
    """(channels_last GEMMs, unfolded GEMMs) a convolution of such operands takes: 0 or 1."""
    if not shape_fits:
        return 0, 0
    if x_cl and w_cl:
        return 1, 0
    return 0, int(dtype == torch.bfloat16 and _unfolded_gemm_runs())


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "channels_last tangents"])
@pytest.mark.parametrize("network", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("x_shape,w_shape,conv,gemm", [
    ((3, 512, 2, 2), (512, 512, 3, 3), (1, 1, 1), True),
    ((3, 256, 4, 4), (512, 256, 3, 3), (2, 1, 1), True),        # onto a 2x2 map
    ((3, 512, 1, 1), (256, 512, 3, 3), (1, 1, 1), True),        # the kernel's centre alone
    ((2, 512, 2, 3), (256, 512, 1, 3), ((1, 2), (0, 1), 1), True),  # a 1x3 kernel onto 2x2
    ((2, 512, 4, 4), (256, 512, 3, 3), (2, (2, 1), (2, 1)), True),  # dilated, onto 2x2
    ((1, 256, 4, 4), (512, 256, 1, 1), (2, 0, 1), True),        # one image, unpadded
    ((3, 256, 2, 2), (128, 256, 3, 3), (1, 1, 1), False),       # a smaller weight, 2 slots too
    ((3, 512, 4, 4), (256, 512, 3, 3), (1, 1, 1), False),       # a larger map
], ids=["2x2", "stride 2", "1x1", "1x3 kernel", "dilated", "1x1 kernel, stride 2",
        "small weight", "4x4"])
def test_conv_onto_a_tiny_map(x_shape, w_shape, conv, gemm, network, layout):
    """bfloat16 tangents (of a float32 or a bfloat16 network) through a convolution onto a tiny
    map, NCHW or channels_last (the input and weight; the weight tangents too or not): each of
    its three products a GEMM where the rule says, the convolution elsewhere; either way the
    primal and each tangent part within twice torch's own error of float64 forward_ad, laid
    out as the op's fake says."""
    torch.manual_seed(0)
    pair = lambda v: [v, v] if isinstance(v, int) else list(v)
    stride, padding, dilation = (pair(v) for v in conv)
    cl = layout != "nchw"
    fmt = torch.channels_last if cl else torch.contiguous_format
    x = torch.randn(x_shape).to(network, memory_format=fmt)
    w = (torch.randn(w_shape) / math.sqrt(w_shape[1] * w_shape[2] * w_shape[3]))
    w = w.to(network, memory_format=fmt)
    xt = torch.randn(2, *x_shape, dtype=torch.bfloat16)
    wt = torch.randn(2, *w_shape, dtype=torch.bfloat16)
    if layout == "channels_last tangents":  # each slot channels_last
        wt = wt.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    args = (x, xt, w, wt, None, None, stride, padding, dilation, 1)
    (y, x_part, p_part), ran = _profiled_conv(*args)
    # The primal x·W, the input term ẋ·W (ẋ laid out as the kernels lay x out, W cast to
    # bfloat16 as it is laid out) and the parameter term x·Ẇ (x cast so, the slots of Ẇ stacked
    # along C_out as they are laid out), each operand's layout as its strides suggest it (a 1x1
    # map's are ambiguous).
    xt_op = slots_in_format(xt, kernel_format(x)).flatten(0, 1)
    suggests_cl = lambda t: suggest_memory_format(t) == torch.channels_last
    products = [(suggests_cl(a), suggests_cl(b), dtype) for a, b, dtype in
                [(x, w, network), (xt_op, w, torch.bfloat16),
                 (x, wt.flatten(0, 1), torch.bfloat16)]]
    cl_gemms, unfolded = (sum(n) for n in zip(*(_predicted_gemms(gemm, *p) for p in products)))
    assert ran.count("aten::convolution") == 3 - cl_gemms - unfolded
    assert ran.count("aten::im2col") == unfolded
    assert ran.count("aten::mm") == cl_gemms + unfolded
    fn = lambda x_, w_: F.conv2d(x_, w_, None, stride, padding, dilation)
    assert_within_torch_error((y, x_part), ForwardADOracle(fn, [x, w], [xt, None]))
    assert_within_torch_error((y, p_part), ForwardADOracle(fn, [x, w], [None, wt]))
    torch.library.opcheck(ops.dual_conv2d, args)


@pytest.mark.parametrize("network", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_biased_conv_onto_a_tiny_map(network):
    """A channels_last convolution with a bias onto a tiny map: float32's GEMM adds the bias
    to its float32 sums (addmm); bfloat16's primal keeps the convolution. The primal and both
    tangent parts against float64 forward_ad."""
    torch.manual_seed(0)
    cl = torch.channels_last
    x = torch.randn(2, 256, 4, 4).to(network, memory_format=cl)
    w = (torch.randn(512, 256, 3, 3) / 48).to(network, memory_format=cl)
    b = torch.randn(512).to(network)
    xt, wt = torch.randn(1, *x.shape), torch.randn(1, *w.shape)
    bt = torch.randn(1, 512)
    args = (x, xt.to(network), w, wt.to(network), b, bt.to(network), [2, 2], [1, 1], [1, 1], 1)
    (y, x_part, p_part), ran = _profiled_conv(*args)
    assert ran.count("aten::addmm") == (network == torch.float32)
    fn = lambda x_, w_, b_: F.conv2d(x_, w_, b_, 2, 1)
    assert_within_torch_error((y, x_part + p_part),
                              ForwardADOracle(fn, [x, w, b], [xt, wt, bt]))
    torch.library.opcheck(ops.dual_conv2d, args)


def test_a_channels_last_gemm_reads_a_sliced_input_where_it_lies():
    """A channels_last input that is a slice of a larger one (channels from an offset, every
    other column), unpadded: the GEMM's windows read it where it lies, by its strides. The
    primal and the tangent parts against float64 forward_ad, laid out as at::conv2d lays them
    out."""
    torch.manual_seed(0)
    cl = torch.channels_last
    x = torch.randn(2, 768, 4, 8).to(memory_format=cl)[:, 128:640, :, ::2]
    w = (torch.randn(512, 512, 1, 1) / 23).to(memory_format=cl)
    assert suggest_memory_format(x) == cl and not x.is_contiguous(memory_format=cl)
    xt, wt = torch.randn(1, *x.shape), torch.randn(1, *w.shape)
    args = (x, xt, w, wt, None, None, [2, 2], [0, 0], [1, 1], 1)
    (y, x_part, p_part), ran = _profiled_conv(*args)
    assert "aten::mm" in ran and "aten::constant_pad_nd" not in ran
    assert y.stride() == F.conv2d(x, w, None, 2).stride()
    fn = lambda x_, w_: F.conv2d(x_, w_, None, 2)
    assert_within_torch_error((y, x_part + p_part), ForwardADOracle(fn, [x, w], [xt, wt]))
    torch.library.opcheck(ops.dual_conv2d, args)


@pytest.mark.parametrize("case", ["1x1 weight channels_last", "input sliced"])
def test_a_tiny_maps_gemm_lays_out_its_output_as_conv2d(case):
    """The layout at::conv2d (and so the op's fake) gives a bfloat16 convolution onto a tiny
    map follows the strides' suggestion: a 1x1 weight laid out channels_last (also contiguous)
    beside an NCHW input, or a channels_last input sliced (not dense). The GEMM's output follows
    it too."""
    bf = torch.bfloat16
    if case == "1x1 weight channels_last":
        x = torch.randn(2, 512, 2, 2, dtype=bf)
        w = (torch.randn(256, 512, 1, 1) / 23).to(bf, memory_format=torch.channels_last)
        conv = ([1, 1], [0, 0], [1, 1])
    else:
        x = torch.randn(2, 512, 2, 4).to(bf, memory_format=torch.channels_last)[..., :2]
        w = (torch.randn(256, 512, 3, 3) / 68).to(bf)
        conv = ([1, 1], [1, 1], [1, 1])
    args = (x, torch.randn(1, *x.shape, dtype=bf), w, torch.randn(1, *w.shape, dtype=bf),
            None, None, *conv, 1)
    y, x_part, p_part = ops.dual_conv2d(*args)
    assert y.stride() == F.conv2d(x, w, None, *conv).stride()
    torch.library.opcheck(ops.dual_conv2d, args)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_pointwise_conv_is_batched_gemms_without_copies(requires_grad):
    """A float32 pointwise convolution of an NCHW map runs as batched GEMMs (the primal and
    the input tangent's; the weight tangent's stacked along the output channels) and copies
    nothing, whether its weight requires grad, as a compiled pass's parameters do, or not."""
    x, w = torch.randn(2, 8, 32, 32), torch.randn(16, 8, 1, 1, requires_grad=requires_grad)
    xt, wt = _slots(1, x), torch.randn(1, *w.shape)
    with torch.no_grad():
        (y, x_part, p_part), ran = _profiled_conv(x, xt, w, wt, None, None, [1, 1], [0, 0],
                                                  [1, 1], 1)
    assert ran.count("aten::bmm") == 3
    assert not {"aten::copy_", "aten::mkldnn_convolution", "aten::mm"} & set(ran)
    y64, yt64 = forward_ad_jvp(lambda x_, w_: F.conv2d(x_, w_),
                               [x.double(), w.detach().double()], [xt.double(), wt.double()])
    torch.testing.assert_close(y, y64.float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(x_part + p_part, yt64.float(), atol=1e-4, rtol=1e-4)
