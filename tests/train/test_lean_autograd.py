"""The local passes' lean autograd: the same gradients as torch's autograd (float64, each case
its own oracle: the same module differentiated by plain autograd), and less held where it says.

- ``LeanBackward``: a convolution's backward split in two calls (CPU, not channels_last),
  training batch norm's backward from ``dual_bn_stats``, and the convolutions of weights named
  differentiated in bfloat16 (their oracle: float64 autograd on operands rounded to bfloat16);
- ``relu_outputs_recomputed``: a ReLU output of a training batch norm saved as the batch norm's
  input and recomputed in the backward, and saved as usual once modified in place.
"""
import contextlib
import copy
import gc
import weakref

import pytest
import torch
from torch import nn

import fgkernels
from fgkernels.train.lean_autograd import LeanBackward, relu_outputs_recomputed
from fgkernels.train.memory import PeakMemory

from helpers import held_by_bfloat16

needs_native = pytest.mark.skipif("native" not in fgkernels.available_backends(),
                                  reason="the lean batch-norm backward needs the extension")

LAYOUTS = [torch.contiguous_format, torch.channels_last]


def _grads(module, x, grad_out, lean_forward=False, lean_backward=False):
    params = [x] + [p for p in module.parameters() if p.requires_grad]
    with torch.enable_grad():
        if lean_forward:
            with relu_outputs_recomputed():
                y = module(x)
        else:
            y = module(x)
        if lean_backward:
            with LeanBackward():
                return torch.autograd.grad(y, params, grad_out)
        return torch.autograd.grad(y, params, grad_out)


def _assert_within_bfloat16_convolution(ours, exact, torchs, name: str) -> None:
    """``ours`` within bfloat16's rounding of ``exact`` (float64 on operands a bfloat16 holds),
    element by element, or within twice the error of torch's own bfloat16 convolution
    (``torchs``) there: on a CPU without bfloat16 instructions torch's kernel rounds its
    partial sums to bfloat16, and no kernel of bfloat16 operands beats it by much."""
    exact = exact.double()
    bound = 2 * (torchs.double() - exact).abs() + 2 ** -8 * exact.abs() \
        + 1e-5 * float(exact.abs().max())
    excess = (ours - exact).abs() - bound
    assert float(excess.max()) <= 0, \
        f"{name}: off by up to {float(excess.max()):.3g} beyond the bound"


def _assert_same(got, want):
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10 * max(1.0, w.abs().max()))


def _conv_bn_relu(layout, affine=True, bias=True, stride=1, groups=1):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(4, 8, 3, stride=stride, padding=1, bias=bias),
        nn.BatchNorm2d(8, affine=affine), nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, padding=1, groups=groups, bias=False),
        nn.BatchNorm2d(8, affine=affine), nn.ReLU(),
    ).double().to(memory_format=layout)


def _inputs(layout, n=3, size=6, stride=1):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, size, size, generator=gen, dtype=torch.float64)
    out = -(-size // stride)
    g = torch.randn(n, 8, out, out, generator=gen, dtype=torch.float64)
    return (x.contiguous(memory_format=layout).requires_grad_(),
            g.contiguous(memory_format=layout))


@needs_native
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize("affine,bias,stride,groups", [(True, True, 1, 1), (False, False, 2, 2)],
                         ids=["affine-bias", "plain-strided-grouped"])
@pytest.mark.parametrize("lean_forward", [False, True], ids=["saved", "recomputed"])
def test_lean_gradients_are_autograds(layout, affine, bias, stride, groups, lean_forward):
    net = _conv_bn_relu(layout, affine, bias, stride, groups)
    x, g = _inputs(layout, stride=stride)
    want = _grads(net, x, g)
    got = _grads(net, x, g, lean_forward=lean_forward, lean_backward=True)
    _assert_same(got, want)


@needs_native
def test_lean_batch_norm_backward_of_a_1d_batch_norm():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU()).double()
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    g = torch.randn(7, 6, dtype=torch.float64)
    _assert_same(_grads(net, x, g, lean_forward=True, lean_backward=True), _grads(net, x, g))


