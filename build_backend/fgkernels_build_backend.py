"""The PEP 517 build backend of fgkernels: setuptools', building against the user's torch.

A C++ extension of torch runs only with the torch it was compiled against. An isolated build
(``pip install .``) installs its build requirements into a fresh environment, and a plain
``torch`` requirement there gets the newest release the index offers, not the one installed.
This backend asks instead for the very torch of the interpreter the package is being installed
into: pip runs the build hooks with that interpreter, only with its site-packages hidden
(PYTHONPATH pointing to a ``sitecustomize`` that removes them, PYTHONNOUSERSITE=1), so the same
interpreter run without those variables sees them again.

``FGKERNELS_BUILD_TORCH=<version>`` names the torch to build against instead: for frontends
that run the hooks in a throwaway virtual environment (``python -m build``, pip's
``--use-feature=venv-isolation``), where no torch is found. With neither, the build takes the
newest torch of ``DEFAULT_TORCH`` and the wheel then requires that torch.
"""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Optional

from setuptools.build_meta import (  # noqa: F401  (the hooks this backend leaves as they are)
    build_editable,
    build_sdist,
    build_wheel,
    prepare_metadata_for_build_editable,
    prepare_metadata_for_build_wheel,
)

DEFAULT_TORCH = "torch>=2.4"
# Compiles the C++ sources in parallel (torch's BuildExtension falls back to one file at a time
# without it).
NINJA = "ninja"
# What pip sets in the hooks' environment to hide the target interpreter's site-packages.
_ISOLATION_VARIABLES = ("PYTHONPATH", "PYTHONNOUSERSITE")
_PROBE = ("import importlib.metadata as m\n"
          "try:\n    print(m.version('torch'))\nexcept m.PackageNotFoundError:\n    pass\n")


def installed_torch(python: str = sys.executable) -> Optional[str]:
    """The version of torch installed for ``python`` outside the build isolation, or None."""
    env = {k: v for k, v in os.environ.items() if k not in _ISOLATION_VARIABLES}
    try:
        out = subprocess.run([python, "-c", _PROBE], env=env, capture_output=True, text=True,
                             timeout=60, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out or None


def torch_requirement() -> str:
    """The torch requirement of the build environment (see the module's docstring)."""
    version = os.environ.get("FGKERNELS_BUILD_TORCH", "").strip() or installed_torch()
    if version:
        # The exact release, local label included: 2.13.0+cpu and 2.13.0 (CUDA) are different
        # binaries, and only the one installed links with the extension at run time.
        return f"torch=={version}"
    print(f"fgkernels: no torch installed for {sys.executable}; building against the newest of "
          f"{DEFAULT_TORCH!r}. Install your torch first, or build with --no-build-isolation.",
          file=sys.stderr)
    return DEFAULT_TORCH


# setuptools' own get_requires_* hooks would run setup.py to find its setup_requires, and
# setup.py imports torch, which is what these hooks are asked for: fgkernels has no
# setup_requires, and pyproject.toml's requires already holds setuptools.


def get_requires_for_build_wheel(config_settings=None) -> list[str]:
    """ninja and the torch to compile against."""
    return [NINJA, torch_requirement()]


def get_requires_for_build_editable(config_settings=None) -> list[str]:
    """As for a wheel."""
    return get_requires_for_build_wheel(config_settings)


def get_requires_for_build_sdist(config_settings=None) -> list[str]:
    """The torch setup.py imports to describe the extension."""
    return [torch_requirement()]
