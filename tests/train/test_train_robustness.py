"""The trainer under kills, damaged or hostile checkpoints, full disks and diverging runs:
one line per epoch in the log, nothing loaded that was altered, nothing in a file executed,
one-line errors."""
import errno
import json
import pickle
import re

import numpy as np
import pytest
import torch

from fgkernels.train import checkpoint
from fgkernels.train.checkpoint import load_checkpoint, save_checkpoint
from fgkernels.train.cli import main
from fgkernels.train.data import Dataset, load_dataset
from fgkernels.train.loop import RunResult, TrainConfig, train
from fgkernels.train.report import summary_table

QUICK = dict(arch="cnn", data="digits", width=4, aux_width=8, batch_size=32, max_steps=3,
             lr=0.05, algo="backprop")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _epochs(folder):
    return [json.loads(line)["epoch"] for line in (folder / "metrics.jsonl").read_text()
            .splitlines()]


def test_a_kill_between_checkpoint_and_log_repeats_no_epoch(digits, tmp_path, monkeypatch):
    cfg = TrainConfig(**QUICK, epochs=4)
    real = checkpoint.write_metrics
    calls = []

    def killed_on_second(out_dir, history):  # the process dies right after epoch 2's checkpoint
        calls.append(len(history))
        if len(history) == 2:
            raise KeyboardInterrupt
        real(out_dir, history)

    monkeypatch.setattr("fgkernels.train.loop.write_metrics", killed_on_second)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, str(tmp_path), progress=False, dataset=digits)
    monkeypatch.setattr("fgkernels.train.loop.write_metrics", real)
    assert _epochs(tmp_path) == [1]
    result = train(cfg, str(tmp_path), resume=True, progress=False, dataset=digits)
    assert _epochs(tmp_path) == [1, 2, 3, 4]
    assert [e["epoch"] for e in result.history] == [1, 2, 3, 4]
    assert [e["epoch"] for e in load_checkpoint(tmp_path / "checkpoint.pt")["history"]] == \
        [1, 2, 3, 4]


def test_a_fresh_run_refuses_a_folder_holding_another(digits, tmp_path, capsys):
    cfg = TrainConfig(**QUICK, epochs=1)
    train(cfg, str(tmp_path), progress=False, dataset=digits)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(ValueError, match="is not empty; pass --resume .* or --overwrite"):
        train(cfg, str(tmp_path), progress=False, dataset=digits)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    train(cfg, str(tmp_path), progress=False, dataset=digits, overwrite=True)
    assert _epochs(tmp_path) == [1]
    argv = ["run", "--algo", "backprop", "--epochs", "1", "--max-steps", "2", "--width", "4",
            "--aux-width", "8", "--out", str(tmp_path), "--no-progress"]
    assert main(argv) == 2 and "is not empty" in capsys.readouterr().err
    assert main(argv + ["--overwrite"]) == 0


def test_a_damaged_checkpoint_is_refused(digits, tmp_path):
    cfg = TrainConfig(**QUICK, epochs=1)
    train(cfg, str(tmp_path), progress=False, dataset=digits)
    path = tmp_path / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    weight = next(iter(state["model"].values()))
    weight.view(-1)[:16] += 1.0  # 64 bytes of one tensor changed, the file well-formed
    torch.save(state, path)
    with pytest.raises(ValueError, match="damaged: its content does not match its digest"):
        train(TrainConfig(**{**cfg.__dict__, "epochs": 2}), str(tmp_path), resume=True,
              progress=False, dataset=digits)


def test_the_digest_tells_apart_content_with_the_same_bytes():
    """A checkpoint whose bytes are all there but arranged otherwise (a tensor reshaped or
    reinterpreted, a key renamed, list items regrouped) is damaged too; equal content has
    one digest."""
    w = torch.arange(6, dtype=torch.float32)
    state = {"model": {"w": w}, "history": [[1, 2], [3]]}
    same = {"model": {"w": w.clone()}, "history": [[1, 2], [3]]}
    assert checkpoint.content_digest(state) == checkpoint.content_digest(same)
    for changed in ({"model": {"w": w.view(2, 3)}, "history": [[1, 2], [3]]},
                    {"model": {"w": w.view(torch.int32)}, "history": [[1, 2], [3]]},
                    {"model": {"v": w}, "history": [[1, 2], [3]]},
                    {"model": {"w": w}, "history": [[1], [2, 3]]}):
        assert checkpoint.content_digest(changed) != checkpoint.content_digest(state)


