"""benchmarks/profile_dual_pass.py on the tiny ResNet-18: what it reports holds together, and the
dual pass runs exactly the convolution FLOPs of three convolutions per layer (two in the first,
whose input has no tangent)."""
import pytest
import torch
from profile_dual_pass import profile_resnet18
from torch.utils.flop_counter import FlopCounterMode

from cases import resnet18_case
from conftest import DEVICE


def test_profile_counts_three_convolutions_per_layer():
    r = profile_resnet18(passes=1, device=DEVICE, quick=True)
    model, x, _ = resnet18_case(True, 2, torch.float32, DEVICE)
    first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        first_conv(x)
    first_gflop = counter.get_total_flops() / 1e9
    assert r["fgkernels"]["gflop"] == pytest.approx(3 * r["primal_gflop"] - first_gflop,
                                                   rel=1e-12)
    for provider in ("fgkernels", "forward_ad"):
        p = r[provider]
        assert 0 < p["conv_ms"] <= p["total_ms"], provider
