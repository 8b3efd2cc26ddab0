"""A first look at every GPU kernel variant: a handful of launches each, against forward_ad.

    python3 scripts/gpu_smoke.py [--json FILE] [--device cuda]

Each case runs the fused Triton convolution (through ``fgkernels.functional`` on the triton
backend: its primal and tangent launches, the batch-norm sums and the Triton batch-norm apply)
or the native CUDA kernels, at a small shape, and compares primal and tangents with
``torch.autograd.forward_ad`` in float64: the error may be at most twice torch's own error in
the case's dtype (forward_ad run in that dtype) plus a small floor. The cases cover every
dtype (float32 with TF32 and with full precision, bfloat16, float16, bfloat16 slots of a
float32 primal), every slot role (input, parameter, appended, same slots, bias alone), both
layouts, batch-norm sums on and off, and the stem's three channels. Exits 1 if any case fails,
so a broken launch is seen before the longer tests run. (``--device cpu`` with
``TRITON_INTERPRET=1`` runs the same cases in Triton's interpreter: a dry run of the script.)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fgkernels  # noqa: E402
import fgkernels.functional as DF  # noqa: E402
from fgkernels import Dual  # noqa: E402
from fgkernels.testing import forward_ad_jvp, round_to_tf32  # noqa: E402

FLOOR = {torch.float32: 1e-5, torch.bfloat16: 2e-3, torch.float16: 1e-3}


@dataclass
class Case:
    name: str
    backend: str
    dtype: str       # fp32, fp32-ieee, bf16, fp16, fp32+bf16
    role: str        # input, param, appended, same, bias-only
    slots: int
    layout: str      # nchw, channels_last
    bn: bool
    bias: bool
    shape: tuple = (4, 16, 10, 9, 32, 3, 1, 1)  # N, C, H, W, C_out, k, stride, padding


CASES = [
    Case("fp32 same", "triton", "fp32", "same", 2, "nchw", True, True),
    Case("fp32 ieee appended", "triton", "fp32-ieee", "appended", 2, "channels_last", True,
         False),
    Case("bf16 input nchw", "triton", "bf16", "input", 2, "nchw", False, True),
    Case("bf16 same channels_last", "triton", "bf16", "same", 2, "channels_last", True, False),
    Case("fp16 param", "triton", "fp16", "param", 1, "channels_last", False, True),
    Case("fp32+bf16 param", "triton", "fp32+bf16", "param", 1, "nchw", True, True),
    Case("fp32+bf16 same", "triton", "fp32+bf16", "same", 2, "channels_last", True, True),
    # (with a batch norm after it, a bias tangent alone gives a zero tangent: nothing to compare)
    Case("fp32 bias-only", "triton", "fp32", "bias-only", 1, "channels_last", False, True),
    Case("fp32 stem k7 s2", "triton", "fp32", "input", 1, "channels_last", True, False,
         (2, 3, 20, 20, 16, 7, 2, 3)),
    Case("bf16 stem nchw", "triton", "bf16", "appended", 1, "nchw", True, False,
         (2, 3, 12, 12, 16, 3, 1, 1)),
    Case("native fp32 nchw", "native", "fp32", "same", 2, "nchw", True, True),
    Case("native bf16 channels_last", "native", "bf16", "appended", 1, "channels_last", True,
         False),
    Case("native fp32+bf16 channels_last", "native", "fp32+bf16", "same", 2, "channels_last",
         True, False),
]


def _dtypes(label: str):
    primal = {"fp32": torch.float32, "fp32-ieee": torch.float32, "bf16": torch.bfloat16,
              "fp16": torch.float16, "fp32+bf16": torch.float32}[label]
    return primal, torch.bfloat16 if label == "fp32+bf16" else primal


def run_case(case: Case, device: torch.device) -> dict:
    """The case's errors against forward_ad in float64, and torch's own in the case's dtype."""
    g = torch.Generator(device=device).manual_seed(0)
    N, C, H, W, CO, k, s, p = case.shape
    T = case.slots
    primal, tangent = _dtypes(case.dtype)
    fmt = torch.channels_last if case.layout == "channels_last" else torch.contiguous_format
    rand = lambda *shape: torch.randn(shape, generator=g, device=device, dtype=torch.float64)
    x, w = rand(N, C, H, W), rand(CO, C, k, k) / (C * k * k) ** 0.5
    b = rand(CO) if case.bias else None
    gamma, beta = rand(CO).abs() + 0.5, rand(CO)
    xt = rand(T, N, C, H, W) if case.role in ("input", "appended", "same") else None
    wt = rand(T, CO, C, k, k) / (C * k * k) ** 0.5 if case.role in ("param", "appended", "same") \
        else None
    bt = rand(T, CO) if case.bias and case.role in ("param", "appended", "same", "bias-only") \
        else None

    def fn(x_, w_, b_):
        y = F.conv2d(x_, w_, b_, s, p)
        return F.relu(F.batch_norm(y, None, None, gamma.to(y.dtype), beta.to(y.dtype), True)) \
            if case.bn else y

    # forward_ad in float64 (the oracle) and in the case's dtype (torch's own error), with the
    # tangents of each role on their own slots: appended slots are input slots then parameter
    # slots, zero elsewhere.
    zeros_x, zeros_w = torch.zeros_like(x), torch.zeros_like(w)
    if case.role == "appended":
        full_x = torch.cat([xt, zeros_x.expand(T, *x.shape)])
        full_w = torch.cat([zeros_w.expand(T, *w.shape), wt])
        full_b = None if bt is None else torch.cat([torch.zeros_like(bt), bt])
    else:
        full_x, full_w, full_b = xt, wt, bt
    exact = forward_ad_jvp(fn, [x, w, b], [full_x, full_w, full_b])
    low = lambda t, dt: None if t is None else t.to(dt)
    # torch's own error: forward_ad wholly in the primal's dtype (for the primal) and wholly in
    # the tangents' (for the tangents): torch takes no tangent narrower than its primal.
    in_dtype = lambda dt: forward_ad_jvp(fn, [low(x, dt), low(w, dt), low(b, dt)],
                                         [low(full_x, dt), low(full_w, dt), low(full_b, dt)])
    torch_primal = in_dtype(primal)
    torch_tangent = torch_primal if tangent == primal else in_dtype(tangent)

    cast_x = lambda t, dt: None if t is None else t.to(dt).contiguous(memory_format=fmt) \
        if t.dim() == 4 else _slots(t.to(dt), fmt)
    xd, wd, bd = cast_x(x, primal), w.to(primal).contiguous(memory_format=fmt), low(b, primal)
    xtd, wtd, btd = cast_x(xt, tangent), None if wt is None else _slots(wt.to(tangent), fmt), \
        low(bt, tangent)
    if case.role == "appended":
        args = (Dual(xd, xtd, directions=list(range(T))),
                Dual(wd, wtd, directions=list(range(T, 2 * T))),
                None if bd is None else Dual(bd, btd, directions=list(range(T, 2 * T))))
    else:
        args = (Dual(xd, xtd), Dual(wd, wtd), None if bd is None else Dual(bd, btd))
    with cudnn_fp32_precision("ieee" if case.dtype == "fp32-ieee" else "tf32"), \
            fgkernels.use_backend(case.backend):
        start = time.perf_counter()
        if case.bn:
            out = DF.conv2d_batch_norm(*args, s, p, 1, 1, None, None, gamma.to(primal),
                                       beta.to(primal), True, 0.1, 1e-5, True)
        else:
            out = DF.conv2d(*args, s, p)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    result = {"seconds": seconds, "ok": True}
    # Where TF32 is allowed the kernels' float32 products are TF32 (cuDNN's may not be), on
    # operands the tensor cores truncate: the floor is then the error of the products of
    # truncated operands.
    tf32 = case.dtype != "fp32-ieee" and device.type == "cuda" and torch.float32 in (
        out.primal.dtype, out.tangents.dtype)
    tf32_exact = forward_ad_jvp(
        fn, [round_to_tf32(t, truncate=True) for t in (x, w, b)],
        [round_to_tf32(t, truncate=True) for t in (full_x, full_w, full_b)]) if tf32 else None
    for index, (part, ours, theirs) in enumerate((("primal", out.primal, torch_primal[0]),
                                                  ("tangent", out.tangents, torch_tangent[1]))):
        oracle = exact[index]
        err, err_torch = _rel(ours, oracle), _rel(theirs, oracle)
        if tf32 and ours.dtype == torch.float32:
            err_torch = max(err_torch, _rel(tf32_exact[index], oracle))
        bound = 2 * err_torch + FLOOR[ours.dtype]
        result[part] = {"err": err, "err_torch": err_torch, "bound": bound,
                        "dtype": str(ours.dtype)}
        result["ok"] &= err <= bound
    expected = (primal, tangent)
    result["ok"] &= (out.primal.dtype, out.tangents.dtype) == expected
    return result


