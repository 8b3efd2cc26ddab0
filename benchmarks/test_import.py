"""What importing fgkernels costs: a fresh interpreter importing torch and fgkernels against one
importing torch alone, paired rounds. fgkernels loads neither its compiled extension (at the
first dual op) nor Dynamo (at the first compile) at import."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROGRAMS = {"torch": "import torch", "fgkernels": "import torch, fgkernels"}


def _importer(program: str):
    def run():
        subprocess.run([sys.executable, "-c", program], check=True, cwd=ROOT,
                       env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    return run


@pytest.mark.parametrize("provider", sorted(PROGRAMS))
def test_import(measure, provider):
    paired = {"torch": _importer(PROGRAMS["torch"])} if provider == "fgkernels" else None
    measure(_importer(PROGRAMS[provider]), "import in a fresh interpreter", rounds=5,
            paired=paired, track_memory=False)
