"""Peak tensor memory of a region of code, on the CPU as on CUDA.

CUDA: the caching allocator's peak. CPU: a dispatch mode sees every tensor an op creates and
watches its storage until it is freed; the peak of the live bytes created inside the region is
what the region needed beyond what existed before it (parameters, inputs).
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _data_ptr(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except RuntimeError:
        return -1


class _StorageTracker(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # Views and in-place results share an input's storage: they allocate nothing.
        inputs = {_data_ptr(t) for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                self._track(t.untyped_storage(), inputs)
        return out

    def _track(self, storage, inputs: set) -> None:
        try:
            key, size = storage.data_ptr(), storage.nbytes()
        except RuntimeError:  # no data of its own (a wrapper): nothing allocated
            return
        if size == 0 or key in self.live or key in inputs:
            return
        self.live[key] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)


class PeakMemory:
    """``with PeakMemory(device) as m: ...`` then ``m.peak_bytes``: the most tensor memory held
    at once by tensors created inside the block."""

    def __init__(self, device="cpu"):
        self.device = torch.device(device)
        self.peak_bytes = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._tracker = _StorageTracker()
            self._tracker.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._tracker.__exit__(*exc)
            self.peak_bytes = self._tracker.peak
