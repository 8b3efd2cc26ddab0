"""Tangents of a lower precision than their primal (bfloat16 tangents of a float32 network), and
networks wholly in bfloat16: the primal is what it is without tangents, the tangents keep their
dtype through every op, and their error against float64 stays within twice the error of torch's
own forward-mode AD in bfloat16 (``err ≤ 2·err_torch + atol``)."""
import copy
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn
import torch.nn.functional as F

import fgkernels
from fgkernels import Dual
from fgkernels.testing import forward_ad_jvp

from helpers import CPU_BACKENDS, ForwardADOracle, assert_within_torch_error, rel_err
from op_table import OPS, TARGET, inputs
from zoo import build_resnet

BF16 = torch.bfloat16


# (the Dual's dtype, a wider operand's): a float32 Dual beside float64, a bfloat16 one beside
# float32
NARROW_WIDE = [(torch.float32, torch.float64), (BF16, torch.float32)]


def _narrow_dual_and_wide_operand(narrow: torch.dtype, wide: torch.dtype):
    """``x, t`` (a Dual's primal and tangent) in ``narrow`` and ``w`` in ``wide``, (3, 4) each,
    the same draws for every case."""
    g = torch.Generator().manual_seed(0)
    x, t, w = (torch.randn(3, 4, generator=g) for _ in range(3))
    return x.to(narrow), t.to(narrow), w.to(wide)


LOSSES_WIDER = {  # a loss of a Dual against a target of a wider dtype (w) without tangent
    "kl_div": lambda a, w: F.kl_div(a, w, reduction="sum", log_target=True)
    + F.kl_div(a, w.sigmoid(), reduction="batchmean"),
    "binary_cross_entropy_with_logits": lambda a, w: F.binary_cross_entropy_with_logits(
        a, w.sigmoid(), pos_weight=w[0].abs()),
    # a 0-d target: torch broadcasts the operands first, so that its dtype counts
    "mse_loss 0-d": lambda a, w: F.mse_loss(a, w[0, 0]),
    "l1_loss 0-d": lambda a, w: F.l1_loss(a, w[0, 0]),
    "smooth_l1_loss 0-d": lambda a, w: F.smooth_l1_loss(a, w[0, 0], beta=0.5),
    "cosine_similarity 0-d": lambda a, w: F.cosine_similarity(a, w[0, 0], dim=-1)
    + F.cosine_similarity(w[0, 0], a, dim=-1) + F.cosine_similarity(a, w[:1].int(), dim=-1),
}
# those whose value torch computes in the wide dtype throughout: their tangent is forward_ad's
# on the operands widened, to the wide dtype's rounding (forward_ad's own on the narrow operands
# rounds the difference narrow: 3e-8 apart in float32)
WIDE_THROUGHOUT = {"mse_loss 0-d", "l1_loss 0-d", "smooth_l1_loss 0-d"}


@pytest.mark.parametrize("case", sorted(LOSSES_WIDER))
@pytest.mark.parametrize("dtypes", NARROW_WIDE, ids=["float32-float64", "bfloat16-float32"])
def test_a_loss_against_a_wider_target_has_forward_ad_s_dtypes(case, dtypes, recwarn):
    """A loss of a Dual whose tangent has its primal's dtype, against a wider target: its
    value and tangent in forward_ad's dtypes (the tangent was the Dual's narrower one while the
    loss was the target's dtype), its tangent forward_ad's to a rounding of the narrow dtype
    (the formulas order their roundings otherwise); a tangent narrower than its primal by
    design stays as it is."""
    narrow, wide = dtypes
    x, t, w = _narrow_dual_and_wide_operand(narrow, wide)
    fn = LOSSES_WIDER[case]
    out = fn(Dual(x, t), w)
    with fwAD.dual_level():
        expected = fwAD.unpack_dual(fn(fwAD.make_dual(x, t), w))
    assert (out.primal.dtype, out.tangent_dtype) \
        == (expected.primal.dtype, expected.tangent.dtype)
    assert out.tangent_dtype == wide
    eps = torch.finfo(narrow).eps
    torch.testing.assert_close(out.primal, expected.primal, rtol=0, atol=0)
    torch.testing.assert_close(out.tangent, expected.tangent, rtol=eps, atol=eps)
    if case in WIDE_THROUGHOUT:
        with fwAD.dual_level():
            widened = fwAD.unpack_dual(fn(fwAD.make_dual(x.to(wide), t.to(wide)), w))
        eps = torch.finfo(wide).eps
        torch.testing.assert_close(out.tangent, widened.tangent, rtol=4 * eps, atol=4 * eps)
    if narrow == torch.float32:  # bfloat16 tangents of the float32 Dual stay bfloat16
        assert fn(Dual(x, t.to(BF16)), w).tangent_dtype == BF16


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", sorted(OPS))
def test_bfloat16_tangents_of_a_float32_op(case, backend, recwarn):
    """The primal equals the float32 pass's; the tangent stays bfloat16, its error within
    twice that of torch's forward_ad in bfloat16."""
    op = OPS[case]
    x, w, xt, wt = inputs(op)
    with fgkernels.use_backend(backend):
        out = op.fn(Dual(x, xt.to(BF16)), Dual(w, wt.to(BF16)))
        full = op.fn(Dual(x, xt), Dual(w, wt))
    assert out.tangents.dtype == BF16 and out.primal.dtype == torch.float32
    torch.testing.assert_close(out.primal, full.primal, rtol=0, atol=0)
    assert_within_torch_error(out, op.oracle(x, w, xt, wt))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", sorted(c for c in OPS if OPS[c].bf16_network))
