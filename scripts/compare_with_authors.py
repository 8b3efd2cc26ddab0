"""Side by side on this machine: a forward-gradient training step of the authors' code
(streethagore/ForwardLocalGradient, which simulates forward gradients with backprop) against
one of ``fgkernels.train``, and a backprop step of each.

    git clone https://github.com/streethagore/ForwardLocalGradient /path/to/flg
    pip install simple-parsing opt_einsum   # their imports
    python scripts/compare_with_authors.py --authors /path/to/flg
        [--batch 128] [--rounds 3] [--space weight activity]
        [--tangent-dtype bfloat16] [--channels-last]

Both build ResNet-18 in 8 blocks (CIFAR shapes, 10 classes) with cnn aux nets of width 32 and
estimate with a global target and a local guess; one step is the gradients and an SGD update,
on one random batch. Their code runs as published: their model, their ``_train_epoch`` on a
one-batch loader, their SGD; the only shims stub ``wandb`` and ``fvcore`` (logging and FLOP
counting, which a step does not use) when they are not installed, and turn their tqdm off. Steps run
in turn (theirs, ours) after a warm-up of each, so that the machine's drift hits both alike,
with freed memory kept in the process (benchmarks/allocator.py), so that neither pays page
faults for memory the other gave back.
Prints, per space, the median step time of each, the ratio ours/theirs, and each one's peak
memory above the model's (fgkernels.train.memory.PeakMemory, which counts tensor allocations).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import types
from typing import Optional

import torch

from fgkernels.dual.precision import fast_bfloat16
from fgkernels.train import build_model
from fgkernels.train.loop import TrainConfig, compute_gradients, sgd_step
from fgkernels.train.memory import PeakMemory

sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
from allocator import keep_freed_memory  # noqa: E402

THEIR_SPACE = {"weight": "weight", "activity": "activation"}


def _stub_missing(name: str, **attrs) -> None:
    """An empty stand-in for a module the step never uses, if it is not installed."""
    try:
        __import__(name)
    except ImportError:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            module = sys.modules.setdefault(".".join(parts[:i]),
                                            types.ModuleType(".".join(parts[:i])))
        module.__dict__.update(attrs)


def their_setup(authors: str, space: str, channels_last: bool):
    """Their network, loss, optimizer and args, as their main.py builds them."""
    if authors not in sys.path:
        sys.path.insert(0, authors)
    _stub_missing("wandb")
    _stub_missing("fvcore.nn", FlopCountAnalysis=None, flop_count_table=None,
                  flop_count_str=None)
    from args import AlgorithmArgs, AuxiliaryCNNArgs, ModelArgs, SGDMomentumArgs
    from model.utils import get_model, init_weights
    from optimizer import get_optimizer

    auxnet = AuxiliaryCNNArgs()  # h_channel 32, as their get_args() leaves it for resnet18-8b
    auxnet.algorithm = "generic"
    args = types.SimpleNamespace(
        dataset=types.SimpleNamespace(dataset="cifar10", n_channel=3, n_class=10),
        model=ModelArgs(arch="resnet18-8b"), aux_loss=types.SimpleNamespace(auxnet=auxnet),
        training=AlgorithmArgs(algorithm="generic", target="global", guess="local",
                               space=THEIR_SPACE[space]),
        optimizer=SGDMomentumArgs(), subgroups={"optimizer": "sgd"},
        image_size_over_32=False, histogram_folder=None, device=torch.device("cpu"))
    net = get_model(args)
    net.apply(lambda m: init_weights(m, mode=args.model.weight_init))
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net, torch.nn.CrossEntropyLoss(), get_optimizer(net, args), args


def their_step(authors: str, space: Optional[str], batch, channels_last: bool):
    """One step of theirs: their forward-gradient epoch (``space``) or their backprop epoch
    (None) over a one-batch loader."""
    net, criterion, optimizer, args = their_setup(authors, space or "weight", channels_last)
    cpu = torch.device("cpu")
    if space is None:
        import trainer.backprop as theirs
        theirs.tqdm = lambda iterable, **kwargs: iterable  # no progress bar
        return lambda: theirs.train_epoch([batch], net, criterion, optimizer, device=cpu,
                                          args=args)
    import trainer.forward_gradient as theirs
    theirs.tqdm = lambda iterable, **kwargs: iterable  # no progress bar
    return lambda: theirs._train_epoch([batch], net, criterion, optimizer, target="global",
                                       guess="local", space=THEIR_SPACE[space], device=cpu,
                                       args=args)


def our_step(space: str, batch, tangent_dtype, channels_last: bool, algo: str = "fg"):
    """fgkernels.train's step: the gradients of ``compute_gradients`` and an SGD update."""
    cfg = TrainConfig(algo=algo, target="global", guess="local", space=space,
                      tangent_dtype=tangent_dtype if algo == "fg" else None,
                      channels_last=channels_last)
    net = build_model("resnet18-8b", 10, 3, aux="cnn", aux_width=32)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(0)
    x, y = batch

    return lambda: sgd_step(net, opt, compute_gradients(net, x, y, cfg, gen)[0])


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _peak(fn) -> int:
    with PeakMemory(torch.device("cpu")) as mem:
        fn()
    return mem.peak_bytes


