"""Real torchvision and timm models run exactly on Duals: a subset of ``real_models.QUICK``
(every parameter and the input carrying a tangent, float64, train and eval mode), two compiled
by ``fgkernels.compile``, and transformers' models in tiny configurations, against
torch.autograd.forward_ad. The whole catalogue: ``scripts/check_real_models.py``. Skipped
where torchvision, timm or transformers is missing (``bash scripts/setup.sh --models`` makes an
environment with them), unless FGKERNELS_REQUIRE_MODELS=1 (CI's), where a missing one fails
the run."""
import importlib
import os

import pytest

for _name in ("torchvision", "timm", "transformers"):
    if os.environ.get("FGKERNELS_REQUIRE_MODELS") == "1":
        importlib.import_module(_name)
    else:
        pytest.importorskip(_name)

import torch  # noqa: E402

import fgkernels  # noqa: E402

import real_models  # noqa: E402

EXACT = 1e-10
# Ops that have no fgkernels rule by design and that these models use: each takes forward AD.
NO_RULE_BY_DESIGN = set()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", real_models.QUICK)
def test_real_model_is_exact(name, training):
    result = real_models.check(real_models.catalogue()[name], training)
    assert result["primal"] <= EXACT
    assert result["tangent"] <= EXACT
    assert result["buffers"] <= EXACT
    assert set(result["fallback"]) <= NO_RULE_BY_DESIGN, result["fallback"]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", sorted(real_models.TRANSFORMERS))
def test_a_transformers_model_is_exact(name, training):
    """transformers' language, sequence-to-sequence, vision and audio models in tiny
    configurations, called by keyword; the language models' passes start at their token ids
    (``fgkernels.dual_pass``)."""
    result = real_models.check_transformers(name, training)
    assert max(result["primal"], result["tangent"], result["buffers"]) <= EXACT, result
    assert not result["fallback"], result["fallback"]


@pytest.mark.parametrize("name", ["torchvision/resnet18", "torchvision/swin_t"])
def test_an_unconverted_model_is_exact_too(name):
    result = real_models.check(real_models.catalogue()[name], True, convert=False)
    assert max(result["primal"], result["tangent"], result["buffers"]) <= EXACT


def test_a_converted_real_model_saved_whole_is_exact():
    """torch.save of a converted model whose layers subclass twinned ones (torchvision's
    Conv2dNormActivation, a Sequential) and torch.load give the converted model back."""
    result = real_models.check(real_models.catalogue()["torchvision/mobilenet_v3_small"], True,
                               saved=True)
    assert max(result["primal"], result["tangent"], result["buffers"]) <= EXACT, result


@pytest.mark.parametrize("name, training", [("torchvision/mobilenet_v3_small", True),
                                            ("timm/vit_tiny_patch16_224", False)])
def test_a_compiled_real_model_is_exact_in_one_graph(name, training):
    """fgkernels.compile on a CNN with squeeze-excitation gates, hardswish and dropout, trained,
    and on a vision transformer (the whole catalogue: ``check_real_models.py --compiled``)."""
    result = real_models.check(real_models.catalogue()[name], training, compiled=True)
    assert max(result["primal"], result["tangent"], result["buffers"]) <= EXACT, result
    assert result["graph_breaks"] == 0


def test_the_quick_set_is_in_the_catalogue():
    assert set(real_models.QUICK) <= set(real_models.catalogue())
    assert "native" in fgkernels.available_backends()


class _DetectorLosses(torch.nn.Module):
    """A detection model trained on fixed targets: its losses, by name, in a tuple, each
    step from the same random state (the sampling of proposals and anchors)."""

    def __init__(self, detector, targets):
        super().__init__()
        self.detector, self.targets = detector, targets

    def forward(self, image):
        torch.manual_seed(1)
        losses = self.detector([image], self.targets)
        return tuple(losses[k] for k in sorted(losses))


def test_a_detection_model_is_exact(monkeypatch):
    """torchvision's Faster R-CNN (a MobileNetV3 FPN at 320 pixels, untrained, float64, in
    training: its four losses) takes the image's and every parameter's tangent through its
    padded batch and its roi_align heads, as forward_ad does with roi_align written in torch
    ops (forward_ad refuses torchvision's). The objectness loss, which torch computes in
    float32 (its labels are float32), is held to float32's rounding."""
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn
    from torchvision.ops import poolers

    from fgkernels import Dual
    from fgkernels.testing import model_jvp

    torch.manual_seed(0)
    detector = fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=3).double().train()
    targets = [{"boxes": torch.tensor([[10., 20., 60., 80.], [30., 5., 120., 50.]],
                                      dtype=torch.float64), "labels": torch.tensor([1, 2])}]
    model = fgkernels.convert(_DetectorLosses(detector, targets))
    image = torch.rand(3, 96, 128, dtype=torch.float64)
    xt = torch.randn(1, *image.shape, dtype=torch.float64)
    tangents = {n: torch.randn(1, *p.shape, dtype=torch.float64)
                for n, p in model.named_parameters()}

    with monkeypatch.context() as patch:
        patch.setattr(poolers, "roi_align", real_models.roi_align_in_torch_ops)
        oracle = model_jvp(model, [image], [xt], tangents)
    fgkernels.set_tangents(model, tangents)
    losses = model(Dual(image, xt))
    for got, want, want_t in zip(losses, *oracle):
        tol = EXACT if got.dtype == torch.float64 else 1e-6
        torch.testing.assert_close(got.primal, want.to(got.dtype), rtol=tol, atol=0)
        torch.testing.assert_close(got.tangents, want_t.to(got.dtype), rtol=tol, atol=0)
