"""The networks and inputs that the whole-network benchmarks and the profile share."""
from __future__ import annotations

import torch

from fgkernels.train import build_model


def resnet18_case(quick: bool, batch: int, dtype: torch.dtype, device: torch.device):
    """(model, x, y): ResNet-18 (its 8 blocks and the classifier as one Sequential, CIFAR
    shapes) on a random batch; with ``quick``, a width-4 copy on a 2×3×8×8 batch."""
    torch.manual_seed(0)
    width, size, batch = (4, 8, 2) if quick else (64, 32, batch)
    net = build_model("resnet18-8b", 10, 3, aux="linear", width=width).to(device, dtype)
    model = torch.nn.Sequential(*net.blocks, net.heads[-1])
    x = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
    y = torch.randint(0, 10, (batch,), device=device)
    return model, x, y