def compare(steps: dict, rounds: int) -> dict:
    """Median time and peak memory of each step, the steps taken in turn every round."""
    for fn in steps.values():
        fn()  # warm-up
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            times[name].append(_timed(fn))
    return {name: (statistics.median(t), _peak(steps[name])) for name, t in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--authors", required=True,
                        help="a checkout of streethagore/ForwardLocalGradient")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--space", nargs="+", default=["weight", "activity"],
                        choices=list(THEIR_SPACE))
    parser.add_argument("--tangent-dtype", choices=["float32", "bfloat16"], default=None)
    parser.add_argument("--channels-last", action="store_true")
    args = parser.parse_args(argv)
    if not os.path.isfile(os.path.join(args.authors, "trainer", "forward_gradient.py")):
        parser.error(f"--authors {args.authors!r} is not a checkout of ForwardLocalGradient")
    steady = keep_freed_memory()  # no step pays for memory the other one gave back
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32)
    if args.channels_last:
        x = x.to(memory_format=torch.channels_last)
    batch = (x, torch.randint(0, 10, (args.batch,)))
    print(f"ResNet-18 in 8 blocks, cnn aux width 32, batch {args.batch}, float32 network, "
          f"tangents {args.tangent_dtype or 'float32'}, "
          f"{'channels_last' if args.channels_last else 'NCHW'}, {torch.get_num_threads()} "
          f"threads; median of {args.rounds} rounds; CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}; "
          f"{'freed memory kept for reuse' if steady else 'the system allocator as it is'}\n")
    if args.tangent_dtype == "bfloat16" and not fast_bfloat16(torch.device("cpu")):
        print("This CPU has no bfloat16 instructions: bfloat16 is emulated here, and its times "
              "are no speed figure.\n")
    print("| step | theirs s | ours s | ours/theirs | theirs peak MiB | ours peak MiB |")
    print("|---|---|---|---|---|---|")
    rows = [("backprop", None)] + [(f"fg {s}", s) for s in args.space]
    for label, space in rows:
        ours = our_step(space or "weight", batch, args.tangent_dtype, args.channels_last,
                        "fg" if space else "backprop")
        theirs = their_step(args.authors, space, batch, args.channels_last)
        r = compare({"theirs": theirs, "ours": ours}, args.rounds)
        (t_theirs, m_theirs), (t_ours, m_ours) = r["theirs"], r["ours"]
        print(f"| {label} | {t_theirs:.2f} | {t_ours:.2f} | {t_ours / t_theirs:.2f} | "
              f"{m_theirs / 2**20:.0f} | {m_ours / 2**20:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
