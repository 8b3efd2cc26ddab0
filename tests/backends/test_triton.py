"""The Triton kernels against torch's forward-mode AD in float64, at tiny shapes: on a GPU, and
on the CPU in Triton's interpreter (which computes dots in float32, where a GPU uses TF32).

A result in a dtype d passes when its error against the float64 oracle is at most twice the
error of torch's own forward-mode AD in d plus a small floor (``err <= 2·err_torch + atol``).
The launch-plan tests run the launcher on ``meta`` tensors and look at the launches it makes.
"""
import copy
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fgkernels
import fgkernels.functional as DF
from fgkernels import Dual
from fgkernels.backends.triton.conv import combine_tile_stats, dual_conv2d
from fgkernels.backends.triton.precision import cudnn_conv_fp32_precision
from fgkernels.dual.layout import empty_slots
from fgkernels.testing import compare_with_forward_ad, forward_ad_jvp, model_jvp, round_to_tf32

from helpers import ForwardADOracle, assert_within_torch_error, rel_err

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
from kernel_report import captured_launches  # noqa: E402

pytestmark = [pytest.mark.triton,
              pytest.mark.skipif("triton" not in fgkernels.available_backends(),
                                 reason="Triton cannot run here")]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rand(*shape, dtype=torch.float64):
    return torch.randn(*shape, device=DEVICE, dtype=dtype)


def in_layout(t, channels_last):
    """t (a tensor, or a stack of slots) laid out channels_last, each slot so."""
    if not channels_last or t.dim() < 4:
        return t
    if t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    return t.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)


def check_against_forward_ad(out, fn, primals, tangents):
    """``out`` (a Dual) against ``fn``'s forward_ad in float64, within twice the error of
    forward_ad in out's dtypes (the primal's for the primal, the tangents' for the tangents:
    torch takes no tangent narrower than its primal), or of TF32 products where they are allowed
    (``helpers.assert_within_torch_error``)."""
    oracle = ForwardADOracle(fn, primals, tangents)
    tf32 = None
    if out.primal.is_cuda and cudnn_conv_fp32_precision() == "tf32":
        # The kernels' float32 products are TF32 where cuDNN's may be (cuDNN does not always
        # take a TF32 kernel), on operands the tensor cores truncate: the floor is the product
        # of truncated operands (about 2.6 times cuDNN's rounded TF32 error).
        truncated = ForwardADOracle(fn, [round_to_tf32(t, truncate=True) for t in primals],
                                      [round_to_tf32(t, truncate=True) for t in tangents])
        tf32 = lambda dt: truncated(torch.float32) if dt == torch.float32 else oracle(dt)
    assert_within_torch_error(out, oracle, also=tf32)


def check_network_against_forward_ad(out, model, x, xt, tangents):
    """A network's dual pass ``out`` against forward_ad of ``model`` (its tangents by parameter
    name) in float64, within twice torch's own float32 error; where TF32 is allowed on a GPU,
    within TF32's relative error (1e-2): the kernels truncate their operands where cuDNN
    rounds them, and no torch pass of a whole network rounds as they do."""
    oracle = lambda dt: model_jvp(copy.deepcopy(model).to(dt), [x.to(dt)], [xt.to(dt)],
                                  {n: t.to(dt) for n, t in tangents.items()})
    if out.primal.is_cuda and cudnn_conv_fp32_precision() == "tf32":
        y, yt = oracle(torch.float64)
        assert rel_err(out.primal, y) <= 1e-2 and rel_err(out.tangents, yt) <= 1e-2
    else:
        assert_within_torch_error(out, oracle)


CONV_CASES = [
    # (N, C, H, W, C_out, k, stride, padding, dilation, bias)
    (2, 3, 7, 6, 5, 3, 1, 1, 1, True),
    (1, 4, 9, 9, 6, 3, 2, 0, 1, False),
    (3, 2, 8, 5, 4, (3, 1), (2, 1), (1, 0), 1, True),
    (2, 3, 9, 9, 3, 3, 1, 2, 2, True),
    (2, 5, 5, 5, 17, 1, 1, 0, 1, True),  # ragged channel tile
]
# role -> (input slots, parameter slots, appended): the parameters' slots are the input's
# ("same"), follow them ("appended"), or stand alone.
ROLES = {"input": (1, 0, False), "param": (0, 1, False), "same": (3, 3, False),
         "appended": (2, 1, True)}


def conv_args(x, w, b, xt, wt, bt, appended):
    """Duals for ``DF.conv2d``; ``appended``: the parameters' directions after the input's."""
    if not appended:
        return Dual(x, xt), Dual(w, wt), None if b is None else Dual(b, bt)
    tx, tp = xt.shape[0], wt.shape[0]
    params = list(range(tx, tx + tp))
    return (Dual(x, xt, directions=list(range(tx))), Dual(w, wt, directions=params),
            None if b is None else Dual(b, bt, directions=params))


