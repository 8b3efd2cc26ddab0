"""Peak memory of a region of code, as the allocator saw it, on the CPU as on CUDA.

CUDA: the caching allocator's own peak (``torch.cuda.max_memory_allocated``, reset on entry).
CPU: the CPU allocator reports every allocation and free to ``torch.profiler`` when it profiles
memory; the running total of those events, in time order, peaks at what the region needed
beyond what existed before it. Both see every tensor allocation, those made and freed inside a
compiled op or a C++ kernel included, and none of the views that allocate nothing.

What is counted is bytes allocated, written or not. On the CPU an allocation that is never
written may take no physical memory (the pages of a large one are only mapped when first
touched), so an op that allocates more than it writes peaks higher here than in the process's
resident memory (torch 2.13's CPU batch-norm backward of a channels_last input allocates a
second tensor of its input gradient's size that it never writes).
"""
from __future__ import annotations

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

# The profiler's name for an allocator event (torch.autograd.profiler's MEMORY_EVENT_NAME).
_MEMORY_EVENT = "[memory]"
_CPU_DEVICES = (DeviceType.CPU, DeviceType.MKLDNN, DeviceType.IDEEP)


def peak_of_memory_events(events) -> int:
    """The peak of the running total of the CPU allocator's events (kineto events: ``name()``,
    ``device_type()``, ``nbytes()`` > 0 for an allocation and < 0 for a free, ``start_ns()``)."""
    mem = sorted((e for e in events if e.name() == _MEMORY_EVENT and
                  e.device_type() in _CPU_DEVICES), key=lambda e: e.start_ns())
    total = peak = 0
    for e in mem:
        total += e.nbytes()
        peak = max(peak, total)
    return peak


class PeakMemory:
    """``with PeakMemory(device) as m: ...`` then ``m.peak_bytes``: the most memory the
    allocator held at once inside the block beyond what it held on entry.

    On the CPU the block runs under ``torch.profiler`` (its first use in a process takes
    seconds, later ones milliseconds, and it slows the ops it watches): measure a step, do not
    time it. It cannot be nested in another profiler."""

    def __init__(self, device="cpu"):
        self.device = torch.device(device)
        self.peak_bytes = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.device.type == "cpu":
            self._profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._profile.__enter__()
        else:
            raise ValueError(f"PeakMemory measures cpu and cuda devices, not {self.device}")
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._profile.__exit__(*exc)
            self.peak_bytes = peak_of_memory_events(self._profile.profiler.kineto_results.events())
