"""A missing or broken extension: fgkernels still imports and runs on the reference backend,
saying why; with FGKERNELS_REQUIRE_NATIVE=1 (set-up and CI) the import fails instead, so that a
suite cannot pass on the reference backend by accident."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# `None` in sys.modules makes `from fgkernels import _C` raise ImportError, as an unbuilt or
# unloadable extension does.
PROGRAM = """
import sys
sys.modules["fgkernels._C"] = None
import fgkernels
from fgkernels.backends import native
print(fgkernels.available_backends(), native.native_load_error())
"""


def _run(**env) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "FGKERNELS_REQUIRE_NATIVE"}
    return subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True,
                          env={**environ, "PYTHONPATH": str(ROOT), **env}, timeout=300)


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
