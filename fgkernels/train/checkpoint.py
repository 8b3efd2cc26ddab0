"""A run's files in ``--out``: the checkpoint and ``metrics.jsonl``, each written atomically
(a temporary file in the same folder, then a rename over the old one), so that a run killed at
any moment leaves either the old file or the new one, never half of one.

A checkpoint is loaded with ``torch.load(weights_only=True)`` (a crafted file cannot run code)
and carries a SHA-256 digest of its content, checked on load: a damaged file is refused, not
resumed with other weights.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_FORMAT = "fgkernels-train-2"
CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
LOCK_NAME = ".lock"
PLOT_NAMES = ("curves.png", "alignment.png")  # (report.plot_runs)
_KEYS = ("format", "config", "epoch", "model", "optimizer", "scheduler", "history", "sha256")


def content_digest(value: Any) -> str:
    """SHA-256 of a checkpoint's content: tensors by dtype, shape and bytes, containers in a
    fixed order, everything else by its repr."""
    h = hashlib.sha256()

    def feed(v) -> None:
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(v, dict):
            h.update(f"D{len(v)}".encode())
            for k in sorted(v, key=repr):
                feed(k)
                feed(v[k])
        elif isinstance(v, (list, tuple)):
            h.update(f"L{len(v)}".encode())
            for item in v:
                feed(item)
        else:
            h.update(f"V{v!r};".encode())

    feed(value)
    return h.hexdigest()


def write_atomically(path: Path, data: bytes, what: str) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path``; any
    failure leaves ``path`` as it was and raises OSError naming it (a full disk by name)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        reason = "the disk is full" if e.errno == errno.ENOSPC else str(e).splitlines()[0]
        raise OSError(e.errno, f"could not write the {what} {path}: {reason}") from e
    finally:
        if tmp.exists():
            tmp.unlink()


def save_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` (the keys of a training checkpoint but the digest) with its digest."""
    state = {**state, "format": CHECKPOINT_FORMAT}
    state["sha256"] = content_digest({k: v for k, v in state.items() if k != "sha256"})
    buffer = io.BytesIO()  # serialised first: a full disk then fails in a plain write
    torch.save(state, buffer)
    write_atomically(path, buffer.getvalue(), "checkpoint")


def load_checkpoint(path: Path) -> dict:
    """Load and check a checkpoint written by ``save_checkpoint``: nothing in the file runs,
    and a file that is not one, lacks keys or was altered is refused with ValueError."""
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint to resume at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types for a damaged or unsafe file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"checkpoint {path} is corrupt or not a checkpoint: {first}") from e
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an fgkernels training checkpoint "
                         f"(expected format {CHECKPOINT_FORMAT!r})")
    missing = [k for k in _KEYS if k not in state]
    if missing:
        raise ValueError(f"checkpoint {path} lacks {', '.join(missing)}")
    if content_digest({k: v for k, v in state.items() if k != "sha256"}) != state["sha256"]:
        raise ValueError(f"checkpoint {path} is damaged: its content does not match its digest")
    return state


def write_metrics(out_dir: Path, history: list[dict]) -> None:
    """``metrics.jsonl``: one line per epoch of ``history``, replacing the file whole; a value
    that is not finite (the step time of an epoch of one step) is JSON's null."""
    text = "".join(json.dumps(_finite_or_null(record), allow_nan=False) + "\n"
                   for record in history)
    write_atomically(out_dir / METRICS_NAME, text.encode(), "metrics log")


def _finite_or_null(value):
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@contextlib.contextmanager
def run_lock(out_dir: Path) -> Iterator[None]:
    """Hold ``out_dir`` for one run: a second run on the same folder is refused at once (an
    exclusive lock on ``out_dir/.lock``, released when the run ends, however it ends). A folder
    the run made and left holding only the lock, because the run failed, is removed."""
    made = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        with open(out_dir / LOCK_NAME, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise OSError(f"--out {out_dir} is in use by another run; wait for it to end "
                              "or choose another folder") from None
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
    except BaseException:
        if made and all(p.name == LOCK_NAME for p in out_dir.iterdir()):
            (out_dir / LOCK_NAME).unlink(missing_ok=True)
            out_dir.rmdir()
        raise


def check_out_dir(out_dir: Path, resume: bool, overwrite: bool,
                  resumable: bool = True) -> None:
    """Refuse, before anything is made, an ``out_dir`` the run cannot use: a file, a folder
    without a checkpoint to resume, a fresh run's folder that holds files (without
    ``overwrite``), or both ``resume`` and ``overwrite``. ``resumable``: whether the command
    takes --resume, which the refusal of a folder that holds files then suggests."""
    if resume and overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite starts a new one "
                         "there: pass one of them")
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} exists and is not a folder")
    if resume and not (out_dir / CHECKPOINT_NAME).is_file():
        raise FileNotFoundError(f"no checkpoint to resume at {out_dir / CHECKPOINT_NAME}")
    if not resume and not overwrite and out_dir.is_dir() \
            and any(p.name != LOCK_NAME for p in out_dir.iterdir()):
        raise ValueError(f"--out {out_dir} is not empty; " + (
            "pass --resume to continue the run it holds, or --overwrite to start again there"
            if resumable else "pass --overwrite to start again there"))


def prepare_out_dir(out_dir: Path, resume: bool, overwrite: bool) -> None:
    """``check_out_dir``, then, for a fresh run with ``overwrite``, the files a run writes
    removed (the checkpoint, the metrics log and the plots)."""
    check_out_dir(out_dir, resume, overwrite)
    if overwrite:
        for name in (CHECKPOINT_NAME, METRICS_NAME, *PLOT_NAMES):
            (out_dir / name).unlink(missing_ok=True)
