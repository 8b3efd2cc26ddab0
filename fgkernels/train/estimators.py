"""Gradient estimators of docs/method.md, computed with one forward-mode (dual) pass.

For each block j but the last, a *guess* ``g_j`` (a direction in block j's weight space or in its
output's activity space) and a *target* loss give the estimate

    ĝ_j = ⟨∇target, g_j⟩ / ‖g_j‖² · g_j      (random guesses: ⟨∇target, v⟩ · v)

The inner products ``⟨∇target, g_j⟩`` are directional derivatives: one dual pass through the
network carries direction j from block j on (absent before it), so a single pass gives every
block's. Local guesses come from local autograd on one block (its input detached), so memory
stays that of one block; in weight space the block's dual pass then takes its convolutions'
primal outputs from that autograd forward (``reuse_conv_outputs``) instead of computing them
again. In activity space, ĝ_j lives on block j's output and is backpropagated
inside block j only. The last block and the classifier get their exact gradient.
"""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import functional as DF
from ..dual import Dual
from ..nn import reuse_conv_outputs
from ..tangents import clear_tangents, set_tangents
from .models import BlockNet

Tensor = torch.Tensor
TARGETS = ("global", "local", "above")
GUESSES = ("random", "local", "ntk", "fixed-ntk")
SPACES = ("weight", "activity")
NOISES = ("gaussian", "rademacher")


@dataclass
class BlockEstimate:
    """What the estimator did for block j."""

    block: int
    guess: Union[dict[str, Tensor], Tensor, None]  # weight: by parameter name; activity: (N, ...)
    derivative: float                        # ⟨∇target, guess⟩
    scale: float                             # ĝ = scale · guess (backpropagated in activity space)


@dataclass
class Estimates:
    """The gradient estimates by parameter name, and what each block's came from."""

    grads: dict[str, Tensor]
    blocks: list[BlockEstimate] = field(default_factory=list)
    loss: float = float("nan")     # the global loss on this batch
    correct: int = 0               # correctly classified samples of this batch


def check_choices(target: str, guess: str, space: str, noise: str = "gaussian") -> None:
    """Raise ValueError naming the valid choices for any unknown name."""
    for name, value, valid in (("target", target, TARGETS), ("guess", guess, GUESSES),
                               ("space", space, SPACES), ("noise", noise, NOISES)):
        if value not in valid:
            raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(valid)}")


@contextlib.contextmanager
def preserved_buffers(*modules: Optional[nn.Module]) -> Iterator[None]:
    """Run an extra (autograd) pass without touching running statistics: restore every buffer."""
    saved = [(b, b.clone()) for m in modules if m is not None for b in m.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)


def grads_or_zeros(output: Tensor, wrt: list[Tensor],
                   grad_output: Optional[Tensor] = None) -> list[Tensor]:
    """``torch.autograd.grad`` of ``output`` w.r.t. ``wrt``, zeros for what it does not reach."""
    grads = torch.autograd.grad(output, wrt, grad_output, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, wrt)]


def _local_backward(block: Optional[nn.Module], head: nn.Module, h: Tensor, y: Tensor,
                    want_activity: bool = False):
    """Local autograd: ``head(block(h))`` with h detached, cross-entropy against y, backward.
    Returns (block grads, head grads, gradient w.r.t. block's output or None)."""
    params_b = [] if block is None else [p for p in block.parameters() if p.requires_grad]
    params_h = [p for p in head.parameters() if p.requires_grad]
    with torch.enable_grad(), preserved_buffers(block, head):
        a = h.detach() if block is None else block(h.detach())
        if want_activity:
            a = a.detach().requires_grad_()
        loss = F.cross_entropy(head(a), y)
        wrt = params_b + params_h + ([a] if want_activity else [])
        grads = grads_or_zeros(loss, wrt)
    nb = len(params_b)
    return grads[:nb], grads[nb:nb + len(params_h)], (grads[-1] if want_activity else None)


