"""The Triton kernels, at tiny shapes (on the CPU they run in Triton's interpreter, which
computes dots in full float32, unlike a GPU's tf32)."""
import pytest
import torch
import torch.nn.functional as F

import fgkernels
import fgkernels.functional as DF
from fgkernels import Dual
from fgkernels.backends.triton.conv import combine_tile_stats, dual_conv2d
from fgkernels.testing import forward_ad_jvp

from helpers import rel_err

pytestmark = [pytest.mark.triton,
              pytest.mark.skipif("triton" not in fgkernels.available_backends(),
                                 reason="Triton cannot run here")]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = dict(rtol=1e-4, atol=1e-4) if DEVICE == "cpu" else dict(rtol=2e-2, atol=2e-2)


def both(fn, *args):
    with fgkernels.use_backend("reference"):
        ref = fn(*args)
    with fgkernels.use_backend("triton"):
        out = fn(*args)
    return ref, out


def rand(*shape, channels_last=False):
    t = torch.randn(*shape, device=DEVICE)
    return t.to(memory_format=torch.channels_last) if channels_last and t.dim() == 4 else t


CONV_CASES = [
    # (N, C, H, W, C_out, k, stride, padding, dilation, bias)
    (2, 3, 7, 6, 5, 3, 1, 1, 1, True),
    (1, 4, 9, 9, 6, 3, 2, 0, 1, False),
    (3, 2, 8, 5, 4, (3, 1), (2, 1), (1, 0), 1, True),
    (2, 3, 9, 9, 3, 3, 1, 2, 2, True),
    (2, 5, 5, 5, 17, 1, 1, 0, 1, True),  # ragged channel tile
]


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("slots", ["x1", "w1", "dense3", "appended"])
def test_conv_matches_reference(case, channels_last, slots):
    N, C, H, W, Co, k, s, p, d, has_b = case
    k2 = (k, k) if isinstance(k, int) else k
    x = rand(N, C, H, W, channels_last=channels_last)
    w, b = rand(Co, C, *k2), rand(Co) if has_b else None
    T = {"x1": 1, "w1": 1, "dense3": 3, "appended": 2}[slots]
    xt = rand(T, *x.shape) if slots != "w1" else None
    wt = rand(T if slots != "appended" else 1, *w.shape) if slots != "x1" else None
    bt = rand(wt.shape[0], Co) if wt is not None and has_b else None
    if slots == "appended":  # input directions {0, 1}, parameters' {2}: slots appended
        args = (Dual(x, xt, directions=[0, 1]), Dual(w, wt, directions=[2]),
                None if b is None else Dual(b, bt, directions=[2]))
    else:
        args = (Dual(x, xt), Dual(w, wt), None if b is None else Dual(b, bt))
    ref, out = both(DF.conv2d, *args, s, p, d)
    torch.testing.assert_close(out.primal, ref.primal, **TOL)
    torch.testing.assert_close(out.tangent, ref.tangent, **TOL)
    assert out.directions == ref.directions


def test_conv_matches_forward_ad_directly():
    x, w, b = rand(2, 3, 6, 5), rand(4, 3, 3, 3), rand(4)
    xt, wt, bt = rand(1, *x.shape), rand(1, *w.shape), rand(1, 4)
    _, et = forward_ad_jvp(lambda *a: F.conv2d(*a, 1, 1), [x, w, b], [xt, wt, bt])
    with fgkernels.use_backend("triton"):
        out = DF.conv2d(Dual(x, xt), Dual(w, wt), Dual(b, bt), 1, 1)
    torch.testing.assert_close(out.tangents, et, **TOL)


