"""Edge and hostile inputs: the exact forward_ad answer (NaN where it has NaN) or a clear error
naming the argument, never a crash or a wrong number."""
import copy
import dataclasses
import math
import re
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fgkernels
import fgkernels.functional as DF
from fgkernels import Dual
from fgkernels.dual.tangents import has_tangent
from fgkernels.testing import forward_ad_jvp, model_jvp, model_jvp_in_place

from helpers import ForwardADOracle, assert_within_torch_error, laid_out
from op_table import OPS, inputs

f64 = dict(dtype=torch.float64)


def _training_batch_norm(x: torch.Tensor) -> torch.Tensor:
    """A fresh ``nn.BatchNorm2d``'s training pass (unit weight, zero bias)."""
    return F.batch_norm(x, None, None, None, None, True)


def _jvp(fn, *pairs):
    """forward_ad's (primal, stacked tangent) of ``fn`` at (primal, stack or None) pairs."""
    return forward_ad_jvp(fn, [p for p, _ in pairs], [t for _, t in pairs])


# --- raw ops on degenerate inputs, in a process of their own ----------------------------------
CRASH_CASES = """
import torch
from fgkernels.backends import native
native.load()  # registers torch.ops.fgkernels (the first dual op would)
ops = torch.ops.fgkernels
x0 = torch.randn(0, 3, 4, 4)
xhw = torch.randn(2, 3, 0, 0)
xc0 = torch.randn(2, 0, 4, 4)
c3 = lambda: torch.randn(3)
cases = {
    "apply N=0": lambda: ops.dual_bn_apply(x0, None, [], c3(), c3(), c3(), torch.randn(0, 3),
                                           torch.randn(0, 3), True),
    "apply HW=0": lambda: ops.dual_bn_apply(xhw, torch.randn(1, *xhw.shape), [0], c3(), c3(),
                                            c3(), torch.randn(1, 3), torch.randn(1, 3), False),
    "apply C=0": lambda: ops.dual_bn_apply(xc0, None, [], torch.randn(0), torch.randn(0),
                                           torch.randn(0), torch.randn(0, 0), torch.randn(0, 0),
                                           False),
    "apply_ N=0": lambda: ops.dual_bn_apply_(x0.clone(), None, c3(), c3(), c3(),
                                             torch.randn(0, 3), torch.randn(0, 3), True),
    "stats N=0": lambda: ops.dual_bn_stats(x0, None),
    "stats C=0": lambda: ops.dual_bn_stats(xc0, None),
    "conv groups=0": lambda: ops.dual_conv2d(torch.randn(1, 4, 5, 5), None,
                                             torch.randn(4, 4, 3, 3), None, None, None, [1, 1],
                                             [0, 0], [1, 1], 0),
    "conv groups=-2": lambda: ops.dual_conv2d(torch.randn(1, 4, 5, 5), None,
                                              torch.randn(4, 2, 3, 3), None, None, None, [1, 1],
                                              [0, 0], [1, 1], -2),
    "conv N=0": lambda: ops.dual_conv2d(torch.randn(0, 4, 5, 5), torch.randn(2, 0, 4, 5, 5),
                                        torch.randn(4, 4, 3, 3), torch.randn(1, 4, 4, 3, 3),
                                        None, None, [1, 1], [0, 0], [1, 1], 1),
    "relu empty": lambda: ops.dual_relu(x0, torch.randn(2, *x0.shape)),
    "linear 0-d": lambda: ops.dual_linear(torch.tensor(1.0), None, torch.randn(3, 1), None,
                                          None, None, False),
    "maxpool N=0": lambda: ops.dual_max_pool2d(x0, torch.randn(1, *x0.shape), [2, 2], [2, 2],
                                               [0, 0], [1, 1], False),
}
for name, case in cases.items():
    try:
        out = case()
        print(f"{name}: ok")
    except RuntimeError as e:
        print(f"{name}: error: {str(e).splitlines()[0]}")
"""


