"""Every row of the op table (tests/op_table.py) on every CPU backend, against forward_ad in
float64: the exact tangents, the terms of a tangent known to be zero skipped with the same
answer, directions that enter part way, non-finite tangents, and channels_last, strided or
transposed operands giving what contiguous ones give; and every native op call a row makes
passes torch.library.opcheck."""
import contextlib

import pytest
import torch

import fgkernels
from fgkernels import Dual

from helpers import CPU_BACKENDS, TOL, laid_out
from op_table import OPS, inputs

F64 = torch.float64


def _assert_matches(out: Dual, expected) -> None:
    y, yt = expected
    torch.testing.assert_close(out.primal, y, **TOL[F64])
    assert out.tangents is not None and out.tangents.shape == yt.shape
    torch.testing.assert_close(out.tangents, yt, **TOL[F64])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", sorted(OPS))
def test_float64_is_forward_ads(case, backend):
    """Two slots on each operand: primal and tangents equal forward_ad's."""
    op = OPS[case]
    x, w, xt, wt = inputs(op, slots=2, seed=2, dtype=F64)
    with fgkernels.use_backend(backend):
        out = op.fn(Dual(x, xt), Dual(w, wt))
    _assert_matches(out, op.oracle(x, w, xt, wt)(F64))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", sorted(OPS))
@pytest.mark.parametrize("constant", ["x", "w"])
def test_a_constant_operand(case, backend, constant):
    """One operand plain (its tangent zero, its terms skipped): forward_ad's answer with that
    tangent zero."""
    op = OPS[case]
    x, w, xt, wt = inputs(op, slots=3, seed=3, dtype=F64)
    if constant == "x":
        xt = None
    else:
        wt = None
    with fgkernels.use_backend(backend):
        out = op.fn(x if xt is None else Dual(x, xt), w if wt is None else Dual(w, wt))
    _assert_matches(out, op.oracle(x, w, xt, wt)(F64))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", sorted(OPS))
def test_directions_entering_part_way(case, backend):
    """x carries directions 0 and 1, w directions 1 and 2: the output carries 0, 1 and 2, each
    slot forward_ad's tangent along that direction (an operand without it held constant)."""
    op = OPS[case]
    x, w, xt, wt = inputs(op, slots=2, seed=6, dtype=F64)
    along_x = torch.stack([xt[0], xt[1], torch.zeros_like(xt[0])])
    along_w = torch.stack([torch.zeros_like(wt[0]), wt[0], wt[1]])
    with fgkernels.use_backend(backend):
        out = op.fn(Dual(x, xt, directions=(0, 1)), Dual(w, wt, directions=(1, 2)))
    assert tuple(out.directions) == (0, 1, 2)
    _assert_matches(out, op.oracle(x, w, along_x, along_w)(F64))


@pytest.mark.parametrize("case", sorted(OPS))
def test_rows_run_on_rules_alone(case):
    """Each row runs under ``strict_rules()`` (a rule that lost its registration would pass every
    other test on forward_ad's fallback), and a row marked as taking the fallback does take it."""
    op = OPS[case]
    x, w, xt, wt = inputs(op, slots=2, seed=1, dtype=F64)
    with fgkernels.strict_rules(), contextlib.nullcontext() if op.on_rules else \
            pytest.raises(TypeError, match="no forward-mode rule"):
        op.fn(Dual(x, xt), Dual(w, wt))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", sorted(OPS))
def test_non_finite_tangents(case, backend):
    """A NaN in one slot of x's tangent, an Inf in the other: the output's tangents are NaN
    where forward_ad's are, infinite with its sign where its are, and equal elsewhere (a
    norm's whole row or channel NaN, as torch's mean(x̂·(ẋ − mean ẋ)) makes it; a row whose
    oracle is a definition of its own: non-finite where the oracle's are)."""
    op = OPS[case]
    x, w, xt, wt = inputs(op, slots=2, seed=7, dtype=F64)
    xt.view(2, -1)[0, 1] = float("nan")
    xt.view(2, -1)[1, 2] = float("inf")
    with fgkernels.use_backend(backend):
        out = op.fn(Dual(x, xt), Dual(w, wt))
    _, expected = op.oracle(x, w, xt, wt)(F64)
    ours = out.tangents
    if op.nan_as_oracle:
        assert torch.equal(ours.isnan(), expected.isnan())
        assert torch.equal(ours.isinf(), expected.isinf())
    assert torch.equal(ours.isfinite(), expected.isfinite())
    finite = expected.isfinite()
    torch.testing.assert_close(ours[finite], expected[finite], **TOL[F64])
    both_inf = ours.isinf() & expected.isinf()
    assert torch.equal(ours[both_inf], expected[both_inf])


