"""A Dual behaves as a dual tensor of torch.autograd.forward_ad: detach drops the tangent,
complex tangents stay complex, Python numbers promote as torch promotes them, truthiness,
comparisons and values act on the primal, indexing and assignment follow the primal's, tensor
constructors give plain tensors; every numeric case against forward_ad in float64."""
import itertools
import warnings

import numpy as np
import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn
import torch.nn.functional as F

import fgkernels
from fgkernels import Dual
from fgkernels.rules.fallback import forward_ad_fallback
from fgkernels.testing import forward_ad_jvp, model_jvp

from helpers import rel_err

f64 = dict(dtype=torch.float64)


def _against_forward_ad(fn, *shapes, slots: int = 2, dtype: torch.dtype = torch.float64):
    """``fn`` on Duals of random inputs (float64, or ``dtype``), and on forward_ad's dual
    tensors."""
    xs = [torch.randn(s, dtype=dtype) for s in shapes]
    ts = [torch.randn(slots, *s, dtype=dtype) for s in shapes]
    out = fn(*[Dual(x, t) for x, t in zip(xs, ts)])
    y, yt = forward_ad_jvp(fn, xs, ts)
    torch.testing.assert_close(out.primal, y, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(out.tangents, yt, rtol=1e-12, atol=1e-13)
    return out


# --- detach -------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", [lambda v: v.transpose(0, 0), lambda v: torch.transpose(v, 0, -1),
                                lambda v: v.swapaxes(-1, 0), lambda v: v.movedim(0, 0),
                                lambda v: torch.movedim(v, (-1,), (0,))],
                         ids=["transpose", "torch.transpose", "swapaxes", "movedim", "dim tuples"])
def test_a_0_d_dual_moves_its_one_dim_as_torch(op):
    """A 0-d tensor takes dim 0 or -1 in transpose, swapaxes and movedim (an IndexError on a
    Dual, whose dims were shifted past the slot axis as if it had one), and refuses 1."""
    x, xt = torch.tensor(1.5, **f64), torch.tensor([1.0, -2.0], **f64)
    out = op(Dual(x, xt))
    for k in range(2):
        with fwAD.dual_level():
            expected = fwAD.unpack_dual(op(fwAD.make_dual(x, xt[k])))
        assert torch.equal(out.primal, expected.primal)
        assert torch.equal(out.tangents[k], expected.tangent)
    with pytest.raises(IndexError, match=r"range of \[-1, 0\], but got 1"):
        Dual(x, xt).transpose(0, 1)


def test_detach_drops_the_tangent():
    d = Dual(torch.randn(3, **f64), torch.randn(3, **f64))
    assert type(d.detach()) is torch.Tensor and torch.equal(d.detach(), d.primal)
    _against_forward_ad(lambda x: x - x.detach(), (3,))
    # a straight-through estimator: the primal rounded, the tangent passed through
    out = _against_forward_ad(lambda x: x + (torch.round(x) - x).detach(), (4,))
    torch.testing.assert_close(out.primal, torch.round(out.primal))


def test_requires_grad_reaches_the_primal():
    """As on a dual tensor of forward_ad: the primal then records an autograd graph, and the
    tangent is unchanged."""
    x, t = torch.randn(3, **f64), torch.randn(3, **f64)
    d = Dual(x, t)
    assert d.requires_grad_() is d and d.primal.requires_grad and d.requires_grad
    y = d * d
    (grad,) = torch.autograd.grad(y.primal.sum(), x)
    torch.testing.assert_close(grad, 2 * x)
    torch.testing.assert_close(y.tangent, 2 * x.detach() * t)
    assert not d.requires_grad_(False).primal.requires_grad
    d.requires_grad = True  # the attribute too (transformers' wav2vec2 sets it)
    assert d.primal.requires_grad and d.requires_grad and torch.equal(d.tangent, t)