@pytest.mark.skipif("native" not in fgkernels.available_backends(), reason="needs fgkernels._C")
def test_raw_ops_never_crash_the_process():
    run = subprocess.run([sys.executable, "-c", CRASH_CASES], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, (run.returncode, run.stdout, run.stderr[-2000:])
    lines = dict(line.split(": ", 1) for line in run.stdout.splitlines())
    assert len(lines) == 12, run.stdout
    for name in ("apply N=0", "apply HW=0", "apply_ N=0", "conv N=0", "relu empty",
                 "maxpool N=0"):
        assert lines[name] == "ok", (name, lines[name])
    assert "at least one channel" in lines["apply C=0"]
    assert "x must not be empty" in lines["stats N=0"]
    assert "groups must be positive, got 0" in lines["conv groups=0"]
    assert "groups must be positive, got -2" in lines["conv groups=-2"]
    assert "0-d" in lines["linear 0-d"]


def _raw_op_cases() -> dict:
    """Calls of the compiled ops that torch (or the op's own contract) refuses, each built
    afresh: (call, the message, whether the op's fake can tell: aliasing needs memory)."""
    ops, CL = torch.ops.fgkernels, torch.channels_last
    x, c3 = torch.randn(2, 3, 4, 4), lambda: torch.randn(3)
    per_slot = lambda T: (torch.randn(T, 3), torch.randn(T, 3))
    buf = torch.zeros(4, dtype=torch.float64)
    big = torch.randn(1, 256, 5, 5).contiguous(memory_format=CL)
    return {
        # a 3x3 slice and a 4x4 kernel onto a 1-pixel map: C++'s division made the map 1 pixel
        # and the tiny-map GEMM read the parent tensor's 4x4 corner
        "kernel wider than the input": (lambda: ops.dual_conv2d(
            big[:, :, :3, :3], None, torch.randn(512, 256, 4, 4).contiguous(memory_format=CL),
            None, None, None, [2, 2], [0, 0], [1, 1], 1),
            "Kernel size can't be greater than actual input size", True),
        "integer linear": (lambda: ops.dual_linear(
            torch.ones(2, 3, dtype=torch.long), None, torch.ones(4, 3, dtype=torch.long), None,
            None, None, False), "must be a floating or complex tensor", True),
        "integer conv": (lambda: ops.dual_conv2d(
            torch.ones(1, 3, 4, 4, dtype=torch.long), None,
            torch.ones(2, 3, 3, 3, dtype=torch.long), None, None, None, [1, 1], [0, 0], [1, 1],
            1), "must be a floating or complex tensor", True),
        "weight_t without weight": (lambda: ops.dual_bn_coefficients(
            torch.zeros(3), torch.ones(3), None, None, None, torch.randn(1, 3), None, None, [],
            [0], 1, False, 1e-5), "weight_t was given without weight", True),
        "integer running stats": (lambda: ops.bn_update_running_stats_(
            torch.zeros(3, dtype=torch.long), torch.ones(3, dtype=torch.long), torch.zeros(3),
            torch.ones(3), 4, 0.1), "running_mean and running_var must be floating", True),
        "x_slot past xt's slots": (lambda: ops.dual_bn_apply(
            x, torch.randn(1, *x.shape), [3], c3(), c3(), c3(), *per_slot(1), False),
            "x_slot entries must be -1", True),
        "apply_ t_shift of another shape": (lambda: ops.dual_bn_apply_(
            x.clone(), torch.randn(1, *x.shape), c3(), c3(), c3(), torch.randn(1, 3),
            torch.randn(2, 3), False), r"t_shift must have shape", True),
        "stats of an empty x": (lambda: ops.dual_bn_stats(torch.randn(0, 3, 4, 4), None),
                                "x must not be empty", True),
        "relu of T = 0": (lambda: ops.dual_relu(x, torch.randn(0, *x.shape)), "T >= 1", True),
        "apply_ center inside x": (lambda: ops.dual_bn_apply_(
            x, None, x.view(-1)[:3], c3(), c3(), *per_slot(0), False),
            "center and x share memory", False),
        "apply_ t_shift inside xt": (lambda: (lambda xt: ops.dual_bn_apply_(
            x.clone(), xt, c3(), c3(), c3(), torch.randn(1, 3), xt.view(-1)[:3].view(1, 3),
            False))(torch.randn(1, *x.shape)), "t_shift and xt share memory", False),
        "running_mean over mean": (lambda: ops.bn_update_running_stats_(
            buf[1:], torch.ones(3, dtype=torch.float64), buf[:3], torch.ones(3), 4, 0.1),
            "running_mean and mean share memory", False),
        "expanded running_mean": (lambda: ops.bn_update_running_stats_(
            torch.zeros(1).expand(3), torch.ones(3), torch.zeros(3), torch.ones(3), 4, 0.1),
            r"share memory \(an expanded tensor\)", False),
    }


@pytest.mark.skipif("native" not in fgkernels.available_backends(), reason="needs fgkernels._C")
@pytest.mark.parametrize("case", sorted(_raw_op_cases()))
def test_raw_ops_and_their_fakes_refuse_what_torch_refuses(case):
    """Each compiled op refuses the call, naming the problem (they read outside a slice,
    computed over aliased coefficients or buffers, ran integer kernels, or ignored a parameter
    tangent's missing parameter), and its fake refuses it too where shapes and dtypes tell."""
    call, message, fake_tells = _raw_op_cases()[case]
    with pytest.raises((RuntimeError, TypeError), match=message):
        call()
    if fake_tells:
        with torch._subclasses.fake_tensor.FakeTensorMode(), \
                pytest.raises((RuntimeError, TypeError, ValueError), match=message):
            _raw_op_cases()[case][0]()


@pytest.mark.skipif("native" not in fgkernels.available_backends(), reason="needs fgkernels._C")
def test_raw_ops_refuse_aliased_or_grad_leaf_outputs_and_mismatched_slots():
    ops = torch.ops.fgkernels
    x = torch.randn(2, 3, 4, 4)
    coef = (torch.randn(3), torch.randn(3), torch.randn(3), torch.randn(1, 3), torch.randn(1, 3))
    with pytest.raises(RuntimeError, match="x and xt share memory"):
        ops.dual_bn_apply_(x, x.unsqueeze(0), *coef, False)
    leaf = torch.randn(2, 3, 4, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf tensor that requires grad"):
        ops.dual_bn_apply_(leaf, None, *coef[:3], torch.randn(0, 3), torch.randn(0, 3), False)
    with torch.no_grad():  # as torch's own in-place ops
        ops.dual_bn_apply_(leaf, None, *coef[:3], torch.randn(0, 3), torch.randn(0, 3), False)
    w = torch.randn(4, 3, 3, 3)
    with pytest.raises(RuntimeError, match="same number of slots P, got 2 and 1"):
        ops.dual_conv2d(x, None, w, torch.randn(2, *w.shape), None, torch.randn(1, 4), [1, 1],
                        [0, 0], [1, 1], 1)
    with pytest.raises(RuntimeError, match=r"bias must have shape \[4\], got \[5\]"):
        ops.dual_conv2d(x, None, w, None, torch.randn(5), None, [1, 1], [0, 0], [1, 1], 1)
    stats = (torch.zeros(3), torch.ones(3))
    for n in (1, 0, -5):
        with pytest.raises(RuntimeError, match=f"n \\(values per channel\\) must be more than 1 "
                                               f".*, got {n}"):
            ops.bn_update_running_stats_(torch.zeros(3), torch.ones(3), *stats, n, 0.1)
    x_part, p_part = ops.dual_conv2d(x, torch.randn(1, *x.shape).bfloat16(), w, None, None, None,
                                     [1, 1], [0, 0], [1, 1], 1)[1:]
    assert x_part.dtype == p_part.dtype == torch.bfloat16  # an absent part too
    y = torch.randn(2, 4, 2, 2)
    with pytest.raises(RuntimeError, match=r"y must have the convolution's output shape "
                                           r"\(2, 4, 2, 2\), got \[2, 4, 9, 9\]"):
        ops.dual_conv2d_tangents(x, torch.randn(2, 4, 9, 9), None, w, None, torch.randn(1, 4),
                                 [1, 1], [0, 0], [1, 1], 1)
    with pytest.raises(RuntimeError, match=r"stride must be two positive ints, got \[0, 1\]"):
        ops.dual_conv2d_tangents(x, y, None, w, None, torch.randn(1, 4), [0, 1], [0, 0], [1, 1], 1)
    ln = torch.randn(2, 3, 4)
    with pytest.raises(RuntimeError, match="weight_t was given without weight"):
        ops.dual_layer_norm(ln, None, None, torch.randn(1, 4), None, None, [4], 1e-5, False)
    with pytest.raises(RuntimeError, match="weight_t and bias_t must carry the same number of "
                                           "slots, got 2 and 1"):
        ops.dual_layer_norm(ln, None, torch.randn(4), torch.randn(2, 4), torch.randn(4),
                            torch.randn(1, 4), [4], 1e-5, False)
    with pytest.raises(RuntimeError, match="sum_terms needs the input's and the parameters' "
                                           "tangents with one slot count, got 1 input and 0"):
        ops.dual_layer_norm(ln, torch.randn(1, *ln.shape), None, None, None, None, [4], 1e-5,
                            True)
    with pytest.raises(RuntimeError, match="the tangents of one call must share one dtype"):
        ops.dual_layer_norm(ln, torch.randn(1, *ln.shape), torch.randn(4),
                            torch.randn(1, 4).bfloat16(), None, None, [4], 1e-5, True)
    with pytest.raises(RuntimeError, match=r"dual_hardtanh: min_val \(1\) must not be greater "
                                           r"than max_val \(-1\)"):
        ops.dual_hardtanh(torch.randn(3), torch.randn(1, 3), 1.0, -1.0)
    with pytest.raises(RuntimeError, match="dual_relu: x must be float64, float32, bfloat16 or "
                                           "float16, got Long"):
        ops.dual_relu(torch.arange(3), torch.arange(3)[None])
    with pytest.raises(RuntimeError, match=r"xt must have shape \(T, 2, 3\), got \[1, 3, 2\]"):
        ops.dual_relu(torch.randn(2, 3), torch.randn(1, 3, 2))
    with pytest.raises(RuntimeError, match=r"dual_bn_stats: x must not be empty, got shape "
                                           r"\[0, 3, 2, 2\]"):
        ops.dual_bn_stats(torch.randn(0, 3, 2, 2), None)
    with pytest.raises(RuntimeError, match=r"x_pos must hold distinct output slots in \[0, 2\), "
                                           r"got \[1, 1\]"):
        ops.dual_bn_coefficients(torch.zeros(3), torch.ones(3), torch.zeros(2, 3),
                                 torch.zeros(2, 3), None, None, None, None, [1, 1], [], 2, True,
                                 1e-5)
    with pytest.raises(RuntimeError, match="center must be on x's device cpu, got meta"):
        ops.dual_bn_apply(x, None, [], torch.zeros(3, device="meta"), *coef[1:3],
                          torch.zeros(0, 3), torch.zeros(0, 3), False)
    # An empty stride is the kernel size, as torch's max_pool2d takes it (the CPU kernel refused
    # it; the composite, on other devices, took it).
    pooled = ops.dual_max_pool2d(x, torch.randn(1, *x.shape), [2, 2], [], [0, 0], [1, 1], False)
    torch.testing.assert_close(pooled[0], F.max_pool2d(x, 2), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="running_mean and running_var share memory"):
        buffer = torch.zeros(3)
        ops.bn_update_running_stats_(buffer, buffer, *stats, 10, 0.1)
    with pytest.raises(RuntimeError, match="running_mean is a leaf tensor that requires grad"):
        ops.bn_update_running_stats_(torch.zeros(3, requires_grad=True), torch.ones(3), *stats,
                                     10, 0.1)


@pytest.mark.skipif("native" not in fgkernels.available_backends(), reason="needs fgkernels._C")
def test_raw_in_place_ops_bump_the_version_of_what_they_write():
    """As torch's in-place ops: autograd then refuses a backward through a graph that saved a
    tensor written since."""
    ops = torch.ops.fgkernels
    x, xt = torch.randn(2, 3, 4, 4), torch.randn(1, 2, 3, 4, 4)
    coef = (torch.randn(3), torch.randn(3), torch.randn(3), torch.randn(1, 3), torch.randn(1, 3))
    before = x._version, xt._version
    ops.dual_bn_apply_(x, xt, *coef, False)
    assert x._version > before[0] and xt._version > before[1]
    running = (torch.zeros(3), torch.ones(3))
    before = [b._version for b in running]
    ops.bn_update_running_stats_(*running, torch.zeros(3), torch.ones(3), 10, 0.1)
    assert all(b._version > v for b, v in zip(running, before))
    w = torch.randn(3, requires_grad=True)
    y = torch.randn(2, 3, 4, 4)
    saved = y * 1.0
    loss = (w.view(1, 3, 1, 1) * saved).sum()  # saves `saved` for w's gradient
    ops.dual_bn_apply_(saved, None, *coef[:3], torch.randn(0, 3), torch.randn(0, 3), False)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# --- empty tensors follow torch.nn ----------------------------------------------------------
NORMS = {"batch": lambda: nn.BatchNorm2d(3), "group": lambda: nn.GroupNorm(3, 3),
         "one group": lambda: nn.GroupNorm(1, 3),
         "instance": lambda: nn.InstanceNorm2d(3, affine=True, track_running_stats=True)}


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 3, 0, 0), (2, 3, 0, 5)])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("with_conv", [False, True])
@pytest.mark.parametrize("norm", sorted(NORMS))
def test_empty_inputs_follow_torch_nn(backend, shape, training, with_conv, norm):
    """Batch, group and instance norms: output shape, running stats and num_batches_tracked as
    torch.nn; where torch.nn refuses (a convolution over H·W = 0), the same error."""
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 3, 1)] if with_conv else []
    ref = nn.Sequential(*layers, NORMS[norm](), nn.ReLU()).double().train(training)
    net = fgkernels.convert(copy.deepcopy(ref))
    x, xt = torch.randn(shape, **f64), torch.randn(2, *shape, **f64)
    try:
        y_ref = ref(x)
    except (RuntimeError, IndexError) as e:  # (instance norm's running statistics at N = 0)
        with pytest.raises(type(e), match=re.escape(str(e))):
            net(Dual(x, xt))
        return
    out = net(Dual(x, xt))
    assert out.shape == y_ref.shape and out.tangents.shape == (2, *y_ref.shape)
    for a, b in zip(net.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, b)


def test_zero_channel_batch_norm_is_a_clear_error(backend):
    bn = fgkernels.convert(nn.BatchNorm2d(0))
    with pytest.raises(ValueError, match="at least 1 channel"):
        bn(Dual(torch.randn(2, 0, 3, 3), torch.randn(2, 0, 3, 3)))


# --- broadcasting: trailing data dims aligned, the slot axis kept apart --------------------------
BROADCASTS = [((2, 3, 4, 4), (3, 1, 1)), ((3, 1, 1), (2, 3, 4, 4)), ((2, 3, 4, 4), (4,)),
              ((3, 1), (1, 3)), ((2, 3, 4, 4), ()), ((1, 3, 1, 1), (2, 1, 4, 4))]


def _where(a, b):
    """torch.where with a condition of both values, broadcast against both operands."""
    shape = torch.broadcast_shapes(a.shape, b.shape)
    cond = (torch.arange(math.prod(shape)) % 3 == 0).reshape(shape)
    return torch.where(cond, a, b)


@pytest.mark.parametrize("op", [torch.add, torch.sub, torch.mul, torch.div, _where],
                         ids=["add", "sub", "mul", "div", "where"])
@pytest.mark.parametrize("shapes", BROADCASTS, ids=str)
@pytest.mark.parametrize("which", ["both", "left", "right"])
def test_broadcasting_binary_ops_match_forward_ad(op, shapes, which):
    (sa, sb), T = shapes, 3
    a, b = torch.randn(sa, **f64), torch.rand(sb, **f64) + 0.5
    at = torch.randn(T, *sa, **f64) if which != "right" else None
    bt = torch.randn(T, *sb, **f64) if which != "left" else None
    out = op(Dual(a, at) if at is not None else a, Dual(b, bt) if bt is not None else b)
    y, yt = _jvp(op, (a, at), (b, bt))
    assert out.shape == y.shape and out.tangents.shape == (T, *y.shape)
    torch.testing.assert_close(out.primal, y)
    torch.testing.assert_close(out.tangents, yt)


