"""The trainer: learning, resuming, data-parallel runs, and the messages for bad input."""
import copy
import fcntl
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from fgkernels import Dual
from fgkernels.train import data
from fgkernels.train.checkpoint import save_checkpoint
from fgkernels.train.cli import main
from fgkernels.train.data import load_dataset, train_batches
from fgkernels.train.loop import (
    RunResult,
    TrainConfig,
    _record_cosines,
    build_run,
    compute_gradients,
    sgd_step,
    train,
    true_block_gradients,
)
from fgkernels.train.models import build_model

QUICK = dict(arch="cnn", data="digits", width=4, aux_width=8, batch_size=32, max_steps=6,
             lr=0.05)
ALGOS = [dict(algo="backprop"), dict(algo="local"),
         dict(algo="fg", guess="local", space="weight"),
         dict(algo="fg", guess="random", space="weight"),
         dict(algo="fg", guess="local", space="activity"),
         dict(algo="fg", guess="ntk", space="weight", target="above"),
         dict(algo="fg", guess="fixed-ntk", space="activity", target="local")]


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.mark.parametrize("batch_size", [64, 97, 5000])
def test_the_test_set_is_read_whole_and_in_order(digits, batch_size):
    """Evaluation sees every test sample once, the last partial batch included."""
    xs, ys = zip(*data.test_batches(digits, batch_size))
    assert torch.equal(torch.cat(xs), digits.test_x) and torch.equal(torch.cat(ys), digits.test_y)


@pytest.mark.parametrize("overrides", [dict(algo="backprop"),
                                       dict(algo="fg", guess="fixed-ntk", space="weight")],
                         ids=["backprop", "fixed-ntk"])
def test_a_step_leaves_parameters_without_a_gradient_as_they_are(digits, overrides):
    """The aux heads take no gradient in backprop (none reaches them) or with a fixed-NTK guess
    (their nets are never trained): a step moves no weight of theirs, neither by weight decay
    nor by momentum, while the blocks move."""
    cfg = TrainConfig(**QUICK, **overrides)
    net, opt, _ = build_run(cfg, digits)
    heads = [p.detach().clone() for h in net.heads[:-1] for p in h.parameters()]
    blocks = [p.detach().clone() for p in net.blocks.parameters()]
    x, y = next(iter(train_batches(digits, cfg.batch_size, torch.Generator().manual_seed(0))))
    for _ in range(2):
        sgd_step(net, opt, compute_gradients(net, x, y, cfg, torch.Generator())[0])
    assert all(torch.equal(a, p) for a, p in
               zip(heads, (p for h in net.heads[:-1] for p in h.parameters())))
    assert not all(torch.equal(a, p) for a, p in zip(blocks, net.blocks.parameters()))


def _autograd_gradients(net, x, y):
    """Plain autograd's gradients of the global loss on a copy of ``net``, by name: every
    parameter that requires grad and that the loss reaches."""
    ref = copy.deepcopy(net)
    params = {n: p for n, p in ref.named_parameters() if p.requires_grad}
    loss = F.cross_entropy(ref(x), y)
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True) if params else ()
    return {n: g for n, g in zip(params, grads) if g is not None}


