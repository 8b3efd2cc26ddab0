"""Command line: ``python -m fgkernels.train run ...`` trains one configuration;
``python -m fgkernels.train demo`` compares backprop, local-only and forward gradients on the
embedded digits data and prints the result table."""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import textwrap
from pathlib import Path
from typing import Optional

import torch

from .checkpoint import check_out_dir, prepare_out_dir
from .cost import measure_step_costs
from .data import DATASETS, load_dataset
from .estimators import GUESSES, NOISES, SPACES, TARGETS
from .loop import ALGOS, DTYPES, TANGENT_DTYPES, TrainConfig, check_batch_norms_see_a_batch, train
from .models import ARCHS, AUX_NETS, aux_flops_share, build_model
from .report import plot_runs, summary_table


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _folder(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("must name a folder, got an empty string")
    return text


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite positive number, got {text!r}")
    return value


def _add_common(p: argparse.ArgumentParser, epochs: int, batch: int, width: Optional[int] = None,
                threads: Optional[int] = None) -> None:
    p.add_argument("--data", choices=DATASETS, default="digits")
    p.add_argument("--data-dir", help="folder holding cifar-10-batches-py/ (for --data cifar10)")
    p.add_argument("--arch", choices=ARCHS, default="cnn")
    p.add_argument("--aux", choices=AUX_NETS, default="cnn", help="auxiliary net of each block")
    p.add_argument("--aux-width", type=_positive_int)
    p.add_argument("--width", type=_positive_int, default=width,
                   help="channels of the first stage" + (f" (default {width})" if width else ""))
    p.add_argument("--epochs", type=_positive_int, default=epochs)
    p.add_argument("--batch-size", type=_positive_int, default=batch)
    p.add_argument("--lr", type=_positive_float, default=0.05)
    p.add_argument("--max-steps", type=_positive_int, help="cap on steps per epoch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="the network's parameters and activations")
    p.add_argument("--tangent-dtype", choices=TANGENT_DTYPES,
                   help="fg: the tangents' dtype (default: --dtype); bfloat16 tangents of a "
                        "float32 network halve their memory traffic")
    p.add_argument("--channels-last", action="store_true",
                   help="the network and its inputs in channels_last memory format")
    p.add_argument("--out", type=_folder, help="folder for metrics.jsonl, checkpoints and plots")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in a non-empty --out (its checkpoint and metrics go)")
    p.add_argument("--plot", action="store_true", help="write PNG plots to --out")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (on a terminal) or line per epoch (elsewhere)")
    p.add_argument("--threads", type=_positive_int, default=threads,
                   help="torch's intra-op threads" + (f" (default {threads})" if threads else
                                                       " (default: torch's choice)"))


# The demo's network: the small CNN at twice its default width.
DEMO_WIDTH = 32
# The demo's cost columns: steps of every run in turn, after warm-up steps (medians).
DEMO_COST_WARMUP, DEMO_COST_ROUNDS = 3, 15


def build_parser() -> argparse.ArgumentParser:
    """The command line: ``run`` (one configuration) and ``demo`` (the comparison table). The
    parsed arguments name their command's parser (``command_parser``), which reports an error
    in their flags with that command's usage."""
    parser = argparse.ArgumentParser(prog="python -m fgkernels.train", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train one configuration")
    run.set_defaults(command_parser=run)
    run.add_argument("--algo", choices=ALGOS, default="fg",
                     help="backprop (end to end), local (greedy local losses), fg (forward "
                          "gradient)")
    run.add_argument("--target", choices=TARGETS, help="fg: the gradient estimated "
                     "(default global)")
    run.add_argument("--guess", choices=GUESSES, help="fg: the direction (default local)")
    run.add_argument("--space", choices=SPACES, help="fg: weight or activity (default weight)")
    run.add_argument("--noise", choices=NOISES,
                     help="fg with --guess random: distribution of the guesses (default "
                          "gaussian)")
    run.add_argument("--diagnose", action="store_true",
                     help="record the cosine between each block's estimate and its true gradient "
                          "(and, with --tangent-dtype narrower than --dtype, to the estimate "
                          "with full-precision tangents)")
    run.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    _add_common(run, epochs=100, batch=128)
    demo = sub.add_parser("demo", help="backprop vs local-only vs forward gradients, on digits")
    demo.set_defaults(command_parser=demo)
    # One thread: on 8×8 images torch's ops are too small for a second one to pay.
    _add_common(demo, epochs=8, batch=64, width=DEMO_WIDTH, threads=1)
    return parser


def _config(args, **overrides) -> TrainConfig:
    return TrainConfig(arch=args.arch, aux=args.aux, aux_width=args.aux_width, width=args.width,
                       data=args.data, data_dir=args.data_dir, epochs=args.epochs,
                       batch_size=args.batch_size, lr=args.lr, max_steps=args.max_steps,
                       seed=args.seed, device=args.device, dtype=args.dtype,
                       tangent_dtype=args.tangent_dtype, channels_last=args.channels_last,
                       **overrides)


DEMO_RUNS = [dict(algo="backprop"), dict(algo="local"),
             dict(algo="fg", guess="random", space="weight"),
             dict(algo="fg", guess="local", space="weight"),
             dict(algo="fg", guess="random", space="activity"),
             dict(algo="fg", guess="local", space="activity")]


FG_FLAGS = {"target": "global", "guess": "local", "space": "weight", "noise": "gaussian"}


def _check_run_flags(parser, args) -> None:
    given = [f"--{n}" for n in FG_FLAGS if getattr(args, n) is not None]
    given += ["--tangent-dtype"] if args.tangent_dtype is not None else []
    if args.algo != "fg" and given:
        parser.error(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} only to "
                     f"--algo fg (got --algo {args.algo})")
    guess = args.guess or FG_FLAGS["guess"]
    if args.noise is not None and guess != "random":
        parser.error(f"--noise applies only to --guess random (got --guess {guess})")
    for name, default in FG_FLAGS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    _check_common_flags(parser, args)
    if (args.plot or args.resume) and not args.out:
        parser.error("--plot and --resume need --out")


def _check_common_flags(parser, args) -> None:
    """The options of both commands that name what another option excludes."""
    if args.data == "cifar10" and not args.data_dir:
        parser.error("--data cifar10 needs --data-dir, the folder holding cifar-10-batches-py/")
    if args.data != "cifar10" and args.data_dir:
        parser.error(f"--data-dir applies only to --data cifar10 (got --data {args.data})")
    if args.aux == "linear" and args.aux_width is not None:
        parser.error("--aux-width applies only to the aux nets with a width (got --aux linear)")


def demo_footnote(args, dataset) -> str:
    """How the demo table's cost columns were measured, and what every run but backprop also
    trains: the aux nets."""
    net = build_model(args.arch, dataset.num_classes, dataset.in_channels, args.aux,
                      args.aux_width, args.width).eval()
    count = lambda modules: sum(p.numel() for m in modules for p in m.parameters())
    share = aux_flops_share(net, dataset.test_x[:1].to(torch.float32))
    return textwrap.fill(
        f"Step time: the median of {DEMO_COST_ROUNDS} steps per run, the runs taking turns "
        f"after {DEMO_COST_WARMUP} warm-up steps each, {torch.get_num_threads()} thread(s); "
        f"peak memory: the allocator's over a step; both relative to backprop's. Every run but "
        f"backprop also trains the aux nets: {count(net.heads[:-1]):,} parameters against the "
        f"blocks' {count(net.blocks):,}, {share:.0%} of their FLOPs. A ResNet-18 step is timed "
        f"by benchmarks/test_training_step.py.", width=100)


# The modules of the trainer's extra (pyproject: fgkernels[train]) and what needs them
TRAIN_EXTRA = {"sklearn": "the digits data", "tqdm": "the progress bars",
               "matplotlib": "the plots"}


def check_train_extra(parser: argparse.ArgumentParser) -> None:
    """Exit with the install command where a module of the trainer's extra is missing (the
    trainer imports each where it first needs it, after minutes of training for the plots)."""
    missing = [f"{name} ({what})" for name, what in TRAIN_EXTRA.items()
               if importlib.util.find_spec(name) is None]
    if missing:
        parser.exit(2, f"the trainer needs fgkernels' [train] extra, which is not installed: "
                       f"pip install \"fgkernels[train]\" (from a checkout: pip install "
                       f"\".[train]\"); missing: {', '.join(missing)}\n")


def main(argv: Optional[list[str]] = None) -> int:
    """Run the command ``argv`` (default: the process's arguments); the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_train_extra(parser)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    # Peak memory is measured with torch.profiler, whose kineto backend otherwise logs every
    # start and stop on stderr.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        import torch.distributed as dist
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
        if args.device.startswith("cuda"):
            args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    rank = int(os.environ.get("RANK", "0"))
    costs = None  # the demo's side-by-side step costs
    try:
        if args.command == "run":
            _check_run_flags(args.command_parser, args)
            cfg = _config(args, algo=args.algo, target=args.target, guess=args.guess,
                          space=args.space, noise=args.noise, diagnose=args.diagnose)
            results = [train(cfg, args.out, args.resume, progress=not args.no_progress,
                             overwrite=args.overwrite)]
        else:
            if args.plot and not args.out:
                args.command_parser.error("--plot needs --out")
            _check_common_flags(args.command_parser, args)
            configs = [_config(args, diagnose=True, **overrides) for overrides in DEMO_RUNS]
            outs = [Path(args.out) / f"run{i}" if args.out else None for i in range(len(configs))]
            # Every run's configuration and folder checked before the first run writes anything
            if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
                raise ValueError(f"--out {args.out} exists and is not a folder")
            for cfg in configs:
                cfg.validate()
            dataset = load_dataset(args.data, args.data_dir, args.seed)
            for cfg, out in zip(configs, outs):
                check_batch_norms_see_a_batch(cfg, dataset)
                if out is not None:
                    check_out_dir(out, False, args.overwrite, resumable=False)
            if args.overwrite:  # every run's old files go at once: no mix of two demos
                for out in outs:
                    if out is not None and out.is_dir():
                        prepare_out_dir(out, False, True)
            results = []
            for i, (cfg, out) in enumerate(zip(configs, outs)):
                if rank == 0:
                    print(f"[{i + 1}/{len(configs)}] {cfg.label}", file=sys.stderr, flush=True)
                results.append(train(cfg, None if out is None else str(out),
                                     progress=not args.no_progress, dataset=dataset,
                                     overwrite=args.overwrite))
            if rank == 0:
                print(f"cost of a step: {DEMO_COST_WARMUP} warm-up steps, then "
                      f"{DEMO_COST_ROUNDS} rounds of one step per run", file=sys.stderr,
                      flush=True)
                costs = measure_step_costs([r.config for r in results], dataset,
                                           DEMO_COST_WARMUP, DEMO_COST_ROUNDS)
        if rank == 0:
            print(summary_table(results, costs))
            if args.command == "demo":
                print(demo_footnote(args, dataset))
            if args.plot:
                for path in plot_runs(results, Path(args.out)):
                    print(f"wrote {path}")
    except (ValueError, OSError, FloatingPointError) as e:  # OSError: FileNotFoundError too
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)
        if distributed:
            import torch.distributed as dist
            dist.destroy_process_group()
    return 0
