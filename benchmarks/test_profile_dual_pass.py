"""benchmarks/profile_dual_pass.py on the tiny ResNet-18: what it reports holds together, and the
dual pass runs exactly the convolution FLOPs of three convolutions per layer (two in the first,
whose input has no tangent)."""
import pytest
import torch
from profile_dual_pass import profile_resnet18
from torch.utils.flop_counter import FlopCounterMode

from cases import resnet18_case
from conftest import DEVICE
from providers import products_share


def test_profile_counts_three_convolutions_per_layer():
    r = profile_resnet18(passes=1, device=DEVICE, quick=True)
    model, x, _ = resnet18_case(True, 2, torch.float32, DEVICE)
    first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        first_conv(x)
    first_gflop = counter.get_total_flops() / 1e9
    assert r["fgkernels"]["gflop"] == pytest.approx(3 * r["primal_gflop"] - first_gflop,
                                                   rel=1e-12)
    for provider in ("fgkernels", "forward_ad", "backprop"):
        p = r[provider]
        assert 0 < p["conv_ms"] <= p["total_ms"], provider
    # A backprop step's convolutions are each layer's forward and its backward (the input's
    # and the weight's gradients in one op; the first layer's input needs none).
    layers = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    assert r["backprop"]["conv_calls"] == 2 * layers


def test_products_share_counts_each_product_once():
    """A pass of nothing but convolutions and products spends at most all its time in them
    (each counted once, not again inside the op that wraps it: aten::_convolution around
    oneDNN's), a pass without any none of it."""
    x, w = torch.randn(8, 16, 32, 32, device=DEVICE), torch.randn(16, 16, 3, 3, device=DEVICE)
    a = torch.randn(256, 256, device=DEVICE)
    products = lambda: (torch.nn.functional.conv2d(x, w, padding=1), a @ a, torch.addmm(a, a, a))
    products()
    assert 0 < products_share(products) <= 1
    assert products_share(lambda: (x.relu(), x * 2 + 1)) == 0
