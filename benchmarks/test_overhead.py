"""What one op costs besides its arithmetic: each op on tiny tensors (the arithmetic is
negligible, the time is dispatch: ``__torch_function__``, operand parsing, slot planning, checks)
on a Dual against the same op on forward_ad's dual tensors (dispatched in C++), and small
models' dual passes at batch 1 and 16, where that cost adds up, eager and compiled
(``fgkernels.compile``, which leaves no Python between the ops). Paired rounds."""
import copy

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.func import functional_call

import fgkernels
from fgkernels import Dual

from conftest import DEVICE
from providers import model_oracle, op_oracle
from zoo import MODELS


def _t(*shape):
    return torch.randn(*shape, device=DEVICE)


# name -> (op on its operands, operand shapes): the first operand carries a tangent
OPS = {
    "add": (lambda a, b: a + b, [(4,), (4,)]),
    "mul scalar": (lambda a: a * 2.0, [(4,)]),
    "relu": (F.relu, [(4,)]),
    "view": (lambda a: a.view(2, 2), [(4,)]),
    "cat": (lambda a, b: torch.cat([a, b]), [(4,), (4,)]),
    "linear": (F.linear, [(1, 2), (2, 2), (2,)]),
    "conv2d": (lambda x, w: F.conv2d(x, w, padding=1), [(1, 1, 2, 2), (1, 1, 3, 3)]),
    "batch_norm": (lambda x, w, b: F.batch_norm(x, None, None, w, b, True),
                   [(2, 1, 2, 2), (1,), (1,)]),
    "gelu": (F.gelu, [(4,)]),
}


def _case(name):
    op, shapes = OPS[name]
    primals = [_t(*s) for s in shapes]
    tangent = _t(*shapes[0])

    def dual():
        return op(Dual(primals[0], tangent), *primals[1:])

    def forward_ad():
        with fwAD.dual_level():
            return fwAD.unpack_dual(op(fwAD.make_dual(primals[0], tangent), *primals[1:]))

    return dual, forward_ad, op_oracle(op, primals, [tangent] + [None] * (len(primals) - 1))


@pytest.mark.parametrize("name", sorted(OPS))
@pytest.mark.parametrize("provider", ["fgkernels", "forward_ad"])
def test_op_overhead(measure, quick, name, provider):
    dual, forward_ad, expected = _case(name)
    measure(dual if provider == "fgkernels" else forward_ad, f"one op on tiny tensors: {name}",
            rounds=20, budget_s=0.5,
            paired={"forward_ad": forward_ad} if provider == "fgkernels" else None,
            expected=expected)


SMALL = ("mobilenet_v3", "resnet", "efficientnet", "convnext")


def _model_case(name, batch, quick, compiled=False):
    torch.manual_seed(0)
    width, size = (4, 8) if quick else (16, 32)
    model = MODELS[name](width).to(DEVICE).eval()
    net = fgkernels.convert(copy.deepcopy(model))
    tangents = fgkernels.random_tangents(net)
    run = fgkernels.compile(net) if compiled else net
    x, xt = _t(batch, 3, size, size), _t(batch, 3, size, size)
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def dual():
        return run(Dual(x, xt))

    def forward_ad():
        with fwAD.dual_level():
            duals = {n: fwAD.make_dual(p, tangents[n]) for n, p in params.items()}
            out = functional_call(model, {**duals, **buffers}, (fwAD.make_dual(x, xt),))
            return fwAD.unpack_dual(out)

    expected = model_oracle(model, params, tangents, x, xt) if quick else None
    return dual, forward_ad, expected


@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize("batch", (1, 16), ids=lambda b: f"b{b}")
@pytest.mark.parametrize("provider", ["fgkernels", "fgkernels-compiled", "forward_ad"])
def test_small_model_dual_pass(measure, quick, name, batch, provider):
    compiled = provider == "fgkernels-compiled"
    if quick and compiled:
        pytest.skip("compiling takes a while; tests/nn/test_compile.py checks every zoo model's "
                    "compiled pass against forward_ad")
    dual, forward_ad, expected = _model_case(name, batch, quick, compiled)
    if compiled:
        dual()  # compiles, outside the timing
    measure(dual if provider != "forward_ad" else forward_ad,
            f"zoo {name} width 16, eval, batch {batch}, 32x32",
            paired={"forward_ad": forward_ad} if provider != "forward_ad" else None,
            expected=expected)
