"""The training loop: SGD with the paper's schedule, metrics as JSON lines, checkpoints that
resume bit for bit, and data-parallel runs under torchrun."""
from __future__ import annotations

import contextlib
import math
import numbers
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..dual.dtypes import tangent_dtype_fits
from ..dual.precision import fast_bfloat16, tangent_dtype
from .checkpoint import (
    CHECKPOINT_NAME,
    check_out_dir,
    load_checkpoint,
    prepare_out_dir,
    run_lock,
    save_checkpoint,
    write_metrics,
)
from .data import Dataset, batches_per_epoch, load_dataset, test_batches, train_batches
from .estimators import (
    check_choices,
    estimate_gradients,
    grads_or_zeros,
    local_gradients,
    preserved_buffers,
)
from .memory import PeakMemory
from .models import BlockNet, build_model, check_model_args

ALGOS = ("backprop", "local", "fg")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
TANGENT_DTYPES = ("float32", "bfloat16")


@dataclass
class TrainConfig:
    """Everything a run depends on (saved in its checkpoints)."""

    algo: str = "fg"
    target: str = "global"
    guess: str = "local"
    space: str = "weight"
    noise: str = "gaussian"
    arch: str = "cnn"
    aux: str = "cnn"
    aux_width: Optional[int] = None
    width: Optional[int] = None
    data: str = "digits"
    data_dir: Optional[str] = None
    epochs: int = 5
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    max_steps: Optional[int] = None  # per epoch, for quick runs
    seed: int = 0
    device: str = "cpu"
    diagnose: bool = False
    dtype: str = "float32"                # the network's parameters and activations
    tangent_dtype: Optional[str] = None   # fg's tangents (None: the network's dtype)
    channels_last: bool = False

    def validate(self) -> None:
        """Raise ValueError naming the bad field and the valid choices."""
        if self.algo not in ALGOS:
            raise ValueError(f"unknown algo {self.algo!r}; choose one of {', '.join(ALGOS)}")
        check_choices(self.target, self.guess, self.space, self.noise)
        if self.noise != "gaussian" and self.guess != "random":
            raise ValueError(f"noise {self.noise!r} applies only to guess 'random' (got guess "
                             f"{self.guess!r})")
        for name in ("diagnose", "channels_last"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        check_model_args(self.arch, self.aux, self.aux_width, self.width)
        for name in ("epochs", "batch_size", "max_steps"):
            value = getattr(self, name)
            if value is None and name == "max_steps":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int of at least 1, got {value!r}")
        if self.dtype not in tuple(DTYPES):  # (a tuple: an unhashable value is unknown too)
            raise ValueError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.tangent_dtype is not None:
            if self.tangent_dtype not in TANGENT_DTYPES:
                raise ValueError(f"unknown tangent_dtype {self.tangent_dtype!r}; choose one of "
                                 f"{', '.join(TANGENT_DTYPES)}")
            if not tangent_dtype_fits(self.torch_dtype, self.torch_tangent_dtype):
                raise ValueError(f"tangent_dtype {self.tangent_dtype} is wider than the "
                                 f"network's dtype {self.dtype}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) \
                or not 0 <= self.seed < 2 ** 32:
            raise ValueError(f"seed must be an int in [0, 2**32), got {self.seed!r}")
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError):  # TypeError: not a device's name (None, a number)
            device = None
        if device is None or device.type not in ("cpu", "cuda"):
            raise ValueError(f"unknown device {self.device!r}; the trainer runs on cpu or "
                             f"cuda[:index]")
        if device.type == "cuda" and not (torch.cuda.is_available() and
                                          (device.index or 0) < torch.cuda.device_count()):
            raise ValueError(f"device {self.device}: this torch ({torch.__version__}) sees "
                             f"{torch.cuda.device_count()} CUDA device(s)")
        for name in ("lr", "momentum", "weight_decay"):
            _check_real(name, getattr(self, name))
        finite = all(math.isfinite(v) for v in (self.lr, self.momentum, self.weight_decay))
        if not finite or not self.lr > 0 or self.momentum < 0 or self.weight_decay < 0:
            raise ValueError(f"lr must be finite and > 0, momentum and weight_decay finite and "
                             f">= 0; got lr={self.lr}, momentum={self.momentum}, "
                             f"weight_decay={self.weight_decay}")

    @property
    def torch_dtype(self) -> torch.dtype:
        """The network's dtype."""
        return DTYPES[self.dtype]

    @property
    def torch_tangent_dtype(self) -> torch.dtype:
        """The tangents' dtype (the network's unless ``tangent_dtype`` is set)."""
        return DTYPES[self.tangent_dtype or self.dtype]

    @property
    def label(self) -> str:
        """The run's name in the summary table and the plots."""
        if self.algo != "fg":
            return self.algo
        precision = "" if self.torch_tangent_dtype == self.torch_dtype else \
            f", {self.tangent_dtype} tangents"
        return f"fg {self.guess} guess, {self.space} space, {self.target} target{precision}"

    def as_input(self, x: torch.Tensor, device) -> torch.Tensor:
        """A batch of inputs on ``device`` in the network's dtype and memory format."""
        x = x.to(device, self.torch_dtype)
        return x.to(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 \
            else x


def _check_real(name: str, value) -> None:
    """Raise ValueError naming field ``name`` unless ``value`` is a real number (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")


@dataclass
class RunResult:
    """Per-epoch metrics and the trained model."""

    config: TrainConfig
    history: list[dict] = field(default_factory=list)
    model: Optional[BlockNet] = None


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _on_every_rank(ok: bool, world: int, device: torch.device) -> bool:
    """Whether ``ok`` holds on every process of the run. All processes decide alike: one that
    stopped alone would leave the others waiting forever in their next collective call."""
    if world == 1:
        return ok
    failed = torch.tensor([0.0 if ok else 1.0], device=device)
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    return failed.item() == 0.0


def compute_gradients(net: BlockNet, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig,
                      generator: torch.Generator) -> tuple[dict[str, torch.Tensor], float, int]:
    """One step's gradients by name, with the batch's global loss and correct count."""
    if cfg.algo == "backprop":  # end to end: the blocks and the classifier (no aux heads)
        used = {n: p for j in range(len(net.blocks)) for n, p in net.block_parameters(j).items()}
        used.update(net.head_parameters(len(net.heads) - 1))
        trainable = {n: p for n, p in used.items() if p.requires_grad}  # a frozen one: none
        with torch.enable_grad():
            logits = net(x)
            loss = F.cross_entropy(logits, y)
            grads = torch.autograd.grad(loss, list(trainable.values())) if trainable else ()
        return dict(zip(trainable, grads)), float(loss.detach()), int((logits.argmax(1) == y).sum())
    if cfg.algo == "local":
        est = local_gradients(net, x, y)
        return est.grads, est.loss, est.correct
    with tangent_dtype(cfg.torch_tangent_dtype):
        est = estimate_gradients(net, x, y, cfg.target, cfg.guess, cfg.space, generator,
                                 cfg.noise)
    return est.grads, est.loss, est.correct


def full_precision_estimate(net: BlockNet, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig,
                            generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The estimate with tangents in the network's own dtype, from the same draws (a copy of
    ``generator``'s state), running statistics untouched: what ``--diagnose`` compares a
    lower-precision estimate with."""
    twin = torch.Generator(device=generator.device)
    twin.set_state(generator.get_state())
    with preserved_buffers(net):
        return compute_gradients(net, x, y, replace(cfg, tangent_dtype=None), twin)[0]


def true_block_gradients(net: BlockNet, x: torch.Tensor, y: torch.Tensor) -> dict[int, list]:
    """The end-to-end gradient of every block, by backprop (running stats untouched): block j's
    in the order of its parameters, zeros for a frozen one (requires_grad False), which no
    method trains."""
    blocks = [list(b.parameters()) for b in net.blocks]
    with torch.enable_grad(), preserved_buffers(net):
        loss = F.cross_entropy(net(x), y)
        grads = iter(grads_or_zeros(loss, [p for ps in blocks for p in ps if p.requires_grad]))
    return {j: [next(grads) if p.requires_grad else torch.zeros_like(p) for p in ps]
            for j, ps in enumerate(blocks)}


def _cosine(a: list, b: list) -> float:
    dot = sum(float((u * v).sum()) for u, v in zip(a, b))
    na = math.sqrt(sum(float((u * u).sum()) for u in a))
    nb = math.sqrt(sum(float((v * v).sum()) for v in b))
    return dot / (na * nb) if na > 0 and nb > 0 else float("nan")


def evaluate(net: BlockNet, ds: Dataset, cfg: TrainConfig, device) -> tuple[float, float]:
    """Test loss and accuracy, eval mode."""
    net.eval()
    loss, correct = 0.0, 0
    with torch.no_grad():
        for x, y in test_batches(ds, cfg.batch_size):
            logits = net(cfg.as_input(x, device)).float()
            loss += float(F.cross_entropy(logits, y.to(device), reduction="sum"))
            correct += int((logits.argmax(1) == y.to(device)).sum())
    net.train()
    n = len(ds.test_y)
    return loss / n, correct / n


def _epoch_generator(seed: int, epoch: int, device) -> torch.Generator:
    """Shuffling and guesses of an epoch depend on (seed, epoch) only: resuming replays them."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + epoch)


def build_run(cfg: TrainConfig, ds: Dataset) -> tuple[BlockNet, torch.optim.SGD,
                                                     torch.optim.lr_scheduler.MultiStepLR]:
    """The network (seeded by ``cfg.seed``, on ``cfg.device`` in ``cfg``'s dtype and memory
    format), its SGD optimizer and the paper's schedule: lr × 0.2 at 30, 60 and 90 % of the
    epochs."""
    torch.manual_seed(cfg.seed)
    net = build_model(cfg.arch, ds.num_classes, ds.in_channels, cfg.aux, cfg.aux_width,
                      cfg.width).to(cfg.device, cfg.torch_dtype)
    if cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    milestones = sorted({max(1, round(cfg.epochs * f)) for f in (0.3, 0.6, 0.9)})
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones, gamma=0.2)
    return net, opt, sched


def check_batch_norms_see_a_batch(cfg: TrainConfig, ds: Dataset) -> None:
    """Refuse a batch size that leaves a batch norm of the network or of an aux head the
    method trains one value per channel (torch alone would refuse it only at the first
    training step, after an ``--overwrite`` had cleared the folder): the step's shapes run on
    the meta device, which computes nothing."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        net = build_model(cfg.arch, ds.num_classes, ds.in_channels, cfg.aux, cfg.aux_width,
                          cfg.width)
        x = torch.empty(cfg.batch_size, *ds.train_x.shape[1:])
        last = len(net.blocks) - 1
        try:
            for j, block in enumerate(net.blocks):
                x = block(x)
                if j == last or cfg.algo != "backprop":  # (backprop trains no aux head)
                    net.heads[j](x)
        except ValueError as e:
            heads = "" if cfg.algo == "backprop" else f" with {cfg.aux} aux heads"
            raise ValueError(f"batch size {cfg.batch_size} is too small for {cfg.arch}{heads} "
                             f"on {tuple(ds.train_x.shape[1:])} images: a batch norm would see "
                             f"one value per channel ({e})") from None


def train(cfg: TrainConfig, out_dir: Optional[str] = None, resume: bool = False,
          progress: bool = True, dataset: Optional[Dataset] = None,
          stop_after: Optional[int] = None, overwrite: bool = False) -> RunResult:
    """Train ``cfg``; with ``out_dir``, write checkpoint.pt and metrics.jsonl there each epoch
    (``resume`` continues from that checkpoint; a fresh run refuses a non-empty ``out_dir``
    unless ``overwrite``). ``stop_after`` ends the run after that many epochs in all (0: none),
    as an interruption would. A non-finite loss stops the run with FloatingPointError. ``progress``:
    a progress bar on a terminal, elsewhere (a log, CI) one line per epoch on stderr. Bad
    arguments (a batch size too small for the batch norms included), data or ``out_dir`` are
    refused before anything is written. In a distributed run, process 0 holds and writes
    ``out_dir`` (prepared before the other processes' verdict on it); a refusal of ``out_dir``
    or a non-finite loss in any process stops every process."""
    cfg.validate()
    if stop_after is not None and (isinstance(stop_after, bool) or not isinstance(stop_after, int)
                                   or stop_after < 0):
        raise ValueError(f"stop_after must be an int >= 0 (epochs in all), got {stop_after!r}")
    if resume and not out_dir:
        raise ValueError("resume=True needs out_dir, the folder whose checkpoint it continues")
    rank, world = _rank_world()
    ds = dataset or load_dataset(cfg.data, cfg.data_dir, cfg.seed)
    batches_per_epoch(ds, cfg.batch_size, world)
    check_batch_norms_see_a_batch(cfg, ds)
    if not out_dir:
        return _train(cfg, None, resume, progress, ds, stop_after)
    device = torch.device(cfg.device)
    with contextlib.ExitStack() as held:
        try:
            check_out_dir(Path(out_dir), resume, overwrite)
            if rank == 0:
                held.enter_context(run_lock(Path(out_dir)))
                prepare_out_dir(Path(out_dir), resume, overwrite)
        except Exception:
            _on_every_rank(False, world, device)
            raise
        if not _on_every_rank(True, world, device):
            raise RuntimeError(f"another process of the run refused out_dir {out_dir} (its "
                               "error says why); this process stops with it")
        return _train(cfg, out_dir, resume, progress, ds, stop_after)


def _train(cfg: TrainConfig, out_dir: Optional[str], resume: bool, progress: bool,
           ds: Dataset, stop_after: Optional[int]) -> RunResult:
    rank, world = _rank_world()
    device = torch.device(cfg.device)
    if torch.bfloat16 in (cfg.torch_dtype, cfg.torch_tangent_dtype) and \
            not fast_bfloat16(device):
        warnings.warn(f"{device} has no bfloat16 arithmetic in hardware (a CPU needs "
                      "AVX512-BF16 or AMX, a GPU compute capability 8.0): torch emulates "
                      "bfloat16 convolutions there, several times slower than float32",
                      stacklevel=2)
    net, opt, sched = build_run(cfg, ds)
    result = RunResult(cfg)
    start = 0
    ckpt = Path(out_dir) / CHECKPOINT_NAME if out_dir else None
    if resume:
        state = load_checkpoint(ckpt)
        saved = TrainConfig(**state["config"])
        if asdict(saved) != asdict(cfg):
            diff = {k: (v, getattr(cfg, k)) for k, v in asdict(saved).items()
                    if getattr(cfg, k) != v}
            raise ValueError(f"the checkpoint was written by another configuration: {diff}")
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        result.history = state["history"]
        start = state["epoch"] + 1
        if rank == 0:  # the log may hold an epoch the checkpoint does not (a kill in between)
            write_metrics(Path(out_dir), result.history)
    if world > 1:
        for t in net.state_dict().values():
            dist.broadcast(t, 0)
    progress = progress and rank == 0
    bar = progress and sys.stderr.isatty()
    for epoch in range(start, cfg.epochs if stop_after is None else min(cfg.epochs, stop_after)):
        result.history.append(_train_epoch(net, opt, ds, cfg, epoch, device, rank, world, bar))
        if progress and not bar:
            print(_epoch_line(cfg, result.history[-1]), file=sys.stderr, flush=True)
        sched.step()
        if rank == 0 and out_dir:
            # The checkpoint first: the log is then rewritten from its history, so that both
            # always agree, whenever the run is killed.
            save_checkpoint(ckpt, {"config": asdict(cfg), "epoch": epoch,
                                   "model": net.state_dict(), "optimizer": opt.state_dict(),
                                   "scheduler": sched.state_dict(), "history": result.history})
            write_metrics(Path(out_dir), result.history)
    result.model = net
    return result


def _epoch_line(cfg: TrainConfig, record: dict) -> str:
    return (f"  epoch {record['epoch']}/{cfg.epochs}: train loss {record['train_loss']:.3f}, "
            f"test acc {100 * record['test_acc']:.1f}%, "
            f"{1e3 * record['step_time_s']:.1f} ms/step")


def sgd_step(net: BlockNet, opt, grads: dict, world: int = 1) -> None:
    """One optimizer step with ``grads`` (averaged over the processes of a distributed run)."""
    if world > 1:
        for g in grads.values():
            dist.all_reduce(g)
            g.div_(world)
    for n, p in net.named_parameters():
        p.grad = grads.get(n)
    opt.step()


def _record_cosines(net: BlockNet, grads: dict, truth: dict, cosines: dict) -> None:
    """Append the cosine between block j's estimate and ``truth[j]``, a list in the order of
    the block's parameters, for every estimated block (``--diagnose``; the last block's
    gradient is exact in every method)."""
    for j in range(len(net.blocks) - 1):
        names = list(net.block_parameters(j))
        if names:
            est = [grads.get(n, torch.zeros_like(t)) for n, t in zip(names, truth[j])]
            cosines.setdefault(j, []).append(_cosine(est, truth[j]))


def _estimated_cosine(net: BlockNet, grads: dict, reference: dict) -> float:
    """The cosine between two estimates over every estimated block together (all but the last,
    whose gradient is exact). Per block the two scale nearly the same guess (one rounded to
    the tangent dtype, a local weight-space one computed in it), by directional derivatives
    of different precision."""
    params = {n: p for j in range(len(net.blocks) - 1)
              for n, p in net.block_parameters(j).items()}
    pick = lambda d: [d[n] if n in d else torch.zeros_like(p) for n, p in params.items()]
    return _cosine(pick(grads), pick(reference))


def _train_epoch(net, opt, ds, cfg, epoch, device, rank, world, bar) -> dict:
    from tqdm import tqdm
    gen = _epoch_generator(cfg.seed, epoch, "cpu")
    guess_gen = _epoch_generator(cfg.seed + 1, epoch, device)
    net.train()
    losses, correct, seen, times, peak = [], 0, 0, [], 0
    cosines: dict[int, list] = {}
    precision_cosines: list[float] = []
    compare_precision = cfg.diagnose and cfg.algo == "fg" and \
        cfg.torch_tangent_dtype != cfg.torch_dtype
    batches = train_batches(ds, cfg.batch_size, gen, rank, world)
    bar = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not bar,
               leave=False, total=len(ds.train_y) // world // cfg.batch_size or 1)
    for step, (x, y) in enumerate(bar):
        if cfg.max_steps is not None and step >= cfg.max_steps:
            break
        x, y = cfg.as_input(x, device), y.to(device)
        truth = true_block_gradients(net, x, y) if cfg.diagnose else None
        full = full_precision_estimate(net, x, y, cfg, guess_gen) if compare_precision else None
        t0 = time.perf_counter()
        if step == 0:  # the memory tracker slows the step it watches: measure, do not time
            with PeakMemory(device) as mem:
                grads, loss, ok = compute_gradients(net, x, y, cfg, guess_gen)
            peak = mem.peak_bytes
        else:
            grads, loss, ok = compute_gradients(net, x, y, cfg, guess_gen)
        if not _on_every_rank(math.isfinite(loss), world, device):
            where = f"is {loss}" if not math.isfinite(loss) else "is not finite in another process"
            raise FloatingPointError(
                f"epoch {epoch + 1}, step {step + 1}: the training loss {where}; the run "
                f"stops before the parameters take a non-finite step (lr={cfg.lr})")
        sgd_step(net, opt, grads, world)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step > 0:
            times.append(time.perf_counter() - t0)
        if truth is not None:
            _record_cosines(net, grads, truth, cosines)
        if full is not None:
            precision_cosines.append(_estimated_cosine(net, grads, full))
        losses.append(loss)
        correct += ok
        seen += len(y)
        bar.set_postfix(loss=f"{loss:.3f}", acc=f"{correct / seen:.3f}",
                        samples_s=f"{len(y) / times[-1]:.0f}" if times else "-")
    if world > 1:  # every rank keeps the same running statistics
        for b in net.buffers():
            if b.is_floating_point():
                dist.all_reduce(b)
                b.div_(world)
    test_loss, test_acc = evaluate(net, ds, cfg, device)
    if not math.isfinite(test_loss):
        raise FloatingPointError(
            f"epoch {epoch + 1}: the test loss is {test_loss}; the parameters are no longer "
            f"finite after the epoch's steps (lr={cfg.lr}), and the run stops before saving them")
    step_time = statistics.median(times) if times else float("nan")
    record = {"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"],
              "train_loss": sum(losses) / len(losses), "train_acc": correct / max(seen, 1),
              "test_loss": test_loss, "test_acc": test_acc, "step_time_s": step_time,
              "samples_per_s": cfg.batch_size / step_time if times else float("nan"),
              "peak_memory_bytes": peak}
    if cosines:
        record["cosine"] = {str(j): sum(v) / len(v) for j, v in sorted(cosines.items())}
    if precision_cosines:  # to the estimate with tangents in the network's dtype
        record["cosine_to_full_precision"] = sum(precision_cosines) / len(precision_cosines)
    return record