def local_gradients(net: BlockNet, x: Tensor, y: Tensor) -> Estimates:
    """Greedy local learning (the ``local`` baseline): each block and its head learn the
    block's aux loss, the last block and the classifier the network's loss, every block's input
    detached. One forward per block, which also updates the block's running statistics (the
    aux heads' stay untouched, the classifier's update as in backprop)."""
    out, h, J = Estimates(grads={}), x, len(net.blocks)
    for j, (block, head) in enumerate(zip(net.blocks, net.heads)):
        params_b = [p for p in block.parameters() if p.requires_grad]
        params_h = [p for p in head.parameters() if p.requires_grad]
        with torch.enable_grad(), preserved_buffers(head if j < J - 1 else None):
            a = block(h.detach())
            logits = head(a)
            loss = F.cross_entropy(logits, y)
            grads = grads_or_zeros(loss, params_b + params_h)
        out.grads.update(_named(f"blocks.{j}", block, grads[:len(params_b)]))
        out.grads.update(_named(f"heads.{j}", head, grads[len(params_b):]))
        h = a.detach()
    out.loss = float(loss.detach())
    out.correct = int((logits.argmax(1) == y).sum())
    return out


def _activity_guess_and_basis(block: nn.Module, h: Tensor, guess_of) -> tuple[Tensor, list]:
    """Block j's output ``a = block(h)`` under local autograd, the activity guess
    ``g = guess_of(a)``, and ``(∂a/∂θ)ᵀ g``: g backpropagated inside the block only. Done before
    the block's dual pass, so the backward never overlaps the dual activations."""
    params = [p for p in block.parameters() if p.requires_grad]
    with torch.enable_grad(), preserved_buffers(block):
        out = block(h.detach())
        g = guess_of(out.detach())
        return g, grads_or_zeros(out, params, g)


def _keep_nothing(block: nn.Module) -> contextlib.nullcontext:
    return contextlib.nullcontext()


def _noise(shape, like: Tensor, noise: str, generator: Optional[torch.Generator]) -> Tensor:
    if noise == "gaussian":
        return torch.randn(shape, generator=generator, dtype=like.dtype, device=like.device)
    bits = torch.randint(0, 2, shape, generator=generator, device=like.device)
    return (bits * 2 - 1).to(like.dtype)


def _reinitialised(head: nn.Module, generator: Optional[torch.Generator]) -> nn.Module:
    """A copy of ``head`` with fresh parameters (the NTK guess), drawn from ``generator``."""
    fresh = copy.deepcopy(head)
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in fresh.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    return fresh


def _named(module_prefix: str, module: nn.Module, values: list[Tensor]) -> dict[str, Tensor]:
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    return {f"{module_prefix}.{n}": v for n, v in zip(names, values)}


def _directional(loss: Dual, direction: int) -> float:
    """The tangent of a scalar loss for one labelled direction."""
    return float(loss.tangents[loss.directions.index(direction)])