def test_a_buffer_updated_from_a_detached_dual_stays_a_tensor():
    class Tracker(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("last", torch.zeros(3, **f64))

        def forward(self, x):
            self.last = x.detach() * 1.0
            return x * 2

    m = Tracker()
    m(Dual(torch.randn(3, **f64), torch.randn(3, **f64)))
    assert type(m.last) is torch.Tensor


# --- complex tangents ---------------------------------------------------------------------------
@pytest.mark.parametrize("fn", [
    lambda x: torch.fft.rfft(x),
    lambda x: torch.abs(torch.fft.rfft(x)),
    lambda x: torch.fft.irfft(torch.fft.rfft(x) * 2j),
    # the power, root and logarithm rules on complex values (a complex exponent, one of 0 too)
    lambda x: (torch.fft.rfft(x) + 3) ** (torch.fft.rfft(x) * 0.1) * torch.fft.rfft(x) ** 0,
    lambda x: torch.sqrt(torch.fft.rfft(x) + 3) + torch.rsqrt(torch.fft.rfft(x) + 3)
    + torch.log(torch.fft.rfft(x) + 3),
    # real and complex operands of one power: a real operand's term is the real part
    lambda x: (x[:5] * x[:5] + 0.5) ** 1.5j + (1 + 1j) ** x[:5]
    + (torch.fft.rfft(x) + 3) ** x[:5] + (x[:5] * x[:5] + 0.5) ** torch.fft.rfft(x),
    # products of complex vectors: vdot conjugates its first operand, dot and outer none
    lambda x: torch.vdot(torch.fft.rfft(x), torch.fft.rfft(x) * 1j)
    + torch.dot(torch.fft.rfft(x), torch.fft.rfft(x).flip(0))
    + torch.outer(torch.fft.rfft(x), torch.fft.rfft(x)).sum(0),
    # RMS norm of complex values (forward AD on the op: the rule's statistics are real)
    lambda x: F.rms_norm(torch.fft.rfft(x), (5,)),
    # holomorphic activations: the slope times the tangent, not its conjugate (a gradient's)
    lambda x: torch.sigmoid(torch.fft.rfft(x)) + torch.tanh(torch.fft.rfft(x) * 0.5)
    + (torch.fft.rfft(x) * 1).sigmoid_() + (torch.fft.rfft(x) * 1).tanh_(),
    # softsign's and the L1 loss's |x|, not holomorphic: no slope times the tangent
    lambda x: F.softsign(torch.fft.rfft(x)),
    lambda x: F.l1_loss(torch.fft.rfft(x), torch.ones(5, dtype=torch.complex128))
    + F.l1_loss(torch.fft.rfft(x), torch.fft.rfft(x).flip(0), reduction="none"),
], ids=["rfft", "abs rfft", "irfft", "pow", "roots log", "pow real and complex", "products",
        "rms_norm", "sigmoid tanh", "softsign", "l1_loss"])
def test_complex_results_keep_complex_tangents(fn):
    out = _against_forward_ad(fn, (8,))
    if out.primal.is_complex():
        assert out.tangents.dtype == torch.complex128


def test_complex_silu_is_its_derivative():
    """SiLU of complex values, holomorphic: the tangent is the slope times ẋ, a central
    difference's to 1e-8 (torch's own forward mode conjugates part of it: 0.65 apart here)."""
    g = torch.Generator().manual_seed(0)
    z, t = (torch.randn(6, dtype=torch.complex128, generator=g) for _ in range(2))
    h = 1e-5
    difference = (F.silu(z + h * t) - F.silu(z - h * t)) / (2 * h)
    error = F.silu(Dual(z, t)).tangent - difference
    assert (error.abs().norm() / difference.abs().norm()).item() < 1e-8


def test_a_complex_dual_needs_a_complex_tangent():
    z = torch.randn(3, dtype=torch.complex128)
    with pytest.raises(TypeError, match="complex dtype of fewer bits"):
        Dual(z, torch.randn(3, **f64))
    out = torch.abs(Dual(z, torch.randn(3, dtype=torch.complex128)))
    assert out.primal.dtype == torch.float64


# --- the arguments torch takes in other forms: a memory format, a tensor of indices, a mode ----
def test_clone_to_a_memory_format_lays_out_each_slot_so():
    out = _against_forward_ad(lambda x: x.clone(memory_format=torch.channels_last) * 2,
                              (2, 3, 4, 5))
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert all(s.is_contiguous(memory_format=torch.channels_last) for s in out.tangents)
    x, t = torch.randn(2, 3, 2, 4, 5, **f64), torch.randn(2, 3, 2, 4, 5, **f64)
    out = torch.clone(Dual(x, t), memory_format=torch.channels_last_3d)
    assert out.tangent.is_contiguous(memory_format=torch.channels_last_3d)
    assert torch.equal(out.tangent, t) and out.tangent.data_ptr() != t.data_ptr()


@pytest.mark.parametrize("split", [torch.tensor([1, 3]), torch.tensor(2), [1, 3], 2],
                         ids=["tensor of indices", "0-d tensor", "list", "sections"])
def test_tensor_split_takes_its_indices_in_every_form(split):
    _against_forward_ad(lambda x: torch.cat(torch.tensor_split(x, split, dim=1)[::-1], 1) * 2
                        + torch.cat(x.tensor_split(split, -1), 1), (2, 5))


def test_a_rounded_quotient_has_a_zero_tangent():
    """As floor's and forward_ad's: 'floor' and 'trunc' are step functions of both operands."""
    out = _against_forward_ad(
        lambda a, b: torch.div(a * 5, b, rounding_mode="floor")
        + torch.div(a, 0.3, rounding_mode="trunc") + (a * 1).div_(b, rounding_mode="floor")
        + a.div(b.abs() + 1, rounding_mode=None), (6,), (6,))
    assert out.tangents.abs().sum() > 0  # the plain quotient's term
    x = Dual(torch.randn(6, **f64), torch.full((6,), float("nan"), **f64))
    assert torch.equal(torch.div(x, 0.3, rounding_mode="floor").tangent, torch.zeros(6, **f64))


# --- Python numbers promote as torch promotes them ---------------------------------------------
@pytest.mark.parametrize("fn", [
    lambda x: 0.9 * x, lambda x: x * 0.9, lambda x: 0.9 + x, lambda x: 0.9 - x,
    lambda x: 0.9 / x, lambda x: x / 0.9, lambda x: 3 * x, lambda x: torch.add(x, 0.1, alpha=3),
], ids=["0.9*x", "x*0.9", "0.9+x", "0.9-x", "0.9/x", "x/0.9", "3*x", "add alpha"])
def test_python_numbers_keep_float64(fn):
    _against_forward_ad(fn, (5,))
    x = torch.randn(5, **f64)
    assert rel_err(fn(Dual(x)).primal, fn(x)) < 1e-16  # the number taken as float64


# --- values, truthiness, comparisons -------------------------------------------------------------
def test_values_and_truthiness_are_the_primal_s():
    d = Dual(torch.tensor([0.0, 1.5, -2.0], **f64), torch.ones(3, **f64))
    assert bool(Dual(torch.tensor([0.0]))) is False and bool(Dual(torch.tensor(2.0))) is True
    with pytest.raises(RuntimeError, match="ambiguous"):
        bool(d)
    assert d[1].item() == 1.5 and float(d[1]) == 1.5 and int(d[2]) == -2
    assert d.tolist() == [0.0, 1.5, -2.0] and d.numpy().tolist() == [0.0, 1.5, -2.0]
    assert f"{d[1]:.2f}" == "1.50"
    if d.amax():
        pass
    e = Dual(torch.tensor([0.0, 2.0, -2.0], **f64), torch.zeros(3, **f64))
    for result, expected in ((d == e, [True, False, True]), (d != e, [False, True, False]),
                             (d < e, [False, True, False]), (d >= 1.0, [False, True, False])):
        assert type(result) is torch.Tensor and result.tolist() == expected
    assert len({d, e}) == 2  # hashed by identity, as tensors are
    assert [type(row) for row in Dual(torch.randn(2, 3), torch.randn(2, 3))] == [Dual, Dual]


def test_predicates_indices_and_constructors_give_plain_tensors():
    d = Dual(torch.randn(2, 3, **f64), torch.randn(2, 3, **f64))
    plain = [d.new_zeros(4), d.new_ones(2), d.new_full((2,), 3.0), d.new_empty(2),
             torch.zeros_like(d), torch.ones_like(d), torch.full_like(d, 2.0),
             torch.empty_like(d), torch.randn_like(d), torch.isnan(d), d.argmax(),
             torch.nonzero(d > 0), d.long(), d.bool()]
    assert all(type(t) is torch.Tensor for t in plain)
    assert d.new_zeros(4).dtype == torch.float64 and torch.zeros_like(d).shape == (2, 3)


def test_integer_and_bool_duals_are_refused():
    for primal in (torch.arange(3), torch.ones(2) > 0):
        with pytest.raises(TypeError, match="floating or complex dtype"):
            Dual(primal)


# --- conversions ----------------------------------------------------------------------------------
def test_conversions_carry_the_tangent():
    x, t = torch.randn(3), torch.randn(2, 3)
    d = Dual(x, t)
    assert d.double().tangents.dtype == torch.float64
    assert torch.equal(d.to(torch.float64).tangents, t.double())
    low = Dual(x, t.bfloat16())
    assert low.double().tangents.dtype == torch.bfloat16  # a lower-precision tangent stays so
    same = d.to("cpu")  # already there: the primal and tangents as they are
    assert torch.equal(same.primal, x) and torch.equal(same.tangents, t)
    assert d.type_as(torch.zeros(1, **f64)).dtype == torch.float64


# --- indexing and assignment --------------------------------------------------------------------
INDICES = {
    "mask": lambda x: x > 0,
    "tensor": lambda x: torch.tensor([2, 0]),
    "pair": lambda x: (torch.tensor([0, 2]), torch.tensor([1, 3])),
    "apart": lambda x: (torch.tensor([0, 2]), slice(None), torch.tensor([1, 3])),
    "slices": lambda x: (slice(1, None), None, Ellipsis),
    # sequences torch reads as advanced indices, and lists it reads as tuples of indices
    "numpy apart": lambda x: (np.array([0, 2]), slice(None), np.array([1, 3])),
    "tuples apart": lambda x: ((0, 2), slice(None), (1, 3)),
    "range": lambda x: range(2),
    "list of lists": lambda x: [[0, 2], [1, 3]],
    "list with a slice": lambda x: [0, slice(1, 3)],
    "list of tensors": lambda x: [torch.tensor(2), torch.tensor([0, 1])],
}


@pytest.mark.parametrize("name", sorted(INDICES))
def test_getitem_follows_the_primal(name):
    torch.manual_seed(0)
    shape = (3, 2, 4) if name.endswith("apart") else (3, 4)
    index = INDICES[name](torch.randn(shape))
    _against_forward_ad(lambda x: x[index], shape)


@pytest.mark.parametrize("value", ["dual", "tensor", "number"])
@pytest.mark.parametrize("name", ["mask", "tensor", "pair", "slices", "range", "list of lists",
                                  "list with a slice", "list of tensors"])
def test_setitem_follows_the_primal(name, value):
    torch.manual_seed(0)
    x = torch.randn(3, 4, **f64)
    x0 = x.clone()
    index = INDICES[name](x)
    region = x[index].shape
    v, vt = torch.randn(region, **f64), torch.randn(2, *region, **f64)

    def assign(a, b=None):
        a = a.clone() if isinstance(a, torch.Tensor) else a * 1.0
        a[index] = b if b is not None else (2.5 if value == "number" else v)
        return a

    xt = torch.randn(2, 3, 4, **f64)
    xt0 = xt.clone()
    if value == "dual":
        d = Dual(x, xt)
        d[index] = Dual(v, vt)
        y, yt = forward_ad_jvp(assign, [x, v], [xt, vt])
    else:
        d = Dual(x, xt)
        d[index] = 2.5 if value == "number" else v
        y, yt = forward_ad_jvp(assign, [x], [xt])
    torch.testing.assert_close(d.primal, y)
    torch.testing.assert_close(d.tangents, yt)
    # x and xt themselves untouched: the Dual made from them is assigned out of place
    assert torch.equal(x, x0) and torch.equal(xt, xt0)


def test_writing_a_dual_into_a_plain_tensor_is_refused():
    d = Dual(torch.randn(3, **f64), torch.randn(3, **f64))
    buf = torch.zeros(3, **f64)
    with pytest.raises(RuntimeError, match="would write a Dual into a plain tensor"):
        buf[0] = d[0]


# --- the fallback takes any op ------------------------------------------------------------------
def test_fallback_outputs_may_include_none_and_numbers():
    def op(x, y):
        return x.sin() * y, None, 3, (x > 0)

    x, t = torch.randn(3, **f64), torch.randn(2, 3, **f64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out, none, three, mask = forward_ad_fallback(op, (Dual(x, t), 2.0), {})
    assert none is None and three == 3 and type(mask) is torch.Tensor
    torch.testing.assert_close(out.tangents, t * x.cos() * 2)


RRELU_INPUTS = {
    "contiguous": lambda: torch.randn(4, 5, **f64),
    "transposed": lambda: torch.randn(5, 4, **f64).T,
    "channels_last": lambda: torch.randn(2, 3, 2, 2, **f64).to(memory_format=torch.channels_last),
}


@pytest.mark.parametrize("layout", sorted(RRELU_INPUTS))
@pytest.mark.parametrize("by", ["rule", "fallback"])
def test_a_random_op_vmap_cannot_batch_differentiates_one_draw_in_every_slot(by, layout):
    """rrelu in training draws its slopes: its rule draws them once for the primal and every
    slot; the fallback (rrelu has no vmap rule) runs it slot by slot, each from the same random
    state. Every slot differentiates the draw the primal took, as forward_ad does from that
    state, whatever the input's layout (the rule's slopes, drawn into a buffer in the input's
    strides, were read in another order), and the random stream is left where torch's call
    leaves it."""
    x = RRELU_INPUTS[layout]()
    t = torch.randn(3, *x.shape, **f64)
    fn = lambda v: F.rrelu(v, training=True)  # noqa: E731
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = fn(Dual(x, t)) if by == "rule" else forward_ad_fallback(fn, (Dual(x, t),), {})
    after = torch.rand(2)
    for slot in range(t.shape[0]):
        torch.manual_seed(0)
        with fwAD.dual_level():
            y, yt = fwAD.unpack_dual(fn(fwAD.make_dual(x, t[slot])))
        torch.testing.assert_close(out.primal, y, rtol=0, atol=0)
        torch.testing.assert_close(out.tangents[slot], yt, rtol=0, atol=0)
        assert torch.equal(torch.rand(2), after)


@pytest.mark.parametrize("training", [False, True])
def test_rrelu_refuses_a_lower_bound_above_the_upper_as_torch(training):
    """``F.rrelu(d, 0.5, 0.1)`` is refused, as torch refuses it (out of training the rule took
    the mean slope and went on)."""
    x = torch.randn(4, **f64)
    with pytest.raises(RuntimeError, match="Lower bound should be less than or equal"):
        F.rrelu(x, 0.5, 0.1, training)
    with pytest.raises(RuntimeError, match="Lower bound should be less than or equal"):
        F.rrelu(Dual(x, torch.randn(2, 4, **f64)), 0.5, 0.1, training)


def test_an_output_forward_ad_leaves_without_tangent_is_refused_where_differentiable():
    """scatter_reduce's "prod" has no forward-mode formula: forward_ad leaves the tangent
    undefined (in place it raises), torch.func.jvp made it zero, though reverse mode and finite
    differences differentiate it: refused by name, under inference_mode too. Outputs torch marks
    non-differentiable (Bessel functions, native_layer_norm's statistics) keep forward_ad's zero
    tangent."""
    x, s = torch.randn(2, 4, **f64), torch.randn(2, 3, **f64)
    xt, st = torch.randn(2, 2, 4, **f64), torch.randn(2, 2, 3, **f64)
    idx = torch.tensor([[0, 0, 1], [2, 2, 2]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's notice
        with pytest.raises(NotImplementedError, match="no formula for 'scatter_reduce'"):
            torch.scatter_reduce(Dual(x, xt), 1, idx, Dual(s, st), "prod")
        with pytest.raises(NotImplementedError, match="no formula for 'Tensor.scatter_reduce'"):
            Dual(x.clone(), xt.clone()).scatter_reduce_(1, idx, Dual(s, st), "prod")
        with torch.inference_mode(), pytest.raises(NotImplementedError, match="no formula"):
            torch.scatter_reduce(Dual(x, xt), 1, idx, Dual(s, st), "prod")
        outs = [torch.special.bessel_j0(Dual(x, xt)),
                *torch.native_layer_norm(Dual(x, xt), (4,), None, None, 1e-5)]
    with fwAD.dual_level():
        refs = [torch.special.bessel_j0(fwAD.make_dual(x, xt[0])),
                *torch.native_layer_norm(fwAD.make_dual(x, xt[0]), (4,), None, None, 1e-5)]
        refs = [fwAD.unpack_dual(r) for r in refs]
    assert [r.tangent is None for r in refs] == [True, False, True, True]
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out.primal, ref.primal, rtol=0, atol=0)
        tangent = torch.zeros_like(ref.primal) if ref.tangent is None else ref.tangent
        torch.testing.assert_close(out.tangents[0], tangent, rtol=1e-13, atol=1e-14)


@torch.library.custom_op("fgkernels_tests::triple", mutates_args=())
def _triple(x: torch.Tensor) -> torch.Tensor:
    """3x, a custom op with a backward formula and no forward-mode one."""
    return x * 3


_triple.register_fake(torch.empty_like)
_triple.register_autograd(lambda ctx, grad: grad * 3)

_COMPOSITE = torch.library.Library("fgkernels_tests", "FRAGMENT")
_COMPOSITE.define("cube(Tensor x) -> Tensor")
_COMPOSITE.impl("cube", lambda x: x * x * x, "CompositeImplicitAutograd")


def test_another_library_s_op_without_forward_formula_is_refused():
    """A custom op registered with a backward formula alone (torchvision's roi_align is one)
    leaves forward AD's tangent undefined: refused by its qualified name, as forward_ad
    refuses it (torch.func.jvp made it zero); a library op that torch decomposes into its own
    ops keeps forward_ad's tangent."""
    x, xt = torch.randn(2, 3, **f64), torch.randn(1, 2, 3, **f64)
    lin = nn.Linear(3, 3).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's notice
        with pytest.raises(NotImplementedError, match="'fgkernels_tests::triple.default' is "
                           "an op of a library outside torch"):
            _triple(Dual(x, xt))
        with fwAD.dual_level(), pytest.raises(NotImplementedError):
            _triple(lin(fwAD.make_dual(x, xt[0])))
        out = torch.ops.fgkernels_tests.cube(Dual(x, xt))
    y, yt = forward_ad_jvp(torch.ops.fgkernels_tests.cube, [x], [xt])
    torch.testing.assert_close(out.primal, y, rtol=0, atol=0)
    torch.testing.assert_close(out.tangents, yt, rtol=1e-13, atol=1e-14)


def test_a_fallback_op_runs_once():
    """An op by the forward-AD fallback whose statistics outputs have no tangent (native batch
    norm's) runs once: its running statistics move as torch moves them (run again to ask
    reverse mode whether those outputs were differentiable, it moved them twice)."""
    x = torch.randn(8, 3, **f64)
    rm, rv = torch.zeros(3, **f64), torch.ones(3, **f64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's notice
        torch.native_batch_norm(Dual(x, torch.randn_like(x)), None, None, rm, rv, True, 0.5,
                                1e-5)
    expected_mean, expected_var = torch.zeros(3, **f64), torch.ones(3, **f64)
    torch.native_batch_norm(x, None, None, expected_mean, expected_var, True, 0.5, 1e-5)
    assert torch.equal(rm, expected_mean) and torch.equal(rv, expected_var)


def test_a_gru_runs_on_duals():
    torch.manual_seed(0)
    gru = nn.GRU(4, 3).double()
    x, xt = torch.randn(5, 2, 4, **f64), torch.randn(1, 5, 2, 4, **f64)
    tangents = fgkernels.random_tangents(gru, num_tangents=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out, h = gru(Dual(x, xt))
    (y, _), (yt, _) = model_jvp(gru, [x], [xt], tangents)
    assert rel_err(out.tangents, yt) < 1e-12


def test_a_fallback_op_compiles_in_one_graph():
    def f(x, xt):
        d = torch.sin(Dual(x, xt))
        return d.primal, d.tangents

    torch._dynamo.reset()
    x, xt = torch.randn(3, **f64), torch.randn(2, 3, **f64)
    y, yt = torch.compile(f, fullgraph=True, backend="aot_eager")(x, xt)
    torch.testing.assert_close(yt, xt * x.cos())


def test_mask_assigned_dual_matches_forward_ad_dual_tensor():
    x, t = torch.randn(4, **f64), torch.randn(4, **f64)
    m = x > 0
    d = Dual(x, t)
    d[m] = 0.0
    with fwAD.dual_level():
        ref = fwAD.make_dual(x.clone(), t.clone())
        ref[m] = 0.0
        expected = fwAD.unpack_dual(ref).tangent
    torch.testing.assert_close(d.tangent, expected)


def test_clear_errors_on_bad_convolution_geometry():
    d = Dual(torch.randn(1, 2, 5, 5), torch.randn(1, 2, 5, 5))
    w = torch.randn(3, 2, 3, 3)
    for kwargs, message in ((dict(stride=0), "stride must be an int >= 1"),
                            (dict(dilation=(1, 0)), "dilation must be an int >= 1"),
                            (dict(padding=-1), "padding must be an int >= 0"),
                            (dict(padding="full"), "padding must be 'same', 'valid'"),
                            (dict(padding="same", stride=2), "not supported for strided")):
        with pytest.raises(ValueError, match=message):
            F.conv2d(d, w, **kwargs)
    with pytest.raises(TypeError, match="expected an nn.Module, got function"):
        fgkernels.convert(lambda x: x)


def test_cross_entropy_with_a_dual_probability_target():
    def loss(z, p):
        return F.cross_entropy(z, torch.softmax(p, 1))

    _against_forward_ad(loss, (3, 4), (3, 4))


# --- a table of ops, each against forward_ad ----------------------------------------------------
OPS = {
    "stack": lambda d: torch.stack([d, d * 2]), "T": lambda d: d.T, "mT": lambda d: d.mT,
    "clone": lambda d: d.clone(), "masked_fill": lambda d: d.masked_fill(d.detach() > 0, 0.0),
    "interpolate": lambda d: F.interpolate(d[None, None], scale_factor=2, mode="bilinear"),
    "abs": lambda d: abs(d), "pow": lambda d: d ** 3, "rpow": lambda d: 2 ** d,
    "sqrt": lambda d: (d * d + 1).sqrt(), "mod": lambda d: d % 0.7, "max": lambda d: d.max(),
    "max dim": lambda d: d.max(1).values, "min": lambda d: torch.min(d, 0)[0],
    "sort": lambda d: d.sort(1)[0], "topk": lambda d: d.topk(2)[0], "cumsum": lambda d: d.cumsum(0),
    "prod": lambda d: d.prod(1), "var": lambda d: d.var(1), "std": lambda d: d.std(),
    "logsumexp": lambda d: d.logsumexp(1), "repeat_interleave": lambda d: d.repeat_interleave(2, 0),
    "tile": lambda d: d.tile(2), "outer": lambda d: torch.outer(d[0], d[1]),
    "tensordot": lambda d: torch.tensordot(d, d.T, 1),
    "index_select": lambda d: d.index_select(0, torch.tensor([0, 2])),
    "gather": lambda d: d.gather(1, torch.tensor([[0], [1], [2]])),
    "scatter": lambda d: torch.zeros(3, 4, **f64).scatter(1, torch.tensor([[0], [1], [2]]),
                                                          d[:, :1]),
    "round": lambda d: d.round(), "sign": lambda d: d.sign() * d,
    "where": lambda d: torch.where(d.detach() > 0, d, 0.0),
    "normalize": lambda d: F.normalize(d, dim=1), "layer_norm": lambda d: F.layer_norm(d, (4,)),
    "softplus": lambda d: F.softplus(d), "mse": lambda d: F.mse_loss(d, torch.ones(3, 4, **f64)),
    "nll": lambda d: F.nll_loss(F.log_softmax(d, 1), torch.tensor([0, 1, 2])),
    "soft targets": lambda d: F.cross_entropy(d, torch.softmax(torch.ones(3, 4, **f64), 1)),
    "class weights": lambda d: F.cross_entropy(d, torch.tensor([0, 3, 1]),
                                               weight=torch.tensor([0.5, 1.0, 2.0, 1.5], **f64)),
    "logits (N, C, d)": lambda d: F.cross_entropy(d[None].transpose(1, 2),
                                                  torch.tensor([[0, 1, 2]])),
    "einsum": lambda d: torch.einsum("ij,kj->ik", d, d),
    "einsum ellipsis": lambda d: torch.einsum("...i,...i->...", d, d),
    "bmm": lambda d: torch.bmm(d[None], d.T[None]), "addmm": lambda d: torch.addmm(
        d[:, :3], d, d.T[:, :3]), "baddbmm": lambda d: torch.baddbmm(d[None, :, :3], d[None],
                                                                    d.T[None, :, :3], beta=0.5),
    "var overloads": lambda d: torch.var(d, 1, False, True) + d.var(False) + d.std(unbiased=True)
    + d.var(dim=0, correction=2).sum() + torch.std(d, (0, 1), keepdim=True),
    "special.logsumexp": lambda d: torch.special.logsumexp(d, 0),
    "std at 0": lambda d: (d - d.detach()).std(1), "logsumexp -inf": lambda d: torch.logsumexp(
        d.masked_fill(torch.eye(3, 4, dtype=torch.bool), float("-inf")), 1),
    "pow self=": lambda d: torch.pow(self=2, exponent=d) + torch.pow(input=d, exponent=2),
    "cat axis=": lambda d: torch.cat([d, d * 2], axis=1) + torch.concatenate([d * 3, d], 1),
    "products by torch's names": lambda d: torch.mv(d, vec=d[0]) + torch.dot(d[0], tensor=d[1])
    + torch.outer(d[:, 0], vec2=d[1, :3]).sum(1) + torch.mm(d, mat2=d.T).sum(1)
    + d.prelu(torch.tensor([0.25], **f64)).sum(1),
    "stack axis=": lambda d: torch.stack([d, d * 2], axis=-1),
    "matmul vec": lambda d: d @ d[0], "vec matmul": lambda d: d[:, 0] @ d,
    "rmatmul": lambda d: torch.ones(2, 3, **f64) @ d, "batched matmul": lambda d: d[None].expand(
        2, 3, 4) @ d.T, "flip": lambda d: d.flip(0), "roll": lambda d: d.roll(1, 0),
    "expand_as": lambda d: d[:1].expand_as(d), "view_as": lambda d: d.reshape(4, 3).view_as(d),
    "narrow": lambda d: d.narrow(1, 0, 2), "movedim": lambda d: d.movedim(0, 1),
    "swapaxes": lambda d: d.swapaxes(0, 1), "reshape_as": lambda d: d.reshape_as(d.T),
    "moveaxis": lambda d: torch.moveaxis(d[None], (0, 1), (2, 0)) + d.moveaxis(-1, 0)[None],
    "adjoint": lambda d: torch.adjoint(d[None]) * d.adjoint(),
    "split_with_sizes": lambda d: torch.split_with_sizes(d, [3, 1], -1)[0]
    * d.split_with_sizes([2, 2], dim=1)[1].sum(1, keepdim=True),
    "views by keyword": lambda d: torch.moveaxis(d, source=0, destination=1)
    + d.transpose(dim0=0, dim1=1) + torch.swapaxes(d, axis0=1, axis1=0)
    + d.movedim(source=1, destination=0) + torch.swapdims(d, dim0=0, dim1=1),
    "splits by keyword": lambda d: torch.split_with_sizes(d, split_sizes=[1, 2], dim=0)[1]
    * torch.split(d, split_size_or_sections=2, dim=0)[0] + d.split(split_size=2, dim=0)[0]
    + d.split_with_sizes(split_sizes=[2, 1])[0],
    "interpolate nearest": lambda d: F.interpolate(d[None], scale_factor=2),
    "upsample bicubic": lambda d: F.interpolate(d[None, None], size=(5, 7), mode="bicubic"),
    "split sizes": lambda d: d.split([1, 2], 0)[1], "amax": lambda d: d.amax(1),
    "clamp tensor": lambda d: d.clamp(min=torch.zeros(4, **f64)), "clip": lambda d: d.clip(-1, 1),
    "log": lambda d: (d.abs() + 1).log(), "exp": lambda d: d.exp(), "rsqrt": lambda d: (
        d * d + 1).rsqrt(), "reciprocal": lambda d: (d.abs() + 1).reciprocal(),
    "square": lambda d: d.square(), "diag": lambda d: torch.diag(d[:, :3]),
    "tril": lambda d: d.tril(), "trace": lambda d: d[:, :3].trace(),
    "cat with tensor": lambda d: torch.cat([d, torch.ones(3, 4, **f64)], -1),
    "softmax": lambda d: d.softmax(0), "log_softmax": lambda d: d.log_softmax(1),
    "vector_norm": lambda d: torch.linalg.vector_norm(d, dim=0),
    "norm": lambda d: d.norm(), "norm p1": lambda d: d.norm(p=1, dim=1),
    "copy_": lambda d: (d * 1.0).copy_(d.flip(0) * 2), "zero_": lambda d: (d * 1.0).zero_() + d,
    "fill_": lambda d: (d * 1.0).fill_(2.0) * d, "sum dtype": lambda d: d.sum(dtype=torch.float64),
    "mean keepdim": lambda d: d.mean((0, 1), keepdim=True),
}


@pytest.mark.parametrize("name", sorted(OPS))
def test_op_matches_forward_ad(name):
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _against_forward_ad(OPS[name], (3, 4))


# In-place writes into a view of y: each runs on a copy of the input (``_on_a_copy``).
VIEW_WRITES = {
    "view": lambda y: y.view(-1)[2:5].mul_(2.0),
    "narrow": lambda y: y.narrow(1, 1, 2).div_(4.0),
    "rows of iteration": lambda y: [row.add_(row * row) for row in y],
    "t": lambda y: y.t()[0].zero_(),
    "unsqueeze": lambda y: y.unsqueeze(0).relu_(),
    ".T and .mT": lambda y: (y.T.mul_(2.0), y.mT[1].zero_()),
    "diagonal": lambda y: y.diagonal().add_(1.0),
    "unfold": lambda y: y.unfold(1, 2, 2).mul_(3.0),
    "tensor_split and hsplit": lambda y: (y.tensor_split(2, 1)[1].neg_(),
                                          y.hsplit(2)[0].div_(2.0)),
    "moveaxis and adjoint": lambda y: (y.moveaxis(0, 1).mul_(2.0), y.adjoint().neg_()),
    "split_with_sizes": lambda y: y.split_with_sizes([1, 3], 1)[1].mul_(3.0),
    "unsafe splits": lambda y: (torch.unsafe_chunk(y, 2, 1)[1].neg_(),
                                y.unsafe_split(1, 0)[2].mul_(3.0),
                                torch.unsafe_split(y, split_size=3, dim=1)[1].add_(1.0),
                                torch.unsafe_split_with_sizes(y, [1, 3], 1)[0].div_(2.0)),
    "einsum of one operand": lambda y: (torch.einsum("ij->ji", y).mul_(2.0),
                                        torch.einsum("ii->i", y[:, :3]).add_(1.0),
                                        torch.einsum("...j->j...", y)[1].neg_()),
    "as_strided": lambda y: (y.as_strided((2, 2), (4, 1), 1).neg_(),
                             y[1:2].as_strided((2, 3), (4, 1), 5).mul_(2.0)),
    # views made by the forward-AD fallback
    "atleast_3d": lambda y: torch.atleast_3d(y).mul_(2.0),
}


def _on_a_copy(write):
    def fn(x):
        y = x.clone()
        write(y)
        return y
    return fn


@pytest.mark.parametrize("name", sorted(VIEW_WRITES))
def test_in_place_op_on_a_view_writes_into_the_dual(name):
    """An in-place op on a view (view, narrow, a row of iteration, t, .T, .mT, unsqueeze,
    diagonal, unfold, tensor_split, moveaxis, an unsafe split, a permutation or diagonal by
    einsum, a view the forward-AD fallback made) writes into the Dual it views, primal and
    tangent, as on a view of a tensor."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's notice
        _against_forward_ad(_on_a_copy(VIEW_WRITES[name]), (3, 4))


AS_STRIDED = {
    "whole storage": lambda d: d.as_strided((2, 6), (6, 1)),
    "beyond a row": lambda d: d[1:3].as_strided((3, 4), (4, 1), 0),
    "before a column": lambda d: d[:, 2:].as_strided((3, 3), (4, 1), 1),
    "overlapping windows": lambda d: d[1].as_strided((3, 3), (2, 1), 1),
    "channels_last": lambda d: d.reshape(1, 3, 2, 2).contiguous(
        memory_format=torch.channels_last).as_strided((2, 6), (6, 1)),
}


@pytest.mark.parametrize("name", sorted(AS_STRIDED))
def test_as_strided_reads_the_tangent_laid_out_as_the_storage(name):
    """``as_strided`` reads every slot where it reads the primal's storage, as forward AD's
    tangent, laid out as the storage, is read: beyond a view's own elements, the tangents of
    the Dual it views (every slot, not zeros past the first)."""
    _against_forward_ad(AS_STRIDED[name], (3, 4), slots=3)


def test_as_strided_reads_slots_cut_from_a_larger_stack_at_their_own_offset():
    """Slots that are a part of a larger stack lie at an offset of their own in its storage:
    each is read there, where the primal is read in its own."""
    x, stack = torch.randn(3, 4, **f64), torch.randn(5, 3, 4, **f64)
    out = Dual(x, stack[2:4])[1:].as_strided((2, 4), (4, 1), 2)
    for k in range(2):
        with fwAD.dual_level():
            expected = fwAD.unpack_dual(
                fwAD.make_dual(x, stack[2 + k])[1:].as_strided((2, 4), (4, 1), 2))
        assert torch.equal(out.primal, expected.primal)
        assert torch.equal(out.tangents[k], expected.tangent)


def _as_strided_against_forward_ad(x, tangents, *view):
    out = Dual(x, tangents).as_strided(*view)
    stacked = tangents if out.tangents.shape[0] > 1 or tangents.dim() > x.dim() else [tangents]
    for k, t in enumerate(stacked):
        with fwAD.dual_level():
            expected = fwAD.unpack_dual(fwAD.make_dual(x, t).as_strided(*view))
        assert torch.equal(out.primal, expected.primal)
        assert torch.equal(out.tangents[k], expected.tangent)


def test_as_strided_of_a_dual_of_a_larger_tensor_s_view_is_zero_beyond_it():
    """A Dual made of a view of a larger tensor has tangent zero at the storage positions
    beyond its elements, as forward AD gives a dual made of such a view, whatever memory its
    tangent is a part of (a view of a larger tensor too, at another offset or the same); within
    them, its own tangents wherever they lie."""
    base, big, v = torch.randn(4, 3, **f64), torch.randn(10, 3, **f64), torch.randn(2, 4, 4, **f64)
    strided = torch.randn(2, 3, 2, **f64).transpose(1, 2)  # slots laid out unlike the primal
    for tangents in (torch.randn(2, 2, 3, **f64), strided, torch.randn(2, 3, **f64), big[5:7],
                     big[1:3], torch.randn(5, 2, 3, **f64)[2:4]):
        _as_strided_against_forward_ad(base[1:3], tangents, (3, 3), (3, 1), 2)
    x = torch.randn(4, 4, **f64)
    _as_strided_against_forward_ad(x[:, ::2], v[:, :, ::2], (4, 4), (4, 1), 0)  # the gaps


def test_as_strided_beyond_a_view_of_slots_laid_out_unlike_the_storage_is_refused():
    """Beyond a view's elements the tangents belong to the Dual it views; where its slots are
    not laid out as the storage, they cannot be read there, and ``as_strided`` says so."""
    d = Dual(torch.randn(4, 3, **f64)[1:3], torch.randn(2, 2, 3, **f64))[0]
    with pytest.raises(RuntimeError, match="outside the Dual's own elements"):
        d.as_strided((2, 3), (3, 1), 3)


def test_a_fallback_view_of_an_operand_without_tangent_writes_into_it():
    """``torch.broadcast_tensors(x, y)`` and ``torch.atleast_2d(x, y)`` with y a Dual without
    tangent: a write into y's view reaches y (its view's tangent is zero, not a copy's)."""
    def fn(x, y):
        x, y = x * 1.0, y * 1.0
        torch.broadcast_tensors(x, y)[1].mul_(2.0)
        torch.atleast_2d(x, y)[1].add_(1.0)
        return x, y

    a, b, t = torch.randn(1, 3, **f64), torch.randn(3, **f64), torch.randn(2, 1, 3, **f64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x, y = fn(Dual(a, t), Dual(b))
    (want_x, want_y), (want_xt, _) = forward_ad_jvp(lambda v: fn(v, b), [a], [t])
    torch.testing.assert_close(y.primal, want_y, rtol=0, atol=0)
    torch.testing.assert_close(x.tangents, want_xt, rtol=0, atol=0)


def _complex_views_written(x):
    z = torch.fft.rfft(x)
    z.real.mul_(2.0)
    z.imag.add_(z.real)
    torch.view_as_real(z)[1].neg_()
    z.conj()[2:].mul_(1j)
    return z


def test_in_place_op_on_a_complex_view_writes_into_the_dual():
    """``z.real``, ``z.imag``, ``view_as_real(z)`` and ``z.conj()`` (the forward-AD fallback's
    views) are written through to ``z``, primal and tangent."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _against_forward_ad(_complex_views_written, (8,))


def _row_pow(x):
    y = x.clone()
    row = y[0]
    row **= 2
    return y


def _row_mod(x):
    y = x.clone()
    row = y[1]
    row %= 0.7
    return y


@pytest.mark.parametrize("fn", [_row_pow, _row_mod])
def test_python_in_place_operators_write_into_the_dual(fn):
    """``**=`` and ``%=`` on a view act in place, as ``+=`` does (they rebound the view
    only)."""
    _against_forward_ad(fn, (3, 4))


WRITES_WITHOUT_OUT_OF_PLACE_FORM = {
    "nn.init.constant_": lambda d: nn.init.constant_(d, 0.3),
    "nn.init.normal_": nn.init.normal_,
    "nn.init.kaiming_uniform_": nn.init.kaiming_uniform_,
    "torch.zero_": torch.zero_,
    "fill_diagonal_": lambda d: d.fill_diagonal_(0.5),
    "fill_diagonal_ wrapped": lambda d: d.fill_diagonal_(0.5, wrap=True),
}


@pytest.mark.parametrize("name", sorted(WRITES_WITHOUT_OUT_OF_PLACE_FORM))
def test_an_in_place_write_without_out_of_place_form_acts_as_forward_ad(name):
    """nn.init's functions (which hand the tensor on as ``tensor=``), ``torch.zero_`` and
    ``fill_diagonal_`` on a Dual write it as forward_ad does: the written elements' tangent
    zero, the others' kept, the Dual returned (nn.init failed on the keyword; the others were
    refused for want of an out-of-place form)."""
    fn = WRITES_WITHOUT_OUT_OF_PLACE_FORM[name]
    x, t = torch.randn(7, 3, **f64), torch.randn(7, 3, **f64)
    torch.manual_seed(0)
    with fwAD.dual_level():
        e = fwAD.make_dual(x.clone(), t.clone())
        assert fn(e) is e
        expected = fwAD.unpack_dual(e)
    torch.manual_seed(0)
    d = Dual(x.clone(), t.clone())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's notice
        assert fn(d) is d
    tangent = torch.zeros_like(x) if d.tangents is None else d.tangent
    torch.testing.assert_close(d.primal, expected.primal, rtol=0, atol=0)
    torch.testing.assert_close(tangent, expected.tangent, rtol=0, atol=0)


def _without_tangent(value, like):
    """``value`` as an operand without tangent: a Dual of none beside a Dual, else the
    tensor."""
    return Dual(value) if isinstance(like, Dual) else value


WRITES_OF_VALUES_WITHOUT_TANGENT = {
    "zero_": lambda d: d.zero_(),
    "fill_": lambda d: d.fill_(2.0),
    "copy_ of a tensor": lambda d: d.copy_(torch.ones(2, 3, **f64)),
    "copy_ of a Dual without tangent": lambda d: d.copy_(
        _without_tangent(torch.ones(2, 3, **f64), d)),
    "normal_": lambda d: d.normal_(),
    "uniform_": lambda d: d.uniform_(),
    "nn.init.zeros_": nn.init.zeros_,
}


@pytest.mark.parametrize("name", sorted(WRITES_OF_VALUES_WITHOUT_TANGENT))
def test_a_write_of_values_without_tangent_keeps_the_dual_s_slots_zeroed(name):
    """``d.zero_()``, ``d.fill_(c)``, ``d.copy_(x)``, a random draw on a Dual with slots keep
    them, zeroed, as forward_ad keeps a defined zero tangent: a view taken after the write sees
    a later write that brings a tangent (it kept the written values and no tangent), and
    ``sqrt`` at 0 after ``zero_()`` gives NaN (it gave a zero tangent)."""
    def fn(v, one):
        v = v.clone()
        torch.manual_seed(0)
        WRITES_OF_VALUES_WITHOUT_TANGENT[name](v)
        root = v.sqrt()
        row = v[0]
        v.add_(one)
        return v, row, root

    x, t = torch.randn(2, 3, **f64), torch.randn(2, 2, 3, **f64)
    one, ot = torch.ones(3, **f64), torch.randn(2, 3, **f64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's notice; sqrt of a negative draw
        out = fn(Dual(x, t), Dual(one, ot))
        expected, expected_t = forward_ad_jvp(fn, [x, one], [t, ot])
    for d, y, yt in zip(out, expected, expected_t):
        torch.testing.assert_close(d.primal, y, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(d.tangents, yt, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("op", [lambda d: d.share_memory_(), lambda d: d.set_(torch.ones(3)),
                                lambda d: d.apply_(abs)], ids=["share_memory_", "set_", "apply_"])
def test_an_in_place_op_without_out_of_place_form_that_is_no_write_is_refused(op):
    """An in-place op without out-of-place form that writes no values forward AD can take (it
    moves or rebinds the storage, or calls Python per element) is refused by name, the Dual
    left as it was."""
    x, t = torch.randn(3, **f64), torch.randn(3, **f64)
    d = Dual(x.clone(), t.clone())
    with pytest.raises(TypeError, match="has no out-of-place form to differentiate"):
        op(d)
    assert torch.equal(d.primal, x) and torch.equal(d.tangent, t)


@pytest.mark.parametrize("layout", ["transposed", "channels_last primal"])
def test_a_tangent_laid_out_unlike_its_primal_is_written_with_it(layout):
    """A tangent given in another layout than its primal (both accepted) takes the primal's:
    an in-place op through views of the Dual writes primal and tangent alike, never one of
    them (forward_ad writes both)."""
    if layout == "transposed":
        x, t = torch.randn(3, 4, **f64), torch.randn(4, 3, **f64).t()
        fn = lambda d: d.view(2, 6).view(12).neg_()
    else:
        x = torch.randn(1, 2, 3, 3, **f64).contiguous(memory_format=torch.channels_last)
        t = torch.randn(1, 2, 3, 3, **f64)
        fn = lambda d: d.contiguous(memory_format=torch.channels_last)[0, 0].zero_()
    d = Dual(x.clone(), t.clone())
    fn(d)
    with fwAD.dual_level():
        e = fwAD.make_dual(x.clone(), t.clone())
        fn(e)
        expected = fwAD.unpack_dual(e)
    assert torch.equal(d.primal, expected.primal) and torch.equal(d.tangent, expected.tangent)


IN_PLACE_WRITES = {
    "relu_": lambda d: d.relu_(),
    "masked_fill_": lambda d: d.masked_fill_(torch.eye(3, 4, dtype=torch.bool), 0.5),
    "copy_": lambda d: d.copy_(d.contiguous() * 2.0),
    "scatter_add_": lambda d: d.scatter_add_(1, torch.tensor([[0], [1], [2]]),
                                             torch.ones(3, 1, **f64)),
    "index_add_": lambda d: d.index_add_(0, torch.tensor([0, 2]), torch.ones(2, 4, **f64)),
}


@pytest.mark.parametrize("name", sorted(IN_PLACE_WRITES))
def test_an_in_place_op_keeps_a_transposed_dual_s_strides(name):
    """An in-place op on a transposed Dual without views keeps its strides and its slots', as
    torch's in-place ops keep a tensor's: ``flatten`` then copies (a write into it leaves the
    Dual alone) and ``d.T.view(12)`` views (a write into it reaches the Dual), as forward_ad's
    (the Dual was made contiguous: flatten viewed it, and view failed)."""
    x, t = torch.randn(4, 3, **f64).t(), torch.randn(2, 4, 3, **f64).transpose(1, 2)

    def fn(v):
        v = v.clone()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the fallback's notice
            IN_PLACE_WRITES[name](v)
        v.flatten().zero_()
        v.T.view(12)[:5].mul_(2.0)
        return v

    d = fn(Dual(x, t))
    assert d.primal.stride() == x.stride() and d.tangents.stride() == t.stride()
    y, yt = forward_ad_jvp(fn, [x], [t])
    torch.testing.assert_close(d.primal, y, rtol=0, atol=0)
    torch.testing.assert_close(d.tangents, yt, rtol=0, atol=0)


def test_a_contiguous_dual_written_from_a_transposed_value_stays_contiguous():
    """``d.copy_(e)`` with ``e`` transposed leaves ``d`` and its slots contiguous, as torch's
    copy_ leaves its target: ``d.view(12)`` views it (it was refused)."""
    x, t = torch.randn(3, 4, **f64), torch.randn(2, 3, 4, **f64)
    e, et = torch.randn(4, 3, **f64), torch.randn(2, 4, 3, **f64)

    def fn(v, w):
        v = v.clone()
        v.copy_(w.T)
        v.view(12)[:5].mul_(2.0)
        return v

    d = fn(Dual(x, t), Dual(e, et))
    assert d.primal.is_contiguous() and d.tangents.is_contiguous()
    y, yt = forward_ad_jvp(fn, [x, e], [t, et])
    torch.testing.assert_close(d.primal, y, rtol=0, atol=0)
    torch.testing.assert_close(d.tangents, yt, rtol=0, atol=0)


def _contiguous_written(x):
    y = x.clone()
    y[1:2].contiguous().mul_(10.0)     # contiguous already: y's own row
    y.contiguous()[2].add_(1.0)
    y.t().contiguous()[0].zero_()      # a copy: y is left alone
    return y


def test_contiguous_of_a_contiguous_dual_is_the_dual_itself():
    """``d.contiguous()`` of a Dual whose primal is contiguous (a row of a stack of slots, whose
    slots are not) is ``d`` itself, as torch returns the tensor itself: an in-place op on it
    writes into the Dual (it wrote into a copy); of a transposed Dual, a copy."""
    _against_forward_ad(_contiguous_written, (3, 4))
    d = Dual(torch.randn(1, 2, 3, 3, **f64).contiguous(memory_format=torch.channels_last),
             torch.randn(2, 1, 2, 3, 3, **f64))
    assert d.contiguous(memory_format=torch.channels_last) is d and d[0:1].contiguous() is not d


def test_an_in_place_op_on_an_expanded_dual_takes_the_result_s_layout():
    """A Dual over an expanded tensor, without views, rebound by an in-place op takes the
    result's values in a layout of the result's own (in the expanded strides, its rows
    would share one row of memory)."""
    x, t = torch.randn(1, 4, **f64).expand(3, 4), torch.randn(2, 3, 4, **f64)
    e, et = torch.randn(3, 4, **f64), torch.randn(2, 3, 4, **f64)
    d = Dual(x, t)
    d.add_(Dual(e, et))
    torch.testing.assert_close(d.primal, x + e, rtol=0, atol=0)
    torch.testing.assert_close(d.tangents, t + et, rtol=0, atol=0)


def test_a_view_of_a_strided_primal_with_a_tangent_laid_out_otherwise_writes_both():
    """A strided primal whose tangent is laid out otherwise, so that a view op views the
    primal but would copy the tangent: the view op runs again on the slots laid out as the
    primal, and an in-place op on the view (or on a view of it) writes into both, as
    forward_ad's, which lays such a tangent out as the primal (the view was a copy of both, and
    the write reached neither)."""
    def fn(d):
        d.view(12).view(3, 4).neg_()  # the second view views the first, primal and tangent
        return d

    def primal():
        return _counting(24).reshape(3, 4, 2)[:, :, 0]  # strides (8, 2): view(12) is a view

    t = torch.randn(4, 3, **f64).t()  # its tangent, strides (1, 4): reshape copies
    d = fn(Dual(primal(), t.clone()))
    with fwAD.dual_level():
        ref = fwAD.unpack_dual(fn(fwAD.make_dual(primal(), t.clone())))
    assert not torch.equal(ref.primal, primal())
    torch.testing.assert_close(d.primal, ref.primal, rtol=0, atol=0)
    torch.testing.assert_close(d.tangent, ref.tangent, rtol=0, atol=0)


def test_a_dual_of_a_primal_with_gaps_keeps_its_tangent_as_given():
    """A Dual of a matrix's column keeps the tangent it is given (its slots laid out in the
    column's strides would each span the whole matrix: 4 slots of a 300-element column took
    358,804 elements), and a write through a view of it still reaches primal and tangent, as
    forward_ad's."""
    def fn(d):
        d[::2].mul_(3.0)
        return d

    def primal():
        return _counting(600).reshape(300, 2)[:, 0]

    t = torch.randn(4, 300, **f64)
    refs = []
    for s in range(4):
        with fwAD.dual_level():
            refs.append(fwAD.unpack_dual(fn(fwAD.make_dual(primal(), t[s].clone()))))
    d = Dual(primal(), t)
    assert d.tangents.data_ptr() == t.data_ptr()
    fn(d)
    for s, ref in enumerate(refs):
        torch.testing.assert_close(d.primal, ref.primal, rtol=0, atol=0)
        torch.testing.assert_close(d.tangents[s], ref.tangent, rtol=0, atol=0)


def test_a_dual_with_a_tangent_laid_out_otherwise_takes_writes_through_views_of_views():
    """A Dual whose slots are laid out unlike its primal (``x.T`` with contiguous slots, as
    a rule may leave them: made here by ``Dual._unchecked``, the constructor lays them out
    itself) lays them out as the primal before its first view, so that every later view of
    it, a view of a view included, views them: a write through ``d.T.reshape(12)`` (a view of
    the primal, a copy of slots left as they were) reaches primal and tangent, and a view
    taken before sees it, as forward_ad's (it reached neither)."""
    def fn(d):
        row = d[1]
        d.T.reshape(12)[:5].neg_()
        d.mul_(2.0)
        return d, row

    def primal():
        return _counting(12).reshape(4, 3).T

    t = torch.randn(2, 3, 4, **f64)
    _assert_as_forward_ad(fn(Dual._unchecked(primal(), t.clone(), None, False)), fn, primal, t)


def _assert_as_forward_ad(ours, fn, make_primal, stack) -> None:
    """``ours`` (Duals ``fn`` returned) exactly forward_ad's ``fn`` of ``make_primal()`` along
    each slot of ``stack``, slot by slot."""
    for s in range(stack.shape[0]):
        with fwAD.dual_level():
            theirs = [fwAD.unpack_dual(v)
                      for v in fn(fwAD.make_dual(make_primal(), stack[s].clone()))]
        for d, (p, t) in zip(ours, theirs):
            torch.testing.assert_close(d.primal, p, rtol=0, atol=0)
            torch.testing.assert_close(d.tangents[s], t, rtol=0, atol=0)


# Duals of shape (4, 5) made from a primal in each layout and a tangent stack of T slots in
# each layout, broadcast ones (a stride 0) among them: fresh tensors of the same values on
# every call (an in-place op on a Dual writes into the tensors it was made from).
def _counting(n: int) -> torch.Tensor:
    return torch.arange(1.0, n + 1.0, **f64)


def _drawn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, **f64, generator=torch.Generator().manual_seed(sum(shape)))


STRIDED_PRIMALS = {
    "contiguous": lambda: _counting(20).reshape(4, 5),
    "transposed": lambda: _counting(20).reshape(5, 4).T,
    "stepped": lambda: _counting(40).reshape(4, 10)[:, ::2],
    "offset": lambda: _counting(40).reshape(5, 8)[1:, 2:7],
}
TANGENT_LAYOUTS = {
    "dense": lambda T: _drawn(T, 4, 5),
    "transposed": lambda T: _drawn(T, 5, 4).transpose(1, 2),
    "row broadcast": lambda T: _drawn(T, 1, 5).expand(T, 4, 5),
    "column broadcast": lambda T: _drawn(T, 4, 1).expand(T, 4, 5),
    "scalar broadcast": lambda T: _drawn(T, 1, 1).expand(T, 4, 5),
    "slot broadcast": lambda T: _drawn(1, 4, 5).expand(T, 4, 5),
}
VIEWS_OF_A_DUAL = {
    "row": lambda d: d[1], "column": lambda d: d[:, 2], "transposed row": lambda d: d.T[1],
    "rows": lambda d: d[1:3], "narrow": lambda d: d.narrow(1, 1, 3),
    "diagonal": lambda d: d.diagonal(), "unbind": lambda d: d.unbind(1)[3],
    "iteration": lambda d: list(d)[3], "chunk": lambda d: d.chunk(2, 1)[1],
    "None index": lambda d: d[None, 1],
}
WRITES_INTO_A_VIEW = {
    "mul_": lambda v, e: v.mul_(3.0), "add_": lambda v, e: v.add_(e),
    "zero_": lambda v, e: v.zero_(), "copy_": lambda v, e: v.copy_(e),
    "setitem": lambda v, e: v.__setitem__(0, e[0]),
}


def _written_through_a_view(view, write, d, operand):
    """``write`` into ``view`` of ``d`` (a Dual or forward_ad's dual tensor), then an in-place
    op on ``d`` with a view of it taken before: ``d`` and that view."""
    write(view(d), operand)
    row = d[2]
    d.mul_(2.0)
    return d, row


@pytest.mark.parametrize("tangent", sorted(TANGENT_LAYOUTS))
@pytest.mark.parametrize("primal", sorted(STRIDED_PRIMALS))
def test_a_write_through_a_view_reaches_a_dual_of_any_layout(primal, tangent):
    """An in-place op through a view of a Dual reaches its primal and tangent, and a view taken
    before an in-place op on the Dual sees it, whatever the layouts of the two it was made
    from, a broadcast tangent (a stride 0) of a strided primal included (the writes were lost:
    the Dual kept such slots, which no write can take, and linked no view to them), one
    tangent or a stack of one or two slots, as forward_ad's dual tensor."""
    make_primal, make_stack = STRIDED_PRIMALS[primal], TANGENT_LAYOUTS[tangent]
    for view, write, (T, single) in itertools.product(
            VIEWS_OF_A_DUAL, WRITES_INTO_A_VIEW, ((1, True), (1, False), (2, False))):
        _assert_written_through_a_view_as_forward_ad(
            make_primal, make_stack, VIEWS_OF_A_DUAL[view], WRITES_INTO_A_VIEW[write], T, single,
            f"{view}, {write}")


def _assert_written_through_a_view_as_forward_ad(make_primal, make_stack, view, write,
                                                 T: int, single: bool, case: str):
    """``_written_through_a_view`` of a Dual made of ``make_primal()`` and ``make_stack(T)``
    (its first slot alone where ``single``): primal and every slot exactly forward_ad's."""
    shape = view(make_primal()).shape
    e, et = _drawn(*shape), _drawn(T, *shape)
    stack = make_stack(T)
    ours = _written_through_a_view(view, write, Dual(make_primal(), stack[0] if single else stack),
                                   Dual(e, et[0] if single else et))
    for s in range(T):
        with fwAD.dual_level():
            theirs = _written_through_a_view(
                view, write, fwAD.make_dual(make_primal(), make_stack(T)[s]),
                fwAD.make_dual(e, et[s]))
            theirs = [fwAD.unpack_dual(v) for v in theirs]
        for d, (p, t) in zip(ours, theirs):
            msg = f"{case}, T={T}{', one tangent' if single else ''}, slot {s}"
            torch.testing.assert_close(d.primal, p, rtol=0, atol=0, msg=msg)
            torch.testing.assert_close(d.tangents[s], t, rtol=0, atol=0, msg=msg)


def _written_through_rows(make):
    def fn(b):
        y = make(b)
        y[0].mul_(3.0)
        row = y[1]
        for r in y:
            r.add_(1.0)
        y.mul_(2.0)
        return y, row
    return fn


@pytest.mark.parametrize("make", [lambda b: torch.addmm(b, _drawn(3, 4), _drawn(4, 4)),
                                  lambda b: torch.baddbmm(b, _drawn(2, 3, 4), _drawn(2, 4, 4))],
                         ids=["addmm", "baddbmm"])
def test_a_broadcast_tangent_an_op_gives_takes_writes_through_views(make):
    """``torch.addmm(b, x, w)`` (``baddbmm``) whose only tangent is the bias's gives a
    broadcast tangent (a stride 0): a write through a view of the result, and a write into it
    that a view taken before sees, reach primal and tangent, as forward_ad's (they were
    lost)."""
    b, bt = _drawn(4), _drawn(2, 4)
    fn = _written_through_rows(make)
    y, row = fn(Dual(b, bt))
    (ref, ref_row), (ref_t, ref_row_t) = forward_ad_jvp(fn, [b], [bt])
    for ours, p, t in ((y, ref, ref_t), (row, ref_row, ref_row_t)):
        torch.testing.assert_close(ours.primal, p, rtol=0, atol=0)
        torch.testing.assert_close(ours.tangents, t, rtol=0, atol=0)


def test_a_view_op_that_views_a_strided_primal_but_not_its_broadcast_tangent_writes_both():
    """``d.view(12)`` of a strided primal whose broadcast tangent (a stride 0) cannot be viewed
    so: the Dual's slots are laid out as its primal, and the write into the view reaches both,
    as forward_ad's (it reached neither)."""
    def fn(d):
        d.view(12).view(3, 4)[1:].neg_()
        return d

    def primal():
        return _counting(24).reshape(3, 4, 2)[:, :, 0]  # strides (8, 2): view(12) views it

    tangents = _drawn(2, 1, 4).expand(2, 3, 4)
    d = fn(Dual(primal(), tangents))
    for s in range(2):
        with fwAD.dual_level():
            ref = fwAD.unpack_dual(fn(fwAD.make_dual(primal(), tangents[s])))
        torch.testing.assert_close(d.primal, ref.primal, rtol=0, atol=0)
        torch.testing.assert_close(d.tangents[s], ref.tangent, rtol=0, atol=0)


def _complex(make):
    """``make``'s float64 tensor, of real part and imaginary part its values and their halves,
    as complex128, in the same strides."""
    def fn(*args):
        x = make(*args)
        return torch.complex(x, x / 2)  # (complex keeps x's strides, a stride 0 included)
    return fn


VIEWS_AS_REAL = {
    "real": lambda d: d.real, "imag": lambda d: d.imag, "real row": lambda d: d.real[1],
    "view_as_real": torch.view_as_real, "transposed imag": lambda d: d.T.imag,
}


@pytest.mark.parametrize("tangent", sorted(TANGENT_LAYOUTS))
@pytest.mark.parametrize("primal", sorted(STRIDED_PRIMALS))
def test_a_write_through_a_real_view_reaches_a_complex_dual_of_any_layout(primal, tangent):
    """An in-place op through ``d.real``, ``d.imag`` or ``view_as_real(d)`` of a complex Dual
    (views of another dtype) reaches its primal and tangent, whatever the layouts of the two
    it was made from, as forward_ad's: where the slots were laid out unlike the primal
    (``x.T`` with a contiguous tangent) or broadcast, the view was a copy of both, and the
    write was lost."""
    make_primal = _complex(STRIDED_PRIMALS[primal])
    make_stack = _complex(TANGENT_LAYOUTS[tangent])
    for view, write, (T, single) in itertools.product(
            VIEWS_AS_REAL, ("mul_", "zero_", "add_"), ((1, True), (2, False))):
        _assert_written_through_a_view_as_forward_ad(
            make_primal, make_stack, VIEWS_AS_REAL[view], WRITES_INTO_A_VIEW[write], T, single,
            f"{view}, {write}")


@pytest.mark.parametrize("view", sorted(VIEWS_AS_REAL))
def test_a_write_through_a_real_view_reaches_narrower_complex_slots(view):
    """A complex128 Dual of complex64 tangents: a write through a view as real (``d.real``,
    ``view_as_real(d)``) reaches its primal and its slots, as forward_ad's of the tangent
    widened (the view's tangent came out float64, which the slots' view could not be, and the
    view was a copy of both)."""
    def fn(d):
        VIEWS_AS_REAL[view](d).mul_(3.0)
        return d

    def primal():
        return _complex(lambda: _counting(20).reshape(4, 5))()

    t = _complex(lambda: _drawn(2, 4, 5))().to(torch.complex64)
    d = fn(Dual(primal(), t.clone()))
    assert d.tangent_dtype == torch.complex64
    for s in range(2):
        with fwAD.dual_level():
            ref = fwAD.unpack_dual(fn(fwAD.make_dual(primal(), t[s].to(torch.complex128))))
        torch.testing.assert_close(d.primal, ref.primal, rtol=0, atol=0)
        torch.testing.assert_close(d.tangents[s].to(torch.complex128), ref.tangent,
                                   rtol=1e-6, atol=1e-6)


def test_a_selection_of_directions_is_a_dual_of_its_own():
    """``select_directions`` of some slots is a Dual of its own: an in-place op on it, or on a
    view of it (a head's Flatten then an in-place activation), acts on it as on any Dual and
    leaves the Dual that carries the other directions as it was, so that each direction's
    head sees the same primal (float64 func.jvp per direction)."""
    head = nn.Sequential(nn.Flatten(), nn.LeakyReLU(0.5, inplace=True), nn.Linear(12, 2)).double()
    x, t = torch.randn(2, 3, 2, 2, **f64), torch.randn(2, 2, 3, 2, 2, **f64)
    d = Dual(x.clone(), t.clone(), directions=[0, 1])
    outs = [head(d.select_directions([j])) for j in (0, 1)]
    d.select_directions([1]).relu_()
    d.select_directions([]).view(-1).zero_()
    assert torch.equal(d.primal, x) and torch.equal(d.tangents, t)
    assert d.select_directions([0, 1]) is d  # every slot kept: the Dual itself

    def writes_through_a_view(h):  # a block that writes through a view of its input, reads it
        h.view(-1)[:3].mul_(2.0)
        return h * 1.0

    out = writes_through_a_view(d.select_directions([0]))
    y, yt = torch.func.jvp(lambda v: writes_through_a_view(v.clone()), (x,), (t[0],))
    torch.testing.assert_close(out.primal, y, rtol=0, atol=0)
    torch.testing.assert_close(out.tangents[0], yt, rtol=0, atol=0)
    assert torch.equal(d.primal, x) and torch.equal(d.tangents, t)
    for j in (0, 1):
        y, yt = torch.func.jvp(lambda v: head(v.clone()), (x,), (t[j],))
        torch.testing.assert_close(outs[j].primal, y, rtol=1e-13, atol=1e-14)
        torch.testing.assert_close(outs[j].tangents[0], yt, rtol=1e-12, atol=1e-13)


def test_data_is_the_primal_and_a_write_into_it_reaches_the_parameter():
    """``d.data`` is the primal's, without tangent (as forward_ad's), and a write into a
    parameter's ``.data`` inside a dual pass (weight clipping) writes into the parameter, as on
    the plain pass."""
    class Clipped(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.tensor([-2.0, 0.5, 3.0], **f64))

        def forward(self, x):
            self.w.data.clamp_(-1, 1)
            return x * self.w

    d = Dual(torch.randn(3, **f64), torch.randn(3, **f64))
    assert type(d.data) is torch.Tensor and torch.equal(d.data, d.primal)
    model = Clipped()
    fgkernels.set_tangents(model, {"w": torch.ones(3, **f64)})
    out = model(Dual(torch.ones(3, **f64), torch.zeros(3, **f64)))
    fgkernels.clear_tangents(model)
    assert torch.equal(model.w.detach(), torch.tensor([-1.0, 0.5, 1.0], **f64))
    assert torch.equal(out.primal, model.w.detach())
    assert torch.equal(out.tangent, torch.ones(3, **f64))


def test_storage_metadata_is_the_primal_s_and_no_fallback_op():
    """``stride``, ``element_size``, ``data_ptr``, ... describe the primal's storage: they are
    the primal's, also under strict_rules, and count no fallback op."""
    d = Dual(torch.randn(3, 4).t(), torch.randn(4, 3))
    before = dict(fgkernels.fallback_ops())
    with fgkernels.strict_rules():
        for name in ("stride", "storage_offset", "element_size", "nelement", "data_ptr",
                     "is_floating_point", "is_complex", "is_signed", "get_device"):
            assert getattr(d, name)() == getattr(d.primal, name)(), name
        assert d.untyped_storage().data_ptr() == d.primal.untyped_storage().data_ptr()
        # torch's functions of the same questions, which torch's own Python code calls
        for fn in (torch.is_floating_point, torch.is_complex, torch.is_signed,
                   torch.is_inference, torch.numel):
            assert fn(d) == fn(d.primal), fn.__name__
        assert torch.is_same_size(d, d.primal) and not torch.is_same_size(d, d[:1])
    assert dict(fgkernels.fallback_ops()) == before


def test_comparison_with_none_and_round_act_as_on_a_tensor():
    d = Dual(torch.tensor([1.4, -2.6], **f64), torch.ones(2, **f64))
    assert (d == None) is False and (d != None) is True  # noqa: E711
    assert d not in (None,)
    for r, e in ((round(d), torch.round(d.primal)),
                 (round(d, 1), torch.round(d.primal, decimals=1))):
        assert torch.equal(r.primal, e)
        assert r.tangent is None or not r.tangent.any()  # rounding is flat: a zero tangent


@pytest.mark.parametrize("fn", [lambda x: x + 1.0, lambda x: torch.where(x > 0, x, 0.0),
                                lambda x: x - torch.zeros(4, **f64)])
def test_an_op_output_owns_its_tangent(fn):
    """An op's output whose tangent is an operand's passed through (x + c) has a tangent of
    its own: an in-place op on a view of the output leaves the operand alone, as forward_ad."""
    def step(x):
        y = fn(x)
        y[0].mul_(3.0)
        return x * 1.0 + y.sum(0)

    _against_forward_ad(step, (3, 4))


@pytest.mark.parametrize("norm", ["layer_norm", "group_norm"])
def test_a_norm_output_owns_the_bias_tangent_it_passes_on(norm):
    """A norm over a batch of one (a decode step, a 1x1 map) whose bias tangent reaches the
    output unchanged: the output's tangent is a tensor of its own, so that neither the op (the
    input's term added where both carry a direction) nor an in-place op on the output writes
    into the bias tangent."""
    shape = (1, 1, 8) if norm == "layer_norm" else (1, 8, 1, 1)
    op = (lambda x, w, b: F.layer_norm(x, (8,), w, b)) if norm == "layer_norm" else \
        (lambda x, w, b: F.group_norm(x, 2, w, b))
    x, w, b = torch.randn(shape, **f64), torch.randn(8, **f64), torch.randn(8, **f64)
    bt = torch.randn(2, 8, **f64)
    before = bt.clone()
    out = op(Dual(x, torch.randn(1, *shape, **f64), directions=(0,)), w,
             Dual(b, bt, directions=(0, 1)))
    torch.testing.assert_close(bt, before, rtol=0, atol=0)
    out = op(Dual(x), w, Dual(b, bt, directions=(0, 1)))
    out.select_directions([1])[0].mul_(3.0)
    out.view(-1).add_(1.0)
    torch.testing.assert_close(bt, before, rtol=0, atol=0)


def _base_mul_seen_by_a_row(x):
    y = x.clone()
    row = y[0]
    y.mul_(3.0)
    return row * 1.0


def _base_add_seen_by_a_view(x):
    y = x.clone()
    flat = y.view(-1)
    y += y * y
    y.relu_()
    return flat + 0.0


def _base_clamp_seen_by_rows(x):
    y = x.clone()
    rows = list(y)
    y.clamp_(-0.5, 0.5)
    return torch.stack([r * 1.0 for r in rows])


@pytest.mark.parametrize("fn", [_base_mul_seen_by_a_row, _base_add_seen_by_a_view,
                                _base_clamp_seen_by_rows])
def test_in_place_op_on_a_dual_is_seen_by_its_views(fn):
    """A view taken before an in-place op on the Dual it views (``row = d[0]; d.mul_(3)``)
    sees the op, primal and tangent, as a view of a tensor does (it kept the old values)."""
    _against_forward_ad(fn, (3, 4))


def _unsqueezed_in_place(x):
    y = x.clone()
    y.unsqueeze_(0)
    return y * 1.0


def _transposed_in_place_seen_by_a_row(x):
    y = x.clone()
    row = y[0]
    y.t_()
    y.mul_(2.0)
    return row * 1.0


def _squeezed_in_place(x):
    y = x.clone().unsqueeze(1)
    y.squeeze_(1)
    y.add_(1.0)
    return y * 1.0


@pytest.mark.parametrize("fn", [_unsqueezed_in_place, _transposed_in_place_seen_by_a_row,
                                _squeezed_in_place])
def test_a_shape_changing_in_place_op_reshapes_the_dual(fn):
    """unsqueeze_, t_, squeeze_ give the Dual a new shape over the same tensors, as they give a
    tensor (they were refused); a view taken before still views them."""
    _against_forward_ad(fn, (3, 4))


def test_an_in_place_op_that_would_grow_a_dual_is_refused():
    """An in-place op whose result is not a view of the Dual and has another shape (a
    broadcast) is refused, as torch refuses it, and the Dual is left as it was."""
    d = Dual(torch.randn(3, **f64), torch.randn(3, **f64))
    before = d.primal.clone()
    with pytest.raises(RuntimeError, match="cannot change a Dual's shape"):
        d.add_(torch.ones(2, 3, **f64))
    assert d.shape == (3,) and torch.equal(d.primal, before)


def _square_t_(x):
    y = x.clone()
    y.t_()
    return y * 1.0


def _batched_transpose_(x):
    y = x.clone().view(2, 2, 2)
    y.transpose_(1, 2)
    y.swapdims_(0, 2)
    return y.mul_(2.0) * 1.0


def _reshape_copy_then_in_place(x):
    y = x.t()
    e = y.reshape(-1)   # a copy: y is not contiguous
    r = e[0:2]
    e.mul_(2.0)
    return torch.cat([x.reshape(-1), e, r])


@pytest.mark.parametrize("fn", [_square_t_, _batched_transpose_, _reshape_copy_then_in_place])
def test_in_place_views_and_copies_as_forward_ad(fn):
    """An in-place view op that keeps the shape (a square t_) rebinds the Dual (it tried to
    copy a tensor onto its own transpose); a reshape that copies owns its tangent, so that an
    in-place op on it, after a view of it was taken, leaves the input alone."""
    _against_forward_ad(fn, (2, 4) if fn is _reshape_copy_then_in_place else
                        (3, 3) if fn is _square_t_ else (8,))


def test_a_reshape_that_copies_the_primal_owns_its_tangent():
    """A transposed primal with a contiguous tangent: ``reshape`` copies the primal but could
    view the tangent; the result owns both, so an in-place op on it (after a view of it) leaves
    the input Dual alone."""
    x, t = torch.randn(4, 3, **f64).t(), torch.randn(3, 4, **f64)
    x0, t0 = x.clone(), t.clone()
    d = Dual(x, t)
    e = d.reshape(-1)
    head = e[0:2]
    e.mul_(2.0)
    assert torch.equal(d.tangent, t0) and torch.equal(d.primal, x0)
    torch.testing.assert_close(head.tangent, 2 * t0.reshape(-1)[0:2])


def test_a_view_of_a_dual_without_tangent_sees_in_place_ops():
    """As a view of a tensor: ``c = d[0]; d.mul_(3)`` with no tangent anywhere."""
    x = torch.randn(3, 4, **f64)
    d = Dual(x.clone())
    c = d[0]
    d.mul_(3.0)
    torch.testing.assert_close(c.primal, 3 * x[0])


def test_a_view_written_with_slots_its_dual_lacks_names_the_writes_that_work():
    """``out[0].copy_(d[0])`` into a Dual without tangent would give its views slots they
    cannot take: refused, naming the writes that work, which give forward_ad's tangent (the
    written row's; zero elsewhere). The Dual is left as it was."""
    x, t = torch.randn(2, 3, **f64), torch.randn(2, 3, **f64)
    out = Dual(torch.zeros(2, 3, **f64))
    with pytest.raises(RuntimeError, match=r"cannot change its tangent's slots .*write into "
                                           r"the Dual it views \(d\[i\] = value"):
        out[0].copy_(Dual(x, t)[0])
    assert out.tangents is None and torch.equal(out.primal, torch.zeros(2, 3, **f64))
    expected = torch.stack([t[0], torch.zeros(3, **f64)])
    out[0] = Dual(x, t)[0]
    torch.testing.assert_close(out.tangents[0], expected, rtol=0, atol=0)
    out = Dual(torch.zeros(2, 3, **f64), torch.zeros(1, 2, 3, **f64))
    out[0].copy_(Dual(x, t)[0])
    torch.testing.assert_close(out.tangents[0], expected, rtol=0, atol=0)


def test_a_conversion_to_a_new_primal_owns_its_tangent():
    """``e = d.double()`` of a float32 Dual with a bfloat16 tangent: the tangent stays
    bfloat16, but is e's own: an in-place op on e (after a view of it) leaves d's alone."""
    x, t = torch.randn(3, 4), torch.randn(3, 4).bfloat16()
    t0 = t.clone()
    d = Dual(x, t)
    e = d.double()
    row = e[0]
    e.mul_(3.0)
    assert torch.equal(d.tangent, t0) and torch.equal(t, t0)
    torch.testing.assert_close(row.tangent.float(), 3 * t0[0].float(), rtol=1e-2, atol=0)


def test_an_in_place_op_on_a_viewed_dual_whose_primal_requires_grad():
    """A primal inside an autograd graph (no leaf): the in-place op is recorded, as on a
    tensor, and the gradient through the view is torch's."""
    w = torch.randn(4, **f64, requires_grad=True)
    x = w * 1.0
    d = Dual(x, torch.randn(4, **f64))
    c = d[0:2]
    d.mul_(3.0)
    c.primal.sum().backward()
    torch.testing.assert_close(w.grad, torch.tensor([3.0, 3.0, 0.0, 0.0], **f64))


def test_a_viewed_dual_with_an_expanded_tangent_takes_in_place_ops():
    """A layer norm whose only tangent is its bias's has an expanded (stride-0) tangent: a
    view of it and then an in-place op work as without the view."""
    x, w, b, bt = (torch.randn(3, 4, **f64), torch.randn(4, **f64), torch.randn(4, **f64),
                   torch.randn(1, 4, **f64))
    results = []
    for take_view in (False, True):
        y = F.layer_norm(Dual(x), (4,), w, Dual(b, bt))
        if take_view:
            _ = y[0]
        y.mul_(2.0)
        results.append(y)
    torch.testing.assert_close(results[1].primal, results[0].primal)
    torch.testing.assert_close(results[1].tangents, results[0].tangents)


def test_an_in_place_op_that_adds_a_direction_to_a_viewed_dual():
    """A Dual with views that gains a direction in place takes it (its views, which have no
    room for it, keep what they had), as one without views does."""
    x, t = torch.randn(4, **f64), torch.randn(1, 4, **f64)
    d = Dual(x, t, directions=[0])
    d.chunk(2)
    e = Dual(torch.randn(4, **f64), torch.randn(1, 4, **f64), directions=[1])
    d.add_(e)
    assert d.directions == (0, 1)
    torch.testing.assert_close(d.primal, x + e.primal, rtol=0, atol=0)
    torch.testing.assert_close(d.tangents, torch.cat([t, e.tangents]), rtol=0, atol=0)


def test_a_parameter_keeps_its_shape_on_the_dual_pass():
    """A shape-changing in-place op on a parameter during a dual pass is refused (its Dual
    cannot give the parameter a new shape), and the parameter is left as it was."""
    class Squeezing(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, **f64))

        def forward(self, x):
            with torch.no_grad():
                self.w.unsqueeze_(0)
            return x * self.w

    m = Squeezing()
    fgkernels.random_tangents(m)
    with pytest.raises(RuntimeError, match="cannot change a parameter Dual's shape"):
        m(Dual(torch.randn(3, **f64)))
    assert m.w.shape == (3,)


def test_an_in_place_op_keeps_the_duals_dtypes():
    """``d += e`` with a float64 ``e`` leaves a float32 ``d`` float32, as torch's in-place ops
    keep their tensor's dtype (it became float64); a complex result is refused, as by torch."""
    import torch.autograd.forward_ad as fwAD
    x, t = torch.randn(3), torch.randn(3)
    e, et = torch.randn(3, **f64), torch.randn(3, **f64)
    d = Dual(x.clone(), t.clone())
    d += Dual(e, et)
    with fwAD.dual_level():
        ref = fwAD.make_dual(x.clone(), t.clone())
        ref += fwAD.make_dual(e, et)
        expected = fwAD.unpack_dual(ref)
    assert d.dtype == torch.float32 and d.tangent.dtype == torch.float32
    torch.testing.assert_close(d.primal, expected.primal)
    torch.testing.assert_close(d.tangent, expected.tangent)
    bf = Dual(x.clone(), t.to(torch.bfloat16))
    bf.mul_(Dual(e, et))
    assert bf.dtype == torch.float32 and bf.tangent_dtype == torch.bfloat16
    with pytest.raises(RuntimeError, match="can't be cast to the desired output type"):
        Dual(x.clone(), t.clone()).add_(torch.ones(3, dtype=torch.complex64))


def test_in_place_op_on_a_slice_writes_into_the_dual():
    """``b = bias.clone(); b[n:2n].zero_()`` (Swin V2's attention zeroes the key bias so): the
    slice is a view of the Dual's primal and tangent, as of a tensor, and forward_ad agrees."""
    import torch.autograd.forward_ad as fwAD
    b, bt = torch.randn(6, dtype=torch.float64), torch.randn(1, 6, dtype=torch.float64)
    d = Dual(b, bt).clone()
    d[2:4].zero_()
    d[4:].mul_(3.0)
    with fwAD.dual_level():
        x = fwAD.make_dual(b, bt[0]).clone()
        x[2:4].zero_()
        x[4:].mul_(3.0)
        expected = fwAD.unpack_dual(x)
    torch.testing.assert_close(d.primal, expected.primal)
    torch.testing.assert_close(d.tangents[0], expected.tangent)


@pytest.mark.parametrize("make", [torch.tensor, torch.as_tensor])
def test_a_tensor_constructor_called_on_a_dual_says_what_to_pass(make):
    """torch.tensor(d) reads a Dual as a nested sequence (it calls no __torch_function__): it
    stops with a message naming d.primal, not torch's 'len() of a 0-d tensor'."""
    with pytest.raises(TypeError, match="pass d.primal or d.tangent"):
        make(Dual(torch.randn(3), torch.randn(3)))
    with pytest.raises(TypeError, match="len\\(\\) of a 0-d Dual"):
        len(Dual(torch.tensor(1.0)))


@pytest.mark.parametrize("fn", [lambda a, b: a * b, lambda a, b: a + b])
def test_a_0d_operand_of_a_wider_dtype_gives_the_result_s_tangent_dtype(fn):
    """A 0-d float64 Dual with a float32 one: torch keeps the result float32 (0-d operands do
    not promote) and so does its tangent, as forward_ad's (it came out float64, which no
    Dual may carry and every layer after refused)."""
    x, t = torch.randn(2, 3), torch.randn(2, 3)
    s, st = torch.tensor(0.5, **f64), torch.tensor(1.5, **f64)
    out = fn(Dual(x, t), Dual(s, st))
    with fwAD.dual_level():
        expected = fwAD.unpack_dual(fn(fwAD.make_dual(x, t), fwAD.make_dual(s, st)))
    assert out.dtype == out.tangent_dtype == expected.tangent.dtype == torch.float32
    torch.testing.assert_close(out.tangent, expected.tangent)


def test_out_a_dual_writes_primal_and_tangent():
    """``torch.add(a, b, out=d)`` writes the result into d, primal and tangent, with grad on
    or off (under no_grad it wrote the primal alone)."""
    a = Dual(torch.ones(3, **f64), torch.ones(3, **f64))
    for grad in (True, False):
        d = Dual(torch.zeros(3, **f64), torch.full((3,), 5.0, **f64))
        with torch.set_grad_enabled(grad):
            r = torch.add(a, a, out=d)
        assert r is d
        assert torch.equal(d.primal, torch.full((3,), 2.0, **f64))
        assert torch.equal(d.tangent, torch.full((3,), 2.0, **f64))


# --- edge cases of the op rules, each against forward_ad in float64 -----------------------------
def _setitem_with_leading_ones(a, v):
    a = a * 1.0
    a[0] = v.unsqueeze(0)  # a (1, 4) value into a (4,) row: torch drops the leading 1
    return a


def _attention_with_an_empty_row(q, k, v):
    mask = torch.ones(3, 3, dtype=torch.bool)
    mask[1] = False  # query 1 may attend to nothing
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.MATH):  # (torch's fused CPU kernel has no forward mode)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