def padded_tangents(xt, wt, bt, appended):
    """The oracle's tangents: appended slots are the input's, then the parameters' (zeros
    where an operand has no slot)."""
    if not appended:
        return xt, wt, bt
    zeros = lambda t, n: t.new_zeros((n, *t.shape[1:]))
    tx, tp = xt.shape[0], wt.shape[0]
    return (torch.cat([xt, zeros(xt, tp)]), torch.cat([zeros(wt, tx), wt]),
            None if bt is None else torch.cat([zeros(bt, tx), bt]))


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("role", list(ROLES))
def test_conv_matches_forward_ad(case, channels_last, role):
    N, C, H, W, Co, k, s, p, d, has_b = case
    k2 = (k, k) if isinstance(k, int) else k
    tx, tp, appended = ROLES[role]
    x, w, b = rand(N, C, H, W), rand(Co, C, *k2), rand(Co) if has_b else None
    xt = rand(tx, N, C, H, W) if tx else None
    wt = rand(tp, Co, C, *k2) if tp else None
    bt = rand(tp, Co) if tp and has_b else None
    f32 = lambda t: None if t is None else in_layout(t.float(), channels_last)
    with fgkernels.use_backend("triton"):
        out = DF.conv2d(*conv_args(f32(x), f32(w), f32(b), f32(xt), f32(wt), f32(bt), appended),
                        s, p, d)
    if channels_last:
        assert out.primal.is_contiguous(memory_format=torch.channels_last)
    fn = lambda x_, w_, b_: F.conv2d(x_, w_, b_, s, p, d)
    check_against_forward_ad(out, fn, [x, w, b], list(padded_tangents(xt, wt, bt, appended)))


def test_bias_tangent_alone():
    """Parameter slots whose only tangent is the bias's take no product: ẏ = ḃ everywhere."""
    x, w, b, bt = rand(2, 3, 6, 5), rand(4, 3, 3, 3), rand(4), rand(2, 4)
    with fgkernels.use_backend("triton"):
        out = DF.conv2d(Dual(x.float()), w.float(), Dual(b.float(), bt.float()), 1, 1)
    check_against_forward_ad(out, lambda x_, w_, b_: F.conv2d(x_, w_, b_, 1, 1), [x, w, b],
                              [None, None, bt])


@pytest.mark.parametrize("bias_view", ["strided", "expanded"])
def test_a_bias_and_its_tangent_are_read_where_they_lie(bias_view):
    """A bias (and its tangent) that is a strided slice, or one value expanded over the
    channels, is read at its own strides (the kernel took the channels at unit stride)."""
    x, w, xt, wt = rand(2, 3, 5, 4), rand(4, 3, 3, 3), rand(1, 2, 3, 5, 4), rand(1, 4, 3, 3, 3)
    if bias_view == "strided":
        b32, bt32 = rand(8).float()[::2], rand(1, 8).float()[:, ::2]
    else:
        b32, bt32 = rand(1).float().expand(4), rand(1, 1).float().expand(1, 4)
    assert b32.stride(-1) != 1 and bt32.stride(-1) != 1
    with fgkernels.use_backend("triton"):
        out = DF.conv2d(Dual(x.float(), xt.float()), Dual(w.float(), wt.float()),
                        Dual(b32, bt32), 1, 1)
    b, bt = b32.double(), bt32.double()
    check_against_forward_ad(out, lambda x_, w_, b_: F.conv2d(x_, w_, b_, 1, 1), [x, w, b],
                              [xt, wt, bt])


