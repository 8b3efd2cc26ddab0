"""The aux nets are sized as the paper sizes them relative to the blocks: by default their
forward FLOPs stay under 10 % of the blocks' at the image size of each arch's data (8×8 digits
for the small CNN, 32×32 CIFAR for the ResNets)."""
import pytest
import torch

from fgkernels.train.models import ARCHS, aux_flops_share, build_model

IMAGE = {"cnn": (1, 8), "resnet18-8b": (3, 32), "resnet18-16b": (3, 32)}


@pytest.mark.parametrize("aux", ["cnn", "mlp"])
@pytest.mark.parametrize("arch", ARCHS)
def test_default_aux_nets_cost_under_a_tenth_of_the_blocks(arch, aux):
    channels, size = IMAGE[arch]
    net = build_model(arch, 10, channels, aux).eval()
    share = aux_flops_share(net, torch.randn(1, channels, size, size))
    assert 0 < share < 0.10, f"{arch} with {aux} aux nets: {share:.1%} of the blocks' FLOPs"


def test_the_demo_nets_aux_share():
    """The demo's network (the small CNN at width 32) keeps its aux nets at about 5 %."""
    net = build_model("cnn", 10, 1, "cnn", width=32).eval()
    assert aux_flops_share(net, torch.randn(1, 1, 8, 8)) < 0.10