EDGE_CASES = {
    # baddbmm's input broadcast from (N,) against (B, M, N): the slot axis stays in front
    "baddbmm 1-D input": (lambda i, a, b: torch.baddbmm(i, a, b, beta=0.5, alpha=2.0),
                          [(4,), (2, 3, 5), (2, 5, 4)], 3),
    # an empty dim list reduces every dim, as torch's sum, mean and vector_norm do
    "sum dim=[]": (lambda x: x.sum(dim=[]), [(3, 4)], 2),
    "mean dim=()": (lambda x: x.mean(dim=()), [(3, 4)], 2),
    "vector_norm dim=()": (lambda x: torch.linalg.vector_norm(x, dim=()), [(3, 4)], 2),
    # constant padding over every dim of the primal, the first included (and cropping)
    "pad every dim": (lambda x: F.pad(x, (1, 2, 2, 1)), [(3, 4)], 2),
    "crop dim 0": (lambda x: F.pad(x, (0, 0, -1, 0)), [(3, 4)], 2),
    "pad a 1-D input": (lambda x: F.pad(x, (1, 2)), [(5,)], 3),
    "setitem leading 1s": (_setitem_with_leading_ones, [(3, 4), (4,)], 2),
    # a negative dim counts from the end of the output (one dim more than the input)
    "unsqueeze dim=-1": (lambda x: x.unsqueeze(-1), [(3, 4)], 2),
    "unsqueeze dim=-3": (lambda x: torch.unsqueeze(x, -3), [(3, 4)], 2),
    # a 0-d reduction with a dtype: the tangent takes it too
    "sum of a 0-d with a dtype": (lambda x: x.float().sum(dtype=torch.float64), [()], 2),
    # matmul's 1-D operands and broadcast batches, the slot axis kept in front (T = 3)
    "matmul vector @ batch": (lambda a, b: a @ b, [(5,), (2, 5, 3)], 3),
    "matmul batch @ vector": (lambda a, b: torch.matmul(a, b), [(2, 3, 5), (5,)], 3),
    "matmul vector @ vector": (lambda a, b: a @ b, [(5,), (5,)], 3),
    "matmul matrix @ batch": (lambda a, b: a @ b, [(3, 5), (2, 2, 5, 4)], 3),
    # einsum without an output: the indices that occur once, in order
    "einsum implicit output": (lambda a, b: torch.einsum("ij,jk", a, b), [(3, 4), (4, 2)], 2),
    # softmax without a dim: torch's legacy choice (dim 0 of a 3-D input)
    "softmax implicit dim": (lambda x: F.softmax(x, dim=None), [(2, 3, 4)], 2),
    # a query that may attend to nothing: 0, and a tangent of 0, as torch's attention gives
    "attention with an empty row": (_attention_with_an_empty_row, [(1, 2, 3, 4)] * 3, 2),
    # a zero row's norm: forward_ad's tangent is 0 there
    "vector_norm of a zero row": (lambda x: torch.linalg.vector_norm(
        x * torch.tensor([0.0, 1.0, 1.0], **f64)[:, None], dim=-1), [(3, 4)], 2),
    # a max pool's sizes as one-element lists, which torch takes for both dims
    "max_pool2d of one-element lists": (lambda x: F.max_pool2d(x, [3], [2], [1], [1]),
                                        [(2, 3, 8, 8)], 2),
    # the forms with indices called by name give (values, indices) whatever return_indices
    "max_pool2d_with_indices": (lambda x: F.max_pool2d_with_indices(x, 2)[0], [(2, 3, 6, 6)], 2),
    "max_pool1d_with_indices": (lambda x: F.max_pool1d_with_indices(x, 2)[0], [(2, 3, 6)], 2),
    "adaptive_max_pool2d_with_indices": (
        lambda x: F.adaptive_max_pool2d_with_indices(x, 3)[0], [(2, 3, 7, 7)], 2),
    # torch.cat passes over a 1-D empty operand (a legacy placeholder) of any other shape
    "cat beside a legacy empty": (lambda a: torch.cat([torch.empty(0, **f64), a, a * 2], 1),
                                  [(2, 3)], 3),
    "narrow at a tensor start": (lambda x: x.narrow(1, torch.tensor(1), 2), [(3, 4)], 2),
    # a convolution's geometry as one-element sequences and NumPy ints, as torch takes it
    "conv2d one-element and NumPy geometry": (
        lambda x, w: F.conv2d(x, w, None, (2,), [np.int64(1)], np.int64(1), np.int64(1)),
        [(2, 3, 7, 6), (4, 3, 3, 3)], 2),
    "conv1d NumPy geometry": (lambda x, w: F.conv1d(x, w, None, np.int64(2), (1,)),
                              [(2, 3, 9), (4, 3, 3)], 2),
    # einsum's sublist form: subscripts as lists of ints, the output's last, or none
    "einsum sublists": (lambda a, b: torch.einsum(a, [0, 1], b, [1, 2], [2, 0]),
                        [(2, 3), (3, 4)], 2),
    "einsum sublists with an ellipsis": (lambda a, b: torch.einsum(a, [Ellipsis, 30], b, [30, 1]),
                                         [(5, 2, 3), (3, 4)], 2),
}


