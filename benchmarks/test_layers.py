"""Layer benchmarks at ResNet-18 CIFAR shapes: dual conv, dual BN(train)+ReLU, dual linear.

Every case times fgkernels on each backend beside torch.autograd.forward_ad, torch.func.jvp,
the primal forward alone, and backprop (forward + backward of the torch.nn op), one tangent on
the input and on every parameter.
"""
import pytest
import torch
import torch.nn.functional as F

import fgkernels.functional as DF

from conftest import DEVICE
from providers import BASELINES, backend_of, dual_call, fgkernels_providers, jvp_forward_ad

PROVIDERS = fgkernels_providers() + list(BASELINES)
BATCHES = (256,) if DEVICE.type == "cuda" else (32, 128)
DTYPES = (torch.float32, torch.bfloat16) if DEVICE.type == "cuda" else (torch.float32,)
# (channels, spatial size) of ResNet-18's CIFAR stages
STAGES = ((64, 32), (128, 16), (256, 8), (512, 4)) if DEVICE.type == "cuda" else \
    ((64, 32), (256, 8))


def _size(quick, batch, channels, hw):
    return (2, max(4, channels // 16), max(4, hw // 4)) if quick else (batch, channels, hw)


def _tensors(*shapes, dtype):
    return [torch.randn(s, device=DEVICE, dtype=dtype) for s in shapes]


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


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("stage", STAGES, ids=lambda s: f"c{s[0]}x{s[1]}")
@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"b{b}")
def test_conv(measure, quick, provider, batch, stage, dtype):
    N, C, S = _size(quick, batch, *stage)
    primals = _tensors((N, C, S, S), (C, C, 3, 3), dtype=dtype)
    tangents = _tensors((N, C, S, S), (C, C, 3, 3), dtype=dtype)
    fn = lambda x, w: F.conv2d(x, w, None, 1, 1)
    with backend_of(provider):
        measure(_run(provider, fn, primals, tangents),
                f"conv3x3 {C}x{S}x{S} b{N} {str(dtype)[6:]}")


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("stage", STAGES, ids=lambda s: f"c{s[0]}x{s[1]}")
@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"b{b}")
def test_bn_relu(measure, quick, provider, batch, stage, dtype):
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
                f"bn+relu {C}x{S}x{S} b{N} {str(dtype)[6:]}")


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
                f"linear {fin}->{fout} b{N} {str(dtype)[6:]}")
