"""The implementations a benchmark compares: fgkernels on each backend against PyTorch's
forward-mode AD (torch.autograd.forward_ad, torch.func.jvp), the primal alone, and backprop."""
from __future__ import annotations

import contextlib
import copy
import time
from typing import Optional

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.func import functional_call
from torch.profiler import ProfilerActivity, profile

import fgkernels
from fgkernels import Dual
from fgkernels.dual.layout import kernel_format

BASELINES = ("forward_ad", "func_jvp", "primal", "backprop")


def fgkernels_providers() -> list[str]:
    """One provider per backend that runs on this machine's benchmark device."""
    backends = fgkernels.available_backends()
    if not torch.cuda.is_available():
        backends = [b for b in backends if b != "triton"]  # the interpreter is no timing
    return [f"fgkernels-{b}" for b in backends]


def backend_of(provider: str):
    """The ``use_backend`` context of a fgkernels provider (a null context otherwise)."""
    if provider.startswith("fgkernels-"):  # fgkernels-<backend>[-<variant>]
        return fgkernels.use_backend(provider.split("-")[1])
    return contextlib.nullcontext()


def jvp_forward_ad(fn, primals, tangents):
    """(fn(*primals), its JVP) by torch.autograd.forward_ad."""
    with fwAD.dual_level():
        out = fn(*[fwAD.make_dual(p, t) for p, t in zip(primals, tangents)])
        return fwAD.unpack_dual(out)


def dual_call(fn, primals, tangents):
    """fn on Duals, returning the output Dual."""
    return fn(*[Dual(p, t) for p, t in zip(primals, tangents)])


def loss_jvp_forward_ad(model, params, tangents, x, y):
    """(cross-entropy loss of ``model`` with ``params``, its JVP along ``tangents``) by
    torch.autograd.forward_ad, the model's buffers (batch-norm running statistics) updated."""
    with fwAD.dual_level():
        duals = {n: fwAD.make_dual(p, tangents[n]) for n, p in params.items()}
        out = functional_call(model, {**duals, **dict(model.named_buffers())}, (x,))
        return fwAD.unpack_dual(F.cross_entropy(out, y))


def loss_backprop_step(model, x, y) -> None:
    """A backprop step's gradients: the cross-entropy loss of ``model`` on ``x`` backpropagated,
    the gradients then dropped (set to None) for the next call."""
    F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)


# Relative error (‖ours − exact‖ / ‖exact‖) a provider's result may have against the float64
# oracle, by its dtype (a scalar loss's JVP, a sum of terms that cancel, gets float32's error
# up to ~3e-4); float32 on CUDA may be TF32 (operands truncated to 10 mantissa bits). A missing
# tangent term is off by 1e-2 or more.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-3, torch.bfloat16: 6e-2,
             torch.float16: 1e-2}
TF32_TOLERANCE = 1e-2


def check_against_oracle(provider: str, out, expected, tolerance=None) -> None:
    """A provider's result (a Dual, a (primal, tangent) pair, a primal, or None for backprop)
    against the oracle's ``(primal, tangent)`` in float64, within ``tolerance`` (default: by
    dtype, ``TOLERANCE``): the quick run calls it once per benchmark, so that no benchmark times
    a wrong answer."""
    if out is None:
        return
    for part, ours, exact in zip(("primal", "tangent"), _parts(out), expected):
        if ours is None or exact is None:
            continue
        tol = tolerance if tolerance is not None else \
            TF32_TOLERANCE if ours.is_cuda and ours.dtype == torch.float32 else \
            TOLERANCE[ours.dtype]
        err = _relative(ours, exact)
        if not err <= tol:
            raise AssertionError(f"{provider}: the {part} is off the float64 oracle by {err:.2e} "
                                 f"(tolerance {tol:.0e} in {ours.dtype})")