@pytest.mark.parametrize("case", sorted(EDGE_CASES))
def test_op_edge_cases_as_forward_ad(case):
    fn, shapes, slots = EDGE_CASES[case]
    _against_forward_ad(fn, *shapes, slots=slots)


@pytest.mark.parametrize("fn", [lambda v: torch.linalg.vector_norm(v, dim=-1),
                                lambda v: v.norm()], ids=["vector_norm", "norm"])
def test_the_norm_of_a_complex_dual(fn):
    """A real norm of complex values: its tangent is Re(conj(x)·ẋ)/‖x‖, as forward_ad's."""
    _against_forward_ad(fn, (2, 3), slots=2, dtype=torch.complex128)


def test_a_single_tangent_meeting_a_stack_of_one_gives_a_stack():
    """A Dual given one tangent (its shape) and one given a stack of T = 1: their result is
    stacked, as the second's; two single ones give a single one."""
    x = torch.randn(3, **f64)
    single, stacked = Dual(x, torch.randn(3, **f64)), Dual(x, torch.randn(1, 3, **f64))
    assert (single + stacked).tangent.shape == (single * stacked).tangent.shape == (1, 3)
    assert (single + single).tangent.shape == (3,)


def test_division_by_zero_gives_forward_ad_s_infinities():
    """``ẏ = (ȧ − y·ḃ)/b`` in one quotient: at b = 0 the tangent is ±inf as forward_ad's, not
    the NaN of ``ȧ/b − y·ḃ/b`` (inf − inf)."""
    a, at = torch.tensor([-1.0, 1.0, 2.0], **f64), torch.tensor([[-0.5, 0.3, 0.0]], **f64)
    b, bt = torch.zeros(3, **f64), torch.tensor([[0.7, 0.2, 0.0]], **f64)
    out = Dual(a, at) / Dual(b, bt)
    y, yt = forward_ad_jvp(torch.div, [a, b], [at, bt])
    torch.testing.assert_close(out.primal, y, equal_nan=True)
    torch.testing.assert_close(out.tangents, yt, equal_nan=True)


