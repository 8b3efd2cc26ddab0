"""torch.compile over a converted model's dual pass: the whole pass is one graph
(``fullgraph=True``: no graph break, the ops' fakes registered at import) and computes what
eager computes, running statistics included."""
import contextlib
import copy
import gc
import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters
from torch.nn import functional as F

import fgkernels
from fgkernels import Dual
from fgkernels.dual.tangents import has_tangent
from fgkernels.rules.fallback import forward_ad_fallback
from fgkernels.testing import (
    compare_with_forward_ad,
    forward_ad_jvp,
    model_jvp,
    model_jvp_in_place,
)
from fgkernels.train.models import BasicBlock

from helpers import (
    TOL,
    BiasedAttention,
    BiasedTransformer,
    assert_within_torch_error,
    recording_backend,
    rel_err,
)
from op_table import OPS, inputs, math_attention
from zoo import MODELS, build_patch_transformer

ROOT = Path(__file__).resolve().parents[2]


def _block_and_pass(training: bool):
    torch.manual_seed(0)
    block = fgkernels.convert(BasicBlock(4, 8, 2)).train(training)
    fgkernels.random_tangents(block, num_tangents=2)

    def dual_pass(model, x, xt):
        out = model(Dual(x, xt))
        return out.primal, out.tangents

    return block, dual_pass


@pytest.mark.parametrize("backend", fgkernels.available_backends())
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_compiled_dual_pass_of_a_resnet_block_equals_eager(backend, training):
    block, dual_pass = _block_and_pass(training)
    eager_block = copy.deepcopy(block)  # tangents are per step: a copy has none of its own
    tangents = {n: fgkernels.dual.tangents.tangent_of(p).stack for n, p in block.named_parameters()}
    fgkernels.set_tangents(eager_block, tangents)
    x, xt = torch.randn(3, 4, 10, 10), torch.randn(2, 3, 4, 10, 10)
    before = copy.deepcopy(block)  # the oracle's: forward_ad through torch's own layers
    oracle = lambda dt: model_jvp(copy.deepcopy(before).to(dt), [x.to(dt)], [xt.to(dt)],
                                  {n: t.to(dt) for n, t in tangents.items()})
    torch._dynamo.reset()
    with fgkernels.use_backend(backend):
        compiled = torch.compile(dual_pass, fullgraph=True, backend="aot_eager")
        y, yt = compiled(block, x, xt)
        y_ref, yt_ref = dual_pass(eager_block, x, xt)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(yt, yt_ref)
    assert_within_torch_error((y, yt), oracle)
    for (name, a), b in zip(block.state_dict().items(), eager_block.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    if backend == "triton":  # the Triton kernels run inside the graph, not a fallback beside it
        with fgkernels.use_backend(backend), torch.profiler.profile() as prof:
            compiled(block, x, xt)
        names = {e.name for e in prof.events()}
        assert {"fgkernels_triton::dual_conv2d", "fgkernels_triton::dual_bn_apply_"} <= names


@pytest.mark.parametrize("convert", [False, True], ids=["as is", "converted"])
def test_fgkernels_compile_runs_any_model_exactly_with_dynamic_batch(convert):
    """fgkernels.compile: an unconverted model (its parameters handed out by a torch function
    mode that torch.compile traces) or a converted one, a token parameter used alone, one
    compile for three batch sizes (its batch norms in training: the running statistics' count
    of values is symbolic), against the eager pass and forward_ad in float64."""
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = BasicBlock(4, 8, 2)
            self.scale = nn.Parameter(torch.tensor(1.5))

        def forward(self, x):
            return self.block(x) * (self.scale * 2)

    torch.manual_seed(0)
    net = Net().double()
    if convert:
        fgkernels.convert(net)
    fgkernels.random_tangents(net, num_tangents=2)
    tangents = {n: fgkernels.dual.tangents.tangent_of(p).stack for n, p in net.named_parameters()}
    torch._dynamo.reset()
    counters.clear()
    compiled = fgkernels.compile(net, backend="aot_eager", dynamic=True)
    runs, graphs = [], []
    for batch in (3, 5, 6):  # the compiled calls first, one after the other
        x = torch.randn(batch, 4, 8, 8, dtype=torch.float64)
        xt = torch.randn(2, *x.shape, dtype=torch.float64)
        state = copy.deepcopy(net.state_dict())
        out = compiled(Dual(x, xt))
        graphs.append(counters["stats"]["unique_graphs"])
        runs.append((x, xt, state, out, copy.deepcopy(net.state_dict())))
    assert graphs == [graphs[0]] * 3, f"graphs compiled by the calls: {graphs}"
    for x, xt, state, out, compiled_state in runs:
        net.load_state_dict(state)
        y64, yt64 = model_jvp(net, [x], [xt], tangents)  # on a copy: net's state untouched
        torch.testing.assert_close(out.primal, y64, **TOL[torch.float64])
        torch.testing.assert_close(out.tangents, yt64, **TOL[torch.float64])
        ref = net(Dual(x, xt))
        torch.testing.assert_close(out.primal, ref.primal)
        torch.testing.assert_close(out.tangents, ref.tangents)
        for k, v in compiled_state.items():
            torch.testing.assert_close(v, net.state_dict()[k], msg=k)
    plain = compiled(torch.randn(2, 4, 8, 8, dtype=torch.float64))
    assert type(plain) is torch.Tensor


def test_fgkernels_compile_runs_a_model_of_token_ids_inside_dual_pass():
    """A compiled model whose inputs are token ids runs its dual pass inside
    ``dual_pass(model)``, in one graph, as the eager one; outside it, the plain forward."""
    from torch import nn

    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.head = nn.Embedding(9, 5), nn.Linear(5, 3)

        def forward(self, ids):
            return self.head(torch.tanh(self.embed(ids)))

    torch.manual_seed(0)
    model, ids = Tagger().double(), torch.tensor([[1, 8, 2], [0, 5, 5]])
    fgkernels.random_tangents(model, num_tangents=2)
    graphs = []
    torch._dynamo.reset()
    compiled = fgkernels.compile(model, backend=recording_backend(graphs))
    with fgkernels.dual_pass(model):
        out = compiled(ids)
        ref = model(ids)
    assert len(graphs) == 1
    torch.testing.assert_close(out.primal, ref.primal)
    torch.testing.assert_close(out.tangents, ref.tangents)
    assert type(compiled(ids)) is torch.Tensor


@pytest.mark.skipif("native" not in fgkernels.available_backends(),
                    reason="fgkernels._C is not built")
def test_fgkernels_compile_with_inductors_cpp_wrapper(monkeypatch):
    """Inductor's C++ wrapper (``options={"cpp_wrapper": True}``) calls the library's ops
    from C++, with torch's check of custom ops' aliasing on the first call, whose reads of
    the graph's parameters go through the dual pass's torch function mode: an unconverted
    model with convolution, batch norm, linear and a parameter used alone runs it exactly
    (float64, against forward_ad) and its ops' outputs alias nothing (an error here)."""
    from torch import nn
    from torch._functorch import config as functorch_config
    monkeypatch.setattr(functorch_config, "error_on_custom_op_aliasing", True)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                                      nn.Flatten(), nn.Linear(64, 5))
            self.scale = nn.Parameter(torch.tensor(1.5))

        def forward(self, x):
            return self.body(x) * self.scale

    torch.manual_seed(0)
    net = Net().double().eval()
    tangents = fgkernels.random_tangents(net, num_tangents=2)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    xt = torch.randn(2, *x.shape, dtype=torch.float64)
    torch._dynamo.reset()
    compiled = fgkernels.compile(net, fullgraph=True, options={"cpp_wrapper": True})
    with torch.no_grad():
        out = compiled(Dual(x, xt))
    y, yt = model_jvp(net, [x], [xt], tangents)
    torch.testing.assert_close(out.primal, y, **TOL[torch.float64])
    torch.testing.assert_close(out.tangents, yt, **TOL[torch.float64])


@pytest.mark.parametrize("layout", ["one image", "channels_last"])
@pytest.mark.parametrize("name", sorted(MODELS) + ["patch_transformer"])
def test_every_zoo_model_compiles_in_one_graph(name, layout):
    """fgkernels.compile(fullgraph=True) of each small model converted, eval, float64: one
    graph (a break is an error) giving forward_ad's numbers, with one image (ambiguous layouts:
    a ConvNeXt block failed the compiled graph's stride check) and channels_last (a layer norm
    over permuted activations broke the graph); ShuffleNet's concatenation of two Duals broke
    it under the pass's torch function mode."""
    torch.manual_seed(0)
    build = build_patch_transformer if name == "patch_transformer" else MODELS[name]
    net = fgkernels.convert(build(8).double().eval())
    tangents = fgkernels.random_tangents(net, num_tangents=1)
    shape = (1, 3, 16, 16) if layout == "one image" else (2, 3, 16, 16)
    x, xt = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    if layout == "channels_last":
        x, xt = (t.contiguous(memory_format=torch.channels_last) for t in (x, xt))
    torch._dynamo.reset()
    with torch.no_grad():
        out = fgkernels.compile(net, backend="aot_eager", fullgraph=True)(Dual(x, xt))
    y, yt = model_jvp(net, [x], [xt[None]], tangents)
    torch.testing.assert_close(out.primal, y, **TOL[torch.float64])
    torch.testing.assert_close(out.tangents, yt, **TOL[torch.float64])


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("tangent_dtype", [None, torch.bfloat16],
                         ids=["float64", "bfloat16 tangents"])
