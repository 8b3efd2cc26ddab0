"""torch's own op database (OpInfo: the sample inputs PyTorch tests its ops with) run through every
op fgkernels has a rule for: each sample with every floating operand a Dual of two tangents,
laid out as given, transposed and with gaps, every floating or complex output's primal and
tangents against forward_ad's, slot by slot, in float64. A sample forward_ad cannot run is left
out; one it runs, fgkernels must run too (with tangents on the input alone where it refuses them
on an operand forward_ad takes as a constant: running statistics)."""
from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.utils import _pytree as pytree

pytest.importorskip("expecttest")  # (torch's test internals import it)
from torch.testing._internal.common_methods_invocations import op_db  # noqa: E402

from fgkernels import Dual  # noqa: E402
from fgkernels.dual.rule_table import RULES  # noqa: E402

from helpers import laid_out  # noqa: E402

SLOTS = 2
SAMPLES = 4  # per op and layout
# Ops whose samples draw at random, and those whose samples read memory a layout changes
# (as_strided reads the storage beyond the view: a transposed copy holds other values there).
DRAWS = re.compile(r"rand|dropout|bernoulli|multinomial|(^|\.)normal($|_)|uniform|poisson|cauchy"
                   r"|exponential|geometric|log_normal|rrelu|empty")
READS_STORAGE = re.compile(r"as_strided")


# Refusals of samples forward_ad runs, by op: a message each (tests/rules/test_hostile_inputs.py
# has the cases).
REFUSED = {"nn.functional.batch_norm": "input must have a channel dimension"}


def _has_rule(op) -> bool:
    name = op.name.split(".")[-1]
    return any(f is not None and f in RULES
               for f in (op.op, op.method_variant, op.inplace_variant,
                         getattr(torch, name, None), getattr(torch.nn.functional, name, None),
                         getattr(torch.Tensor, name, None)))


OPS = [op for op in op_db
       if op.supports_forward_ad and torch.float64 in op.supported_dtypes("cpu")
       and not DRAWS.search(op.name) and _has_rule(op)]


def _floating(v) -> bool:
    return isinstance(v, torch.Tensor) and v.dtype.is_floating_point


def _differentiable(v) -> bool:
    return isinstance(v, torch.Tensor) and (v.dtype.is_floating_point or v.dtype.is_complex)


def _as_given(v):
    return v


def _transposed(v):
    return laid_out(v, "transposed") if isinstance(v, torch.Tensor) else v


def _gapped(v):
    """``v``'s values at every other element of a wider tensor, NaN between them (a kernel
    that reads a gap gives NaN)."""
    if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.dtype.is_floating_point:
        return torch.stack([torch.full_like(v, float("nan")), v], -1)[..., 1]
    return v


def _call(op, input, args, kwargs):
    """The op as code calls it: a Tensor method of torch's (``torch.Tensor.__radd__``, which
    only takes a Tensor itself) on its first operand by name."""
    if getattr(torch.Tensor, op.name, None) is op.op:
        return getattr(input, op.name)(*args, **kwargs)
    return op(input, *args, **kwargs)


def _forward_ad(op, sample, tangents: dict, slot: int):
    """The op's floating outputs at ``sample`` by forward_ad along ``slot``: (primal, tangent)
    each."""
    with fwAD.dual_level():
        dual = lambda v: fwAD.make_dual(v, tangents[id(v)][slot]) if id(v) in tangents else v
        out = _call(op, *pytree.tree_map(dual, (sample.input, sample.args, sample.kwargs)))
        return [fwAD.unpack_dual(v) for v in pytree.tree_leaves(out) if _differentiable(v)]


def _ours(op, sample, tangents: dict):
    dual = lambda v: Dual(v, tangents[id(v)]) if id(v) in tangents else v
    out = _call(op, *pytree.tree_map(dual, (sample.input, sample.args, sample.kwargs)))
    return [v for v in pytree.tree_leaves(out, is_leaf=lambda v: isinstance(v, Dual))
            if isinstance(v, Dual) or _differentiable(v)]


def _compare(ours: list, want: list, k: int) -> None:
    assert len(ours) == len(want[0]), f"sample {k}: {len(ours)} outputs"
    for i, out in enumerate(ours):
        primal = out.primal if isinstance(out, Dual) else out
        torch.testing.assert_close(primal, want[0][i].primal, rtol=1e-9, atol=1e-10,
                                   equal_nan=True, msg=lambda m: f"sample {k} out {i}: {m}")
        for s in range(SLOTS):
            expected = want[s][i].tangent
            expected = torch.zeros_like(primal) if expected is None else expected
            got = out.tangents[s] if isinstance(out, Dual) and out.tangents is not None \
                else torch.zeros_like(primal)
            torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10, equal_nan=True,
                                       msg=lambda m: f"sample {k} out {i} slot {s}: {m}")


@pytest.mark.parametrize("op", OPS, ids=lambda op: op.name + (f".{op.variant_test_name}"
                                                               if op.variant_test_name else ""))
def test_every_sample_of_a_ruled_op_matches_forward_ad(op):
    """Each sample with tangents on every floating operand, and where fgkernels refuses that
    (running statistics with tangents) on the input alone: a sample forward_ad runs must run."""
    checked = 0
    for layout in (_as_given, _transposed, _gapped):
        samples = op.sample_inputs("cpu", torch.float64, requires_grad=False)
        for k, sample in zip(range(SAMPLES), samples):
            sample = sample.transform(layout)
            if READS_STORAGE.search(op.name) and layout is not _as_given:
                continue
            g = torch.Generator().manual_seed(k)
            every = {id(v): torch.randn((SLOTS, *v.shape), generator=g, dtype=v.dtype)
                     for v in pytree.tree_leaves((sample.input, sample.args, sample.kwargs))
                     if _floating(v)}
            alone = {i: t for i, t in every.items()
                     if any(id(v) == i for v in pytree.tree_leaves(sample.input))}
            refusal = None
            for tangents in (every, alone):
                if not tangents:
                    continue
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # (the fallback's notice)
                    try:
                        want = [_forward_ad(op, sample, tangents, s) for s in range(SLOTS)]
                    except Exception:  # noqa: BLE001 (forward_ad cannot run this sample)
                        continue
                    try:
                        ours = _ours(op, sample, tangents)
                    except Exception as e:  # noqa: BLE001 (tried again on the input alone)
                        refusal = e
                        continue
                _compare(ours, want, k)
                checked += 1
                break
            else:
                if refusal is not None and not re.search(REFUSED.get(op.name, "^$"),
                                                         str(refusal)):
                    raise AssertionError(f"sample {k}: forward_ad runs it, fgkernels raised "
                                         f"{type(refusal).__name__}: {refusal}") from refusal
    if not checked:
        pytest.skip("forward_ad runs no sample")