def estimate_gradients(net: BlockNet, x: Tensor, y: Tensor, target: str = "global",
                       guess: str = "local", space: str = "weight",
                       generator: Optional[torch.Generator] = None,
                       noise: str = "gaussian", keep_guesses: bool = False) -> Estimates:
    """Estimate every parameter's gradient with one dual pass (see the module docstring).

    ``target``: ``global`` (the end-to-end loss), ``local`` (block j's aux loss), ``above``
    (block j+1's aux loss). ``guess``: ``random`` (``noise`` gaussian or rademacher),
    ``local`` (gradient of block j's aux loss), ``ntk`` (aux net re-initialised each step),
    ``fixed-ntk`` (aux net never trained: the heads get no gradient). ``space``: ``weight`` or
    ``activity``. Returns the estimates by ``net.named_parameters()`` name; each block's guess
    is kept in ``blocks`` only with ``keep_guesses`` (an activity guess is activation-sized).
    """
    check_choices(target, guess, space, noise)
    J = len(net.blocks)
    train_heads = guess != "fixed-ntk"
    out = Estimates(grads={})
    pending: list[tuple[int, object, float, list, dict]] = []  # (j, guess, ‖g‖², basis, names)
    derivs: dict[int, float] = {}
    # Weight space: a block's dual pass takes its convolutions' primal outputs from the guess's
    # autograd forward. Not in activity space: there the kept outputs would stay alive through
    # the backward of the activity guess, which is that step's memory peak.
    reused_outputs = reuse_conv_outputs if space == "weight" else _keep_nothing
    d = Dual(x)
    for j, block in enumerate(net.blocks):
        h, head = d.primal, net.heads[j]
        if j == J - 1:
            # The last block and the classifier: their exact gradient, by local autograd.
            with reused_outputs(block):
                gb, gh, _ = _local_backward(block, head, h, y)
                d = block(d)
            out.grads.update(_named(f"blocks.{j}", block, gb))
            out.grads.update(_named(f"heads.{j}", head, gh))
            logits = head(d)
            loss = DF.cross_entropy(logits, y)
            out.loss = float(loss.primal)
            out.correct = int((logits.primal.argmax(1) == y).sum())
            for k in range(J - 1):
                if target == "global":
                    derivs[k] = _directional(loss, k)
            if target == "above" and J >= 2:
                derivs[J - 2] = _directional(loss, J - 2)
            break
        guess_head = head if guess != "ntk" else _reinitialised(head, generator)
        names = {n: p for n, p in block.named_parameters() if p.requires_grad}
        if space == "weight":
            with reused_outputs(block):
                if guess == "random":
                    g = {n: _noise(p.shape, p, noise, generator) for n, p in names.items()}
                else:
                    gb, gh, _ = _local_backward(block, guess_head, h, y)
                    g = dict(zip(names, gb))
                    if guess == "local":
                        out.grads.update(_named(f"heads.{j}", head, gh))
                set_tangents(block, g, direction=j)
                try:
                    d = block(d)
                finally:
                    clear_tangents(block)
            norm2 = sum(float((v * v).sum()) for v in g.values())
            pending.append((j, g, norm2, None, names))
        else:
            def guess_of(a: Tensor, j=j, head=head, guess_head=guess_head) -> Tensor:
                if guess == "random":
                    return _noise(a.shape, a, noise, generator)
                _, gh, g = _local_backward(None, guess_head, a, y, want_activity=True)
                if guess == "local":
                    out.grads.update(_named(f"heads.{j}", head, gh))
                return g

            g, basis = _activity_guess_and_basis(block, h, guess_of)
            d = DF.add_direction(block(d), j, g)
            pending.append((j, g if keep_guesses else None, float((g * g).sum()), basis, names))
        if train_heads and guess != "local":
            _, gh, _ = _local_backward(None, head, d.primal, y)
            out.grads.update(_named(f"heads.{j}", head, gh))
        # Local targets: the aux loss of this block (direction j) or of this block for the
        # block before it (direction j−1, "above"); directions no target needs are dropped.
        if target == "local":
            derivs[j] = _directional(DF.cross_entropy(head(d.select([j])), y), j)
            d = d.select([])
        elif target == "above":
            if j >= 1:
                derivs[j - 1] = _directional(DF.cross_entropy(head(d.select([j - 1])), y), j - 1)
            d = d.select([j])
    for j, g, norm2, basis, names in pending:
        deriv = derivs[j]
        scale = deriv if guess == "random" else deriv / (norm2 + torch.finfo(x.dtype).tiny)
        if space == "weight":
            est = {n: scale * v for n, v in g.items()}
        else:
            est = {n: scale * v for n, v in zip(names, basis)}
        out.grads.update({f"blocks.{j}.{n}": v for n, v in est.items()})
        out.blocks.append(BlockEstimate(j, g if keep_guesses else None, deriv, scale))
    return out