@pytest.mark.parametrize("role", ["input", "same", "appended"])
def test_bn_sum_epilogue_gives_batch_statistics(role):
    """The tile sums of the primal and tangent launches combine into the float64 statistics of
    the stored outputs (several row tiles: 3·7·5 rows)."""
    tx, tp, appended = ROLES[role]
    x, w = rand(3, 4, 7, 5, dtype=torch.float32), rand(6, 4, 3, 3, dtype=torch.float32)
    xt = rand(tx, *x.shape, dtype=torch.float32)
    wt = rand(tp, *w.shape, dtype=torch.float32) if tp else None
    x_pos = tuple(range(tx))
    p_pos = tuple(range(tx, tx + tp)) if appended else x_pos[:tp]
    count = tx + tp if appended else tx
    y, yt, tiles = dual_conv2d(x, xt, w, wt, None, None, x_pos, p_pos, count, (1, 1), (1, 1),
                               (1, 1), bn_stats=True)
    assert tiles[0].shape[0] > 1
    mean, var, tmean, tcov = combine_tile_stats(*tiles, torch.float64)
    y64, yt64 = y.double(), yt.double()
    torch.testing.assert_close(mean, y64.mean((0, 2, 3)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var, y64.var((0, 2, 3), unbiased=False), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tmean, yt64.mean((1, 3, 4)), rtol=1e-5, atol=1e-5)
    cov = ((y64 - y64.mean((0, 2, 3), keepdim=True)) * yt64).mean((1, 3, 4))
    torch.testing.assert_close(tcov, cov, rtol=1e-5, atol=1e-5)


def test_bn_sums_of_a_channel_far_from_zero_keep_float32_s_precision():
    """A channel whose mean (about 1000) is large beside its spread (about 2), and a tangent
    whose mean (300) is large too: the primal launch sums the square centred in the tile, so
    the merged variance of the stored outputs keeps float32's precision (Σ(y − ȳ_tile)·y kept
    the rounding of ȳ_tile times n·ȳ_tile); the tangent's sums centre both factors and merge
    as co-moments, so the covariance is within a few of float32's roundings of its scale
    σ_y·σ_ẏ (an uncentred tangent kept the batch mean's rounding times ẏ̄: 1e-3 of it here,
    a conv-BN layer's tangent 1e-2 off where torch's own is 1e-5)."""
    x, w = rand(2, 4, 6, 6, dtype=torch.float32), rand(4, 4, 3, 3, dtype=torch.float32)
    b = torch.full((4,), 1000.0, device=DEVICE)
    xt = rand(1, *x.shape, dtype=torch.float32)
    bt = torch.full((1, 4), 300.0, device=DEVICE)  # the tangent's mean large too
    y, yt, tiles = dual_conv2d(x, xt, w, None, b, bt, (0,), (0,), 1, (1, 1), (1, 1), (1, 1),
                               bn_stats=True)
    assert tiles[0].shape[0] > 1
    mean, var, tmean, tcov = combine_tile_stats(*tiles, torch.float64)
    y64, yt64 = y.double(), yt.double()
    torch.testing.assert_close(var, y64.var((0, 2, 3), unbiased=False), rtol=1e-5, atol=0)
    cov = ((y64 - y64.mean((0, 2, 3), keepdim=True)) * yt64).mean((1, 3, 4))
    scale = var.sqrt() * yt64.std((1, 3, 4))  # the covariance's own scale: σ_y·σ_ẏ
    assert ((tcov - cov).abs() / scale).max() < 1e-5


BN_SLOTS = ["dense2", "appended", "bn_only", "none"]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("slots", BN_SLOTS)
def test_fused_conv_bn_relu_matches_forward_ad(training, channels_last, slots):
    x, w = rand(3, 3, 6, 5), rand(5, 3, 3, 3)
    g, beta = torch.rand(5, device=DEVICE, dtype=torch.float64) + 0.5, rand(5)
    rm, rv = rand(5) * 0.1, torch.rand(5, device=DEVICE, dtype=torch.float64) + 0.5
    xt = rand(2, *x.shape) if slots in ("dense2", "appended") else None
    wt = rand(2 if slots == "dense2" else 1, *w.shape) if slots in ("dense2", "appended") \
        else None
    gt = rand(2, 5) if slots in ("dense2", "bn_only") else rand(1, 5) \
        if slots == "appended" else None
    bt = None if gt is None else rand(*gt.shape)
    f32 = lambda t: None if t is None else in_layout(t.float(), channels_last)
    if slots == "appended":  # input directions {0, 1}, the parameters' {2}
        xd = Dual(f32(x), f32(xt), directions=[0, 1])
        wd = Dual(f32(w), f32(wt), directions=[2])
        gd, bd = (Dual(f32(g), f32(gt), directions=[2]), Dual(f32(beta), f32(bt), directions=[2]))
    else:
        xd, wd = Dual(f32(x), f32(xt)), Dual(f32(w), f32(wt))
        gd, bd = (Dual(f32(g), f32(gt)), Dual(f32(beta), f32(bt))) if gt is not None else \
            (f32(g), f32(beta))
    stats = (rm.float(), rv.float())
    with fgkernels.use_backend("triton"):
        out = DF.conv2d_batch_norm(xd, wd, None, (1, 1), (1, 1), (1, 1), 1, *stats, gd, bd,
                                   training, 0.1, 1e-5, True)

    def fn(x_, w_, g_, b_):
        y = F.conv2d(x_, w_, None, 1, 1)
        return F.relu(F.batch_norm(y, rm.to(y.dtype).clone(), rv.to(y.dtype).clone(), g_, b_,
                                   training, 0.1, 1e-5))

    tol = 1e-4 if DEVICE == "cpu" else 1e-2  # TF32 products on a GPU
    if slots == "none":
        assert out.tangent is None
        torch.testing.assert_close(out.primal.double(), fn(x, w, g, beta), rtol=tol, atol=tol)
    else:
        tangents = [xt, wt, gt, bt]
        if slots == "appended":  # slots 0, 1 the input's, slot 2 the parameters'
            pad = lambda t, before, after: torch.cat([t.new_zeros((before, *t.shape[1:])), t,
                                                      t.new_zeros((after, *t.shape[1:]))])
            tangents = [pad(xt, 0, 1), pad(wt, 2, 0), pad(gt, 2, 0), pad(bt, 2, 0)]
        check_against_forward_ad(out, fn, [x, w, g, beta], tangents)
    if training:  # the running statistics, updated once from the primal as nn.BatchNorm2d does
        mean = F.conv2d(x, w, None, 1, 1).mean((0, 2, 3))
        torch.testing.assert_close(stats[0].double(), 0.9 * rm + 0.1 * mean, rtol=tol, atol=tol)


def test_sequential_runs_fused_on_triton():
    net = fgkernels.convert(torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=2), torch.nn.BatchNorm2d(4),
        torch.nn.ReLU()).to(DEVICE))
    x = rand(2, 3, 7, 7, dtype=torch.float32)
    xt = rand(2, *x.shape, dtype=torch.float32)
    tangents = fgkernels.random_tangents(net, 2)
    before = copy.deepcopy(net)  # the oracle's: forward_ad through torch's own layers
    with fgkernels.use_backend("triton"):  # groups=2 routes to the native backend
        out = net(Dual(x, xt))
    check_network_against_forward_ad(out, before, x, xt, tangents)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_low_precision_conv_within_torch_error(dtype, channels_last):
    """A whole-16-bit convolution (NCHW operands are brought to channels_last, channels padded
    to 16): err <= 2·err(forward_ad in the same dtype) + atol."""
    if DEVICE == "cpu" and dtype == torch.float16:
        pytest.skip("float16 convolution has no CPU kernel in torch")
    x, w = rand(2, 4, 6, 6), rand(5, 4, 3, 3)
    xt, wt = rand(1, *x.shape), rand(1, *w.shape)
    low = lambda t: in_layout(t.to(dtype), channels_last)
    with fgkernels.use_backend("triton"):
        out = DF.conv2d(Dual(low(x), low(xt)), Dual(low(w), low(wt)), None, 1, 1)
    assert out.primal.dtype == dtype == out.tangents.dtype
    check_against_forward_ad(out, lambda x_, w_: F.conv2d(x_, w_, None, 1, 1), [x, w],
                              [xt, wt])


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("role", ["param", "same"])
def test_bfloat16_tangents_of_a_float32_conv_bn_relu(channels_last, role):
    """bfloat16 slots of a float32 primal (the parameter slots' x cast once, the input slots'
    W likewise): the primal within float32's error, the slots within bfloat16's."""
    x, w = rand(2, 4, 6, 6), rand(5, 4, 3, 3)
    xt = rand(2, *x.shape) if role == "same" else None
    wt = rand(2, *w.shape)

    def fn(x_, w_):
        return F.relu(F.batch_norm(F.conv2d(x_, w_, None, 1, 1), None, None, None, None, True))

    f32 = lambda t: in_layout(t.float(), channels_last)
    bf16 = lambda t: None if t is None else in_layout(t.bfloat16(), channels_last)
    with fgkernels.use_backend("triton"):
        out = DF.conv2d_batch_norm(Dual(f32(x), bf16(xt)), Dual(f32(w), bf16(wt)), None, 1, 1,
                                   1, 1, None, None, None, None, True, 0.1, 1e-5, True)
    assert out.tangents.dtype == torch.bfloat16 and out.primal.dtype == torch.float32
    check_against_forward_ad(out, fn, [x, w], [xt, wt])


