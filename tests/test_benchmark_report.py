"""benchmarks/report.py: the tables and paired-round lines it writes from pytest-benchmark JSON."""
import importlib.util
import json
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "benchmark_report", Path(__file__).parents[1] / "benchmarks" / "report.py")
report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report)


def _bench(provider, median_s, peak, paired=None):
    extra = {"peak_memory_bytes": peak}
    if paired:
        extra["paired"] = paired
    return {"group": "step", "name": f"test_step[{provider}]", "params": {"provider": provider},
            "stats": {"median": median_s}, "extra_info": extra}


def test_report_ratios_memory_and_paired_rounds(tmp_path):
    run = {"machine_info": {"device": "CPU", "threads": 2}, "datetime": "2026-11-27T12:00:00",
           "benchmarks": [
               _bench("backprop", 2.0, 4 * 2 ** 20),
               _bench("fgkernels-native", 3.0, 2 ** 20,
                      {"backprop": {"ratio": 1.4, "ratios": [1.3, 1.4, 1.6],
                                    "baseline_median_s": 2.1}})]}
    path = tmp_path / "run.json"
    path.write_text(json.dumps(run))
    text, groups = report.section(path)
    assert "| fgkernels-native | 3000.00 | 1.50× | 1.0 | 0.25× |" in text
    assert "| backprop | 2000.00 | 1.00× | 4.0 | 1.00× |" in text
    assert "fgkernels-native 1.40× backprop [1.30, 1.40, 1.60]" in text
    assert set(groups["step"]) == {"backprop", "fgkernels-native"}
    out = tmp_path / "RESULTS.md"
    report.main([str(path), "-o", str(out)])
    assert out.read_text().startswith("# fgkernels benchmark results")


def test_report_gives_the_floor_the_baselines_products_set(tmp_path):
    """A baseline's share of time in convolutions and matrix products is printed as the ratio
    to it that no pass computing them as fast gets below."""
    forward_ad = _bench("forward_ad", 2.0, 2 ** 20)
    forward_ad["extra_info"]["products_share"] = 0.764
    run = {"machine_info": {"device": "CPU"}, "datetime": "2026-11-27T12:00:00",
           "benchmarks": [forward_ad, _bench("fgkernels", 1.6, 2 ** 20)]}
    path = tmp_path / "run.json"
    path.write_text(json.dumps(run))
    text, _ = report.section(path)
    assert "forward_ad spends 0.76 of its pass in convolutions and matrix products" in text
    assert "no pass gets below about 0.76× forward_ad" in text
    assert text.count("spends") == 1  # a provider without the share prints none


def test_report_says_how_the_machine_computes_bfloat16(tmp_path):
    """A run on a CPU without bfloat16 instructions leaves its bfloat16 cases out; one with
    them keeps them and says so."""
    texts = {}
    for fast in (False, True):
        run = {"machine_info": {"device": "CPU", "threads": 2, "cpu_capability": "AVX512",
                                "fast_bfloat16": fast},
               "datetime": "2026-12-01T12:00:00",
               "benchmarks": [dict(_bench("forward_ad", 2.0, 2 ** 20), group="bf16 step"),
                              dict(_bench("fgkernels-native", 1.0, 2 ** 20), group="bf16 step")]}
        path = tmp_path / f"run{fast}.json"
        path.write_text(json.dumps(run))
        texts[fast], groups = report.section(path)
        assert bool(groups) == fast
    assert "no bfloat16 instructions" in texts[False] and "bf16 step" not in texts[False]
    assert "with bfloat16 instructions" in texts[True] and "| fgkernels-native" in texts[True]


def test_report_says_how_the_allocator_ran(tmp_path):
    """A run that kept freed memory says so; one that could not says its calls may pay page
    faults; an older run, which recorded nothing, gets neither line."""
    texts = {}
    for steady in (True, False, None):
        info = {"device": "CPU", "threads": 2}
        if steady is not None:
            info["steady_allocator"] = steady
        path = tmp_path / f"run-{steady}.json"
        path.write_text(json.dumps({"machine_info": info, "datetime": "2026-12-02T12:00:00",
                                    "benchmarks": [_bench("backprop", 2.0, 2 ** 20)]}))
        texts[steady] = report.section(path)[0]
    assert "Freed memory kept in the process" in texts[True]
    assert "may pay page faults" in texts[False]
    assert "allocator" not in texts[None]


def test_report_names_the_commit_each_run_measured(tmp_path):
    """Runs of different commits sit in one RESULTS.md: each section names its commit, and
    says when the tree had uncommitted changes."""
    lines = {}
    for dirty in (False, True):
        run = {"machine_info": {"device": "CPU"}, "datetime": "2026-11-27T12:00:00",
               "commit_info": {"id": "589cdec9a0b1", "dirty": dirty},
               "benchmarks": [_bench("fgkernels", 1.0, 2 ** 20)]}
        path = tmp_path / f"run-{dirty}.json"
        path.write_text(json.dumps(run))
        lines[dirty] = report.section(path)[0].splitlines()[2]
    assert lines[False].endswith("run 2026-11-27T12:00:00 at commit 589cdec.")
    assert lines[True].endswith("at commit 589cdec (with uncommitted changes).")