@pytest.mark.parametrize("what", ["forward", "backward"])
def test_what_the_lean_passes_leave_alone_is_autograds(what):
    """Batch norm in eval and a ReLU not after a batch norm run torch's own way: the same
    gradients."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(8).eval(),
                        nn.ReLU(), nn.BatchNorm2d(8), nn.ReLU()).double()
    x, g = _inputs(torch.contiguous_format)
    got = _grads(net, x, g, lean_forward=what == "forward", lean_backward=what == "backward")
    _assert_same(got, _grads(net, x, g))


class _FunctionalBatchNorm(nn.Module):
    """A training batch norm with only a weight, only a bias, or neither, then ReLU, then a
    transposed convolution; ``relayout`` hands the batch norm an output gradient in NCHW for
    its channels_last input."""

    def __init__(self, weight: bool, bias: bool, relayout: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.weight = nn.Parameter(torch.rand(4) + 0.5) if weight else None
        self.bias = nn.Parameter(torch.randn(4)) if bias else None
        self.relayout = relayout
        self.up = nn.ConvTranspose2d(4, 8, 3, stride=2, padding=1, output_padding=1)

    def forward(self, x):
        h = nn.functional.batch_norm(x, None, None, self.weight, self.bias, training=True)
        if self.relayout:
            h = h.contiguous(memory_format=torch.contiguous_format)
        return self.up(torch.relu(h))


@needs_native
@pytest.mark.parametrize("weight,bias", [(True, False), (False, True), (False, False)],
                         ids=["weight-only", "bias-only", "neither"])
def test_a_batch_norm_with_some_parameters(weight, bias):
    net = _FunctionalBatchNorm(weight, bias).double()
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 8, 10, 10, dtype=torch.float64)
    _assert_same(_grads(net, x, g, lean_forward=True, lean_backward=True), _grads(net, x, g))


@needs_native
def test_a_batch_norm_whose_output_gradient_has_another_layout_runs_torchs(monkeypatch):
    import fgkernels.train.lean_autograd as lean
    answers = []

    def noted(*args):
        answers.append(lean_batch_norm_backward(*args))
        return answers[-1]

    lean_batch_norm_backward = lean._lean_batch_norm_backward
    monkeypatch.setattr(lean, "_lean_batch_norm_backward", noted)
    net = _FunctionalBatchNorm(True, True, relayout=True).double()
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64).contiguous(
        memory_format=torch.channels_last).requires_grad_()
    g = torch.randn(3, 8, 10, 10, dtype=torch.float64)
    _assert_same(_grads(net, x, g, lean_forward=True, lean_backward=True), _grads(net, x, g))
    assert answers == [None]


def _relu_output_refs(net, x, lean: bool):
    """Weak references to each ReLU's output after a forward (under relu_outputs_recomputed
    when ``lean``), and the forward's output, which keeps its graph alive."""
    refs = []
    hooks = [m.register_forward_hook(lambda m, i, o: refs.append(weakref.ref(o)))
             for m in net if isinstance(m, nn.ReLU)]
    try:
        with torch.enable_grad(), relu_outputs_recomputed() if lean else contextlib.nullcontext():
            y = net(x)
    finally:
        for h in hooks:
            h.remove()
    gc.collect()
    return refs, y


def test_a_saved_relu_output_of_a_batch_norm_is_not_held():
    """After the forward only the last ReLU's output (the result) is alive: the first one,
    saved by its own backward and the next convolution's, is held as its batch norm's input.
    Outside the context autograd holds it for the backward."""
    net = _conv_bn_relu(torch.contiguous_format)
    x, _ = _inputs(torch.contiguous_format)
    refs, y = _relu_output_refs(net, x, lean=True)
    assert refs[0]() is None and refs[1]() is y
    refs, y = _relu_output_refs(net, x, lean=False)
    assert refs[0]() is not None


class _ScaledAfterReLU(nn.Module):
    """conv → BN → ReLU → ×3 → conv, the scaling in place (``inplace``) or not."""

    def __init__(self, inplace: bool):
        super().__init__()
        torch.manual_seed(0)
        self.inplace = inplace
        self.conv, self.bn = nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.out = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        return self.out(h.mul_(3.0) if self.inplace else h * 3.0)


