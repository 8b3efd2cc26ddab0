"""torchvision's pooling over boxes on Duals (``rules.regions``): each op's tangent against
the Jacobian of torchvision's own reverse mode (its backward kernels, float64; central
differences where that backward is off), and a model
that pools a feature pyramid (``MultiScaleRoIAlign``) against forward_ad with torchvision's
roi_align written in torch ops (``torchvision.ops.roi_align._roi_align``). Skipped where
torchvision is missing, unless FGKERNELS_REQUIRE_MODELS=1 (CI's)."""
import importlib
import os

import pytest
import torch
from torch import nn

if os.environ.get("FGKERNELS_REQUIRE_MODELS") == "1":
    importlib.import_module("torchvision")
torchvision = pytest.importorskip("torchvision")
from torchvision import ops  # noqa: E402

import fgkernels  # noqa: E402
from fgkernels import Dual  # noqa: E402
from fgkernels.testing import model_jvp  # noqa: E402

from helpers import TOL, recording_backend, rel_err  # noqa: E402
from real_models import roi_align_in_torch_ops  # noqa: E402

# (name, the op on (x, boxes), the pooled values first): 2x2 bins everywhere, so a
# position-sensitive op takes C = 4·C_out
OPS = [
    ("roi_align", lambda x, b: ops.roi_align(x, b, (2, 2), 0.5, 2, aligned=False)),
    ("roi_align, aligned, adaptive", lambda x, b: ops.roi_align(x, b, 2, 0.5, -1, True)),
    ("roi_pool", lambda x, b: ops.roi_pool(x, b, (2, 2), 0.5)),
    ("ps_roi_align", lambda x, b: ops.ps_roi_align(x, b, 2, 0.5, 2)),
    ("ps_roi_pool", lambda x, b: ops.ps_roi_pool(x, b, 2, 0.5)),
]
# torchvision's backward of ps_roi_pool is off for a box reaching past the map (its bins
# clipped: up to 0.97 where central differences and the forward op itself agree to 1e-10):
# its oracle is central differences, exact but for rounding on an op linear in x.
DIFFERENCED = {"ps_roi_pool"}