@pytest.mark.parametrize("frozen", ["blocks.1.0.weight", "heads.3.3.weight", "all"])
def test_backprop_and_the_true_gradient_leave_a_frozen_parameter_out(digits, frozen):
    """A frozen parameter (requires_grad False), as fg and local take it: backprop's step and
    ``--diagnose``'s true gradient give every other parameter plain autograd's gradient and
    the frozen one none (the true gradient zeros in its place, so that a block's cosine lines
    up its parameters); the step leaves the frozen one as it is."""
    cfg = TrainConfig(**QUICK, algo="backprop", dtype="float64")
    net, opt, _ = build_run(cfg, digits)
    for n, p in net.named_parameters():
        if frozen in (n, "all"):
            p.requires_grad_(False)
    assert not all(p.requires_grad for p in net.parameters())
    x, y = next(iter(train_batches(digits, cfg.batch_size, torch.Generator().manual_seed(0))))
    x = cfg.as_input(x, "cpu")
    expected = _autograd_gradients(net, x, y)
    truth = true_block_gradients(net, x, y)
    for j in range(len(net.blocks)):
        names = list(net.block_parameters(j))
        assert len(truth[j]) == len(names)
        for n, t in zip(names, truth[j]):
            torch.testing.assert_close(t, expected.get(n, torch.zeros_like(t)), rtol=1e-10,
                                       atol=1e-12, msg=n)
    before = {n: p.detach().clone() for n, p in net.named_parameters() if not p.requires_grad}
    grads = compute_gradients(net, x, y, cfg, torch.Generator())[0]
    assert grads.keys() == expected.keys()
    for n, g in grads.items():
        torch.testing.assert_close(g, expected[n], rtol=1e-10, atol=1e-12, msg=n)
    cosines = {}
    _record_cosines(net, grads, truth, cosines)
    if frozen != "all":  # backprop's blocks take their true gradient: a cosine of 1
        assert all(c == [pytest.approx(1.0, rel=1e-12)] for c in cosines.values()), cosines
    sgd_step(net, opt, grads)
    for n, p in net.named_parameters():
        if n in before:
            assert torch.equal(p, before[n]), n


@pytest.mark.parametrize("algo", ALGOS, ids=lambda a: "-".join(a.values()))
def test_short_training_lowers_the_loss(digits, algo):
    cfg = TrainConfig(**QUICK, epochs=3, **algo)
    result = train(cfg, progress=False, dataset=digits)
    losses = [e["train_loss"] for e in result.history]
    assert losses[-1] < losses[0], losses
    for e in result.history:
        assert e["peak_memory_bytes"] > 0 and e["step_time_s"] > 0


def test_resume_continues_bit_for_bit(digits, tmp_path):
    # 4 epochs: the learning rate drops after epochs 1, 2 and 4, so a schedule that restarted
    # at the resume (after epoch 2) would drop it after epoch 3 instead
    cfg = TrainConfig(**QUICK, epochs=4, algo="fg", guess="random", space="weight")
    straight = train(cfg, str(tmp_path / "a"), progress=False, dataset=digits)
    train(cfg, str(tmp_path / "b"), progress=False, dataset=digits, stop_after=2)
    resumed = train(cfg, str(tmp_path / "b"), resume=True, progress=False, dataset=digits)
    for (n, a), (_, b) in zip(straight.model.state_dict().items(),
                              resumed.model.state_dict().items()):
        assert torch.equal(a, b), n
    for key in ("train_loss", "lr"):
        assert [e[key] for e in resumed.history] == [e[key] for e in straight.history], key
    assert [e["lr"] for e in straight.history] == pytest.approx(
        [cfg.lr, cfg.lr * 0.2, cfg.lr * 0.04, cfg.lr * 0.04])
    assert len((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()) == 4
    with pytest.raises(ValueError, match="another configuration"):
        train(TrainConfig(**{**cfg.__dict__, "lr": 0.1}), str(tmp_path / "b"), resume=True,
              progress=False, dataset=digits)


def test_corrupt_checkpoint_is_reported_and_good_one_survives(digits, tmp_path):
    cfg = TrainConfig(**QUICK, epochs=1, algo="backprop")
    train(cfg, str(tmp_path), progress=False, dataset=digits)
    good = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(AttributeError, match="pickle"):  # a write that fails half-way ...
        save_checkpoint(tmp_path / "checkpoint.pt", {"bad": lambda: None})
    assert (tmp_path / "checkpoint.pt").read_bytes() == good  # ... leaves the old file intact
    assert not list(tmp_path.glob("*.tmp"))
    (tmp_path / "checkpoint.pt").write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="corrupt"):
        train(TrainConfig(**{**cfg.__dict__, "epochs": 2}), str(tmp_path), resume=True,
              progress=False, dataset=digits)


