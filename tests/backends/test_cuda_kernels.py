"""The CUDA kernels of csrc/cuda on a GPU, against float64 (skipped without one): the
batch-norm statistics of channels_last activations, read row by row (consecutive threads on
consecutive channels), over several channel tiles and splits, for every element-type pair, and
of a channel whose first values are unlike the rest (the sums' shift); the
batch norm's per-channel kernels (coefficients, running statistics) against their refs; the
elementwise select kernels."""
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


@pytest.mark.parametrize("channels_last", [False, True])
def test_bn_stats_shift_is_sampled_across_the_channel(channels_last):
    """Image 0's first rows at 0 (a border) in channels of mean 1 and std 1e-3, float32: the
    variance within twice torch's own error. (Sums shifted by the mean of a channel's first
    values, 0 here, lose the variance to cancellation.)"""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(256, 4, 32, 32, device="cuda", generator=g).mul(1e-3).add(1)
    x[0, :, :8] = 0
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    _, var, _, _ = torch.ops.fgkernels.dual_bn_stats(x, None)
    exact = x.double().var((0, 2, 3), unbiased=False)
    torch_error = (torch.var(x, (0, 2, 3), unbiased=False).double() - exact).abs()
    assert ((var.double() - exact).abs() <= 2 * torch_error + 1e-6 * exact).all()


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


@pytest.mark.parametrize("acc", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("params", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("slots", [((0,), (0,), 1), ((0, 2), (1, 2), 3), ((), (0, 1), 2),
                                   ((1, 0), (), 2)], ids=["same", "mixed", "params", "input"])
def test_bn_coefficients_kernel_matches_its_ref(slots, training, params, acc):
    """dual_bn_coefficients on CUDA, 300 channels (three blocks), every way input and parameter
    slots can land, parameters of the network's dtype read where they are (the slot rows of
    weight_t a strided view), against torch's ops slot by slot in float64."""
    from batch_norm_refs import dual_bn_coefficients_ref
    x_pos, p_pos, count = slots
    C, X, P = 300, len(x_pos), len(p_pos)
    g = torch.Generator().manual_seed(0)
    r = lambda *s, dt=acc: torch.randn(*s, generator=g).to(dt)
    weight_t = r(C, P, dt=params).t() if P else None  # (P, C) with strides (1, P)
    args = (r(C), r(C).abs() + 0.1, r(X, C), r(X, C), r(C, dt=params), weight_t,
            r(C, dt=params), r(P, C, dt=params) if P else None, list(x_pos), list(p_pos), count,
            training, 1e-5)
    on_gpu = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
    in_f64 = [a.double() if isinstance(a, torch.Tensor) else a for a in args]
    tol = dict(rtol=1e-12, atol=1e-12) if acc == torch.float64 else dict(rtol=1e-6, atol=1e-6)
    for got, want in zip(torch.ops.fgkernels.dual_bn_coefficients(*on_gpu),
                         dual_bn_coefficients_ref(*in_f64)):
        assert got.dtype == acc and got.is_contiguous()
        torch.testing.assert_close(got.cpu().double(), want, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=str)
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_running_stats_kernel_matches_its_ref(dtype, strided):
    """bn_update_running_stats_ on CUDA updates the buffers where they are (every other element
    of a larger tensor too) by nn.BatchNorm2d's rule in float64, rounded once as torch casts a
    float64 tensor: exactly the ref's values in a narrower dtype."""
    from batch_norm_refs import bn_update_running_stats_ref
    C = 300
    mean, var = torch.randn(C), torch.rand(C)
    storage = [torch.randn(2 * C).to(dtype), torch.rand(2 * C).to(dtype) + 1]
    buffers = [b[::2] if strided else b[:C] for b in storage]
    expected = bn_update_running_stats_ref(*buffers, mean, var, 33, 0.2)
    gaps = [b[1::2].clone() for b in storage]
    storage = [b.cuda() for b in storage]
    ours = [b[::2] if strided else b[:C] for b in storage]
    pointers = [b.data_ptr() for b in ours]
    torch.ops.fgkernels.bn_update_running_stats_(*ours, mean.cuda(), var.cuda(), 33, 0.2)
    assert [b.data_ptr() for b in ours] == pointers
    # float64 keeps float64's own rounding, which the GPU compile contracts into fused
    # multiply-adds: a few units in the last place of terms of magnitude below 4.
    atol = 8 * torch.finfo(dtype).eps if dtype == torch.float64 else 0
    for got, want in zip(ours, expected):
        torch.testing.assert_close(got.cpu(), want, rtol=0, atol=atol)
    if strided:  # the elements between the buffers' are untouched
        assert all(torch.equal(b[1::2].cpu(), gap) for b, gap in zip(storage, gaps))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_running_stats_kernel_rounds_ties_to_even(dtype):
    """An update exactly halfway between two values of the buffers' dtype rounds to the even
    one, as torch's cast does: 1 and 1 + 2ε averaged (momentum 0.5) give 1 + ε, which rounds
    down to 1; 1 + 2ε and 1 + 4ε give 1 + 3ε, which rounds up to 1 + 4ε."""
    eps = torch.finfo(dtype).eps / 2  # half a unit in the last place at 1
    mean = torch.tensor([1 + 2 * eps, 1 + 4 * eps], device="cuda")
    running_mean = torch.tensor([1.0, 1 + 2 * eps]).to(dtype).cuda()
    running_var = torch.ones(2, dtype=dtype, device="cuda")
    torch.ops.fgkernels.bn_update_running_stats_(running_mean, running_var, mean,
                                                 torch.ones(2, device="cuda"), 2, 0.5)
    assert running_mean.cpu().tolist() == [1.0, 1 + 4 * eps]


def test_batch_norm_channel_ops_check_their_arguments():
    """The CUDA ops refuse what the CPU ones refuse (shared checks), an argument on another
    device, and more slots than the kernel's slot arrays hold, with messages that name them."""
    C = 3
    r = lambda *s, device="cuda": torch.randn(*s, device=device)
    args = [r(C), r(C).abs() + 0.1, r(1, C), r(1, C), r(C), r(1, C), r(C), r(1, C), [0], [0], 1,
            True, 1e-5]
    coefficients = torch.ops.fgkernels.dual_bn_coefficients
    with pytest.raises(RuntimeError, match=r"weight_t must have shape \[1, 3\], got \[2, 4\]"):
        coefficients(*args[:5], r(2, 4), *args[6:])
    with pytest.raises(RuntimeError, match="training with input slots needs tmean and tcov"):
        coefficients(*args[:2], None, None, *args[4:])
    with pytest.raises(RuntimeError, match=r"output slots in \[0, 1\)"):
        coefficients(*args[:8], [1], *args[9:])
    with pytest.raises(RuntimeError, match="bias must be on mean's device"):
        coefficients(*args[:6], r(C, device="cpu"), *args[7:])
    many = list(range(65))
    with pytest.raises(RuntimeError, match="at most 64 slots in p_pos, got 65"):
        coefficients(r(C), r(C).abs(), None, None, r(C), r(65, C), None, None, [], many, 65,
                     True, 1e-5)
    with pytest.raises(RuntimeError, match=r"running_var must have shape \[3\]"):
        torch.ops.fgkernels.bn_update_running_stats_(r(C), r(4), r(C), r(C), 10, 0.1)


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