def test_bn_relu_apply_keeps_nan_and_its_tangent():
    """As torch.relu, its derivative and the native kernels: a NaN stays in the primal and its
    tangent is not zeroed (it is NaN too, through the NaN in the x-term); a NaN tangent where
    the output is <= 0 gives 0, and so does any tangent where the output is exactly 0 (the
    kink, where torch's derivative is 0)."""
    from fgkernels.backends.triton.batch_norm import dual_bn_relu_apply_
    y = torch.tensor([[[[float("nan"), -1.0, 2.0, 0.0]]]], device=DEVICE)
    yt = torch.tensor([[[[[5.0, float("nan"), 1.0, 3.0]]]]], device=DEVICE)
    one, zero = torch.ones(1, device=DEVICE), torch.zeros(1, device=DEVICE)
    dual_bn_relu_apply_(y, yt, zero, one, zero, zero[None], zero[None], relu=True)
    assert torch.isnan(y[0, 0, 0, 0]) and y.flatten()[1:].tolist() == [0.0, 2.0, 0.0]
    assert torch.isnan(yt[0, 0, 0, 0, 0]) and yt.flatten()[1:].tolist() == [0.0, 1.0, 0.0]


@pytest.mark.parametrize("value", [float("inf"), -float("inf"), float("nan")])
def test_fused_conv_bn_spreads_a_non_finite_tangent_as_forward_ad(value):
    """One non-finite value in the input's tangent reaches every channel of the convolution;
    the batch norm's tangent is then NaN across them, as forward_ad's (its covariance centres ẋ
    by its mean: Inf − Inf), which the tile co-moments give too (each centred by its tile's
    mean): not a mix of ±Inf and NaN."""
    x, w = rand(2, 3, 6, 5), rand(4, 3, 3, 3)
    xt = rand(1, *x.shape)
    xt[0, 1, 2, 3, 2] = value
    with fgkernels.use_backend("triton"):
        out = DF.conv2d_batch_norm(Dual(x.float(), xt.float()), w.float(), None, 1, 1, 1, 1,
                                   None, None, None, None, True, 0.1, 1e-5, False)
    _, expected = forward_ad_jvp(lambda x_: F.batch_norm(F.conv2d(x_, w, None, 1, 1), None,
                                                         None, training=True), [x], [xt])
    assert expected.isnan().all()
    assert out.tangents.isnan().all()


