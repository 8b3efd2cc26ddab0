"""One block of a weight-space forward-gradient step, as the trainer runs it: the local guess by
autograd (forward and backward of the block and its aux head), then the block's dual pass with
the guess as its own direction and two earlier directions on its input. ``reuse`` takes the
dual pass's convolution outputs from the guess's forward (``fgkernels.nn.reuse_conv_outputs``);
``recompute`` computes them again. Each ``reuse`` round is paired with a ``recompute`` one."""
import contextlib

import pytest
import torch
import torch.nn.functional as F

import fgkernels
from fgkernels import Dual
from fgkernels.train import build_model

from conftest import DEVICE

BATCHES = (256,) if DEVICE.type == "cuda" else (128,)
BLOCK = 2  # ResNet-18's first 128-channel block: two 3×3 convolutions and a 1×1 shortcut


def _block_step(quick, batch):
    """The block's step as a function of ``reuse``."""
    torch.manual_seed(0)
    width, size, batch = (4, 8, 4) if quick else (64, 32, batch)
    net = build_model("resnet18-8b", 10, 3, width=width).to(DEVICE)
    x = torch.randn(batch, 3, size, size, device=DEVICE)
    y = torch.randint(0, 10, (batch,), device=DEVICE)
    with torch.no_grad():
        h = net.blocks[1](net.blocks[0](x))
    ht = torch.randn(2, *h.shape, device=DEVICE)
    block, head = net.blocks[BLOCK], net.heads[BLOCK]
    names = [n for n, _ in block.named_parameters()]

    def step(reuse: bool):
        keep = fgkernels.nn.reuse_conv_outputs(block) if reuse else contextlib.nullcontext()
        with keep:
            with torch.enable_grad():
                loss = F.cross_entropy(head(block(h)), y)
                guess = torch.autograd.grad(loss, list(block.parameters()))
            fgkernels.set_tangents(block, dict(zip(names, guess)), direction=BLOCK)
            try:
                return block(Dual(h, ht, directions=[0, 1]))
            finally:
                fgkernels.clear_tangents(block)

    return step


@pytest.mark.parametrize("provider", ["reuse", "recompute"])
@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"b{b}")
def test_block_step(measure, quick, provider, batch):
    step = _block_step(quick, batch)
    paired = {"recompute": lambda: step(False)} if provider == "reuse" else None
    measure(lambda: step(provider == "reuse"), f"block step resnet18-8b block {BLOCK} b{batch}",
            rounds=5, paired=paired)
