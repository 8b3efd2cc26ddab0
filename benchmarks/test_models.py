"""The dual pass of each ``tests/zoo.py`` model (every parameter and the input carrying one
tangent) against torch.autograd.forward_ad's, float32, in the same run (paired rounds)."""
import pytest
import torch

from conftest import DEVICE
from providers import model_dual_pass_case
from zoo import MODELS

WIDTH, BATCH, SIZE = (32, 64, 32) if DEVICE.type == "cpu" else (64, 256, 32)


def _case(name: str, quick: bool):
    torch.manual_seed(0)
    width, batch, size = (4, 2, 8) if quick else (WIDTH, BATCH, SIZE)
    model = MODELS[name](width).to(DEVICE)
    x = torch.randn(batch, 3, size, size, device=DEVICE)
    return model_dual_pass_case(model, x, torch.randn_like(x), quick)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("provider", ["fgkernels", "forward_ad"])
def test_model_dual_pass(measure, quick, name, provider):
    dual, forward_ad, expected = _case(name, quick)
    fn = dual if provider == "fgkernels" else forward_ad
    measure(fn, f"zoo {name}, width {WIDTH}, batch {BATCH}, {SIZE}x{SIZE}",
            paired={"forward_ad": forward_ad} if provider == "fgkernels" else None,
            expected=expected)