class _Payload:
    """Unpickling this runs ``open(marker, 'w')``: the code a crafted checkpoint would run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_a_crafted_checkpoint_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "checkpoint.pt"
    with open(path, "wb") as f:
        pickle.dump({"format": checkpoint.CHECKPOINT_FORMAT, "x": _Payload(marker)}, f)
    torch.save({"format": checkpoint.CHECKPOINT_FORMAT, "x": _Payload(marker)},
               tmp_path / "zip.pt")
    marker.unlink(missing_ok=True)  # torch.save above pickled it, which runs nothing
    for candidate in (path, tmp_path / "zip.pt"):
        with pytest.raises(ValueError, match="corrupt or not a checkpoint"):
            load_checkpoint(candidate)
    assert not marker.exists()


def test_missing_keys_and_full_disk_give_one_line_errors(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": checkpoint.CHECKPOINT_FORMAT, "config": {}}, path)
    with pytest.raises(ValueError, match="lacks epoch, model, optimizer, scheduler, history"):
        load_checkpoint(path)
    good = path.read_bytes()

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.os, "fsync", full_disk)
    with pytest.raises(OSError, match=r"could not write the checkpoint .*: the disk is full") as e:
        save_checkpoint(path, {"config": {}})
    assert "\n" not in str(e.value) and e.value.errno == errno.ENOSPC
    assert path.read_bytes() == good and not list(tmp_path.glob("*.tmp"))


def test_a_second_run_on_one_folder_is_refused_at_once(digits, tmp_path):
    cfg = TrainConfig(**QUICK, epochs=1)
    with checkpoint.run_lock(tmp_path):  # another run holds the folder
        with pytest.raises(OSError, match="is in use by another run"):
            train(cfg, str(tmp_path), progress=False, dataset=digits)
    assert not (tmp_path / "checkpoint.pt").exists()
    train(cfg, str(tmp_path), progress=False, dataset=digits)  # free again: runs
    train(cfg, str(tmp_path), resume=True, progress=False, dataset=digits)


@pytest.mark.parametrize("overrides,kwargs,error,message", [
    (dict(device="nodevice"), {}, ValueError, "unknown device 'nodevice'"),
    (dict(device="meta"), {}, ValueError, "unknown device 'meta'"),
    (dict(device="cuda:7"), {}, ValueError, "device cuda:7: this torch"),
    (dict(batch_size=5000), {}, ValueError, "batch size 5000 is larger than the training set"),
    ({}, dict(resume=True), FileNotFoundError, "no checkpoint to resume"),
    ({}, dict(resume=True, overwrite=True), ValueError, "pass one of them"),
    (dict(data="cifar10", data_dir="/nonexistent"), {}, FileNotFoundError, "CIFAR-10 not found"),
    (dict(arch="vgg"), {}, ValueError, "unknown arch 'vgg'"),
    (dict(aux="rnn"), {}, ValueError, "unknown aux net 'rnn'"),
    (dict(width=0), {}, ValueError, "width must be a positive int, got 0"),
    (dict(aux_width=2.5), {}, ValueError, "aux_width must be a positive int, got 2.5"),
    (dict(epochs=1.5), {}, ValueError, "epochs must be an int of at least 1, got 1.5"),
    (dict(batch_size=64.0), {}, ValueError, "batch_size must be an int of at least 1, got 64.0"),
    (dict(max_steps=1.5), {}, ValueError, "max_steps must be an int of at least 1, got 1.5"),
    (dict(batch_size=1, aux="mlp", algo="local"), {}, ValueError,
     r"batch size 1 is too small for cnn with mlp aux heads on \(1, 8, 8\) images: a batch "
     r"norm would see one value per channel"),
], ids=["device", "meta device", "absent GPU", "batch size", "resume without checkpoint",
        "resume and overwrite", "no cifar", "arch", "aux", "width", "aux width", "float epochs",
        "float batch size", "float max_steps", "one value per channel"])
def test_a_run_refused_makes_nothing(tmp_path, digits, overrides, kwargs, error, message):
    """Bad arguments, data or --out are refused with an error that names them, before the
    run's folder is made."""
    cfg = TrainConfig(**{**QUICK, "epochs": 1, **overrides})
    out = tmp_path / "run"
    with pytest.raises(error, match=message):
        train(cfg, str(out), progress=False, **kwargs,
              dataset=None if "data" in overrides else digits)
    assert not out.exists()


