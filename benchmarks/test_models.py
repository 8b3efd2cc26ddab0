"""The dual pass of each ``fgkernels.zoo`` model (every parameter and the input carrying one
tangent) against torch.autograd.forward_ad's, float32, in the same run (paired rounds)."""
import copy

import pytest
import torch
from torch.func import functional_call

import fgkernels
from fgkernels import Dual
from fgkernels.zoo import MODELS

from conftest import DEVICE
from providers import jvp_forward_ad, model_oracle

WIDTH, BATCH, SIZE = (32, 64, 32) if DEVICE.type == "cpu" else (64, 256, 32)


def _case(name: str, quick: bool):
    torch.manual_seed(0)
    width, batch, size = (4, 2, 8) if quick else (WIDTH, BATCH, SIZE)
    model = MODELS[name](width).to(DEVICE)
    net = fgkernels.convert(copy.deepcopy(model))
    tangents = fgkernels.random_tangents(net)
    x = torch.randn(batch, 3, size, size, device=DEVICE)
    xt = torch.randn_like(x)
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def forward_ad():
        fn = lambda x_, *ps: functional_call(model, {**dict(zip(params, ps)), **buffers}, (x_,))
        return jvp_forward_ad(fn, [x, *params.values()], [xt, *tangents.values()])

    def dual():
        with torch.no_grad():
            return net(Dual(x, xt))

    expected = model_oracle(model, params, tangents, x, xt) if quick else None
    return dual, forward_ad, expected


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("provider", ["fgkernels", "forward_ad"])
def test_model_dual_pass(measure, quick, name, provider):
    dual, forward_ad, expected = _case(name, quick)
    fn = dual if provider == "fgkernels" else forward_ad
    measure(fn, f"zoo {name}, width {WIDTH}, batch {BATCH}, {SIZE}x{SIZE}",
            paired={"forward_ad": forward_ad} if provider == "fgkernels" else None,
            expected=expected)
