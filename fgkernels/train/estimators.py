"""Gradient estimators of docs/method.md, computed with one forward-mode (dual) pass.

For each block j but the last, a *guess* ``g_j`` (a direction in block j's weight space or in its
output's activity space) and a *target* loss give the estimate

    ĝ_j = ⟨∇target, g_j⟩ / ‖g_j‖² · g_j      (random guesses: ⟨∇target, v⟩ · v)

The inner products ``⟨∇target, g_j⟩`` are directional derivatives: one dual pass through the
network carries direction j from block j on (absent before it), so a single pass gives every
block's. Local guesses come from local autograd on one block (its input detached), so memory
stays that of one block; the block's dual pass then takes its convolutions' primal outputs from
that autograd forward (``reuse_conv_outputs``) instead of computing them again, in both spaces,
and so does a head's dual pass for a local target (a global target keeps no head output):
no convolution is computed twice. In activity space, ĝ_j lives on block j's output and is
backpropagated inside block j only, and a block no direction reaches is not run again. The last
block and the classifier get their exact gradient by local autograd, and that backward, taken
to the block's input h, gives the global loss's derivative along every direction arriving
there (``⟨∂L/∂h, ḣ⟩``): no direction is carried through the last block.

Every local pass runs lean (``lean_autograd``): its forward saves a batch norm's ReLU output
as the batch norm's input, and its backward splits a CPU convolution's backward in two and
computes batch norm's without a spare buffer, for a lower memory peak; an activity-space
backward also lets go of the block's output as it goes when the dual pass computes it again.

Inside a ``fgkernels.tangent_dtype`` block the guesses enter the dual pass in that dtype (a
bfloat16 tangent of a float32 network): each guess is rounded to it once, and the estimate's
basis is the rounded guess, so the derivative measured is along exactly the basis. With
bfloat16 a weight-space guess is also computed in it: its block's local backward
differentiates the block's convolutions in bfloat16 (those of the head, whose gradient trains
the head, and every exact gradient stay in the network's dtype). Which direction is measured
changes with the guess's precision; the estimate along it stays exact.
"""
from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from .. import functional as DF
from ..dual.precision import resolve_tangent_dtype
from ..dual.tangents import clear_tangents, set_tangents
from ..dual.value import Dual
from ..nn.modules import DualModule, reuse_conv_outputs
from .lean_autograd import LeanBackward, relu_outputs_recomputed
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


def check_batch(x, y) -> None:
    """Raise naming the problem unless ``x`` is a batch of N inputs and ``y`` its N class
    indices (an int64 tensor of shape (N,) on x's device), before a step changes anything.
    (A class index out of range is found by the first loss, as in a plain training step.)"""
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise TypeError(f"expected a batch of inputs (a tensor of shape (N, ...)), got "
                        f"{type(x).__name__ if not isinstance(x, Tensor) else tuple(x.shape)}")
    if not isinstance(y, Tensor) or isinstance(y, Dual):
        raise TypeError(f"labels must be a tensor of class indices, got {type(y).__name__}")
    if y.dtype != torch.long or y.shape != x.shape[:1] or y.device != x.device:
        raise ValueError(f"labels must be int64 class indices of shape ({x.shape[0]},) on "
                         f"{x.device}, one per input, got {y.dtype} of shape {tuple(y.shape)} "
                         f"on {y.device}")


def check_parameters_unshared(net: BlockNet) -> None:
    """Raise naming a trainable parameter that two blocks or heads hold (one module used as two
    blocks, a head tied to a block): each block's estimate and each head's gradient is of its
    own parameters, and ``net.named_parameters()`` lists a shared one once, under one name."""
    first_name: dict[int, str] = {}
    for name, p in net.named_parameters(remove_duplicate=False):
        first = first_name.setdefault(id(p), name)
        if p.requires_grad and first.split(".")[:2] != name.split(".")[:2]:
            raise ValueError(f"parameter {name!r} is {first!r}: a parameter of two blocks or "
                             f"heads is not supported (each block's estimate and each head's "
                             f"gradient is of its own parameters); give each its own")