@contextlib.contextmanager
def cudnn_fp32_precision(value: str):
    """cuDNN's float32 convolution precision (``"tf32"`` or ``"ieee"``) inside the block."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is None:  # torch before the fp32_precision API
        previous = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = value == "tf32"
    else:
        previous = conv.fp32_precision
        conv.fp32_precision = value
    try:
        yield
    finally:
        if conv is None:
            torch.backends.cudnn.allow_tf32 = previous
        else:
            conv.fp32_precision = previous


def _slots(t, fmt):
    if fmt == torch.channels_last:
        return t.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    return t.contiguous()


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device")
        return 2
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"gpu_smoke on {where}; backends {fgkernels.available_backends()}")
    rows = []
    for case in CASES:
        try:
            r = run_case(case, device)
        except Exception as e:  # a failing launch is a result: report it, go on
            r = {"ok": False, "error": f"{type(e).__name__}: {e}"[:500]}
        rows.append({**asdict(case), **r})
        detail = r.get("error") or " ".join(
            f"{part} {r[part]['err']:.2e} (bound {r[part]['bound']:.2e})"
            for part in ("primal", "tangent"))
        print(f"{'ok  ' if r['ok'] else 'FAIL'} {case.name:34} {detail}", flush=True)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
    failed = sum(not r["ok"] for r in rows)
    print(f"gpu_smoke: {len(rows) - failed}/{len(rows)} cases ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
