"""torchvision's deformable convolution on Duals (``rules.deformable``): the tangent along every
operand (input, offsets, mask, weight, bias) against the Jacobian of torchvision's own reverse
mode (its backward kernels, float64), with sample points inside, on pixel rows and columns (zero
offsets) and outside the image, in groups of channels and of offsets; and on geometries
Hypothesis draws. Skipped where torchvision
is missing, unless FGKERNELS_REQUIRE_MODELS=1 (CI's)."""
import importlib
import os

import pytest
import torch

if os.environ.get("FGKERNELS_REQUIRE_MODELS") == "1":
    importlib.import_module("torchvision")
torchvision = pytest.importorskip("torchvision")
from torchvision import ops  # noqa: E402

import fgkernels  # noqa: E402
from fgkernels import Dual  # noqa: E402

TOL = 1e-12

# (name, stride, padding, dilation, weight groups, offset groups, with a mask)
CASES = [
    ("v1", 1, 1, 1, 1, 1, False),
    ("v2, groups", 1, 1, 1, 2, 2, True),
    ("v2, strided, dilated", 2, 2, 2, 1, 2, True),
]


def _operands(stride, padding, dilation, groups, offset_groups, masked):
    """x (2, 4, 6, 5), weight (4, 4/groups, 3, 3), and offsets and a mask for each tap: random
    and fractional, except zero (points on the pixel grid) at one output row and far outside
    the image at one output column."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 5, dtype=torch.float64)
    weight = torch.randn(4, 4 // groups, 3, 3, dtype=torch.float64)
    bias = torch.randn(4, dtype=torch.float64)
    ho = (6 + 2 * padding - dilation * 2 - 1) // stride + 1
    wo = (5 + 2 * padding - dilation * 2 - 1) // stride + 1
    offset = 1.5 * torch.randn(2, offset_groups * 18, ho, wo, dtype=torch.float64)
    offset[:, :, 0] = 0.0
    offset[:, 1::2, :, -1] += 9.0
    mask = torch.rand(2, offset_groups * 9, ho, wo, dtype=torch.float64) if masked else None
    return x, offset, weight, bias, mask


def _reverse_mode_jvp(call, operands, tangents):
    """``Σ_i J_i · ṫ_i`` of ``call(*operands)``, J from torchvision's backward (one reverse
    pass per output element), for each slot of the tangents."""
    jacobians = torch.autograd.functional.jacobian(call, operands)
    out_dims = call(*operands).dim()
    # (*out, numel of the operand) against (slots, numel of the operand), summed over operands
    return sum(torch.einsum("...i,si->s...", jacobian.flatten(out_dims), t.flatten(1))
               for jacobian, t in zip(jacobians, tangents) if t is not None)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("along", ["input", "offset", "mask", "weight", "bias", "all"])
def test_deform_conv2d_is_torchvisions_derivative(case, along):
    _, stride, padding, dilation, groups, offset_groups, masked = case
    if along == "mask" and not masked:
        pytest.skip("DCN v1 has no mask")
    x, offset, weight, bias, mask = _operands(stride, padding, dilation, groups, offset_groups,
                                              masked)
    names = ["input", "offset", "weight", "bias", "mask"]
    operands = [x, offset, weight, bias, mask]
    torch.manual_seed(1)
    tangents = [torch.randn(2, *v.shape, dtype=torch.float64)
                if v is not None and along in (name, "all") else None
                for name, v in zip(names, operands)]

    def call(x_, offset_, weight_, bias_, mask_=None):
        return ops.deform_conv2d(x_, offset_, weight_, bias_, stride, padding, dilation, mask_)

    duals = [v if v is None or t is None else Dual(v, t) for v, t in zip(operands, tangents)]
    out = call(*duals)
    present = [i for i, v in enumerate(operands) if v is not None]
    want = _reverse_mode_jvp(call, tuple(operands[i] for i in present),
                             [tangents[i] for i in present])
    assert torch.equal(out.primal, call(*operands))
    torch.testing.assert_close(out.tangents, want, rtol=TOL, atol=TOL)


def test_bfloat16_tangents_of_a_float32_deformable_convolution():
    x, offset, weight, bias, mask = (v.float() for v in _operands(1, 1, 1, 1, 2, True))
    torch.manual_seed(1)
    xt, ot = torch.randn(1, *x.shape), torch.randn(1, *offset.shape)
    out = ops.deform_conv2d(Dual(x, xt.bfloat16()), Dual(offset, ot.bfloat16()), weight, bias,
                            padding=1, mask=mask)
    call = lambda x_, o_: ops.deform_conv2d(x_, o_, weight.double(), bias.double(),  # noqa: E731
                                            padding=1, mask=mask.double())
    want = _reverse_mode_jvp(call, (x.double(), offset.double()),
                             [xt.bfloat16().double(), ot.bfloat16().double()])
    assert out.tangents.dtype == torch.bfloat16
    torch.testing.assert_close(out.tangents.double(), want, rtol=2e-2, atol=2e-2)


def test_a_deformable_layer_in_a_model_is_exact():
    # its offsets predicted by a convolution: every parameter's tangent reaches them
    torch.manual_seed(0)
    offsets = torch.nn.Conv2d(3, 18, 3, padding=1)
    layer = ops.DeformConv2d(3, 4, 3, padding=1)
    model = torch.nn.ModuleDict({"offsets": offsets, "layer": layer}).double()

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.parts = model

        def forward(self, x):
            return self.parts["layer"](x, self.parts["offsets"](x)).relu().sum((1, 2, 3))

    net = Net()
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    # forward_ad refuses torchvision's op: the oracle is the Jacobian of its backward
    tangents = fgkernels.random_tangents(net)
    out = net(Dual(x))
    fgkernels.clear_tangents(net)
    names = [n for n, _ in net.named_parameters()]

    def call(*params):
        return torch.func.functional_call(net, dict(zip(names, params)), (x,))

    want = _reverse_mode_jvp(call, tuple(p.detach() for p in net.parameters()),
                             [tangents[n].unsqueeze(0) for n in names])
    torch.testing.assert_close(out.tangents, want, rtol=TOL, atol=TOL)


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@st.composite
def _geometries(draw):
    """A deformable convolution's operands: kernel, stride, padding, dilation, weight and offset
    groups, image and batch sizes drawn; offsets fractional, whole or far off the image."""
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride, dilation = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    padding = draw(st.integers(0, 2))
    groups, offset_groups = draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2]))
    h = draw(st.integers(dilation * (kh - 1) + 1 - 2 * padding, 6).filter(lambda v: v >= 1))
    w = draw(st.integers(dilation * (kw - 1) + 1 - 2 * padding, 6).filter(lambda v: v >= 1))
    n, c_out = draw(st.integers(1, 2)), 2 * groups
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(n, 2 * groups * offset_groups, h, w, generator=g, dtype=torch.float64)
    weight = torch.randn(c_out, x.shape[1] // groups, kh, kw, generator=g, dtype=torch.float64)
    ho = (h + 2 * padding - dilation * (kh - 1) - 1) // stride + 1
    wo = (w + 2 * padding - dilation * (kw - 1) - 1) // stride + 1
    scale = draw(st.sampled_from([0.0, 0.5, 3.0]))  # (0: every point on the pixel grid)
    offset = scale * torch.randn(n, 2 * offset_groups * kh * kw, ho, wo, generator=g,
                                 dtype=torch.float64)
    if draw(st.booleans()):
        offset = offset.round()
    mask = torch.rand(n, offset_groups * kh * kw, ho, wo, generator=g, dtype=torch.float64) \
        if draw(st.booleans()) else None
    bias = torch.randn(c_out, generator=g, dtype=torch.float64)
    return (x, offset, weight, bias, mask), (stride, padding, dilation)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(drawn=_geometries(), count=st.integers(1, 2))
def test_deform_conv2d_on_drawn_geometries_is_torchvisions_derivative(drawn, count):
    operands, (stride, padding, dilation) = drawn
    g = torch.Generator().manual_seed(count)
    tangents = [None if v is None else torch.randn(count, *v.shape, generator=g,
                                                   dtype=torch.float64) for v in operands]

    def call(x_, offset_, weight_, bias_, mask_=None):
        return ops.deform_conv2d(x_, offset_, weight_, bias_, stride, padding, dilation, mask_)

    out = call(*[v if v is None else Dual(v, t) for v, t in zip(operands, tangents)])
    present = [i for i, v in enumerate(operands) if v is not None]
    want = _reverse_mode_jvp(call, tuple(operands[i] for i in present),
                             [tangents[i] for i in present])
    torch.testing.assert_close(out.tangents, want, rtol=TOL, atol=TOL)


def test_a_cropped_input_and_images_in_chunks(monkeypatch):
    # a view that is not contiguous, and the offsets' term taken two images at a time
    from fgkernels.rules import deformable
    x, offset, weight, bias, mask = _operands(1, 1, 1, 2, 2, True)
    x = torch.cat([x, x.flip(0)])[..., 1:]  # (4, 4, 6, 4), a crop
    offset = torch.cat([offset, 0.5 * offset])[..., 1:]
    mask = torch.cat([mask, mask.flip(0)])[..., 1:]
    monkeypatch.setattr(deformable, "_CHUNK_NUMBERS", 2 * 4 * 9 * 6 * 4)
    torch.manual_seed(1)
    tangents = [torch.randn(1, *v.shape, dtype=torch.float64) for v in (x, offset)]

    def call(x_, offset_):
        return ops.deform_conv2d(x_, offset_, weight, bias, padding=1, mask=mask)

    out = call(Dual(x, tangents[0]), Dual(offset, tangents[1]))
    want = _reverse_mode_jvp(call, (x, offset), tangents)
    torch.testing.assert_close(out.tangents, want, rtol=TOL, atol=TOL)
