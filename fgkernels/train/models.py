"""Block-split networks for local and forward-gradient training.

A ``BlockNet`` is a chain of blocks, each with an auxiliary head: ``heads[j]`` maps block j's
output to class scores (its local loss), ``heads[-1]`` is the network's own classifier. Every
layer is a Dual layer, so one model serves the dual pass, local backprop and evaluation.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from ..nn.modules import convert

ARCHS = ("resnet18-8b", "resnet18-16b", "cnn")
AUX_NETS = ("cnn", "mlp", "linear")
# The aux nets' hidden width at each arch's default width. The paper's, for ResNet-18: cnn 32
# with 8 blocks and 16 with 16 (about 3 % of the blocks' FLOPs on 32×32 images, under its 10 %
# bound), mlp 1024 / 512. The small CNN on 8×8 digits: its first block reads one channel, so
# the cnn aux net at half the blocks' width would cost 13 % of their FLOPs; a quarter costs 5 %.
AUX_WIDTH = {"resnet18-8b": {"cnn": 32, "mlp": 1024, "linear": 0},
             "resnet18-16b": {"cnn": 16, "mlp": 512, "linear": 0},
             "cnn": {"cnn": 4, "mlp": 32, "linear": 0}}
# The cnn aux net's stride-2 convolutions after block j: the paper's three for the ResNets (on
# 32×32 images). The small CNN's first three blocks give 8, 4 and 4 px maps on 8×8 digits,
# which three would shrink to 1×1 (3×3 convolutions of one pixel) before the net's 2×2 pool: its
# aux nets stop downsampling at 2×2.
AUX_DOWNSAMPLES = {"resnet18-8b": [3] * 7, "resnet18-16b": [3] * 15, "cnn": [2, 1, 1]}


class BlockNet(nn.Module):
    """``blocks[j]`` and its head ``heads[j]``; ``heads[-1]`` classifies the last block's output."""

    def __init__(self, blocks: list[nn.Module], heads: list[nn.Module]):
        super().__init__()
        if len(blocks) != len(heads):
            raise ValueError(f"BlockNet needs one head per block, got {len(blocks)} blocks and "
                             f"{len(heads)} heads")
        self.blocks = nn.ModuleList(blocks)
        self.heads = nn.ModuleList(heads)

    def forward(self, x):
        """The blocks in turn, then the classifier: class scores."""
        for block in self.blocks:
            x = block(x)
        return self.heads[-1](x)

    def block_parameters(self, j: int) -> dict[str, nn.Parameter]:
        """Block j's parameters, keyed by their names in ``self.named_parameters()``."""
        return self.named_in("blocks", j, dict(self.blocks[j].named_parameters()))

    def head_parameters(self, j: int) -> dict[str, nn.Parameter]:
        """Head j's parameters, keyed by their names in ``self.named_parameters()``."""
        return self.named_in("heads", j, dict(self.heads[j].named_parameters()))

    @staticmethod
    def named_in(part: str, j: int, values: dict) -> dict:
        """``values`` keyed by a parameter name of ``blocks[j]`` or ``heads[j]`` (``part``),
        re-keyed by that parameter's name in the whole net."""
        return {f"{part}.{j}.{n}": v for n, v in values.items()}


def conv_bn_relu(cin: int, cout: int, stride: int = 1, kernel: int = 3) -> nn.Sequential:
    """Conv(k×k, no bias) → BN → ReLU: fused on the dual pass."""
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3×3 conv-BN (the first with its ReLU), a 1×1 conv-BN projection
    shortcut when the shape changes, the sum's ReLU. Each conv-BN(-ReLU) is a Sequential, so
    that a converted block runs each as one fused op."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.branch = nn.Sequential(conv_bn_relu(cin, cout, stride),
                                    nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
                                    nn.BatchNorm2d(cout))
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        """relu(branch(x) + shortcut(x))."""
        out = self.branch(x)
        out += self.shortcut(x)  # in place, as torchvision writes it
        return self.relu(out)


def _resnet18_8(in_channels: int, width: int) -> tuple[list[nn.Module], list[int]]:
    """Stem + first basic block, then one basic block each: 8 blocks."""
    widths = [width, width, 2 * width, 2 * width, 4 * width, 4 * width, 8 * width, 8 * width]
    blocks = [nn.Sequential(conv_bn_relu(in_channels, width), BasicBlock(width, width, 1))]
    for j in range(1, 8):
        stride = 2 if widths[j] != widths[j - 1] else 1
        blocks.append(BasicBlock(widths[j - 1], widths[j], stride))
    return blocks, widths