def cuda_graphed(fn):
    """``fn`` captured once in a CUDA graph: a callable that replays it and returns the
    captured outputs (each replay overwrites them). Three eager calls on a side stream come
    first (they autotune, let cuDNN choose and fill caches, none of which a capture may do), and
    the first replay must agree with the last of them within the dtype's ``TOLERANCE``."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            eager = fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    graph.replay()
    _check_same_result("the replayed graph", out, eager, TOLERANCE)

    def replay():
        graph.replay()
        return out

    return replay


def check_against_eager(fn, eager_fn) -> None:
    """``fn``'s result (a compiled pass's) against ``eager_fn``'s, within the dtype's
    tolerance (TF32's for float32 on CUDA: the two may round their products differently).
    ``fn`` is called three times first: a pass compiled with CUDA graphs records on its second
    call and replays from its third."""
    for _ in range(3):
        out = fn()
    tolerance = {**TOLERANCE, torch.float32: TF32_TOLERANCE} \
        if _parts(out)[0].is_cuda else TOLERANCE
    _check_same_result("the compiled pass", out, eager_fn(), tolerance)


def _check_same_result(what: str, out, eager, tolerance: dict) -> None:
    if eager is None:
        return
    for part, ours, theirs in zip(("primal", "tangent"), _parts(out), _parts(eager)):
        err = _relative(ours, theirs.double())
        if not err <= tolerance[ours.dtype]:
            raise AssertionError(f"{what}'s {part} is off the eager call's by {err:.2e}")


def relative_error(out, expected) -> float:
    """The larger relative error of ``out``'s primal and tangent against ``expected``."""
    return max(_relative(o, e) for o, e in zip(_parts(out), expected))


def _parts(out) -> tuple:
    """(primal, tangent) of what a provider returns (tangent None: a primal alone)."""
    if isinstance(out, Dual):
        return out.primal, out.tangent
    return out if isinstance(out, tuple) else (out, None)


def _relative(ours, exact) -> float:
    exact = exact.reshape(ours.shape)
    return float((ours.double() - exact).norm() / exact.norm().clamp_min(1e-300))


def op_oracle(fn, primals, tangents):
    """``fn``'s value and JVP by forward_ad in float64 (one tangent per primal; None: the
    primal is constant)."""
    from fgkernels.testing import forward_ad_jvp
    out, tangent = forward_ad_jvp(fn, [p.double() for p in primals],
                                  [None if t is None else t.double()[None] for t in tangents])
    return out, tangent[0]


def loss_oracle(model, params, tangents, x, y):
    """The cross-entropy loss of ``model`` and its JVP along ``tangents`` by forward_ad in
    float64, on a float64 copy of the model (the model itself untouched)."""
    double = copy.deepcopy(model).double()
    return loss_jvp_forward_ad(double, {n: p.double() for n, p in params.items()},
                               {n: t.double() for n, t in tangents.items()},
                               x.double() if x.is_floating_point() else x, y)


def model_oracle(model, params, tangents, x, xt):
    """``model(x)`` and its JVP along the parameters' ``tangents`` and the input's ``xt`` by
    forward_ad in float64, on a float64 copy of the model."""
    from fgkernels.testing import model_jvp_in_place
    out, tangent = model_jvp_in_place(copy.deepcopy(model).double(), [x.double()],
                                      [xt.double()[None]],
                                      {n: tangents[n].double()[None] for n in params})
    return out, tangent[0]


def model_dual_pass_case(model, x, xt, quick: bool, compiled: Optional[dict] = None,
                         tangent_dtype: Optional[torch.dtype] = None,
                         channels_last: bool = False):
    """``(dual, forward_ad, expected)`` for a model's dual pass, every parameter and the input
    carrying one tangent: ``dual`` runs a converted copy (compiled by ``fgkernels.compile`` with
    the Inductor options ``compiled`` when given) on ``Dual(x, xt)``, ``forward_ad`` the model
    itself under forward_ad with the same tangents; ``expected`` is the float64 oracle in the
    quick run (else None). ``tangent_dtype``: the dual pass's tangents in that dtype (bfloat16
    tangents of a float32 model), forward_ad's in the model's, the same values.
    ``channels_last``: the dual pass's copy and its input laid out channels_last, forward_ad's
    model and input as given."""
    net, dual_x, dual_xt = fgkernels.convert(copy.deepcopy(model)), x, xt
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        dual_x, dual_xt = (t.contiguous(memory_format=torch.channels_last) for t in (x, xt))
    tangents = fgkernels.random_tangents(net, dtype=tangent_dtype)
    dual_xt = dual_xt.to(tangent_dtype or xt.dtype)
    # forward_ad (and the oracle) take the same values in the primals' dtype and layout
    params = {n: p.detach() for n, p in model.named_parameters()}
    tangents = {n: t.to(params[n].dtype).contiguous(memory_format=kernel_format(params[n]))
                for n, t in tangents.items()}
    xt = dual_xt.to(xt.dtype).contiguous(memory_format=kernel_format(x))
    run = net if compiled is None else fgkernels.compile(net, options=compiled)
    buffers = dict(model.named_buffers())

    def forward_ad():
        fn = lambda x_, *ps: functional_call(model, {**dict(zip(params, ps)), **buffers}, (x_,))
        return jvp_forward_ad(fn, [x, *params.values()], [xt, *tangents.values()])

    def dual():
        with torch.no_grad():
            return run(Dual(dual_x, dual_xt))

    expected = model_oracle(model, params, tangents, x, xt) if quick else None
    return dual, forward_ad, expected


# The kernels of convolutions and matrix products, as torch.profiler names them on the CPU
# (oneDNN and BLAS below ATen) and where CUDA runs them through ATen's ops.
PRODUCT_OPS = frozenset({"aten::mkldnn_convolution", "aten::_convolution", "aten::mm",
                         "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm",
                         "aten::baddbmm_"})


def products_share(fn) -> float:
    """The share of one call of ``fn`` (wall time, profiled) spent inside convolutions and
    matrix products: a pass that must compute the same products at the same speed takes at
    least this share of ``fn``'s time. Each product counted once: an op's inclusive time,
    minus any product op it calls."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        fn()
        wall = time.perf_counter() - start
    events = [e for e in prof.events() if e.name in PRODUCT_OPS]
    outer = [e for e in events if not _inside_product(e)]
    return sum(e.cpu_time_total for e in outer) / 1e6 / wall


def _inside_product(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name in PRODUCT_OPS:
            return True
        parent = parent.cpu_parent
    return False

