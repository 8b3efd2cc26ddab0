"""The summary of a GPU check (``scripts/gpu_check.sh``): one table of its parts, the key
ratios of its benchmarks with their share of the roofline, and the benchmark tables.

    python3 scripts/gpu_summary.py OUT_DIR [STATUS_FILE]

Reads what the parts left in OUT_DIR (smoke.json, tests.xml, bench-*.json, profile.txt,
report.json); STATUS_FILE holds one line per part: its name, exit code (or ``skipped``) and
seconds. Prints markdown: the lines to put in ``benchmarks/RESULTS-gpu.md`` once a run has
produced them.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

# (group prefix, provider, baseline, goal): the ratios the check is about.
RATIOS = [
    ("conv3x3", "fgkernels-triton", "composition", 0.8),
    ("conv3x3", "fgkernels-native", "composition", None),
    ("conv+bn+relu", "fgkernels-triton", "forward_ad", None),
    ("conv+bn+relu", "fgkernels-native", "forward_ad", None),
    ("bn+relu", "fgkernels-native", "forward_ad", 0.5),
    ("resnet18 loss JVP", "fgkernels-triton", "forward_ad", 0.85),
    ("resnet18 loss JVP", "fgkernels-native", "forward_ad", 0.85),
    ("resnet18 loss JVP", "fgkernels-triton", "backprop", 1.0),
    ("resnet18 loss JVP", "fgkernels-native", "backprop", 1.0),
    ("resnet18 graphed loss JVP", "fgkernels-triton", "forward_ad", 0.85),
    ("resnet18 graphed loss JVP", "fgkernels-native", "forward_ad", 0.85),
    ("resnet18 graphed loss JVP", "fgkernels-triton", "backprop", 1.0),
    ("resnet18 graphed loss JVP", "fgkernels-native", "backprop", 1.0),
    ("resnet18 compiled loss JVP", "fgkernels-native", "forward_ad", 0.85),
    ("resnet18 compiled loss JVP", "fgkernels-native", "backprop", 1.0),
    ("resnet18 compiled loss JVP", "fgkernels-native-cudagraphs", "forward_ad", 0.85),
    ("resnet18 compiled loss JVP", "fgkernels-native-cudagraphs", "backprop", 1.0),
]


def machine() -> str:
    """The card and the software versions, as this machine reports them."""
    try:
        card = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                               "--format=csv,noheader"], capture_output=True, text=True,
                              timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        card = "no nvidia-smi"
    try:
        import torch
        import triton
        versions = (f"torch {torch.__version__} (CUDA {torch.version.cuda}), "
                    f"triton {triton.__version__}")
    except ImportError as e:
        versions = f"({e})"
    return f"{card or 'no GPU'}; {versions}"


def part_results(out: Path) -> dict[str, str]:
    """A one-line result per part, from the files it wrote."""
    results = {}
    smoke = _json(out / "smoke.json")
    if smoke is not None:
        results["smoke"] = f"{sum(r['ok'] for r in smoke)}/{len(smoke)} cases within bounds"
    if (out / "tests.xml").exists():
        try:
            suites = ET.parse(out / "tests.xml").getroot()
            suites = [suites] if suites.tag == "testsuite" else list(suites)
            count = {k: sum(int(s.get(k, 0)) for s in suites)
                     for k in ("tests", "failures", "errors", "skipped")}
            passed = count["tests"] - count["failures"] - count["errors"] - count["skipped"]
            results["tests"] = (f"{passed} passed, {count['failures']} failed, "
                                f"{count['errors']} errors, {count['skipped']} skipped")
        except ET.ParseError:
            results["tests"] = "tests.xml unreadable"
    counts = {}
    for part in ("layers", "network", "compiled"):
        bench = _json(out / f"bench-{part}.json")
        if bench:
            counts[part] = len(bench["benchmarks"])
            results[part] = f"{counts[part]} benchmarks"
    if "layers" in counts or "network" in counts:
        results["bench"] = " + ".join(str(counts[p]) for p in ("layers", "network")
                                      if p in counts) + " benchmarks"
    profile = out / "profile.txt"
    if profile.exists():
        last = [line for line in profile.read_text().splitlines() if line.strip()]
        results["profile"] = last[-1] if last else "empty"
    report = _json(out / "report.json")
    if report:
        results["report"] = "; ".join(
            f"sm_{arch}: {s['clean']}/{s['launches']} launches clean, max {s['max_registers']} "
            f"registers, pipelined {s['reductions_pipelined']}"
            for arch, s in report["summary"].items())
    return results


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def parts_table(status: Path, results: dict[str, str]) -> list[str]:
    lines = ["| part | status | seconds | result |", "|---|---|---|---|"]
    rows = status.read_text().split("\n") if status and status.exists() else []
    for row in filter(None, rows):
        name, code, seconds = row.split()
        state = "skipped" if code == "skipped" else "ok" if code == "0" else \
            "timed out" if code in ("124", "137") else f"FAILED (exit {code})"
        lines.append(f"| {name} | {state} | {seconds} | {results.get(name, '')} |")
    return lines


def ratio_table(benches: list[dict]) -> list[str]:
    """Per ratio of ``RATIOS`` and benchmark group: the median time ratio, the paired ratio
    where the run paired rounds, the share of the roofline, and the peak memory ratio."""
    groups: dict[str, dict[str, dict]] = {}
    for data in benches:
        for b in data["benchmarks"]:
            provider = str((b.get("params") or {}).get("provider") or b["name"])
            groups.setdefault(b["group"], {})[provider] = b
    lines = ["| group | provider | × baseline (median) | paired | goal | % roofline | "
             "peak MiB | memory × baseline |", "|---|---|---|---|---|---|---|---|"]
    for prefix, provider, baseline, goal in RATIOS:
        for group in sorted(g for g in groups if g.startswith(prefix + " ")):
            rows = groups[group]
            if provider not in rows or baseline not in rows:
                continue
            ours, base = rows[provider], rows[baseline]
            ratio = ours["stats"]["median"] / base["stats"]["median"]
            paired = (ours.get("extra_info", {}).get("paired") or {}).get(baseline)
            roof = ours.get("extra_info", {}).get("roofline_s")
            share = f"{100 * roof / ours['stats']['median']:.0f} %" if roof else "–"
            mem, base_mem = (r.get("extra_info", {}).get("peak_memory_bytes") for r in
                             (ours, base))
            mem_ratio = f"{mem / base_mem:.2f}×" if mem and base_mem else "–"
            paired_cell = f"{paired['ratio']:.2f}×" if paired else "–"
            goal_cell = f"≤ {goal:.2f}×" if goal else "–"
            lines.append(f"| {group} | {provider} | {ratio:.2f}× {baseline} | {paired_cell} | "
                         f"{goal_cell} | {share} | {(mem or 0) / 2 ** 20:.0f} | {mem_ratio} |")
    return lines


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0])
    status = Path(args[1]) if len(args) > 1 else None
    lines = ["# fgkernels GPU check", "", f"Machine: {machine()}.", ""]
    lines += parts_table(status, part_results(out)) if status else []
    benches = [b for b in (_json(p) for p in sorted(out.glob("bench-*.json"))) if b]
    if benches:
        lines += ["", "## Key ratios", "",
                  "Median time against a baseline timed in the same run (paired: the median "
                  "of per-round ratios, each round right after its baseline); % roofline: the "
                  "roofline time (benchmarks/roofline.py, H200 peaks at the measured copy "
                  "bandwidth) over the median time.", ""]
        lines += ratio_table(benches)
        from report import section
        for path in sorted(out.glob("bench-*.json")):
            try:
                text, _ = section(path)
            except (KeyError, ValueError) as e:
                text = f"({path.name}: {e})"
            lines += ["", text]
    smoke = [r for r in _json(out / "smoke.json") or [] if "tangent" in r]
    if smoke:
        worst = max(r["tangent"]["err"] / r["tangent"]["bound"] for r in smoke)
        seconds = statistics.median(r["seconds"] for r in smoke)
        lines += ["", f"Smoke: the worst tangent error is {worst:.2f} of its bound (median "
                  f"{seconds:.3f} s per case, its compiles included)."]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
