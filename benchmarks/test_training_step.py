"""Training-step benchmarks: a forward-gradient step (local guess, global target, ResNet-18 in
8 blocks; weight and activity space) against a backprop step, with peak memory. Besides the
backprop benchmark of its own, every forward-gradient round is paired with a backprop step run
just before it, for a ratio that machine drift does not move."""
import pytest
import torch

from fgkernels.train import build_model
from fgkernels.train.loop import TrainConfig, compute_gradients

from conftest import DEVICE

BATCHES = (256,) if DEVICE.type == "cuda" else (128,)
ALGOS = {"backprop": TrainConfig(algo="backprop"),
         "fg-local-weight": TrainConfig(algo="fg", guess="local", space="weight"),
         "fg-local-activity": TrainConfig(algo="fg", guess="local", space="activity")}


@pytest.mark.parametrize("algo", list(ALGOS))
@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"b{b}")
def test_training_step(measure, quick, algo, batch):
    torch.manual_seed(0)
    width, size, batch = (4, 8, 4) if quick else (64, 32, batch)
    net = build_model("resnet18-8b", 10, 3, width=width).to(DEVICE)
    x = torch.randn(batch, 3, size, size, device=DEVICE)
    y = torch.randint(0, 10, (batch,), device=DEVICE)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    step = lambda config: compute_gradients(net, x, y, config, gen)
    # Each forward-gradient round also follows a backprop step of its own (see measure).
    paired = None if algo == "backprop" else {"backprop": lambda: step(ALGOS["backprop"])}
    measure(lambda: step(ALGOS[algo]), f"training step resnet18-8b b{batch}", rounds=3,
            paired=paired)
