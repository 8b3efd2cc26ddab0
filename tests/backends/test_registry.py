"""The backend registry: selection, forcing, and errors."""
import importlib.util
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

import fgkernels
import fgkernels.backends as ops
from fgkernels.backends.base import Delegating
from fgkernels.backends.reference import ReferenceBackend

from helpers import TOL, torch_jvp_multi


def test_use_backend_forces_and_restores():
    cpu = torch.device("cpu")
    default = fgkernels.current_backend(cpu).name
    assert fgkernels.current_backend("cpu").name == default  # a device's name, as torch takes
    with fgkernels.use_backend("reference"):
        assert fgkernels.current_backend(cpu).name == "reference"
    assert fgkernels.current_backend(cpu).name == default


@pytest.mark.skipif("native" not in fgkernels.available_backends(),
                    reason="fgkernels._C is not built")
def test_the_innermost_use_backend_wins():
    cpu = torch.device("cpu")
    with fgkernels.use_backend("reference"):
        with fgkernels.use_backend("native"):
            assert fgkernels.current_backend(cpu).name == "native"
        assert fgkernels.current_backend(cpu).name == "reference"


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="unknown backend 'fast'; choose one of"):
        with fgkernels.use_backend("fast"):
            pass


def test_environment_variable_forces_backend():
    code = "import fgkernels, torch; print(fgkernels.current_backend(torch.device('cpu')).name)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"FGKERNELS_BACKEND": "reference", "PATH": ""})
    assert out.stdout.strip() == "reference"


TRITON_FIRST = """
import torch, fgkernels, fgkernels.functional as DF
from fgkernels import Dual
from fgkernels.testing import forward_ad_jvp
x, w = torch.randn(1, 2, 4, 4, dtype=torch.float64), torch.randn(3, 2, 3, 3, dtype=torch.float64)
xt = torch.randn(1, *x.shape, dtype=torch.float64)
with fgkernels.use_backend("triton"):  # float64: delegated to the native backend
    out = DF.conv2d(Dual(x, xt), w)
y, yt = forward_ad_jvp(lambda v: torch.nn.functional.conv2d(v, w), [x], [xt])
torch.testing.assert_close(out.primal, y)
torch.testing.assert_close(out.tangents, yt)
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None
                    or "native" not in fgkernels.available_backends(),
                    reason="Triton or the extension missing")
@pytest.mark.parametrize("how", ["use_backend", "FGKERNELS_BACKEND"])
def test_triton_as_the_first_backend_delegates_to_a_loaded_native_one(how):
    """Triton chosen before any other backend has loaded (a fresh process): what it hands to
    the native backend (a float64 convolution) runs there, where native's ops had not been
    registered yet (an AttributeError), against forward_ad."""
    env = {"TRITON_INTERPRET": "1", "PATH": ""} | (
        {"FGKERNELS_BACKEND": "triton"} if how == "FGKERNELS_BACKEND" else {})
    subprocess.run([sys.executable, "-c", TRITON_FIRST], env=env, check=True)


def test_missing_extension_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(ops, "_loaded", {})
    monkeypatch.setattr(ops, "_warned", [])
    monkeypatch.setattr("fgkernels.backends.native.native_available", lambda: False)
    monkeypatch.setattr("fgkernels.backends.native.native_load_error",
                        lambda: "ImportError: undefined symbol: _ZN3c10")
    monkeypatch.delenv("FGKERNELS_BACKEND", raising=False)
    with pytest.warns(UserWarning, match=r"\(ImportError: undefined symbol: _ZN3c10\).*"
                                         r"reinstall fgkernels .*`pip install \.` from a checkout"):
        assert fgkernels.current_backend(torch.device("cpu")).name == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fgkernels.current_backend(torch.device("cpu"))  # warned once only


def _ops_run(fn) -> set[str]:
    """The names of the fgkernels ops that ``fn()`` calls."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages() if e.key.startswith("fgkernels::")}


