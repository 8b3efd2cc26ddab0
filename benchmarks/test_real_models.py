"""Small real torchvision models: the dual pass of the converted model, eager and compiled
(``fgkernels.compile``, Inductor's graph called from Python and from its C++ wrapper), against
torch.autograd.forward_ad's eager pass, float32, eval mode, every parameter and the input
carrying one tangent; paired rounds. The ``-bf16`` providers give the float32 model bfloat16
tangents (where the CPU computes in bfloat16), forward_ad the same values in float32; the
``-cl`` providers lay the model and its input out channels_last (``forward_ad-cl`` too; the
others' forward_ad, their baseline, takes them as torchvision builds them, NCHW).

Needs torchvision: run it in the models environment (``bash scripts/setup.sh --models``;
``.venv-models/bin/python -m pytest benchmarks/test_real_models.py``); skipped without it. The
compiled providers' first call compiles (minutes per model on two cores), outside the
timing; the quick run (``--benchmark-disable``) leaves the compiled providers out. The
forward_ad case also records the share of its pass spent in convolutions and matrix products
(``providers.products_share``, median of three profiled passes)."""
import statistics

import pytest
import torch

from conftest import DEVICE, skip_emulated_bfloat16
from providers import model_dual_pass_case, products_share

torchvision = pytest.importorskip("torchvision")

MODELS = ("resnet18", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny")
BATCH, SIZE = 16, 64


# provider -> the Inductor options of fgkernels.compile (None: the eager pass)
_CPP = {"cpp_wrapper": True}
COMPILED = {"fgkernels": None, "fgkernels-compiled": {}, "fgkernels-compiled-cpp": _CPP,
            "fgkernels-bf16": None, "fgkernels-compiled-cpp-bf16": _CPP,
            "fgkernels-cl": None, "fgkernels-compiled-cpp-cl": _CPP,
            "fgkernels-bf16-cl": None, "fgkernels-compiled-cpp-bf16-cl": _CPP}


def _case(name: str, quick: bool, provider: str):
    torch.manual_seed(0)
    batch, size = (2, 32) if quick else (BATCH, SIZE)
    model = torchvision.models.get_model(name, num_classes=10).to(DEVICE).eval()
    x = torch.randn(batch, 3, size, size, device=DEVICE)
    if provider == "forward_ad-cl":
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(
            memory_format=torch.channels_last)
    tangent_dtype = torch.bfloat16 if "-bf16" in provider else None
    return model_dual_pass_case(model, x, torch.randn_like(x), quick, COMPILED.get(provider),
                                tangent_dtype, channels_last=provider.startswith("fgkernels")
                                and provider.endswith("-cl"))


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("provider", [*COMPILED, "forward_ad", "forward_ad-cl"])
def test_real_model_dual_pass(measure, benchmark, quick, name, provider):
    if quick and COMPILED.get(provider) is not None:
        pytest.skip("compiling a real model takes minutes; tests/nn/test_compile.py covers it")
    if "-bf16" in provider:
        skip_emulated_bfloat16(quick)
    dual, forward_ad, expected = _case(name, quick, provider)
    if provider == "forward_ad-cl":
        measure(forward_ad, f"torchvision {name}, eval, batch {BATCH}, {SIZE}x{SIZE}",
                rounds=10, expected=expected)
        return
    if provider != "forward_ad":
        dual()  # a compiled provider compiles here, outside the timing
    else:
        # How much of forward_ad's pass is convolutions and matrix products, which a dual pass
        # computes too: the lowest ratio a pass running them at the same speed can reach.
        forward_ad()
        benchmark.extra_info["products_share"] = statistics.median(
            products_share(forward_ad) for _ in range(3))
    measure(dual if provider != "forward_ad" else forward_ad,
            f"torchvision {name}, eval, batch {BATCH}, {SIZE}x{SIZE}", rounds=10,
            paired={"forward_ad": forward_ad} if provider != "forward_ad" else None,
            expected=expected)