def _resnet18_16(in_channels: int, width: int) -> tuple[list[nn.Module], list[int]]:
    """The no-skip variant: one conv3×3-BN-ReLU per block, stride 2 at blocks 4, 8 and 12."""
    widths = [width * 2 ** (j // 4) for j in range(16)]
    blocks = [conv_bn_relu(in_channels if j == 0 else widths[j - 1], widths[j],
                           2 if j in (4, 8, 12) else 1) for j in range(16)]
    return blocks, widths


def _small_cnn(in_channels: int, width: int) -> tuple[list[nn.Module], list[int]]:
    """Four conv3×3-BN-ReLU blocks, two with stride 2. As in the paper's splits, the last
    block and the classifier get their exact gradient, the three before it their estimates."""
    widths = [width, 2 * width, 2 * width, 2 * width]
    blocks = [conv_bn_relu(in_channels, widths[0]), conv_bn_relu(widths[0], widths[1], 2),
              conv_bn_relu(widths[1], widths[2]), conv_bn_relu(widths[2], widths[3], 2)]
    return blocks, widths


def aux_head(kind: str, channels: int, num_classes: int, width: int,
             downsamples: int = 3) -> nn.Module:
    """An auxiliary net (docs/method.md): ``cnn`` (with ``downsamples`` stride-2
    convolutions), ``mlp`` or ``linear``."""
    if kind == "cnn":
        layers = [*conv_bn_relu(channels, width, kernel=1)]
        for _ in range(downsamples):
            layers += conv_bn_relu(width, width, 2)
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                             nn.Linear(4 * width, num_classes))
    if kind == "mlp":
        layers, cin = [nn.AdaptiveAvgPool2d(2), nn.Flatten()], 4 * channels
        for _ in range(3):
            layers += [nn.Linear(cin, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True)]
            cin = width
        return nn.Sequential(*layers, nn.Linear(width, num_classes))
    if kind == "linear":
        return nn.Sequential(nn.BatchNorm2d(channels), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                             nn.Linear(4 * channels, num_classes))
    raise ValueError(f"unknown aux net {kind!r}; choose one of {', '.join(AUX_NETS)}")


def final_head(channels: int, num_classes: int) -> nn.Module:
    """The classifier: BN → global average pool → linear."""
    return nn.Sequential(nn.BatchNorm2d(channels), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(channels, num_classes))


_BUILDERS = {"resnet18-8b": (_resnet18_8, 64), "resnet18-16b": (_resnet18_16, 64),
             "cnn": (_small_cnn, 16)}


def check_model_args(arch: str, aux: str, aux_width: Optional[int] = None,
                     width: Optional[int] = None) -> None:
    """Raise ValueError naming a bad model argument of ``build_model`` (and the valid
    choices), before anything is built."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if aux not in AUX_NETS:
        raise ValueError(f"unknown aux net {aux!r}; choose one of {', '.join(AUX_NETS)}")
    for name, value in (("width", width), ("aux_width", aux_width)):
        if value is not None:
            _check_positive(name, value)


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def build_model(arch: str, num_classes: int, in_channels: int, aux: str = "cnn",
                aux_width: Optional[int] = None, width: Optional[int] = None) -> BlockNet:
    """A BlockNet of Dual layers: ``arch`` in ARCHS, ``aux`` in AUX_NETS. ``width`` is the first
    stage's channel count (64 for the ResNets, 16 for the small CNN). ``aux_width`` defaults to
    the paper's sizing relative to the blocks (``AUX_WIDTH``), scaled with ``width``."""
    check_model_args(arch, aux, aux_width, width)
    for name, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        _check_positive(name, value)
    build, default_width = _BUILDERS[arch]
    width = width or default_width
    blocks, widths = build(in_channels, width)
    if aux_width is None:
        aux_width = max(4, AUX_WIDTH[arch][aux] * width // default_width)
    heads = [aux_head(aux, widths[j], num_classes, aux_width, AUX_DOWNSAMPLES[arch][j])
             for j in range(len(blocks) - 1)]
    heads.append(final_head(widths[-1], num_classes))
    return convert(BlockNet(blocks, heads))


def aux_flops_share(net: BlockNet, x) -> float:
    """The aux nets' forward FLOPs over the blocks' on input ``x`` (the classifier excluded):
    the paper keeps its aux nets under about a tenth."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    def flops(module, inp):
        with FlopCounterMode(display=False) as counter:
            out = module(inp)
        return counter.get_total_flops(), out

    blocks = aux = 0
    with torch.no_grad():
        for j, block in enumerate(net.blocks):
            f, x = flops(block, x)
            blocks += f
            if j < len(net.blocks) - 1:
                aux += flops(net.heads[j], x)[0]
    return aux / blocks
