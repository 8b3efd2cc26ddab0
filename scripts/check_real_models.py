"""Check the dual pass of every real model of ``tests/real_models.py`` (all of torchvision's
classification models and a set of timm's) against torch.autograd.forward_ad in float64, train
and eval mode, and write the results as JSON and as a markdown table.

    .venv-models/bin/python -P scripts/check_real_models.py --json benchmarks/real-models.json \\
        --markdown benchmarks/REAL-MODELS.md [--only torchvision/resnet18 ...]

``--compiled`` checks the pass compiled by ``fgkernels.compile`` instead, and counts the graph
breaks of each compile; a compile takes up to minutes per model on a small CPU, so check a set
(``--quick``: the models of ``real_models.QUICK``; ``--only``)::

    .venv-models/bin/python -P scripts/check_real_models.py --compiled --quick \\
        --json benchmarks/real-models-compiled.json --markdown benchmarks/REAL-MODELS-compiled.md

Needs torchvision and timm (``bash scripts/setup.sh --models`` makes ``.venv-models``). A model
is exact when the primal, the tangents and the running statistics are within 1e-10 relative of
forward_ad's.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import fgkernels  # noqa: E402

import real_models  # noqa: E402

EXACT = 1e-10


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write every result here")
    parser.add_argument("--markdown", type=Path, help="write the table here")
    parser.add_argument("--only", nargs="*", help="check only these models")
    parser.add_argument("--quick", action="store_true",
                        help="check only the quick set (tests/real_models.py's QUICK)")
    parser.add_argument("--compiled", action="store_true",
                        help="check the pass compiled by fgkernels.compile")
    args = parser.parse_args(argv)
    models = real_models.catalogue()
    unknown = sorted(set(args.only or ()) - set(models))
    if unknown:
        parser.error(f"not in the catalogue: {', '.join(unknown)}")
    names = args.only or (real_models.QUICK if args.quick else list(models))
    rows = []
    for name in names:
        for training in (True, False):
            row = {"model": name, "mode": "train" if training else "eval"}
            try:
                result = real_models.check(models[name], training, compiled=args.compiled)
                row.update(result, exact=max(result["primal"], result["tangent"],
                                             result["buffers"]) <= EXACT)
            except Exception as e:  # a model that fails is a row of the table, not the end
                row.update(exact=False, error=f"{type(e).__name__}: {str(e).splitlines()[0]}",
                           trace=traceback.format_exc(limit=-3))
            rows.append(row)
            print(_line(row), flush=True)
            if args.json:
                _write_json(args.json, rows, args.compiled)
    if args.markdown:
        args.markdown.write_text(_markdown(rows, args.compiled))
    exact = sum(r["exact"] for r in rows)
    print(f"{exact}/{len(rows)} exact")
    return 0 if exact == len(rows) else 1


def _line(row: dict) -> str:
    if "error" in row:
        return f"{row['model']:40s} {row['mode']:5s} ERROR {row['error']}"
    fallback = ", ".join(sorted(row["fallback"])) or "-"
    breaks = f" graph breaks {row['graph_breaks']}" if "graph_breaks" in row else ""
    return (f"{row['model']:40s} {row['mode']:5s} primal {row['primal']:.1e} tangent "
            f"{row['tangent']:.1e} buffers {row['buffers']:.1e} fallback {fallback}{breaks} "
            f"({row['seconds']:.0f} s)")


def _write_json(path: Path, rows: list, compiled: bool) -> None:
    import torch
    machine = {"python": platform.python_version(), "torch": torch.__version__,
               "fgkernels_backends": fgkernels.available_backends(),
               "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    for lib in ("torchvision", "timm"):
        machine[lib] = __import__(lib).__version__
    path.write_text(json.dumps({"machine": machine, "compiled": compiled, "exact_below": EXACT,
                                "rows": rows}, indent=1))


def _markdown(rows: list, compiled: bool) -> str:
    exact = sum(r["exact"] for r in rows)
    what = "the dual pass compiled by fgkernels.compile" if compiled else "the dual pass"
    extra = " graph breaks |" if compiled else ""
    settings = (" Inductor draws torch's random numbers (`fallback_random`), and the oracle "
                "takes hardsigmoid's exact slope (`exact_hardsigmoid`)." if compiled else "")
    lines = [f"{exact} of {len(rows)} (model, mode) pairs of {what} exact to {EXACT:g} "
             "relative (primal, tangents of the input and of every parameter, running "
             f"statistics), float64, against torch.autograd.forward_ad.{settings}", "",
             "| model | mode | primal | tangent | buffers | ops on the fallback |" + extra,
             "|---|---|---|---|---|---|" + ("---|" if compiled else "")]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['mode']} | error | {r['error']} | | |"
                         + (" |" if compiled else ""))
        else:
            fallback = ", ".join(sorted(r["fallback"])) or "none"
            breaks = f" {r['graph_breaks']} |" if compiled else ""
            lines.append(f"| {r['model']} | {r['mode']} | {r['primal']:.1e} | "
                         f"{r['tangent']:.1e} | {r['buffers']:.1e} | {fallback} |{breaks}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
