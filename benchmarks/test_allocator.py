"""allocator.keep_freed_memory: a large block, freed, stays mapped in the process (by default
glibc gives it back to the system at once)."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

_PROBE = textwrap.dedent("""
    import ctypes, ctypes.util, os, sys
    sys.path.insert(0, sys.argv[2])
    from allocator import keep_freed_memory
    if sys.argv[1] == "keep" and not keep_freed_memory():
        sys.exit(3)
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    def resident():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    size = 256 << 20
    before = resident()
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)  # every page touched: mapped
    libc.free(block)
    print(resident() - before)
""")


def _kept_after_free(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", _PROBE, mode, str(Path(__file__).parent)],
                          capture_output=True, text=True)
    if done.returncode == 3:
        pytest.skip("no glibc mallopt here: the allocator is left as it is")
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_freed_memory_stays_mapped_for_reuse():
    assert _kept_after_free("keep") >= 200 << 20
    assert _kept_after_free("default") < 50 << 20
