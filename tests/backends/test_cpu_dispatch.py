"""The compiled extension runs on any x86-64 CPU and still uses wide vectors where the CPU has
them: read from its machine code (objdump), not from timings. Only the x86-64-v3 (AVX2, FMA)
and x86-64-v4 (AVX-512) versions of the hot loops use 256-bit registers; the baseline versions
and everything else stay within SSE2, so the loader's choice is all that depends on the CPU."""
import os
import platform
import re
import shutil
import subprocess
from collections import defaultdict

import pytest

import fgkernels

pytestmark = pytest.mark.skipif(
    platform.machine() != "x86_64" or shutil.which("objdump") is None
    or "native" not in fgkernels.available_backends()
    or os.environ.get("FGKERNELS_NATIVE_ARCH") == "1",
    reason="needs the compiled extension, built for any x86-64 CPU, and objdump")

WIDE = re.compile(r"%[yz]mm\d+")
FMA = re.compile(r"\bvfn?m(add|sub)\w*")


@pytest.fixture(scope="module")
def functions() -> dict[str, list[str]]:
    """The extension's functions, by demangled name, each with its instructions."""
    from fgkernels import _C
    out = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", _C.__file__],
                         capture_output=True, text=True, check=True).stdout
    code, name = defaultdict(list), None
    for line in out.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            name = header.group(1)
        elif name and "\t" in line:
            code[name].append(line.split("\t", 1)[1])
    return code


def _clones(functions, kernel: str) -> dict[str, list[str]]:
    """The versions of ``kernel`` (a substring of the name), by clone suffix."""
    found = {}
    for name, code in functions.items():
        if kernel in name and "resolver" not in name:
            suffix = re.search(r"\[clone \.(\w+)\]", name)
            found[suffix.group(1) if suffix else "plain"] = code
    return found


@pytest.mark.parametrize("kernel", [
    "BlockSums<float, float, float>::run(",
    "ApplySpan<float, float, float>::planes(",
    "ApplySpan<float, float, float>::rows(",
    "pool_row_nchw<float>",
    "pool_row_nhwc<float>"])
def test_hot_loops_have_a_baseline_an_avx2_and_an_avx512_version(functions, kernel):
    versions = _clones(functions, kernel)
    assert set(versions) == {"default", "arch_x86_64_v3", "arch_x86_64_v4"}, set(versions)
    assert not any(WIDE.search(i) for i in versions["default"])
    for isa in ("arch_x86_64_v3", "arch_x86_64_v4"):
        assert any(WIDE.search(i) for i in versions[isa]), f"{kernel} {isa}: no 256-bit code"
    if "ApplySpan" in kernel:  # y = s·(x − m) + h: a fused multiply-add where the CPU has one
        assert not any(FMA.search(i) for i in versions["default"])
        assert any(FMA.search(i) for i in versions["arch_x86_64_v3"])


def test_every_select_op_has_a_baseline_an_avx2_and_an_avx512_version(functions):
    """The span of every elementwise select op (csrc/cpu/select_op.h), float32 primal with
    float32 and 16-bit tangents."""
    spans = {m.group(1) for name in functions
             for m in [re.search(r"select_span<(.*<float>, unsigned (int|short))>", name)] if m}
    assert any("::Relu<" in span for span in spans), sorted(spans)
    for span in sorted(spans):
        test_hot_loops_have_a_baseline_an_avx2_and_an_avx512_version(functions, span)


def test_nothing_but_the_wide_versions_needs_more_than_sse2(functions):
    """A wheel built on an AVX-512 machine runs on any x86-64 CPU: no AVX outside the clones
    the loader picks by the CPU's capability."""
    offenders = [name for name, code in functions.items()
                 if "arch_x86_64_v" not in name and any(WIDE.search(i) for i in code)]
    assert not offenders, offenders[:5]