@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck(channels_last):
    """The Triton ops as torch.library checks a registered op: schema, fake against the
    kernel's outputs (shapes, strides, dtypes), traced by AOTAutograd; every slot role."""
    x, w, b = (in_layout(rand(2, 3, 5, 4, dtype=torch.float32), channels_last),
               rand(4, 3, 3, 3, dtype=torch.float32), rand(4, dtype=torch.float32))
    xt = in_layout(rand(2, *x.shape, dtype=torch.float32), channels_last)
    wt, bt = rand(2, *w.shape, dtype=torch.float32), rand(2, 4, dtype=torch.float32)
    geometry = ([1, 1], [1, 1], [1, 1])
    conv = torch.ops.fgkernels_triton.dual_conv2d
    cases = [
        (conv, (x, xt, w, wt, b, bt, [0, 1], [0, 1], 2, *geometry, True)),   # same slots
        (conv, (x, xt, w, wt, b, bt, [0, 1], [2, 3], 4, *geometry, True)),   # appended
        (conv, (x, None, w, wt, None, None, [], [0, 1], 2, *geometry, False)),
        (conv, (x, None, w, None, b, bt, [], [0, 1], 2, *geometry, True)),  # bias slots only
        (conv, (x, xt[:1], w, None, None, None, [0], [], 1, [2, 1], [0, 1], [1, 1], False)),
    ]
    y = conv(x, xt, w, None, None, None, [0, 1], [], 2, *geometry, False)[0]
    center, scale, shift = (rand(4, dtype=torch.float32) for _ in range(3))
    t_xscale, t_shift = rand(2, 4, dtype=torch.float32), rand(2, 4, dtype=torch.float32)
    apply_ = torch.ops.fgkernels_triton.dual_bn_apply_
    ys = empty_slots(2, y).copy_(rand(2, *y.shape))
    cases += [(apply_, (y.clone(), ys, center, scale, shift, t_xscale, t_shift, True)),
              (apply_, (y.clone(), None, center, scale, shift, t_xscale[:0], t_shift[:0],
                        False))]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_apply_op_refuses_coefficients_inside_what_it_writes():
    """The in-place apply reads its coefficients while it writes x and its slots: one held in
    either is refused, as the native op refuses it (it was read as it was overwritten)."""
    y, ys = rand(2, 4, 3, 3, dtype=torch.float32), rand(1, 2, 4, 3, 3, dtype=torch.float32)
    coefficients = [rand(4, dtype=torch.float32) for _ in range(3)] + \
        [rand(1, 4, dtype=torch.float32) for _ in range(2)]
    for k, inside in ((0, y.view(-1)[:4]), (4, ys.view(-1)[:4].view(1, 4))):
        args = list(coefficients)
        args[k] = inside
        with pytest.raises(RuntimeError, match="share memory"):
            torch.ops.fgkernels_triton.dual_bn_apply_(y, ys, *args, False)