def test_activation_layers_compile_in_one_graph(tangent_dtype, layout):
    """A MobileNetV3-style block (hardswish, a squeeze-excitation gate by hardsigmoid, SiLU,
    GELU) converted: its activation layers run their rules directly, so the pass is one graph,
    in float64 and with bfloat16 tangents of a float32 network, NCHW or channels_last (the
    product of a bfloat16 tangent and its float32 slope, written into a channels_last stack,
    broke the graph)."""
    from torch import nn

    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Hardswish(),
                                      nn.Conv2d(4, 4, 1), nn.SiLU(), nn.GELU())
            self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(4, 4, 1),
                                      nn.Hardsigmoid())

        def forward(self, x):
            h = self.body(x)
            return h * self.gate(h)

    torch.manual_seed(0)
    dtype = torch.float64 if tangent_dtype is None else torch.float32
    net = fgkernels.convert(Gated().to(dtype).eval())
    x = torch.randn(2, 3, 8, 8, dtype=dtype)
    if layout == "channels_last":
        net, x = net.to(memory_format=torch.channels_last), x.contiguous(
            memory_format=torch.channels_last)
    tangents = fgkernels.random_tangents(net, dtype=tangent_dtype)
    xt = torch.randn_like(x).to(tangent_dtype or dtype)
    y64, yt64 = model_jvp(copy.deepcopy(net).double(), [x.double()], [xt.double()[None]],
                          {n: t.double()[None] for n, t in tangents.items()})
    torch._dynamo.reset()
    out = fgkernels.compile(net, backend="aot_eager", fullgraph=True)(Dual(x, xt))
    ref = net(Dual(x, xt))
    torch.testing.assert_close(out.tangent, ref.tangent)
    if tangent_dtype is None:
        torch.testing.assert_close(out.primal, y64, **TOL[torch.float64])
        torch.testing.assert_close(out.tangent, yt64[0], **TOL[torch.float64])
    else:
        assert out.tangent.dtype == tangent_dtype
        assert rel_err(out.tangent, yt64[0]) < 2e-2


def test_inductors_pass_is_exact_in_float64():
    """Inductor's compiled pass of a gated block with dropout, train mode, float64, converted
    (its hardsigmoid's twin compiles into the graph), against forward_ad with hardsigmoid's
    exact slope (Inductor's; torch's CPU kernel takes float32's 1/6) and torch's random draws
    (``fallback_random``), to float64's rounding."""
    from torch import nn
    torch.manual_seed(0)
    net = fgkernels.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Hardsigmoid(),
                                          nn.Dropout(0.5)).double().train())
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    torch._dynamo.reset()
    with torch._inductor.config.patch(fallback_random=True):
        result = compare_with_forward_ad(net, [x], num_tangents=2, run=fgkernels.compile(net),
                                         exact_hardsigmoid=True)
    assert max(result["primal"], result["tangent"], result["buffers"]) < 1e-14, result


def test_inductors_dropout_draws_one_mask_for_the_primal_and_every_slot():
    torch.manual_seed(0)
    net = torch.nn.Dropout(0.5).train()
    x, xt = torch.ones(4096), torch.randn(3, 4096)
    torch._dynamo.reset()
    out = fgkernels.compile(net)(Dual(x, xt))
    kept = out.primal != 0
    assert 0 < kept.sum() < x.numel()
    torch.testing.assert_close(out.tangents, torch.where(kept, 2 * xt, 0.0), rtol=0, atol=0)


def test_inductor_compiles_the_dual_pass():
    block, dual_pass = _block_and_pass(True)
    eager_block = copy.deepcopy(block)
    fgkernels.set_tangents(eager_block, {n: fgkernels.dual.tangents.tangent_of(p).stack
                                         for n, p in block.named_parameters()})
    x, xt = torch.randn(3, 4, 10, 10), torch.randn(2, 3, 4, 10, 10)
    torch._dynamo.reset()
    y, yt = torch.compile(dual_pass, fullgraph=True)(block, x, xt)
    y_ref, yt_ref = dual_pass(eager_block, x, xt)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(yt, yt_ref, rtol=1e-4, atol=1e-5)


def test_tracing_a_converted_sequential_traces_no_cache(monkeypatch):
    """A converted Sequential asks, per layer, whether the layer's class has a ``__call__``
    of its own: a cached question, answered uncached while Dynamo traces (which would trace
    through the cache and warn, once per process, that it does)."""
    import warnings

    from torch import nn
    monkeypatch.setattr(torch._dynamo.utils, "warn_once_cache", set())
    net = fgkernels.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
    fgkernels.random_tangents(net)
    x = torch.randn(2, 3, 6, 6)
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.compile(lambda d: net(d).primal, backend="aot_eager", fullgraph=True)(
            Dual(x, torch.randn_like(x)))
    assert not [w for w in caught if "lru_cache" in str(w.message)]


def test_fgkernels_compile_traces_once(monkeypatch):
    """A first call that finds no backend loaded yet compiles once: the backend is loaded
    before the trace, which would otherwise guard on its absence and recompile next call."""
    from torch import nn
    monkeypatch.setattr(fgkernels.backends, "_loaded", {})
    graphs = []
    counting_backend = recording_backend(graphs)
    net = fgkernels.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    fgkernels.random_tangents(net)
    torch._dynamo.reset()
    compiled = fgkernels.compile(net, backend=counting_backend, fullgraph=True)
    x = torch.randn(2, 3, 6, 6)
    for _ in range(2):
        compiled(Dual(x, torch.randn_like(x)))
    assert len(graphs) == 1


OPERATORS = {"d @ t": lambda d, t: d @ t, "t @ d": lambda d, t: t @ d,
             "d - t": lambda d, t: d - t, "t - d": lambda d, t: t - d,
             "d / t": lambda d, t: d / t, "t / d": lambda d, t: t / d,
             "d + t": lambda d, t: d + t, "d * t": lambda d, t: d * t}


@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_operators_beside_a_plain_tensor_compile_as_written(name):
    """A Dual on either side of a plain tensor, compiled: forward_ad's numbers. Dynamo traces
    ``d @ t`` as the tensor's method with the operands swapped; fgkernels gives it the
    reflected entry it lacks (it traced ``t @ d``, silently, on square operands) and finds the
    reflected rules it hands over (``d - t`` stopped on a failing guard)."""
    fn = OPERATORS[name]
    x, xt = torch.randn(5, 5, dtype=torch.float64), torch.randn(2, 5, 5, dtype=torch.float64)
    t = torch.randn(5, 5, dtype=torch.float64)
    torch._dynamo.reset()
    out = torch.compile(fn, backend="aot_eager", fullgraph=True)(Dual(x, xt), t)
    y, yt = forward_ad_jvp(fn, [x, t], [xt, None])
    torch.testing.assert_close(out.primal, y, **TOL[torch.float64])
    torch.testing.assert_close(out.tangents, yt, **TOL[torch.float64])


BETWEEN_DUALS = {"a @ b": lambda a, b: a @ b, "a - b": lambda a, b: a - b,
                 "a / b": lambda a, b: a / b, "a + b": lambda a, b: a + b,
                 "a * b": lambda a, b: a * b,
                 "attention": lambda a, b: math_attention(a, b, a - b)}


@pytest.mark.parametrize("name", sorted(BETWEEN_DUALS))
def test_operators_between_duals_compile_as_written(name):
    """Two Duals on either side of an operator, compiled: forward_ad's numbers. Dynamo hands
    ``a * b`` between two objects to their ``__mul__``, but had no such entry for ``@``:
    an attention written out (``q @ k.transpose(-2, -1)``) stopped the trace."""
    fn = BETWEEN_DUALS[name]
    x, xt = torch.randn(5, 5, dtype=torch.float64), torch.randn(2, 5, 5, dtype=torch.float64)
    w, wt = torch.randn(5, 5, dtype=torch.float64), torch.randn(2, 5, 5, dtype=torch.float64)
    torch._dynamo.reset()
    out = torch.compile(fn, backend="aot_eager", fullgraph=True)(Dual(x, xt), Dual(w, wt))
    y, yt = forward_ad_jvp(fn, [x, w], [xt, wt])
    torch.testing.assert_close(out.primal, y, **TOL[torch.float64])
    torch.testing.assert_close(out.tangents, yt, **TOL[torch.float64])


def test_an_op_on_the_fallback_compiles_in_one_graph():
    """An op with no rule of its own (``logcumsumexp``: torch.func.jvp computes its tangents)
    compiled with ``fullgraph``: forward_ad's numbers. The fallback's name lookup is a constant
    to Dynamo; traced, it stopped the graph."""
    fn = lambda d: torch.cumsum(d, 0).logcumsumexp(1)  # noqa: E731
    x, xt = torch.randn(4, 3, dtype=torch.float64), torch.randn(2, 4, 3, dtype=torch.float64)
    torch._dynamo.reset()
    out = torch.compile(fn, backend="aot_eager", fullgraph=True)(Dual(x, xt))
    y, yt = forward_ad_jvp(fn, [x], [xt])
    torch.testing.assert_close(out.primal, y, **TOL[torch.float64])
    torch.testing.assert_close(out.tangents, yt, **TOL[torch.float64])


# Run in a fresh process: importing fgkernels loads no Dynamo, which learns what it needs to
# trace Duals when it loads.
DYNAMO_LOADS_LATER = """
import sys, warnings
import torch
import fgkernels
print("loaded at import:", "torch._dynamo" in sys.modules)
d = fgkernels.Dual(torch.randn(3, 3, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64))
t = torch.randn(3, 3, dtype=torch.float64)
warnings.simplefilter("ignore")
for fn in (lambda d: d @ t, lambda d: torch.cumsum(d, 0).logcumsumexp(1)):
    out = torch.compile(fn, backend="eager", fullgraph=True)(d)
    with torch.autograd.forward_ad.dual_level():
        ref = torch.autograd.forward_ad.make_dual(d.primal, d.tangents[0])
        y, yt = torch.autograd.forward_ad.unpack_dual(fn(ref))
    print(torch.allclose(out.primal, y), torch.allclose(out.tangents[0], yt))
"""


