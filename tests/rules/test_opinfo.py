"""torch's own op database (OpInfo: the sample inputs PyTorch tests its ops with) run through every
op fgkernels has a rule for: each sample with every floating operand a Dual of two tangents,
laid out as given, transposed and with gaps, every floating output's primal and tangents against
forward_ad's, slot by slot, in float64. A sample forward_ad cannot run is left out, and so is a
refusal by fgkernels (tests/rules/test_hostile_inputs.py checks those by name): what this guards
is that no answer is silently wrong."""
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
from fgkernels.dual.value import _RULES  # noqa: E402

SLOTS = 2
SAMPLES = 4  # per op and layout
# Ops whose samples draw at random, and those whose samples read memory a layout changes
# (as_strided reads the storage beyond the view: a transposed copy holds other values there).
DRAWS = re.compile(r"rand|dropout|bernoulli|multinomial|(^|\.)normal($|_)|uniform|poisson|cauchy"
                   r"|exponential|geometric|log_normal|rrelu|empty")
READS_STORAGE = re.compile(r"as_strided")


def _has_rule(op) -> bool:
    name = op.name.split(".")[-1]
    return any(f is not None and f in _RULES
               for f in (op.op, op.method_variant, op.inplace_variant,
                         getattr(torch, name, None), getattr(torch.nn.functional, name, None),
                         getattr(torch.Tensor, name, None)))


OPS = [op for op in op_db
       if op.supports_forward_ad and torch.float64 in op.supported_dtypes("cpu")
       and not DRAWS.search(op.name) and _has_rule(op)]


def _floating(v) -> bool:
    return isinstance(v, torch.Tensor) and v.dtype.is_floating_point


def _as_given(v):
    return v


def _transposed(v):
    if isinstance(v, torch.Tensor) and v.dim() >= 2:
        return v.transpose(-1, -2).contiguous().transpose(-1, -2)
    return v


def _gapped(v):
    """``v``'s values at every other element of a wider tensor, NaN between them (a kernel
    that reads a gap gives NaN)."""
    if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.dtype.is_floating_point:
        return torch.stack([torch.full_like(v, float("nan")), v], -1)[..., 1]
    return v


def _forward_ad(op, sample, tangents: dict, slot: int):
    """The op's floating outputs at ``sample`` by forward_ad along ``slot``: (primal, tangent)
    each."""
    with fwAD.dual_level():
        dualled = lambda v: fwAD.make_dual(v, tangents[id(v)][slot]) if id(v) in tangents else v
        args = pytree.tree_map(dualled, (sample.input, sample.args, sample.kwargs))
        out = op(args[0], *args[1], **args[2])
        return [fwAD.unpack_dual(v) for v in pytree.tree_leaves(out) if _floating(v)]


def _ours(op, sample, tangents: dict):
    dualled = lambda v: Dual(v, tangents[id(v)]) if id(v) in tangents else v
    args = pytree.tree_map(dualled, (sample.input, sample.args, sample.kwargs))
    out = op(args[0], *args[1], **args[2])
    return [v for v in pytree.tree_leaves(out, is_leaf=lambda v: isinstance(v, Dual))
            if isinstance(v, Dual) or _floating(v)]


@pytest.mark.parametrize("op", OPS, ids=lambda op: op.name + (f".{op.variant_test_name}"
                                                               if op.variant_test_name else ""))
def test_every_sample_of_a_ruled_op_matches_forward_ad(op):
    checked = 0
    for layout in (_as_given, _transposed, _gapped):
        samples = op.sample_inputs("cpu", torch.float64, requires_grad=False)
        for k, sample in zip(range(SAMPLES), samples):
            sample = sample.transform(layout)
            g = torch.Generator().manual_seed(k)
            tangents = {id(v): torch.randn((SLOTS, *v.shape), generator=g, dtype=v.dtype)
                        for v in pytree.tree_leaves((sample.input, sample.args, sample.kwargs))
                        if _floating(v)}
            if not tangents or READS_STORAGE.search(op.name) and layout is not _as_given:
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # (the fallback's notice)
                try:
                    want = [_forward_ad(op, sample, tangents, s) for s in range(SLOTS)]
                except Exception:  # noqa: BLE001 (forward_ad cannot run this sample)
                    continue
                try:
                    ours = _ours(op, sample, tangents)
                except (TypeError, ValueError, NotImplementedError, RuntimeError):
                    continue  # a refusal: the hostile-input tests check its message
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
                    torch.testing.assert_close(
                        got, expected, rtol=1e-9, atol=1e-10, equal_nan=True,
                        msg=lambda m: f"sample {k} out {i} slot {s}: {m}")
            checked += 1
    if not checked:
        pytest.skip("no sample both forward_ad and fgkernels run")
