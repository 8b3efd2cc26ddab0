"""The C allocator held steady while timing: freed memory stays in the process for reuse.

glibc's malloc serves a large block by mapping fresh pages and unmaps them when it is freed
(it also gives back the top of its heap), adjusting its threshold for that as it goes. A call
then pays page faults for whatever an earlier call gave back, so its time depends on what ran
before it: forward_ad's pass, which allocates many large temporaries, runs markedly slower right
after a dual pass than after itself, and a paired ratio (the baseline timed right before each
round) would flatter the dual pass. With every block served from the heap and nothing given
back, each call reuses memory already mapped, whatever ran before it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt's parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Make glibc's malloc serve every block from its heap (``M_MMAP_MAX`` 0) and never trim
    it (``M_TRIM_THRESHOLD`` -1), for the rest of the process. Returns whether it did: False
    where the C library has no ``mallopt`` (not Linux, or not glibc), which leaves the allocator
    as it is. (An allocator preloaded in glibc's place, jemalloc or tcmalloc, is not told: it
    keeps its own policy.)"""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, -1))
