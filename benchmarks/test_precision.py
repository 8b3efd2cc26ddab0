"""Lower-precision tangents and channels_last: the ResNet-18 loss JVP with bfloat16 tangents of
the float32 network against float32 forward_ad, and wholly in bfloat16 against bfloat16
forward_ad, each in NCHW and in channels_last (the baseline in the same dtype and layout; the
float32 network's pass is paired with a float32 backprop step in its layout too); and
a forward-gradient training step with bfloat16 tangents in channels_last against a backprop
step in the same layout. Every fgkernels round is paired with its baseline run just before."""
import pytest
import torch
import torch.nn.functional as F

import fgkernels
from fgkernels import Dual
from fgkernels.train import build_model
from fgkernels.train.loop import TrainConfig, compute_gradients

from cases import resnet18_case
from conftest import DEVICE, skip_emulated_bfloat16
from providers import loss_backprop_step, loss_jvp_forward_ad, loss_oracle, relative_error

BATCHES = (256,) if DEVICE.type == "cuda" else (32, 128)
# name -> (the network's dtype, the tangents' dtype)
PRECISIONS = {"fp32-bf16": (torch.float32, torch.bfloat16), "bf16": (torch.bfloat16,) * 2}
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


@pytest.mark.parametrize("provider", ["fgkernels-native", "forward_ad"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"b{b}")
def test_resnet18_low_precision_tangents(measure, quick, provider, precision, layout, batch):
    if "native" not in fgkernels.available_backends():
        pytest.skip("the native extension is not built")
    if DEVICE.type == "cpu" and precision == "bf16" and layout == "nchw":
        pytest.skip("torch's CPU bfloat16 convolution is its slow reference kernel in NCHW")
    skip_emulated_bfloat16(quick)
    dtype, tangent_dtype = PRECISIONS[precision]
    model, x, y = resnet18_case(quick, batch, dtype, DEVICE)
    model, x = model.to(memory_format=LAYOUTS[layout]), x.to(memory_format=LAYOUTS[layout])
    params = {n: p.detach() for n, p in model.named_parameters()}
    tangents = fgkernels.random_tangents(model, dtype=tangent_dtype)
    # torch's forward AD needs tangents in the primal's dtype: the float32 network's baseline
    # has float32 tangents.
    wide = {n: t.to(dtype) for n, t in tangents.items()}
    forward_ad = lambda: loss_jvp_forward_ad(model, params, wide, x, y)
    expected = loss_oracle(model, params, tangents, x, y) if quick else None
    # A wholly bfloat16 network is checked against twice torch's own error in bfloat16 (its
    # loss is off by 10-20 % at the quick run's tiny width).
    tolerance = 2 * relative_error(forward_ad(), expected) + 2e-2 \
        if quick and dtype == torch.bfloat16 else None
    paired = None
    if provider == "forward_ad":
        fn = forward_ad
    else:
        fn = lambda: F.cross_entropy(model(Dual(x)), y)
        paired = {"forward_ad": forward_ad}
        if dtype == torch.float32:
            # What a float32 network trains with otherwise: a backprop step, same layout.
            paired["backprop"] = lambda: loss_backprop_step(model, x, y)
    with fgkernels.use_backend("native"):
        measure(fn, f"resnet18 loss JVP b{x.shape[0]} {precision} {layout}", rounds=3,
                paired=paired, expected=expected, tolerance=tolerance)


STEPS = {"backprop": dict(algo="backprop"),
         "fg-local-weight": dict(algo="fg", guess="local", space="weight"),
         "fg-local-activity": dict(algo="fg", guess="local", space="activity")}


@pytest.mark.parametrize("algo", list(STEPS))
def test_training_step_bf16_tangents_channels_last(measure, quick, algo):
    """ResNet-18 in 8 blocks, float32 in channels_last, the forward-gradient steps with
    bfloat16 tangents; each paired with a backprop step in the same layout."""
    skip_emulated_bfloat16(quick)
    torch.manual_seed(0)
    width, size, batch = (4, 8, 4) if quick else (64, 32, 256 if DEVICE.type == "cuda" else 128)
    net = build_model("resnet18-8b", 10, 3, width=width).to(DEVICE)
    net = net.to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size, device=DEVICE).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=DEVICE)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    config = lambda name: TrainConfig(**STEPS[name], channels_last=True,
                                      tangent_dtype=None if name == "backprop" else "bfloat16")
    step = lambda name: compute_gradients(net, x, y, config(name), gen)
    paired = None if algo == "backprop" else {"backprop": lambda: step("backprop")}
    measure(lambda: step(algo), f"training step resnet18-8b b{batch} bf16 tangents channels_last",
            rounds=3, paired=paired)


CONV_SHAPES = [(128, 64, 32), (128, 256, 8)]  # (batch, channels, size): 3×3, same padding


@pytest.mark.parametrize("variant", ["float32-channels_last", "bfloat16-nchw",
                                     "bfloat16-channels_last"])
@pytest.mark.parametrize("shape", CONV_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_conv3x3_dtype_and_layout(measure, quick, shape, variant):
    """What bfloat16 tangents rest on: torch's own 3×3 convolution in bfloat16 and in
    channels_last, paired with the float32 NCHW one."""
    n, c, size = (2, 4, 8) if quick else shape
    dtype, layout = variant.split("-")
    if dtype == "bfloat16":
        skip_emulated_bfloat16(quick)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(n, c, size, size, generator=g, device=DEVICE)
    w = torch.randn(c, c, 3, 3, generator=g, device=DEVICE)
    as_variant = lambda t: t.to(getattr(torch, dtype)).to(memory_format=LAYOUTS[layout])
    xv, wv = as_variant(x), as_variant(w)
    measure(lambda: F.conv2d(xv, wv, padding=1), f"conv3x3 {n}x{c}x{size} dtype and layout",
            rounds=3, paired={"float32-nchw": lambda: F.conv2d(x, w, padding=1)})