@pytest.mark.parametrize("act", [torch.exp, torch.sigmoid, F.silu, F.gelu, F.hardtanh,
                                 F.hardsigmoid, F.hardswish])
def test_a_nan_bfloat16_tangent_stays_nan_unless_the_kernel_selects(act):
    """A bfloat16 tangent of a float32 primal: where the slope underflows to 0 (x = -200), a
    NaN tangent stays NaN for an activation whose derivative multiplies (exp, sigmoid, silu,
    gelu), and is 0 for one whose kernel selects (hardtanh, hardsigmoid, hardswish), as
    forward_ad gives in bfloat16."""
    x = torch.tensor([-200.0, 0.5, -5.0])
    t = torch.tensor([float("nan"), 1.0, float("nan")], dtype=torch.bfloat16)
    out = act(Dual(x, t))
    with fwAD.dual_level():
        expected = fwAD.unpack_dual(act(fwAD.make_dual(x.bfloat16(), t))).tangent
    assert torch.equal(out.tangent.isnan(), expected.isnan())
    torch.testing.assert_close(out.tangent.float(), expected.float(), equal_nan=True,
                               rtol=1e-2, atol=1e-2)


def test_a_softmax_dim_out_of_range_is_refused_as_torch_refuses_it():
    d = Dual(torch.randn(2, 3), torch.randn(2, 3))
    for dim in (2, -3):
        with pytest.raises(IndexError, match="out of range"):
            F.softmax(d, dim=dim)
    torch.testing.assert_close(F.softmax(d, dim=-2).primal, F.softmax(d.primal, dim=0))


