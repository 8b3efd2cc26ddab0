"""``torch.autograd.Function`` subclasses on Duals (``rules.functions``): a Function with a jvp
takes its tangent from it, as forward_ad does (the oracle: forward_ad on the same model, float64),
in every style torch allows (ctx in forward, ``setup_context``, ``save_for_forward``, outputs
marked non-differentiable, random draws in forward, writes in place), eager and compiled, on
shapes and directions Hypothesis draws; one without jvp warns that its forward's ops are
differentiated."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fgkernels
from fgkernels import Dual
from fgkernels.testing import compare_with_forward_ad, forward_ad_jvp

TOL = 1e-12


class _RoundThrough(torch.autograd.Function):
    """round(x), with the straight-through estimator's identity as its derivative (ctx taken
    by forward: torch.func cannot transform it)."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad

    @staticmethod
    def jvp(ctx, tangent):
        return tangent


class _ScaledSoftplus(torch.autograd.Function):
    """softplus(β·x)/β · w, and the argmax of its rows (marked non-differentiable), with
    ``setup_context``, a number among its inputs and ``save_for_forward``."""

    @staticmethod
    def forward(x, w, beta):
        y = F.softplus(beta * x) / beta * w
        return y, y.argmax(-1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, beta = inputs
        ctx.beta = beta
        ctx.save_for_forward(x, w)
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def jvp(ctx, x_t, w_t, _):
        x, w = ctx.saved_tensors
        return (torch.sigmoid(ctx.beta * x) * x_t * w + F.softplus(ctx.beta * x) / ctx.beta * w_t,
                None)


class _RandomGate(torch.autograd.Function):
    """x·m for a mask m drawn in forward and saved for the jvp: every tangent slot must see the
    primal's draw."""

    @staticmethod
    def forward(ctx, x):
        mask = (torch.rand_like(x) > 0.5).to(x.dtype)
        ctx.save_for_forward(mask)
        return x * mask

    @staticmethod
    def jvp(ctx, tangent):
        (mask,) = ctx.saved_tensors
        return tangent * mask


class _Net(nn.Module):
    """A convolution quantized straight-through, gated at random, then a Function of its own
    parameter ``w`` and a linear head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.w = nn.Parameter(torch.randn(4, 5, 5))
        self.head = nn.Linear(4 * 25, 3)

    def forward(self, x):
        h = _RoundThrough.apply(self.conv(x) * 4) / 4
        h = _RandomGate.apply(h)
        y, rows = _ScaledSoftplus.apply(h, self.w, 2.0)
        return self.head(y.flatten(1)), rows


def _net() -> _Net:
    torch.manual_seed(0)
    return _Net().double()


@pytest.mark.parametrize("num_tangents", [1, 3])
def test_a_function_with_jvp_is_differentiated_by_it(num_tangents):
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    result = compare_with_forward_ad(_net(), [x], num_tangents=num_tangents)
    assert result["primal"] <= TOL and result["tangent"] <= TOL, result
    assert result["fallback"] == {}


def test_a_straight_through_estimator_passes_its_input_tangent_on():
    x = torch.randn(4, 6, dtype=torch.float64) * 3
    t = torch.randn(2, 4, 6, dtype=torch.float64)
    out = _RoundThrough.apply(Dual(x, t))
    assert torch.equal(out.primal, torch.round(x))
    assert torch.equal(out.tangents, t)  # round's own derivative would give 0


def test_a_parameter_read_through_a_closure_takes_its_tangent_into_the_jvp():
    # no Dual among the Function's arguments: the parameter, lifted during the pass, is one
    holder = nn.Module()
    holder.w = nn.Parameter(3 * torch.randn(4, 5, dtype=torch.float64))
    w_t = torch.randn(4, 5, dtype=torch.float64)
    w = holder.w

    class ByClosure(nn.Module):
        def __init__(self):
            super().__init__()
            self.holder = holder

        def forward(self, x):
            return x * _RoundThrough.apply(w)

    x = torch.randn(4, 5, dtype=torch.float64)
    fgkernels.set_tangents(holder, {"w": w_t})
    try:
        y = ByClosure()(Dual(x))
    finally:
        fgkernels.clear_tangents(holder)
    torch.testing.assert_close(y.primal, x * torch.round(w.detach()), rtol=0, atol=0)
    torch.testing.assert_close(y.tangents, (x * w_t).unsqueeze(0), rtol=0, atol=0)


def test_bfloat16_tangents_of_float32_primals_stay_bfloat16():
    x = torch.randn(3, 8) * 3
    t = torch.randn(1, 3, 8, dtype=torch.float64)
    w = torch.randn(3, 8)
    out, _ = _ScaledSoftplus.apply(Dual(x, t.bfloat16()), w, 1.5)
    _, want = forward_ad_jvp(lambda x_: _ScaledSoftplus.apply(x_, w.double(), 1.5)[0],
                             [x.double()], [t])
    assert out.tangents.dtype == torch.bfloat16
    torch.testing.assert_close(out.tangents.double(), want, rtol=2e-2, atol=2e-2)


def test_a_dual_without_tangent_gives_an_output_without_tangent():
    out = _RoundThrough.apply(Dual(torch.randn(5)))
    assert isinstance(out, Dual) and out.tangents is None


def test_a_call_without_duals_is_torchs_own():
    x = torch.randn(5, requires_grad=True)
    _RoundThrough.apply(x * 2).sum().backward()
    assert torch.equal(x.grad, torch.full((5,), 2.0))  # the straight-through backward


class _SquareWithoutJvp(torch.autograd.Function):
    """x², with a backward and no jvp: forward_ad refuses it."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


def test_a_function_without_jvp_warns_once_and_differentiates_its_forward():
    x = torch.randn(5, dtype=torch.float64)
    t = torch.randn(1, 5, dtype=torch.float64)
    with pytest.warns(UserWarning, match="'_SquareWithoutJvp' defines no jvp"):
        out = _SquareWithoutJvp.apply(Dual(x, t))
    torch.testing.assert_close(out.tangents, 2 * x * t, rtol=TOL, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _SquareWithoutJvp.apply(Dual(x, t))


@pytest.mark.parametrize("num_tangents", [1, 2])
def test_a_compiled_pass_takes_the_jvp_between_graphs(num_tangents):
    net = _net()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    result = compare_with_forward_ad(net, [x], num_tangents=num_tangents,
                                     run=fgkernels.compile(net, backend="eager"))
    assert result["primal"] <= TOL and result["tangent"] <= TOL, result


def test_a_compiled_pass_with_fullgraph_refuses_a_function_with_jvp_by_name():
    net = _net()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    compiled = fgkernels.compile(net, backend="eager", fullgraph=True)
    with pytest.raises(Exception, match="_RoundThrough' defines jvp"):
        compiled(Dual(x, torch.randn_like(x)))


class _DoubleInPlace(torch.autograd.Function):
    """x *= 2, written in place and marked dirty."""

    @staticmethod
    def forward(ctx, x):
        ctx.mark_dirty(x)
        return x.mul_(2)

    @staticmethod
    def jvp(ctx, tangent):
        return tangent.mul_(2)


@pytest.mark.parametrize("num_tangents", [1, 3])
def test_a_function_writing_its_input_in_place_writes_it_once(num_tangents):
    x = torch.randn(4, dtype=torch.float64)
    t = torch.randn(num_tangents, 4, dtype=torch.float64)
    d = Dual(x.clone(), t.clone())
    out = _DoubleInPlace.apply(d)
    assert out is d  # (as torch returns the input it marked dirty)
    assert torch.equal(d.primal, 2 * x)  # once, not once per slot
    assert torch.equal(d.tangents, 2 * t)


def test_a_plain_compiled_model_calls_its_functions_as_torch_does():
    # torch.compile breaks the graph at a Function with jvp whose inputs need gradients: the
    # call runs eagerly through the apply fgkernels wraps, which Dynamo must not compile
    torch._dynamo.reset()
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3).double()

    def net(x):
        return _SquareWithoutJvp.apply(_RoundThrough.apply(conv(x) * 4)).sum()

    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="fgkernels")  # (nor does one without jvp)
        out = torch.compile(net, backend="eager")(x)
    (grad,) = torch.autograd.grad(out, x)
    want = net(x)
    assert torch.equal(out, want)
    assert torch.equal(grad, torch.autograd.grad(want, x)[0])


