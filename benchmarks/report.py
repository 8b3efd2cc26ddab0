"""Turn pytest-benchmark JSON files into benchmarks/RESULTS.md and a PNG of the ratios.

    python benchmarks/report.py cpu.json [gpu.json ...] -o benchmarks/RESULTS.md \
        --plot benchmarks/results.png

Each file (one machine, one run) becomes a section: per benchmark group, the median time of
every provider, its ratio to each baseline measured in the same run, and its peak memory.
"""
from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

BASELINES = ("primal", "forward_ad", "func_jvp", "backprop")


def _provider(bench: dict) -> str:
    params = bench.get("params") or {}
    return str(params.get("provider") or params.get("algo") or bench["name"])


def load_groups(path: Path) -> tuple[dict, dict[str, dict[str, dict]]]:
    """(machine info, {group: {provider: {"median_s", "peak_bytes"}}})."""
    data = json.loads(Path(path).read_text())
    groups: dict[str, dict[str, dict]] = defaultdict(dict)
    for b in data["benchmarks"]:
        groups[b["group"]][_provider(b)] = {
            "median_s": b["stats"]["median"],
            "peak_bytes": b.get("extra_info", {}).get("peak_memory_bytes"),
            "paired": b.get("extra_info", {}).get("paired"),
        }
    info = dict(data.get("machine_info", {}))
    info["datetime"] = data.get("datetime", "")
    return info, dict(groups)


def _fmt_ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}×" if b and not math.isnan(a) else "–"


def section(path: Path) -> tuple[str, dict]:
    """The markdown of one run, and its groups (for the plot)."""
    info, groups = load_groups(path)
    cpu = info.get("cpu", {}).get("brand_raw") or info.get("processor", "")
    lines = [f"## {info.get('device', cpu)} — {Path(path).name}", "",
             f"CPU {cpu}, {info.get('threads', '?')} threads; torch {info.get('torch', '?')}, "
             f"triton {info.get('triton', '?')}; backends {info.get('fgkernels_backends', '?')}; "
             f"run {info.get('datetime', '')[:19]}.", ""]
    for group in sorted(groups):
        rows = groups[group]
        bases = [b for b in BASELINES if b in rows]
        head = ["provider", "median ms"] + [f"× {b}" for b in bases] + ["peak MiB"]
        if "backprop" in rows:
            head.append("mem × backprop")
        lines += [f"### {group}", "", "| " + " | ".join(head) + " |",
                  "|" + "---|" * len(head)]
        for name, r in sorted(rows.items(), key=lambda kv: kv[1]["median_s"]):
            cells = [name, f"{1e3 * r['median_s']:.2f}"]
            cells += [_fmt_ratio(r["median_s"], rows[b]["median_s"]) for b in bases]
            peak = r["peak_bytes"]
            cells.append("–" if peak is None else f"{peak / 2 ** 20:.1f}")
            if "backprop" in rows:
                bp = rows["backprop"]["peak_bytes"]
                cells.append(_fmt_ratio(peak, bp) if peak is not None and bp else "–")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        paired = [f"{name} {p['ratio']:.2f}× {base} [{', '.join(f'{q:.2f}' for q in p['ratios'])}]"
                  for name, r in sorted(rows.items()) for base, p in (r["paired"] or {}).items()]
        if paired:
            lines += ["Paired rounds (each round right after baseline calls of its own; median "
                      "of the per-round ratios, all ratios in brackets): " + "; ".join(paired)
                      + ".", ""]
    return "\n".join(lines), groups


def plot(all_groups: list[tuple[str, dict]], out: Path) -> None:
    """Bars: each provider's time relative to backprop (or to the primal), per group."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [(title, g, rows) for title, groups in all_groups for g, rows in sorted(groups.items())
              if "backprop" in rows or "primal" in rows]
    if not panels:
        return
    cols = 3
    rows_n = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(5 * cols, 3 * rows_n), squeeze=False)
    for ax, (title, group, rows) in zip(axes.flat, panels):
        base = "backprop" if "backprop" in rows else "primal"
        names = sorted(rows, key=lambda n: rows[n]["median_s"])
        ax.barh(names, [rows[n]["median_s"] / rows[base]["median_s"] for n in names])
        ax.axvline(1, color="k", lw=0.6)
        ax.set_title(f"{group}\n({title})", fontsize=8)
        ax.set_xlabel(f"time × {base}", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", type=Path)
    parser.add_argument("-o", "--output", type=Path, default=Path("benchmarks/RESULTS.md"))
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--preamble", type=Path, help="markdown put before the tables")
    args = parser.parse_args(argv)
    parts, groups = [], []
    for path in args.json:
        text, g = section(path)
        parts.append(text)
        groups.append((path.stem, g))
    head = "# fgkernels benchmark results\n\n"
    if args.preamble:
        head += args.preamble.read_text().strip() + "\n\n"
    args.output.write_text(head + "\n".join(parts))
    if args.plot:
        plot(groups, args.plot)


if __name__ == "__main__":
    main()