def test_bfloat16_network(case, backend, recwarn):
    """Primal and tangents in bfloat16: both within twice torch's bfloat16 error."""
    op = OPS[case]
    x, w, xt, wt = inputs(op, seed=1)
    with fgkernels.use_backend(backend):
        out = op.fn(Dual(x.to(BF16), xt.to(BF16)), Dual(w.to(BF16), wt.to(BF16)))
    assert out.primal.dtype == BF16 and out.tangents.dtype == BF16
    assert_within_torch_error(out, op.oracle(x, w, xt, wt))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_resnet_with_bfloat16_tangents(backend, channels_last):
    """A converted ResNet in training mode with bfloat16 parameter and input tangents, beside
    the same ResNet (a copy) with float32 tangents: the primal and running statistics equal the
    float32 pass's, every op keeps the tangents in bfloat16 (strict mode: no fallback), and both
    loss tangents meet float64 forward_ad within their precision, relative, slot by slot."""
    torch.manual_seed(0)
    model = build_resnet(8)
    x = torch.randn(4, 3, 16, 16)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.to(
            memory_format=torch.channels_last)
    reference = copy.deepcopy(model).double()
    net32, net16 = fgkernels.convert(model), fgkernels.convert(copy.deepcopy(model))
    assert net32 is not net16
    g = torch.Generator().manual_seed(3)
    tangents = fgkernels.random_tangents(net32, num_tangents=3, generator=g)
    fgkernels.set_tangents(net16, {k: v.to(BF16) for k, v in tangents.items()})
    xt = torch.randn(3, *x.shape)
    with fgkernels.use_backend(backend), fgkernels.strict_rules():
        out32, out16 = net32(Dual(x, xt)), net16(Dual(x, xt.to(BF16)))
        loss32, loss16 = F.cross_entropy(out32, TARGET), F.cross_entropy(out16, TARGET)
    assert loss16.tangents.dtype == BF16
    assert torch.equal(loss16.primal, loss32.primal)
    for a, b in zip(net16.buffers(), net32.buffers()):
        assert torch.equal(a, b)
    names = list(tangents)
    params = dict(reference.named_parameters())

    def logits_and_loss(x_, *ps):
        out = torch.func.functional_call(reference, dict(zip(names, ps)), (x_,))
        return out, F.cross_entropy(out, TARGET)

    _, (logits_t, loss_t) = forward_ad_jvp(
        logits_and_loss, [x.double(), *[params[n].detach() for n in names]],
        [xt.double(), *[tangents[n].double() for n in names]])
    # relative over all the logits' tangents (a scalar loss sums terms that cancel)
    assert rel_err(out32.tangents, logits_t) < 1e-4 and rel_err(loss32.tangents, loss_t) < 1e-4
    assert rel_err(out16.tangents, logits_t) < 2e-2