def test_bn_sum_epilogue_gives_batch_statistics():
    x, w = rand(3, 4, 7, 5), rand(6, 4, 3, 3)
    xt = rand(2, *x.shape)
    y, yt, tiles = dual_conv2d(x, xt, w, None, None, None, (0, 1), (), 2, (1, 1), (1, 1), (1, 1),
                               bn_stats=True)
    mean, var, tmean, tcov = combine_tile_stats(*tiles, torch.float64)
    y64, yt64 = y.double(), yt.double()
    torch.testing.assert_close(mean, y64.mean((0, 2, 3)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var, y64.var((0, 2, 3), unbiased=False), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tmean, yt64.mean((1, 3, 4)), rtol=1e-5, atol=1e-5)
    cov = ((y64 - y64.mean((0, 2, 3), keepdim=True)) * yt64).mean((1, 3, 4))
    torch.testing.assert_close(tcov, cov, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("slots", ["dense2", "appended", "bn_only", "none"])
def test_fused_conv_bn_relu_matches_reference(training, channels_last, slots):
    x, w = rand(3, 3, 6, 5, channels_last=channels_last), rand(5, 3, 3, 3)
    g, beta = torch.rand(5, device=DEVICE) + 0.5, rand(5)
    if slots == "dense2":
        xd, wd = Dual(x, rand(2, *x.shape)), Dual(w, rand(2, *w.shape))
        gd, bd = Dual(g, rand(2, 5)), Dual(beta, rand(2, 5))
    elif slots == "appended":
        xd = Dual(x, rand(1, *x.shape), directions=[0])
        wd = Dual(w, rand(1, *w.shape), directions=[1])
        gd, bd = Dual(g, rand(1, 5), directions=[1]), Dual(beta, rand(1, 5), directions=[1])
    elif slots == "bn_only":  # the input and the convolution without tangent
        xd, wd, gd, bd = Dual(x), w, Dual(g, rand(2, 5)), Dual(beta, rand(2, 5))
    else:
        xd, wd, gd, bd = Dual(x), w, g, beta
    stats = [(torch.zeros(5, device=DEVICE), torch.ones(5, device=DEVICE)) for _ in range(2)]

    def run(rm, rv):
        return DF.conv2d_batch_norm(xd, wd, None, (1, 1), (1, 1), (1, 1), 1, rm, rv, gd, bd,
                                    training, 0.1, 1e-5, True)

    with fgkernels.use_backend("reference"):
        ref = run(*stats[0])
    with fgkernels.use_backend("triton"):
        out = run(*stats[1])
    torch.testing.assert_close(out.primal, ref.primal, **TOL)
    if slots == "none":
        assert out.tangent is None
    else:
        torch.testing.assert_close(out.tangent, ref.tangent, **TOL)
    for a, b in zip(stats[0], stats[1]):
        torch.testing.assert_close(b, a, **TOL)


def test_sequential_runs_fused_on_triton():
    net = fgkernels.convert(torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=2), torch.nn.BatchNorm2d(4),
        torch.nn.ReLU()).to(DEVICE))
    x = rand(2, 3, 7, 7)
    xt = rand(2, *x.shape)
    tangents = fgkernels.random_tangents(net, 2)
    import copy
    net2 = copy.deepcopy(net)  # tangents are per step: a copy gets its own
    fgkernels.set_tangents(net2, tangents)
    ref, out = None, None
    with fgkernels.use_backend("reference"):
        ref = net(Dual(x, xt))
    with fgkernels.use_backend("triton"):  # groups=2 routes to the native backend
        out = net2(Dual(x, xt))
    torch.testing.assert_close(out.primal, ref.primal, **TOL)
    torch.testing.assert_close(out.tangent, ref.tangent, **TOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_within_torch_error(dtype):
    """err(triton) ≤ 2·err(reference in the same dtype) + atol, both against float32 inputs
    computed in float64."""
    x, w = rand(2, 4, 6, 6), rand(5, 4, 3, 3)
    xt, wt = rand(1, *x.shape), rand(1, *w.shape)

    def run(backend, dt):
        with fgkernels.use_backend(backend):
            return DF.conv2d(Dual(x.to(dt), xt.to(dt)), Dual(w.to(dt), wt.to(dt)), None, 1, 1)

    with fgkernels.use_backend("reference"):
        exact = DF.conv2d(Dual(x.double(), xt.double()), Dual(w.double(), wt.double()), None,
                          1, 1)
    if DEVICE == "cpu" and dtype == torch.float16:
        pytest.skip("float16 convolution has no CPU kernel in torch")
    torch_out, out = run("reference", dtype), run("triton", dtype)
    for part in ("primal", "tangent"):
        err = rel_err(getattr(out, part), getattr(exact, part))
        err_torch = rel_err(getattr(torch_out, part), getattr(exact, part))
        assert err <= 2 * err_torch + 1e-3, (part, err, err_torch)


@pytest.mark.parametrize("channels_last", [False, True])
def test_bfloat16_tangents_of_a_float32_conv_bn_relu(channels_last):
    """The fused convolution (and its batch-norm epilogue) with bfloat16 slots of a float32
    primal: the primal as in float32, the slots bfloat16, within twice the reference's error."""
    x, w = rand(2, 4, 6, 6, channels_last=channels_last), rand(5, 4, 3, 3)
    xt, wt = rand(2, *x.shape), rand(2, *w.shape)
    bn = lambda d, e: DF.conv2d_batch_norm(d, e, None, 1, 1, 1, 1, None, None, None, None, True,
                                           0.1, 1e-5, True)
    with fgkernels.use_backend("reference"):
        exact = bn(Dual(x.double(), xt.double()), Dual(w.double(), wt.double()))
    ref, out = both(bn, Dual(x, xt.bfloat16()), Dual(w, wt.bfloat16()))
    assert out.tangents.dtype == torch.bfloat16 and out.primal.dtype == torch.float32
    torch.testing.assert_close(out.primal, ref.primal, **TOL)
    err, err_ref = rel_err(out.tangents, exact.tangents), rel_err(ref.tangents, exact.tangents)
    assert err <= 2 * err_ref + 1e-3, (err, err_ref)


def test_bn_relu_apply_keeps_nan_and_its_tangent():
    """As torch.relu, its derivative and the native kernels: a NaN stays in the primal and its
    tangent is not zeroed (it is NaN too, through the NaN in the x-term); a NaN tangent where
    the output is <= 0 gives 0."""
    from fgkernels.backends.triton.batch_norm import dual_bn_relu_apply_
    y = torch.tensor([[[[float("nan"), -1.0, 2.0]]]], device=DEVICE)
    yt = torch.tensor([[[[[5.0, float("nan"), 1.0]]]]], device=DEVICE)
    one, zero = torch.ones(1, device=DEVICE), torch.zeros(1, device=DEVICE)
    dual_bn_relu_apply_(y, yt, zero, one, zero, zero[None], zero[None], relu=True)
    assert torch.isnan(y[0, 0, 0, 0]) and y[0, 0, 0, 1] == 0 and y[0, 0, 0, 2] == 2
    assert torch.isnan(yt[0, 0, 0, 0, 0]) and yt.flatten()[1:].tolist() == [0.0, 1.0]