@pytest.mark.parametrize("argv,message", [
    (["run", "--algo", "sgd"], ["invalid choice: 'sgd'", "backprop", "local", "fg"]),
    (["run", "--arch", "vgg"], ["invalid choice: 'vgg'", "resnet18-8b", "resnet18-16b", "cnn"]),
    (["run", "--algo", "backprop", "--guess", "local"], ["applies only to --algo fg"]),
    (["run", "--algo", "local", "--guess", "local", "--space", "weight"],
     ["--guess, --space apply only to --algo fg"]),
    (["run", "--out", ""], ["--out: must name a folder, got an empty string"]),
    (["demo", "--out", ""], ["--out: must name a folder, got an empty string"]),
    (["run", "--data-dir", "/nowhere"], ["--data-dir applies only to --data cifar10"]),
    (["demo", "--data-dir", "/nowhere"], ["--data-dir applies only to --data cifar10"]),
    (["run", "--aux", "linear", "--aux-width", "9"], ["--aux-width applies only"]),
    (["run", "--space", "pixel"], ["invalid choice: 'pixel'", "weight", "activity"]),
    (["run", "--guess", "x"], ["invalid choice: 'x'", "random", "ntk", "fixed-ntk"]),
    (["run", "--epochs", "0"], ["must be a positive integer"]),
    (["run", "--data", "cifar10"], ["needs --data-dir"]),
    (["run", "--resume"], ["need --out"]),
    (["run", "--algo", "local", "--tangent-dtype", "bfloat16"], ["applies only to --algo fg"]),
    (["run", "--tangent-dtype", "float16"], ["invalid choice: 'float16'", "bfloat16"]),
])
def test_bad_flags_name_the_valid_choices(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    err = capsys.readouterr().err
    for part in message:
        assert part in err


@pytest.mark.parametrize("flag,value,takes", [
    ("--batch-size", "1.5", "a positive integer"), ("--epochs", "ten", "a positive integer"),
    ("--width", "", "a positive integer"), ("--aux-width", "3.0", "a positive integer"),
    ("--max-steps", "x", "a positive integer"), ("--threads", "two", "a positive integer"),
    ("--lr", "abc", "a finite positive number"),
])
def test_a_value_that_is_no_number_is_refused_naming_what_the_flag_takes(flag, value, takes,
                                                                          capsys):
    with pytest.raises(SystemExit) as stop:
        main(["run", flag, value])
    assert stop.value.code == 2
    assert capsys.readouterr().err.endswith(
        f"run: error: argument {flag}: must be {takes}, got {value!r}\n")


@pytest.mark.parametrize("argv", [
    ["run", "--algo", "local", "--space", "weight"], ["run", "--plot"],
    ["run", "--aux", "linear", "--aux-width", "3"], ["demo", "--plot"],
    ["demo", "--data-dir", "/nowhere"],
])
def test_a_command_s_bad_flags_are_reported_with_its_usage(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    command = f"python -m fgkernels.train {argv[0]}"
    assert err.startswith(f"usage: {command} [-h]") and f"\n{command}: error: " in err, err


@pytest.mark.parametrize("space", ["weight", "activity"])
def test_bfloat16_tangents_in_channels_last(digits, space, monkeypatch):
    """The dual pass takes bfloat16 tangents of the float32 network, in channels_last, and
    learning goes on."""
    import fgkernels.train.loop as loop
    seen, build = [], loop.build_model

    def spied(*args):  # the second block's output carries the first block's direction
        net = build(*args)
        net.blocks[1].register_forward_hook(lambda m, a, out: seen.append(
            (out.tangent_dtype, out.primal.dtype,
             out.primal.is_contiguous(memory_format=torch.channels_last)))
            if isinstance(out, Dual) else None)
        return net

    monkeypatch.setattr(loop, "build_model", spied)
    cfg = TrainConfig(**QUICK, epochs=2, algo="fg", guess="local", space=space,
                      tangent_dtype="bfloat16", channels_last=True)
    result = train(cfg, progress=False, dataset=digits)
    assert seen and set(seen) == {(torch.bfloat16, torch.float32, True)}, set(seen)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


@pytest.mark.parametrize("guess,space", [("local", "activity"), ("random", "activity"),
                                         ("local", "weight")])
def test_diagnose_compares_with_the_full_precision_estimate(digits, guess, space):
    cfg = TrainConfig(**QUICK, epochs=1, algo="fg", guess=guess, space=space,
                      tangent_dtype="bfloat16", diagnose=True)
    result = train(cfg, progress=False, dataset=digits)
    assert 0.99 <= result.history[-1]["cosine_to_full_precision"] <= 1 + 1e-9
    plain = train(TrainConfig(**{**cfg.__dict__, "tangent_dtype": None}), progress=False,
                  dataset=digits)
    assert "cosine_to_full_precision" not in plain.history[-1]


@pytest.mark.parametrize("fast", [False, True])
def test_bfloat16_without_hardware_support_is_warned(digits, fast, monkeypatch, recwarn):
    import fgkernels.train.loop as loop
    monkeypatch.setattr(loop, "fast_bfloat16", lambda device: fast)
    cfg = TrainConfig(**{**QUICK, "max_steps": 1}, epochs=1, tangent_dtype="bfloat16")
    train(cfg, progress=False, dataset=digits)
    warned = [w for w in recwarn if "no bfloat16 arithmetic" in str(w.message)]
    assert len(warned) == (0 if fast else 1)


def test_precision_settings_are_checked():
    with pytest.raises(ValueError, match="wider than the network's dtype bfloat16"):
        TrainConfig(dtype="bfloat16", tangent_dtype="float32").validate()
    with pytest.raises(ValueError, match="unknown dtype 'half'"):
        TrainConfig(dtype="half").validate()
    assert TrainConfig(tangent_dtype="bfloat16").label.endswith("bfloat16 tangents")


def test_missing_cifar_names_expected_files(tmp_path, capsys):
    code = main(["run", "--data", "cifar10", "--data-dir", str(tmp_path), "--no-progress"])
    assert code == 2
    assert "data_batch_1" in capsys.readouterr().err


def test_malformed_cifar_batch_is_reported(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="data_batch_1 is not a CIFAR-10 python batch"):
        load_dataset("cifar10", str(tmp_path))


def test_cli_run_writes_metrics_and_plots(tmp_path, capsys):
    code = main(["run", "--algo", "fg", "--guess", "local", "--epochs", "2", "--width", "4",
                 "--aux-width", "8", "--max-steps", "3", "--batch-size", "32", "--diagnose",
                 "--out", str(tmp_path), "--plot", "--no-progress"])
    assert code == 0
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    record = json.loads(lines[-1])
    assert len(lines) == 2 and set(record["cosine"]) == {"0", "1", "2"}  # the estimated blocks
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert "fg local guess" in capsys.readouterr().out


def _configs_run(monkeypatch) -> list:
    """The configurations the command line trains from now on, each recorded, none trained."""
    import fgkernels.train.cli as cli
    configs = []
    monkeypatch.setattr(cli, "train", lambda cfg, *a, **k: configs.append(cfg) or RunResult(cfg))
    return configs


@pytest.mark.parametrize("argv,guess,noise", [
    (["--guess", "random", "--noise", "rademacher"], "random", "rademacher"),
    (["--guess", "random", "--noise", "gaussian"], "random", "gaussian"),
    (["--guess", "random"], "random", "gaussian"), ([], "local", "gaussian"),
    (["--guess", "ntk"], "ntk", "gaussian"),
])
def test_cli_run_takes_the_noise_of_random_guesses(argv, guess, noise, monkeypatch, capsys):
    """--noise with --guess random, and any guess with the default noise."""
    configs = _configs_run(monkeypatch)
    assert main(["run", *argv, "--no-progress"]) == 0
    assert [(c.guess, c.noise) for c in configs] == [(guess, noise)]


@pytest.mark.parametrize("guess", [[], ["--guess", "local"], ["--guess", "ntk"],
                                   ["--guess", "fixed-ntk"]], ids=lambda g: g[-1] if g else "")
@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
def test_cli_run_refuses_a_noise_without_random_guesses(guess, noise, monkeypatch, capsys):
    """--noise (its default included) with a guess that draws no noise: refused, naming it."""
    configs = _configs_run(monkeypatch)
    with pytest.raises(SystemExit) as stop:
        main(["run", *guess, "--noise", noise, "--no-progress"])
    assert stop.value.code == 2 and not configs
    assert (f"run: error: --noise applies only to --guess random (got --guess "
            f"{guess[-1] if guess else 'local'})") in capsys.readouterr().err


def test_demo_prints_every_run_and_what_the_cost_columns_compare(capsys):
    code = main(["demo", "--epochs", "1", "--max-steps", "2", "--width", "4", "--aux-width", "8",
                 "--batch-size", "32", "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    labels = ["backprop", "local", "fg random guess, weight space", "fg local guess, weight space",
              "fg random guess, activity space", "fg local guess, activity space"]
    rows = [line for line in out.splitlines() if line.startswith("| ") and "test acc" not in line]
    assert [row.split("|")[1].strip().split(", global")[0] for row in rows] == labels
    digits = load_dataset("digits")
    net = build_model("cnn", digits.num_classes, digits.in_channels, "cnn", 8, 4)
    aux = sum(p.numel() for head in net.heads[:-1] for p in head.parameters())
    blocks = sum(p.numel() for p in net.blocks.parameters())
    assert f"{aux:,} parameters against the blocks' {blocks:,}" in " ".join(out.split())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_processes(tmp_path, body: str) -> list[subprocess.CompletedProcess]:
    """Run ``body`` in two processes of one gloo process group (``cfg``, ``train`` and the
    folder ``root`` given), each bounded in time: a process left waiting fails the test."""
    script = tmp_path / "rank.py"
    script.write_text(
        "import os, sys, torch, torch.distributed as dist\n"
        "from fgkernels.train import loop\n"
        "from fgkernels.train.loop import TrainConfig, train\n"
        "dist.init_process_group('gloo')\n"
        f"cfg = TrainConfig(**{QUICK!r}, epochs=1, algo='fg', guess='local')\n"
        "root = sys.argv[1]\n"
        "try:\n" + textwrap.indent(body, "    ") + "finally:\n"
        "    dist.destroy_process_group()\n")
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path)], text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
             for r in range(2)]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    return [subprocess.CompletedProcess(p.args, p.returncode, *out)
            for p, out in zip(procs, outs)]


