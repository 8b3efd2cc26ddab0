"""torch.compile over a converted model's dual pass: the whole pass is one graph
(``fullgraph=True``: no graph break, the ops' fakes registered at import) and computes what
eager computes, running statistics included."""
import copy

import pytest
import torch

import fgkernels
from fgkernels import Dual
from fgkernels.zoo import BasicBlock


def _block_and_pass(training: bool):
    torch.manual_seed(0)
    block = fgkernels.convert(BasicBlock(4, 8, 2)).train(training)
    fgkernels.random_tangents(block, num_tangents=2)

    def dual_pass(model, x, xt):
        out = model(Dual(x, xt))
        return out.primal, out.tangents

    return block, dual_pass


@pytest.mark.parametrize("backend", [b for b in fgkernels.available_backends()
                                     if b != "triton"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_compiled_dual_pass_of_a_resnet_block_equals_eager(backend, training):
    block, dual_pass = _block_and_pass(training)
    eager_block = copy.deepcopy(block)  # tangents are per step: a copy has none of its own
    fgkernels.set_tangents(eager_block, {n: fgkernels.tangents.tangent_of(p).stack
                                         for n, p in block.named_parameters()})
    x, xt = torch.randn(3, 4, 10, 10), torch.randn(2, 3, 4, 10, 10)
    torch._dynamo.reset()
    with fgkernels.use_backend(backend):
        compiled = torch.compile(dual_pass, fullgraph=True, backend="aot_eager")
        y, yt = compiled(block, x, xt)
        y_ref, yt_ref = dual_pass(eager_block, x, xt)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(yt, yt_ref)
    for (name, a), b in zip(block.state_dict().items(), eager_block.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