@contextlib.contextmanager
def preserved_buffers(*modules: Optional[nn.Module]) -> Iterator[None]:
    """Run an extra (autograd) pass without touching running statistics. A batch norm whose
    forward is torch's, in training, stops tracking them for the pass (it normalises by the
    batch's statistics either way, and then writes none; in eval it writes none anyway); every
    other buffer is saved and put back. (Saving and restoring the batch norms' statistics too
    cost each local backward of a small net a few dozen tiny copies.)"""
    tracking, saved, seen = [], [], set()
    for m in (m for root in modules if root is not None for m in root.modules()):
        if id(m) in seen:
            continue
        seen.add(id(m))
        untouched = ()
        if _batch_norm_forward_is_torchs(type(m)):
            untouched = _RUNNING_STATS
            if m.training and m.track_running_stats:
                tracking.append(m)
        saved.extend((b, b.clone()) for name, b in m._buffers.items()
                     if b is not None and name not in untouched)
    for m in tracking:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in tracking:
            m.track_running_stats = True
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)


_RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")
_TORCH_BATCH_NORM_FORWARDS = (nn.modules.batchnorm._BatchNorm.forward, nn.SyncBatchNorm.forward)


@functools.cache
def _batch_norm_forward_is_torchs(cls: type) -> bool:
    """True for a batch-norm class whose plain forward is torch's own (a twin's included),
    which writes its running statistics only while ``track_running_stats`` is set."""
    if not issubclass(cls, nn.modules.batchnorm._BatchNorm):
        return False
    forward = next(c.__dict__["forward"] for c in cls.__mro__
                   if "forward" in c.__dict__ and not issubclass(c, DualModule))
    return forward in _TORCH_BATCH_NORM_FORWARDS


def grads_or_zeros(output: Union[Tensor, GradientEdge], wrt: list[Tensor],
                   grad_output: Optional[Tensor] = None, reduced_weights: Sequence[Tensor] = (),
                   reduced_dtype: Optional[torch.dtype] = None) -> list[Tensor]:
    """``torch.autograd.grad`` of ``output`` (a tensor, or the gradient edge of one nothing
    holds any more) w.r.t. ``wrt``, zeros for what it does not reach, under ``LeanBackward``
    (the same gradients, less memory held at once; the convolutions of ``reduced_weights``
    differentiated in ``reduced_dtype`` where one is given). Nothing to differentiate (a
    block with no trainable parameter): no gradient."""
    if not wrt:
        return []
    with LeanBackward(reduced_weights, reduced_dtype):
        grads = torch.autograd.grad(output, wrt, grad_output, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, wrt)]


def _writable(x: Tensor) -> Tensor:
    """``x`` for a module's autograd forward that may write into its input (a first op in
    place, ``nn.LeakyReLU(inplace=True)``) while ``x`` is the pass's own (the dual pass's
    primal, the activation going on): a copy-on-write clone, which passes the gradient on to
    ``x``. Its memory is copied only when written, or read by a kernel that asks for it
    writable (torch's float64 1×1 convolution on the CPU): at most one activation, as a clone.
    Memory torch cannot share copy-on-write (a NumPy array's, a custom deleter's) is copied."""
    try:
        return torch._lazy_clone(x)
    except RuntimeError:
        return x.clone()


def _own_dual(d: Dual) -> Dual:
    """A Dual object of its own over ``d``'s tensors, for a module's dual pass after which ``d``
    goes on: an in-place op rebinds the Dual it is given to its result (writing into no
    tensor of one that has no views), so a first op in place leaves ``d`` as it was. (The
    dual ops ask for their inputs' memory writable: a copy-on-write clone would be copied.)"""
    return Dual(d.primal, d.tangents, directions=d.directions)


class _LocalGrads(NamedTuple):
    """What a local backward gives: gradients of the cross-entropy of ``head(block(h))``."""

    block: list[Tensor]         # by block j's trainable parameters
    head: list[Tensor]          # by its head's
    activity: Optional[Tensor]  # w.r.t. the block's output (``want_activity``)
    input: Optional[Tensor]     # w.r.t. h (``want_input``)
    logits: Tensor
    loss: Tensor
    head_draws: _RandomState  # the random state the head's forward drew from (its dropout)


