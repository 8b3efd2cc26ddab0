"""Real architectures convert and run exactly: each model of ``tests/zoo.py`` (and the same
models with hooks, pruning, weight norm and parametrizations), train and eval mode, float64,
against torch.autograd.forward_ad: output, tangent (on the input and every parameter) and running
statistics."""
import contextlib
import warnings

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call
from torch.nn.utils import parametrizations, prune, weight_norm

import fgkernels
from fgkernels import Dual
from fgkernels.rules import fallback
from fgkernels.testing import forward_ad_jvp, oracle_mode

from helpers import rel_err
from zoo import MODELS, build_patch_transformer


def _check_exact(build, training: bool, x_shape=(3, 3, 16, 16), rtol=1e-10,
                 strict: bool = True):
    """Convert the model ``build()`` makes, run its dual pass in strict mode (no op may take
    the forward-AD fallback) and compare it with forward_ad on a second, identical build (a
    pruned or weight-normed model cannot be deep-copied)."""
    torch.manual_seed(1)
    ref = build().double().train(training)
    torch.manual_seed(1)
    net = fgkernels.convert(build().double().train(training))
    tangents = fgkernels.random_tangents(net, num_tangents=1)
    x = torch.randn(x_shape, dtype=torch.float64)
    xt = torch.randn(1, *x_shape, dtype=torch.float64)
    # strict: every op has an fgkernels rule, none takes the fallback
    with fgkernels.strict_rules() if strict else contextlib.nullcontext():
        out = net(Dual(x, xt))

    names = list(tangents)
    params = dict(ref.named_parameters())

    def call(x_, *ps):
        return functional_call(ref, {**dict(zip(names, ps)), **dict(ref.named_buffers())}, (x_,))

    with oracle_mode():  # attention by its math kernel, weight norm written out
        y, yt = forward_ad_jvp(call, [x, *[params[n].detach() for n in names]],
                               [xt, *[tangents[n] for n in names]])
    assert rel_err(out.primal, y) <= rtol
    assert rel_err(out.tangents, yt) <= rtol
    for (name, a), b in zip(net.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=rtol, atol=1e-13, msg=name)
    return net


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_runs_exactly(backend, name, training):
    _check_exact(MODELS[name], training)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_a_transformer_of_todays_blocks_runs_exactly_on_rules(backend, training):
    """RMS norms, grouped-query attention (repeat_interleave), rotary positions and a gated MLP,
    with strided-convolution patches: every op on a rule (strict), forward_ad's numbers."""
    _check_exact(build_patch_transformer, training)


def test_subclasses_keep_their_behaviour():
    """A subclass overriding its twinned base's forward keeps its class (its own forward runs
    on Duals); one keeping the base's forward gets the twin mixed in, its methods kept."""
    net = fgkernels.convert(MODELS["timm_resnet"]())
    assert type(net[1]).__name__ == "BatchNormAct2d"
    assert isinstance(net[0], fgkernels.nn.DualConv2d)

    class Named(nn.Conv2d):
        def describe(self):
            return f"conv {self.in_channels}->{self.out_channels}"

    conv = fgkernels.convert(Named(2, 3, 1))
    assert isinstance(conv, fgkernels.nn.DualConv2d) and conv.describe() == "conv 2->3"
    fgkernels.random_tangents(net)


def test_register_twin_is_checked_and_used():
    class MyConv(nn.Conv2d):
        pass

    class DualMyConv(fgkernels.nn.DualConv2d, MyConv):
        pass

    with pytest.raises(TypeError, match="must subclass both MyConv and fgkernels.nn.DualModule"):
        fgkernels.nn.register_twin(MyConv, fgkernels.nn.DualConv2d)
    # Seen before registering: a subclass of Conv2d, which takes DualConv2d mixed in.
    assert fgkernels.nn.twin_of(MyConv(2, 2, 1)) not in (None, DualMyConv)
    fgkernels.nn.register_twin(MyConv, DualMyConv)
    assert fgkernels.nn.twin_of(MyConv(2, 2, 1)) is DualMyConv
    assert type(fgkernels.convert(nn.Sequential(MyConv(2, 2, 1)))[0]) is DualMyConv


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_hooks_that_change_outputs_apply_on_the_dual_pass(backend, training):
    def build():
        model = MODELS["resnet"]()
        hooked = [m for m in model.modules()
                  if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.ReLU))]
        for i, m in enumerate(hooked[::3]):
            m.register_forward_hook(lambda mod, inp, out, s=1.0 + 0.1 * i: out * s)
        hooked[1].register_forward_pre_hook(lambda mod, inp: (inp[0] * 0.5,))
        return model

    _check_exact(build, training)


