"""A ResNet block's dual pass compiled with torch.compile (inductor, fullgraph) against the
same pass run eagerly, in the same run (paired rounds)."""
import pytest
import torch

import fgkernels
from fgkernels import Dual
from fgkernels.train.models import BasicBlock

from conftest import DEVICE


@pytest.mark.parametrize("provider", ["compiled", "eager"])
def test_block_dual_pass(measure, quick, provider):
    torch.manual_seed(0)
    cin, cout, batch, size = (4, 8, 2, 8) if quick else (64, 128, 128, 32)
    block = fgkernels.convert(BasicBlock(cin, cout, 2)).to(DEVICE)
    fgkernels.random_tangents(block)
    x = torch.randn(batch, cin, size, size, device=DEVICE)
    xt = torch.randn_like(x)

    @torch.no_grad()
    def eager():
        out = block(Dual(x, xt))
        return out.primal, out.tangents

    torch._dynamo.reset()
    fn = torch.compile(eager, fullgraph=True) if provider == "compiled" else eager
    measure(fn, f"BasicBlock({cin}, {cout}, stride 2) dual pass, batch {batch}, {size}x{size}",
            paired={"eager": eager} if provider == "compiled" else None, track_memory=False)
