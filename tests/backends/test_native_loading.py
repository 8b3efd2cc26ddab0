"""Loading the extension: on first use, not at import; a missing or broken one leaves fgkernels
running on the reference backend, saying why; with FGKERNELS_REQUIRE_NATIVE=1 (set-up and CI) it
loads at import and the import fails instead, so that a suite cannot pass on the reference
backend by accident."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import fgkernels

ROOT = Path(__file__).resolve().parents[2]
# `None` in sys.modules makes `from fgkernels import _C` raise ImportError, as an unbuilt or
# unloadable extension does.
PROGRAM = """
import sys
sys.modules["fgkernels._C"] = None
import fgkernels
from fgkernels.backends import native
print(fgkernels.available_backends(), native.native_load_error())
"""


# Which of the extension's modules are loaded after each step (a built extension).
ON_FIRST_USE = """
import sys
import torch
loaded = lambda: "fgkernels._C" in sys.modules
import fgkernels.dual
print("value", loaded())
import fgkernels
print("package", loaded())
d = fgkernels.Dual(torch.randn(2, 3), torch.randn(2, 3))
torch.relu(d)
print("first op", loaded(), "torch.ops.fgkernels.dual_relu" if hasattr(torch.ops.fgkernels,
                                                                        "dual_relu") else "")
"""


# The process's first dual op inside a plain torch.compile (fullgraph): the extension loads
# when Dynamo does, before the trace, which cannot trace its loading.
FIRST_OP_COMPILED = """
import sys
import torch
from torch import nn
import fgkernels
net = fgkernels.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
fgkernels.random_tangents(net)
x = fgkernels.Dual(torch.randn(2, 3, 6, 6), torch.randn(2, 3, 6, 6))
print("before", "fgkernels._C" in sys.modules)
out = torch.compile(lambda d: net(d), backend="eager", fullgraph=True)(x)
print("compiled", "fgkernels._C" in sys.modules)
ref = net(x)
print(torch.allclose(out.primal, ref.primal), torch.allclose(out.tangent, ref.tangent))
"""


# A backend whose loading raises when Dynamo loads leaves Dynamo and torch.compile working.
BROKEN_AT_DYNAMO_LOAD = """
import torch
import fgkernels.backends as backends
def broken(name):
    raise RuntimeError("a broken backend")
backends._instantiate = broken
print("compiled", torch.compile(lambda t: t + 1, backend="eager")(torch.ones(2)).tolist())
"""


def _run(program: str = PROGRAM, **env) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "FGKERNELS_REQUIRE_NATIVE"}
    return subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          env={**environ, "PYTHONPATH": str(ROOT), **env}, timeout=300)


@pytest.mark.skipif("native" not in fgkernels.available_backends(), reason="needs fgkernels._C")
def test_the_extension_loads_at_the_first_op_not_at_import():
    out = _run(ON_FIRST_USE)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:3] == [
        "value False", "package False", "first op True torch.ops.fgkernels.dual_relu"]


@pytest.mark.skipif("native" not in fgkernels.available_backends(), reason="needs fgkernels._C")
def test_require_native_loads_the_extension_at_import():
    out = _run(ON_FIRST_USE, FGKERNELS_REQUIRE_NATIVE="1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["value True", "package True"]


def test_without_the_extension_fgkernels_runs_on_the_reference_backend():
    out = _run()
    assert out.returncode == 0, out.stderr
    assert "'native'" not in out.stdout and "'reference'" in out.stdout
    assert "fgkernels._C halted" in out.stdout  # the reason, kept for the warning


def test_require_native_makes_a_missing_extension_an_import_error():
    out = _run(FGKERNELS_REQUIRE_NATIVE="1")
    assert out.returncode != 0
    assert "FGKERNELS_REQUIRE_NATIVE=1, but the compiled extension fgkernels._C does not load" \
        in out.stderr


@pytest.mark.skipif("native" not in fgkernels.available_backends(), reason="needs fgkernels._C")
def test_a_first_dual_op_inside_torch_compile_finds_the_extension_loaded():
    out = _run(FIRST_OP_COMPILED)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:3] == ["before False", "compiled True", "True True"]


def test_a_backend_failing_to_load_when_dynamo_loads_leaves_torch_compile_working():
    out = _run(BROKEN_AT_DYNAMO_LOAD)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[0] == "compiled [2.0, 2.0]"


@pytest.mark.skipif("native" not in fgkernels.available_backends(), reason="needs fgkernels._C")
@pytest.mark.parametrize("require", [False, True])
def test_an_extension_built_against_another_torch_is_not_used(monkeypatch, require):
    """An extension built against another torch release may load (a wheel installed beside a
    newer torch did, silently): it is refused as one that does not load, the reason naming
    both releases, or an ImportError where the native backend is required. A local tag alone
    (+cpu, +cu128) is the same release."""
    import torch

    from fgkernels import _C
    from fgkernels.backends import native
    monkeypatch.setenv(native.REQUIRE_VARIABLE, "1" if require else "0")
    release = torch.__version__.split("+")[0]
    monkeypatch.setattr(_C, "TORCH_VERSION", f"{release}+cu999", raising=False)
    assert native._load_extension() is None
    monkeypatch.setattr(_C, "TORCH_VERSION", "1.0.0+cpu")
    expected = f"built against torch 1.0.0\\+cpu, and this is torch {re.escape(torch.__version__)}"
    if require:
        with pytest.raises(ImportError, match=expected):
            native._load_extension()
    else:
        assert re.search(expected, native._load_extension())