@pytest.mark.skipif("native" not in fgkernels.available_backends(), reason="extension not built")
@pytest.mark.parametrize("fused", [False, True], ids=["batch_norm", "conv_batch_norm"])
def test_native_batch_norm_past_its_slot_limit_is_served_by_the_reference(monkeypatch, fused):
    """A batch norm with more slots than the native apply kernel of its device declares it
    serves (``NativeBackend.MAX_BN_SLOTS``; 64 on CUDA) runs on the reference backend, exact,
    instead of reaching the kernel; at the limit the kernel runs."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False).double()
    model = torch.nn.Sequential(conv, torch.nn.BatchNorm2d(4).double(), torch.nn.ReLU())
    dual = fgkernels.convert(model if fused else model[1:])
    x = torch.randn(2, 3 if fused else 4, 5, 5, dtype=torch.float64)
    xt = torch.randn(3, *x.shape, dtype=torch.float64)
    native = ops._load("native")
    monkeypatch.setattr(native, "MAX_BN_SLOTS", {"cpu": 2})
    with fgkernels.use_backend("native"):
        ran = _ops_run(lambda: dual(fgkernels.Dual(x, xt)))
        out = dual(fgkernels.Dual(x, xt))
    assert not ran & {"fgkernels::dual_bn_apply", "fgkernels::dual_bn_apply_"}
    y, yt = torch_jvp_multi(model if fused else model[1:], x, xt)
    torch.testing.assert_close(out.tangent, yt, **TOL[torch.float64])
    monkeypatch.setattr(native, "MAX_BN_SLOTS", {"cpu": 3})
    with fgkernels.use_backend("native"):
        ran = _ops_run(lambda: dual(fgkernels.Dual(x, xt)))
    assert ran & {"fgkernels::dual_bn_apply", "fgkernels::dual_bn_apply_"}


def test_a_backend_implements_only_what_it_accelerates(monkeypatch):
    """A backend that inherits ``Delegating`` and implements one op serves every op: the rest
    from its fallback, exact."""
    class ConvBatchNormOnly(Delegating):
        name = "conv-bn-only"
        calls = 0

        def __init__(self):
            self.fallback = ReferenceBackend()

        def conv2d_batch_norm(self, *args):
            ConvBatchNormOnly.calls += 1
            return self.fallback.conv2d_batch_norm(*args)

    monkeypatch.setattr(ops, "_loaded", {**ops._loaded, "reference": ConvBatchNormOnly()})
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                                torch.nn.MaxPool2d(2), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(16, 5)).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    xt = torch.randn(2, *x.shape, dtype=torch.float64)
    _, expected = torch_jvp_multi(model, x, xt)
    with fgkernels.use_backend("reference"):
        assert fgkernels.current_backend(x.device).name == "conv-bn-only"
        out = fgkernels.convert(model)(fgkernels.Dual(x, xt))
    assert ConvBatchNormOnly.calls > 0
    torch.testing.assert_close(out.tangents, expected, **TOL[torch.float64])


def _count_calls(monkeypatch, op) -> tuple[list, list]:
    """Lists that grow by each call's arguments at each call of ``op``'s compiled op and of its
    reference."""
    kernel_calls, reference_calls = [], []
    compiled, reference = getattr(torch.ops.fgkernels, op.name), op.reference
    monkeypatch.setattr(torch.ops.fgkernels, op.name,
                        lambda *args: kernel_calls.append(args) or compiled(*args))
    monkeypatch.setattr(op, "reference",
                        lambda *args: reference_calls.append(args) or reference(*args))
    return kernel_calls, reference_calls


@pytest.mark.skipif("native" not in fgkernels.available_backends(), reason="needs fgkernels._C")
def test_an_elementwise_op_runs_its_kernel_where_the_library_has_one_else_its_reference(
        monkeypatch):
    """A ``KernelOp`` on the native backend: the compiled op for a device the library registered
    it for (found when the library loaded), its reference on any other, and on the reference
    backend."""
    from fgkernels.rules.layers import _relu
    assert "cpu" in _relu.devices
    kernel_calls, reference_calls = _count_calls(monkeypatch, _relu)
    x = fgkernels.Dual(torch.randn(3, 4), torch.randn(2, 3, 4))
    want = x.tangents.masked_fill(x.primal <= 0, 0)
    for backend, devices, calls in (("native", {"cpu"}, kernel_calls),
                                    ("native", set(), reference_calls),
                                    ("reference", {"cpu"}, reference_calls)):
        monkeypatch.setattr(_relu, "devices", frozenset(devices))
        before = len(calls)
        with fgkernels.use_backend(backend):
            out = torch.relu(x)
        assert len(calls) == before + 1, (backend, devices)
        torch.testing.assert_close(out.tangents, want, rtol=0, atol=0)


@pytest.mark.skipif("native" not in fgkernels.available_backends(), reason="needs fgkernels._C")
def test_an_elementwise_op_the_library_lacks_runs_its_reference():
    """A library built before an op was declared: no kernel, no fake, the reference."""
    from fgkernels.backends.kernel_op import KernelOp
    op = KernelOp("dual_not_built", lambda x, xt: (x * 2, None if xt is None else xt * 2))
    assert op.devices == frozenset()
    x, xt = torch.randn(3), torch.randn(1, 3)
    with fgkernels.use_backend("native"):
        y, yt = op(x, xt)
    torch.testing.assert_close(yt, xt * 2)


@pytest.mark.skipif("native" not in fgkernels.available_backends(), reason="needs fgkernels._C")
@pytest.mark.parametrize("shared", [False, True], ids=["own-slots", "shared-slots"])
def test_a_layer_op_runs_its_kernel_where_the_library_has_one_else_its_reference(monkeypatch,
                                                                                shared):
    """A ``LayerOp`` (linear) on the native backend: the compiled op for a device the library
    registered it for, its reference on any other and on the reference backend; either way the
    input's and the parameters' terms land in their slots: the weight carries direction 1, the
    input directions 0 and 1 (each term placed in its slots), or both carry directions 0 and 1
    (the op asked for their sum, ``sum_terms``)."""
    from fgkernels.rules.layers import _linear
    assert "cpu" in _linear.devices
    kernel_calls, reference_calls = _count_calls(monkeypatch, _linear)
    x, xt = torch.randn(5, 3, dtype=torch.float64), torch.randn(2, 5, 3, dtype=torch.float64)
    w = torch.randn(4, 3, dtype=torch.float64)
    b, bt = torch.randn(4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    wt = torch.randn(2 if shared else 1, 4, 3, dtype=torch.float64)
    if shared:
        weight, bias = fgkernels.Dual(w, wt, directions=[0, 1]), \
            fgkernels.Dual(b, bt, directions=[0, 1])
        want = torch.stack([xt[t] @ w.T + x @ wt[t].T + bt[t] for t in range(2)])
    else:
        weight, bias = fgkernels.Dual(w, wt, directions=[1]), b
        want = torch.stack([xt[0] @ w.T, xt[1] @ w.T + x @ wt[0].T])
    for backend, devices, calls in (("native", {"cpu"}, kernel_calls),
                                    ("native", set(), reference_calls),
                                    ("reference", {"cpu"}, reference_calls)):
        monkeypatch.setattr(_linear, "devices", frozenset(devices))
        before = len(calls)
        with fgkernels.use_backend(backend):
            out = F.linear(fgkernels.Dual(x, xt, directions=[0, 1]), weight, bias)
        assert len(calls) == before + 1, (backend, devices)
        assert calls[-1][-1] is shared  # sum_terms
        assert out.directions == (0, 1)
        torch.testing.assert_close(out.tangents, want, **TOL[torch.float64])


@pytest.mark.skipif("native" not in fgkernels.available_backends(), reason="needs fgkernels._C")
def test_a_layer_op_the_library_lacks_runs_its_reference():
    """A library built before a layer op was declared: no kernel, no fake, the reference."""
    from fgkernels.backends.base import LayerParams
    from fgkernels.backends.layer_op import LayerOp
    from fgkernels.dual.slots import plan
    op = LayerOp("dual_not_built", lambda x, xt, w, wt, b, bt, summed: (x * w, xt * w, None),
                 check=lambda x, w, b: None, outputs=lambda x, w, b: x)
    assert op.devices == frozenset()
    x, xt, w = torch.randn(3), torch.randn(1, 3), torch.randn(3)
    slots = fgkernels.Dual(x, xt).slot_operand()
    with fgkernels.use_backend("native"):
        y, yt = op(x, xt, LayerParams(w, None, None, None), plan([slots, None], "test"))
    torch.testing.assert_close(yt, xt * w)