def test_a_tensor_converted_to_a_dual_s_dtype_stays_a_tensor():
    """``t.type_as(d)`` and ``t.to(d)``: the Dual gives its dtype and device, the result is the
    tensor's, without tangent (they raised)."""
    d = Dual(torch.randn(3, **f64), torch.randn(3, **f64))
    t = torch.ones(3)
    for r in (t.type_as(d), t.to(d)):
        assert type(r) is torch.Tensor and r.dtype == torch.float64 and torch.equal(r, t.double())


@pytest.mark.parametrize("targets", ["ignore_index 255", "uint8"])
def test_cross_entropy_targets_as_torch_takes_them(targets):
    """An ignore_index outside the classes (255 with 3 classes), and uint8 class indices, which
    torch's cross_entropy takes: the tangent as forward_ad's."""
    z, zt = torch.randn(4, 3, **f64), torch.randn(2, 4, 3, **f64)
    if targets == "uint8":
        y, kwargs = torch.tensor([0, 2, 1, 1], dtype=torch.uint8), {}
    else:
        y, kwargs = torch.tensor([0, 255, 2, 1]), dict(ignore_index=255)
    out = F.cross_entropy(Dual(z, zt), y, **kwargs)
    loss, lt = forward_ad_jvp(lambda v: F.cross_entropy(v, y, **kwargs), [z], [zt])
    torch.testing.assert_close(out.primal, loss)
    torch.testing.assert_close(out.tangents, lt)


