"""The real models the dual pass is checked on: every classification model of torchvision and a
set of timm's, each built untrained with 10 classes at a small input in float64, and compared
with torch.autograd.forward_ad (``fgkernels.testing.compare_with_forward_ad``). Used by
``tests/nn/test_real_models.py`` (a subset) and ``scripts/check_real_models.py`` (all of them)."""
from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch._inductor.config
from torch._dynamo.utils import counters

import fgkernels
from fgkernels.testing import compare_with_forward_ad

# timm's models, the smallest of each family the checks name.
TIMM = ["resnet18", "efficientnet_b0", "mobilenetv3_small_050", "mobilenetv4_conv_small",
        "regnetx_002", "convnext_atto", "densenet121", "dla34", "dpn48b", "hrnet_w18_small",
        "rexnet_100", "cspresnet50", "cs3darknet_s", "nf_regnet_b0", "repvgg_a0", "mixnet_s",
        "ghostnet_100", "fastvit_t8", "levit_128s", "vit_tiny_patch16_224",
        "deit_tiny_patch16_224"]
# A few of each library's that run in seconds: the CI subset.
QUICK = ["torchvision/resnet18", "torchvision/mobilenet_v3_small", "torchvision/efficientnet_b0",
         "torchvision/shufflenet_v2_x0_5", "torchvision/squeezenet1_1",
         "torchvision/regnet_y_400mf", "torchvision/googlenet", "torchvision/vit_b_32",
         "torchvision/swin_t", "timm/convnext_atto", "timm/vit_tiny_patch16_224",
         "timm/mobilenetv4_conv_small", "timm/levit_128s", "timm/ghostnet_100"]


@dataclass
class RealModel:
    """A model to check: its builder and input size."""

    name: str
    build: Callable[[], torch.nn.Module]
    size: int


def _torchvision(name: str) -> RealModel:
    import torchvision
    kwargs, size = {}, 64
    if name.startswith("vit_"):
        size = 28 if name.endswith("_14") else 32
        kwargs["image_size"] = size
    elif name == "maxvit_t":
        size = 224  # its partitions of 7 need 224 pixels
    elif name == "inception_v3":
        kwargs, size = dict(aux_logits=False, init_weights=False), 96
    elif name == "googlenet":
        kwargs["init_weights"] = False
    return RealModel(f"torchvision/{name}", lambda: torchvision.models.get_model(
        name, weights=None, num_classes=10, **kwargs), size)


def _timm(name: str) -> RealModel:
    import timm
    size = 64
    kwargs = {}
    if name.startswith(("vit_", "deit_")):
        size, kwargs = 32, dict(img_size=32)
    elif name.startswith("levit"):
        size, kwargs = 64, dict(img_size=64)
    return RealModel(f"timm/{name}", lambda: timm.create_model(
        name, pretrained=False, num_classes=10, **kwargs), size)


def catalogue() -> dict[str, RealModel]:
    """Every model to check, by name (``library/model``)."""
    import torchvision
    models = [_torchvision(n) for n in torchvision.models.list_models(module=torchvision.models)]
    models += [_timm(n) for n in TIMM]
    return {m.name: m for m in models}


def check(model: RealModel, training: bool, convert: bool = True, batch: int = 2,
          compiled: bool = False) -> dict:
    """Compare one model's dual pass with forward_ad; the relative errors, the ops that took
    the fallback and the seconds it took. ``compiled``: the pass compiled by
    ``fgkernels.compile`` (the seconds include the compile), with the count of its graph
    breaks, against an oracle of hardsigmoid's exact slope (``oracle_mode``)."""
    torch.manual_seed(0)
    net = model.build().double().train(training)
    if convert:
        fgkernels.convert(net)
    x = torch.randn(batch, 3, model.size, model.size, dtype=torch.float64)
    start = time.perf_counter()
    breaks = sum(counters["graph_break"].values())
    with warnings.catch_warnings(), contextlib.ExitStack() as stack:
        warnings.simplefilter("ignore")
        if compiled:
            # Inductor draws random numbers (dropout's masks) its own way unless told to call
            # torch's random ops, as the oracle's eager pass does.
            stack.enter_context(torch._inductor.config.patch(fallback_random=True))
        result = compare_with_forward_ad(net, [x], run=fgkernels.compile(net) if compiled else None,
                                         exact_hardsigmoid=compiled)
    if compiled:
        result["graph_breaks"] = sum(counters["graph_break"].values()) - breaks
    return {**result, "seconds": time.perf_counter() - start}