def test_conv_op_refuses_what_it_does_not_serve():
    """A slot layout the kernel does not lay out is refused with the layout named (the
    backend asks ``serves`` first and falls back)."""
    from fgkernels.backends.triton.ops import serves
    x, w = rand(1, 2, 4, 4, dtype=torch.float32), rand(3, 2, 3, 3, dtype=torch.float32)
    xt = rand(2, *x.shape, dtype=torch.float32)
    args = (x, xt, w, None, None, None, [1, 0], [], 2, [1, 1], [1, 1], [1, 1], False)
    assert not serves(x, w, [1, 0], [], 2, [1, 1], [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match=r"got x_pos \[1, 0\], p_pos \[\], count 2"):
        torch.ops.fgkernels_triton.dual_conv2d(*args)


def _raw_conv_calls():
    x, w = rand(2, 3, 5, 4, dtype=torch.float32), rand(4, 3, 3, 3, dtype=torch.float32)
    g = ([1, 1], [1, 1], [1, 1])
    return [  # (what, the call's arguments, the refusal's words)
        ("an xt of another batch", (x, rand(1, 1, 3, 5, 4, dtype=torch.float32), w, None, None,
                                    None, [0], [], 1, *g, False), "xt must have shape"),
        ("a bias of 2 for 4 channels", (x, None, w, None, rand(2, dtype=torch.float32), None,
                                        [], [], 0, *g, False), "bias has shape"),
        ("integers", (x.int(), None, w.int(), None, None, None, [], [], 0, *g, False),
         "floating"),
        ("float64", (x.double(), None, w.double(), None, None, None, [], [], 0, *g, False),
         "float32, bfloat16 or float16"),
        ("a negative padding", (x, None, w, None, None, None, [], [], 0, [1, 1], [-1, -1],
                                [1, 1], False), "padding must be"),
        ("a weight tangent of another shape", (x, None, w, rand(1, 4, 3, 1, 1,
                                                                dtype=torch.float32),
                                               None, None, [], [0], 1, *g, False),
         "wt must have shape"),
        ("a kernel wider than the padded input", (x[..., :2, :2], None, w, None, None, None,
                                                  [], [], 0, [1, 1], [0, 0], [1, 1], False),
         "Kernel size can't be greater"),
        # (the kernel failed inside Triton on tangents of two dtypes, and computed bfloat16
        # x's with float32 tangents, which the native op refuses)
        ("tangents of two dtypes", (x, rand(1, *x.shape, dtype=torch.bfloat16), w,
                                    rand(1, *w.shape, dtype=torch.float16), None, None,
                                    [0], [0], 1, *g, False),
         "the tangents of one call must share one dtype, got xt torch.bfloat16, wt "
         "torch.float16"),
        ("tangents wider than x", (x.bfloat16(), rand(1, *x.shape, dtype=torch.float32),
                                   w.bfloat16(), None, None, None, [0], [], 1, *g, False),
         "the tangents must have x's dtype torch.bfloat16 or one of fewer bits, got "
         "torch.float32"),
        # (positions naming absent tangents returned an unwritten yt, or failed in the launcher)
        ("x_pos without xt", (x, None, w, None, None, None, [0], [], 1, *g, False),
         "x_pos [0] names slots of xt, which is None"),
        ("p_pos without wt or bt", (x, None, w, None, None, None, [], [0], 1, *g, False),
         "p_pos [0] names slots of wt and bt, which are None"),
        ("no input channels", (x[:, :0], None, w[:, :0], None, None, None, [], [], 0, *g,
                               False), "x has no channels"),
    ]


@pytest.mark.parametrize("what, args, words", _raw_conv_calls(),
                         ids=[c[0] for c in _raw_conv_calls()])
def test_conv_op_checks_its_operands_eager_and_fake(what, args, words):
    """Called directly, the op refuses what its launcher would read out of bounds or compute
    wrong, with the argument named, before any launch; its fake refuses the same."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    op = torch.ops.fgkernels_triton.dual_conv2d
    with pytest.raises((RuntimeError, ValueError, TypeError), match=re.escape(words)):
        op(*args)
    with FakeTensorMode() as mode, \
            pytest.raises((RuntimeError, ValueError, TypeError), match=re.escape(words)):
        op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])


def test_apply_op_checks_its_operands():
    """Called directly, the in-place apply refuses a strided x (it wrote past the view), slots
    of another shape (it wrote out of bounds) or laid out otherwise, slots on x's memory, and
    coefficients of another channel or slot count (a crash), each named, before it writes."""
    y, ys = rand(2, 4, 3, 3, dtype=torch.float32), rand(1, 2, 4, 3, 3, dtype=torch.float32)
    c = [rand(4, dtype=torch.float32) for _ in range(3)]
    t = [rand(1, 4, dtype=torch.float32) for _ in range(2)]
    apply_ = torch.ops.fgkernels_triton.dual_bn_apply_
    before = y.clone(), ys.clone()
    calls = [
        ((rand(2, 4, 3, 6, dtype=torch.float32)[..., ::2], None, *c, *(v[:0] for v in t)),
         "x must be contiguous or channels_last"),
        ((y, rand(1, 2, 4, 3, 2, dtype=torch.float32), *c, *t), "xt must be"),
        ((y, ys.transpose(-1, -2), *c, *t), "laid out as x"),
        ((y, y[None], *c, *t), "x and xt share memory"),
        ((y.bfloat16(), ys, *c, *t), "xt must have x's dtype torch.bfloat16 or one of fewer bits"),
        ((y, ys, rand(2, dtype=torch.float32), *c[1:], *t), "must have shape (4,)"),
        ((y, ys, *c, *(v[:0] for v in t)), "must have shape (1, 4)"),
    ]
    for args, words in calls:
        with pytest.raises(RuntimeError, match=re.escape(words)):
            apply_(*args, False)
    assert torch.equal(y, before[0]) and torch.equal(ys, before[1])


def test_a_conv_bn_the_kernel_does_not_serve_is_the_native_one_whole():
    """A float64 Conv→BN→ReLU on the Triton backend: the convolution falls back to the native
    op, and so does the in-place apply after it (the Triton apply, which computes in float32,
    bfloat16 or float16, refused it), against forward_ad."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4),
                                torch.nn.ReLU()).double()
    model = fgkernels.convert(model).to(DEVICE)
    x = rand(2, 3, 5, 5)
    with fgkernels.use_backend("triton"):
        result = compare_with_forward_ad(model, x)
    assert result["primal"] < 1e-13 and result["tangent"] < 1e-12