def test_bias_of_lower_rank_added_to_an_activation():
    """The reported case: h + bias with a (C, 1, 1) Dual bias, T equal to a data dim."""
    h, ht = torch.randn(2, 3, 4, 4, **f64), torch.randn(2, 2, 3, 4, 4, **f64)
    b, bt = torch.randn(3, 1, 1, **f64), torch.randn(2, 3, 1, 1, **f64)
    out = Dual(h, ht) + Dual(b, bt)
    torch.testing.assert_close(out.tangents, ht + bt.unsqueeze(1))


# --- in-place ops update the Dual or raise ----------------------------------------------------
@pytest.mark.parametrize("name,inplace,outofplace", [
    ("F.relu_", F.relu_, F.relu), ("torch.relu_", torch.relu_, torch.relu),
    ("F.relu(inplace)", lambda d: F.relu(d, inplace=True), F.relu),
    ("relu_", lambda d: d.relu_(), F.relu),
    ("add_", lambda d: d.add_(d * 2, alpha=0.5), lambda v: v + v),
    ("mul_", lambda d: d.mul_(3.0), lambda v: v * 3),
    ("div_", lambda d: d.div_(4), lambda v: v / 4),
    ("clamp_", lambda d: d.clamp_(-0.5, 0.5), lambda v: v.clamp(-0.5, 0.5)),
    ("+=", lambda d: d.__iadd__(d), lambda v: v + v),
    ("hardtanh_", lambda d: F.hardtanh(d, inplace=True), F.hardtanh),
])
def test_inplace_ops_update_primal_and_tangent(name, inplace, outofplace):
    x, xt = torch.randn(2, 3, 4, 4, **f64), torch.randn(2, 2, 3, 4, 4, **f64)
    d = Dual(x, xt)
    result = inplace(d)
    y, yt = _jvp(outofplace, (x, xt))
    assert result is d, name
    torch.testing.assert_close(d.primal, y)
    torch.testing.assert_close(d.tangents, yt)
    assert torch.equal(x, Dual(x).primal)  # the tensors themselves are not written


@pytest.mark.parametrize("inplace,outofplace", [
    (lambda d: d.sigmoid_(), torch.sigmoid), (lambda d: d.exp_(), torch.exp),
    (lambda d: d.addcmul_(d, d, value=0.5), lambda v: v + 0.5 * v * v),
    (lambda d: d.sin_(), torch.sin)], ids=["sigmoid_", "exp_", "addcmul_", "sin_"])
def test_inplace_op_without_rule_rebinds_to_its_out_of_place_result(inplace, outofplace):
    x, xt = torch.randn(3, **f64), torch.randn(2, 3, **f64)
    d = Dual(x, xt)
    assert inplace(d) is d
    y, yt = _jvp(outofplace, (x, xt))
    torch.testing.assert_close(d.primal, y)
    torch.testing.assert_close(d.tangents, yt)
    assert not torch.equal(d.primal, x)  # rebound, the input tensor left as it was


def test_a_plain_tensor_written_from_a_dual_takes_the_primal_only_under_no_grad():
    d = Dual(torch.randn(3, **f64), torch.randn(3, **f64))
    buffer = torch.zeros(3, **f64)
    with pytest.raises(RuntimeError, match="would write a Dual into a plain tensor"):
        buffer.add_(d)
    with pytest.raises(RuntimeError, match="out= would write a Dual into a plain tensor"):
        torch.mul(d, 2.0, out=buffer)
    with torch.no_grad():  # state, as running statistics: the primal
        buffer.add_(d)
        torch.mul(d, 2.0, out=buffer)
    torch.testing.assert_close(buffer, d.primal * 2)


class _AddsIntoATemporary(nn.Module):
    """``out += h`` (``Tensor.__iadd__``) into a zero tensor of the forward's own; with
    ``viewed``, a row of it taken before the write and returned beside it."""

    def __init__(self, viewed: bool):
        super().__init__()
        self.fc, self.viewed = nn.Linear(3, 3), viewed

    def forward(self, x):
        h = self.fc(x)
        out = torch.zeros_like(h)
        row = out[1] if self.viewed else None
        out += h
        out *= h
        return out if row is None else (out, row)


def test_augmented_assignment_into_a_temporary_is_in_place():
    """``out += h`` writes the tensor as ``out.add_(h)`` does: it becomes a Dual where nothing
    views it, and is refused by name where a row of it would keep its values (torch turns a
    TypeError in ``+=`` into Python's out-of-place ``out = out + h``: the row stayed zero,
    without error); a plain tensor outside a pass is refused as its ``add_`` is."""
    x, xt = torch.randn(2, 3, **f64), torch.randn(1, 2, 3, **f64)
    model = _AddsIntoATemporary(viewed=False).double()
    tangents = {n: torch.randn(1, *p.shape, **f64) for n, p in model.named_parameters()}
    y, yt = model_jvp(model, [x], [xt], tangents)
    fgkernels.set_tangents(model, tangents)
    out = model(Dual(x, xt))
    torch.testing.assert_close(out.primal, y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.tangents, yt, rtol=1e-12, atol=1e-12)
    model.viewed = True
    with pytest.raises(RuntimeError, match="'Tensor.add_' would write a Dual"):
        model(Dual(x, xt))
    buffer, d = torch.zeros(3, **f64), Dual(x[0], xt[0, 0])
    with pytest.raises(RuntimeError, match="'Tensor.mul_' would write a Dual into a plain"):
        buffer *= d