def test_dual_accepts_narrower_tangents_only():
    x = torch.randn(2, 3)
    assert Dual(x, torch.randn(2, 3, dtype=BF16)).tangent_dtype == BF16
    assert Dual(x.double(), torch.randn(2, 3)).tangent_dtype == torch.float32
    assert "tangent_dtype=torch.bfloat16" in repr(Dual(x, torch.randn(1, 2, 3, dtype=BF16)))
    with pytest.raises(TypeError, match="floating dtype of fewer bits"):
        Dual(x.to(BF16), torch.randn(2, 3))
    with pytest.raises(TypeError, match="floating dtype of fewer bits"):
        Dual(x, torch.randn(2, 3, dtype=torch.float16).to(BF16).half().int())


def test_operands_promote_as_torch_does():
    """A bfloat16 and a float32 tangent meeting in one op give a float32 tangent."""
    x = torch.randn(2, 3)
    a, b = Dual(x, torch.randn(2, 3, dtype=BF16)), Dual(x, torch.randn(2, 3))
    assert (a + b).tangent_dtype == torch.float32
    assert (a * x).tangent_dtype == BF16
    assert torch.cat([a, Dual(x)]).tangent_dtype == BF16


WIDER = {  # an op meeting a tensor of a wider dtype (float64 w) that has no tangent
    "mul": lambda a, w: a * w, "add": lambda a, w: a + w, "rdiv": lambda a, w: w / a,
    "where": lambda a, w: torch.where(w > 0, a, w), "cat": lambda a, w: torch.cat([a, w]),
    "pow": lambda a, w: (a.abs() + 1) ** w, "atan2": lambda a, w: torch.atan2(a, w),
    "setitem": lambda a, w: _set_first_row(w, a),
    "fallback": lambda a, w: torch.copysign(a, w),  # no rule: torch's forward AD
}


def _set_first_row(w, a):
    out = w + 0 * a  # a Dual of w's dtype (one of forward_ad)
    out[0] = a[0]
    return out


@pytest.mark.parametrize("case", sorted(WIDER))
@pytest.mark.parametrize("dtypes", NARROW_WIDE, ids=["float32-float64", "bfloat16-float32"])
def test_a_tangent_of_its_primal_s_dtype_follows_the_primal_s_promotion(case, dtypes, recwarn):
    """A Dual whose tangent has its primal's dtype, meeting a wider tensor, gives the output
    primal's dtype to its tangent, computed there, as forward_ad's (a float32 tangent was kept
    and the float64 product rounded to it: 1e-7 relative; a bfloat16 network's tangent times a
    float32 tensor, 4e-3); a tangent narrower than its primal by design stays as it is."""
    narrow, wide = dtypes
    x, t, w = _narrow_dual_and_wide_operand(narrow, wide)
    fn = WIDER[case]
    out = fn(Dual(x, t), w)
    with fwAD.dual_level():
        expected = fwAD.unpack_dual(fn(fwAD.make_dual(x, t), w)).tangent
    assert out.primal.dtype == out.tangent_dtype == expected.dtype == wide
    eps = torch.finfo(wide).eps  # (formulas may order their rounding otherwise)
    torch.testing.assert_close(out.tangent, expected, rtol=4 * eps, atol=4 * eps)
    if narrow == torch.float32:  # bfloat16 tangents of the float32 Dual stay bfloat16
        assert fn(Dual(x, t.to(BF16)), w).tangent_dtype == BF16


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layer", ["conv2d", "linear"])
def test_a_layer_promotes_its_input_and_parameter_tangents(layer, backend):
    """bfloat16 input tangents meeting float32 weight tangents in one layer op: the output's
    are float32, each term computed from the bfloat16 slots widened (exactly) to float32,
    within twice torch's float32 error."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 3, 5, 5, generator=g), torch.randn(4, 3, 3, 3, generator=g)
    xt, wt = torch.randn(2, *x.shape, generator=g).to(BF16), torch.randn(2, *w.shape, generator=g)
    fn = (lambda x_, w_: F.conv2d(x_, w_, None, 1, 1)) if layer == "conv2d" else \
        (lambda x_, w_: F.linear(x_[..., 0, 0], w_[..., 0, 0]))
    with fgkernels.use_backend(backend):
        out = fn(Dual(x, xt), Dual(w, wt))
    assert out.tangents.dtype == torch.float32
    assert_within_torch_error(out, ForwardADOracle(fn, [x, w], [xt.float(), wt]))


def test_random_tangents_in_a_tangent_dtype_block():
    """dtype= and the block give bfloat16 draws, the rounding of the float32 draw; a tangent
    wider than its parameter is refused before anything is set."""
    net = fgkernels.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    full = fgkernels.random_tangents(net, 2, torch.Generator().manual_seed(5))
    with fgkernels.tangent_dtype(BF16):
        low = fgkernels.random_tangents(net, 2, torch.Generator().manual_seed(5))
    explicit = fgkernels.random_tangents(net, 2, torch.Generator().manual_seed(5), dtype=BF16)
    for name in full:
        assert low[name].dtype == BF16 and torch.equal(low[name], full[name].to(BF16))
        assert torch.equal(explicit[name], low[name])
    assert fgkernels.random_tangents(net)["0.weight"].dtype == torch.float32
    net16 = fgkernels.convert(nn.Sequential(nn.Conv2d(3, 4, 3))).to(BF16)
    with pytest.raises(TypeError, match="fewer bits"):
        fgkernels.random_tangents(net16, dtype=torch.float32)
    with pytest.raises(TypeError, match="floating or complex torch.dtype"):
        with fgkernels.tangent_dtype(torch.int32):
            pass


def test_complex_parameters_draw_complex_tangents_of_their_kind():
    """A complex128 parameter takes complex64 tangents (refused as "not floating"), keeps its
    own kind inside a bfloat16 block while a real parameter beside it takes bfloat16 (the
    block refused the model), and a dtype of another kind is refused naming its kind."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's note on complex modules
        net = nn.Sequential(nn.Linear(3, 2).to(torch.complex128), nn.Linear(2, 2))
    drawn = fgkernels.random_tangents(net[0], dtype=torch.complex64)
    assert {t.dtype for t in drawn.values()} == {torch.complex64}
    assert all((t.imag != 0).all() for t in drawn.values())  # drawn complex, not real
    with fgkernels.tangent_dtype(BF16):
        drawn = fgkernels.random_tangents(net)
    assert drawn["0.weight"].dtype == torch.complex128 and drawn["1.weight"].dtype == BF16
    with pytest.raises(TypeError, match="or a complex dtype of fewer bits, got torch.bfloat16"):
        fgkernels.random_tangents(net[0], dtype=BF16)