# channels_last and strided lay out 4-D operands; transposed (the last two dims' strides
# swapped) any of two dims or more.
LAYOUTS = [(case, layout) for case in sorted(OPS) for layout in
           (["channels_last", "strided"] if len(OPS[case].x_shape) == 4 else [])
           + (["transposed"] if len(OPS[case].x_shape) >= 2 else [])]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case,layout", LAYOUTS)
def test_laid_out_operands(case, layout, backend):
    """x and its slots (and w and its slots where the layout applies) laid out channels_last,
    strided or transposed: the values of the contiguous pass, which are forward_ad's."""
    op = OPS[case]
    x, w, xt, wt = inputs(op, slots=2, seed=4, dtype=F64)
    args = [laid_out(t, layout) for t in (x, xt, w, wt)]
    assert not args[0].is_contiguous() and not args[1].is_contiguous()
    with fgkernels.use_backend(backend):
        out = op.fn(Dual(*args[:2]), Dual(*args[2:]))
    _assert_matches(out, op.oracle(x, w, xt, wt)(F64))


class _NativeCalls(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every call of an fgkernels native op (its arguments as they were: in-place ops
    write to theirs) while a table row runs."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "fgkernels":
            copy = lambda v: v.clone(memory_format=torch.preserve_format) \
                if isinstance(v, torch.Tensor) else v
            self.calls.append((func, *torch.utils._pytree.tree_map(copy, (args, kwargs))))
        return func(*args, **kwargs)


@pytest.mark.skipif("native" not in fgkernels.available_backends(),
                    reason="fgkernels._C is not built")
@pytest.mark.parametrize("case", sorted(OPS))
def test_native_calls_pass_opcheck(case):
    """Each native op a row calls, with the arguments the row gives it, passes
    torch.library.opcheck (schema, fake, dynamic shapes), in float32 and channels_last where
    the row has 4-d operands."""
    op = OPS[case]
    x, w, xt, wt = inputs(op, slots=2, seed=9, dtype=torch.float32)
    calls = []
    for layout in ("contiguous", "channels_last"):
        lx, lxt, lw, lwt = (laid_out(t, layout) for t in (x, xt, w, wt))
        with fgkernels.use_backend("native"), _NativeCalls() as recorder:
            op.fn(Dual(lx, lxt), Dual(lw, lwt))
        calls += recorder.calls
    if not calls:
        pytest.skip(f"{case} calls no native op")
    for func, args, kwargs in calls:
        torch.library.opcheck(func, args, kwargs)
        _assert_aliases_nothing(func, args, kwargs)


def _storages(value) -> list:
    return [t.untyped_storage()._cdata for t in torch.utils._pytree.tree_leaves(value)
            if isinstance(t, torch.Tensor)]


def _assert_aliases_nothing(func, args, kwargs) -> None:
    """The outputs of a native op share no storage with each other, nor, for an op that
    writes none of its arguments, with its inputs (torch.compile requires it of custom ops)."""
    outputs = _storages(func(*args, **kwargs))
    assert len(set(outputs)) == len(outputs), f"{func}: two outputs share one storage"
    if not func._schema.is_mutable:
        assert not set(outputs) & set(_storages((args, kwargs))), \
            f"{func}: an output shares an input's storage"


@pytest.mark.skipif("native" not in fgkernels.available_backends(),
                    reason="fgkernels._C is not built")
def test_layer_ops_without_tangents_alias_nothing():
    """A layer op called with no tangent at all returns its absent parts as tensors of their
    own (one empty tensor returned twice would alias)."""
    ops = torch.ops.fgkernels
    x, w = torch.randn(2, 3), torch.randn(4, 3)
    _assert_aliases_nothing(ops.dual_linear.default, (x, None, w, None, None, None, False), {})
    x, w = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3)
    _assert_aliases_nothing(ops.dual_conv2d.default,
                            (x, None, w, None, None, None, [1, 1], [0, 0], [1, 1], 1), {})
