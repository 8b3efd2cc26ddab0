"""Layer benchmarks at ResNet-18 CIFAR shapes: dual conv, dual BN(train)+ReLU (also at small
maps of MobileNet-V3 and EfficientNet), dual conv+BN+ReLU, dual linear; and dual layer norm at
ConvNeXt-T's and ViT-S's shapes.

Every case times fgkernels on each backend beside its baselines: torch.autograd.forward_ad,
the cuDNN (or oneDNN) composition of the dual convolution (three convolutions and an add),
torch.func.jvp, the primal forward alone, and backprop (forward + backward of the torch.nn op),
one tangent on the input and on every parameter. On CUDA the activations are channels_last
(the layout the tensor cores are fed in) and the slowest baselines are left out; each case
records its roofline time (``benchmarks/roofline.py``, H200 peaks at the measured copy
bandwidth) in ``extra_info["roofline_s"]``.
"""
import pytest
import torch
import torch.nn.functional as F

import fgkernels.functional as DF

from conftest import DEVICE
from providers import (
    BASELINES,
    backend_of,
    dual_call,
    fgkernels_providers,
    jvp_forward_ad,
    op_oracle,
)
from roofline import bn_seconds, conv_seconds

CUDA = DEVICE.type == "cuda"
PROVIDERS = fgkernels_providers() + list(BASELINES)
if CUDA:  # the reference backend and func_jvp are forward_ad's composition again
    PROVIDERS = [p for p in PROVIDERS if p not in ("fgkernels-reference", "func_jvp",
                                                   "backprop")]
BATCHES = (256,) if CUDA else (32, 128)
DTYPES = (torch.float32, torch.bfloat16) if CUDA else (torch.float32,)
LAYOUT = torch.channels_last if CUDA else torch.contiguous_format
# (channels, spatial size) of ResNet-18's CIFAR stages
STAGES = ((64, 32), (128, 16), (256, 8), (512, 4)) if CUDA else ((64, 32), (256, 8))
# Batch norm also on the CPU at the small maps of MobileNet-V3-Small's and EfficientNet-B0's last
# stages on 64-pixel images (576 and 1152 channels on 2 x 2), where a kernel's cost per plane or
# per call, not per value, would show.
BN_STAGES = STAGES + (() if CUDA else ((576, 2), (1152, 2)))
PRECISION = {torch.float32: "tf32", torch.bfloat16: "bf16"}


