"""Recurrent layers (``nn.LSTM``, ``nn.GRU``): the dual pass beside forward_ad's, where each time
step's ops are small (the cost is per op) and where they are larger; one tangent on the input
and on every parameter, paired rounds. forward_ad runs torch's composite RNN kernels
(``fgkernels.testing.oracle_mode``): oneDNN's, which a float32 RNN takes on the CPU, has no
forward-mode derivative, so that is the forward_ad a user can run."""
import pytest
import torch
from torch import nn

from fgkernels.testing import oracle_mode

from conftest import DEVICE
from providers import model_dual_pass_case

# name -> (batch, steps, features, hidden, layers, bidirectional)
CASES = {
    "b16 x20 h64": (16, 20, 32, 64, 1, False),
    "b16 x20 h64, 2 layers, bidirectional": (16, 20, 32, 64, 2, True),
    "b64 x50 h256": (64, 50, 32, 256, 1, False),
}


class _Sequence(nn.Module):
    """The layer's output sequence (batch first)."""

    def __init__(self, mode: str, features: int, hidden: int, layers: int, bidirectional: bool):
        super().__init__()
        self.rnn = getattr(nn, mode)(features, hidden, layers, batch_first=True,
                                     bidirectional=bidirectional)

    def forward(self, x):
        return self.rnn(x)[0]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
@pytest.mark.parametrize("provider", ["fgkernels", "forward_ad"])
def test_recurrent_dual_pass(measure, quick, provider, mode, case):
    batch, steps, features, hidden, layers, bidirectional = CASES[case]
    if quick:
        batch, steps, hidden = 2, 3, 4
    torch.manual_seed(0)
    model = _Sequence(mode, features, hidden, layers, bidirectional).to(DEVICE)
    x = torch.randn(batch, steps, features, device=DEVICE)
    dual, forward_ad, expected = model_dual_pass_case(model, x, torch.randn_like(x), quick)

    def forward_ad_on_composite_kernels():
        with oracle_mode():
            return forward_ad()

    measure(dual if provider == "fgkernels" else forward_ad_on_composite_kernels,
            f"{mode} {case}, float32",
            paired={"forward_ad": forward_ad_on_composite_kernels}
            if provider == "fgkernels" else None, expected=expected)
