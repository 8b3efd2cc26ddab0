"""Every published ratio comes from a committed run: README's figures block and RESULTS.md are
what benchmarks/report.py makes of the committed benchmark JSON, and every ratio in README or
RESULTS-gpu.md is one a committed run's files hold (the authors' comparison's included)."""
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))
import report  # noqa: E402

CPU_RUN = BENCH / "cpu-results.json"  # README's figures block comes from this one
# Every committed CPU run, in RESULTS.md's order (PREAMBLE.md says what each holds).
CPU_RUNS = [CPU_RUN, BENCH / "cpu-overhead.json", BENCH / "cpu-real-models.json",
            BENCH / "cpu-overhead-avx2.json", BENCH / "cpu-recurrent.json",
            BENCH / "cpu-real-models-eager.json", BENCH / "cpu-real-models-bf16.json",
            BENCH / "cpu-bn-small-maps.json"]
# A ratio as the documents write it: "0.75×", or the first number of a range "0.50–0.79×".
RATIO = re.compile(r"(\d+\.\d\d)(?=×|–\d)")


def ratios(text: str) -> set[str]:
    return set(RATIO.findall(text))


def test_readme_figures_block_is_the_committed_runs(monkeypatch):
    monkeypatch.chdir(ROOT)
    readme = (ROOT / "README.md").read_text()
    start = readme.index(report.FIGURES_BEGIN)
    end = readme.index(report.FIGURES_END) + len(report.FIGURES_END)
    assert readme[start:end] == report.readme_block(CPU_RUN.relative_to(ROOT)), \
        "README's figures block is stale: run benchmarks/report.py with --readme"


def test_results_md_is_generated_from_the_committed_run(monkeypatch):
    monkeypatch.chdir(ROOT)
    text, _ = report.results_markdown([run.relative_to(ROOT) for run in CPU_RUNS],
                                      BENCH / "PREAMBLE.md")
    assert (BENCH / "RESULTS.md").read_text() == text, \
        "RESULTS.md is stale: run benchmarks/report.py (see PREAMBLE.md)"


@pytest.fixture
def gpu_run_ratios() -> set[str]:
    return set().union(*(ratios(p.read_text()) for p in BENCH.glob("gpu-runs/*/*")
                         if p.suffix in (".md", ".txt")))


def test_every_readme_ratio_is_backed(gpu_run_ratios):
    readme = (ROOT / "README.md").read_text()
    backed = ratios((BENCH / "RESULTS.md").read_text()) | gpu_run_ratios \
        | ratios((BENCH / "authors-comparison-cpu.md").read_text())
    assert ratios(readme) - backed == set()


def test_every_gpu_ratio_is_backed(gpu_run_ratios):
    assert ratios((BENCH / "RESULTS-gpu.md").read_text()) - gpu_run_ratios == set()
