"""No estimator computes a convolution twice: one training step's convolutions, counted by role
(``benchmarks/conv_roles.py``), hold one primal per convolution layer that runs."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import conv_roles  # noqa: E402


@pytest.mark.parametrize("name", list(conv_roles.CONFIGS))
def test_every_convolution_is_computed_once(name):
    counts, layers = conv_roles.step_roles(conv_roles.CONFIGS[name], batch=2, size=8, width=4)
    assert counts["primal"] == layers
    assert counts["tangent"] <= 2 * layers
    assert counts["backward"] <= layers