@needs_native
def test_a_relu_output_modified_in_place_is_saved_as_it_is():
    """The ReLU output scaled in place before the next convolution: that convolution saves
    the scaled tensor, which no recomputation from the batch norm's input gives. (Plain
    autograd refuses this backward: ReLU saved the output it then scaled. Under the context
    ReLU's own saved output is the recomputed one.) The oracle scales out of place."""
    net = _ScaledAfterReLU(inplace=True).double()
    x, g = _inputs(torch.contiguous_format)
    want = _grads(_ScaledAfterReLU(inplace=False).double(), x, g)
    _assert_same(_grads(net, x, g, lean_forward=True, lean_backward=True), want)


@pytest.mark.parametrize("operand", ["input", "weight"])
def test_a_batch_norm_operand_modified_after_the_forward_is_refused(operand):
    """A frozen batch norm on an input that needs no gradient: only the next convolution saves
    the ReLU output, and plain autograd would give its weight gradient from the forward's
    values. Recomputing it from a modified input or weight would not: it is refused."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 8, 3, padding=1)).double()
    net[0].requires_grad_(False)
    x = torch.randn(3, 4, 6, 6, dtype=torch.float64)
    with torch.enable_grad(), relu_outputs_recomputed():
        y = net(x)
    with torch.no_grad():
        (x if operand == "input" else net[0].weight).mul_(-1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        torch.autograd.grad(y, list(net[2].parameters()), torch.ones_like(y))


@needs_native
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "channels_last"])
def test_the_lean_backward_holds_less(layout):
    """The allocator's peak over a conv-BN-ReLU stack's backward, with its input gradient:
    autograd's own holds an activation more than the lean one (NCHW: the convolution's
    reorders; channels_last: batch norm's unwritten second input gradient), less the lean
    batch norm's few per-channel buffers."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16),
                        nn.ReLU()).float().to(memory_format=layout)
    x = torch.randn(8, 16, 32, 32).contiguous(memory_format=layout).requires_grad_()
    g = torch.randn(8, 16, 32, 32).contiguous(memory_format=layout)
    activation = x.nbytes
    peaks = {}
    for lean in (False, True):
        with torch.enable_grad():
            y = net(x)
        with PeakMemory() as m:
            if lean:
                with LeanBackward():
                    torch.autograd.grad(y, [x, *net.parameters()], g)
            else:
                torch.autograd.grad(y, [x, *net.parameters()], g)
        peaks[lean] = m.peak_bytes
    assert peaks[False] - peaks[True] >= 0.9 * activation


