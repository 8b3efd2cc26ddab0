"""The backend registry: selection, forcing, and errors."""
import subprocess
import sys
import warnings

import pytest
import torch

import fgkernels
import fgkernels.backends as ops


def test_use_backend_forces_and_restores():
    cpu = torch.device("cpu")
    default = fgkernels.current_backend(cpu).name
    with fgkernels.use_backend("reference"):
        assert fgkernels.current_backend(cpu).name == "reference"
    assert fgkernels.current_backend(cpu).name == default


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="unknown backend 'fast'; choose one of"):
        with fgkernels.use_backend("fast"):
            pass


def test_environment_variable_forces_backend():
    code = "import fgkernels, torch; print(fgkernels.current_backend(torch.device('cpu')).name)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"FGKERNELS_BACKEND": "reference", "PATH": ""})
    assert out.stdout.strip() == "reference"


def test_missing_extension_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(ops, "_loaded", {})
    monkeypatch.setattr(ops, "_warned", [])
    monkeypatch.setattr("fgkernels.backends.native.native_available", lambda: False)
    monkeypatch.setattr("fgkernels.backends.native.native_load_error",
                        lambda: "ImportError: undefined symbol: _ZN3c10")
    monkeypatch.delenv("FGKERNELS_BACKEND", raising=False)
    with pytest.warns(UserWarning, match=r"\(ImportError: undefined symbol: _ZN3c10\).*"
                                         r"`pip install \.` from the fgkernels checkout"):
        assert fgkernels.current_backend(torch.device("cpu")).name == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fgkernels.current_backend(torch.device("cpu"))  # warned once only