def _local_backward(block: Optional[nn.Module], head: nn.Module, h: Tensor, y: Tensor,
                    want_activity: bool = False, want_input: bool = False,
                    update_stats: bool = False,
                    block_dtype: Optional[torch.dtype] = None) -> _LocalGrads:
    """Local autograd: ``head(block(h))`` with h detached, cross-entropy against y, backward.
    The running statistics are left as they were unless ``update_stats``. With
    ``block_dtype``, the block's convolutions are differentiated in it, except those of a
    weight the head reads too (the head's gradient stays the network dtype's)."""
    params_b = [] if block is None else [p for p in block.parameters() if p.requires_grad]
    params_h = [p for p in head.parameters() if p.requires_grad]
    reduced = [p for p in params_b if all(p is not q for q in params_h)]
    keep = contextlib.nullcontext() if update_stats else preserved_buffers(block, head)
    with torch.enable_grad(), keep:
        h = h.detach().requires_grad_(want_input)
        with relu_outputs_recomputed():
            a = h if block is None else block(_writable(h))
        if want_activity:
            a = a.detach().requires_grad_()
        head_draws = _RandomState.now(h.device)
        with relu_outputs_recomputed():
            logits = head(_writable(a))
        loss = F.cross_entropy(logits, y)
        extra = ([a] if want_activity else []) + ([h] if want_input else [])
        grads = grads_or_zeros(loss, params_b + params_h + extra, reduced_weights=reduced,
                               reduced_dtype=block_dtype)
    nb, nh = len(params_b), len(params_h)
    rest = iter(grads[nb + nh:])
    return _LocalGrads(grads[:nb], grads[nb:nb + nh], next(rest) if want_activity else None,
                       next(rest) if want_input else None, logits.detach(), loss.detach(),
                       head_draws)


def local_gradients(net: BlockNet, x: Tensor, y: Tensor) -> Estimates:
    """Greedy local learning (the ``local`` baseline): each block and its head learn the
    block's aux loss, the last block and the classifier the network's loss, every block's input
    detached. One forward per block, which also updates the block's running statistics (the
    aux heads' stay untouched, the classifier's update as in backprop)."""
    check_batch(x, y)
    check_parameters_unshared(net)
    out, h, J = Estimates(grads={}), x, len(net.blocks)
    for j, (block, head) in enumerate(zip(net.blocks, net.heads)):
        params_b = [p for p in block.parameters() if p.requires_grad]
        params_h = [p for p in head.parameters() if p.requires_grad]
        with torch.enable_grad(), preserved_buffers(head if j < J - 1 else None):
            with relu_outputs_recomputed():
                a = block(_writable(h.detach()))
                logits = head(_writable(a))
            loss = F.cross_entropy(logits, y)
            grads = grads_or_zeros(loss, params_b + params_h)
        out.grads.update(_named(net, "blocks", j, grads[:len(params_b)]))
        out.grads.update(_named(net, "heads", j, grads[len(params_b):]))
        h = a.detach()
    out.loss = float(loss.detach())
    out.correct = int((logits.argmax(1) == y).sum())
    return out


def _activity_guess_and_basis(block: nn.Module, h: Tensor, guess_of, update_stats: bool,
                              keep_output: bool) -> tuple[Optional[Tensor], Tensor, list]:
    """Block j's output ``a = block(h)`` under local autograd, the activity guess
    ``g = guess_of(a)``, and ``(∂a/∂θ)ᵀ g``: g backpropagated inside the block only. Done before
    the block's dual pass, so the backward never overlaps the dual activations. The forward
    updates the block's running statistics only with ``update_stats`` (when no dual pass of
    the block follows). Returns ``(a, g, (∂a/∂θ)ᵀ g)``, a None unless ``keep_output``: the
    backward then starts from a's gradient edge, and autograd frees a as soon as the block's
    last op has used it."""
    params = [p for p in block.parameters() if p.requires_grad]
    keep = contextlib.nullcontext() if update_stats else preserved_buffers(block)
    with torch.enable_grad(), keep:
        with relu_outputs_recomputed():
            out = block(_writable(h.detach()))
        g = guess_of(out.detach())
        if keep_output:
            return out.detach(), g, grads_or_zeros(out, params, g)
        edge = get_gradient_edge(out) if out.requires_grad else out
        del out
        return None, g, grads_or_zeros(edge, params, g)


class _RandomState(NamedTuple):
    """The global random state a block's or a head's random ops (dropout) draw from: the CPU's
    and, on a GPU, its device's. A block runs twice in a step, in the guess's autograd forward
    and in the dual pass, and so may a head, plainly for its gradient or a guess and dual for a
    local target (``_replaying_draws``)."""

    device: torch.device
    cpu: Tensor
    gpu: Optional[Tensor]

    @staticmethod
    def now(device: torch.device) -> _RandomState:
        if device.type == "cuda":
            device = torch.device("cuda", torch.cuda.current_device()
                                  if device.index is None else device.index)
            return _RandomState(device, torch.get_rng_state(), torch.cuda.get_rng_state(device))
        return _RandomState(device, torch.get_rng_state(), None)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.gpu is not None:
            torch.cuda.set_rng_state(self.gpu, self.device)