@pytest.mark.parametrize("layer", ["linear", "layer_norm"])
def test_a_layer_s_weight_and_bias_of_different_directions_take_their_union(layer):
    """A weight and a bias whose tangents carry different directions: the layer's output
    carries the union, each direction as forward_ad gives it (they were refused)."""
    x = torch.randn(5, 4, **f64)
    w = torch.randn(3, 4, **f64) if layer == "linear" else torch.randn(4, **f64)
    b = torch.randn(3 if layer == "linear" else 4, **f64)
    wt, bt = torch.randn(1, *w.shape, **f64), torch.randn(1, *b.shape, **f64)
    fn = (lambda w_, b_: F.linear(x, w_, b_)) if layer == "linear" else \
        (lambda w_, b_: F.layer_norm(x, (4,), w_, b_))
    out = fn(Dual(w, wt, directions=[1]), Dual(b, bt, directions=[2]))
    assert out.directions == (1, 2)
    _, along_w = forward_ad_jvp(fn, [w, b], [wt, None])
    _, along_b = forward_ad_jvp(fn, [w, b], [None, bt])
    torch.testing.assert_close(out.tangents, torch.cat([along_w, along_b]), rtol=1e-12,
                               atol=1e-13)


def test_view_refuses_what_torch_refuses_and_writes_through_what_it_takes():
    """``d.view`` is torch's view: an error where the primal's layout allows none (a transpose
    flattened, a channels_last map reshaped), not a copy that in-place ops would write into in
    vain; where it takes the view, an in-place op on it reaches ``d``."""
    x = torch.randn(3, 4, **f64)
    for d, shape in ((Dual(x.t(), torch.randn(2, 4, 3, **f64)), (-1,)),
                     (Dual(torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)),
                      (2, -1))):
        with pytest.raises(RuntimeError, match="view size is not compatible"):
            d.view(*shape)
    d = Dual(x.clone(), torch.randn(2, 3, 4, **f64))
    v = d.view(2, 6)
    v.mul_(0.0)
    assert (d.primal == 0).all() and (d.tangents == 0).all()


def _written_through_a_view_as(view):
    def fn(x):
        y = x.clone()
        row = y[1]
        view(y)[0].mul_(3.0)
        view(y).mul_(2.0)
        return y, row
    return fn


@pytest.mark.parametrize("view", [lambda v: v.view(v.dtype), lambda v: v.view(dtype=v.dtype)],
                         ids=["positional", "by keyword"])
def test_a_view_as_the_dual_s_own_dtype_is_a_view_with_its_tangent(view):
    """``d.view(d.dtype)`` is ``d.view(d.shape)``: its tangent is the Dual's, a write through it
    reaches the Dual, primal and tangent, and a view taken before sees it, as forward_ad's
    ``view(shape)`` (it was refused; forward_ad's dtype view, of any dtype, has no tangent, and
    a write through it reaches the primal alone); a bfloat16 tangent stays bfloat16."""
    x, t = torch.randn(3, 4, **f64), torch.randn(2, 3, 4, **f64)
    ours = _written_through_a_view_as(view)(Dual(x, t))
    expected, tangents = forward_ad_jvp(_written_through_a_view_as(lambda v: v.view(v.shape)),
                                        [x], [t])
    for d, y, yt in zip(ours, expected, tangents):
        torch.testing.assert_close(d.primal, y, rtol=0, atol=0)
        torch.testing.assert_close(d.tangents, yt, rtol=0, atol=0)
    low = view(Dual(x.float(), t.bfloat16()))
    assert low.dtype == torch.float32 and low.tangent_dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.int64, torch.float32, torch.complex128],
                         ids=str)
def test_a_view_as_another_dtype_is_refused_by_name(dtype):
    """``d.view(dtype)`` of another dtype than the Dual's (its bits reinterpreted have no
    tangent) is refused, naming the two dtypes and what to call instead (a conversion where
    the dtype has tangents); the Dual is left as it was."""
    x, t = torch.randn(3, 4, **f64), torch.randn(3, 4, **f64)
    d = Dual(x, t)
    with pytest.raises(TypeError, match=rf"cannot be viewed as {dtype}, another dtype than its "
                                        rf"own torch.float64 .*d.primal.view\({dtype}\)") as e:
        d.view(dtype)
    assert ("d.to(" in str(e.value)) == (dtype != torch.int64)
    assert d.primal is x and torch.equal(d.tangent, t)


NUMPY_NAMED = {
    "sum": lambda v: v.sum(axis=1), "mean keepdims": lambda v: v.mean(1, keepdims=True),
    "var": lambda v: v.var(axis=1), "std_mean": lambda v: torch.std_mean(v, axis=0)[0],
    "amax": lambda v: v.amax(axis=1, keepdims=True), "max": lambda v: v.max(axis=1).values,
    "softmax": lambda v: v.softmax(axis=1), "cumsum": lambda v: torch.cumsum(v, axis=1),
    "logsumexp": lambda v: v.logsumexp(axis=1),
}


@pytest.mark.parametrize("name", sorted(NUMPY_NAMED))
def test_numpy_names_of_dim_and_keepdim_as_torch_takes_them(name):
    """``axis=`` and ``keepdims=``, which torch takes for ``dim`` and ``keepdim``: forward_ad's
    numbers (they were refused, and var(axis=1) reduced over every dim)."""
    op = NUMPY_NAMED[name]
    x, t = torch.randn(3, 4, **f64), torch.randn(2, 3, 4, **f64)
    y, yt = forward_ad_jvp(op, [x], [t])
    out = op(Dual(x, t))
    torch.testing.assert_close(out.primal, y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.tangents, yt, rtol=1e-12, atol=1e-12)


NUMPY_NAMED_OPERANDS = {
    "vector_norm(x=)": lambda v, w: torch.linalg.vector_norm(x=v, ord=3, dim=0),
    "vector_norm(x=), 2-norm": lambda v, w: torch.linalg.vector_norm(x=v, dim=1),
    "sin(a=)": lambda v, w: torch.sin(a=v),
    "add(x1=, x2=)": lambda v, w: torch.add(x1=v, x2=w, alpha=2.0),
    "Tensor.mul(x2=)": lambda v, w: v.mul(x2=w),
    "sum(x=, axis=)": lambda v, w: torch.sum(x=v, axis=1),
    "cosine_similarity(x1=, x2=)": lambda v, w: F.cosine_similarity(x1=v, x2=w),
    # rules that take their operands by any name (``**kwargs``)
    "max(x=, x2=)": lambda v, w: torch.max(x=v, x2=w),
    "Tensor.min(x2=)": lambda v, w: v.min(x2=w),
    "pow(x=, exponent=)": lambda v, w: torch.pow(x=v, exponent=3.0),
    "sort(x=)": lambda v, w: torch.sort(x=v, dim=0).values,
    # the arithmetic in place
    "Tensor.add_(x2=)": lambda v, w: (v * 1.0).add_(x2=w, alpha=2.0),
    "Tensor.sub_(x2=)": lambda v, w: (v * 1.0).sub_(x2=w),
    "Tensor.mul_(x2=)": lambda v, w: (v * 1.0).mul_(x2=w),
    "Tensor.div_(x2=)": lambda v, w: (v * 1.0).div_(x2=w),
}


@pytest.mark.parametrize("name", sorted(NUMPY_NAMED_OPERANDS))
def test_numpy_names_of_the_operands_as_torch_takes_them(name):
    """``x=``, ``a=``, ``x1=`` for ``input`` and ``x2=`` for ``other``, which torch's argument
    parser takes for every op it parses (``torch.linalg.vector_norm(x=d)``, its documented
    name), rules that take any name included (``torch.max(x=d, x2=e)``): forward_ad's numbers
    (they were refused, or failed naming no op); an op whose own operands are so named
    (``cosine_similarity(x1, x2)``) keeps them."""
    op = NUMPY_NAMED_OPERANDS[name]
    x, t = torch.randn(3, 4, **f64), torch.randn(2, 3, 4, **f64)
    y, yt = forward_ad_jvp(op, [x, x.flip(0)], [t, t.flip(1)])
    out = op(Dual(x, t), Dual(x.flip(0), t.flip(1)))
    torch.testing.assert_close(out.primal, y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.tangents, yt, rtol=1e-12, atol=1e-12)


def test_a_numpy_name_torch_refuses_is_refused():
    """``F.relu(x=d)`` (a Python function, which binds its own names) and ``torch.sin(x=d,
    input=e)`` (the operand twice) are refused, as torch refuses them."""
    d = Dual(torch.randn(3, **f64), torch.randn(3, **f64))
    for op in (lambda v: F.relu(x=v), lambda v: torch.sin(x=v, input=v)):
        with pytest.raises(TypeError):
            op(torch.randn(3, **f64))
        with pytest.raises(TypeError, match="unexpected keyword argument 'x'"):
            op(d)


@pytest.mark.parametrize("name", ["add_", "sub_", "mul_", "div_"])
def test_the_arithmetic_in_place_refuses_out_as_torch(name):
    """``d.add_(e, out=o)`` is refused, as torch's method refuses ``out=``, and writes neither
    (it wrote both ``d`` and ``o``)."""
    x, e = torch.randn(3, **f64), torch.rand(3, **f64) + 1.0
    with pytest.raises(TypeError):
        getattr(x.clone(), name)(e, out=torch.zeros(3, **f64))
    d, o = Dual(x.clone(), torch.randn(2, 3, **f64)), torch.zeros(3, **f64)
    before = d.primal.clone(), d.tangents.clone()
    with pytest.raises(TypeError, match=f"{name}\\(\\) got an unexpected keyword argument 'out'"):
        getattr(d, name)(e, out=o)
    assert torch.equal(d.primal, before[0]) and torch.equal(d.tangents, before[1])
    assert not o.any()


SHAPES_BY_KEYWORD = {
    "Tensor.permute": lambda v: v.permute(dims=(2, 0, 1)),
    "torch.permute": lambda v: torch.permute(input=v, dims=(2, 0, 1)),
    "Tensor.reshape": lambda v: v.reshape(shape=(4, -1)),
    "torch.reshape": lambda v: torch.reshape(v, shape=(-1, 3)),
    "Tensor.view": lambda v: v.view(size=(6, 4)),
}


@pytest.mark.parametrize("name", sorted(SHAPES_BY_KEYWORD))
def test_dims_and_shapes_by_torch_s_keywords(name):
    """``d.permute(dims=...)``, ``torch.reshape(d, shape=...)``, ``d.view(size=...)``: torch's
    keywords take forward_ad's numbers (they were refused)."""
    op = SHAPES_BY_KEYWORD[name]
    x, t = torch.randn(2, 3, 4, **f64), torch.randn(2, 2, 3, 4, **f64)
    y, yt = forward_ad_jvp(op, [x], [t])
    out = op(Dual(x, t))
    assert torch.equal(out.primal, y) and torch.equal(out.tangents, yt)