@pytest.mark.parametrize("how", ["prune", "param_weight_norm", "orthogonal", "spectral_norm"])
def test_computed_weights_carry_the_tangent_of_their_computation(backend, how):
    def build():
        model = MODELS["resnet"]()
        for conv in [m for m in model.modules() if isinstance(m, nn.Conv2d)][1:4]:
            if how == "prune":
                prune.random_unstructured(conv, "weight", amount=0.5)
            elif how == "param_weight_norm":
                parametrizations.weight_norm(conv)
            elif how == "orthogonal":
                parametrizations.orthogonal(conv)
            else:
                parametrizations.spectral_norm(conv)
        return model

    training = how != "spectral_norm"  # its power iteration changes u, v in training mode
    # orthogonal computes its weight by matrix_exp, which has no fgkernels rule: forward AD
    # differentiates it; spectral norm's power iteration (mv, vdot, normalize) runs on rules
    net = _check_exact(build, training, strict=how != "orthogonal")
    names = [n for n, _ in net.named_parameters()]
    assert any(n.endswith(("weight_orig", "original", "original0")) for n in names)


@pytest.mark.parametrize("dim", [0, 1, None])
def test_weight_norm_hook_carries_its_tangent(backend, dim):
    """torch.nn.utils.weight_norm's fused kernel has no forward-mode rule in torch itself, so
    the oracle here is a central difference along the same direction."""
    torch.manual_seed(0)
    conv = weight_norm(nn.Conv2d(3, 4, 3).double(), dim=dim)
    net = fgkernels.convert(nn.Sequential(conv, nn.BatchNorm2d(4).double()).eval())
    tangents = fgkernels.random_tangents(net)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    xt = torch.randn_like(x)
    out = net(Dual(x, xt))
    params = dict(net.named_parameters())
    base = {n: p.detach().clone() for n, p in params.items()}

    def at(h):
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(base[n] + h * tangents[n])
            return net(x + h * xt)

    h = 1e-6
    fd = (at(h) - at(-h)) / (2 * h)
    at(0.0)
    assert rel_err(out.tangent, fd) <= 1e-7


def test_old_spectral_norm_hook_is_a_clear_error():
    conv = nn.utils.spectral_norm(nn.Conv2d(2, 3, 3))
    net = fgkernels.convert(nn.Sequential(conv))
    fgkernels.random_tangents(net)
    with pytest.raises(NotImplementedError, match="parametrizations.spectral_norm"):
        net(Dual(torch.randn(1, 2, 5, 5), torch.randn(1, 2, 5, 5)))


def test_fallback_is_reported_and_strict_mode_refuses_it(monkeypatch):
    """An op on the fallback warns at its first call in the process, and each call is
    counted; strict mode refuses it. (The record is the process's, which other tests share:
    this one starts from none.)"""
    monkeypatch.setattr(fallback, "_used", {})
    net = fgkernels.convert(MODELS["convnext"]().double())
    x = Dual(torch.randn(2, 3, 8, 8, dtype=torch.float64),
             torch.randn(2, 3, 8, 8, dtype=torch.float64))
    net(x)
    used = set(fgkernels.fallback_ops())
    assert "layer_norm" not in used and "gelu" not in used  # both have rules
    with fgkernels.strict_rules(), pytest.raises(TypeError, match="no forward-mode rule"):
        torch.atanh(x)
    with pytest.warns(UserWarning, match="'asinh' has no fgkernels rule"):
        torch.asinh(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (warned once)
        torch.asinh(x)
    assert fgkernels.fallback_ops()["asinh"] == 2


def test_strict_mode_holds_through_nested_blocks_and_from_the_environment(monkeypatch):
    x = Dual(torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64))
    with fgkernels.strict_rules():
        with fgkernels.strict_rules():
            pass
        with pytest.raises(TypeError, match="no forward-mode rule"):
            torch.atanh(x)  # still strict after the inner block
    torch.atanh(x)  # not strict outside
    monkeypatch.setenv("FGKERNELS_STRICT", "1")
    with pytest.raises(TypeError, match="no forward-mode rule"):
        torch.atanh(x)
