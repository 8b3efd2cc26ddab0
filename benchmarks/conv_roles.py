"""The convolutions of one training step, counted by role, beside the count the method needs.

    python benchmarks/conv_roles.py [--batch 8] [--size 16] [--width 8]

Roles, read from the profiler's record of ATen's convolution calls:
- primal: a convolution computing an activation (a plain or autograd forward, or the first
  convolution of a fused dual op, which computes y);
- tangent: the dual ops' other convolutions (the parameter terms ``Ẇ*x`` and the input terms
  ``W*ẋ``, every slot of each in one call);
- backward: ``convolution_backward`` (autograd's, in a local backward or in backprop; one that
  ``fgkernels.train.lean_autograd`` computes in two calls counts once).
Beside the counts, the tangent calls' work: their FLOPs over the primal calls' (a call carries
every slot of its term, so the calls alone do not show how many directions travel).

What the method needs: every convolution layer that runs, once as a primal (backprop: the
blocks and the classifier; a forward-gradient step: the aux heads too, whose local autograd
gives the guesses, the head gradients and the local targets), with the dual pass taking the
primal outputs of the local autograd forward before it; at most two tangent calls per layer
in the dual pass (the parameter term where the parameters carry a tangent, the input term where
the input does); a backward per layer that local autograd differentiates. A primal count above
the layers that run means a convolution computed twice.
"""
from __future__ import annotations

import argparse
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile

from fgkernels.train import build_model
from fgkernels.train.loop import TrainConfig, compute_gradients

CONFIGS = {
    "backprop": TrainConfig(algo="backprop"),
    "fg local guess, weight space": TrainConfig(algo="fg", guess="local", space="weight"),
    "fg local guess, activity space": TrainConfig(algo="fg", guess="local", space="activity"),
    "fg random guess, weight space": TrainConfig(algo="fg", guess="random", space="weight"),
    "fg local guess, local target": TrainConfig(algo="fg", guess="local", space="weight",
                                                target="local"),
}
_DUAL_OPS = ("fgkernels::dual_conv2d", "fgkernels::dual_conv2d_tangents")


def _role(event, first_in_op: set) -> str:
    """The role of an ``aten::convolution`` event (see the module docstring)."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name == "aten::convolution_backward":
            return "inside backward"
        if parent.name in _DUAL_OPS:
            # dual_conv2d computes y first; dual_conv2d_tangents has the primal already.
            if parent.name == "fgkernels::dual_conv2d" and id(parent) not in first_in_op:
                first_in_op.add(id(parent))
                return "primal"
            return "tangent"
        parent = parent.cpu_parent
    return "primal"


def _inside(event, name: str) -> bool:
    """Whether ``event`` runs inside an op called ``name``: the same call, passed on by a
    dispatch mode (``fgkernels.train.lean_autograd``'s), or one of the op's own steps."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name == name:
            return True
        parent = parent.cpu_parent
    return False


def count_roles(fn) -> Counter:
    """The convolutions ``fn()`` runs, by role: {"primal", "tangent", "backward"}, and the
    FLOPs of the primal and tangent ones ({"primal flops", "tangent flops"})."""
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        fn()
    counts, first_in_op = Counter(), set()
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        if event.name == "aten::convolution" and not _inside(event, "aten::convolution"):
            role = _role(event, first_in_op)
            counts[role] += 1
            parent = event.cpu_parent  # the profiler counts FLOPs on aten::conv2d
            counts[f"{role} flops"] += parent.flops if parent is not None else 0
        elif event.name == "aten::convolution_backward" and \
                not _inside(event, "aten::convolution_backward"):
            counts["backward"] += 1
    counts.pop("inside backward", None)
    counts.pop("inside backward flops", None)
    return counts


def step_roles(config: TrainConfig, batch: int = 8, size: int = 16,
               width: int = 8) -> tuple[Counter, int]:
    """One training step of ResNet-18 in 8 blocks under ``config``: its convolutions by role,
    and the number of convolution layers the step runs (backprop: the blocks and the
    classifier; forward gradients: the aux heads too)."""
    torch.manual_seed(0)
    net = build_model("resnet18-8b", 10, 3, width=width)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    gen = torch.Generator().manual_seed(0)
    compute_gradients(net, x, y, config, gen)  # warm-up
    modules = net.modules() if config.algo == "fg" else \
        [*net.blocks.modules(), *net.heads[-1].modules()]
    layers = sum(isinstance(m, torch.nn.Conv2d) for m in modules)
    return count_roles(lambda: compute_gradients(net, x, y, config, gen)), layers


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--width", type=int, default=8)
    args = parser.parse_args(argv)
    print("| step | conv layers run | primal | tangent | backward | tangent FLOPs / primal |")
    print("|---|---|---|---|---|---|")
    for name, config in CONFIGS.items():
        counts, layers = step_roles(config, args.batch, args.size, args.width)
        print(f"| {name} | {layers} | {counts['primal']} | {counts['tangent']} "
              f"| {counts['backward']} | {counts['tangent flops'] / counts['primal flops']:.2f} |")


if __name__ == "__main__":
    main()
