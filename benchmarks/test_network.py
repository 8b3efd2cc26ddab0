"""Whole-network benchmarks: a ResNet-18 dual pass (one tangent on every parameter, the loss's
JVP included) against forward_ad, torch.func.jvp and a backprop step; and T tangents carried
together against T single passes. Each ResNet-18 case records the network's roofline time
(``benchmarks/roofline.py``, H200 peaks at the measured copy bandwidth) in
``extra_info["roofline_s"]``; on CUDA torch.func.jvp (forward_ad's composition again) is left
out. On CUDA the network and its input are channels_last, and each provider's call is also
timed captured in a CUDA graph (its device time alone)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import fgkernels
from fgkernels import Dual

from cases import resnet18_case
from conftest import DEVICE
from providers import (
    backend_of,
    check_against_eager,
    cuda_graphed,
    fgkernels_providers,
    loss_backprop_step,
    loss_jvp_forward_ad,
    loss_oracle,
)
from roofline import roofline

CUDA = DEVICE.type == "cuda"
BATCHES = (256,) if CUDA else (32, 128)
DTYPES = (torch.float32, torch.bfloat16) if CUDA else (torch.float32,)
PROVIDERS = [p for p in fgkernels_providers() + ["forward_ad", "func_jvp", "backprop"]
             if not (CUDA and p in ("fgkernels-reference", "func_jvp"))]
ROOFLINE = {"forward_ad": "forward_ad", "func_jvp": "forward_ad", "backprop": "backprop"}


def resnet18_calls(quick: bool, batch: int, dtype: torch.dtype):
    """The ResNet-18 case (channels_last on CUDA, the layout the tensor cores are fed in, for
    every provider alike): ``(model, x, y, params, tangents, calls)``, ``calls`` holding the
    fgkernels loss JVP (on the backend in use when called), forward_ad's and a backprop step."""
    model, x, y = resnet18_case(quick, batch, dtype, DEVICE)
    if CUDA:
        model, x = model.to(memory_format=torch.channels_last), \
            x.contiguous(memory_format=torch.channels_last)
    params = {n: p.detach() for n, p in model.named_parameters()}
    tangents = {n: torch.randn_like(p) for n, p in params.items()}

    def fgkernels_jvp():
        return F.cross_entropy(model(Dual(x)), y)

    def forward_ad():
        return loss_jvp_forward_ad(model, params, tangents, x, y)

    calls = {"fgkernels": fgkernels_jvp, "forward_ad": forward_ad,
             "backprop": lambda: loss_backprop_step(model, x, y)}
    return model, x, y, params, tangents, calls


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"b{b}")
def test_resnet18_dual_pass(measure, benchmark, quick, provider, batch, dtype):
    model, x, y, params, tangents, calls = resnet18_calls(quick, batch, dtype)
    expected = loss_oracle(model, params, tangents, x, y) if quick else None
    paired = None
    if provider.startswith("fgkernels-"):
        fgkernels.set_tangents(model, tangents)
        fn = calls["fgkernels"]
        # Each round also follows a forward_ad pass and a backprop step (see measure).
        paired = {"forward_ad": calls["forward_ad"], "backprop": calls["backprop"]}
    elif provider == "forward_ad":
        fn = calls["forward_ad"]
    elif provider == "func_jvp":
        # torch.func.jvp cannot update running stats in place: this copy keeps none.
        functional = copy.deepcopy(model)
        torch.func.replace_all_batch_norm_modules_(functional)
        loss = lambda p: F.cross_entropy(functional_call(functional, p, (x,)), y)
        fn = lambda: torch.func.jvp(loss, (params,), (tangents,))
    else:
        fn = calls["backprop"]
    with backend_of(provider):
        # A batch-32 pass takes about half a second: seven rounds, so that a median of
        # paired ratios outlasts a few disturbed ones.
        measure(fn, f"resnet18 loss JVP b{x.shape[0]} {str(dtype)[6:]}",
                rounds=3 if x.shape[0] >= 128 else 7, paired=paired, expected=expected)
    benchmark.extra_info["roofline_s"] = _roofline_s(provider, x.shape[0], dtype)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("provider", [p for p in PROVIDERS if p != "func_jvp"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_resnet18_graphed_pass(measure, benchmark, quick, provider, dtype):
    """Each provider's call captured in a CUDA graph and replayed (``providers.cuda_graphed``):
    the host's share (Python, kernel launches) gone, what is left is the device's time. The
    replay's result is checked against an eager call's."""
    model, x, _, _, tangents, calls = resnet18_calls(quick, 256, dtype)
    name = "fgkernels" if provider.startswith("fgkernels-") else provider
    paired = None
    with backend_of(provider):
        if name == "fgkernels":
            fgkernels.set_tangents(model, tangents)
            paired = {b: cuda_graphed(calls[b]) for b in ("forward_ad", "backprop")}
        # A replay allocates nothing: the allocator sees no peak worth recording.
        measure(cuda_graphed(calls[name]), f"resnet18 graphed loss JVP b{x.shape[0]} "
                f"{str(dtype)[6:]}", rounds=3, paired=paired, track_memory=False)
    benchmark.extra_info["roofline_s"] = _roofline_s(provider, x.shape[0], dtype)


# provider -> the torch.compile mode of fgkernels.compile ("reduce-overhead": the compiled
# graph replayed from CUDA graphs)
COMPILE_MODES = {"fgkernels-native": None, "fgkernels-native-cudagraphs": "reduce-overhead"}


@pytest.mark.skipif(not CUDA, reason="compiling ResNet-18 takes minutes on a CPU; "
                    "benchmarks/test_real_models.py times compiled passes there")
@pytest.mark.parametrize("provider", [*COMPILE_MODES, "forward_ad", "backprop"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_resnet18_compiled_pass(measure, benchmark, quick, provider, dtype):
    """The fgkernels loss JVP (under ``no_grad``, as a forward-gradient step runs it) with the
    network compiled by ``fgkernels.compile`` (Inductor, fullgraph; with CUDA graphs too),
    against eager forward_ad and an eager backprop step: what a user who turns the compiled
    mode on gets over the composition in torch. The first calls compile and record, outside
    the timing; the result is checked against the eager pass's."""
    model, x, y, _, tangents, calls = resnet18_calls(quick, 256, dtype)
    paired = None
    fn = calls.get(provider)
    with backend_of(provider):
        if fn is None:
            fgkernels.set_tangents(model, tangents)
            torch._dynamo.reset()
            torch._dynamo.utils.counters.clear()
            compiled = fgkernels.compile(model, fullgraph=True, mode=COMPILE_MODES[provider])

            @torch.no_grad()
            def fn():
                return F.cross_entropy(compiled(Dual(x)), y)

            check_against_eager(fn, calls["fgkernels"])
            # Inductor's reasons for running a graph without CUDA graphs, if any
            benchmark.extra_info["cudagraph_skips"] = \
                dict(torch._dynamo.utils.counters["inductor"]).get("cudagraph_skips", 0)
            paired = {b: calls[b] for b in ("forward_ad", "backprop")}
        # A pass replayed from CUDA graphs takes its memory from the graphs' own pool, which
        # the allocator's peak does not see: no figure rather than a wrong one.
        measure(fn, f"resnet18 compiled loss JVP b{x.shape[0]} {str(dtype)[6:]}", rounds=3,
                paired=paired, track_memory=COMPILE_MODES.get(provider) != "reduce-overhead")
    benchmark.extra_info["roofline_s"] = _roofline_s(provider, x.shape[0], dtype)


def _roofline_s(provider: str, batch: int, dtype: torch.dtype) -> float:
    precision = "bf16" if dtype == torch.bfloat16 else "tf32"
    return roofline(batch, "h200-measured")["total_seconds"][precision][
        ROOFLINE.get(provider, "dual")]


@pytest.mark.parametrize("provider", ["fgkernels-multi", "fgkernels-single", "forward_ad"])
@pytest.mark.parametrize("T", [1, 4, 8])
def test_resnet18_multi_tangent(measure, quick, provider, T):
    model, x, y = resnet18_case(quick, 32, torch.float32, DEVICE)
    params = {n: p.detach() for n, p in model.named_parameters()}
    stacks = {n: torch.randn(T, *p.shape, device=DEVICE) for n, p in params.items()}
    if provider == "fgkernels-multi":
        fgkernels.set_tangents(model, stacks)
        fn = lambda: F.cross_entropy(model(Dual(x)), y)
    elif provider == "fgkernels-single":
        def fn():
            for t in range(T):
                fgkernels.set_tangents(model, {n: s[t] for n, s in stacks.items()})
                F.cross_entropy(model(Dual(x)), y)
    else:
        def fn():
            for t in range(T):
                loss_jvp_forward_ad(model, params, {n: s[t] for n, s in stacks.items()}, x, y)
    measure(fn, f"resnet18 {T} tangents b{x.shape[0]}", rounds=2)