def _features_and_boxes(dtype=torch.float64):
    """Two images of 8 channels, 9x8, and six boxes in input pixels (spatial scale 0.5): in
    either image, one reaching past the map, one too small to hold a sample."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 9, 8, dtype=dtype)
    boxes = torch.tensor([[0, 1.0, 2.0, 9.0, 11.0], [1, 0.0, 0.0, 15.0, 17.0],
                          [1, 4.5, 3.0, 8.0, 14.0], [0, 10.0, 12.0, 24.0, 30.0],
                          [0, 3.0, 3.0, 3.2, 3.1], [1, 2.0, 6.0, 13.0, 7.0]], dtype=dtype)
    return x, boxes


def _central_difference_jvp(op, x, boxes, xt, step=1e-3):
    """The tangent of ``op`` along each slot of ``xt`` by central differences (exact but for
    rounding where ``op`` is linear in x)."""
    return torch.stack([(op(x + step * t, boxes) - op(x - step * t, boxes)) / (2 * step)
                        for t in xt])


def _reverse_mode_jvp(op, x, boxes, xt):
    """The tangent of ``op`` along each slot of ``xt`` from the Jacobian torchvision's
    backward kernels give: ``ẏ = J ẋ``."""
    jacobian = torch.autograd.functional.jacobian(lambda v: op(v, boxes), x)
    y_numel = jacobian.shape[:-x.dim()]
    flat = jacobian.reshape(y_numel.numel(), x.numel())
    return torch.stack([(flat @ t.reshape(-1)).reshape(y_numel) for t in xt])


def _oracle(name, op, x, boxes, xt):
    return _central_difference_jvp(op, x, boxes, xt) if name in DIFFERENCED \
        else _reverse_mode_jvp(op, x, boxes, xt)


@pytest.mark.parametrize("name,op", OPS, ids=[o[0] for o in OPS])
def test_pooling_over_boxes_matches_torchvisions_reverse_mode(name, op):
    """Each op's tangent (three slots) equals torchvision's own Jacobian applied to it (central
    differences for ps_roi_pool, see ``DIFFERENCED``), and the primal is torchvision's, in
    float64; a box reaching past the map and a box holding no sample included."""
    x, boxes = _features_and_boxes()
    xt = torch.randn(3, *x.shape, dtype=x.dtype)
    out = op(Dual(x, xt), boxes)
    torch.testing.assert_close(out.primal, op(x, boxes), rtol=0, atol=0)
    tol = dict(rtol=1e-8, atol=1e-9) if name in DIFFERENCED else TOL[x.dtype]
    torch.testing.assert_close(out.tangents, _oracle(name, op, x, boxes, xt), **tol)


@pytest.mark.parametrize("name,op", OPS, ids=[o[0] for o in OPS])
def test_bfloat16_tangents_of_float32_features(name, op):
    """A float32 map with bfloat16 tangents: the tangent stays bfloat16 and within its
    rounding of the float64 one (pooled in float32)."""
    x, boxes = _features_and_boxes()
    xt = torch.randn(2, *x.shape, dtype=x.dtype)
    out = op(Dual(x.float(), xt.bfloat16()), boxes.float())
    assert out.tangents.dtype == torch.bfloat16
    want = _oracle(name, op, x, boxes, xt.bfloat16().double())
    assert rel_err(out.tangents, want) < 1e-2


def test_a_box_with_a_tangent_is_refused_by_name():
    """Boxes with a tangent (given to the op, or as a list of boxes per image) are refused,
    naming the op and the remedy (torchvision gives them no derivative); boxes given as a Dual
    without one are taken as plain boxes."""
    x, boxes = _features_and_boxes()
    features = Dual(x, torch.randn(1, *x.shape, dtype=x.dtype))
    moving = Dual(boxes, torch.randn(1, *boxes.shape, dtype=x.dtype))
    refused = r"torchvision::roi_align has no derivative in its boxes.*boxes.detach\(\)"
    with pytest.raises(NotImplementedError, match=refused):
        torch.ops.torchvision.roi_align(features, moving, 1.0, 2, 2, 2, False)
    with pytest.raises(NotImplementedError, match=refused):
        ops.roi_align(features, [moving[:3, 1:]], 2)
    out = torch.ops.torchvision.roi_align(features, Dual(boxes), 1.0, 2, 2, 2, False)
    torch.testing.assert_close(out.primal, ops.roi_align(x, boxes, 2, 1.0, 2), rtol=0, atol=0)


class _PyramidHead(nn.Module):
    """A two-level feature pyramid pooled over boxes by ``MultiScaleRoIAlign`` (each box from
    the level its size picks, written into one tensor), then a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.down = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.pool = ops.MultiScaleRoIAlign(["fine", "coarse"], 2, 2)
        self.head = nn.Linear(16, 3)

    def forward(self, images, boxes):
        fine = self.stem(images).relu()
        features = {"fine": fine, "coarse": self.down(fine)}
        pooled = self.pool(features, boxes, [tuple(images.shape[-2:])] * images.shape[0])
        return self.head(pooled.flatten(1))


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_a_feature_pyramid_pooled_over_boxes_is_exact(compiled, monkeypatch):
    """A converted model pooling its features over boxes of two sizes (one per pyramid level)
    takes the input's and every parameter's tangent through roi_align, eager and compiled in
    one graph, as forward_ad does with torchvision's roi_align written in torch ops."""
    torch.manual_seed(0)
    model = fgkernels.convert(_PyramidHead()).double()
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    boxes = [torch.tensor([[1.0, 2.0, 60.0, 50.0], [3.0, 3.0, 12.0, 9.0]], dtype=torch.float64),
             torch.tensor([[0.0, 0.0, 63.0, 63.0]], dtype=torch.float64)]
    xt = torch.randn(2, *images.shape, dtype=torch.float64)
    tangents = {n: torch.randn(2, *p.shape, dtype=torch.float64)
                for n, p in model.named_parameters()}
    with monkeypatch.context() as patch:
        patch.setattr(ops.poolers, "roi_align", roi_align_in_torch_ops)
        oracle = model_jvp(model, [images, boxes], [xt, None], tangents)
    assert set(ops.poolers.LevelMapper(0, 1)(boxes).tolist()) == {0, 1}  # both levels pooled
    fgkernels.set_tangents(model, tangents)
    graphs = []
    run = fgkernels.compile(model, backend=recording_backend(graphs), fullgraph=True) if compiled \
        else model
    out = run(Dual(images, xt), boxes)
    torch.testing.assert_close(out.primal, oracle[0], **TOL[torch.float64])
    torch.testing.assert_close(out.tangents, oracle[1], **TOL[torch.float64])
    assert len(graphs) == int(compiled)