class _Accumulate(torch.autograd.Function):
    """buf += x, written in place and marked dirty: ``buf`` is no Dual."""

    @staticmethod
    def forward(ctx, x, buf):
        ctx.mark_dirty(buf)
        return buf.add_(x)

    @staticmethod
    def jvp(ctx, x_t, buf_t):
        return x_t if buf_t is None else buf_t.add_(x_t)


def test_a_plain_tensor_a_function_writes_in_place_is_written_once():
    buf = torch.zeros(3, dtype=torch.float64)
    t = torch.randn(4, 3, dtype=torch.float64)
    out = _Accumulate.apply(Dual(torch.ones(3, dtype=torch.float64), t), buf)
    assert torch.equal(buf, torch.ones(3, dtype=torch.float64))  # once, not once per slot
    assert torch.equal(out.tangents, t)


def test_operands_of_other_directions_write_once_too():
    # each direction's slots run apart (an operand without it is a constant there)
    x = Dual(torch.zeros(3, dtype=torch.float64), torch.ones(1, 3, dtype=torch.float64),
             directions=[0])
    y = Dual(torch.ones(3, dtype=torch.float64), torch.full((1, 3), 2.0, dtype=torch.float64),
             directions=[1])
    out = _Accumulate.apply(y, x)
    assert torch.equal(x.primal, torch.ones(3, dtype=torch.float64))
    assert torch.equal(out.tangents, torch.tensor([[1.0] * 3, [2.0] * 3], dtype=torch.float64))