def test_an_explicit_dtype_wins_over_the_block_and_blocks_nest():
    net = fgkernels.convert(nn.Sequential(nn.Conv2d(3, 4, 3))).double()
    dtype_of = lambda **kw: fgkernels.random_tangents(net, **kw)["0.weight"].dtype
    with fgkernels.tangent_dtype(BF16):
        assert dtype_of(dtype=torch.float32) == torch.float32
        with fgkernels.tangent_dtype(torch.float16):
            assert dtype_of() == torch.float16
        assert dtype_of() == BF16  # the outer block's again
    assert dtype_of() == torch.float64


@pytest.mark.skipif("native" not in fgkernels.available_backends(), reason="no extension")
def test_native_ops_with_bfloat16_slots():
    """The raw ops take bfloat16 slots of float32 primals (opcheck: schema, fakes, dtypes), and
    refuse tangents of one call in two dtypes, or wider than the primal."""
    ops = torch.ops.fgkernels
    x = torch.randn(2, 3, 5, 4).to(memory_format=torch.channels_last)
    xt = torch.randn(2, *x.shape, dtype=BF16)
    w, wt = torch.randn(4, 3, 3, 3), torch.randn(2, 4, 3, 3, 3, dtype=BF16)
    b, bt = torch.randn(4), torch.randn(2, 4, dtype=BF16)
    C = x.shape[1]
    coef = (torch.randn(C), torch.randn(C), torch.randn(C), torch.randn(3, C), torch.randn(3, C))
    cases = [
        (ops.dual_relu, (x, xt)),
        (ops.dual_max_pool2d, (x, xt, [2, 2], [2, 2], [0, 0], [1, 1], False)),
        (ops.dual_bn_stats, (x, xt)),
        (ops.dual_bn_apply, (x, xt, [1, -1, 0], *coef, True)),
        (ops.dual_bn_apply, (x, None, [-1, -1, -1], *coef, False, BF16)),
        (ops.dual_conv2d, (x, xt, w, wt, b, bt, [1, 1], [1, 1], [1, 1], 1)),
        (ops.dual_linear, (x.flatten(1)[:, :7], xt.flatten(2)[..., :7], torch.randn(3, 7),
                           torch.randn(2, 3, 7, dtype=BF16), None, None, False)),
        (ops.dual_linear, (x.flatten(1)[:, :7], xt.flatten(2)[..., :7], torch.randn(3, 7),
                           torch.randn(2, 3, 7, dtype=BF16), None, torch.randn(2, 3, dtype=BF16),
                           True)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)
        outs = op(*args)
        if op is not ops.dual_bn_stats:  # statistics are float32 whatever the slots
            assert outs[0].dtype == torch.float32 and outs[1].dtype == BF16, op
    with pytest.raises(RuntimeError, match="share one dtype"):
        ops.dual_conv2d(x, xt, w, wt.float(), b, None, [1, 1], [1, 1], [1, 1], 1)
    with pytest.raises(RuntimeError, match="fewer bits"):
        ops.dual_relu(x.to(BF16), xt.float())
    with pytest.raises(RuntimeError, match="tangent_dtype must be xt's"):
        ops.dual_bn_apply(x, xt, [1, -1, 0], *coef, True, torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("fn,kinks", [
    (lambda v: F.hardtanh(v, -0.5, 1.5), (-0.5, 1.5)), (F.relu6, (6.0,)),
    (F.hardsigmoid, (-3.0, 3.0)), (F.hardswish, (-3.0, 3.0)),
], ids=["hardtanh", "relu6", "hardsigmoid", "hardswish"])
def test_a_narrower_tangent_keeps_the_slope_beside_a_kink(fn, kinks, backend):
    """A float32 primal just beside a kink that bfloat16 rounds onto (within a fifth of the
    bfloat16 spacing below the kink's magnitude, on either side): the slope is the float32
    primal's, so the bfloat16 tangent is forward_ad's in float64 within a rounding of the slope
    and one of the product (the slope of the rounded primal is off by 1/6 to 1)."""
    x = torch.tensor([k + s * abs(k) * 2 ** -8 / 5 for k in kinks for s in (-1, 1)])
    slope = lambda v: forward_ad_jvp(fn, [v], [torch.ones(1, *v.shape, dtype=v.dtype)])[1][0]
    # Each point rounds onto its kink, where the slope differs from one side's at least.
    assert torch.equal(x.to(BF16).float(), torch.tensor([k for k in kinks for _ in (-1, 1)]))
    assert slope(x.to(BF16).double()).ne(slope(x.double())).view(len(kinks), 2).any(1).all()
    xt = torch.randn(2, *x.shape)
    with fgkernels.use_backend(backend):
        out = fn(Dual(x, xt.to(BF16)))
    exact = forward_ad_jvp(fn, [x.double()], [xt.to(BF16).double()])[1]
    torch.testing.assert_close(out.tangents.double(), exact, rtol=2 ** -7, atol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype,bounds", [(BF16, (0.1, 1.0)), (torch.float16, (-0.1001, 0.1001)),
                                          (BF16, (-1.0, 0.3))], ids=["bfloat16", "float16",
                                                                     "bfloat16 upper"])
def test_hardtanh_of_a_16_bit_primal_compares_with_the_bounds_unrounded(dtype, bounds, backend):
    """As torch's derivative: x against the bound in float32 (0.1 is not rounded to bfloat16's
    0.10009765625 first, where x = 0.10009765625 would lose its tangent), at the bounds, beside
    them and between, in the vectorised body and the scalar tail; the primal torch's."""
    lo, hi = bounds
    x = torch.tensor([lo, hi, (lo + hi) / 2] * 11, dtype=dtype)
    x = torch.cat([x, x.nextafter(torch.tensor(-1e9, dtype=dtype)),
                   x.nextafter(torch.tensor(1e9, dtype=dtype))])
    xt = torch.randn(2, *x.shape).to(dtype)
    with fgkernels.use_backend(backend):
        out = F.hardtanh(Dual(x, xt), lo, hi)
    y, yt = forward_ad_jvp(lambda v: F.hardtanh(v, lo, hi), [x], [xt])
    assert torch.equal(out.primal, y) and torch.equal(out.tangents, yt)


@pytest.mark.parametrize("fn", [torch.log, torch.reciprocal, torch.rsqrt, torch.exp,
                                torch.sinh, lambda v: F.elu(v - 12.0, alpha=4e5)],
                         ids=["log", "reciprocal", "rsqrt", "exp", "sinh", "elu"])
def test_a_slope_past_the_tangents_range_is_not_rounded_alone(fn):
    """float16 tangents of a float32 primal where the slope (1/x at x = 1e-5, eˣ at x = 12)
    is past float16's largest value and the product ẋ·f'(x) is not: the product is formed at
    the primal's precision and rounded once (the slope rounded alone is infinite)."""
    x = torch.tensor([1e-5, 3e-6, 12.0, 11.5, 2.0])
    xt = (torch.tensor([1e-3, -2e-3, 1e-2, -3e-3, 0.5]) * torch.ones(2, 1)).half()
    exact = forward_ad_jvp(fn, [x.double()], [xt.double()])[1]
    finite = exact.abs() < torch.finfo(torch.float16).max
    out = fn(Dual(x, xt))
    assert out.tangents.dtype == torch.float16
    torch.testing.assert_close(out.tangents.double()[finite], exact[finite], rtol=2 ** -9,
                               atol=0)


@pytest.mark.parametrize("fn", [F.gelu, torch.tanh, torch.exp, F.silu],
                         ids=["gelu", "tanh", "exp", "silu"])
def test_a_narrower_tangent_of_a_primal_that_requires_grad(fn):
    """bfloat16 tangents of a float32 primal that records an autograd graph (``requires_grad``
    set, as before gradient checkpointing): the same tangents as without it, and the primal's
    graph intact."""
    x, xt = torch.randn(3, 5), torch.randn(2, 3, 5).to(BF16)
    plain = fn(Dual(x, xt))
    d = Dual(x.clone(), xt)
    d.requires_grad = True
    out = fn(d)
    assert torch.equal(out.tangents, plain.tangents) and out.tangents.dtype == BF16
    (grad,) = torch.autograd.grad(out.primal.sum(), d.primal)
    assert grad.shape == x.shape


def test_a_write_through_a_fallback_view_of_narrower_tangents_reaches_the_dual():
    """bfloat16 tangents of a float32 Dual viewed by ops of the forward-AD fallback
    (``atleast_3d``, ``as_strided``, which widen the tangents for jvp): the view is taken of the
    Dual's own slots, so a write into it reaches the Dual, primal and tangent."""
    def fn(v):
        y = v * 1.0
        torch.atleast_3d(y).mul_(3.0)
        y.as_strided((2, 2), (4, 1), 1).neg_()
        return y

    x, xt = torch.randn(3, 4), torch.randn(2, 3, 4).to(BF16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = fn(Dual(x, xt))
    y, yt = forward_ad_jvp(fn, [x.double()], [xt.double()])
    assert out.tangents.dtype == BF16
    torch.testing.assert_close(out.primal.double(), y, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.tangents.double(), yt, rtol=2 ** -7, atol=0)


def _gru_with_a_saturated_update_gate(dtype):
    torch.manual_seed(0)
    gru = nn.GRU(4, 3).to(dtype)
    with torch.no_grad():
        gru.bias_ih_l0[3:6] = 7.0  # z = σ(≈7) ≈ 0.999, which bfloat16 rounds to 1
    return lambda v: gru(v)[0]


@pytest.mark.parametrize("case", ["lerp by a weight near 1", "GRU with a saturated update gate"])
def test_a_coefficient_near_cancellation_is_formed_before_it_is_rounded(case):
    """``1 − w`` (lerp's input term) and ``1 − z`` (a GRU's ṅ term) at the float32 primal's
    precision, then rounded once to the bfloat16 tangents: w or z rounded first gives 1 − 1 = 0
    near 1, where the tangent is then lost (lerp) or absorbed (the GRU's ṅ − z ṅ: all zeros).
    Against forward_ad in float64 of the bfloat16 tangents, within a few bfloat16 roundings
    in norm (an element that is a small sum of larger terms keeps only their absolute error)."""
    torch.manual_seed(1)
    if case.startswith("lerp"):
        w = torch.tensor([0.999, 0.998, 0.9995, 0.9999])
        end = torch.randn(4)
        make = lambda dtype: (lambda v: torch.lerp(v, end.to(dtype), w.to(dtype)))
        x = torch.randn(4)
    else:
        make = _gru_with_a_saturated_update_gate
        x = torch.randn(1, 2, 4)
    xt = torch.randn(2, *x.shape).to(BF16)
    out = make(torch.float32)(Dual(x, xt))
    exact = forward_ad_jvp(make(torch.float64), [x.double()], [xt.double()])[1]
    assert rel_err(out.tangents, exact) < 2 ** -6


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("norm", [lambda a, w, b: F.layer_norm(a, (8,), w, b),
                                  lambda a, w, b: F.group_norm(a, 2, w, b),
                                  lambda a, w, b: F.batch_norm(a, None, None, w, b, True),
                                  lambda a, w, b: F.batch_norm(a, torch.zeros_like(w),
                                                               torch.ones_like(w), w, b)],
                         ids=["layer_norm", "group_norm", "batch_norm", "batch_norm eval"])
def test_a_norm_of_a_bfloat16_input_with_float32_parameters_is_bfloat16(norm, backend):
    """torch normalises a bfloat16 input with float32 parameters into a bfloat16 output, whose
    forward-mode tangent is bfloat16: the Dual's is too (a float32 tangent of a bfloat16 primal
    is no Dual), forward_ad's in float64 within bfloat16 roundings."""
    torch.manual_seed(0)
    x, w, b = torch.randn(4, 8).to(BF16), torch.randn(8), torch.randn(8)
    xt, wt, bt = torch.randn(2, 4, 8).to(BF16), torch.randn(2, 8), torch.randn(2, 8)
    with fgkernels.use_backend(backend):
        out = norm(Dual(x, xt), Dual(w, wt), Dual(b, bt))
    assert out.primal.dtype == out.tangents.dtype == BF16
    exact = forward_ad_jvp(norm, [x.double(), w.double(), b.double()],
                           [xt.double(), wt.double(), bt.double()])[1]
    assert rel_err(out.tangents, exact) < 2 ** -6


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("convert", [False, True], ids=["as built", "converted"])
def test_a_bfloat16_network_with_float32_batch_norms(convert, backend):
    """The usual mixed recipe, a bfloat16 network whose batch norms stay float32: bfloat16
    activations and tangents, as forward_ad's (the float32 parameter tangents made the batch
    norm's output tangent float32, which the native kernels refused), within torch's own error
    in bfloat16 of forward_ad's in float64."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 4, 3), nn.BatchNorm2d(4)).to(BF16)
    for layer in (net[1], net[4]):
        layer.float()
    x, xt = torch.randn(4, 3, 6, 6).to(BF16), torch.randn(4, 3, 6, 6).to(BF16)
    params = dict(net.named_parameters())
    tangents = {n: torch.randn(p.shape).to(p.dtype) for n, p in params.items()}
    oracle = ForwardADOracle(
        lambda x, *ps: torch.func.functional_call(copy.deepcopy(net).to(x.dtype),
                                                  dict(zip(params, ps)), (x,)),
        [x, *params.values()], [t[None] for t in (xt, *tangents.values())])
    model = fgkernels.convert(copy.deepcopy(net)) if convert else copy.deepcopy(net)
    fgkernels.set_tangents(model, tangents)
    with fgkernels.use_backend(backend):
        out = model(Dual(x, xt))
    assert out.primal.dtype == out.tangent.dtype == BF16
    assert_within_torch_error(out, oracle)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("norm", [lambda v: F.layer_norm(v, (16,)),
                                  lambda v: F.group_norm(v.view(4, 4, 4), 2).view(4, 16),
                                  lambda v: F.instance_norm(v.view(4, 4, 4)).view(4, 16)],
                         ids=["layer_norm", "group_norm", "instance_norm"])
def test_a_norm_of_an_input_and_tangent_far_from_zero(norm, backend):
    """x and ẋ with a large common mean (a bias and its tangent, constant over the normalised
    axes): float32 within twice torch's own float32 error of forward_ad's float64 tangent.
    The rounded x̂ has a mean far from 0 there, which times mean(ẋ) entered mean(x̂·ẋ) (errors
    600x torch's at a mean of 1000) until ẋ was centred first, as torch does."""
    torch.manual_seed(0)
    x, xt = torch.randn(4, 16) + 1000, torch.randn(1, 4, 16) + 1000
    with fgkernels.use_backend(backend):
        out = norm(Dual(x, xt))
    assert_within_torch_error(out, ForwardADOracle(norm, [x], [xt]))


_LABELS = torch.arange(64) % 7


@pytest.mark.parametrize("tangent_dtype", [torch.float32, BF16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("op", [
    lambda v: v.softmax(-1), lambda v: v.log_softmax(-1),
    lambda v: F.cross_entropy(v, _LABELS[:v.shape[0]]),
    lambda v: F.cross_entropy(v, _LABELS[:v.shape[0]], reduction="none")],
    ids=["softmax", "log_softmax", "cross_entropy", "cross_entropy none"])
def test_a_softmax_of_an_input_and_tangent_far_from_zero(op, tangent_dtype):
    """x and ẋ with a large common part, which ẋ − Σ softmax(x)·ẋ cancels: ẋ's mean over the
    classes is taken out first, so float32 stays near its own rounding (1e-7 where torch's
    forward mode errs by 8e-4) and bfloat16 tangents within a few roundings of forward_ad's
    float64 tangent of them (the weights, rounded to bfloat16, or exp(log_softmax) with its
    row's common rounding, did not sum to 1: errors of 2e-2, 3x torch's in float32)."""
    torch.manual_seed(0)
    # (bfloat16 keeps about 3 digits: a common part of 1e4 would leave ẋ no spread at all)
    rows, common = (64, 1e4) if tangent_dtype == torch.float32 else (8, 1e3)
    x = torch.randn(rows, 4096 if rows == 8 else 7) + common
    xt = (torch.randn(1, *x.shape) + common).to(tangent_dtype)
    out = op(Dual(x, xt))
    assert out.tangents.dtype == tangent_dtype
    exact = forward_ad_jvp(op, [x.double()], [xt.double()])[1]
    if tangent_dtype == torch.float32:
        assert_within_torch_error(out, ForwardADOracle(op, [x], [xt]))
        assert rel_err(out.tangents, exact) < 1e-5
    else:
        assert rel_err(out.tangents, exact) < 2 ** -7


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_antialiased_resampling_of_bfloat16_tangents_on_the_cpu(mode):
    """The antialiased modes have no CPU kernel for bfloat16: the tangents of a float32 map
    are resampled at float32 and rounded back, forward_ad's in float64 within bfloat16
    roundings."""
    torch.manual_seed(0)
    x, xt = torch.randn(2, 3, 9, 8), torch.randn(2, 2, 3, 9, 8).to(BF16)
    fn = lambda v: F.interpolate(v, size=(5, 4), mode=mode, antialias=True)
    out = fn(Dual(x, xt))
    assert out.tangents.dtype == BF16
    assert rel_err(out.tangents, forward_ad_jvp(fn, [x.double()], [xt.double()])[1]) < 2 ** -6


C128, C64 = torch.complex128, torch.complex64
_W = torch.randn(5, 4, dtype=C128, generator=torch.Generator().manual_seed(1))
COMPLEX_NARROW = {
    "abs": torch.abs, "exp": torch.exp, "tanh": torch.tanh, "angle": torch.angle,
    "matmul": lambda v: v @ _W.T, "linear": lambda v: F.linear(v, _W),
    "einsum": lambda v: torch.einsum("ij,kj->ik", v, _W), "sum": lambda v: v.sum(1),
}


@pytest.mark.parametrize("name", sorted(COMPLEX_NARROW))
def test_a_complex64_tangent_of_a_complex128_primal(name):
    """A complex64 tangent of a complex128 Dual (accepted as a float32 one of a float64 Dual
    is): forward_ad's tangent within a complex64 rounding, complex64 for a complex result (a
    real one takes the output's dtype, as every op's slot plan gives it). |x|'s slope times
    the tangent was complex and wrong (its derivative is no product with a slope); the
    products and linear refused the pair."""
    op = COMPLEX_NARROW[name]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, dtype=C128, generator=gen)
    t = torch.randn(2, 3, 4, dtype=C64, generator=gen)
    y, yt = forward_ad_jvp(op, [x], [t.to(C128)])
    out = op(Dual(x, t))
    torch.testing.assert_close(out.primal, y, rtol=1e-12, atol=1e-12)
    assert out.tangents.dtype == (C64 if yt.is_complex() else torch.float64)
    assert rel_err(out.tangents.to(yt.dtype), yt) < 1e-6
