"""What a training step of each configuration costs, measured side by side.

Every configuration gets a network of its own and the same batch; after warm-up steps (the
allocator, oneDNN's primitive caches), the configurations take one step each in turn, round
after round, so that a machine whose speed drifts over minutes moves them all alike. A step is
``compute_gradients`` and the optimizer step, as in training; its time is the median over the
rounds, its peak memory the allocator's over one more, untimed, step.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from .data import Dataset, train_batches
from .loop import TrainConfig, build_run, compute_gradients, sgd_step
from .memory import PeakMemory


@dataclass
class StepCost:
    """The median step time (seconds) and the peak memory (bytes) of one configuration."""

    step_time_s: float
    peak_memory_bytes: int


def measure_step_costs(configs: list[TrainConfig], dataset: Dataset, warmup: int = 3,
                       rounds: int = 15) -> list[StepCost]:
    """The cost of a step of each of ``configs``, in their order (see the module docstring)."""
    if warmup < 0 or rounds < 1:
        raise ValueError(f"need warmup >= 0 and rounds >= 1, got {warmup} and {rounds}")
    runs = []
    for cfg in configs:
        cfg.validate()
        net, opt, _ = build_run(cfg, dataset)
        device = torch.device(cfg.device)
        gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
        x, y = next(iter(train_batches(dataset, cfg.batch_size, gen)))
        guesses = torch.Generator(device=device).manual_seed(cfg.seed + 1)
        runs.append((cfg, net, opt, cfg.as_input(x, device), y.to(device), guesses, device))

    def step(run) -> float:
        cfg, net, opt, x, y, guesses, device = run
        start = time.perf_counter()
        grads = compute_gradients(net, x, y, cfg, guesses)[0]
        sgd_step(net, opt, grads)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    for _ in range(warmup):
        for run in runs:
            step(run)
    times = [[] for _ in runs]
    for _ in range(rounds):
        for i, run in enumerate(runs):
            times[i].append(step(run))
    costs = []
    for run, t in zip(runs, times):
        with PeakMemory(run[-1]) as mem:
            step(run)
        costs.append(StepCost(statistics.median(t), mem.peak_bytes))
    return costs