def test_a_kernel_wider_than_the_padded_input_is_refused_as_torch_refuses_it():
    """The backend leaves such a call to the native op, whose refusal is at::conv2d's (the
    kernel made an empty output, or a negative size's error, before)."""
    x, w = Dual(rand(1, 3, 2, 2, dtype=torch.float32), rand(1, 3, 2, 2, dtype=torch.float32)), \
        rand(4, 3, 3, 3, dtype=torch.float32)
    with fgkernels.use_backend("triton"):
        for dilation in (1, 3):
            with pytest.raises(RuntimeError, match="Calculated padded input size per channel"):
                F.conv2d(x, w, dilation=dilation)


# --- the launches the launcher makes (on meta tensors) ------------------------------------------
def meta_launches(*, x_shape=(256, 64, 56, 56), c_out=64, k=3, tx=1, tp=1, same=True,
                  bn_stats=True, dtype=torch.float32, tangent_dtype=None, precision="tf32",
                  arch=90):
    """The kernel launches ``dual_conv2d`` makes on sm_``arch`` for a call on meta tensors,
    and its result."""
    from fgkernels.backends.triton.conv_kernel import _dual_conv2d_forward_kernel
    from fgkernels.backends.triton.target import assumed_target
    tangent_dtype = tangent_dtype or dtype
    meta = lambda *s, dt=dtype: torch.empty(s, device="meta", dtype=dt)
    N, C, H, W = x_shape
    xt = meta(tx, *x_shape, dt=tangent_dtype) if tx else None
    wt = meta(tp, c_out, C, k, k, dt=tangent_dtype) if tp else None
    x_pos = tuple(range(tx))
    p_pos = x_pos if same else tuple(range(tx, tx + tp))
    count = tx if same else tx + tp
    with assumed_target(arch), captured_launches(_dual_conv2d_forward_kernel) as launches:
        result = dual_conv2d(meta(*x_shape), xt, meta(c_out, C, k, k), wt, None, None, x_pos,
                             p_pos, count, (1, 1), (1, 1), (1, 1), bn_stats=bn_stats,
                             input_precision=precision)
    return launches, result


def test_the_primal_is_computed_once():
    """16 + 16 slots on the same indices with batch-norm sums: one product for the primal and
    two per slot (33 in all), the tangents' sums reading the primal back."""
    launches, _ = meta_launches(tx=16, tp=16, same=True)
    products = [ln.kwargs["TERMS"] * ln.grid[1] for ln in launches]
    assert products == [1, 32]
    assert [ln.kwargs["READ_Y"] for ln in launches] == [False, True]


