"""A dual pass makes no tensor from host data once warm: each would be a copy from the host on a
GPU, which waits for the queue and which a CUDA graph cannot capture. Seen as ``aten.lift_fresh``
under a dispatch mode (a Python number or list turned into a tensor), on every backend."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import fgkernels
from fgkernels import Dual

from helpers import BACKENDS


class _HostData(TorchDispatchMode):
    """Records the ops that make a tensor from host data."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.lift_fresh.default:
            self.seen.append(func)
        return func(*args, **(kwargs or {}))


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, stride=2, padding=1, bias=False),
                         nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("input_tangent", [False, True], ids=["params", "params+input"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_warm_dual_pass_makes_no_tensor_from_host_data(backend, input_tangent, training):
    net = fgkernels.convert(_net()).train(training)
    fgkernels.random_tangents(net, num_tangents=2)
    x = torch.randn(2, 3, 6, 6)
    y = torch.tensor([0, 2])
    dual = Dual(x, torch.randn(2, *x.shape)) if input_tangent else Dual(x)

    def loss():
        return F.cross_entropy(net(dual), y)

    with fgkernels.use_backend(backend):
        loss()  # warm: caches of index tensors filled
        with _HostData() as mode:
            loss()
    assert not mode.seen, f"{len(mode.seen)} tensors made from host data in a warm pass"


def test_warm_select_directions_makes_no_tensor_from_host_data():
    """Keeping scattered directions (the trainer's targets do) indexes the slots with a cached
    index tensor."""
    d = Dual(torch.randn(2, 3), torch.randn(3, 2, 3), directions=[0, 1, 2])
    d.select_directions([0, 2])  # warm
    with _HostData() as mode:
        kept = d.select_directions([0, 2])
    assert not mode.seen
    assert kept.directions == (0, 2)
    assert torch.equal(kept.tangents, d.tangents[[0, 2]])