def test_a_parameter_with_a_tangent_outside_a_pass_is_no_dual_of_a_function():
    # as ops take it: a plain call stays a plain call
    holder = nn.Module()
    holder.w = nn.Parameter(torch.randn(3, dtype=torch.float64))
    fgkernels.set_tangents(holder, {"w": torch.randn(3, dtype=torch.float64)})
    try:
        out = _RoundThrough.apply(holder.w * 1.0)
        direct = _RoundThrough.apply(holder.w)
    finally:
        fgkernels.clear_tangents(holder)
    assert not isinstance(out, Dual) and not isinstance(direct, Dual)


def test_a_compiled_pass_gives_a_functions_jvp_a_parameters_tangent():
    # the parameter alone among the Function's arguments: a compiled pass hands it out as a
    # plain tensor with a recorded tangent, not as a Dual

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(3 * torch.randn(4, 5, dtype=torch.float64))

        def forward(self, x):
            return x * _RoundThrough.apply(self.w)

    net = Scaled()
    x = torch.randn(4, 5, dtype=torch.float64)
    result = compare_with_forward_ad(net, [x], run=fgkernels.compile(net, backend="eager"))
    assert result["primal"] <= TOL and result["tangent"] <= TOL, result


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=30, deadline=None)
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=3),
       x_directions=st.sets(st.integers(0, 3), min_size=1, max_size=3),
       w_directions=st.sets(st.integers(0, 3), max_size=3), seed=st.integers(0, 2**31 - 1))
def test_drawn_shapes_and_directions_take_the_jvp_slot_by_slot(shape, x_directions,
                                                                w_directions, seed):
    # x and w carry directions of their own (w maybe none): each output slot is the jvp along
    # the tangents of the operands that carry its direction, the other operand constant
    g = torch.Generator().manual_seed(seed)
    x = 3 * torch.randn(*shape, generator=g, dtype=torch.float64)
    w = torch.randn(*shape, generator=g, dtype=torch.float64)
    xd, wd = sorted(x_directions), sorted(w_directions)
    x_t = torch.randn(len(xd), *shape, generator=g, dtype=torch.float64)
    w_t = torch.randn(len(wd), *shape, generator=g, dtype=torch.float64)
    y, _ = _ScaledSoftplus.apply(_RoundThrough.apply(Dual(x, x_t, directions=xd)),
                                 Dual(w, w_t, directions=wd) if wd else w, 1.5)
    directions = sorted(x_directions | w_directions)
    assert y.directions == tuple(directions)
    for s, d in enumerate(directions):
        xs = x_t[xd.index(d)] if d in xd else torch.zeros_like(x)
        ws = w_t[wd.index(d)] if d in wd else torch.zeros_like(w)
        _, want = forward_ad_jvp(lambda a, b: _ScaledSoftplus.apply(_RoundThrough.apply(a), b,
                                                                     1.5)[0],
                                 [x, w], [xs.unsqueeze(0), ws.unsqueeze(0)])
        torch.testing.assert_close(y.tangents[s], want[0], rtol=TOL, atol=TOL)