def test_every_launch_of_a_call_knows_its_row_tile_before_it_runs():
    """Tiles are chosen before the launch: the tile sums are sized by the row tile the
    launches use, and every launch of the call uses the same one."""
    launches, (_, _, (stats, tstats, rows)) = meta_launches(tx=2, tp=2, same=False)
    M = 256 * 56 * 56
    (block_m,) = {ln.kwargs["BLOCK_M"] for ln in launches}
    tiles = -(-M // block_m)
    assert stats.shape == (tiles, 2, 64) and tstats.shape == (tiles, 4, 2, 64)
    assert rows.shape == (tiles,)


@pytest.mark.parametrize("c_out", [16, 64, 100, 512])
def test_column_tiles_fit_c_out(c_out):
    """No column tile wider than C_out needs (rounded up to a power of two, at least 32)."""
    launches, _ = meta_launches(c_out=c_out)
    for ln in launches:
        assert ln.kwargs["BLOCK_N"] <= max(32, 1 << (c_out - 1).bit_length())


def test_mixed_parameter_slots_take_a_cast_x():
    """bfloat16 parameter slots of a float32 primal: the parameter launch multiplies x cast to
    bfloat16 by Ẇ, so both its operands have the tangents' dtype."""
    launches, _ = meta_launches(tx=0, tp=1, same=False, tangent_dtype=torch.bfloat16)
    primal, tangent = launches
    assert primal.args[0].dtype == primal.args[1].dtype == torch.float32
    assert tangent.args[0].dtype == tangent.args[1].dtype == torch.bfloat16


@pytest.fixture
def cudnn_fp32_precision():
    """Set cuDNN's float32 convolution precision through torch's current API; restored after."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is None:
        pytest.skip("torch has no torch.backends.cudnn.conv.fp32_precision")
    previous = conv.fp32_precision

    def set_to(value):
        conv.fp32_precision = value

    yield set_to
    conv.fp32_precision = previous


@pytest.mark.parametrize("setting, expected", [("ieee", "tf32x3"), ("tf32", "tf32")])
def test_precision_read_through_the_current_torch_api(cudnn_fp32_precision, setting, expected):
    """With torch.backends.cudnn.conv.fp32_precision set (where reading the legacy
    ``allow_tf32`` raises), the launcher follows it: full precision as three TF32 products."""
    cudnn_fp32_precision(setting)
    launches, _ = meta_launches(precision=None)
    assert {ln.kwargs["INPUT_PRECISION"] for ln in launches} == {expected}


# --- which backend serves each op on CUDA ---------------------------------------------------------
def test_cuda_defaults_are_native_until_a_gpu_run_says_otherwise():
    from fgkernels.backends import _load
    from fgkernels.backends.cuda_defaults import CUDA_DEFAULTS, cuda_default
    assert set(CUDA_DEFAULTS.values()) == {"native"}
    assert cuda_default(_load) is _load("native")


def test_a_per_op_table_mixes_backends(monkeypatch):
    """conv+BN's convolution (and its batch statistics) from the Triton backend, the apply
    after it from the native one: the default backend routes each op as the table says."""
    import fgkernels.backends as registry
    from fgkernels.backends.cuda_defaults import PerOpBackend, cuda_default
    from fgkernels.backends.triton.backend import TritonBackend
    real_load = registry._load
    mixed = cuda_default(real_load, {"conv2d_batch_norm": "triton", "batch_norm_apply": "native"})
    assert isinstance(mixed, PerOpBackend)
    calls = []
    triton_conv = TritonBackend.conv_for_batch_norm
    monkeypatch.setattr(TritonBackend, "conv_for_batch_norm",
                        lambda self, *a: calls.append("triton") or triton_conv(self, *a))
    # the default backend of either device: CPU tensors take "native", CUDA ones the table's
    monkeypatch.setattr(registry, "_load",
                        lambda name: mixed if name == "native" else real_load(name))
    monkeypatch.setitem(registry._loaded, "cuda-default", mixed)
    monkeypatch.delenv("FGKERNELS_BACKEND", raising=False)
    x, w, xt, wt = rand(2, 3, 6, 5), rand(4, 3, 3, 3), rand(1, 2, 3, 6, 5), rand(1, 4, 3, 3, 3)
    out = DF.conv2d_batch_norm(Dual(x.float(), xt.float()), Dual(w.float(), wt.float()), None,
                               1, 1, 1, 1, None, None, None, None, True, 0.1, 1e-5, True)
    assert calls == ["triton"]
    fn = lambda x_, w_: F.relu(F.batch_norm(F.conv2d(x_, w_, None, 1, 1), None, None, None,
                                            None, True))
    check_against_forward_ad(out, fn, [x, w], [xt, wt])


@pytest.mark.parametrize("name", ["resnet", "mobilenet_v2"])
def test_zoo_model_on_triton_matches_forward_ad(name):
    """A zoo model at a tiny size in float32, its convolutions and batch norms on the Triton
    backend (depthwise ones on the native backend), against forward_ad in float64: within
    float32's error (TF32's on a GPU where it is allowed)."""
    from zoo import MODELS
    torch.manual_seed(0)
    model = MODELS[name](4).to(DEVICE).float().train()
    net = fgkernels.convert(copy.deepcopy(model))
    tangents = fgkernels.random_tangents(net, num_tangents=1)
    x, xt = rand(2, 3, 8, 8, dtype=torch.float32), rand(1, 2, 3, 8, 8, dtype=torch.float32)
    with fgkernels.use_backend("triton"):
        out = net(Dual(x, xt))
    check_network_against_forward_ad(out, model, x, xt, tangents)
