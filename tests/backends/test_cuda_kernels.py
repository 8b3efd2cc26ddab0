"""The CUDA kernels of csrc/cuda on a GPU, against float64 (skipped without one): the
batch-norm statistics of channels_last activations, read row by row (consecutive threads on
consecutive channels), over several channel tiles and splits, for every element-type pair."""
import copy

import pytest
import torch

import fgkernels
from fgkernels.testing import forward_ad_jvp

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available() or
                                 "native" not in fgkernels.available_backends(),
                                 reason="needs CUDA and the compiled extension")]

# (primal, tangent) element types the kernels are instantiated for
DTYPES = [(torch.float32, torch.float32), (torch.float64, torch.float64),
          (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
          (torch.float32, torch.bfloat16), (torch.float32, torch.float16),
          (torch.float64, torch.float32)]


@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: f"{d[0]}-{d[1]}"[12:])
@pytest.mark.parametrize("channels_last", [False, True])
def test_bn_stats_match_float64(dtypes, channels_last):
    """70 channels (three tiles of 32 in channels_last, the last ragged), 64·40·40 rows (many
    splits), a mean far from zero; two tangent slots."""
    primal, tangent = dtypes
    g = torch.Generator(device="cuda").manual_seed(0)
    x64 = torch.randn(64, 70, 40, 40, device="cuda", dtype=torch.float64, generator=g) * 3 + 5
    xt64 = torch.randn(2, *x64.shape, device="cuda", dtype=torch.float64, generator=g)
    x, xt = x64.to(primal), xt64.to(tangent)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        xt = xt.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    mean, var, tmean, tcov = torch.ops.fgkernels.dual_bn_stats(x, xt)
    xs, ts = x.double(), xt.double()  # the values as stored
    centred = xs - xs.mean((0, 2, 3), keepdim=True)
    tol = dict(rtol=1e-5, atol=1e-5) if primal != torch.float64 else dict(rtol=1e-10,
                                                                          atol=1e-10)
    torch.testing.assert_close(mean.double(), xs.mean((0, 2, 3)), **tol)
    torch.testing.assert_close(var.double(), (centred ** 2).mean((0, 2, 3)), **tol)
    torch.testing.assert_close(tmean.double(), ts.mean((1, 3, 4)), **tol)
    torch.testing.assert_close(tcov.double(), (centred * ts).mean((1, 3, 4)), **tol)


@pytest.mark.parametrize("fused", [False, True], ids=["batch_norm", "conv_batch_norm"])
def test_batch_norm_past_the_apply_kernels_slot_map_is_exact(fused):
    """65 output slots, one more than the CUDA apply kernel's slot map holds: the native backend
    serves it on the reference backend, and the tangents are forward_ad's (float64)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1, bias=False),
                                torch.nn.BatchNorm2d(4), torch.nn.ReLU()).double().cuda()
    model = model if fused else model[1:]
    x = torch.randn(2, 3 if fused else 4, 5, 5, dtype=torch.float64, device="cuda")
    xt = torch.randn(65, *x.shape, dtype=torch.float64, device="cuda")
    _, expected = forward_ad_jvp(copy.deepcopy(model), [x], [xt])
    with fgkernels.use_backend("native"):
        out = fgkernels.convert(model)(fgkernels.Dual(x, xt))
    torch.testing.assert_close(out.tangent, expected, rtol=1e-10, atol=1e-10)


SELECT_OPS = {  # name: (the compiled op's call, the function forward_ad runs)
    "relu": (lambda x, xt: torch.ops.fgkernels.dual_relu(x, xt), torch.relu),
    "hardtanh": (lambda x, xt: torch.ops.fgkernels.dual_hardtanh(x, xt, -0.5, 1.5),
                 lambda v: torch.nn.functional.hardtanh(v, -0.5, 1.5)),
}


@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: f"{d[0]}-{d[1]}"[12:])
@pytest.mark.parametrize("op", sorted(SELECT_OPS))
@pytest.mark.parametrize("channels_last", [False, True])
def test_select_kernels_match_the_definition(op, dtypes, channels_last):
    """ReLU's and hardtanh's kernels at random points, at the kinks, at ±0, NaN and ±Inf, with
    NaN and infinite tangents: exactly forward_ad's scalar definition in float64 (a select
    copies a tangent or writes 0; the bounds are exact in every element type)."""
    from helpers import elementwise_forward_ad
    primal, tangent = dtypes
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 7, 9, generator=g) * 2
    x.view(-1)[:9] = torch.tensor([0.0, -0.0, -0.5, 1.5, 1.0, float("nan"), float("inf"),
                                   -float("inf"), 6.0])
    xt = torch.randn(2, *x.shape, generator=g)
    xt[0].view(-1)[::7] = float("nan")
    xt[1].view(-1)[::5] = float("inf")
    x, xt = x.to(primal), xt.to(tangent)
    call, fn = SELECT_OPS[op]
    y_want, yt_want = elementwise_forward_ad(fn, x.double(), xt.double())
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y, yt = call(x.cuda(), xt.cuda())
    torch.testing.assert_close(y.cpu().double(), y_want, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(yt.cpu().double(), yt_want, rtol=0, atol=0, equal_nan=True)