class _FillsATemporary(nn.Module):
    """A forward that fills zero tensors of its own from Duals (Longformer's chunks by
    ``__setitem__``, an MoE's experts summed by ``index_add_``, RWKV's steps, ``out=``), and
    keeps a running mean as state, a buffer and an attribute."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.register_buffer("running", torch.zeros(3, **f64))
        self.attribute_state = torch.zeros(3, **f64)
        self.out_form = False

    def forward(self, x):
        h = self.fc(x)
        with torch.no_grad():
            self.running.mul_(0.9).add_(h.mean(0))
            self.attribute_state[:] = h.mean(0)
        out = torch.zeros_like(h)
        out[:, 1:] = h[:, 1:].exp()
        out.index_add_(0, torch.tensor([1, 0]), h)
        if self.out_form:  # (forward_ad takes no out=: its oracle is the op out of place)
            squares = torch.empty_like(h)
            torch.mul(h, h, out=squares)
        else:
            squares = h * h
        out.add_(squares)
        self.temporary = out
        return out  # (the tensor itself: the pass returns its Dual)


@pytest.mark.parametrize("tangents_of", ["parameters and input", "input"])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_a_temporary_filled_from_duals_becomes_a_dual(grad, tangents_of):
    """A tensor a forward makes and fills from Duals takes their tangents, as forward_ad's
    write makes it dual (it was refused, or under no_grad left without them; with the
    input's tangent alone, a JVP along the input, too); a module's buffer or attribute still
    takes the primal."""
    model = _FillsATemporary().double()
    x = torch.randn(2, 3, **f64)
    xt = torch.randn(1, *x.shape, **f64)
    tangents = {n: torch.randn(1, *p.shape, **f64) for n, p in model.named_parameters()
                if tangents_of == "parameters and input"}
    y, yt = model_jvp(model, [x], [xt], tangents)
    fgkernels.set_tangents(model, tangents)
    model.out_form = True
    with torch.set_grad_enabled(grad):
        out = model(Dual(x, xt))
    torch.testing.assert_close(out.primal, y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.tangents, yt, rtol=1e-12, atol=1e-12)
    h = model.fc(x).mean(0).detach()  # the state took the primal
    torch.testing.assert_close(model.running, h)
    torch.testing.assert_close(model.attribute_state, h)
    # the temporary itself a plain tensor again, of the primal's values
    assert type(model.temporary) is torch.Tensor and not has_tangent(model.temporary)
    torch.testing.assert_close(model.temporary, out.primal)


class _PadsABatch(nn.Module):
    """Pads two maps of different heights into one zero batch of its own, laid out as
    ``layout`` says, each map written through a view of the batch (torchvision's detection
    models pad their images so); ``view``: it reads the first view written after the writes
    ("read after"), or takes a view of the batch before them and reads it ("taken before")."""

    def __init__(self, layout="contiguous", view=None):
        super().__init__()
        self.fc, self.layout, self.view = nn.Linear(3, 3), layout, view

    def forward(self, x):
        h = self.fc(x).permute(0, 3, 1, 2)  # (N, C, H, W)
        maps = [h[0], h[1, :, :2]]
        if self.layout == "strided":  # (neither contiguous nor channels_last)
            batch = torch.empty_strided(h.shape, (1, 2, 12, 6), dtype=h.dtype).zero_()
        else:
            fmt = torch.channels_last if self.layout == "channels_last" \
                else torch.contiguous_format
            batch = x.new_zeros(h.shape).contiguous(memory_format=fmt)
        early = batch[0] if self.view == "taken before" else None
        written = []
        for i, m in enumerate(maps):
            view = batch[i, :, :m.shape[1]]
            view.copy_(m)
            written.append(view)
        if self.view == "read after":
            return batch, written[0] * 2
        if self.view == "taken before":
            return batch, early * 2
        return batch


@pytest.mark.parametrize("layout,view", [
    ("contiguous", None), ("channels_last", None), ("contiguous", "read after"),
    ("contiguous", "taken before"), ("strided", None)])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_a_batch_padded_through_views_of_its_own_becomes_a_dual(grad, layout, view):
    """A Dual written into a view of a tensor of the forward's own (contiguous or
    channels_last) that nothing else views makes the tensor a Dual, as forward_ad's write does
    (it was refused: torchvision's detection models padding a batch of Duals), and the view
    read after the write carries the tangent written. Where another view of the tensor was
    taken before, which would keep the values without their tangent, or where the tensor is
    laid out otherwise, the write is refused by name."""
    model = _PadsABatch(layout, view).double()
    x = torch.randn(2, 4, 2, 3, **f64)
    xt = torch.randn(2, *x.shape, **f64)
    tangents = {n: torch.randn(2, *p.shape, **f64) for n, p in model.named_parameters()}
    fgkernels.set_tangents(model, tangents)
    if view == "taken before" or layout == "strided":
        refusal = "would write a Dual.* into a plain tensor"
        with torch.set_grad_enabled(grad), pytest.raises(RuntimeError, match=refusal):
            model(Dual(x, xt))
        return
    oracle = model_jvp(model, [x], [xt], tangents)
    with torch.set_grad_enabled(grad):
        out = model(Dual(x, xt))
    for got, (y, yt) in zip(out if view else [out], zip(*oracle) if view else [oracle]):
        torch.testing.assert_close(got.primal, y, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got.tangents, yt, rtol=1e-12, atol=1e-12)


class _Writes(nn.Module):
    """A forward that writes ``h = fc(x)`` into tensors of its own in one of the ways
    ``way`` names, and returns what it wrote."""

    def __init__(self, way: str):
        super().__init__()
        self.fc, self.way = nn.Linear(3, 3), way
        self.codebook = nn.Parameter(torch.zeros(3, **f64), requires_grad=False)

    def forward(self, x):
        h = self.fc(x)
        if self.way == "out= of a one-operand op":
            buf = torch.empty_like(h)
            torch.exp(h, out=buf)
            return buf
        if self.way == "a Dual without tangent first":
            buf = torch.zeros(2, 6, **f64)
            buf[:, 3:] = Dual(torch.ones(2, 3, **f64))  # (nothing to lose: its primal)
            buf[:, :3] = h
            return buf
        if self.way == "in a dataclass":
            buf = torch.zeros_like(h)
            buf[:] = h.sin()
            return _Out(buf, 2)
        if self.way == "beside None":  # (a layer's output, its cache None)
            buf = torch.zeros_like(h)
            buf[:] = h.sin()
            return buf, None
        if self.way == "views taken first":
            buf = torch.zeros_like(h)
            rows = buf[0], buf[1]
            buf[:] = h  # (refused: the rows would keep the values without the tangent)
            return rows[0] + rows[1]
        if self.way == "a frozen parameter and integer codes":
            with torch.no_grad():  # state: the primal
                self.codebook.mul_(0.5).add_(h.mean(0))
            codes = torch.empty(h.shape, dtype=torch.long)
            codes.copy_(h * 10)  # a tensor that has no tangent, grad or not: the primal
            self.codes = codes
            return h
        raise AssertionError(self.way)


@dataclasses.dataclass
class _Out:
    value: torch.Tensor
    count: int


_ORACLE_FORWARD = {  # forward_ad takes no out= and returns no dataclass of duals
    "out= of a one-operand op": lambda m, x: m.fc(x).exp(),
    "in a dataclass": lambda m, x: m.fc(x).sin(),
    "beside None": lambda m, x: m.fc(x).sin(),
}


@pytest.mark.parametrize("way", ["out= of a one-operand op", "a Dual without tangent first",
                                 "in a dataclass", "beside None",
                                 "a frozen parameter and integer codes"])
def test_the_ways_a_forward_writes_duals_into_its_own_tensors(way):
    """``out=`` where the Dual is the op's only operand, a Dual without tangent written first,
    a temporary returned in a dataclass or beside None (which crashed the pass's end), a
    frozen parameter and an integer tensor written under no_grad: each as forward_ad (the
    state takes the primal)."""
    model = _Writes(way).double()
    x = torch.randn(2, 3, **f64)
    xt = torch.randn(1, *x.shape, **f64)
    tangents = {n: torch.randn(1, *p.shape, **f64) for n, p in model.named_parameters()
                if p.requires_grad}
    ref = copy.deepcopy(model)
    if way in _ORACLE_FORWARD:  # (a forward forward_ad can run, bound to the copy)
        ref.forward = lambda x: _ORACLE_FORWARD[way](ref, x)
    y, yt = model_jvp_in_place(ref, [x], [xt], tangents)
    fgkernels.set_tangents(model, tangents)
    out = model(Dual(x, xt))
    if way == "in a dataclass":
        assert out.count == 2
        out = out.value
    if way == "beside None":
        out, none = out
        assert none is None
    torch.testing.assert_close(out.primal, y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.tangents, yt, rtol=1e-12, atol=1e-12)
    if way == "a frozen parameter and integer codes":
        h = model.fc(x).detach()
        torch.testing.assert_close(model.codebook.data, h.mean(0))
        assert torch.equal(model.codes, (h * 10).long())


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_a_tensor_viewed_before_a_dual_is_written_into_it_is_refused(grad):
    """Views of a tensor taken before a Dual is written into it would keep its values
    without the tangent: the write is refused by name, with grad or without."""
    model = _Writes("views taken first").double()
    fgkernels.random_tangents(model)
    x = torch.randn(2, 3, **f64)
    with torch.set_grad_enabled(grad), \
            pytest.raises(RuntimeError, match="other tensors view" if not grad else
                          "would write a Dual into a plain tensor"):
        model(Dual(x, torch.randn_like(x)))


# --- NaN and Inf as forward_ad has them ---------------------------------------------------------
def test_relu_at_nan_and_nonfinite_tangents_match_forward_ad(backend):
    x = torch.tensor([float("nan"), 1.0, -1.0, -2.0, 0.0], **f64)
    xt = torch.tensor([[5.0, 5.0, 5.0, float("nan"), float("inf")]], **f64)
    out = F.relu(Dual(x, xt))
    _, yt = _jvp(F.relu, (x, xt))
    assert out.tangents.tolist() == yt.tolist() == [[5.0, 5.0, 0.0, 0.0, 0.0]]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_primal_in_training_bn_relu_gives_nan_as_forward_ad(backend, bad):
    ref = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU()).double()
    net = fgkernels.convert(copy.deepcopy(ref))
    x, xt = torch.randn(2, 3, 4, 4, **f64), torch.randn(1, 2, 3, 4, 4, **f64)
    x[1, 1, 2, 2] = bad
    out = net(Dual(x, xt))
    _, yt = _jvp(copy.deepcopy(ref), (x, xt))
    assert torch.equal(out.tangents.isnan(), yt.isnan())
    assert out.tangents[:, :, 1].isnan().all()  # the whole channel, not zeros
    torch.testing.assert_close(out.tangents[:, :, [0, 2]], yt[:, :, [0, 2]])
    # the running statistics as torch's: an Inf mean (not NaN: the sums' shift, the mean of the
    # values holding the Inf, made every shifted sum NaN), a NaN variance
    plain = copy.deepcopy(ref)
    plain(x)
    for ours, torchs in ((net[0].running_mean, plain[0].running_mean),
                         (net[0].running_var, plain[0].running_var)):
        torch.testing.assert_close(ours, torchs, equal_nan=True)


@pytest.mark.parametrize("shape,channels_last", [((4, 2, 3, 3), True), ((64, 2, 2, 2), False),
                                                 ((8, 2, 16, 16), True), ((3, 2, 5, 7), False)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("value", [float("inf"), -float("inf")])
def test_an_infinite_tangent_makes_a_training_bn_channel_nan_as_forward_ad(backend, shape,
                                                                          channels_last, dtype,
                                                                          value):
    """One infinite tangent value: its channel's tangent is NaN throughout, as forward_ad's
    (whose covariance centres ẋ by its infinite mean), on small planes and large, in both
    layouts; not a mix of ±Inf and NaN, which a covariance taken as Σ(x−k)·ẋ/n − d1·mean(ẋ)
    gives by the signs of its two infinite terms. The other channel is unchanged."""
    x = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(3))
    xt = torch.randn(1, *shape, dtype=dtype, generator=torch.Generator().manual_seed(4))
    xt[0, 0, 0, 0, 0] = value
    if channels_last:
        x, xt = laid_out(x, "channels_last"), laid_out(xt, "channels_last")
    w, b = torch.linspace(0.5, 2, 2, dtype=dtype), torch.tensor([0.3, -0.2], dtype=dtype)
    fn = lambda v: F.batch_norm(v, None, None, w, b, True)
    out = fn(Dual(x, xt))
    _, yt = _jvp(fn, (x, xt))
    assert out.tangents[:, :, 0].isnan().all() and yt[:, :, 0].isnan().all()
    torch.testing.assert_close(out.tangents[:, :, 1], yt[:, :, 1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("value", [float("inf"), -float("inf")])
def test_an_infinite_tangent_makes_a_layer_norm_row_nan_as_forward_ad(backend, dtype, value):
    """An infinite tangent value at each place of a row in turn: that row's tangent is NaN
    throughout, as forward_ad's (which centres ẋ by its infinite mean), the other rows
    unchanged; with weight and bias tangents summed into the same slot."""
    x = torch.randn(3, 2, 7, dtype=dtype, generator=torch.Generator().manual_seed(5))
    w, b = torch.linspace(0.5, 2, 7, dtype=dtype), torch.linspace(-1, 1, 7, dtype=dtype)
    wt, bt = torch.ones(1, 7, dtype=dtype), torch.full((1, 7), 0.5, dtype=dtype)
    fn = lambda v, w_, b_: F.layer_norm(v, (7,), w_, b_)
    for place in range(7):
        xt = torch.randn(1, 3, 2, 7, dtype=dtype, generator=torch.Generator().manual_seed(place))
        xt[0, 1, 0, place] = value
        out = fn(Dual(x, xt), Dual(w, wt), Dual(b, bt))
        _, yt = _jvp(fn, (x, xt), (w, wt), (b, bt))
        assert torch.equal(out.tangents.isnan(), yt.isnan()) and yt[0, 1, 0].isnan().all()
        assert out.tangents.isnan().sum() == 7
        finite = yt.isfinite()
        torch.testing.assert_close(out.tangents[finite], yt[finite], rtol=1e-5, atol=1e-5)


def test_a_gru_with_an_infinite_new_gate_tangent_is_nan_as_forward_ad():
    """An Inf in the tangent of the GRU's new gate: NaN, as torch's composition of the cell,
    (ḣ − ṅ)·z + (h − n)·ż + ṅ, gives it (the rule's (1 − z)·ṅ + z·ḣ gave +Inf)."""
    torch.manual_seed(0)
    gru = nn.GRU(1, 1).double()
    x = torch.tensor([[[0.5]]], **f64)
    row = torch.zeros(1, 3, 1, **f64)
    row[0, 2, 0] = float("inf")  # the new gate's row of weight_ih
    (_, _), (yt, _) = model_jvp(gru, [x], [None], {"weight_ih_l0": row})
    fgkernels.set_tangents(gru, {"weight_ih_l0": row})
    out, _ = gru(Dual(x))
    assert yt.isnan().all() and out.tangents.isnan().all()


@pytest.mark.parametrize("loss", [F.mse_loss, F.l1_loss, F.huber_loss])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_weighted_regression_losses_match_forward_ad(loss, reduction):
    """Per-element weights, given by keyword: F.l1_loss's never reaches an override in torch
    (2.13, 2.14: it is left out of the call handed to ``__torch_function__``), and the L1 rule
    reads it from the call's frame; the loss and its tangents are forward_ad's."""
    torch.manual_seed(0)
    x, y, w = torch.randn(3, 2, **f64), torch.randn(3, 2, **f64), torch.rand(3, 2, **f64)
    xt = torch.randn(2, 3, 2, **f64)
    out = loss(Dual(x, xt), y, reduction=reduction, weight=w)
    value, yt = _jvp(lambda v: loss(v, y, reduction=reduction, weight=w), (x, xt))
    torch.testing.assert_close(out.primal, value)
    torch.testing.assert_close(out.tangents, yt)


@pytest.mark.parametrize("loss", [
    F.mse_loss, F.l1_loss, F.smooth_l1_loss, F.huber_loss,
    lambda a, b, reduction: F.huber_loss(a, b, reduction, 0.5),
    lambda a, b, reduction: F.smooth_l1_loss(a, b, reduction=reduction, beta=0.0)],
    ids=["mse", "l1", "smooth_l1", "huber", "huber delta 0.5", "smooth_l1 beta 0"])
def test_regression_losses_at_nan_ties_and_kinks_match_forward_ad(loss):
    """A NaN difference (the slope is NaN for smooth L1 and Huber, 0 for L1, as torch's), a
    tie, differences at ±0.5 and ±1 (the kinks of δ = 0.5 and β = δ = 1) and an Inf tangent."""
    x = torch.tensor([float("nan"), 0.0, 0.5, -0.5, 1.0, -1.0, 2.0], **f64)
    y = torch.zeros(7, **f64)
    xt = torch.tensor([[3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0], [1.0] * 6 + [float("inf")]], **f64)
    for reduction in ("none", "sum"):
        with fgkernels.strict_rules():
            out = loss(Dual(x, xt), y, reduction=reduction)
        _, yt = _jvp(lambda v: loss(v, y, reduction=reduction), (x, xt))
        torch.testing.assert_close(out.tangents, yt, equal_nan=True, rtol=0, atol=0)


def test_logsumexp_over_an_empty_dim_is_minus_inf_with_nan_tangents_as_forward_ad():
    x, xt = torch.randn(2, 0, **f64), torch.randn(3, 2, 0, **f64)
    with fgkernels.strict_rules():
        out = torch.logsumexp(Dual(x, xt), 1)
    y, yt = _jvp(lambda v: torch.logsumexp(v, 1), (x, xt))
    assert out.primal.tolist() == y.tolist() == [-math.inf] * 2
    assert out.tangents.isnan().all() and yt.isnan().all() and out.tangents.shape == yt.shape


def test_cross_entropy_with_every_target_ignored_is_nan_as_forward_ad():
    z, zt = torch.randn(3, 4, **f64), torch.randn(1, 3, 4, **f64)
    target = torch.full((3,), -100)
    out = F.cross_entropy(Dual(z, zt), target)
    _, lt = _jvp(lambda v: F.cross_entropy(v, target), (z, zt))
    assert out.primal.isnan() and out.tangents.isnan().all() and lt.isnan().all()


# --- numerics ---------------------------------------------------------------------------------
@pytest.mark.skipif("native" not in fgkernels.available_backends(), reason="needs fgkernels._C")
@pytest.mark.parametrize("case", ["one large plane", "many rows of one channel", "rows of 64"])
@pytest.mark.parametrize("outlier", [False, True], ids=["", "first value 4 std out"])
def test_batch_norm_statistics_of_large_channels_are_as_precise_as_torch(case, outlier):
    """A channel of a million float32 values (one NCHW plane; channels_last rows), its first
    value 4 std from the mean or not: the CPU kernel's mean and variance (and a tangent's
    mean and covariance) within twice torch's own float32 error of the float64 truth."""
    shape, fmt = {"one large plane": ((1, 2, 1024, 1024), torch.contiguous_format),
                  "many rows of one channel": ((64, 1, 128, 128), torch.channels_last),
                  "rows of 64": ((256, 64, 16, 16), torch.channels_last)}[case]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * 2 + 3
    if outlier:
        x[0, :, 0, 0] = 3 + 8
    x = x.contiguous(memory_format=fmt)
    xt = torch.randn(1, *shape, generator=g).mul(0.5).add(1)
    xt = fgkernels.dual.layout.slots_in_format(xt, fmt)
    dims = (0, 2, 3)
    truth = (x.double().mean(dims), x.double().var(dims, unbiased=False),
             xt[0].double().mean(dims),
             ((x.double() - x.double().mean(dims, keepdim=True)) * xt[0].double()).mean(dims))
    var32, mean32 = torch.var_mean(x, dims, unbiased=False)
    tmean32 = xt[0].mean(dims)
    tcov32 = ((x - mean32.view(1, -1, 1, 1)) * xt[0]).mean(dims)
    ours = torch.ops.fgkernels.dual_bn_stats(x, xt)
    scale = [truth[1].sqrt(), truth[1], xt[0].double().std(dims), truth[1].sqrt()]
    for got, torch32, want, unit in zip([ours[0], ours[1], ours[2][0], ours[3][0]],
                                        [mean32, var32, tmean32, tcov32], truth, scale):
        err = lambda v: ((v.double() - want).abs() / unit).max().item()
        assert err(got) <= 2 * err(torch32) + 1e-7, (err(got), err(torch32))


def test_batch_norm_far_from_zero_is_as_precise_as_torch(backend):
    """A channel with mean 1e4 and std 1e-2 in float32: err ≤ 2·err_torch + atol."""
    x = (torch.randn(8, 4, 6, 6, **f64) * 1e-2 + 1e4).float()
    xt = torch.randn(1, *x.shape)
    out = fgkernels.convert(nn.BatchNorm2d(4))(Dual(x, xt))
    assert_within_torch_error(out, ForwardADOracle(_training_batch_norm, [x], [xt]))


def test_batch_norm_does_not_hang_on_a_channel_s_first_values(backend):
    """Image 0's first rows at 0 (a border, a dead ReLU region) in channels of mean 1 and std
    1e-3, float32: err ≤ 2·err_torch + atol. (The CPU kernel shifted its sums by the mean of
    each channel's first 256 values, 0 here, far from the mean in units of std: 1.5e-5 off at
    the output, where torch is 1e-6 off; its shift is now sampled across the whole channel.)"""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 4, 32, 32, generator=g).mul(1e-3).add(1)
    x[0, :, :8] = 0
    xt = torch.randn(1, *x.shape, generator=g)
    out = fgkernels.convert(nn.BatchNorm2d(4))(Dual(x, xt))
    assert_within_torch_error(out, ForwardADOracle(_training_batch_norm, [x], [xt]))


@pytest.mark.parametrize("width", [1, 8])
def test_layer_norm_of_rows_without_spread_is_as_precise_as_torch(backend, width):
    """Rows of one value (one element, or eight equal ones) near 1e4 in float32, where
    r = 1/√eps: ẋ's mean is taken out before the scale, as torch's forward mode does (scaled
    first, the rounding of r·ẋ stayed: 2e-5 relative where torch's error is 3e-8)."""
    x = (torch.randn(5, 1, **f64) + 1e4).expand(5, width).float().contiguous()
    xt, b, bt = torch.randn(1, 5, width), torch.randn(width), torch.randn(1, width)
    fn = lambda v, bias: F.layer_norm(v, (width,), None, bias)
    out = fn(Dual(x, xt), Dual(b, bt))
    assert_within_torch_error(out, ForwardADOracle(fn, [x, b], [xt, bt]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_running_stats_are_rounded_once(backend, dtype):
    """The running stats are the exact update rounded once, so never further from it than
    nn.BatchNorm2d's."""
    ref = nn.BatchNorm2d(6).to(dtype)
    ref.running_mean.uniform_(-1, 1)
    ref.running_var.uniform_(0.5, 2)
    net = fgkernels.convert(copy.deepcopy(ref))
    x = (torch.randn(7, 6, 5, 3) * 3 + 1).to(dtype)
    x64 = x.double()
    exact_mean = 0.1 * x64.mean((0, 2, 3)) + 0.9 * ref.running_mean.double()
    exact_var = 0.1 * x64.var((0, 2, 3)) + 0.9 * ref.running_var.double()
    ref(x)
    net(Dual(x, torch.randn(1, *x.shape).to(dtype)))
    for ours, theirs, exact in ((net.running_mean, ref.running_mean, exact_mean),
                                (net.running_var, ref.running_var, exact_var)):
        assert ((ours.double() - exact).abs() <= (theirs.double() - exact).abs()).all()


# --- stale tangents, unclear errors -------------------------------------------------------------
def test_a_parameter_replaced_after_set_tangents_is_refused():
    conv = fgkernels.nn.DualConv2d(2, 3, 3)
    fgkernels.random_tangents(conv)
    conv.weight = nn.Parameter(torch.randn(3, 2, 1, 1))
    with pytest.raises(RuntimeError, match="weight was replaced after its tangent was set"):
        conv(Dual(torch.randn(1, 2, 5, 5), torch.randn(1, 2, 5, 5)))
    fgkernels.random_tangents(conv)  # set again: fine
    assert conv(Dual(torch.randn(1, 2, 5, 5))).shape == (1, 3, 5, 5)
    # functional_call swaps in tensors of its own for the call: the error names it
    with pytest.raises(RuntimeError, match="functional_call swaps in the tensors it is given"):
        torch.func.functional_call(conv, {"weight": torch.randn(3, 2, 3, 3)},
                                   (Dual(torch.randn(1, 2, 5, 5)),))
    assert conv(Dual(torch.randn(1, 2, 5, 5))).tangents.shape == (1, 1, 3, 5, 5)


def _over_a_forward_ad_dual(tangent_too: bool = False):
    """A Dual made of forward_ad's dual tensors (forward mode nested over a Dual)."""
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():
        x = fwAD.make_dual(torch.randn(2, 3), torch.randn(2, 3))
        if tangent_too:
            return Dual(torch.randn(2, 3), x)
        return Dual(x, torch.randn(2, 3))


def _inside_func_jvp():
    """A Dual made of torch.func.jvp's input inside it."""
    return torch.func.jvp(lambda x: Dual(x, torch.randn(2, 3)).primal, (torch.randn(2, 3),),
                          (torch.randn(2, 3),))


def _with_a_forward_ad_operand():
    """A Dual's op with an operand of forward_ad's."""
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():
        return Dual(torch.randn(2, 3), torch.randn(2, 3)) * fwAD.make_dual(torch.randn(2, 3),
                                                                            torch.randn(2, 3))


def _over_a_converted_layer_s_weight():
    """torch.func.jvp along a converted convolution's weight, called with a Dual (its rule
    reads the weight without Dual's dispatch)."""
    conv = fgkernels.convert(nn.Conv2d(2, 3, 3))
    x = Dual(torch.randn(1, 2, 5, 5), torch.randn(1, 2, 5, 5))
    return torch.func.jvp(
        lambda w: torch.func.functional_call(conv, {"weight": w}, (x,)).primal,
        (conv.weight.detach(),), (torch.randn_like(conv.weight),))


def _under_autocast(call):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return call()


def _with_tangents(layer: nn.Module) -> nn.Module:
    fgkernels.random_tangents(layer)
    return layer


@pytest.mark.parametrize("way", ["as built", "converted", "functional", "compiled"])
def test_a_dual_pass_under_autocast_is_refused_however_it_runs(way):
    """A converted twin's and the functional face's rules run without Dual's dispatch, and a
    compiled pass would trace the refusal: each refuses autocast too (a converted Linear failed
    inside the native op, or gave a bfloat16 primal float32 slots), and an autocast of
    another device type, which casts nothing here, is no reason to refuse."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    fgkernels.random_tangents(net)
    call = {"as built": net, "converted": fgkernels.convert(copy.deepcopy(net)),
            "functional": lambda d: DF.linear(d, torch.randn(4, 3)),
            "compiled": fgkernels.compile(net, backend="aot_eager")}[way]
    x = torch.randn(2, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16), \
            pytest.raises(RuntimeError, match="a Dual met torch.autocast"):
        call(Dual(x, torch.randn(2, 3)))
    torch.set_autocast_enabled("cuda", True)  # (torch.autocast("cuda") without a GPU is off)
    try:
        out = call(Dual(x, torch.randn(2, 3)))
    finally:
        torch.set_autocast_enabled("cuda", False)
    assert out.dtype == out.tangents.dtype == torch.float32


@pytest.mark.parametrize("case,error,message", [
    (lambda: Dual(torch.randn(2, 3), torch.randn(0, 2, 3)), ValueError, "T >= 1"),
    (_over_a_forward_ad_dual, TypeError, "forward mode nested over a Dual is not supported"),
    (lambda: _over_a_forward_ad_dual(tangent_too=True), TypeError,
     "met a dual tensor of torch's forward mode"),
    (_inside_func_jvp, TypeError, "met a dual tensor of torch's forward mode"),
    (_with_a_forward_ad_operand, TypeError, "met a dual tensor of torch's forward mode"),
    (_over_a_converted_layer_s_weight, TypeError, "met a dual tensor of torch's forward mode"),
    (lambda: Dual(torch.randn(2, 3), torch.randn(2, 3, device="meta")), ValueError,
     "is on meta, but the primal is on cpu"),
    (lambda: fgkernels.set_tangents(fgkernels.nn.DualLinear(3, 2),
                                    {"weight": torch.randn(0, 2, 3)}),
     ValueError, "T >= 1"),
    (lambda: F.linear(Dual(torch.tensor(1.0), torch.tensor(1.0)), torch.randn(3, 1)),
     ValueError, "input must have at least 1 dim"),
    (lambda: F.linear(Dual(torch.randn(2, 4), torch.randn(2, 4)),
                      Dual(torch.randn(3, 4), torch.randn(2, 3, 4)),
                      Dual(torch.randn(3), torch.randn(3, 3))),
     ValueError, "different numbers of tangents T \\[2, 3\\]"),
    (lambda: F.batch_norm(Dual(torch.randn(2, 3, 4), torch.randn(2, 3, 4)),
                          Dual(torch.zeros(3)), torch.ones(3)),
     TypeError, "running_mean must be a Tensor or None, got Dual"),
    (lambda: F.conv2d(Dual(torch.randn(1, 4, 5, 5), torch.randn(1, 4, 5, 5)),
                      torch.randn(4, 4, 3, 3), groups=0),
     ValueError, "groups must be a positive int, got 0"),
    (lambda: torch.where(Dual(torch.ones(2)), torch.ones(2), torch.ones(2)),
     TypeError, "condition must be a bool Tensor"),
    (lambda: Dual(torch.ones(2) > 0, torch.ones(2) > 0), TypeError,
     "primal must have a floating or complex dtype"),
    (lambda: Dual(torch.arange(3)), TypeError, "primal must have a floating or complex dtype"),
    (lambda: fgkernels.set_tangents(fgkernels.nn.DualLinear(3, 2),
                                    {"weight": torch.randn(2, 3), "bias": torch.randn(1, 2)}),
     ValueError, "in its parameter's shape .* or every one stacked"),
    (lambda: Dual(torch.ones(2), torch.ones(2, 2), directions="ab"), TypeError,
     "directions must be a sequence of ints, got 'ab'"),
    (lambda: Dual(torch.ones(2), torch.ones(1, 2), directions=5), TypeError,
     "directions must be a sequence of ints, got 5"),
    (lambda: Dual(torch.ones(2), torch.ones(1, 2), directions=[True]), TypeError,
     "directions must be a sequence of ints"),
    (lambda: DF.add_direction(Dual(torch.ones(2)), "a", torch.ones(2)), ValueError,
     "add_direction: direction must be a non-negative int, got 'a'"),
    (lambda: DF.add_direction(Dual(torch.ones(2)), 0, [1.0, 2.0]), TypeError,
     "add_direction: tangent must be a Tensor, got list"),
    (lambda: DF.add_direction("x", 0, torch.ones(2)), TypeError,
     "add_direction: expected a Dual or Tensor input, got str"),
    (lambda: fgkernels.clear_tangents(None), TypeError,
     "clear_tangents: expected an nn.Module, got NoneType"),
    (lambda: fgkernels.nn.reuse_conv_outputs(None).__enter__(), TypeError,
     "reuse_conv_outputs: expected an nn.Module, got NoneType"),
    (lambda: F.conv1d(Dual(torch.randn(2, 3, 5), torch.randn(2, 3, 5)), torch.randn(4, 2, 3)),
     ValueError, "conv1d: input has 3 channels, but weight of shape \\(4, 2, 3\\)"),
    (lambda: F.conv1d(Dual(torch.randn(2, 4, 5)), torch.randn(4, 4, 3), stride=(1, 1)),
     ValueError, "conv1d: stride must be an int >= 1 or a 1-tuple of one, got \\(1, 1\\)"),
    (lambda: torch.mm(Dual(torch.randn(2, 3, 4), torch.randn(2, 3, 4)), torch.randn(4, 5)),
     RuntimeError, "self must be a matrix"),
    (lambda: torch.bmm(Dual(torch.randn(3, 4), torch.randn(3, 4)), torch.randn(4, 5)),
     RuntimeError, "batch1 must be a 3D tensor"),
    (lambda: F.scaled_dot_product_attention(*[Dual(torch.randn(4), torch.randn(4))] * 3),
     ValueError, "scaled_dot_product_attention: query, key and value must be at least 2-D"),
    (lambda: F.scaled_dot_product_attention(Dual(torch.randn(1, 8, 3, 4), torch.randn(1, 8, 3, 4)),
                                            torch.randn(1, 3, 3, 4), torch.randn(1, 3, 3, 4),
                                            enable_gqa=True),
     ValueError, "the number of heads in key and value must divide the number in query"),
    (lambda: nn.MultiheadAttention(8, 2)(Dual(torch.randn(3, 2, 8)), torch.randn(4, 2, 8),
                                         torch.randn(4, 2, 8),
                                         key_padding_mask=torch.zeros(2, 5, dtype=torch.bool)),
     ValueError, r"key_padding_mask must have shape \(2, 4\) \(batch, keys\), got \(2, 5\)"),
    (lambda: nn.MultiheadAttention(8, 2)(Dual(torch.randn(3, 2, 8)), torch.randn(4, 2, 8),
                                         torch.randn(4, 2, 8), attn_mask=torch.zeros(1, 3, 4)),
     ValueError, r"a 3-D attn_mask must have shape \(4, 3, 4\), got \(1, 3, 4\)"),
    # (torch's forward refuses an integer mask itself; the twin hands a Dual mask's call to the
    # rule, which must too: an integer mask added to the scores would be a bias of 0s and 1s)
    (lambda: fgkernels.convert(nn.MultiheadAttention(8, 2))(
        Dual(torch.randn(3, 2, 8)), torch.randn(4, 2, 8), torch.randn(4, 2, 8),
        attn_mask=Dual(torch.randn(3, 4), torch.randn(3, 4)),
        key_padding_mask=torch.zeros(2, 4, dtype=torch.long)),
     TypeError, "multi_head_attention: key_padding_mask must be a bool or floating mask, got "
                "torch.int64"),
    (lambda: F.batch_norm(Dual(torch.randn(2, 3, 4), torch.randn(2, 3, 4)), None, torch.ones(3),
                          training=True),
     ValueError, "running_mean and running_var must either both be None or neither be None"),
    # (torch's own instance norm, which the rule calls for the value, dispatched the Dual
    # statistics back to the rule: a RecursionError)
    (lambda: F.instance_norm(Dual(torch.randn(2, 3, 5), torch.randn(2, 3, 5)),
                             Dual(torch.zeros(3), torch.randn(3)), torch.ones(3)),
     TypeError, "instance_norm: running_mean must be a Tensor or None, got Dual"),
    (lambda: F.batch_norm(Dual(torch.randn(2, 3, 4), torch.randn(2, 3, 4)),
                          torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64),
                          training=True),
     TypeError, "must share one dtype, torch.float32 beside a torch.float32 input, got "
     "running_mean torch.float64, running_var torch.float64"),
    (lambda: F.batch_norm(Dual(torch.randn(2, 3, 4, dtype=torch.bfloat16)), torch.zeros(3),
                          torch.ones(3), torch.ones(3, dtype=torch.bfloat16), training=True),
     TypeError, "torch.bfloat16 or torch.float32 beside a torch.bfloat16 input, got "
     "weight torch.bfloat16, running_mean torch.float32, running_var torch.float32"),
    # (a float64 batch into a float32 layer: the input's dtype named, not a tangent's or batch
    # norm's statistics')
    (lambda: fgkernels.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))(
        Dual(torch.randn(2, 3, 6, 6, dtype=torch.float64))),
     TypeError, "conv2d: input is torch.float64 but weight is torch.float32; they must have one "
                "dtype"),
    (lambda: _with_tangents(nn.Linear(6, 4))(Dual(torch.randn(2, 6, dtype=torch.float64))),
     TypeError, "linear: input is torch.float64 but weight is torch.float32"),
    (lambda: _with_tangents(nn.Conv1d(5, 3, 3))(Dual(torch.randn(2, 5, 6, dtype=torch.float64))),
     TypeError, "conv1d: input is torch.float64 but weight is torch.float32"),
    (lambda: F.conv2d(Dual(torch.randn(3, 8), torch.randn(3, 8)), torch.randn(4, 3, 3, 3)),
     ValueError, r"conv2d: input must be 3-D \(C, H, W\) or 4-D \(N, C, H, W\), got shape "
     r"\(3, 8\)"),
    (lambda: fgkernels.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))(
        Dual(torch.randn(3, 8, 8), torch.randn(3, 8, 8))),
     ValueError, r"^expected 4D input \(got 3D input\)"),
    (lambda: torch.tensor([True, False]) - Dual(torch.randn(2), torch.randn(2)),
     RuntimeError, "Subtraction, the `-` operator, with a bool tensor is not supported"),
    (lambda: Dual(torch.randn(2), torch.randn(2)) - True,
     RuntimeError, "Subtraction, the `-` operator, with a bool tensor is not supported"),
    (lambda: DF.conv2d(None, torch.randn(4, 3, 3, 3)),
     TypeError, "conv2d: expected a Dual or Tensor input, got NoneType"),
    (lambda: DF.conv2d(Dual(torch.randn(1, 3, 5, 5)), [1.0]),
     TypeError, "conv2d: weight must be a Dual, Tensor or None, got list"),
    (lambda: _under_autocast(lambda: nn.Linear(3, 2)(Dual(torch.randn(4, 3),
                                                         torch.randn(4, 3)))),
     RuntimeError, "a Dual met torch.autocast: .* refused; cast the model"),
    (lambda: nn.GRU(4, 3, batch_first=True)(Dual(torch.randn(2, 0, 4), torch.randn(2, 0, 4))),
     ValueError, r"gru: expected a sequence length larger than 0, got an input of shape "
                 r"\(2, 0, 4\)"),
    (lambda: torch.lstm(Dual(torch.randn(2, 1, 4), torch.randn(2, 1, 4)),
                        (torch.zeros(1, 1, 3), torch.zeros(1, 1, 3)),
                        [torch.randn(12, 4), torch.randn(12, 3), torch.randn(12)],
                        True, 1, 0.0, False, False, False),
     ValueError, r"lstm: 3 weights do not split into 1 layers of 1 direction\(s\), each of "
                 r"w_ih, w_hh, b_ih, b_hh"),
    (lambda: F.max_pool2d(Dual(torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)), 2.0),
     TypeError, "argument 'kernel_size' .* must be tuple of ints, not float"),
    (lambda: F.max_pool2d(Dual(torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)), 2, 2, "1"),
     TypeError, "argument 'padding' .* must be tuple of ints, not str"),
    (lambda: F.max_pool2d(Dual(torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)), (2.0, 2)),
     TypeError, "argument 'kernel_size' .* must be tuple of ints, but found element of type f"),
    (lambda: F.max_pool2d(Dual(torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)), True),
     TypeError, "argument 'kernel_size' .* must be tuple of ints, not bool"),
], ids=["T=0", "a Dual over forward_ad's dual", "a tangent of forward_ad's dual",
        "a Dual inside torch.func.jvp", "an operand of forward_ad's",
        "func.jvp along a converted layer's weight", "tangent on another device",
        "T=0 set_tangents", "0-d linear", "weight/bias T",
        "Dual running_mean", "groups=0", "Dual condition", "bool Dual", "int Dual",
        "one single, one stacked tangent", "directions str", "directions int",
        "directions bool", "add_direction direction", "add_direction tangent",
        "add_direction input", "clear_tangents None", "reuse_conv_outputs None",
        "conv1d channels", "conv1d stride pair", "mm of a batch", "bmm of matrices",
        "1-D attention", "grouped heads that do not divide", "attention padding mask shape",
        "attention 3-D mask shape", "attention integer mask", "one running statistic",
        "Dual instance norm statistics",
        "batch norm float64 statistics", "batch norm parameters of two dtypes",
        "a float64 batch into a converted conv", "a float64 batch into a linear",
        "a float64 batch into a conv1d", "conv2d of a 2-D input",
        "converted conv and batch norm of an unbatched input", "a bool tensor minus a Dual",
        "a Dual minus True",
        "conv2d of None",
        "conv2d with a list weight", "a Dual under autocast", "a GRU over no steps",
        "an LSTM given three weights", "max pool of a float size",
        "max pool of a str padding", "max pool of a float in a pair", "max pool of a bool"])
def test_bad_input_gets_an_error_naming_it(case, error, message):
    with pytest.raises(error, match=message):
        case()


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(direction=-1), ValueError, "direction must be a non-negative int, got -1"),
    (dict(direction=1, num_tangents=2), ValueError, "give direction or num_tangents, not both"),
    (dict(num_tangents=True), ValueError, "num_tangents must be a positive int, got True"),
    (dict(dtype="bfloat16"), TypeError, "dtype must be a floating or complex torch.dtype or None"),
], ids=["direction", "direction and num_tangents", "bool num_tangents", "str dtype"])
def test_random_tangents_checks_before_it_draws(kwargs, error, message):
    """A refused call sets no tangent and leaves the generator where it was."""
    layer, gen = fgkernels.nn.DualLinear(3, 2), torch.Generator().manual_seed(0)
    state = gen.get_state()
    with pytest.raises(error, match=message):
        fgkernels.random_tangents(layer, generator=gen, **kwargs)
    assert torch.equal(gen.get_state(), state)
    assert not isinstance(layer(Dual(torch.ones(1, 3))).tangents, torch.Tensor)
    with pytest.raises(TypeError, match="random_tangents: expected an nn.Module, got Generator"):
        fgkernels.random_tangents(gen)


def test_random_tangents_checks_every_dtype_before_it_draws():
    """A dtype too wide for a later parameter (a float16 layer after a float32 one) is refused
    naming that parameter, before the first draw: the generator had moved."""
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2).half())
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    with pytest.raises(TypeError, match=r"random_tangents: 1\.weight: a tangent of a "
                                        r"torch\.float16 tensor must be"):
        fgkernels.random_tangents(model, generator=gen, dtype=torch.float32)
    assert torch.equal(gen.get_state(), state)


def test_hardtanh_bounds_out_of_order_are_refused_eagerly_and_when_traced(backend):
    """The elementwise op's contract runs in front of every backend and as its fake."""
    x, xt = torch.randn(2, 3), torch.randn(1, 2, 3)
    message = "min_val cannot be greater than max_val"
    with fgkernels.use_backend(backend), pytest.raises(ValueError, match=message):
        F.hardtanh(Dual(x, xt), 2.0, 1.0)
    if backend == "native":
        from torch._subclasses.fake_tensor import FakeTensorMode
        with FakeTensorMode() as mode, pytest.raises(ValueError, match=message):
            torch.ops.fgkernels.dual_hardtanh(mode.from_tensor(x), mode.from_tensor(xt), 2.0,
                                              1.0)


LAYER_CONTRACTS = {  # a bad call: (the rule on Duals, the compiled op on the same tensors)
    "conv2d channels": (
        lambda x, xt, w: F.conv2d(Dual(x, xt), w, padding=1),
        lambda x, xt, w: torch.ops.fgkernels.dual_conv2d(x, xt, w, None, None, None, [1, 1],
                                                         [1, 1], [1, 1], 1),
        ((2, 4, 5, 5), (3, 5, 3, 3))),
    "conv2d tangents only": (
        lambda x, xt, w: F.conv2d(Dual(x, xt), w, padding=1),
        lambda x, xt, w: torch.ops.fgkernels.dual_conv2d_tangents(
            x, torch.empty(2, 3, 5, 5, device=x.device), xt, w, None, None, [1, 1], [1, 1],
            [1, 1], 1),
        ((2, 4, 5, 5), (3, 5, 3, 3))),
    "layer_norm shape": (
        lambda x, xt, w: F.layer_norm(Dual(x, xt), (5,), w),
        lambda x, xt, w: torch.ops.fgkernels.dual_layer_norm(x, xt, w, None, None, None, [5],
                                                             1e-5, False),
        ((2, 4, 5), (4,))),
    "linear features": (
        lambda x, xt, w: F.linear(Dual(x, xt), w),
        lambda x, xt, w: torch.ops.fgkernels.dual_linear(x, xt, w, None, None, None, False),
        ((2, 3), (4, 5))),
}


@pytest.mark.skipif("native" not in fgkernels.available_backends(), reason="needs fgkernels._C")
@pytest.mark.parametrize("case", sorted(LAYER_CONTRACTS))
def test_a_traced_layer_op_refuses_what_its_rule_refuses(case):
    """A layer's contract is written once: its rule runs it in front, its compiled op's fake
    runs the same, with the same message."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    rule, op, (x_shape, w_shape) = LAYER_CONTRACTS[case]
    x, w = torch.randn(x_shape), torch.randn(w_shape)
    xt = torch.randn(1, *x_shape)
    with pytest.raises(ValueError) as eager:
        rule(x, xt, w)
    with FakeTensorMode() as mode, pytest.raises(ValueError) as traced:
        op(*map(mode.from_tensor, (x, xt, w)))
    assert str(traced.value) == str(eager.value)


def test_expanded_primal_into_batch_norm_matches_forward_ad(backend):
    x = torch.randn(1, 3, 1, 1, **f64).expand(4, 3, 5, 5)
    x = x + 1e-3 * torch.randn(4, 3, 5, 5, **f64)[:1].expand(4, 3, 5, 5)
    xt = torch.randn(1, 4, 3, 5, 5, **f64)
    ref = nn.BatchNorm2d(3).double()
    out = fgkernels.convert(copy.deepcopy(ref))(Dual(x, xt))
    y, yt = _jvp(ref, (x, xt))
    torch.testing.assert_close(out.tangents, yt)


# --- the fused DualSequential honours hooks and its children's checks ----------------------------
def test_hooks_on_fused_children_fire_on_the_dual_pass():
    torch.manual_seed(0)
    net = fgkernels.convert(nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU())
                            .double())
    seen = []
    net[0].register_forward_hook(lambda m, i, o: seen.append("conv"))
    net[1].register_forward_pre_hook(lambda m, i: seen.append("bn-pre"))
    net[2].register_forward_hook(lambda m, i, o: o * 2)  # changes the output
    x, xt = torch.randn(2, 2, 6, 6, **f64), torch.randn(1, 2, 2, 6, 6, **f64)
    out = net(Dual(x, xt))
    assert seen == ["conv", "bn-pre"]
    ref = copy.deepcopy(net)
    y, yt = _jvp(lambda v: ref(v), (x, xt))
    torch.testing.assert_close(out.primal, y)
    torch.testing.assert_close(out.tangents, yt)


@pytest.mark.parametrize("where", ["own", "global"])
def test_hooks_on_unfused_children_fire_on_the_dual_pass(where):
    """A child DualSequential does not fuse is called straight to its forward only when no
    hook would see the call: its own hook and a global one still fire, once per call."""
    from torch.nn.modules import module as torch_module
    net = fgkernels.convert(nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2))).double()
    fgkernels.random_tangents(net)
    seen = []
    hook = lambda m, i, o: seen.append(type(m).__name__)
    handles = [net[1].register_forward_hook(hook)] if where == "own" else \
        [torch_module.register_module_forward_hook(hook)]
    try:
        net(Dual(torch.randn(4, 3, **f64)))
    finally:
        for h in handles:
            h.remove()
    expected = ["DualTanh"] if where == "own" else \
        ["DualLinear", "DualTanh", "DualLinear", "DualSequential"]
    assert seen == expected


def test_batch_norm_1d_after_a_conv_rejects_4d_as_torch_does():
    net = fgkernels.convert(nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm1d(3)))
    with pytest.raises(ValueError, match="expected 2D or 3D input"):
        net(torch.randn(2, 2, 5, 5))
    with pytest.raises(ValueError, match="expected 2D or 3D input"):
        net(Dual(torch.randn(2, 2, 5, 5), torch.randn(2, 2, 5, 5)))


def test_unbound_tensor_method_on_a_dual_is_a_type_error():
    """``torch.Tensor.add_(d, e)`` is refused by CPython before torch sees it (a TypeError
    naming Dual); the bound spelling ``d.add_(e)`` is the supported one."""
    d = Dual(torch.randn(3), torch.randn(3))
    with pytest.raises(TypeError, match="Dual"):
        torch.Tensor.add_(d, d)


@pytest.mark.parametrize("scale", [1e18, 1e-18])
def test_extreme_scales_are_as_precise_as_torch(backend, scale):
    """A training batch norm at 1e18 and 1e-18 (float32): err ≤ 2·err_torch + atol, both
    measured against float64."""
    x, xt = torch.randn(2, 3, 6, 6) * scale, torch.randn(1, 2, 3, 6, 6) * scale
    out = fgkernels.convert(nn.BatchNorm2d(3))(Dual(x, xt))
    assert torch.isfinite(out.tangents).all()
    assert_within_torch_error(out, ForwardADOracle(_training_batch_norm, [x], [xt]))


@pytest.mark.parametrize("case", sorted(OPS))
def test_every_op_refuses_operands_with_different_slot_counts(case):
    """Unlabelled slots pair up by position, so two operands with different numbers of them
    have no meaning: every op of the table says so, naming itself, before computing."""
    op = OPS[case]
    x, w, xt, _ = inputs(op, slots=2)
    wt = torch.randn(3, *w.shape)
    with pytest.raises(ValueError, match=r"operands carry different numbers of tangents T "
                                         r"\[2, 3\]"):
        op.fn(Dual(x, xt), Dual(w, wt))


F16 = torch.float16
# (the function, its operands, which of them carry a tangent): an intermediate of the tangent's
# formula leaves the dtype's range, or its digits, where the derivative itself does not
_RANGE_CASES = {
    "addcdiv by a tiny tensor2": (lambda a, b, c: torch.addcdiv(a, b, c, value=0.5),
                                  [torch.zeros(2), torch.tensor([1e-30, -2e-30]),
                                   torch.tensor([1e-25, 3e-25])], (1, 2)),
    "addcdiv by a huge tensor2": (lambda a, b, c: torch.addcdiv(a, b, c),
                                  [torch.zeros(2), torch.tensor([1e30, -3e29]),
                                   torch.tensor([1e20, 2e20])], (1, 2)),
    "addcdiv in float16": (lambda a, b, c: torch.addcdiv(a, b, c),
                           [torch.zeros(2, dtype=F16), torch.tensor([1000., 500.], dtype=F16),
                            torch.tensor([300., 400.], dtype=F16)], (2,)),
    "softsign in float16": (F.softsign, [torch.tensor([100., 300., -1000.], dtype=F16)], (0,)),
    "atan2 of tiny operands": (torch.atan2, [torch.tensor([0., 1e-20, -3e-20]),
                                             torch.tensor([1e-20, 2e-20, 1e-20])], (0, 1)),
    "atan2 in float16": (torch.atan2, [torch.tensor([0., 1e-3, -2e-3], dtype=F16),
                                       torch.tensor([1e-3, 1e-3, 3e-3], dtype=F16)], (0, 1)),
    "a number base near 1 in float16": (lambda x: 1.0001 ** x,
                                        [torch.tensor([0., 0.5, -1.], dtype=F16)], (0,)),
}


@pytest.mark.parametrize("case", sorted(_RANGE_CASES))
def test_tangent_formulas_keep_in_range_where_the_derivative_does(case):
    """addcdiv's ``t₁·ṫ₂/t₂²`` and softsign's ``ẋ/(1 + |x|)²`` divide twice, as forward_ad
    does, so that the square never forms; atan2's coefficients are one quotient each, not a
    product with 1/(a² + b²); a number base's ln is taken in double, not of the base rounded
    to float16 (ln(1.0001) = 0 there). At these operands the other forms over- or underflow:
    here the tangents are finite, nonzero, and within twice torch's own error (against
    float64)."""
    fn, primals, with_tangent = _RANGE_CASES[case]
    g = torch.Generator().manual_seed(0)
    tangents = [torch.randn(2, *p.shape, generator=g).to(p.dtype) if i in with_tangent else None
                for i, p in enumerate(primals)]
    out = fn(*[p if t is None else Dual(p, t) for p, t in zip(primals, tangents)])
    assert torch.isfinite(out.tangents).all() and (out.tangents != 0).all()
    assert_within_torch_error(out, ForwardADOracle(fn, primals, tangents))


@pytest.mark.parametrize("dtype", [torch.bfloat16, F16], ids=str)
def test_softsign_s_tangent_keeps_its_precision_far_from_zero(dtype):
    """softsign's slope 1/(1 + |x|)² by two divisions keeps a low-precision tangent within a
    few roundings at |x| up to 1000, where torch's quotient rule (ẋ − sign(x)·y·ẋ)/(1 + |x|)
    loses 1 − |y| to rounding: 18 % off in bfloat16 at |x| = 100, all of it from 256."""
    x = torch.tensor([100.0, 300.0, -1000.0, 2.0], dtype=torch.float64)
    # (tangents of 1000: slopes of 1e-6 keep float16's results out of its subnormals)
    xt = 1000 * torch.randn(2, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = F.softsign(Dual(x.to(dtype), xt.to(dtype)))
    exact = xt.to(dtype).double() / (1 + x.to(dtype).double().abs()) ** 2
    assert ((out.tangents.double() - exact).abs() / exact.abs()).max() < 4 * 2.0 ** -7


@pytest.mark.parametrize("op", [torch.var, torch.std])
def test_a_float16_spread_scales_its_terms_before_it_sums_them(op):
    """var's tangent ``2/(N − 1)·Σ (x − mean)·ẋ`` over rows of 4096 float16 values of spread 4,
    along x itself: the sum unscaled (about 16·4096) leaves float16's range, the variance and
    its tangent do not. Finite, and within twice torch's own error."""
    torch.manual_seed(0)
    x = (torch.randn(4, 4096) * 4).to(F16)
    fn = lambda v: op(v, dim=1)
    out = fn(Dual(x, x[None]))
    assert torch.isfinite(out.tangents).all()
    assert_within_torch_error(out, ForwardADOracle(fn, [x], [x[None]]))


def _set(target, index):
    target[index] = 1.0


DUAL_INDEXES = {
    "a Dual by a Dual": lambda x, i: Dual(x)[i],
    "a tensor by a Dual": lambda x, i: x[i],
    "a tensor by an int and a Dual": lambda x, i: x[0, i],
    "a write into a tensor at a Dual": lambda x, i: _set(x, i),
    "a write into a Dual at a Dual": lambda x, i: _set(Dual(x), i),
    "a tensor by a list holding a Dual": lambda x, i: x[[0, i]],
    "a Dual by an int and a list holding a Dual": lambda x, i: Dual(x)[0, [i]],
    "a write into a tensor at a list holding a Dual": lambda x, i: _set(x, [i]),
}


@pytest.mark.parametrize("case", sorted(DUAL_INDEXES))
def test_a_dual_as_an_index_is_refused_by_name(case):
    """A Dual among an index is a clear TypeError (a tensor read by a Dual index raised an
    AttributeError, a write said it wrote a Dual into a plain tensor), the tensor unwritten."""
    x = torch.randn(4, 4)
    before = x.clone()
    index = Dual(torch.tensor([0.0, 1.0]), torch.ones(2))
    with pytest.raises(TypeError, match=r"a Dual cannot index a tensor; index with its primal"):
        DUAL_INDEXES[case](x, index)
    assert torch.equal(x, before)
