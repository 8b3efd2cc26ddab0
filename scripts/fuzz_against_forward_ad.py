"""Random Conv/BN/ReLU/pool/linear networks: the dual pass against torch.autograd.forward_ad.

    python scripts/fuzz_against_forward_ad.py --cases 300 [--backend native] [--seed 0]

Draws networks with random layer options (kernel, stride, padding incl. 'same', dilation,
groups, bias, affine, momentum, train/eval, max/avg pooling), random input sizes, layouts and
numbers of tangents, and compares primal and tangents with forward-mode AD in float64: a float64
case within 1e-8 of the output's scale, a float32 case within 2x torch's own float32 error plus
1e-4. Prints the worst errors and every case over its bound; exits 1 on a failure.
"""
from __future__ import annotations

import argparse
import copy
import random
import sys
from contextlib import nullcontext
from typing import Optional

import torch
from torch import nn
from torch.func import functional_call

import fgkernels
from fgkernels import Dual
from fgkernels.testing import forward_ad_jvp, reads_padding_only


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
    """True if some ReLU input sits within x's rounding of 0 (after a batch norm, an exact 0 too):
    there the derivative is undefined and correct implementations may differ. Judged on the
    exact (float64) run and on the run in x's dtype: either one's rounding may put a value that
    the other has near 0 on its other side (a batch norm over a near-constant channel amplifies
    rounding by 1/sqrt(eps))."""
    eps = torch.finfo(x.dtype).eps
    flags = []

    def check(after_bn):
        def hook(module, inputs, output):
            v = inputs[0].detach()
            tiny = v.abs() < 64 * eps * v.abs().max().clamp_min(1.0)
            flags.append(bool((tiny & ((v != 0) | after_bn)).any()))
        return hook

    for dtype in {torch.float64, x.dtype}:
        run = copy.deepcopy(twin).to(dtype)
        layers = list(run)
        hooks = [m.register_forward_hook(check(i > 0 and isinstance(layers[i - 1],
                                                                     nn.BatchNorm2d)))
                 for i, m in enumerate(layers) if isinstance(m, nn.ReLU)]
        with torch.no_grad():
            run(x.to(dtype))
        for h in hooks:
            h.remove()
    return any(flags)


def case(rng: random.Random, dtype: torch.dtype,
         limit: float) -> Optional[tuple[float, float]]:
    """The worst relative error of one random case against forward_ad in float64, and the bound
    it must keep (None: at a ReLU kink, skipped)."""
    cin, n = rng.randint(1, 4), rng.randint(1, 4)
    h, w = rng.randint(5, 16), rng.randint(5, 16)
    while True:  # draw until the layers fit the input size
        twin = random_net(rng, cin).to(dtype)
        sizes: list[int] = []  # values per channel that each batch norm normalises over

        widths: list[tuple[nn.Conv2d, int]] = []  # each convolution's input width

        def record(module, inputs, output, sizes=sizes):
            sizes.append(inputs[0].numel() // inputs[0].shape[1])

        def record_width(module, inputs, output, widths=widths):
            widths.append((module, inputs[0].shape[-1]))

        hooks = [m.register_forward_hook(record) for m in twin if isinstance(m, nn.BatchNorm2d)]
        hooks += [m.register_forward_hook(record_width) for m in twin if isinstance(m, nn.Conv2d)]
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
        # torch's oneDNN convolution crashes on a width it reads padding only of
        # (fgkernels.testing.reads_padding_only): such nets are drawn anew
        if min(sizes, default=16) >= 16 and not any(
                isinstance(m.padding, tuple) and reads_padding_only(
                    w_in, m.kernel_size[1], m.stride[1], m.padding[1], m.dilation[1])
                for m, w_in in widths):
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
    stack = lambda t: None if t is None else (t if T else t.unsqueeze(0))
    x_tangents = None if xt is None else xt[: T or 1]
    exact = forward_ad_of(twin, x, x_tangents, tangents, stack, torch.float64)
    worst = relative_error(out.primal, out.tangents, exact, T)
    if dtype == torch.float64:
        return worst, limit
    # Lower precision: the bound is torch's own error against the float64 answer, doubled, plus
    # the limit: a batch norm over a near-constant channel amplifies rounding by 1/sqrt(eps),
    # and there torch's float32 answer is no closer to the exact one than a kernel's.
    theirs = forward_ad_of(twin, x, x_tangents, tangents, stack, dtype)
    return worst, 2 * relative_error(theirs[0], theirs[1], exact, T) + limit


def forward_ad_of(twin: nn.Sequential, x: torch.Tensor, x_tangents: Optional[torch.Tensor],
                  tangents: dict, stack, dtype: torch.dtype):
    """Primal and stacked tangents of ``twin`` at ``x`` by forward_ad, every tensor in ``dtype``
    (a copy of twin per slot: each slot's call updates running statistics of its own)."""
    twin = copy.deepcopy(twin).to(dtype)
    names = [k for k, _ in twin.named_parameters()]
    params = [p.detach() for _, p in twin.named_parameters()]
    call = lambda x_, *ps: functional_call(copy.deepcopy(twin), dict(zip(names, ps)), (x_,))
    cast = lambda t: None if t is None else t.to(dtype)
    return forward_ad_jvp(call, [x.to(dtype), *params],
                          [cast(x_tangents), *[cast(stack(tangents[k])) for k in names]])


def relative_error(primal: torch.Tensor, tangents: torch.Tensor, exact, T) -> float:
    """The worst error of a primal and its tangents against ``exact`` (primal, stacked tangents),
    relative to the exact output's scale, floored: a tangent that ReLUs have zeroed almost
    everywhere is compared absolutely."""
    (rp, rts), worst = exact, 0.0
    err = lambda got, want: ((got.double() - want).abs().max().item()
                             / max(want.abs().max().item(), 1e-3))
    for t in range(T or 1):
        worst = max(worst, err(tangents[t], rts[t]), err(primal, rp))
    return worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", choices=fgkernels.available_backends())
    args = parser.parse_args()
    if args.cases < 1:
        parser.error(f"--cases must be at least 1, got {args.cases}")
    limits = {torch.float64: 1e-8, torch.float32: 1e-4}
    failures = 0
    for dtype, limit in limits.items():
        rng = random.Random(args.seed)
        torch.manual_seed(args.seed)
        results = []
        for index in range(args.cases):
            with fgkernels.use_backend(args.backend) if args.backend else nullcontext():
                result = case(rng, dtype, limit)
            results.append(result)
            if result is not None and result[0] > result[1]:
                print(f"{dtype} case {index}: relative error {result[0]:.2e} over its bound "
                      f"{result[1]:.2e}")
        done = [r for r in results if r is not None]
        bad = sum(err > bound for err, bound in done)
        failures += bad
        worst = f"{max(err for err, _ in done):.2e}" if done else "-"
        print(f"{dtype}: {args.cases} cases ({args.cases - len(done)} skipped at a ReLU kink), "
              f"worst relative error {worst} (limit {limit:.0e}), {bad} over the bound")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
