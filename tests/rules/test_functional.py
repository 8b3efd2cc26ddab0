"""Each dual op against torch's forward-mode AD and finite differences, on every CPU backend."""
import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F

import fgkernels.functional as DF
from fgkernels import Dual
from fgkernels.testing import forward_ad_jvp

from helpers import (
    TOL,
    ForwardADOracle,
    assert_within_torch_error,
    central_difference,
    rel_err,
)

DTYPES = [torch.float64, torch.float32]


def check(out, fn, inputs, tangents):
    """``out`` (a Dual of one slot) against forward_ad of ``fn`` along ``tangents`` (one per
    input; None: constant): equal in float64, within twice torch's own error in float32."""
    stacked = [None if t is None else t.unsqueeze(0) for t in tangents]
    assert_within_torch_error(out, ForwardADOracle(fn, inputs, stacked))


CONV_CASES = [
    # (N, C_in, H, W, C_out, k, stride, padding, dilation, groups, bias)
    (2, 3, 7, 6, 5, 3, 1, 1, 1, 1, True),
    (1, 4, 9, 9, 6, 3, 2, 0, 1, 2, False),
    (3, 2, 8, 5, 4, (3, 1), (2, 1), (1, 0), 1, 1, True),
    (2, 3, 9, 9, 3, 3, 1, 2, 2, 1, True),
    (2, 4, 6, 7, 4, 3, 1, "same", 1, 4, True),
    (2, 3, 6, 6, 4, 2, 1, "same", 1, 1, False),
    (2, 3, 5, 5, 2, 1, 1, "valid", 1, 1, True),
    # Pointwise (1x1, stride 1, no padding): the native op computes them as a GEMM, on a
    # spatial map and on a 1x1 one (a squeeze-and-excitation block's), and for a large weight
    # (C_in·C_out > 4096) on a large map (H·W ≥ 1024) only; on a smaller map, the convolution.
    (3, 5, 4, 6, 7, 1, 1, 0, 1, 1, True),
    (4, 6, 1, 1, 3, 1, 1, 0, 1, 1, True),
    (2, 72, 32, 32, 64, 1, 1, 0, 1, 1, True),
    (2, 72, 2, 3, 64, 1, 1, 0, 1, 1, True),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("which", ["x", "w", "all"])
def test_conv2d_matches_forward_ad(backend, dtype, case, which):
    N, C, H, W, Co, k, s, p, d, g, has_b = case
    k2 = (k, k) if isinstance(k, int) else k
    x = torch.randn(N, C, H, W, dtype=dtype)
    w = torch.randn(Co, C // g, *k2, dtype=dtype)
    b = torch.randn(Co, dtype=dtype) if has_b else None
    xt = torch.randn_like(x) if which in ("x", "all") else None
    wt = torch.randn_like(w) if which in ("w", "all") else None
    bt = torch.randn_like(b) if b is not None and which in ("w", "all") else None
    out = DF.conv2d(Dual(x, xt), Dual(w, wt), None if b is None else Dual(b, bt), s, p, d, g)
    check(out, lambda x_, w_, b_: F.conv2d(x_, w_, b_, s, p, d, g), [x, w, b], [xt, wt, bt])


# Kernels that overhang their padded input: taps that meet only padding on both sides, on one,
# along one axis, dilated, strided.
OVERHANG_CASES = [
    # (H, W, k, stride, padding, dilation, groups)
    (2, 2, 7, 1, 3, 1, 4),  # ConvNeXt's depthwise 7x7 on its last map at 64x64: 3x3 taps
    (1, 1, 7, 1, 3, 1, 4),  # ... at 32x32: the centre tap alone
    (1, 5, 3, 1, 1, 1, 1),  # a 3x3 on a single row: its middle row of taps
    (3, 2, 5, 2, 2, 1, 1),
    (1, 3, 3, 1, 2, 2, 2),  # dilated: the middle row of taps
    (3, 3, 7, 3, 3, 1, 1),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", OVERHANG_CASES)
def test_conv2d_with_an_overhanging_kernel_matches_forward_ad(backend, dtype, case):
    H, W, k, s, p, d, g = case
    x = torch.randn(2, 4, H, W, dtype=dtype)
    w, b = torch.randn(8, 4 // g, k, k, dtype=dtype), torch.randn(8, dtype=dtype)
    xt, wt, bt = torch.randn_like(x), torch.randn_like(w), torch.randn_like(b)
    out = DF.conv2d(Dual(x, xt), Dual(w, wt), Dual(b, bt), s, p, d, g)
    check(out, lambda x_, w_, b_: F.conv2d(x_, w_, b_, s, p, d, g), [x, w, b], [xt, wt, bt])


def test_conv2d_with_no_output_raises_as_torch(backend):
    """A kernel that does not fit the padded input even once: torch's error."""
    x, w = torch.randn(1, 2, 3, 3), torch.randn(2, 2, 4, 4)
    with pytest.raises(RuntimeError) as expected:
        F.conv2d(x, w, None, 2)
    with pytest.raises(RuntimeError, match=re.escape(str(expected.value))):
        DF.conv2d(Dual(x, torch.randn_like(x)), w, None, 2)


@pytest.mark.parametrize("size", [4, 1])
@pytest.mark.parametrize("bad", ["bias dtype", "no output channels"])
def test_pointwise_conv2d_refuses_what_torch_refuses(backend, bad, size):
    """A 1x1 convolution (the native ops compute it as a GEMM) with a bias of another dtype or
    a weight of no output channels: torch's error."""
    x = torch.randn(2, 3, size, size)
    w = torch.randn(0 if bad == "no output channels" else 4, 3, 1, 1)
    b = torch.randn(w.shape[0], dtype=torch.float64 if bad == "bias dtype" else torch.float32)
    with pytest.raises(RuntimeError) as expected:
        F.conv2d(x, w, b)
    with pytest.raises(RuntimeError, match=re.escape(str(expected.value))):
        DF.conv2d(Dual(x, torch.randn_like(x)), w, b)


def test_bfloat16_pointwise_conv2d_adds_its_bias_before_rounding(backend):
    """A bfloat16 1x1 convolution with a bias on a spatial map: the primal is torch's, the
    bias added before the one rounding to bfloat16 (a GEMM rounded first, then the bias added,
    would round twice)."""
    x = torch.randn(4, 16, 6, 6, dtype=torch.bfloat16)
    w = torch.randn(8, 16, 1, 1, dtype=torch.bfloat16)
    b = (torch.randn(8) * 4).to(torch.bfloat16)
    out = DF.conv2d(Dual(x, torch.randn_like(x)), w, b)
    torch.testing.assert_close(out.primal, F.conv2d(x, w, b), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_matches_forward_ad(backend, dtype):
    x, w, b = (torch.randn(5, 7, dtype=dtype), torch.randn(3, 7, dtype=dtype),
               torch.randn(3, dtype=dtype))
    ts = [torch.randn_like(v) for v in (x, w, b)]
    out = DF.linear(Dual(x, ts[0]), Dual(w, ts[1]), Dual(b, ts[2]))
    check(out, F.linear, [x, w, b], ts)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("relu", [False, True])
def test_batch_norm_matches_forward_ad(backend, dtype, training, affine, relu):
    x = torch.randn(3, 5, 4, 7, dtype=dtype) * 2 + 1
    xt = torch.randn_like(x)
    w = torch.rand(5, dtype=dtype) + 0.5 if affine else None
    b = torch.randn(5, dtype=dtype) if affine else None
    wt = torch.randn(5, dtype=dtype) if affine else None
    bt = torch.randn(5, dtype=dtype) if affine else None
    rm, rv = torch.randn(5, dtype=dtype), torch.rand(5, dtype=dtype) + 0.5
    before = rm.clone(), rv.clone()
    out = DF.batch_norm(Dual(x, xt), rm, rv, None if w is None else Dual(w, wt),
                        None if b is None else Dual(b, bt), training, 0.1, 1e-5, relu=relu)

    def f(x_, w_, b_):
        stats = [s.to(x_.dtype, copy=True) for s in before]
        y = F.batch_norm(x_, *stats, w_, b_, training, 0.1, 1e-5)
        return (F.relu(y) if relu else y), *stats

    def oracle(dtype):  # the output, its tangent and the running stats (updated once)
        stacked = [None if t is None else t.unsqueeze(0) for t in (xt, wt, bt)]
        (y, m, v), (yt, _, _) = ForwardADOracle(f, [x, w, b], stacked)(dtype)
        return (y, yt), m, v

    assert_within_torch_error((out, rm, rv), oracle)


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_and_max_pool_match_forward_ad(backend, dtype):
    x = torch.randn(2, 3, 7, 9, dtype=dtype)
    xt = torch.randn_like(x)
    check(DF.relu(Dual(x, xt)), F.relu, [x], [xt])
    for args in [(2,), (3, 2, 1), (3, 1, 1, 2, True)]:
        check(DF.max_pool2d(Dual(x, xt), *args), lambda v, a=args: F.max_pool2d(v, *a), [x],
              [xt])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_matches_forward_ad(reduction, smoothing):
    z = torch.randn(6, 4, dtype=torch.float64)
    zt = torch.randn_like(z)
    y = torch.tensor([0, 3, 1, 1, 2, 0])
    out = DF.cross_entropy(Dual(z, zt), y, reduction=reduction, label_smoothing=smoothing)
    check(out, lambda v: F.cross_entropy(v, y, reduction=reduction, label_smoothing=smoothing),
          [z], [zt])


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_chunked_linear_cross_entropy_matches_forward_ad_of_its_reference_form(reduction):
    """``F.linear_cross_entropy`` chunked by ``options``: torch's chunked op has no forward-mode
    formula (forward_ad leaves its tangent undefined, torch.func.jvp makes it zero), and
    chunking changes no value: the tangent is forward_ad's of cross_entropy(linear(...))."""
    x, w, b = (torch.randn(*s, dtype=torch.float64) for s in [(6, 4), (5, 4), (5,)])
    xt, wt, bt = torch.randn_like(x), torch.randn_like(w), torch.randn_like(b)
    y = torch.tensor([0, 3, 1, 4, 2, 0])
    opts = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's notice
        out = F.linear_cross_entropy(Dual(x, xt), Dual(w, wt), y, linear_bias=Dual(b, bt),
                                     reduction=reduction, options=opts)
    check(out, lambda v, u, c: F.cross_entropy(F.linear(v, u, c), y, reduction=reduction),
          [x, w, b], [xt, wt, bt])


def test_ops_match_central_differences(backend):
    """An independent oracle: conv → BN(train) → ReLU → pool → linear → loss, by differences."""
    torch.manual_seed(3)
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    xt = torch.randn_like(x)
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64)
    lw = torch.randn(2, 5, dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 0])

    def f(v):
        h = DF.conv2d(v, w, None, 1, 1)
        h = DF.batch_norm(h, None, None, None, None, True, 0.1, 1e-5, relu=True)
        h = DF.flatten(DF.adaptive_avg_pool2d(h, 1), 1)
        return DF.cross_entropy(DF.linear(h, lw), y)

    out = f(Dual(x, xt))
    fd = central_difference(lambda v: f(Dual(v)).primal, x, xt)
    torch.testing.assert_close(out.tangent, fd, rtol=1e-6, atol=1e-8)


def test_multi_tangent_equals_single_runs(backend):
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    xt, wt = torch.randn(3, *x.shape, dtype=x.dtype), torch.randn(3, *w.shape, dtype=x.dtype)

    def f(x_, w_):
        h = DF.conv2d(x_, w_, None, 1, 1)
        return DF.batch_norm(h, None, None, None, None, True, 0.1, 1e-5, relu=True)

    multi = f(Dual(x, xt), Dual(w, wt))
    assert multi.tangent.shape == (3, 2, 4, 6, 6)
    for t in range(3):
        single = f(Dual(x, xt[t]), Dual(w, wt[t]))
        torch.testing.assert_close(multi.tangent[t], single.tangent, rtol=1e-12, atol=1e-12)


def test_none_tangent_equals_zero_tangent(backend):
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    wt = torch.randn_like(w)
    a = DF.batch_norm(DF.conv2d(Dual(x), Dual(w, wt)), None, None, training=True, relu=True)
    b = DF.batch_norm(DF.conv2d(Dual(x, torch.zeros_like(x)), Dual(w, wt)), None, None,
                      training=True, relu=True)
    torch.testing.assert_close(a.tangent, b.tangent, rtol=1e-12, atol=1e-12)
    assert DF.relu(DF.conv2d(Dual(x), w)).tangent is None  # no tangent anywhere: none out


def test_directions_enter_part_way(backend):
    """A parameter tangent of direction 1 adds a slot to an input carrying direction 0 only:
    slot 0 is the input's JVP, slot 1 the parameter's, and no zero slot is ever made up."""
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    xt = torch.randn_like(x)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    wt = torch.randn_like(w)
    out = DF.conv2d(Dual(x, xt.unsqueeze(0), directions=[0]),
                    Dual(w, wt.unsqueeze(0), directions=[1]), None, 1, 1)
    assert out.directions == (0, 1)
    torch.testing.assert_close(out.tangent[0], F.conv2d(xt, w, padding=1))
    torch.testing.assert_close(out.tangent[1], F.conv2d(x, wt, padding=1))
    bn = DF.batch_norm(out, None, None, training=True, relu=True)
    sel = bn.select_directions([1])
    ref = DF.batch_norm(DF.conv2d(Dual(x), Dual(w, wt), None, 1, 1), None, None,
                        training=True, relu=True)
    torch.testing.assert_close(sel.tangent[0], ref.tangent, rtol=1e-12, atol=1e-12)


def test_param_tangents_without_input_tangent_in_eval_bn(backend):
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    w, b = torch.rand(4, dtype=x.dtype) + 0.5, torch.randn(4, dtype=x.dtype)
    wt, bt = torch.randn_like(w), torch.randn_like(b)
    rm, rv = torch.randn(4, dtype=x.dtype), torch.rand(4, dtype=x.dtype) + 0.5
    out = DF.batch_norm(Dual(x), rm, rv, Dual(w, wt), Dual(b, bt), training=False)
    check(out, lambda w_, b_: F.batch_norm(x, rm, rv, w_, b_, False), [w, b], [wt, bt])


DTYPE_OPS = {
    "softmax": lambda v, dtype: torch.softmax(v, 1, dtype=dtype),
    "log_softmax": lambda v, dtype: F.log_softmax(v, 1, dtype=dtype),
    "vector_norm": lambda v, dtype: torch.linalg.vector_norm(v, dim=1, dtype=dtype),
    "sum": lambda v, dtype: v.sum(1, dtype=dtype),
    "cumsum": lambda v, dtype: v.cumsum(1, dtype=dtype),
    "prod (fallback)": lambda v, dtype: v.prod(1, dtype=dtype),
}


@pytest.mark.parametrize("name", sorted(DTYPE_OPS))
def test_an_op_with_a_dtype_casts_the_input_first(name, recwarn):
    """``dtype=`` casts the input before the op, as torch does: a tangent of the input's dtype
    is widened with it (the float64 values of forward_ad on the float64 input; torch's own
    vector_norm leaves its tangent float32), a narrower one stays narrower (but where the op
    runs on the tangent itself: ``sum`` or ``cumsum`` of a bfloat16 tangent in float64)."""
    fn = DTYPE_OPS[name]
    x, xt = torch.randn(3, 5), torch.randn(3, 5)
    out = fn(Dual(x, xt), torch.float64)
    assert out.primal.dtype == out.tangents.dtype == torch.float64
    expected = forward_ad_jvp(lambda v: fn(v, torch.float64), [x.double()],
                              [xt.double()[None]])[1][0]
    torch.testing.assert_close(out.tangent, expected, rtol=1e-12, atol=1e-12)
    narrow = fn(Dual(x, xt.bfloat16()), torch.float64).tangents.dtype
    assert narrow == (torch.float64 if name in ("sum", "cumsum") else torch.bfloat16)


def test_softmax_takes_a_positional_dtype():
    """torch's and Tensor's softmax take dtype third (F.softmax's third is _stacklevel)."""
    x, xt = torch.randn(3, 5), torch.randn(3, 5)
    for out in (torch.softmax(Dual(x, xt), 1, torch.float64),
                Dual(x, xt).softmax(1, torch.float64),
                torch.log_softmax(Dual(x, xt), 1, torch.float64)):
        assert out.primal.dtype == out.tangents.dtype == torch.float64


def test_vector_norm_refuses_a_narrowing_dtype():
    """As torch's own does: a float64 input's norm in float32 would be a narrowing cast."""
    d = Dual(torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="dtype torch.float32 would narrow the input's"):
        torch.linalg.vector_norm(d, dim=1, dtype=torch.float32)


IN_PLACE = {"relu_": F.relu_, "hardtanh_": lambda v: F.hardtanh_(v, -0.3, 0.4),
            "leaky_relu_": F.leaky_relu_, "elu_": F.elu_, "celu_": lambda v: F.celu_(v, 0.5),
            "selu_": F.selu_, "threshold_ (fallback)": lambda v: F.threshold_(v, 0.1, 0.0)}


@pytest.mark.parametrize("name", sorted(IN_PLACE))
def test_functional_in_place_forms_rebind_their_input(name, recwarn):
    """``F.leaky_relu_(y)`` and its kind change y, as on a forward_ad dual tensor: code that
    drops the return value keeps the result."""
    f = IN_PLACE[name]

    def fn(x, w):
        y = x * w
        f(y)
        return y

    x, w = torch.randn(4, 6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    xt, wt = torch.randn(2, 4, 6, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
    out = fn(Dual(x, xt), Dual(w, wt))
    y, yt = forward_ad_jvp(fn, [x, w], [xt, wt])
    torch.testing.assert_close(out.primal, y, **TOL[torch.float64])
    torch.testing.assert_close(out.tangents, yt, **TOL[torch.float64])


@pytest.mark.parametrize("fn", [torch.softmax, torch.log_softmax], ids=["softmax", "log_softmax"])
def test_softmax_of_a_0_dim_dual(fn):
    """One element: softmax is 1 and log-softmax 0 whatever it holds, so the tangent is 0."""
    out = fn(Dual(torch.tensor(2.0), torch.tensor([1.0, -3.0])), 0)
    assert out.primal.item() == fn(torch.tensor(2.0), 0).item()
    torch.testing.assert_close(out.tangents, torch.zeros(2))


@pytest.mark.parametrize("fn", [torch.linalg.vector_norm, torch.norm], ids=["vector_norm", "norm"])
def test_norm_of_a_0_dim_dual(fn):
    """|x| of one element: the tangent is sign(x)·ẋ, slot by slot (the slots were summed)."""
    out = fn(Dual(torch.tensor(-0.7), torch.tensor([1.0, -2.0])))
    torch.testing.assert_close(out.tangents, torch.tensor([-1.0, 2.0]))


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_an_embedding_bag_with_max_norm_renormalises_as_torch(mode):
    """``max_norm`` renormalises the picked rows of the weight in place before the bags are
    taken, as torch does: the weight, the bags and their tangents as an embedding lookup with
    that ``max_norm`` and the bag's reduction give them under forward_ad."""
    torch.manual_seed(0)
    ids = torch.tensor([[1, 2, 4], [4, 3, 7]])
    weight, wt = torch.randn(8, 5, dtype=torch.float64) * 2, torch.randn(2, 8, 5,
                                                                          dtype=torch.float64)
    reference = weight.clone()
    out = F.embedding_bag(ids, Dual(weight, wt), mode=mode, max_norm=1.0)
    reduce = {"sum": lambda r: r.sum(1), "mean": lambda r: r.mean(1),
              "max": lambda r: r.amax(1)}[mode]
    y, yt = forward_ad_jvp(lambda w: reduce(F.embedding(ids, w, max_norm=1.0)), [reference],
                           [wt])
    torch.testing.assert_close(weight, reference, rtol=0, atol=0)  # renormalised alike
    assert weight[[1, 2, 3, 4, 7]].norm(dim=1).max() <= 1 + 1e-12
    torch.testing.assert_close(out.primal, y, **TOL[torch.float64])
    torch.testing.assert_close(out.tangents, yt, **TOL[torch.float64])


def test_ctc_loss_leaves_out_a_frame_no_path_visits():
    """Sample 0's targets (1, 2, 1) over 6 frames: no path emits class 2 at the first or last
    frame, so a NaN tangent there takes no part, whatever the rounding of the occupancy read
    from torch's gradient (at these draws a residue of the last bit at some of them)."""
    targets, lengths = torch.tensor([[1, 2, 1], [3, 3, 0]]), (torch.tensor([6, 5]),
                                                             torch.tensor([3, 2]))
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        lp = torch.randn(6, 2, 4, generator=g, dtype=torch.float64).log_softmax(-1)
        lpt = torch.randn(1, 6, 2, 4, generator=g, dtype=torch.float64)
        clean = F.ctc_loss(Dual(lp, lpt), targets, *lengths, reduction="none").tangents
        for frame in (0, 5):
            poisoned = lpt.clone()
            poisoned[0, frame, 0, 2] = math.nan
            out = F.ctc_loss(Dual(lp, poisoned), targets, *lengths, reduction="none").tangents
            assert torch.equal(out, clean), (seed, frame)


@pytest.mark.parametrize("form", ["padded", "concatenated", "unbatched"])
def test_ctc_loss_leaves_out_a_class_no_path_visits(form):
    """A NaN tangent at every frame of a class that is neither the blank nor among sample 1's
    targets (3, 3) takes no part in its tangent, whatever the rounding of the occupancy read
    from torch's gradient there (these unnormalised log-probabilities leave a residue of the
    last bit at class 1, frame 2); the same NaN at class 3 makes it NaN."""
    g = torch.Generator().manual_seed(7)
    x, w = (torch.randn(6, 2, 4, generator=g, dtype=torch.float64),
            torch.randn(4, generator=g, dtype=torch.float64))
    lp, lpt = x * w, torch.randn(1, 6, 2, 4, generator=g, dtype=torch.float64)
    lengths = torch.tensor([6, 5]), torch.tensor([3, 2])
    args = {"padded": (torch.tensor([[1, 2, 1], [3, 3, 0]]), *lengths),
            "concatenated": (torch.tensor([1, 2, 1, 3, 3]), *lengths),
            "unbatched": (torch.tensor([3, 3]), torch.tensor(5), torch.tensor(2))}[form]
    if form == "unbatched":  # sample 1 alone
        lp, lpt = lp[:, 1], lpt[:, :, 1]
    sample_1 = (lambda t: t[0]) if form == "unbatched" else (lambda t: t[0, 1])
    clean = sample_1(F.ctc_loss(Dual(lp, lpt), *args, reduction="none").tangents)
    for cls in (1, 2, 3):
        poisoned = lpt.clone()
        (poisoned[:, :, cls] if form == "unbatched" else poisoned[:, :, 1, cls]).fill_(math.nan)
        out = sample_1(F.ctc_loss(Dual(lp, poisoned), *args, reduction="none").tangents)
        if cls == 3:
            assert out.isnan()
        else:
            assert out == clean


def test_ctc_loss_zero_infinity_and_unbatched_inputs():
    """A sample no alignment fits (two equal labels in two frames) has an infinite loss, which
    ``zero_infinity`` makes 0 with a tangent of 0, the other samples' unchanged; an unbatched
    call (0-d lengths) is the batched call of its one sample."""
    torch.manual_seed(0)
    lp = torch.randn(6, 2, 4, dtype=torch.float64).log_softmax(-1)
    lpt = torch.randn(3, 6, 2, 4, dtype=torch.float64)
    targets, target_lengths = torch.tensor([[1, 2, 1], [3, 3, 0]]), torch.tensor([3, 2])
    out = F.ctc_loss(Dual(lp, lpt), targets, torch.tensor([6, 2]), target_lengths,
                     reduction="none", zero_infinity=True)
    alone = F.ctc_loss(Dual(lp[:, :1], lpt[:, :, :1]), targets[:1], torch.tensor([6]),
                       target_lengths[:1], reduction="none")
    assert out.primal[1] == 0 and torch.equal(out.tangents[:, 1], torch.zeros(3).double())
    torch.testing.assert_close(out.tangents[:, :1], alone.tangents, rtol=0, atol=0)
    for reduction, scale in (("none", 1), ("sum", 1), ("mean", 1 / 3)):
        single = F.ctc_loss(Dual(lp[:, 0], lpt[:, :, 0]), targets[0], torch.tensor(6),
                            torch.tensor(3), reduction=reduction)
        assert single.primal.shape == () and single.tangents.shape == (3,)
        torch.testing.assert_close(single.primal, alone.primal[0] * scale)
        torch.testing.assert_close(single.tangents, alone.tangents[:, 0] * scale)


def _assert_grid_sample_is_torch_s(x, grid, xt, gt, mode, padding_mode, align_corners):
    """grid_sample of Duals: torch's value, and ``ẏ = J_x·ẋ + J_grid·ġ`` slot by slot with the
    Jacobians of torch's own backward (its forward mode has no rule)."""
    sample = lambda x_, g_: F.grid_sample(x_, g_, mode, padding_mode, align_corners)
    out = sample(Dual(x, xt), Dual(grid, gt))
    y = sample(x, grid)
    jx, jg = torch.autograd.functional.jacobian(sample, (x, grid))
    expected = torch.stack([(jx.flatten(y.dim()) @ xt[s].flatten()
                             + jg.flatten(y.dim()) @ gt[s].flatten()).view_as(y)
                            for s in range(xt.shape[0])])
    torch.testing.assert_close(out.primal, y, rtol=0, atol=0)
    torch.testing.assert_close(out.tangents, expected, **TOL[torch.float64])


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("padding_mode", ["zeros", "border", "reflection"])
@pytest.mark.parametrize("mode", ["bilinear", "nearest", "bicubic"])
def test_grid_sample_matches_torch_s_own_derivatives(mode, padding_mode, align_corners):
    """Every mode, padding mode and corner alignment, at points inside and outside the input,
    against the Jacobian of torch's own backward of grid_sample (its forward mode has no rule):
    ``ẏ = J_x·ẋ + J_grid·ġ``, slot by slot."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    grid = torch.rand(2, 4, 3, 2, dtype=torch.float64) * 2.4 - 1.2
    xt, gt = torch.randn(2, *x.shape, dtype=torch.float64), torch.randn(2, *grid.shape,
                                                                         dtype=torch.float64)
    _assert_grid_sample_is_torch_s(x, grid, xt, gt, mode, padding_mode, align_corners)


def _identity_grid(shape, align_corners: bool) -> torch.Tensor:
    """affine_grid's identity: every pixel centre (corners aligned: the borders among them)."""
    d = len(shape) - 2
    theta = torch.eye(d, d + 1, dtype=torch.float64).expand(shape[0], d, d + 1)
    return F.affine_grid(theta, list(shape), align_corners=align_corners)


@pytest.mark.parametrize("dims", [2, 3], ids=["2-d", "3-d"])
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("padding_mode", ["zeros", "border", "reflection"])
@pytest.mark.parametrize("mode", ["bilinear", "nearest", "bicubic"])
def test_grid_sample_on_the_identity_grid_has_torch_s_derivative(mode, padding_mode,
                                                                align_corners, dims):
    """A spatial transformer's usual start: the identity grid, whose points sit on pixel
    centres and, corners aligned, on the borders. Both terms are the Jacobian of torch's own
    backward, the grid's at border points included (the decomposition's clamp passed the
    tangent there: a slope towards a zero pixel past the border, ±32 where torch has 0), in
    3-d too (its grid tangent was refused). bicubic is 2-d only, as in torch."""
    if dims == 3 and mode == "bicubic":
        pytest.skip("torch samples 3-d grids bilinearly or nearest only")
    torch.manual_seed(0)
    shape = (1, 2, 3, 4, 5)[:dims + 2]
    x = torch.arange(math.prod(shape), dtype=torch.float64).view(shape).square() / 10
    grid = _identity_grid(shape, align_corners)
    xt = torch.randn(2, *x.shape, dtype=torch.float64)
    gt = torch.randn(2, *grid.shape, dtype=torch.float64)
    _assert_grid_sample_is_torch_s(x, grid, xt, gt, mode, padding_mode, align_corners)


@pytest.mark.parametrize("p", [0.5, 1.0, 1.5, 2.0, 3.0])
def test_cdist_where_coordinates_coincide_matches_torch_s_backward(p):
    """Rows that share some coordinates (a difference of 0 there, where |Δ|^(p−1) is infinite
    for p < 1) and a row against itself: against the Jacobian of torch's own backward."""
    a = torch.tensor([[1.0, 2.0, -1.0], [0.5, 0.0, 3.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.0, 3.0], [2.0, 1.0, 0.0]], dtype=torch.float64)
    at, bt = torch.randn(2, *a.shape, dtype=torch.float64), torch.randn(2, *b.shape,
                                                                        dtype=torch.float64)
    out = torch.cdist(Dual(a, at), Dual(b, bt), p)
    ja, jb = torch.autograd.functional.jacobian(lambda a_, b_: torch.cdist(a_, b_, p), (a, b))
    expected = torch.stack([(ja.flatten(2) @ at[s].flatten() + jb.flatten(2) @ bt[s].flatten())
                            for s in range(2)])
    torch.testing.assert_close(out.tangents, expected, **TOL[torch.float64])


def test_cdist_by_products_with_bfloat16_tangents_cancels_in_float32():
    """Rows far from the origin, near one another: the products' form of ``Δ·Δ̇`` cancels, and
    must do so in the primal's float32, not in the tangents' bfloat16 (there: 7% off)."""
    from unittest import mock

    from fgkernels.rules import distances
    torch.manual_seed(0)
    a, b = torch.randn(64, 32) + 30, torch.randn(48, 32) + 30
    at = torch.randn(1, *a.shape).bfloat16()
    with mock.patch.object(distances, "EXACT_BUDGET", 0):
        out = torch.cdist(Dual(a, at), b)
    definition = lambda a_: torch.linalg.vector_norm(a_[:, None] - b.double()[None], dim=-1)
    _, expected = torch.func.jvp(definition, (a.double(),), (at[0].double(),))
    assert rel_err(out.tangents[0].double(), expected) < 0.01


def test_embedding_bag_max_picks_the_primal_s_maximum_for_narrow_tangents():
    """The row of each maximum is found in the float32 weight, not in its bfloat16 cast (where
    1.0 and 1.001 tie)."""
    weight, wt = torch.tensor([[1.0], [1.001]]), torch.tensor([[[10.0], [20.0]]]).bfloat16()
    out = F.embedding_bag(torch.tensor([0, 1]), Dual(weight, wt), torch.tensor([0]), mode="max")
    assert out.tangents.item() == 20


def test_ctc_loss_in_inference_mode():
    """Under torch.inference_mode (whose tensors autograd refuses) the CTC tangent is the one
    computed outside it."""
    torch.manual_seed(0)
    lp = torch.randn(6, 2, 4, dtype=torch.float64).log_softmax(-1)
    lpt = torch.randn(2, 6, 2, 4, dtype=torch.float64)
    args = (torch.tensor([[1, 2], [3, 1]]), torch.tensor([6, 6]), torch.tensor([2, 2]))
    expected = F.ctc_loss(Dual(lp, lpt), *args)
    with torch.inference_mode():
        inside = F.ctc_loss(Dual(lp.clone(), lpt.clone()),
                            *(t.clone() for t in args))
    torch.testing.assert_close(inside.tangents, expected.tangents, rtol=0, atol=0)


def test_grid_sample_warns_of_align_corners_once():
    x, grid = torch.randn(1, 1, 3, 3), torch.rand(1, 2, 2, 2) * 2 - 1
    with pytest.warns(UserWarning, match="align_corners") as record:
        F.grid_sample(Dual(x, torch.randn(1, *x.shape)), grid)
    assert len([w for w in record if "align_corners" in str(w.message)]) == 1


@pytest.mark.parametrize("name,args,torch_fn", [
    ("relu", (), torch.relu), ("clamp", (-0.1, 0.1), torch.clamp),
    ("flatten", (), torch.flatten), ("reshape", ((3, 2),), torch.reshape),
], ids=["relu", "clamp by numbers", "flatten", "reshape"])
def test_the_functional_face_takes_a_plain_tensor(name, args, torch_fn):
    """As fgkernels.functional says: a plain tensor is a Dual of zero tangent, and the result a
    Dual of torch's value without tangent (number bounds, flatten and reshape read .primal)."""
    x = torch.randn(2, 3, dtype=torch.float64)
    out = getattr(DF, name)(x, *args)
    assert isinstance(out, Dual) and out.tangents is None
    assert torch.equal(out.primal, torch_fn(x, *args))


@pytest.mark.parametrize("which", ["weight", "bias", "both"])
@pytest.mark.parametrize("norm", [
    lambda x, w, b: F.group_norm(x, 2, w, b),
    lambda x, w, b: F.layer_norm(x, (6, 3), w.unsqueeze(-1).expand(6, 3),
                                 b.unsqueeze(-1).expand(6, 3)),
    lambda x, w, b: F.instance_norm(x, weight=w, bias=b),
    lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True),
    lambda x, w, b: F.rms_norm(x, (6, 3), w.unsqueeze(-1).expand(6, 3)) + b.view(6, 1),
], ids=["group_norm", "layer_norm", "instance_norm", "batch_norm", "rms_norm"])
def test_norms_take_a_weight_and_bias_of_any_strides(norm, which):
    """A norm's weight and bias may be strided views (every other element of a shared
    parameter, an expanded one): group norm's kernel read them as contiguous (its primal was
    computed with the storage's first elements, 7 off); every norm against forward_ad, the
    parameters with tangents."""
    torch.manual_seed(0)
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    w, b = (torch.randn(12, dtype=torch.float64) for _ in range(2))
    strided = lambda v, s: v[::2] if which in (s, "both") else v[:6].clone()
    w, b = strided(w, "weight"), strided(b, "bias")
    xt, wt, bt = torch.randn_like(x), torch.randn(6, dtype=x.dtype), torch.randn(6, dtype=x.dtype)
    out = norm(Dual(x, xt), Dual(w, wt), Dual(b, bt))
    check(out, norm, [x, w, b], [xt, wt, bt])
