"""PeakMemory measures what the allocator held: allocations of known size, views that allocate
nothing, memory freed and reused, and temporaries that live only inside a C++ op."""
import pytest
import torch

import fgkernels
from fgkernels.train.memory import PeakMemory

MiB = 2 ** 20
# Scalars wrapped as 0-dim tensors (``x * 2``) and op bookkeeping: a few bytes, never a MiB.
SLACK = 4096


def test_an_allocation_of_known_size_is_the_peak():
    with PeakMemory() as m:
        kept = torch.empty(3 * MiB, dtype=torch.uint8)
    assert 3 * MiB <= m.peak_bytes <= 3 * MiB + SLACK
    del kept


def test_views_allocate_nothing():
    base = torch.randn(256, 1024)  # 1 MiB, allocated before the region
    with PeakMemory() as m:
        views = [base[1:], base.t(), base.detach(), base.view(-1), base.add_(1)]
    assert m.peak_bytes <= SLACK
    with PeakMemory() as m:
        fresh = base * 2
    assert MiB <= m.peak_bytes <= MiB + SLACK
    del views, fresh


def test_freed_memory_leaves_the_running_total():
    """Two 2 MiB temporaries one after the other peak at 2 MiB, not 4."""
    with PeakMemory() as m:
        for _ in range(2):
            t = torch.ones(2 * MiB, dtype=torch.uint8)
            del t
    assert 2 * MiB <= m.peak_bytes <= 2 * MiB + SLACK


def test_a_temporary_freed_inside_a_cpp_op_counts():
    """dual_relu copies an input that is neither contiguous nor channels_last into its kernel's
    layout, inside the op, and frees the copies before returning: the peak holds the copies
    and the outputs together, twice what the op leaves behind."""
    if "native" not in fgkernels.available_backends():
        pytest.skip("needs the compiled extension")
    x = torch.randn(8, 16, 32, 32).transpose(2, 3)
    xt = torch.randn(2, 8, 16, 32, 32).transpose(3, 4)
    with PeakMemory() as m:
        y, yt = torch.ops.fgkernels.dual_relu(x, xt)
    outputs = y.nbytes + yt.nbytes
    copies = x.nbytes + xt.nbytes
    assert copies + outputs <= m.peak_bytes <= copies + outputs + SLACK


def test_unknown_device_is_refused():
    with pytest.raises(ValueError, match="cpu and cuda"), PeakMemory("meta"):
        pass


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_peak_is_the_caching_allocators():
    held = torch.empty(MiB, dtype=torch.uint8, device="cuda")
    with PeakMemory("cuda") as m:
        t = torch.empty(4 * MiB, dtype=torch.uint8, device="cuda")
        del t
    assert 4 * MiB <= m.peak_bytes < 5 * MiB
    del held