def test_resume_without_a_folder_is_refused_by_name(digits):
    with pytest.raises(ValueError, match="resume=True needs out_dir"):
        train(TrainConfig(**QUICK, epochs=1), resume=True, progress=False, dataset=digits)


def test_the_demo_refuses_a_run_s_folder_before_any_run_writes(tmp_path, capsys):
    """A later run's folder that holds files (run3/) is refused before run0 trains: nothing
    written, and the refusal names the flag the demo takes (it takes no --resume)."""
    (tmp_path / "run3").mkdir()
    (tmp_path / "run3" / "old.txt").write_text("a run of another demo")
    argv = ["demo", "--epochs", "1", "--max-steps", "2", "--width", "4", "--no-progress",
            "--out", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "run3 is not empty; pass --overwrite" in err and "--resume" not in err
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) \
        == ["run3", "run3/old.txt"]


def test_the_demo_refuses_a_batch_a_later_run_cannot_train_before_any_run(tmp_path, capsys):
    """A batch size that leaves a later run's aux head one value per channel (mlp heads,
    batch 1: the backprop run trains no head) is refused before run0 writes anything."""
    argv = ["demo", "--epochs", "1", "--max-steps", "2", "--width", "4", "--no-progress",
            "--aux", "mlp", "--batch-size", "1", "--out", str(tmp_path)]
    assert main(argv) == 2
    assert "batch size 1 is too small" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_the_demo_refuses_a_file_as_its_folder_before_any_run(tmp_path, capsys):
    """``demo --out`` naming a file is refused by name before run0 starts (a raw OSError of
    its first run, after the demo's first line, told neither what nor where)."""
    target = tmp_path / "a-file"
    target.write_text("not a folder")
    argv = ["demo", "--epochs", "1", "--max-steps", "2", "--width", "4", "--no-progress",
            "--out", str(target)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"--out {target} exists and is not a folder" in err and "[1/" not in err
    assert target.read_text() == "not a folder"


def test_the_demo_with_overwrite_clears_every_run_s_files_before_the_first_run(tmp_path,
                                                                            monkeypatch):
    """``demo --overwrite`` over an earlier demo removes every run's checkpoint, metrics and
    plots before its first run trains: a demo stopped part way leaves no folder of the
    earlier one beside its own (each run's folder was cleared only as that run began)."""
    for i in range(6):
        (tmp_path / f"run{i}").mkdir()
        for name in ("metrics.jsonl", "checkpoint.pt", "curves.png", "alignment.png"):
            (tmp_path / f"run{i}" / name).write_text("an earlier demo's")

    def stopped(*args, **kwargs):
        raise OSError("stopped in the first run")

    monkeypatch.setattr("fgkernels.train.cli.train", stopped)
    argv = ["demo", "--epochs", "1", "--max-steps", "2", "--width", "4", "--no-progress",
            "--out", str(tmp_path), "--overwrite"]
    assert main(argv) == 2
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_a_plot_of_an_earlier_run_does_not_outlive_it(tmp_path):
    """``overwrite`` removes the plots with the checkpoint and the metrics; a plot without
    alignment removes an earlier run's alignment plot."""
    for name in ("curves.png", "alignment.png", "notes.txt"):
        (tmp_path / name).write_text("an earlier run's")
    checkpoint.prepare_out_dir(tmp_path, resume=False, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    from fgkernels.train.report import plot_runs
    (tmp_path / "alignment.png").write_text("an earlier run's")
    record = {"epoch": 1, "test_acc": 0.5, "train_loss": 1.0}
    paths = plot_runs([RunResult(TrainConfig(**QUICK), history=[record])], tmp_path)
    assert [p.name for p in paths] == ["curves.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "notes.txt"]


def test_a_demo_seed_out_of_range_is_refused_by_name(capsys):
    """The demo checks its runs' configurations before it loads the data (whose shuffle
    refused a huge seed with torch's own overflow message)."""
    assert main(["demo", "--seed", "99999999999999999999", "--no-progress"]) == 2
    assert "seed must be an int in [0, 2**32)" in capsys.readouterr().err


@pytest.mark.parametrize("overrides", [dict(arch="vgg"), dict(aux="rnn"), dict(width=0),
                                       dict(batch_size=1, aux="mlp", algo="local")],
                         ids=["arch", "aux", "width", "one value per channel"])
def test_a_bad_model_with_overwrite_leaves_the_old_run(tmp_path, digits, overrides):
    """``overwrite`` replaces a run only once the new one is known to start: a model argument
    that build_model refuses, or a batch its batch norms cannot train on, leaves the old run's
    files as they were."""
    cfg = TrainConfig(**{**QUICK, "epochs": 1})
    train(cfg, str(tmp_path), progress=False, dataset=digits)
    before = {f.name: f.read_bytes() for f in tmp_path.iterdir() if f.is_file()}
    with pytest.raises(ValueError, match=next(iter(overrides)).replace("_", " ")):
        train(TrainConfig(**{**QUICK, "epochs": 1, **overrides}), str(tmp_path), progress=False,
              dataset=digits, overwrite=True)
    assert {f.name: f.read_bytes() for f in tmp_path.iterdir() if f.is_file()} == before


def test_an_epoch_of_one_step_writes_null_and_the_table_a_dash(tmp_path, digits):
    """An epoch of one step has no step time (its one step is the warm-up): metrics.jsonl
    holds JSON's null, which any JSON parser reads, and the table a dash."""
    result = train(TrainConfig(**{**QUICK, "max_steps": 1, "epochs": 1}), str(tmp_path),
                   progress=False, dataset=digits)
    line = (tmp_path / "metrics.jsonl").read_text().splitlines()[0]
    record = json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in {line}"))
    assert record["step_time_s"] is None and record["samples_per_s"] is None
    row = summary_table([result]).splitlines()[-1]
    assert row.split("|")[4].strip() == "-"


def test_stop_after_zero_runs_no_epoch_and_the_table_shows_dashes(digits):
    """``stop_after=0`` stops before the first epoch (it ran every epoch), and the summary
    table gives such a run a row of dashes (it raised IndexError)."""
    result = train(TrainConfig(**{**QUICK, "epochs": 2}), progress=False, dataset=digits,
                   stop_after=0)
    assert result.history == []
    cells = [c.strip() for c in summary_table([result]).splitlines()[-1].split("|")[2:-1]]
    assert cells == ["-"] * 5


@pytest.mark.parametrize("stop_after", [-1, True, 1.5])
def test_a_bad_stop_after_is_refused_before_anything_is_written(tmp_path, digits, stop_after):
    with pytest.raises(ValueError, match="stop_after must be an int >= 0"):
        train(TrainConfig(**{**QUICK, "epochs": 1}), str(tmp_path / "run"), progress=False,
              dataset=digits, stop_after=stop_after)
    assert not (tmp_path / "run").exists()


def test_parameters_gone_non_finite_stop_the_run_before_they_are_saved(tmp_path, digits):
    """One step at an absurd learning rate leaves no finite parameter: the epoch's test loss
    says so and the run stops (with one step the training loss never saw it)."""
    cfg = TrainConfig(**{**QUICK, "max_steps": 1, "epochs": 1, "lr": 1e30})
    with pytest.raises(FloatingPointError, match="test loss is nan"):
        train(cfg, str(tmp_path), progress=False, dataset=digits)
    assert not (tmp_path / "checkpoint.pt").exists()


@pytest.mark.parametrize("data,labels,message", [
    (np.zeros((2, 1000), np.uint8), [0, 1], "one row of 3×32×32 = 3072"),
    (np.full((2, 3072), 300), [0, 1], r"pixel values must be integers in \[0, 255\]"),
    (np.zeros((2, 3072), np.uint8), [0], "2 images but labels of shape"),
], ids=["rows", "pixels", "labels"])
def test_malformed_cifar_rows_pixels_and_labels_are_named(tmp_path, data, labels, message):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels}, f)
    with pytest.raises(ValueError, match=message):
        load_dataset("cifar10", str(tmp_path))


def test_labels_outside_the_classes_and_bad_seeds_are_refused_before_training(digits):
    bad = torch.tensor([0, 10])
    with pytest.raises(ValueError, match=r"labels must be int64 classes in \[0, 10\)"):
        Dataset(digits.train_x[:2], bad, digits.test_x, digits.test_y, 10)
    for seed in (-1, 2 ** 40, 1.5):
        with pytest.raises(ValueError, match="seed must be an int in"):
            TrainConfig(seed=seed).validate()


@pytest.mark.parametrize("field,value,message", [
    ("lr", "0.1", "lr must be a real number, got '0.1'"),
    ("lr", True, "lr must be a real number, got True"),
    ("momentum", None, "momentum must be a real number, got None"),
    ("weight_decay", "x", "weight_decay must be a real number, got 'x'"),
    ("device", None, "unknown device None; the trainer runs on cpu or cuda[:index]"),
    ("device", 1.5, "unknown device 1.5; the trainer runs on cpu or cuda[:index]"),
    ("dtype", ["float32"], "unknown dtype ['float32']; choose one of"),
    ("diagnose", "no", "diagnose must be a bool, got 'no'"),
    ("channels_last", 1, "channels_last must be a bool, got 1"),
    ("noise", "rademacher", "noise 'rademacher' applies only to guess 'random' (got guess "
                            "'local')"),
])
def test_a_field_of_the_wrong_type_is_refused_by_name(field, value, message):
    """validate() raises ValueError naming the field and its value, whatever the value's type
    (a flag that is no bool: ``diagnose="no"`` was taken as true), and a noise that the guess
    does not draw (ignored before, as the CLI refuses it)."""
    with pytest.raises(ValueError, match=re.escape(message)):
        TrainConfig(**{field: value}).validate()


def test_a_diverging_run_stops_naming_the_step(digits, tmp_path, capsys):
    with pytest.raises(FloatingPointError, match=r"epoch 1, step \d+: the training loss is"):
        train(TrainConfig(**{**QUICK, "lr": 1e30, "max_steps": 20}, epochs=1), progress=False,
              dataset=digits)
    for lr in ("inf", "nan", "-1"):
        with pytest.raises(SystemExit):
            main(["run", "--lr", lr])
        assert "must be a finite positive number" in capsys.readouterr().err
    with pytest.raises(ValueError, match="lr must be finite"):
        train(TrainConfig(**{**QUICK, "lr": float("inf")}), progress=False, dataset=digits)


def test_the_trainer_without_its_extra_names_the_install_command(monkeypatch, capsys):
    """A module of the [train] extra missing: the trainer stops before it trains, with the
    install command and what is missing (a traceback from deep in the data loader before, or
    from the plots after the runs)."""
    import importlib.util
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "sklearn" else find_spec(name, *a))
    with pytest.raises(SystemExit) as stop:
        main(["demo", "--epochs", "1"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert 'pip install "fgkernels[train]"' in err and "missing: sklearn (the digits data)" in err
