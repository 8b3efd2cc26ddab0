"""The trainer's summary table and plots."""
from __future__ import annotations

import io
import math
import statistics
from pathlib import Path

from .checkpoint import PLOT_NAMES, write_atomically


def _mean_cosine(history: list[dict]) -> float:
    last = history[-1].get("cosine") if history else None
    if not last:
        return float("nan")
    values = [v for v in last.values() if not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")


def _history_cost(r) -> tuple[float, float]:
    """A run's step time (median of its epochs' medians) and its peak memory over the epochs."""
    times = [e["step_time_s"] for e in r.history if not math.isnan(e["step_time_s"])]
    return (statistics.median(times) if times else float("nan"),
            max(e["peak_memory_bytes"] for e in r.history))


def summary_table(results, costs=None) -> str:
    """One row per run: final test accuracy, train loss, step time and peak memory (relative to
    the backprop run when there is one), the mean cosine to the true gradient, and for runs with
    lower-precision tangents the mean cosine to the estimate with full-precision ones.

    ``costs``: a ``StepCost`` per run, measured side by side (``cost.measure_step_costs``), for
    the time and memory columns; without it they come from the runs' own histories."""
    if costs is not None and len(costs) != len(results):
        raise ValueError(f"one cost per run: {len(costs)} costs for {len(results)} runs")
    cost = [(c.step_time_s, c.peak_memory_bytes) for c in costs] if costs is not None else \
        [_history_cost(r) if r.history else (float("nan"), float("nan")) for r in results]
    base = next((i for i, r in enumerate(results) if r.config.algo == "backprop" and r.history),
                None)
    rel = base is not None and len(results) > 1  # (backprop alone: its own ms and MiB)
    head = ["run", "test acc", "train loss",
            "step time" + (" ×bp" if rel else " ms"), "peak mem" + (" ×bp" if rel else " MiB"),
            "cos(est, true)"]
    precision = any(r.history and "cosine_to_full_precision" in r.history[-1] for r in results)
    if precision:
        head.append("cos(est, full-precision est)")
    rows = []
    for r, (t, m) in zip(results, cost):
        h = r.history[-1] if r.history else {}  # a run of no epoch (stopped before its first)
        if rel:
            bt, bm = cost[base]
            time_cell, mem_cell = _cell(t / bt, 2), _cell(m / bm, 2)
        else:  # a run of one step per epoch has no step time (its one step is the warm-up)
            time_cell, mem_cell = _cell(1e3 * t, 1), _cell(m / 2 ** 20, 1)
        cos = _mean_cosine(r.history)
        acc = _cell(100 * h.get("test_acc", float("nan")), 1)
        rows.append([r.config.label, acc if acc == "-" else acc + "%",
                     _cell(h.get("train_loss", float("nan"))), time_cell, mem_cell, _cell(cos)])
        if precision:
            rows[-1].append(_cell(h.get("cosine_to_full_precision", float("nan")), 4))
    widths = [max(len(row[i]) for row in [head] + rows) for i in range(len(head))]
    line = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(head), sep] + [line(r) for r in rows])


def _cell(value: float, digits: int = 3) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


def plot_runs(results, out_dir: Path) -> list[Path]:
    """Test accuracy and train loss per epoch of every run, and each block's alignment."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        epochs = [e["epoch"] for e in r.history]
        ax1.plot(epochs, [100 * e["test_acc"] for e in r.history], marker="o",
                 label=r.config.label)
        ax2.plot(epochs, [e["train_loss"] for e in r.history], marker="o", label=r.config.label)
    ax1.set(xlabel="epoch", ylabel="test accuracy (%)")
    ax2.set(xlabel="epoch", ylabel="train loss", yscale="log")
    ax1.legend(fontsize=7)
    fig.tight_layout()
    curves = out_dir / PLOT_NAMES[0]
    _save(fig, curves)
    paths = [curves]
    aligned = [r for r in results if r.history and r.history[-1].get("cosine")]
    if aligned:
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in aligned:
            cos = r.history[-1]["cosine"]
            ax.plot([int(j) for j in cos], list(cos.values()), marker="o", label=r.config.label)
        ax.set(xlabel="block", ylabel="cosine(estimate, true gradient)")
        ax.axhline(0, color="grey", lw=0.5)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / PLOT_NAMES[1]
        _save(fig, path)
        paths.append(path)
    else:  # (one of an earlier run would pass for this run's)
        (out_dir / PLOT_NAMES[1]).unlink(missing_ok=True)
    return paths


def _save(fig, path: Path) -> None:
    """The figure as a PNG at ``path``, whole or not at all (``write_atomically``)."""
    import matplotlib.pyplot as plt
    png = io.BytesIO()
    try:
        fig.savefig(png, dpi=120, format="png")
    finally:
        plt.close(fig)
    write_atomically(path, png.getvalue(), "plot")