def _size(quick, batch, channels, hw):
    return (2, max(4, channels // 16), max(4, hw // 4)) if quick else (batch, channels, hw)


def _tensors(*shapes, dtype):
    return [torch.randn(s, device=DEVICE, dtype=dtype).contiguous(
        memory_format=LAYOUT if len(s) == 4 else torch.contiguous_format) for s in shapes]


def _run(provider, fn, primals, tangents):
    """The callable a provider times for the op ``fn`` (taking tensors or Duals)."""
    if provider.startswith("fgkernels-"):
        return lambda: dual_call(fn, primals, tangents)
    if provider == "forward_ad":
        return lambda: jvp_forward_ad(fn, primals, tangents)
    if provider == "func_jvp":
        return lambda: torch.func.jvp(fn, tuple(primals), tuple(tangents))
    if provider == "primal":
        return lambda: fn(*primals)
    leaves = [p.detach().requires_grad_() for p in primals]

    def step():  # backprop
        out = fn(*leaves)
        out.backward(torch.ones_like(out))
        for leaf in leaves:
            leaf.grad = None
    return step


def _bn_relu(x, g, b):
    """Batch norm (batch statistics) and ReLU: the oracle's function."""
    return F.relu(F.batch_norm(x, None, None, g, b, True, 0.1, 1e-5))


def _conv_bn_relu(x, w, g, b):
    return _bn_relu(F.conv2d(x, w, None, 1, 1), g, b)


def _composition(x, w, xt, wt):
    """The dual convolution as the convolution library computes it: y = W*x, ẏ = W*ẋ + Ẇ*x."""
    conv = lambda a, b: F.conv2d(a, b, None, 1, 1)
    return conv(x, w), conv(xt, w) + conv(x, wt)


def _roofline(benchmark, provider, seconds_of):
    """Record the case's roofline time for ``provider`` (``seconds_of(composition)``)."""
    composition = "dual" if provider.startswith("fgkernels-") else \
        "forward_ad" if provider in ("forward_ad", "composition", "func_jvp") else None
    if composition is not None:
        benchmark.extra_info["roofline_s"] = seconds_of(composition)


@pytest.mark.parametrize("provider", PROVIDERS + ["composition"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("stage", STAGES, ids=lambda s: f"c{s[0]}x{s[1]}")
@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"b{b}")
def test_conv(measure, benchmark, quick, provider, batch, stage, dtype):
    N, C, S = _size(quick, batch, *stage)
    primals = _tensors((N, C, S, S), (C, C, 3, 3), dtype=dtype)
    tangents = _tensors((N, C, S, S), (C, C, 3, 3), dtype=dtype)
    fn = lambda x, w: F.conv2d(x, w, None, 1, 1)
    run = (lambda: _composition(*primals, *tangents)) if provider == "composition" else \
        _run(provider, fn, primals, tangents)
    with backend_of(provider):
        measure(run, f"conv3x3 {C}x{S}x{S} b{N} {str(dtype)[6:]}", budget_s=0.5,
                expected=op_oracle(fn, primals, tangents) if quick else None)
    _roofline(benchmark, provider,
              lambda c: conv_seconds(N, C, C, 3, 1, S, c, PRECISION.get(dtype, "tf32")))


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("stage", BN_STAGES, ids=lambda s: f"c{s[0]}x{s[1]}")
@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"b{b}")
def test_bn_relu(measure, benchmark, quick, provider, batch, stage, dtype):
    N, C, S = _size(quick, batch, *stage)
    primals = _tensors((N, C, S, S), (C,), (C,), dtype=dtype)
    tangents = _tensors((N, C, S, S), (C,), (C,), dtype=dtype)
    # Training mode; torch.func.jvp cannot update running stats in place, so none are kept.
    rm = torch.zeros(C, device=DEVICE, dtype=dtype)
    rv = torch.ones(C, device=DEVICE, dtype=dtype)
    stats = (None, None) if provider == "func_jvp" else (rm, rv)
    if provider.startswith("fgkernels-"):
        fn = lambda x, g, b: DF.batch_norm(x, *stats, g, b, True, 0.1, 1e-5, relu=True)
    else:
        fn = lambda x, g, b: F.relu(F.batch_norm(x, *stats, g, b, True, 0.1, 1e-5))
    with backend_of(provider):
        measure(_run(provider, fn, primals, tangents),
                f"bn+relu {C}x{S}x{S} b{N} {str(dtype)[6:]}", budget_s=0.5,
                expected=op_oracle(_bn_relu, primals, tangents) if quick else None)
    _roofline(benchmark, provider,
              lambda c: bn_seconds(N, C, S, c, PRECISION.get(dtype, "tf32")))


@pytest.mark.parametrize("provider", [p for p in PROVIDERS if p != "func_jvp"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("stage", STAGES, ids=lambda s: f"c{s[0]}x{s[1]}")
@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"b{b}")
def test_conv_bn_relu(measure, benchmark, quick, provider, batch, stage, dtype):
    """Conv → BN(train) → ReLU: on the triton backend one fused convolution with the
    batch-norm sums in its epilogue, then one apply pass."""
    N, C, S = _size(quick, batch, *stage)
    primals = _tensors((N, C, S, S), (C, C, 3, 3), (C,), (C,), dtype=dtype)
    tangents = _tensors((N, C, S, S), (C, C, 3, 3), (C,), (C,), dtype=dtype)
    rm = torch.zeros(C, device=DEVICE, dtype=dtype)
    rv = torch.ones(C, device=DEVICE, dtype=dtype)
    if provider.startswith("fgkernels-"):
        fn = lambda x, w, g, b: DF.conv2d_batch_norm(x, w, None, 1, 1, 1, 1, rm, rv, g, b,
                                                     True, 0.1, 1e-5, True)
    else:
        fn = lambda x, w, g, b: F.relu(F.batch_norm(F.conv2d(x, w, None, 1, 1), rm, rv, g, b,
                                                    True, 0.1, 1e-5))
    with backend_of(provider):
        measure(_run(provider, fn, primals, tangents),
                f"conv+bn+relu {C}x{S}x{S} b{N} {str(dtype)[6:]}", budget_s=0.5,
                expected=op_oracle(_conv_bn_relu, primals, tangents) if quick else None)
    _roofline(benchmark, provider, lambda c: conv_seconds(
        N, C, C, 3, 1, S, c, PRECISION.get(dtype, "tf32"), with_bn=True))


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("features", [(512, 512), (512, 10)], ids=lambda f: f"{f[0]}to{f[1]}")
@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"b{b}")
def test_linear(measure, quick, provider, batch, features, dtype):
    fin, fout = (16, 4) if quick else features
    N = 2 if quick else batch
    primals = _tensors((N, fin), (fout, fin), (fout,), dtype=dtype)
    tangents = _tensors((N, fin), (fout, fin), (fout,), dtype=dtype)
    with backend_of(provider):
        measure(_run(provider, F.linear, primals, tangents),
                f"linear {fin}->{fout} b{N} {str(dtype)[6:]}",
                expected=op_oracle(F.linear, primals, tangents) if quick else None)


# (token map, features) of ConvNeXt-T's first stage (16 x 16 at 64 px) and of ViT-S (197 tokens)
LAYER_NORM_SHAPES = (((16, 16), 96), ((197,), 384))


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", LAYER_NORM_SHAPES,
                         ids=lambda s: "x".join(map(str, (*s[0], s[1]))))
@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"b{b}")
def test_layer_norm(measure, quick, provider, batch, shape, dtype):
    tokens, features = ((3,), 8) if quick else shape
    N = 2 if quick else batch
    primals = _tensors((N, *tokens, features), (features,), (features,), dtype=dtype)
    tangents = _tensors((N, *tokens, features), (features,), (features,), dtype=dtype)
    fn = lambda x, w, b: F.layer_norm(x, (features,), w, b)
    with backend_of(provider):
        measure(_run(provider, fn, primals, tangents),
                f"layer norm {'x'.join(map(str, tokens))}x{features} b{N} {str(dtype)[6:]}",
                expected=op_oracle(fn, primals, tangents) if quick else None)