def test_a_shape_given_twice_is_refused_as_torch_refuses_it():
    """Sizes beside a ``shape=`` (or a wrong keyword): a TypeError, as torch's."""
    d = Dual(torch.randn(2, 3, **f64))
    for call in (lambda: d.reshape(6, shape=(6,)), lambda: d.view(sizes=(6,)),
                 lambda: torch.reshape(d, size=(6,))):
        with pytest.raises(TypeError):
            call()


def test_a_dual_filled_into_an_integer_tensor_gives_torch_s_value_alone():
    """index_fill and masked_fill of an integer tensor by a Dual value: torch's integer result,
    a plain tensor (a tangent of integers is none; the rule made a Dual of int64 slots, which
    Dual() itself refuses)."""
    x = torch.zeros(3, 4, dtype=torch.long)
    value = Dual(torch.tensor(2.7, **f64), torch.tensor([1.0, 2.0], **f64))
    for out, expected in ((x.index_fill(1, torch.tensor([0, 2]), value),
                           x.index_fill(1, torch.tensor([0, 2]), 2.7)),
                          (x.masked_fill(x == 0, value), x.masked_fill(x == 0, 2.7))):
        assert type(out) is torch.Tensor and torch.equal(out, expected)


# --- writes through views, and operands torch takes -------------------------------------------
@pytest.mark.parametrize("make", [lambda X, b: X - b, lambda X, b: torch.add(X, b, alpha=0.5),
                                  lambda X, b: torch.rsub(b, X), lambda X, b: torch.lerp(b, X, 0.3),
                                  lambda X, b: torch.addcmul(X, b, X)],
                         ids=["sub", "add-alpha", "rsub", "lerp", "addcmul"])
def test_a_tangent_broadcast_from_a_smaller_operand_takes_writes_through_views(make):
    """``X − b`` (X plain, b a Dual of a smaller shape) owns a tangent of X's shape, as
    forward_ad's result does: writes through its views reach it, and views taken before a
    write see it (the broadcast stack was an expanded view, which no view could write)."""
    X, b, bt = torch.randn(3, 4, **f64), torch.randn(4, **f64), torch.randn(4, **f64)

    def writes(y):
        y[:, 0].zero_()
        row = y[1]
        y.mul_(2)
        for r in y:
            r.add_(1)
        return y, row

    y, row = writes(make(X, Dual(b, bt)))
    with fwAD.dual_level():
        ref, ref_row = (fwAD.unpack_dual(t) for t in writes(make(X, fwAD.make_dual(b, bt))))
    for ours, theirs in ((y, ref), (row, ref_row)):
        torch.testing.assert_close(ours.primal, theirs.primal, rtol=1e-15, atol=1e-15)
        torch.testing.assert_close(ours.tangent, theirs.tangent, rtol=1e-15, atol=1e-15)


def test_an_expanded_view_sees_writes_into_the_dual_it_views():
    """``e = d.expand(...)`` views d, as on a tensor: an in-place op on d reaches it, and one on
    e (which would write one element many times) is refused with torch's own message."""
    x, t = torch.randn(1, 4, **f64), torch.randn(1, 4, **f64)
    d = Dual(x.clone(), t.clone())
    e = d.expand(3, 4)
    d.mul_(3)
    with fwAD.dual_level():
        ref = fwAD.make_dual(x.clone(), t.clone())
        ref_e = ref.expand(3, 4)
        ref.mul_(3)
        ref_e = fwAD.unpack_dual(ref_e)
    torch.testing.assert_close(e.primal, ref_e.primal, rtol=0, atol=0)
    torch.testing.assert_close(e.tangent, ref_e.tangent, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="more than one element of the written-to tensor"):
        e.add_(1)
    torch.testing.assert_close(d.primal, 3 * x, rtol=0, atol=0)


def _written_through_overlapping_views(x):
    y = x.clone()
    u = y.unfold(0, 2, 1)                   # rows (0, 1), (1, 2), (2, 3), ...
    u[0] = 7.0
    u[2, 1:] = y[4:5] * 3.0
    u[3].mul_(2.0)
    y.as_strided((3, 2), (1, 1), 4)[1] = y[0]
    return y


def test_a_write_into_a_part_of_an_overlapping_view_writes_that_part():
    """``u[i] = v`` into a view that overlaps itself (unfold, as_strided) writes the part it
    picks, as torch does (the view was written back whole from an out-of-place result, whose
    stale copies of the shared elements overwrote the new values)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's notice (as_strided)
        _against_forward_ad(_written_through_overlapping_views, (8,))


@pytest.mark.parametrize("write", [lambda u: u.mul_(2.0), lambda u: u.__setitem__([0, 2], 1.0),
                                   lambda u: u[0:2].zero_()],
                         ids=["mul_", "advanced index", "overlapping part"])
def test_an_in_place_op_on_an_overlapping_view_is_refused(write):
    """An in-place op on a view that overlaps itself, whole or through an advanced index or
    a part that overlaps too, is refused by name (written back from an out-of-place result, it
    gave wrong values), the Dual left as it was."""
    x, t = torch.arange(4.0, **f64), torch.arange(4.0, **f64) * 10
    d = Dual(x.clone(), t.clone())
    with pytest.raises(RuntimeError, match="on a Dual whose memory overlaps itself"):
        write(d.unfold(0, 2, 1))
    assert torch.equal(d.primal, x) and torch.equal(d.tangent, t)


def _written_through_views_of_an_expanded_view(x):
    y = x.clone()
    e = y[0:1].expand(2, 4)
    e[1].mul_(2.0)
    e[0, 1:3] = y[2, 0:2]
    e[1][3:].zero_()
    return y


def test_a_view_of_an_expanded_view_writes_into_the_dual():
    """A view of an expanded view of a Dual that does not overlap itself (``e[1]``) takes
    in-place ops into the Dual, as torch's (they reached the view alone); one that overlaps
    (``e[:, 0]``) is refused by name, the Dual left as it was."""
    _against_forward_ad(_written_through_views_of_an_expanded_view, (3, 4))
    x, t = torch.randn(3, 4, **f64), torch.randn(3, 4, **f64)
    d = Dual(x.clone(), t.clone())
    with pytest.raises(RuntimeError, match="on a Dual whose memory overlaps itself"):
        d[0:1].expand(2, 4)[:, 0].zero_()
    assert torch.equal(d.primal, x) and torch.equal(d.tangent, t)


def test_a_tangent_on_the_primal_s_memory_is_the_dual_s_own():
    """``Dual(x, x)``: a write into the primal (through a view of the Dual) leaves the
    tangent as given, as the derivative of adding a constant is."""
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], **f64)
    for tangent in (x, x.detach()):
        primal = x.clone()
        d = Dual(primal, primal if tangent is x else primal.detach())
        d[0].add_(10)
        d[1].fill_(7)
        assert d.primal.tolist() == [[11.0, 12.0, 13.0], [7.0, 7.0, 7.0]]
        assert d.tangent.tolist() == [[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]


@pytest.mark.parametrize("fn", [lambda d: np.float64(2) * d, lambda d: np.float32(0.5) + d,
                                lambda d: np.int64(3) - d, lambda d: np.sqrt(4.0) / d,
                                lambda d: d * np.float32(0.5), lambda d: d ** np.float32(2),
                                lambda d: torch.where(d > 0, d, np.float32(0)),
                                lambda d: d * np.bool_(True)],
                         ids=["f64*d", "f32+d", "i64-d", "sqrt/d", "d*f32", "d**f32", "where",
                              "d*bool"])
def test_numpy_scalars_are_numbers_on_either_side(fn):
    """A NumPy scalar is the Python number it holds, on either side of an operator (NumPy
    defers to the Dual's reflected operator, as to a tensor's): the result is a Dual, as
    forward_ad's is a dual tensor."""
    out = _against_forward_ad(fn, (5,))
    assert isinstance(out, Dual)


def test_floor_division_is_a_step_in_place_too():
    """``d // 2``, ``5 // d``, ``t // d``, ``torch.floor_divide``: torch's floor quotient with a
    zero tangent, as ``div(rounding_mode='floor')`` (forward_ad has no rule for floor_divide);
    ``//=`` writes in place, into the Dual a view views."""
    x = torch.tensor([3.0, 5.0, -7.0], **f64)
    d = Dual(x, torch.ones(3, **f64))
    for out, expected in ((d // 2, x // 2), (5 // d, 5 // x), (x.clone() // d, x // x),
                          (torch.floor_divide(d, 2), x // 2)):
        assert torch.equal(out.primal, expected) and not out.tangent.any()
    v = Dual(x.clone())
    row = v[1:]
    row //= 2
    assert v.primal.tolist() == [3.0, 2.0, -4.0]


def test_out_given_as_a_tuple_takes_each_result():
    """``torch.max(d, 1, out=(values, indices))``: a Dual out takes the values and their
    tangent, a plain one the indices; a plain out for the values refuses to drop the tangent
    (under grad), as ``out=`` of one tensor does."""
    x, t = torch.randn(3, 4, **f64), torch.randn(3, 4, **f64)
    values, indices = Dual(torch.empty(3, **f64), torch.zeros(3, **f64)), \
        torch.empty(3, dtype=torch.long)
    result = torch.max(Dual(x, t), 1, out=(values, indices))
    assert result.values is values and result.indices is indices
    ref = torch.max(x, 1)
    assert torch.equal(values.primal, ref.values) and torch.equal(indices, ref.indices)
    assert torch.equal(values.tangent, t.gather(1, ref.indices[:, None])[:, 0])
    with pytest.raises(RuntimeError, match=r"'max\(out=...\)' would write a Dual into a plain"):
        torch.max(Dual(x, t), 1, out=(torch.empty(3, **f64), torch.empty(3, dtype=torch.long)))


def test_operands_as_torch_takes_them():
    """``torch.where(d)`` alone gives the primal's nonzero indices; ``d == "a"`` is False, as
    for a tensor; a fill value of more than 0 dims is refused with torch's message."""
    d = Dual(torch.tensor([[0.0, 1.0], [2.0, 0.0]]), torch.ones(2, 2))
    assert all(torch.equal(a, b) for a, b in zip(torch.where(d), torch.where(d.primal)))
    assert (d == "auto") is False and (d != "auto") is True
    with pytest.raises(RuntimeError, match="fill_ only supports 0-dimension value tensor"):
        d.fill_(Dual(torch.ones(2), torch.ones(2)))


@pytest.mark.parametrize("op", [torch.fmod, torch.remainder, torch.xlogy], ids=lambda f: f.__name__)
def test_a_dual_without_tangent_is_a_constant_of_a_fallback_op(op):
    """A Dual whose tangent is None takes no part in the fallback's forward AD, as a plain
    tensor would: a zero tangent met an infinite partial derivative (fmod by a zero divisor,
    xlogy at 0) as NaN, where forward_ad gives a number."""
    a, at = torch.tensor([1.0, 2.0, 3.0], **f64), torch.ones(3, **f64)
    b = torch.tensor([0.0, 1.5, 2.0], **f64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = op(Dual(a, at), Dual(b))
    with fwAD.dual_level():
        ref = fwAD.unpack_dual(op(fwAD.make_dual(a, at), b))
    torch.testing.assert_close(out.primal, ref.primal, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(out.tangent, ref.tangent, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("op", [torch.fmod, torch.remainder, torch.xlogy], ids=lambda f: f.__name__)
def test_labelled_directions_an_operand_lacks_leave_it_constant_in_a_fallback_op(op):
    """Operands carrying different labelled directions: for each direction, the operands
    without it are constants of the fallback's forward AD, as forward_ad takes them (a zero
    tangent met an infinite partial derivative as NaN: fmod by a zero divisor, xlogy at 0)."""
    a, at = torch.tensor([1.0, 2.0, 3.0], **f64), torch.tensor([1.0, -2.0, 0.5], **f64)
    b, bt = torch.tensor([0.0, 1.5, 2.0], **f64), torch.tensor([0.3, 1.0, -1.0], **f64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = op(Dual(a, at[None], directions=[0]), Dual(b, bt[None], directions=[1]))
    assert out.directions == (0, 1)
    with fwAD.dual_level():
        along_a = fwAD.unpack_dual(op(fwAD.make_dual(a, at), b))
        along_b = fwAD.unpack_dual(op(a, fwAD.make_dual(b, bt)))
    torch.testing.assert_close(out.primal, along_a.primal, rtol=0, atol=0, equal_nan=True)
    for slot, ref in enumerate((along_a, along_b)):
        torch.testing.assert_close(out.tangents[slot], ref.tangent, rtol=0, atol=0,
                                   equal_nan=True)


def test_a_dual_pass_keeps_its_tangents_under_inference_mode():
    """A Dual's tangents are its own values, not autograd's records: under
    torch.inference_mode() a converted model's dual pass and a Dual's ops (a rule's and the
    fallback's) give the tangents they give outside it (forward_ad would give none: README)."""
    torch.manual_seed(0)
    net = fgkernels.convert(nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(),
                                          nn.Flatten(), nn.Linear(27, 2)).double())
    fgkernels.random_tangents(net, 2)
    x, xt = torch.randn(2, 2, 5, 5, **f64), torch.randn(2, 2, 2, 5, 5, **f64)

    def run():
        out = net(Dual(x, xt))
        return out, torch.special.erfcx(out)  # (erfcx: the fallback's)
    outside = run()
    with torch.inference_mode():
        inside = run()
    for a, b in zip(inside, outside):
        torch.testing.assert_close(a.tangents, b.tangents, rtol=0, atol=0)
        assert a.tangents.abs().sum() > 0


@pytest.mark.parametrize("write,value", [
    (lambda d: d.mul_(d), lambda x: x * x),
    (lambda d: d.addcmul_(d, d, value=0.5), lambda x: x + 0.5 * x * x),
    (lambda d: d.div_(d.exp()), lambda x: x / x.exp()),
], ids=["mul_", "addcmul_", "div_"])
def test_an_in_place_op_whose_operand_is_its_target_takes_the_value_s_tangent(write, value):
    """d.mul_(d) writes d·d with tangent 2d·ḋ: the tangent of the value written, as forward_ad
    gives it out of place (its own in-place formula reads the slot it has already written:
    x.mul_(x) gets (1 + x)·x·ẋ, and x.addcmul_(x, x) is off too, in torch 2.13 and 2.14)."""
    x, xt = torch.randn(3, 4, **f64), torch.randn(2, 3, 4, **f64)
    d = Dual(x.clone(), xt.clone())
    assert write(d) is d
    want, want_t = forward_ad_jvp(value, [x], [xt])
    torch.testing.assert_close(d.primal, want, rtol=0, atol=1e-15)
    torch.testing.assert_close(d.tangents, want_t, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("through_a_view", [False, True])
def test_an_op_the_fallback_takes_with_inplace_true_writes_the_dual(through_a_view):
    """F.threshold(d, ..., inplace=True), which the fallback differentiates, returns d itself
    written, as torch returns its input (it returned a new Dual), and a view taken before sees
    the write; written through a view of a Dual, the Dual takes it: against forward_ad."""
    x, xt = torch.randn(3, 4, **f64), torch.randn(2, 3, 4, **f64)

    def fn(v):
        row = v[1]
        target = v[:, 1:] if through_a_view else v
        assert F.threshold(target, 0.1, 7.0, inplace=True) is target
        return v, row

    _assert_as_forward_ad(fn(Dual(x.clone(), xt.clone())), fn, x.clone, xt)