@contextlib.contextmanager
def _replaying_draws(before: Optional[_RandomState]) -> Iterator[None]:
    """Inside the ``with``, the global random state ``before`` a module's first (autograd)
    forward of the step, which has run since, so that its later pass draws the same dropout
    masks; after it, the state as it was on entry, so that a step draws what one forward (and
    the guess) would. None: no autograd forward ran, nothing to replay."""
    if before is None:
        yield
        return
    after = _RandomState.now(before.device)
    before.restore()
    try:
        yield
    finally:
        after.restore()


def _noise(shape, like: Tensor, noise: str, generator: Optional[torch.Generator]) -> Tensor:
    if noise == "gaussian":
        return torch.randn(shape, generator=generator, dtype=like.dtype, device=like.device)
    bits = torch.randint(0, 2, shape, generator=generator, device=like.device)
    return (bits * 2 - 1).to(like.dtype)


def _reinitialised(head: nn.Module, generator: Optional[torch.Generator]) -> nn.Module:
    """A copy of ``head`` with fresh parameters (the NTK guess), drawn from ``generator`` (on
    any device). The layers' initialisers draw from the global generators of the devices the
    head lives on: those are seeded for the draw and put back as they were afterwards."""
    fresh = copy.deepcopy(head)
    device = generator.device if generator is not None else torch.device("cpu")
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator, device=device))
    cuda = sorted({p.device.index for p in fresh.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        for index in cuda:
            torch.cuda.default_generators[index].manual_seed(seed)
        for m in fresh.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    return fresh


def _named(net: BlockNet, part: str, j: int, values: list[Tensor]) -> dict[str, Tensor]:
    """Gradients of ``net.<part>[j]``'s trainable parameters, by their names in ``net``."""
    module = getattr(net, part)[j]
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    return net.named_in(part, j, dict(zip(names, values)))


def _as_tangent(v: Tensor) -> Tensor:
    """A guess as the dual pass takes it: in the tangent dtype of the enclosing
    ``fgkernels.tangent_dtype`` block (its own dtype outside any)."""
    return v.to(resolve_tangent_dtype(v.dtype))


def _rounded_to_tangent(v: Tensor) -> Tensor:
    """``v`` rounded to the tangent dtype and back (``v`` itself where they agree): the
    direction the dual pass measures, in the guess's own dtype, so that an estimate's basis is
    exactly that direction."""
    tangent = _as_tangent(v)
    return v if tangent.dtype == v.dtype else tangent.to(v.dtype)


def _guess_dtype(params: list[Tensor]) -> Optional[torch.dtype]:
    """The dtype a block's local backward computes its weight-space guess in: bfloat16 where
    the guess enters the dual pass in bfloat16 from wider parameters, else None (the
    parameters' own). The estimate is exact for whatever guess it measures (its derivative is
    taken along exactly its basis); the guess's precision only changes which direction that
    is, and bfloat16 keeps float32's range."""
    if not params:
        return None
    tangent = resolve_tangent_dtype(params[0].dtype)
    return tangent if tangent == torch.bfloat16 != params[0].dtype else None


def _norm2(*tensors: Tensor) -> float:
    """‖g‖² over the tensors of a guess (no temporary of their size), accumulated in float32
    at least."""
    return sum(float(torch.linalg.vector_norm(
        v, dtype=torch.promote_types(v.dtype, torch.float32))) ** 2 for v in tensors)


def _directional(loss: Dual, direction: int) -> float:
    """The tangent of a scalar loss for one labelled direction: 0 where the direction never
    reached it (a block with no trainable parameter perturbs nothing in weight space)."""
    if loss.tangents is None or direction not in loss.directions:
        return 0.0
    return float(loss.tangents[loss.directions.index(direction)])


@dataclass
class _Pending:
    """Block j's guess, kept until the dual pass has given its directional derivative."""

    block: int
    guess: Union[dict[str, Tensor], Tensor, None]  # kept for the caller (see keep_guesses)
    norm2: float                                   # ‖g‖²
    estimate_basis: dict[str, Tensor]              # ĝ = scale · basis, by parameter name


@dataclass
class _Pass:
    """The state of one estimator call: its options and what it has found so far."""

    net: BlockNet
    y: Tensor
    target: str
    guess: str
    space: str
    noise: str
    generator: Optional[torch.Generator]
    keep_guesses: bool
    out: Estimates = field(default_factory=lambda: Estimates(grads={}))
    pending: list[_Pending] = field(default_factory=list)
    derivs: dict[int, float] = field(default_factory=dict)
    head_draws: Optional[_RandomState] = None  # what block j's guess head drew from

    def head_grads(self, j: int, grads: list[Tensor]) -> None:
        self.out.grads.update(_named(self.net, "heads", j, grads))


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
    A trainable parameter of two blocks or heads is refused (``check_parameters_unshared``).
    """
    check_choices(target, guess, space, noise)
    check_batch(x, y)
    check_parameters_unshared(net)
    run = _Pass(net, y, target, guess, space, noise, generator, keep_guesses)
    step = _weight_space_block if space == "weight" else _activity_space_block
    d = Dual(x)
    for j in range(len(net.blocks) - 1):
        # A head's convolutions run under autograd for its guess (or its gradient) and again on
        # the dual pass for a local target: the second takes the first's outputs. A global
        # target runs no head on the dual pass, so nothing is kept for it.
        keep = reuse_conv_outputs(net.heads[j]) if target != "global" else \
            contextlib.nullcontext()
        with keep:
            d = step(run, j, d)
            d = _block_targets(run, j, d)
    _last_block(run, d)
    for p in run.pending:
        deriv = run.derivs[p.block]
        scale = deriv if guess == "random" else deriv / (p.norm2 + torch.finfo(x.dtype).tiny)
        run.out.grads.update(net.named_in("blocks", p.block,
                                          {n: scale * v for n, v in p.estimate_basis.items()}))
        run.out.blocks.append(BlockEstimate(p.block, p.guess, deriv, scale))
    return run.out


def _guess_head(run: _Pass, j: int) -> nn.Module:
    head = run.net.heads[j]
    return head if run.guess != "ntk" else _reinitialised(head, run.generator)


def _weight_space_block(run: _Pass, j: int, d: Dual) -> Dual:
    """Block j's guess on its parameters, then the block's dual pass with that guess as the
    tangent of direction j. The dual pass takes the convolutions' primal outputs from the
    guess's autograd forward (``reuse_conv_outputs``)."""
    block = run.net.blocks[j]
    params = {n: p for n, p in block.named_parameters() if p.requires_grad}
    with reuse_conv_outputs(block):
        draws = None
        if run.guess == "random":
            g = {n: _noise(p.shape, p, run.noise, run.generator) for n, p in params.items()}
        else:
            draws = _RandomState.now(d.device)
            local = _local_backward(block, _guess_head(run, j), d.primal, run.y,
                                    block_dtype=_guess_dtype(list(params.values())))
            g = dict(zip(params, local.block))
            run.head_draws = local.head_draws
            if run.guess == "local":
                run.head_grads(j, local.head)
        g = {n: _rounded_to_tangent(v) for n, v in g.items()}
        set_tangents(block, {n: _as_tangent(v) for n, v in g.items()}, direction=j)
        try:
            with _replaying_draws(draws):  # the guess's dropout masks
                d = block(d)
        finally:
            clear_tangents(block)
    run.pending.append(_Pending(j, g if run.keep_guesses else None, _norm2(*g.values()), g))
    return d


def _activity_space_block(run: _Pass, j: int, d: Dual) -> Dual:
    """Block j's guess on its output activation, added as direction j after the block's dual
    pass; the guess is backpropagated inside block j first (its estimate's basis). A block no
    direction reaches is not run again: its output is the autograd pass's. Otherwise the dual
    pass takes the convolutions' primal outputs from that autograd forward
    (``reuse_conv_outputs``): tensors autograd saves for the backward anyway, but kept alive
    through it where autograd would free them as it goes, so the backward's memory peak can
    rise (the price of not computing a convolution twice); the dual pass overwrites them in
    place."""
    block, guess_head = run.net.blocks[j], _guess_head(run, j)

    # The guess is rounded in its own dtype, not kept in the tangent's: the backward of the
    # basis holds its output gradient in the block's dtype anyway, so a tangent-dtype copy
    # kept beside it would only add to the peak (the tangent is taken after the backward).
    def guess_of(a: Tensor) -> Tensor:
        if run.guess == "random":
            return _rounded_to_tangent(_noise(a.shape, a, run.noise, run.generator))
        local = _local_backward(None, guess_head, a, run.y, want_activity=True)
        run.head_draws = local.head_draws
        if run.guess == "local":
            run.head_grads(j, local.head)
        return _rounded_to_tangent(local.activity)

    if d.tangents is None:
        # No direction reaches the block (the first block; every block for a local target):
        # its dual pass would be its plain forward, which the autograd pass has just run.
        a, g, basis = _activity_guess_and_basis(block, d.primal, guess_of, update_stats=True,
                                                keep_output=True)
        d = Dual(a)
    else:
        with reuse_conv_outputs(block):
            draws = _RandomState.now(d.device)
            _, g, basis = _activity_guess_and_basis(block, d.primal, guess_of,
                                                    update_stats=False, keep_output=False)
            with _replaying_draws(draws):  # the guess's dropout masks
                d = block(d)
    d = DF.add_direction(d, j, _as_tangent(g))
    names = [n for n, p in block.named_parameters() if p.requires_grad]
    run.pending.append(_Pending(j, g if run.keep_guesses else None, _norm2(g),
                                dict(zip(names, basis))))
    return d


def _block_targets(run: _Pass, j: int, d: Dual) -> Dual:
    """After block j: its head's gradient (where the guess did not give it), and the local
    targets' derivatives: block j's aux loss (direction j) or, for block j−1, this aux loss
    (direction j−1, "above"). Directions no target needs any more are dropped. An aux head's
    dual pass, like its autograd passes, leaves its running statistics as they were, and every
    pass of the head draws the dropout masks of its first."""
    head, draws = run.net.heads[j], run.head_draws
    run.head_draws = None
    if run.guess not in ("local", "fixed-ntk"):
        with _replaying_draws(draws):  # an ntk guess's head has drawn the step's masks
            local = _local_backward(None, head, d.primal, run.y)
        run.head_grads(j, local.head)
        draws = local.head_draws if draws is None else draws
    if run.target == "local":
        run.derivs[j] = _head_derivative(head, d, j, run.y, draws)
        return Dual(d.primal)  # no direction goes on (d itself is not used again: no copy)
    if run.target == "above":
        if j >= 1:
            run.derivs[j - 1] = _head_derivative(head, d, j - 1, run.y, draws)
        return d.select_directions([j])
    return d


def _head_derivative(head: nn.Module, d: Dual, direction: int, y: Tensor,
                     draws: _RandomState) -> float:
    """The derivative of the head's loss along one direction of ``d``, by a dual pass that
    draws the masks of the head's autograd forward (``draws``), whose convolution outputs it
    may take (``reuse_conv_outputs``)."""
    with preserved_buffers(head), _replaying_draws(draws):
        loss = DF.cross_entropy(head(_own_dual(d.select_directions([direction]))), y)
    return _directional(loss, direction)


def _last_block(run: _Pass, d: Dual) -> None:
    """The last block and the classifier: their exact gradient by local autograd, the global
    loss, and the derivatives of the targets the loss is (global, or "above" for block J−2).

    Those derivatives come from the same backward instead of a dual pass through the last
    block: along a direction that arrives at the block's input h with tangent ḣ, the loss
    changes by ``⟨∂L/∂h, ḣ⟩``. The backward differentiates the block anyway; asking it for
    ``∂L/∂h`` too costs one input-gradient convolution per layer, where carrying the T
    directions through the block would cost T tangent convolutions per layer, and the block's
    dual activations are never allocated."""
    net, J = run.net, len(run.net.blocks)
    block, head = net.blocks[-1], net.heads[-1]
    needed = list(range(J - 1)) if run.target == "global" else \
        [J - 2] if run.target == "above" and J >= 2 else []
    d = d.select_directions(needed)
    # The running statistics of the block and the classifier are updated here, once.
    local = _local_backward(block, head, d.primal, run.y, want_input=d.tangents is not None,
                            update_stats=True)
    run.out.grads.update(_named(net, "blocks", J - 1, local.block))
    run.head_grads(J - 1, local.head)
    run.out.loss = float(local.loss)
    run.out.correct = int((local.logits.argmax(1) == run.y).sum())
    carried = {} if d.tangents is None else dict(zip(d.directions, d.tangents))
    dl_dh = local.input
    for k in needed:
        # ⟨∂L/∂h, ḣ_k⟩ in the gradient's dtype (a bfloat16 tangent is widened, slot by slot).
        run.derivs[k] = float((carried[k].to(dl_dh.dtype) * dl_dh).sum()) if k in carried \
            else 0.0