def test_dynamo_loads_with_the_first_compile_not_at_import():
    """``import fgkernels`` leaves Dynamo (a second of import) unloaded; compiling later still
    traces ``d @ t`` as written (square operands: swapped, it would run silently) and an op on
    the fallback in one graph."""
    environ = {k: v for k, v in os.environ.items() if k != "FGKERNELS_REQUIRE_NATIVE"}
    out = subprocess.run([sys.executable, "-c", DYNAMO_LOADS_LATER], capture_output=True,
                         text=True, env={**environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:3] == ["loaded at import: False", "True True", "True True"]


NUMBER_LEFT = {"2 + d": lambda d: (2 + d).sum(), "2 - d": lambda d: (2 - d).sum(),
               "0.9 * d": lambda d: (0.9 * d).sum(), "1 / d": lambda d: (1 / d).sum(),
               "2 - 3 d": lambda d: torch.rsub(d, 2, alpha=3).mean()}


@pytest.mark.parametrize("name", sorted(NUMBER_LEFT))
def test_a_number_left_of_a_dual_compiles_in_one_graph(name):
    """A Python number left of a Dual, then a reduction method: one graph, forward_ad's
    numbers. (The rule worked out the number's dtype with torch.result_type, which Dynamo
    cannot trace: the graph broke inside a rule and the reduction then failed.)"""
    fn = NUMBER_LEFT[name]
    x, xt = torch.rand(4, 3, dtype=torch.float64) + 0.5, torch.randn(2, 4, 3, dtype=torch.float64)
    torch._dynamo.reset()
    out = torch.compile(fn, backend="aot_eager", fullgraph=True)(Dual(x, xt))
    y, yt = forward_ad_jvp(fn, [x], [xt])
    torch.testing.assert_close(out.primal, y, **TOL[torch.float64])
    torch.testing.assert_close(out.tangents, yt, **TOL[torch.float64])


# Rows whose compiled pass stops with a torch.compile error (README: torch.compile).
COMPILE_STOPS: dict[str, str] = {}


@pytest.mark.parametrize("case", [
    pytest.param(c, marks=pytest.mark.xfail(strict=True, reason=COMPILE_STOPS[c]))
    if c in COMPILE_STOPS else c for c in sorted(OPS)])
def test_op_table_under_fgkernels_compile(case):
    """Every row of the op table as a module whose parameter w carries tangents, compiled by
    fgkernels.compile (graph breaks allowed): forward_ad's numbers."""
    from torch import nn
    op = OPS[case]
    x, w, xt, wt = inputs(op, slots=2, seed=8, dtype=torch.float64)

    class Row(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(w.clone())

        def forward(self, v):
            return op.fn(v, self.w)

    row = Row()
    fgkernels.set_tangents(row, {"w": wt})
    torch._dynamo.reset()
    out = fgkernels.compile(row, backend="aot_eager")(Dual(x, xt))
    y, yt = op.oracle(x, w, xt, wt)(torch.float64)
    torch.testing.assert_close(out.primal, y, **TOL[torch.float64])
    torch.testing.assert_close(out.tangents, yt, **TOL[torch.float64])


@pytest.mark.parametrize("mask", ["none", "causal", "bool"])
def test_attention_compiles_as_one_graph(mask):
    """Scaled dot-product attention on Duals compiles with fullgraph=True (it stopped on a
    data-dependent branch over empty rows) and gives forward_ad's numbers of the math
    attention."""
    import torch.nn.functional as F
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    xt = torch.randn(2, 2, 3, 5, 4, dtype=torch.float64)
    allowed = torch.rand(5, 5) > 0.3
    allowed[:, 0] = True  # no empty row: forward_ad's softmax of one gives NaN
    kw = {"none": {}, "causal": {"is_causal": True}, "bool": {"attn_mask": allowed}}[mask]
    fn = lambda a: F.scaled_dot_product_attention(a, a * 2, a, **kw)
    torch._dynamo.reset()
    out = torch.compile(fn, backend="aot_eager", fullgraph=True)(Dual(x, xt))
    y, yt = forward_ad_jvp(lambda a: math_attention(
        a, a * 2, a, causal=mask == "causal", mask=kw.get("attn_mask")), [x], [xt])
    torch.testing.assert_close(out.primal, y, **TOL[torch.float64])
    torch.testing.assert_close(out.tangents, yt, **TOL[torch.float64])


@pytest.mark.parametrize("mask,convert", [("bias", False), ("closure", False),
                                          ("tokens", True)])
def test_attention_with_a_mask_carrying_a_tangent_compiles(mask, convert):
    """nn.MultiheadAttention given a learned bias (held by the model, or read from a closure)
    or, converted, a mask computed from the tokens: the pass compiled by ``fgkernels.compile``
    in one graph gives forward_ad's numbers."""
    torch.manual_seed(0)
    model = BiasedAttention(mask, False, True).double().eval()
    if convert:
        fgkernels.convert(model)
    torch._dynamo.reset()
    run = fgkernels.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    errors = compare_with_forward_ad(model, [x], num_tangents=2, run=run)
    assert errors["primal"] < 1e-12 and errors["tangent"] < 1e-12, errors


@pytest.mark.parametrize("convert,hint", [(False, False), (True, False), (True, None)],
                         ids=["as it is, not causal", "converted, not causal", "converted"])
def test_an_encoder_with_a_learned_mask_compiles(convert, hint):
    """nn.TransformerEncoder given a learned bias, converted (which asks the mask whether it
    is causal itself) or told ``is_causal=False`` (torch's own asking of a mask with a tangent
    is not traced: README): the pass compiled by ``fgkernels.compile`` gives forward_ad's
    numbers."""
    torch.manual_seed(0)
    model = BiasedTransformer("encoder", False, True, False, is_causal=hint).double().eval()
    if convert:
        fgkernels.convert(model)
    torch._dynamo.reset()
    run = fgkernels.compile(model, backend="aot_eager")
    errors = compare_with_forward_ad(model, [torch.randn(2, 5, 8, dtype=torch.float64)],
                                     num_tangents=2, run=run)
    assert errors["primal"] < 1e-12 and errors["tangent"] < 1e-12, errors


def test_compiled_pass_without_module_guards_takes_each_steps_tangents():
    """torch's filter that skips the guards on modules (the README's recipe for a model whose
    modules and tangent layout do not change between calls) still reads the tangents' values
    at every call: each step's new tangents and input give forward_ad's result on them."""
    from torch import nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(64, 5)).double().eval()
    net = fgkernels.convert(copy.deepcopy(model))
    torch._dynamo.reset()
    compiled = fgkernels.compile(net, backend="aot_eager", fullgraph=True, options={
        "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})
    for _ in range(3):
        tangents = fgkernels.random_tangents(net, num_tangents=2)
        x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
        xt = torch.randn(2, *x.shape, dtype=torch.float64)
        with torch.no_grad():
            out = compiled(Dual(x, xt))
        y, yt = model_jvp(model, [x], [xt], tangents)
        torch.testing.assert_close(out.primal, y, **TOL[torch.float64])
        torch.testing.assert_close(out.tangents, yt, **TOL[torch.float64])


def _converted(*layer_lists):
    """Converted CNNs (float64, eval) of the given layers, each a ``DualSequential`` at the
    top, with their unconverted twins for the oracle."""
    from torch import nn
    torch.manual_seed(0)
    models = [nn.Sequential(*layers).double().eval() for layers in layer_lists]
    return [(m, fgkernels.convert(copy.deepcopy(m))) for m in models]


def _conv_bn_relu(width):
    from torch import nn
    return [nn.Conv2d(3, width, 3), nn.BatchNorm2d(width), nn.ReLU()]


def _check_compiled_passes(pairs, compiled):
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    xt = torch.randn(1, *x.shape, dtype=torch.float64)
    for (model, net), run in zip(pairs, compiled):
        tangents = fgkernels.random_tangents(net, num_tangents=1)
        with torch.no_grad():
            out = run(Dual(x, xt))
        y, yt = model_jvp(model, [x], [xt], tangents)
        torch.testing.assert_close(out.primal, y, **TOL[torch.float64])
        torch.testing.assert_close(out.tangents, yt, **TOL[torch.float64])


def test_each_compiled_model_keeps_its_graphs_apart():
    """Models compiled by ``fgkernels.compile`` do not count against one another's recompile
    limit, although their top modules (twins) share one ``__call__``: with a limit of one
    compile, each of three models still compiles (no fallback to eager, which
    ``fail_on_recompile_limit_hit`` makes an error) and computes forward_ad's result."""
    pairs = _converted(*(_conv_bn_relu(w) for w in (2, 3, 4)))
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=1, fail_on_recompile_limit_hit=True):
        _check_compiled_passes(pairs, [fgkernels.compile(net, backend="aot_eager",
                                                         fullgraph=True) for _, net in pairs])


def test_models_compiled_without_module_guards_run_their_own_graphs():
    """With torch's filter that skips the guards on modules, each compiled model still runs
    its own graph, not the graph of another model compiled in the process (the second model
    here, one layer longer, would return the first one's output)."""
    from torch import nn
    pairs = _converted(_conv_bn_relu(2), _conv_bn_relu(2) + [nn.Conv2d(2, 3, 1)])
    torch._dynamo.reset()
    options = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
    _check_compiled_passes(pairs, [fgkernels.compile(net, backend="aot_eager", fullgraph=True,
                                                     options=options) for _, net in pairs])


def test_compiling_a_model_again_reuses_its_graphs():
    """``fgkernels.compile`` of a model it compiled before traces nothing new (a loop that
    compiles its model every step compiles once), while another model compiles its own."""
    from torch import nn
    graphs = []
    counting_backend = recording_backend(graphs)
    (_, net), (_, other) = _converted(_conv_bn_relu(2), _conv_bn_relu(2) + [nn.ReLU()])
    fgkernels.random_tangents(net)
    fgkernels.random_tangents(other)
    torch._dynamo.reset()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    for _ in range(3):
        fgkernels.compile(net, backend=counting_backend, fullgraph=True)(
            Dual(x, torch.randn_like(x)))
    assert len(graphs) == 1
    fgkernels.compile(other, backend=counting_backend, fullgraph=True)(
        Dual(x, torch.randn_like(x)))
    assert len(graphs) == 2


def test_a_model_compiled_after_another_keeps_its_batch_size_static():
    """Dynamo marks a dimension dynamic when it has seen it change, keyed by the code it
    compiles: one model's batch size must not make another's batch dimension dynamic."""
    graphs = []
    backend = recording_backend(graphs)
    pairs = _converted(_conv_bn_relu(2), _conv_bn_relu(2))
    torch._dynamo.reset()
    for (_, net), batch in zip(pairs, (1, 16)):
        fgkernels.random_tangents(net)
        x = torch.randn(batch, 3, 6, 6, dtype=torch.float64)
        fgkernels.compile(net, backend=backend, fullgraph=True)(
            Dual(x, torch.randn_like(x)))
    symbolic = [n.name for n in graphs[-1].graph.nodes
                if n.op == "placeholder" and isinstance(n.meta.get("example_value"), torch.SymInt)]
    assert len(graphs) == 2 and not symbolic


def test_models_equal_by_value_compile_apart():
    """A model class may define equality and hashing by value: ``fgkernels.compile`` tells
    models apart by identity, so two that compare equal still run their own graphs, even
    without the guards on modules."""
    from torch import nn

    class EqualByType(nn.Sequential):
        def __eq__(self, other):
            return type(other) is type(self)

        def __hash__(self):
            return hash(type(self))

    pairs = [(m, fgkernels.convert(copy.deepcopy(m))) for m in (
        EqualByType(*_conv_bn_relu(2)).double().eval(),
        EqualByType(*_conv_bn_relu(2), nn.Conv2d(2, 3, 1)).double().eval())]
    torch._dynamo.reset()
    options = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
    _check_compiled_passes(pairs, [fgkernels.compile(net, backend="aot_eager", fullgraph=True,
                                                     options=options) for _, net in pairs])


def test_a_graph_compiled_without_module_guards_is_not_taken_with_them():
    """A model compiled under torch's filter that skips the guards on modules, then changed
    and compiled again without the filter, runs its new layers: the filter's graphs, which
    would pass the checks the filter dropped, stay with the filter. The options dict given
    is left as it was (torch.compile takes the filter out of the dict it gets)."""
    from torch import nn
    [(model, net)] = _converted(_conv_bn_relu(2))
    torch._dynamo.reset()
    options = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
    _check_compiled_passes([(model, net)], [fgkernels.compile(
        net, backend="aot_eager", fullgraph=True, options=options)])
    assert "guard_filter_fn" in options
    model[2], net[2] = nn.Tanh(), nn.Tanh()
    _check_compiled_passes([(model, net)], [fgkernels.compile(
        net, backend="aot_eager", fullgraph=True)])


@pytest.mark.parametrize("dynamo_backend", ["inductor", "eager"])
@pytest.mark.parametrize("backend", [b for b in fgkernels.available_backends() if b != "triton"])
def test_compiled_graphs_take_parameters_as_the_tensors_they_are(backend, dynamo_backend):
    """A compiled graph runs its own ops on the parameters it was given: Inductor's wrapper
    hands a parameter straight to ``torch.convolution`` (a bias) or ``torch.addmm``, the
    "eager" backend's graph calls torch's functions on them, and the dual pass's torch
    function mode must not take them as Duals there (the graph's code, written for the plain
    tensors Dynamo traced, would meet Duals)."""
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.weight = nn.Parameter(torch.randn(64, 5))
            self.bias = nn.Parameter(torch.randn(5))

        def forward(self, x):
            return self.conv(x).relu().flatten(1) @ self.weight + self.bias

    torch.manual_seed(0)
    net = Net().double()
    tangents = fgkernels.random_tangents(net, num_tangents=2)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    xt = torch.randn(2, *x.shape, dtype=torch.float64)
    torch._dynamo.reset()
    compiled = fgkernels.compile(net, backend=dynamo_backend, fullgraph=True)
    with fgkernels.use_backend(backend), fgkernels.strict_rules(), torch.no_grad():
        out = compiled(Dual(x, xt))
    y, yt = model_jvp(net, [x], [xt], tangents)
    torch.testing.assert_close(out.primal, y, **TOL[torch.float64])
    torch.testing.assert_close(out.tangents, yt, **TOL[torch.float64])


# In a fresh interpreter: the hooks go only with the process's last tensor with a tangent (no
# Dual exists: the dual call, inside dual_pass, takes a plain tensor and returns one).
TANGENT_FREED_WHILE_COMPILING = """
import gc
import torch
from torch import nn
from torch.nn.modules import module as torch_module
import fgkernels

doomed = [nn.Linear(2, 2)]
fgkernels.random_tangents(doomed[0])
print(len(torch_module._global_forward_hooks))

def freeing_backend(gm, example_inputs):  # runs between the trace and the guards
    doomed.clear()
    gc.collect()
    return gm.forward

x = torch.randn(2, 3)
relu = nn.ReLU()
with fgkernels.dual_pass(relu):
    out = fgkernels.compile(relu, backend=freeing_backend)(x)
print(torch.equal(out, x.relu()))
print(len(torch_module._global_forward_hooks))
"""


def test_a_tangent_freed_while_a_model_compiles_leaves_its_trace_valid():
    """The garbage collector may free the last tensor with a tangent in the middle of a
    compile. fgkernels' global module hooks, registered while any tensor has a tangent (or
    any Dual exists), are read by the trace and looked up by the guards Dynamo builds after
    it: they stay until the compiled call returns, and go then."""
    environ = {k: v for k, v in os.environ.items() if k != "FGKERNELS_REQUIRE_NATIVE"}
    out = subprocess.run([sys.executable, "-c", TANGENT_FREED_WHILE_COMPILING],
                         capture_output=True, text=True,
                         env={**environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:3] == ["1", "True", "0"]


def test_fgkernels_compile_refuses_a_mode_and_options_together():
    """As torch.compile does, before anything is compiled."""
    for options in ({"cpp_wrapper": True}, {}):
        with pytest.raises(RuntimeError, match="either mode or options"):
            fgkernels.compile(torch.nn.ReLU(), mode="max-autotune", options=options)


def test_fgkernels_compile_takes_torchs_default_backend(monkeypatch):
    """No backend given, or None: the one ``torch._dynamo.set_default_backend`` chose, as for
    torch.compile."""
    from torch._dynamo.backends import registry
    graphs = []
    monkeypatch.setattr(registry, "get_default_backend", lambda: recording_backend(graphs))
    x = torch.randn(2, 3)
    torch._dynamo.reset()
    for backend in ({}, {"backend": None}):
        out = fgkernels.compile(torch.nn.ReLU(), **backend)(Dual(x, torch.randn_like(x)))
        torch.testing.assert_close(out.primal, x.relu())
    assert len(graphs) == 2


class _Scaled(torch.nn.Module):
    """A parameter used alone (``2 * weight``) before it meets the input: the op that scales it
    has no Dual among its operands, so its tangent comes only from the pass's substitution."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(5, 3))

    def forward(self, x):
        return x @ (2 * self.weight)


def _parameter_alone_and_oracle():
    torch.manual_seed(0)
    net = _Scaled().double()
    tangents = fgkernels.random_tangents(net, num_tangents=2)
    x = torch.randn(4, 5, dtype=torch.float64)
    xt = torch.randn(2, *x.shape, dtype=torch.float64)
    return net, x, xt, model_jvp(net, [x], [xt], tangents)


def _assert_pass_equals(out, oracle):
    torch.testing.assert_close(out.primal, oracle[0], **TOL[torch.float64])
    torch.testing.assert_close(out.tangents, oracle[1], **TOL[torch.float64])


def test_a_rule_in_another_thread_leaves_a_compiled_pass_its_parameters():
    """Whether code runs inside a rule is a thread's own: while another thread computes one,
    this thread's compiled pass still hands out the parameters as their Duals."""
    from fgkernels.dual.rule_state import in_rule
    net, x, xt, oracle = _parameter_alone_and_oracle()
    inside, release = threading.Event(), threading.Event()

    def hold_a_rule():
        with in_rule():
            inside.set()
            release.wait(60)

    other = threading.Thread(target=hold_a_rule)
    other.start()
    try:
        assert inside.wait(60)
        torch._dynamo.reset()
        out = fgkernels.compile(net, backend="eager", fullgraph=True)(Dual(x, xt))
    finally:
        release.set()
        other.join()
    _assert_pass_equals(out, oracle)


def test_a_compiled_pass_in_another_thread_leaves_an_eager_pass_its_parameters():
    """While another thread runs a compiled dual pass (here, held in its backend), this
    thread's eager pass of an unconverted model still substitutes the parameters."""
    net, x, xt, oracle = _parameter_alone_and_oracle()
    compiling, release = threading.Event(), threading.Event()

    def holding_backend(gm, example_inputs):
        compiling.set()
        release.wait(60)
        return gm.forward

    v = torch.randn(2, 3)
    result = []

    def compiled_pass():
        try:
            result.append(fgkernels.compile(torch.nn.ReLU(), backend=holding_backend)(
                Dual(v, torch.ones_like(v))))
        except BaseException as e:  # noqa: BLE001 (reported below, in the test's thread)
            result.append(e)

    torch._dynamo.reset()
    other = threading.Thread(target=compiled_pass)
    other.start()
    try:
        assert compiling.wait(60)
        out = net(Dual(x, xt))
    finally:
        release.set()
        other.join()
    _assert_pass_equals(out, oracle)
    (theirs,) = result
    assert isinstance(theirs, Dual), theirs
    torch.testing.assert_close(theirs.tangent, (v > 0).float())


def test_fgkernels_compile_reports_its_backends_config():
    """``get_compiler_config()``, on the compiled call as on torch.compile's result: Inductor's
    patched config, options included; None for a backend without one, as torch.compile."""
    run = fgkernels.compile(torch.nn.ReLU(), options={"cpp_wrapper": True})
    for config in (run.get_compiler_config(), run.compiled.get_compiler_config()):
        assert config["cpp_wrapper"] is True
    assert fgkernels.compile(torch.nn.ReLU()).get_compiler_config()["cpp_wrapper"] is False
    # the GPU recipe: the compiled pass replayed from CUDA graphs
    graphs = fgkernels.compile(torch.nn.ReLU(), mode="reduce-overhead").get_compiler_config()
    assert graphs["triton.cudagraphs"] is True
    assert fgkernels.compile(torch.nn.ReLU()).get_compiler_config()["triton.cudagraphs"] is False
    assert fgkernels.compile(torch.nn.ReLU(), backend="eager").get_compiler_config() is None


def _outer_sums(rows):
    return sum(r.unsqueeze(0) * r.unsqueeze(1) for r in rows)


# Reads of a tensor that Dynamo traced past the torch function modes: its properties, its rows
# (iterated or unpacked) and Python's abs.
READS_PAST_THE_MODE = {
    "T": lambda w: w.T, "mT": lambda w: w.mT, "H": lambda w: w.H, "mH": lambda w: w.mH,
    "real": lambda w: w.real, "rows": lambda w: _outer_sums(row for row in w),
    "unpacked": lambda w: (lambda *rows: _outer_sums(rows))(*w), "abs": abs}


@pytest.mark.parametrize("name", sorted(READS_PAST_THE_MODE))
def test_a_parameter_read_past_the_mode_keeps_its_tangent_compiled(name):
    """``x @ self.weight.T`` (a tied embedding's weight, say), ``for row in self.weight`` or
    ``abs(self.weight)`` in an unconverted model under fgkernels.compile: Dynamo traced the
    read straight into the graph, past the pass's torch function mode, and the result lost its
    tangent without a word. A buffer's read beside it stays the plain tensor it is."""
    read = READS_PAST_THE_MODE[name]

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(5, 5))
            self.register_buffer("mix", torch.randn(5, 5))

        def forward(self, x):
            return x @ read(self.weight) + x @ read(self.mix)

    torch.manual_seed(0)
    net = Net().double()
    tangents = fgkernels.random_tangents(net, num_tangents=2)
    x = torch.randn(4, 5, dtype=torch.float64)
    xt = torch.randn(2, *x.shape, dtype=torch.float64)
    torch._dynamo.reset()
    # ``real`` has no rule of its own: it takes forward_ad's, as in eager
    with fgkernels.strict_rules() if name != "real" else contextlib.nullcontext():
        out = fgkernels.compile(net, backend="aot_eager", fullgraph=True)(Dual(x, xt))
    _assert_pass_equals(out, model_jvp(net, [x], [xt], tangents))


def test_an_interrupt_inside_a_parametrization_leaves_no_rule_state_behind():
    """A KeyboardInterrupt raised while a compiled pass computes a parametrized weight (which
    runs outside the twin's rule; torch runs no module hook on an interrupt) leaves this
    thread's rule state as it was: later passes hand out the parameters' tangents."""
    from fgkernels.dual.rule_state import rule_state

    class Interrupts(nn.Module):
        armed = False

        def forward(self, w):
            if Interrupts.armed:
                raise KeyboardInterrupt
            return w

    torch.manual_seed(0)
    net = fgkernels.convert(nn.Sequential(nn.Linear(3, 3), nn.ReLU()).double())
    nn.utils.parametrize.register_parametrization(net[0], "weight", Interrupts())
    tangents = fgkernels.random_tangents(net, num_tangents=1)
    x = torch.randn(2, 3, dtype=torch.float64)
    compiled = fgkernels.compile(net, backend="eager")
    Interrupts.armed = True
    with pytest.raises(KeyboardInterrupt):
        compiled(Dual(x))
    Interrupts.armed = False
    assert rule_state() == (0, 0)
    _assert_pass_equals(compiled(Dual(x)), model_jvp(net, [x], [None], tangents))


def test_ops_called_by_keyword_compile_in_one_graph():
    """``x.sum(dim=1)``, ``softmax(dim=-1)``, ``mean(axis=1, keepdims=True)``,
    ``reshape(shape=...)``, ``permute(dims=...)``, ``vector_norm(x=...)``, ``add(x1=...,
    x2=...)``: a Dual op called by keyword traces into the graph (the renaming of NumPy's names
    broke it at every such call), with forward_ad's numbers."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 6)

        def forward(self, x):
            h = self.fc(x)
            h = h.reshape(shape=(3, 2, 3)).permute(dims=(0, 2, 1)).reshape(shape=(3, 6))
            y = h.softmax(dim=-1).sum(dim=1) + h.mean(axis=1, keepdims=True).squeeze(1)
            return torch.add(x1=y, x2=torch.linalg.vector_norm(x=h, ord=2, dim=1))

    torch.manual_seed(0)
    net = Net().double()
    tangents = fgkernels.random_tangents(net, num_tangents=2)
    x = torch.randn(3, 6, dtype=torch.float64)
    xt = torch.randn(2, *x.shape, dtype=torch.float64)
    oracle = model_jvp(net, [x], [xt], tangents)
    torch._dynamo.reset()
    out = fgkernels.compile(net, backend="aot_eager", fullgraph=True)(Dual(x, xt))
    _assert_pass_equals(out, oracle)


def test_a_backend_forced_after_compiling_is_the_one_that_runs():
    """``use_backend`` around a model compiled in a thread that had never entered it: the pass
    is traced again and runs on the forced backend (Dynamo had no guard on the thread's empty
    list of forced backends, and the first graph kept running on the default one)."""
    graphs, ran = [], []

    def recorder(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def body():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        fgkernels.random_tangents(net, num_tangents=2)
        x = torch.randn(2, 3, 6, 6)
        compiled = fgkernels.compile(net, backend=recorder)
        compiled(Dual(x, torch.randn(2, *x.shape)))
        with fgkernels.use_backend("reference"), torch.profiler.profile() as prof:
            compiled(Dual(x, torch.randn(2, *x.shape)))
        ran.extend(e.name for e in prof.events() if e.name.startswith("fgkernels::"))

    torch._dynamo.reset()
    thread = threading.Thread(target=body)  # a thread of its own: no use_backend before
    thread.start()
    thread.join()
    assert len(graphs) == 2 and ran == []


@pytest.mark.parametrize("change", ["replaced", "cast"])
def test_a_compiled_pass_refuses_a_parameter_changed_after_its_tangent(change):
    """A parameter replaced, or cast, after its tangent was set: refused by the compiled pass
    as by the eager one (the compiled one ran, taking the new weight for one without tangent,
    and a cast one failed inside Dynamo's trace)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)).double()
    fgkernels.random_tangents(net)
    compiled = fgkernels.compile(net, backend="aot_eager")
    x = torch.randn(5, 4, dtype=torch.float64)
    compiled(Dual(x))
    if change == "replaced":
        net[0].weight = nn.Parameter(net[0].weight.detach().clone())
        message = r"Linear.weight was replaced after its tangent was set"
    else:
        net.float()
        x = x.float()
        message = r"Linear.weight is now a torch.float32 tensor .* was set before it changed"
    for call in (net, compiled):
        with pytest.raises(RuntimeError, match=message):
            call(Dual(x))


class _RReLUByTheFallback(nn.Module):
    """rrelu in eval mode taken by the forward-AD fallback (as an op without a rule is):
    torch.func.vmap has no rule for it."""

    def forward(self, x):
        if not isinstance(x, Dual):  # (the oracle's pass)
            return F.rrelu(x, training=False)
        return forward_ad_fallback(F.rrelu, (x,), {"training": False})


@pytest.mark.parametrize("layer", [_RReLUByTheFallback, nn.RReLU], ids=["fallback", "rule"])
def test_a_fallback_op_vmap_cannot_batch_compiles_with_one_slot(layer):
    """rrelu in eval mode in a compiled pass of one tangent, by the fallback (an op vmap cannot
    batch: vmap's failure failed the trace, before the loop over slots that runs eagerly) and
    by its rule: as forward_ad's."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), layer()).double().eval()
    x = torch.randn(3, 4, dtype=torch.float64)
    v = fgkernels.random_tangents(net, num_tangents=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's notice
        out = fgkernels.compile(net, backend="eager")(Dual(x))
    fgkernels.clear_tangents(net)
    _, expected = model_jvp_in_place(net, [x], [None], v)
    assert torch.allclose(out.tangents, expected)


class _WrittenOutNorm(nn.Module):
    """A layer norm written out, as custom norm layers are: var and std of a Dual."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 5)

    def forward(self, x):
        h = self.fc(x)
        centred = h - h.mean(-1, keepdim=True)
        return centred / (h.var(-1, keepdim=True, unbiased=False) + 1e-5).sqrt() + h.std(0)


def test_a_written_out_norm_compiles_in_one_graph():
    """var and std of a Dual trace (their rule took math.prod of a generator, which Dynamo
    refuses: a graph break, and fullgraph=True refused the model)."""
    torch.manual_seed(0)
    net = _WrittenOutNorm().double()
    tangents = fgkernels.random_tangents(net, num_tangents=1)
    x = torch.randn(4, 5, dtype=torch.float64)
    out = fgkernels.compile(net, backend="eager", fullgraph=True)(Dual(x))
    _assert_pass_equals(out, model_jvp(net, [x], [None], tangents))


class _MarginLossNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return nn.functional.multi_margin_loss(self.fc(x), torch.tensor([1, 3, 0]))


def test_a_compiled_pass_that_fails_inside_forward_mode_leaves_it_usable():
    """A compiled pass refused inside torch's forward mode (an op it has no formula for)
    raises, and autograd works after it: the compiled jvp's level was left open, and every
    later forward-mode computation, eager passes and torch.func.jvp included, was refused as
    nested; the fallback's no_grad was left on."""
    torch.manual_seed(0)
    net = _MarginLossNet().double()
    fgkernels.random_tangents(net)
    x = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="multi_margin_loss"):
        fgkernels.compile(net, backend="eager")(Dual(x))
    assert torch.is_grad_enabled()  # (the fallback's no_grad was left on: backprop failed)
    ones = torch.ones_like(x)
    assert torch.equal(torch.func.jvp(torch.sin, (x,), (ones,))[1], torch.cos(x))
    out = nn.functional.soft_margin_loss(Dual(x, ones), ones)  # (a rule by forward AD)
    with torch.autograd.forward_ad.dual_level():
        expected = nn.functional.soft_margin_loss(
            torch.autograd.forward_ad.make_dual(x, ones), ones)
        expected = torch.autograd.forward_ad.unpack_dual(expected).tangent
    assert torch.allclose(out.tangent, expected)


def test_a_compiled_model_with_tangents_is_freed_with_its_compiled_call():
    """A model compiled with tangents set goes when the compiled call and Dynamo's graphs do
    (the compiled pass's list of bound modules, kept in a table by the model, held the model
    itself: a top module with parameters of its own was never freed)."""
    import weakref
    model = nn.Linear(3, 2)
    fgkernels.random_tangents(model)
    compiled = fgkernels.compile(model, backend="aot_eager")
    compiled(Dual(torch.randn(4, 3)))
    ref = weakref.ref(model)
    del model, compiled
    torch._dynamo.reset()
    gc.collect()
    assert ref() is None


class _Checkpointed(nn.Module):
    """A conv block run under activation checkpointing, then a linear head."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Linear(64, 2)

    def forward(self, x):
        h = torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False,
                                              early_stop=True)  # (checkpoint's own keywords)
        return self.head(h.flatten(1))


def _conv_net():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Flatten(), nn.Linear(64, 2))


# Weights computed by code torch.compile traces apart from the pass's torch function mode:
# torch._weight_norm (a private function, which Dynamo hands no mode), parametrizations read
# inside a twin's rule, a checkpointed block (a higher-order op).
TRACED_APART = {
    "weight_norm": lambda: _parametrized(nn.utils.parametrizations.weight_norm),
    "spectral_norm": lambda: _parametrized(nn.utils.parametrizations.spectral_norm).eval(),
    "orthogonal": lambda: _parametrized(nn.utils.parametrizations.orthogonal, layer=4),
    "checkpoint": _Checkpointed,
}


def _parametrized(parametrization, layer: int = 0) -> nn.Module:
    net = _conv_net()
    parametrization(net[layer])
    return net


@pytest.mark.parametrize("convert", [False, True], ids=["as is", "converted"])
@pytest.mark.parametrize("name", sorted(TRACED_APART))
def test_weights_computed_apart_from_the_mode_keep_their_tangents_compiled(name, convert):
    """A weight_norm, spectral_norm or orthogonal parametrization, and a block under
    activation checkpointing, in a model under fgkernels.compile, converted or not: the
    parameters they read lost their tangents without a word (the primal was right). Now
    traced in one graph, against forward_ad (spectral norm in eval mode: its power iteration
    changes its buffers)."""
    torch.manual_seed(0)
    net = TRACED_APART[name]().double()
    if convert:
        fgkernels.convert(net)
    tangents = fgkernels.random_tangents(net, num_tangents=2)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    xt = torch.randn(2, *x.shape, dtype=torch.float64)
    oracle = model_jvp(net, [x], [xt], tangents)
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # orthogonal's matrix_exp takes forward_ad's rule
        out = fgkernels.compile(net, backend="aot_eager", fullgraph=True)(Dual(x, xt))
    _assert_pass_equals(out, oracle)


def test_a_packed_recurrent_model_compiles_around_its_packing():
    """Packed sequences under fgkernels.compile: the packing and the packed LSTM run eagerly
    between graphs (as torch.compile runs torch's own packing: the batch sizes are data), the
    rest compiled; the output and final states, every slot, against forward_ad of each sequence
    alone, unpacked (forward mode cannot differentiate packing)."""
    from torch import nn
    rnn_utils = nn.utils.rnn

    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(3, 4, batch_first=True, bidirectional=True)
            self.head = nn.Linear(8, 2)

        def forward(self, x, lengths=None):
            if lengths is None:  # the oracle's form: one sequence, unpacked
                out, (h, _) = self.rnn(x)
            else:
                packed = rnn_utils.pack_padded_sequence(x, lengths, True, enforce_sorted=False)
                out, (h, _) = self.rnn(packed)
                out, _ = rnn_utils.pad_packed_sequence(out, True, total_length=x.shape[1])
            return self.head(out).tanh(), h

    torch.manual_seed(0)
    model = Tagger().double()
    lengths = [2, 5, 3]
    x = torch.randn(3, 5, 3, dtype=torch.float64)
    xt = torch.randn(2, *x.shape, dtype=torch.float64)
    tangents = fgkernels.random_tangents(model, num_tangents=2)
    torch._dynamo.reset()
    out, h = fgkernels.compile(model, backend="aot_eager")(Dual(x, xt), torch.tensor(lengths))
    for b, k in enumerate(lengths):
        (y, hb), (yt, hbt) = model_jvp(model, [x[b:b + 1, :k]], [xt[:, b:b + 1, :k]], tangents)
        torch.testing.assert_close(out.primal[b:b + 1, :k], y, **TOL[torch.float64])
        torch.testing.assert_close(out.tangents[:, b:b + 1, :k], yt, **TOL[torch.float64])
        torch.testing.assert_close(h.primal[:, b:b + 1], hb, **TOL[torch.float64])
        torch.testing.assert_close(h.tangents[:, :, b:b + 1], hbt, **TOL[torch.float64])
    # Past each sequence's end the LSTM's output is the padding, 0, and the head's is its bias.
    padding = model.head(torch.zeros(8, dtype=torch.float64)).tanh()
    for b, k in enumerate(lengths):
        torch.testing.assert_close(out.primal[b, k:], padding.expand(5 - k, 2))


def test_recurrent_layers_compile_in_one_graph():
    """Dynamo leaves torch's RNN modules out of its graphs unless ``allow_rnn`` is set; a dual
    call sets it while it runs, so a model of an LSTM and a GRU compiles as one graph (their
    rules unroll the steps), with forward_ad's numbers in float64, and the setting is the
    user's again after the call."""
    from torch import nn

    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(3, 4, batch_first=True, bidirectional=True)
            self.gru = nn.GRU(8, 2, batch_first=True)

        def forward(self, x):
            return self.gru(self.lstm(x)[0])[0]

    torch.manual_seed(0)
    model = Stack().double()
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    xt = torch.randn(2, *x.shape, dtype=torch.float64)
    tangents = fgkernels.random_tangents(model, num_tangents=2)
    torch._dynamo.reset()
    assert not torch._dynamo.config.allow_rnn
    out = fgkernels.compile(model, backend="aot_eager", fullgraph=True)(Dual(x, xt))
    assert not torch._dynamo.config.allow_rnn
    y, yt = model_jvp(model, [x], [xt], tangents)
    torch.testing.assert_close(out.primal, y, **TOL[torch.float64])
    torch.testing.assert_close(out.tangents, yt, **TOL[torch.float64])


def test_an_eager_pass_calls_a_compiled_model_it_does_not_hold():
    """An eager dual pass whose forward calls a model compiled by ``fgkernels.compile`` and
    held outside its tree: the compiled call traces the encoder's parameters as they are (not
    as the eager pass lifts them) and hands out their tangents itself; exact."""
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Tanh(),
                                  torch.nn.Linear(3, 3)).double()
    compiled = fgkernels.compile(encoder, backend="aot_eager")

    class Outer(torch.nn.Module):
        def __init__(self, encode):
            super().__init__()
            self.head = torch.nn.Linear(3, 3).double()
            self.__dict__["encode"] = encode  # (not a submodule)

        def forward(self, x):
            return self.head(self.encode(x))

    model, ref = Outer(compiled), Outer(encoder)
    ref.head.load_state_dict(model.head.state_dict())
    f64 = dict(dtype=torch.float64)
    x, xt = torch.randn(2, 3, **f64), torch.randn(1, 2, 3, **f64)
    th = {n: torch.randn(1, *p.shape, **f64) for n, p in model.head.named_parameters()}
    te = {n: torch.randn(1, *p.shape, **f64) for n, p in encoder.named_parameters()}

    class Both(torch.nn.Module):  # (the oracle differentiates the parameters of both)
        def __init__(self):
            super().__init__()
            self.o, self.e = ref, encoder

        def forward(self, x):
            return self.o(x)

    y, yt = model_jvp_in_place(Both(), [x], [xt], {**{f"o.head.{k}": v for k, v in th.items()},
                                                   **{f"e.{k}": v for k, v in te.items()}})
    fgkernels.set_tangents(model.head, th)
    fgkernels.set_tangents(encoder, te)
    try:
        out = model(Dual(x, xt))
    finally:
        fgkernels.clear_tangents(model.head)
        fgkernels.clear_tangents(encoder)
    torch.testing.assert_close(out.tangents, yt, rtol=1e-12, atol=1e-12)


def test_the_module_hooks_going_and_coming_back_compile_nothing_anew():
    """fgkernels' global module hooks go when the last Dual does (at the next plain call) and
    when a baseline sets them aside, and come back with the next Dual; a graph traced with
    them guards on torch's hook tables, so they come back under the ids they had: registered
    anew, every call after such a gap compiled again (and, past Dynamo's limit, ran eager)."""
    from fgkernels.dual.passes import hooks_set_aside
    graphs = []
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
    compiled = fgkernels.compile(model, backend=recording_backend(graphs))
    x = torch.randn(2, 3)
    for gap in ("none", "the last Dual gone", "set aside", "none"):
        if gap == "the last Dual gone":
            gc.collect()
            nn.Identity()(x)
        if gap == "set aside":
            with hooks_set_aside():
                model(x)
        out = compiled(Dual(x, torch.randn_like(x)))
        del out
    assert len(graphs) == 1


class _StoresOnItself(nn.Module):
    """A forward that stores values of the pass on its module: a weight derived once and kept,
    a record, a carried state (a buffer rebound)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 3, dtype=torch.float64))
        self.register_buffer("state", torch.zeros(2, 3, dtype=torch.float64))
        self.cache, self.history = None, []

    def forward(self, x):
        if self.cache is None:
            self.cache = self.w * 2
        self.history.append(self.w.sum())
        h = torch.tanh(x @ self.cache + self.state)
        self.state = h
        return h


def test_a_compiled_pass_puts_back_what_the_forward_stores_on_its_module():
    """What a forward stores on its module during a compiled pass is put back as the eager
    pass puts it back: the cache as it was, no Dual in the record, the carried state's value
    without its tangent (the cache kept the first step's Dual, whose tangent the next steps
    took, and a plain call afterwards returned a Dual). Each step is forward_ad's, from one
    graph."""
    torch.manual_seed(0)
    graphs = []
    torch._dynamo.reset()
    net = _StoresOnItself()
    compiled = fgkernels.compile(net, backend=recording_backend(graphs))
    x = torch.randn(2, 3, dtype=torch.float64)
    for _ in range(3):
        tangents = {"w": torch.randn(1, 3, 3, dtype=torch.float64)}
        fgkernels.set_tangents(net, tangents)
        oracle = copy.deepcopy(net)
        out = compiled(Dual(x))
        _assert_pass_equals(out, model_jvp(oracle, [x], [None], tangents))
        assert net.cache is None and net.history == []
        assert type(net._buffers["state"]) is torch.Tensor
        torch.testing.assert_close(net.state, out.primal)
    assert len(graphs) == 1
    fgkernels.clear_tangents(net)
    assert type(compiled(x)) is torch.Tensor


@pytest.mark.parametrize("run", ["eager", "compiled"])
def test_a_cumulative_average_batch_norm_follows_torchs_running_statistics(run):
    """Converted batch norms with ``momentum=None`` (fused after a convolution, and alone),
    step after step: forward_ad's output and tangents, and nn.BatchNorm2d's running
    statistics; compiled with ``dynamic=True``, with no graph break and nothing compiled after
    the first step (the count was read on the host: a graph break, whose resumed frame lost
    the factor, an AttributeError; compiled with ``fullgraph=True``, a graph per step)."""
    torch.manual_seed(0)
    twin = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3, momentum=None), nn.ReLU(),
                         nn.BatchNorm2d(3, momentum=None)).double()
    net = fgkernels.convert(copy.deepcopy(twin))
    torch._dynamo.reset()
    counters.clear()
    call = net if run == "eager" else fgkernels.compile(net, backend="eager", dynamic=True)
    graphs = []
    for step in range(3):
        x = torch.randn(4, 2, 6, 6, dtype=torch.float64) * (step + 1) + step
        xt = torch.randn(1, *x.shape, dtype=torch.float64)
        tangents = fgkernels.random_tangents(net, num_tangents=1)
        oracle = model_jvp_in_place(twin, [x], [xt], tangents)  # (torch's layers: its update)
        _assert_pass_equals(call(Dual(x, xt)), oracle)
        graphs.append(counters["stats"]["unique_graphs"])
    for name, buf in twin.named_buffers():
        torch.testing.assert_close(net.get_buffer(name), buf, rtol=1e-12, atol=0)
    assert int(net[1].num_batches_tracked) == int(net[3].num_batches_tracked) == 3
    assert not counters["graph_break"] and graphs == [graphs[0]] * 3, graphs


class _FillsATemporary(nn.Module):
    """A forward that fills a zero tensor of its own from Duals (``__setitem__``,
    ``index_add_``, ``add_``), keeps a running mean as state (a buffer written under no_grad,
    and read after), and returns the tensor itself beside a head's output of it;
    ``graph_break`` breaks the graph between its writes. ``view``: it takes a view of the
    tensor before the writes and reads it or returns it, or it writes a Dual into a view of a
    zero tensor."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(3, 3), nn.Linear(3, 2)
        self.register_buffer("running", torch.zeros(3))
        self.view, self.graph_break = None, False

    def forward(self, x):
        h = self.fc(x)
        with torch.no_grad():
            self.running.mul_(0.9).add_(h.mean(0))
        if self.view == "written into":
            torch.zeros(4, *h.shape, dtype=h.dtype)[1].copy_(h)
        out = torch.zeros_like(h)
        row = out[0] if self.view in ("read", "returned") else None
        out[:, 1:] = h[:, 1:].exp()
        if self.graph_break:
            torch._dynamo.graph_break()
        out.index_add_(0, torch.tensor([1, 0]), h)
        out.add_(h * h)
        if self.view == "read":
            return row * 2
        if self.view == "returned":
            return row
        return out, self.head(out), self.running * 1


@pytest.mark.parametrize("tangents_of", ["parameters and input", "input"])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_a_temporary_filled_from_duals_becomes_a_dual_in_a_compiled_pass(grad, tangents_of):
    """A tensor the forward makes and fills from Duals takes their tangents in a compiled pass
    too, traced into one graph (or two, across a graph break), as in the eager one: it was
    left with the primal under no_grad (the output a plain tensor, the head's tangent wrong)
    and refused with grad; the buffer still takes the primal (read after, it has no tangent),
    and no tensor keeps a tangent after the pass. A view of the tensor taken before the writes
    is refused by name where it is read or returned (the eager pass refuses the write), and a
    Dual written into a view of a zero tensor is refused as in the eager pass."""
    torch.manual_seed(0)
    model = _FillsATemporary().double()
    x = torch.randn(2, 3, dtype=torch.float64)
    xt = torch.randn(2, *x.shape, dtype=torch.float64)
    tangents = {n: torch.randn(2, *p.shape, dtype=torch.float64)
                for n, p in model.named_parameters() if tangents_of == "parameters and input"}
    oracle = model_jvp(model, [x], [xt], tangents)
    fgkernels.set_tangents(model, tangents)
    graphs = []
    torch._dynamo.reset()
    compiled = fgkernels.compile(model, backend=recording_backend(graphs), fullgraph=True)
    for step in range(3):
        if step == 2:
            model.graph_break = True
            compiled = fgkernels.compile(model, backend="eager")
        model.running.zero_()
        with torch.set_grad_enabled(grad):
            out, y, running = compiled(Dual(x, xt))
        for got, want in zip((out, y), zip(*oracle)):
            _assert_pass_equals(got, want)
        mean = model.fc(x).mean(0).detach()
        torch.testing.assert_close(model.running, mean)
        assert type(running) is torch.Tensor and torch.equal(running, model.running)
        assert type(out.primal) is torch.Tensor and not has_tangent(out.primal)
        assert not has_tangent(model.running)
    assert len(graphs) == 1
    if tangents_of == "input":
        return  # (the refusals below do not depend on it)
    for view, error, message in (
            ("read", RuntimeError, "taken before a Dual was written into"),
            ("returned", RuntimeError, "taken before a Dual was written into"),
            ("written into", RuntimeError, "would write a Dual.* into a plain tensor")):
        model.view = view
        with torch.set_grad_enabled(grad), pytest.raises(error, match=message):
            fgkernels.compile(model, backend="eager")(Dual(x, xt))


class _StoresIntoATemporary(nn.Module):
    """Fills a tensor of its own from a Dual by a method (``copy_``), then stores ``value``
    into its first row by subscript."""

    def __init__(self, value):
        super().__init__()
        self.fc, self.value = nn.Linear(3, 3), value

    def forward(self, x):
        h = self.fc(x)
        out = torch.zeros_like(h)
        out.copy_(h)
        out[0] = self.value if not callable(self.value) else self.value(h)
        return out


@pytest.mark.parametrize("value", [2.0, torch.ones(3, dtype=torch.float64), lambda h: h[1].exp()],
                         ids=["scalar", "plain tensor", "dual"])
def test_a_store_by_subscript_keeps_the_tangent_in_a_compiled_pass(value):
    """``t[key] = v`` is traced through the Dual's ``__torch_function__`` in one graph: a plain
    value stored into a tensor the pass took as a Dual zeroes its tangent there (torch 2.14's
    Dynamo traced the store past the pass's torch function mode: the row kept the tangent it
    had), and a Dual stored into it is traced (which 2.14 refused: "Failed to convert
    args/kwargs to proxy")."""
    torch.manual_seed(0)
    model = _StoresIntoATemporary(value).double()
    x = torch.randn(2, 3, dtype=torch.float64)
    xt = torch.randn(2, *x.shape, dtype=torch.float64)
    oracle = model_jvp(model, [x], [xt], {})
    graphs = []
    torch._dynamo.reset()
    out = fgkernels.compile(model, backend=recording_backend(graphs), fullgraph=True)(
        Dual(x, xt))
    _assert_pass_equals(out, oracle)
    assert len(graphs) == 1


class _WritesThroughViewsOfABiasedProduct(nn.Module):
    """``addmm``/``baddbmm`` of a bias (the only parameter: a tangent broadcast over the rows,
    a stride 0) and fixed factors, written into through views of the product."""

    def __init__(self, batched: bool):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.batched = batched
        self.bias = nn.Parameter(torch.randn(4, generator=g))
        self.register_buffer("x", torch.randn(*(2,) * batched, 3, 4, generator=g))
        self.register_buffer("w", torch.randn(*(2,) * batched, 4, 4, generator=g))

    def forward(self, write):
        fn = torch.baddbmm if self.batched else torch.addmm
        y = fn(self.bias, self.x, self.w)
        row = y[1]
        WRITES_THROUGH_VIEWS[write](y)
        return y * 1.0, row * 1.0


WRITES_THROUGH_VIEWS = {
    "row": lambda y: y[0].mul_(3.0), "transposed row": lambda y: y.mT[..., 0, :].add_(1.0),
    "flat": lambda y: y.view(-1)[:5].zero_(), "column": lambda y: y[..., 2].neg_(),
    "in place": lambda y: y.mul_(2.0),
}


@pytest.mark.parametrize("write", sorted(WRITES_THROUGH_VIEWS))
@pytest.mark.parametrize("batched", [False, True], ids=["addmm", "baddbmm"])
def test_a_write_through_a_view_of_broadcast_slots_reaches_them_compiled(batched, write):
    """In a compiled pass, an in-place op through a view of a Dual whose slots are broadcast
    (``addmm`` whose only tangent is its bias's) reaches its primal and tangent, and a view
    taken before sees it, as forward_ad's and the eager pass's (primal and tangent were lost:
    Dynamo cannot ask the offsets the eager pass lays the slots out by)."""
    model = _WritesThroughViewsOfABiasedProduct(batched).double()
    bt = torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    oracle = model_jvp(model, [write], [None], {"bias": bt})
    torch._dynamo.reset()
    compiled = fgkernels.compile(model, backend="eager", fullgraph=True)
    fgkernels.set_tangents(model, {"bias": bt})
    with fgkernels.dual_pass(model):
        out = compiled(write)
    for ours, primal, tangents in zip(out, *oracle):
        _assert_pass_equals(ours, (primal, tangents))


class _WritesThroughViewsOfTwoBiasedProducts(nn.Module):
    """Two ``addmm`` of a bias each (tangents broadcast over the rows), viewed by one op and
    written into through both views."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a, self.b = (nn.Parameter(torch.randn(4, generator=g)) for _ in range(2))
        self.register_buffer("x", torch.randn(3, 4, generator=g))

    def forward(self):
        w = self.x.T @ self.x
        ya, yb = torch.addmm(self.a, self.x, w), torch.addmm(self.b, self.x, w)
        va, vb = torch.atleast_3d(ya, yb)
        va[0].mul_(2.0)
        vb[1].add_(1.0)
        return ya * 1.0, yb * 1.0


def test_writes_through_one_op_s_views_of_two_duals_reach_both_compiled():
    """A view op of two Duals whose slots are broadcast (``torch.atleast_3d(ya, yb)``) in a
    compiled pass: writes through both views reach both Duals, as forward_ad's."""
    model = _WritesThroughViewsOfTwoBiasedProducts().double()
    g = torch.Generator().manual_seed(1)
    tangents = {n: torch.randn(2, 4, dtype=torch.float64, generator=g) for n in ("a", "b")}
    oracle = model_jvp(model, [], [], tangents)
    torch._dynamo.reset()
    compiled = fgkernels.compile(model, backend="eager", fullgraph=True)
    fgkernels.set_tangents(model, tangents)
    with fgkernels.dual_pass(model):
        out = compiled()
    for ours, primal, slots in zip(out, *oracle):
        _assert_pass_equals(ours, (primal, slots))


class _DropsOutInPlace(nn.Module):
    """Alpha dropout written in place (``inplace=True``) into a product whose slots are
    broadcast (the bias's tangent alone), then a draw of the random stream."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.bias = nn.Parameter(torch.randn(4, generator=g))
        self.register_buffer("x", torch.randn(3, 4, generator=g))
        self.register_buffer("w", torch.randn(4, 4, generator=g))

    def forward(self):
        y = torch.addmm(self.bias, self.x, self.w)
        F.alpha_dropout(y, 0.5, training=True, inplace=True)
        return y * 1.0, torch.rand(3, dtype=y.dtype)


def test_an_op_written_in_place_by_its_flag_runs_once_compiled():
    """An op that writes its operand in place by its ``inplace=True`` flag, in a compiled pass,
    on a Dual whose slots are laid out as its primal before its first view: it runs once, as
    in the eager pass (one mask drawn, written once, and the stream left where it was)."""
    model = _DropsOutInPlace().double()
    fgkernels.set_tangents(model, {"bias": torch.randn(2, 4, dtype=torch.float64)})
    torch.manual_seed(0)
    with fgkernels.dual_pass(model):
        eager = model()
    torch._dynamo.reset()
    compiled = fgkernels.compile(model, backend="eager", fullgraph=True)
    torch.manual_seed(0)
    with fgkernels.dual_pass(model):
        out = compiled()
    _assert_pass_equals(out[0], (eager[0].primal, eager[0].tangents))
    assert torch.equal(out[1], eager[1])


class _ReadsAValueInALoop(nn.Module):
    """A forward that reads a value in a loop (``.item()``): Dynamo runs the frame eagerly
    past that graph break, and the torch functions it calls, ops with rules (``exp``) and
    without (``erfc``, ``sinc``: the fallback's, handed the op), with it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        h = self.fc(x)
        scale = 1.0
        for i in range(2):
            scale = scale + h[i].max().item()
        return h.tanh() * scale, h.exp(), h.abs().sum(0), h.erfc(), h.sinc()


def test_each_method_of_a_frame_run_eagerly_is_its_own_compiled_call():
    """A compiled pass whose forward Dynamo runs eagerly past a graph break in a loop: each
    Tensor method on a Dual gives its own result, as forward_ad's (Dynamo compiled
    ``Dual.__torch_function__`` as a frame of its own with no guard on the method, and
    ``h.exp()`` returned the graph of ``h.tanh()``: silently wrong primal and tangent; so the
    fallback's frame, handed the op, for ``h.sinc()``)."""
    torch.manual_seed(0)
    net = _ReadsAValueInALoop().double()
    x = torch.randn(4, 3, dtype=torch.float64)
    tangents = fgkernels.random_tangents(net, num_tangents=2)
    fgkernels.clear_tangents(net)
    oracle = model_jvp(net, [x], [None], tangents)
    torch._dynamo.reset()
    fgkernels.set_tangents(net, tangents)
    out = fgkernels.compile(net, backend="eager")(Dual(x))
    for ours, primal, slots in zip(out, *oracle):
        _assert_pass_equals(ours, (primal, slots))


def test_rrelu_in_training_compiles_with_its_draw_in_every_slot():
    """nn.RReLU in training, compiled with two tangents: its rule draws the slopes once for the
    primal and every slot, as the eager pass (the fallback's vmap, which has no rule for it,
    failed the trace)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.RReLU()).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    fgkernels.random_tangents(net, num_tangents=2)
    torch.manual_seed(1)
    eager = net(Dual(x))
    torch._dynamo.reset()
    compiled = fgkernels.compile(net, backend="eager", fullgraph=True)
    torch.manual_seed(1)
    _assert_pass_equals(compiled(Dual(x)), (eager.primal, eager.tangents))


def test_a_compiled_pass_sees_a_layer_forward_replaced_after_it_compiled():
    """A converted Sequential's Conv→BN→ReLU runs fused in a compiled pass until a layer's
    forward is replaced on the instance (``seq[2].forward = torch.tanh``): the next call
    recompiles and runs the replacement (it ran the fused ReLU: primal 1.5 off)."""
    torch.manual_seed(0)
    seq = fgkernels.convert(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4),
                                          nn.ReLU()).double().eval())
    torch._dynamo.reset()
    run = fgkernels.compile(seq, backend="aot_eager")
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    for replaced in (False, True):
        if replaced:
            seq[2].forward = torch.tanh
        errors = compare_with_forward_ad(seq, [x], num_tangents=2, run=run)
        assert errors["primal"] < 1e-12 and errors["tangent"] < 1e-12, (replaced, errors)