def test_nothing_holds_a_batch_norm_input_after_its_backward():
    """A batch norm whose (in-place) ReLU output is the forward's result: once the backward
    has passed the batch norm, its input is freed while the rest of the graph (the
    convolution's node) and the result live on: nothing the forward noted keeps it."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8),
                        nn.ReLU(inplace=True)).double()
    x, g = _inputs(torch.contiguous_format)
    inputs, edges = [], []

    def note(module, args, out):
        inputs.append(weakref.ref(args[0]))
        edges.append(torch.autograd.graph.get_gradient_edge(args[0]))

    hook = net[1].register_forward_hook(note)
    with torch.enable_grad(), relu_outputs_recomputed():
        y = net(x)
    hook.remove()
    torch.autograd.grad(y, edges, g)  # the ReLU's and the batch norm's backward only
    gc.collect()
    assert inputs[0]() is None and y.grad_fn is not None


@needs_native
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize("lean_forward", [False, True], ids=["saved", "recomputed"])
def test_convolutions_of_reduced_weights_are_differentiated_in_bfloat16(layout, lean_forward):
    """The convolution of a weight named (recognised through the saved-tensor hooks of a lean
    forward too, which hand the backward new tensor objects) is differentiated in bfloat16:
    its input's and weight's gradients are values a bfloat16 holds, within bfloat16's
    rounding of the oracle, float64 autograd on operands rounded to bfloat16; its bias's
    gradient and every other layer's are float64 autograd's."""
    net = _conv_bn_relu(layout)
    x, g = _inputs(layout)
    names = ["x"] + [n for n, _ in net.named_parameters()]
    params = [x] + list(net.parameters())
    with torch.enable_grad():
        h = net[0](x)
        *plain, grad_h = torch.autograd.grad(net[1:](h), params + [h], g)
        want = dict(zip(names, plain))
        with relu_outputs_recomputed() if lean_forward else contextlib.nullcontext():
            y = net(x)
        with LeanBackward(reduced_weights=[net[0].weight], reduced_dtype=torch.bfloat16):
            got = dict(zip(names, torch.autograd.grad(y, params, g)))
    operands = [t.detach().to(torch.bfloat16) for t in (grad_h, x, net[0].weight)]
    geometry = ([8], [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, True, False])
    oracle_x, oracle_w, _ = torch.ops.aten.convolution_backward(
        *[t.double() for t in operands], *geometry)
    torch_x, torch_w, _ = torch.ops.aten.convolution_backward(*operands, *geometry)
    for name, oracle, torchs in (("x", oracle_x, torch_x), ("0.weight", oracle_w, torch_w)):
        assert got[name].dtype == torch.float64 and held_by_bfloat16(got[name]), name
        _assert_within_bfloat16_convolution(got[name], oracle, torchs, name)
    _assert_same([got[n] for n in names if n not in ("x", "0.weight")],
                 [want[n] for n in names if n not in ("x", "0.weight")])


REDUCED_CONVS = {
    "conv2d-strided-grouped-unbiased":
        lambda: nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2, bias=False),
    "conv-transpose2d": lambda: nn.ConvTranspose2d(4, 8, 3, stride=2, padding=1,
                                                   output_padding=1),
    "conv1d": lambda: nn.Conv1d(4, 8, 3, padding=1),
    "conv3d": lambda: nn.Conv3d(4, 8, 3, padding=1),
}


@pytest.mark.parametrize("kind", REDUCED_CONVS)
@pytest.mark.parametrize("input_grad", [True, False], ids=["input-grad", "no-input-grad"])
def test_each_kind_of_convolution_of_a_reduced_weight(kind, input_grad):
    """Every convolution kind, with or without an input gradient: the input's and weight's
    gradients within bfloat16's rounding of float64 autograd on operands rounded to bfloat16
    (values a bfloat16 holds), the bias's the exact sum of the output gradient."""
    torch.manual_seed(0)
    conv = REDUCED_CONVS[kind]().double()
    x = torch.randn(2, 4, *[6] * (conv.weight.dim() - 2), dtype=torch.float64,
                    requires_grad=input_grad)
    with torch.enable_grad():
        y = conv(x)
    g = torch.randn_like(y)
    with LeanBackward(reduced_weights=[conv.weight], reduced_dtype=torch.bfloat16):
        got = torch.autograd.grad(y, ([x] if input_grad else []) + [conv.weight], g,
                                  retain_graph=True)
    if conv.bias is not None:
        with LeanBackward(reduced_weights=[conv.weight], reduced_dtype=torch.bfloat16):
            got_bias = torch.autograd.grad(y, conv.bias, g)[0]
        _assert_same([got_bias], [g.sum([d for d in range(g.dim()) if d != 1])])

    def rounded(t):
        return t.detach().to(torch.bfloat16).double()

    def gradients(dtype):  # autograd's in dtype, on the operands rounded to bfloat16
        oracle = copy.deepcopy(conv).to(dtype)
        with torch.no_grad():
            oracle.weight.copy_(rounded(conv.weight))
        xr = rounded(x).to(dtype).requires_grad_(input_grad)
        with torch.enable_grad():
            return torch.autograd.grad(oracle(xr), ([xr] if input_grad else []) +
                                       [oracle.weight], rounded(g).to(dtype))

    want, torchs = gradients(torch.float64), gradients(torch.bfloat16)
    for name, a, b, t in zip(["input", "weight"][not input_grad:], got, want, torchs,
                             strict=True):
        assert a.dtype == torch.float64 and held_by_bfloat16(a), name
        _assert_within_bfloat16_convolution(a, b, t, name)
