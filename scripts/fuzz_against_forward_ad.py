"""Random Conv/BN/ReLU/pool/linear networks: the dual pass against torch.autograd.forward_ad.

    python scripts/fuzz_against_forward_ad.py --cases 300 [--backend native] [--seed 0]

Draws networks with random layer options (kernel, stride, padding incl. 'same', dilation,
groups, bias, affine, momentum, train/eval, max/avg pooling), random input sizes, layouts and
numbers of tangents, and compares primal and tangents with forward-mode AD in float64 (relative
1e-8) and float32 (relative 1e-4 of the output's scale). Prints the worst errors; exits 1 on a
failure.
"""
from __future__ import annotations

import argparse
import copy
import random
import sys
from typing import Optional

import torch
from torch import nn
from torch.func import functional_call

import fgkernels
from fgkernels import Dual
from fgkernels.testing import forward_ad_jvp


def random_net(rng: random.Random, cin: int) -> nn.Sequential:
    layers, c = [], cin
    for _ in range(rng.randint(1, 4)):
        groups = rng.choice([g for g in (1, 2, 3) if c % g == 0])
        cout = groups * rng.randint(1, 4)
        k = rng.choice([1, 2, 3])
        dilation = rng.choice([1, 2]) if k > 1 else 1
        if rng.random() < 0.3:
            stride, padding = 1, "same"
        else:
            stride, padding = rng.choice([1, 2]), rng.randint(0, k // 2 * dilation)
        layers.append(nn.Conv2d(c, cout, k, stride, padding, dilation, groups,
                                bias=rng.random() < 0.5))
        c = cout
        if rng.random() < 0.8:
            layers.append(nn.BatchNorm2d(c, affine=rng.random() < 0.8,
                                         momentum=rng.choice([0.1, None])))
        if rng.random() < 0.8:
            layers.append(nn.ReLU())
        if rng.random() < 0.2:
            layers.append(rng.choice([nn.MaxPool2d(2, ceil_mode=True), nn.AvgPool2d(2, 1)]))
    layers += [nn.AdaptiveAvgPool2d(rng.choice([1, 2])), nn.Flatten()]
    return nn.Sequential(*layers)


def at_kink(twin: nn.Sequential, x: torch.Tensor) -> bool:
    """True if some ReLU input sits within rounding of 0 (after a batch norm, an exact 0 too):
    there the derivative is undefined and correct implementations may differ."""
    flags = []

    def check(after_bn):
        def hook(module, inputs, output):
            v = inputs[0].detach()
            tiny = v.abs() < 64 * torch.finfo(v.dtype).eps * v.abs().max().clamp_min(1.0)
            flags.append(bool((tiny & ((v != 0) | after_bn)).any()))
        return hook

    layers = list(twin)
    hooks = [m.register_forward_hook(check(i > 0 and isinstance(layers[i - 1], nn.BatchNorm2d)))
             for i, m in enumerate(layers) if isinstance(m, nn.ReLU)]
    with torch.no_grad():
        copy.deepcopy(twin)(x)
    for h in hooks:
        h.remove()
    return any(flags)


def case(rng: random.Random, dtype: torch.dtype) -> Optional[float]:
    """The worst relative error of one random case (None: at a ReLU kink, skipped)."""
    cin, n = rng.randint(1, 4), rng.randint(1, 4)
    h, w = rng.randint(5, 16), rng.randint(5, 16)
    while True:  # draw until the layers fit the input size
        twin = random_net(rng, cin).to(dtype)
        sizes: list[int] = []  # values per channel that each batch norm normalises over

        def record(module, inputs, output, sizes=sizes):
            sizes.append(inputs[0].numel() // inputs[0].shape[1])

        hooks = [m.register_forward_hook(record) for m in twin if isinstance(m, nn.BatchNorm2d)]
        try:
            with torch.no_grad():  # eval: the probe leaves the running statistics alone
                probe = twin.eval()(torch.zeros(2, cin, h, w, dtype=dtype))
        except RuntimeError:
            continue
        finally:
            for hook in hooks:
                hook.remove()
        twin.train()
        # A batch norm over a handful of values puts outputs within rounding of ReLU's kink,
        # where any two correct implementations may disagree on the derivative: keep >= 16.
        if min(sizes, default=16) >= 16:
            break
    twin.append(nn.Linear(probe.shape[1], 3).to(dtype))
    if rng.random() < 0.3:
        twin.eval()
    dual = fgkernels.convert(copy.deepcopy(twin))
    x = torch.randn(max(n, 2), cin, h, w, dtype=dtype)
    if rng.random() < 0.3:
        x = x.to(memory_format=torch.channels_last)
    T = rng.choice([None, 1, 3])
    xt = torch.randn((T or 1, *x.shape), dtype=dtype) if rng.random() < 0.7 else None
    tangents = fgkernels.random_tangents(dual, T)
    if at_kink(twin, x):
        return None
    out = dual(Dual(x, None if xt is None else (xt if T else xt[0])))
    names = [k for k, _ in twin.named_parameters()]
    params = [p.detach() for _, p in twin.named_parameters()]
    stack = lambda t: None if t is None else (t if T else t.unsqueeze(0))
    # A fresh copy per slot: each slot's call updates the running statistics of its own.
    call = lambda x_, *ps: functional_call(copy.deepcopy(twin), dict(zip(names, ps)), (x_,))
    rp, rts = forward_ad_jvp(call, [x, *params],
                             [None if xt is None else xt[: T or 1],
                              *[stack(tangents[k]) for k in names]])
    worst = 0.0
    for t in range(T or 1):
        got, rt = out.tangents[t], rts[t]
        # Relative to the output's scale, floored: a tangent that ReLUs have zeroed almost
        # everywhere is compared absolutely.
        scale = max(rt.abs().max().item(), 1e-3)
        worst = max(worst, (got - rt).abs().max().item() / scale,
                    (out.primal - rp).abs().max().item() / max(rp.abs().max().item(), 1e-3))
    return worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", choices=fgkernels.available_backends())
    args = parser.parse_args()
    limits = {torch.float64: 1e-8, torch.float32: 1e-4}
    failures = 0
    for dtype, limit in limits.items():
        rng = random.Random(args.seed)
        torch.manual_seed(args.seed)
        errors = []
        for _ in range(args.cases):
            if args.backend:
                with fgkernels.use_backend(args.backend):
                    errors.append(case(rng, dtype))
            else:
                errors.append(case(rng, dtype))
        bad = sum(e is not None and e > limit for e in errors)
        skipped = sum(e is None for e in errors)
        failures += bad
        print(f"{dtype}: {args.cases} cases ({skipped} skipped at a ReLU kink), worst relative "
              f"error {max(e for e in errors if e is not None):.2e} (limit {limit:.0e}), "
              f"{bad} over the limit")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
