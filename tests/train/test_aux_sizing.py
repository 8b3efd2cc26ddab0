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


def _stride2_inputs(net, x):
    """For each aux net: the side of every map its stride-2 convolutions read on input x."""
    sides = []
    with torch.no_grad():
        for j, block in enumerate(net.blocks[:-1]):
            x = block(x)
            seen = []
            hooks = [m.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[-1]))
                     for m in net.heads[j].modules()
                     if isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2)]
            net.heads[j](x)
            for h in hooks:
                h.remove()
            sides.append(seen)
    return sides


def test_cnn_aux_nets_downsample_as_the_paper_or_down_to_the_pool():
    """The ResNets' cnn aux nets have the paper's three stride-2 convolutions; the small CNN's,
    on 8×8 digits, stop at the 2×2 pool size instead of convolving 1×1 maps."""
    for arch in ("resnet18-8b", "resnet18-16b"):
        net = build_model(arch, 10, 3, "cnn", width=4).eval()
        assert all(len(s) == 3 for s in _stride2_inputs(net, torch.randn(1, 3, 32, 32)))
    net = build_model("cnn", 10, 1, "cnn").eval()
    sides = _stride2_inputs(net, torch.randn(1, 1, 8, 8))
    assert sides == [[8, 4], [4], [4]]