def test_two_processes_keep_identical_weights_and_one_writes_the_run(tmp_path):
    """Two processes (gloo) train with an --out folder: the same weights on both, process 0
    holds and writes the folder (each taking its lock refused the other)."""
    runs = _run_two_processes(tmp_path, (
        "net = train(cfg, root + '/run', progress=False).model\n"
        "flat = torch.cat([t.flatten().double() for t in net.state_dict().values()])\n"
        "torch.save(flat, root + f'/rank{dist.get_rank()}.pt')\n"))
    assert [r.returncode for r in runs] == [0, 0], [r.stderr[-2000:] for r in runs]
    a, b = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert torch.equal(a, b)
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
    assert (tmp_path / "run" / "metrics.jsonl").is_file()


def test_a_folder_process_0_cannot_take_stops_every_process(tmp_path):
    """Process 0 refuses an --out folder another run holds; process 1, whose own check of the
    folder passes, stops with it and says why (it went on to its first collective call, where
    gloo reported a broken connection and NCCL would wait)."""
    (tmp_path / "run").mkdir()
    with open(tmp_path / "run" / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        runs = _run_two_processes(tmp_path, "train(cfg, root + '/run', progress=False)\n")
    assert "is in use by another run" in runs[0].stderr, runs[0].stderr[-2000:]
    assert "another process of the run refused out_dir" in runs[1].stderr, runs[1].stderr[-2000:]
    assert all(r.returncode != 0 for r in runs)  # (gloo may abort a process as it exits)


def test_a_non_finite_loss_in_one_process_stops_every_process(tmp_path):
    """A loss that is not finite in process 1 alone stops both processes, each saying so,
    before any step is taken (process 0 went on to its step's all_reduce, where gloo reported
    a broken connection and NCCL would wait)."""
    runs = _run_two_processes(tmp_path, (
        "steps = loop.compute_gradients\n"
        "def nan_in_rank_1(*args):\n"
        "    grads, loss, ok = steps(*args)\n"
        "    return grads, float('nan') if dist.get_rank() == 1 else loss, ok\n"
        "loop.compute_gradients = nan_in_rank_1\n"
        "train(cfg, progress=False)\n"))
    assert "the training loss is nan" in runs[1].stderr, runs[1].stderr[-2000:]
    assert "the training loss is not finite in another process" in runs[0].stderr, \
        runs[0].stderr[-2000:]
    assert all(r.returncode != 0 for r in runs)  # (gloo may abort a process as it exits)
