"""The Dual modules: twins of their torch.nn layers on tensors, and exact JVPs on Duals."""
import copy
import importlib
import io
import pickle
import re
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fgkernels
from fgkernels import Dual
from fgkernels.dual.tangents import has_tangent
from fgkernels.testing import forward_ad_jvp
from fgkernels.train.models import BasicBlock

from helpers import TOL, assert_within_torch_error, torch_jvp, torch_jvp_multi

TWIN_CASES = [
    (lambda: nn.Conv2d(3, 5, 3, stride=2, padding=1), (2, 3, 9, 8)),
    (lambda: nn.Conv2d(4, 4, 3, padding="same", groups=2, bias=False), (2, 4, 6, 7)),
    (lambda: nn.BatchNorm2d(3), (4, 3, 5, 5)),
    (lambda: nn.BatchNorm2d(3, affine=False, momentum=None), (4, 3, 5, 5)),
    (lambda: nn.ReLU(), (2, 3, 4, 4)),
    (lambda: nn.Linear(6, 4), (5, 6)),
    (lambda: nn.MaxPool2d(3, 2, 1), (2, 3, 7, 7)),
    (lambda: nn.AvgPool2d(2), (2, 3, 6, 6)),
    (lambda: nn.AdaptiveAvgPool2d((2, 3)), (2, 3, 7, 7)),
    (lambda: nn.Flatten(), (2, 3, 2, 2)),
    (lambda: nn.Hardswish(), (2, 3, 4, 4)),
    (lambda: nn.Hardsigmoid(), (2, 3, 4, 4)),
    (lambda: nn.SiLU(), (2, 3, 4, 4)),
    (lambda: nn.GELU(approximate="tanh"), (2, 3, 4, 4)),
    (lambda: nn.Sigmoid(), (2, 3, 4, 4)),
    (lambda: nn.Tanh(), (2, 3, 4, 4)),
    (lambda: nn.Hardtanh(-0.5, 0.7), (2, 3, 4, 4)),
    (lambda: nn.ReLU6(), (2, 3, 4, 4)),
    (lambda: nn.LeakyReLU(0.2), (2, 3, 4, 4)),
    (lambda: nn.ELU(0.5), (2, 3, 4, 4)),
    (lambda: nn.Mish(), (2, 3, 4, 4)),
]


@pytest.mark.parametrize("make,shape", TWIN_CASES)
def test_tensor_input_behaves_as_twin(make, shape):
    torch.manual_seed(1)
    twin = make().double()
    dual = fgkernels.convert(copy.deepcopy(twin))
    assert type(dual) is fgkernels.nn.TWINS[type(twin)]
    assert dual.state_dict().keys() == twin.state_dict().keys()
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    a, b = twin(x), dual(x2)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    a.square().sum().backward()
    b.square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=0, atol=0)
    for (_, p), (_, q) in zip(twin.named_parameters(), dual.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("make,shape", TWIN_CASES)
def test_dual_input_matches_forward_ad(backend, make, shape, dtype):
    torch.manual_seed(2)
    twin = make().to(dtype)
    dual = fgkernels.convert(copy.deepcopy(twin))
    x = torch.randn(shape, dtype=dtype)
    xt = torch.randn_like(x)
    tangents = fgkernels.random_tangents(dual)
    out = dual(Dual(x, xt))
    assert_within_torch_error((out.primal, out.tangent), lambda dt: torch_jvp(
        copy.deepcopy(twin).to(dt), x.to(dt), xt.to(dt),
        {k: v.to(dt) for k, v in tangents.items()}))


@pytest.mark.parametrize("momentum", [0.1, None])
def test_batch_norm_running_stats_follow_twin(backend, momentum):
    twin = nn.BatchNorm2d(4, momentum=momentum).double()
    dual = fgkernels.convert(copy.deepcopy(twin))
    for step in range(4):
        x = torch.randn(3, 4, 5, 5, dtype=torch.float64) * (step + 1) + step
        if step == 3:
            twin.eval(), dual.eval()
        a = twin(x)
        b = dual(Dual(x, torch.randn_like(x)))
        torch.testing.assert_close(b.primal, a)
    for name, buf in twin.named_buffers():
        torch.testing.assert_close(dict(dual.named_buffers())[name], buf, rtol=1e-12, atol=0)
    assert int(dual.num_batches_tracked) == 3


def test_state_dict_round_trip():
    twin = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(64, 2))
    twin(torch.randn(2, 3, 6, 6))
    dual = fgkernels.convert(copy.deepcopy(twin))
    fresh_twin = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                               nn.Linear(64, 2))
    fresh_twin.load_state_dict(dual.state_dict())
    fresh_dual = fgkernels.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4),
                                                 nn.ReLU(), nn.Flatten(), nn.Linear(64, 2)))
    fresh_dual.load_state_dict(twin.state_dict())
    x = torch.randn(2, 3, 6, 6)
    for m in (twin, dual, fresh_twin, fresh_dual):
        m.eval()
    torch.testing.assert_close(fresh_twin(x), twin(x), rtol=0, atol=0)
    torch.testing.assert_close(fresh_dual(x), twin(x), rtol=0, atol=0)
    fgkernels.random_tangents(dual)
    assert dual.state_dict().keys() == twin.state_dict().keys()  # tangents are not state


# --- a ResNet-18 with the stem as torchvision writes it and the trainer's BasicBlock -------
class ResNet18(nn.Module):
    def __init__(self, num_classes=10, width=8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        blocks, cin = [], width
        for i, mult in enumerate((1, 2, 4, 8)):
            for j in range(2):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(BasicBlock(cin, width * mult, stride))
                cin = width * mult
        self.layers = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_convert_resnet18(backend, layout):
    torch.manual_seed(4)
    twin = ResNet18().double()
    dual = fgkernels.convert(copy.deepcopy(twin))
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    xt = torch.randn_like(x)
    y = torch.tensor([3, 7])
    tangents = fgkernels.random_tangents(dual)
    loss = lambda z: F.cross_entropy(z, y)
    ep, et = torch_jvp(twin, x, xt, tangents, loss)
    out = F.cross_entropy(dual(Dual(x, xt)), y)
    if backend == "reference":
        torch.testing.assert_close(out.primal, ep, rtol=0, atol=0)
    torch.testing.assert_close(out.primal, ep, **TOL[torch.float64])
    torch.testing.assert_close(out.tangent, et, **TOL[torch.float64])
    twin(x)  # one plain training step updates the twin's running stats as the dual pass did
    for (n, a), (_, b) in zip(twin.named_buffers(), dual.named_buffers()):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12, msg=n)


@pytest.mark.parametrize("first", ["dual", "plain"])
def test_converted_lazy_layers_become_twins(first):
    """A lazy layer converted before its first call becomes the twin of the class it turns
    into (DualConv2d, not nn.Conv2d, which has no dual forward: both calls failed), and its
    passes are exact."""
    torch.manual_seed(0)
    x, xt = torch.randn(2, 3, 6, 6, dtype=torch.float64), torch.randn(2, 3, 6, 6,
                                                                      dtype=torch.float64)
    model = fgkernels.convert(nn.Sequential(nn.LazyConv2d(4, 3), nn.ReLU(), nn.Flatten(),
                                            nn.LazyLinear(2)).double())
    model(Dual(x, xt)) if first == "dual" else model(x)
    assert (type(model[0]), type(model[3])) == (fgkernels.nn.DualConv2d,
                                                fgkernels.nn.DualLinear)
    tangents = fgkernels.random_tangents(model)
    out = model(Dual(x, xt))
    primal, tangent = torch_jvp(model, x, xt, tangents)
    assert torch.allclose(out.primal, primal) and torch.allclose(out.tangent, tangent)


def test_a_converted_model_traces_with_torch_fx_as_the_torch_nn_model():
    """torch.fx keeps a converted model's layers whole, as torch.nn's (it traced into the twins
    and failed at batch norm's rank test: torchvision's feature extractor, FX quantisation),
    and the traced module computes what the model does; TorchScript is refused by name."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(64, 2)).eval()
    plain = torch.fx.symbolic_trace(copy.deepcopy(model))
    fgkernels.convert(model)
    traced = torch.fx.symbolic_trace(model)
    assert [(n.op, n.target) for n in traced.graph.nodes] == \
        [(n.op, n.target) for n in plain.graph.nodes]
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(traced(x), model(x))
    with pytest.raises(TypeError, match="torch.jit.script: DualSequential is a layer "
                                        "fgkernels.convert made"):
        torch.jit.script(model)


def test_convert_is_all_or_nothing():
    """A twin that cannot be made (a layer class that refuses subclasses) leaves every layer as
    it was (the layers before it had changed class)."""
    class Sealed(nn.BatchNorm2d):
        def __init_subclass__(cls, **kwargs):
            raise TypeError("Sealed takes no subclass")

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), Sealed(4))
    with pytest.raises(TypeError, match="Sealed takes no subclass"):
        fgkernels.convert(model)
    assert [type(m) for m in model] == [nn.Conv2d, nn.ReLU, Sealed] \
        and type(model) is nn.Sequential


def test_convert_fuses_sequential_runs(backend):
    """Conv→BN→ReLU inside nn.Sequential runs fused, with the same numbers and state."""
    seq = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1)).double()
    twin = copy.deepcopy(seq)
    fgkernels.convert(seq)
    assert isinstance(seq, fgkernels.nn.DualSequential)
    x = torch.randn(3, 3, 5, 5, dtype=torch.float64)
    xt = torch.randn(2, *x.shape, dtype=x.dtype)
    tangents = fgkernels.random_tangents(seq, 2)
    ep, et = torch_jvp_multi(twin, x, xt, tangents)
    out = seq(Dual(x, xt))
    torch.testing.assert_close(out.primal, ep)
    torch.testing.assert_close(out.tangent, et)
    twin(x)
    for (n, a), (_, b) in zip(twin.named_buffers(), seq.named_buffers()):
        torch.testing.assert_close(b, a, msg=n)


@pytest.mark.parametrize("which", ["bn only", "conv only", "own directions"])
def test_fused_runs_with_tangents_on_part_of_the_run(backend, which):
    """Tangents on the batch norm alone, on the convolution alone, or with a direction each."""
    seq = fgkernels.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4),
                                          nn.ReLU()).double())
    twin = copy.deepcopy(seq)
    x = torch.randn(3, 3, 6, 6, dtype=torch.float64)
    bn_t = {"1.weight": torch.randn(4, dtype=x.dtype), "1.bias": torch.randn(4, dtype=x.dtype)}
    conv_t = {"0.weight": torch.randn(4, 3, 3, 3, dtype=x.dtype)}
    if which == "own directions":
        fgkernels.set_tangents(seq, conv_t, direction=1)
        fgkernels.set_tangents(seq, bn_t, direction=2)
        out = seq(Dual(x))
        assert out.directions == (1, 2)
        torch.testing.assert_close(out.tangents[0], torch_jvp(twin, x, None, conv_t)[1])
        torch.testing.assert_close(out.tangents[1], torch_jvp(twin, x, None, bn_t)[1])
        return
    tangents = bn_t if which == "bn only" else conv_t
    fgkernels.set_tangents(seq, tangents)
    torch.testing.assert_close(seq(Dual(x)).tangent, torch_jvp(twin, x, None, tangents)[1])


@pytest.mark.parametrize("patched", [0, 1, 2])
@pytest.mark.parametrize("when", ["after convert", "before convert"])
def test_a_layer_whose_forward_is_replaced_is_not_fused(patched, when):
    """A layer of a Conv→BN→ReLU run whose instance was given a forward of its own (as
    libraries wrap a layer: ``layer.forward = f``) runs that forward, as torch's call does: the
    fused op ran ReLU after a ReLU replaced by tanh (primal 0.88 off)."""
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()).double()
    # (the convolution's weight flipped: the batch norm in training takes off what its
    # channels' scales and shifts would change)
    flipped = lambda conv, x: F.conv2d(x, conv.weight.flip(-1), conv.bias, 1, 1)
    replacement = [types.MethodType(flipped, seq[0]), lambda x: x * 2, torch.tanh][patched]
    if when == "before convert":
        seq[patched].forward = replacement
    fgkernels.convert(seq)
    if when == "after convert":
        seq[patched].forward = replacement
    x, xt = torch.randn(2, 3, 5, 5, dtype=torch.float64), torch.randn(2, 2, 3, 5, 5,
                                                                      dtype=torch.float64)
    tangents = fgkernels.random_tangents(seq, 2)
    expected = torch_jvp_multi(seq, x, xt, tangents)
    out = seq(Dual(x, xt))
    torch.testing.assert_close(out.primal, expected[0])
    torch.testing.assert_close(out.tangents, expected[1])


@pytest.mark.parametrize("case", ["noncontiguous", "batch1", "odd", "C1"])
def test_layouts_and_sizes(backend, case):
    shape = {"noncontiguous": (3, 4, 6, 6), "batch1": (1, 4, 5, 5), "odd": (3, 4, 7, 5),
             "C1": (3, 1, 5, 5)}[case]
    cin = shape[1]
    twin = nn.Sequential(nn.Conv2d(cin, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                         nn.MaxPool2d(2, ceil_mode=True)).double()
    dual = fgkernels.convert(copy.deepcopy(twin))
    x = torch.randn(shape, dtype=torch.float64)
    xt = torch.randn_like(x)
    if case == "noncontiguous":
        x = torch.randn(shape[0], shape[1], shape[2], 2 * shape[3], dtype=x.dtype)[..., ::2]
        xt = torch.randn(shape[0], shape[1], 2 * shape[2], shape[3], dtype=x.dtype)[:, :, ::2]
        assert not x.is_contiguous() and not xt.is_contiguous()
    tangents = fgkernels.random_tangents(dual)
    ep, et = torch_jvp(twin, x, xt, tangents)
    out = dual(Dual(x, xt))
    torch.testing.assert_close(out.primal, ep)
    torch.testing.assert_close(out.tangent, et)


def test_multi_tangent_modules_equal_single_runs(backend):
    net = fgkernels.convert(nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(),
                                          nn.Flatten(), nn.Linear(27, 2)).double())
    x = torch.randn(4, 2, 5, 5, dtype=torch.float64)
    xt = torch.randn(3, *x.shape, dtype=x.dtype)
    stacks = fgkernels.random_tangents(net, 3)
    net.eval()  # fixed statistics: every run sees the same affine map
    multi = net(Dual(x, xt))
    for t in range(3):
        fgkernels.set_tangents(net, {n: v[t] for n, v in stacks.items()})
        single = net(Dual(x, xt[t]))
        torch.testing.assert_close(multi.tangent[t], single.tangent, rtol=1e-12, atol=1e-12)


def test_set_tangents_direction_and_clear():
    net = fgkernels.convert(nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Conv2d(3, 2, 1)))
    x = torch.randn(2, 2, 5, 5)
    fgkernels.set_tangents(net, {"2.weight": torch.randn(2, 3, 1, 1)}, direction=4)
    out = net(Dual(x))
    assert out.directions == (4,) and out.tangents.shape == (1, 2, 2, 3, 3)
    fgkernels.clear_tangents(net)
    assert net(Dual(x)).tangent is None


# --- bad input ----------------------------------------------------------------------------------
def test_bad_tangents_raise():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="shape"):
        Dual(x, torch.randn(2, 3, 4, 5))
    with pytest.raises(TypeError, match="dtype"):
        Dual(x, torch.randn(2, 3, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="directions"):
        Dual(x, torch.randn(2, 2, 3, 4, 4), directions=[0])
    with pytest.raises(ValueError, match="increasing"):
        Dual(x, torch.randn(2, 2, 3, 4, 4), directions=[1, 0])
    with pytest.raises(ValueError, match="different numbers of tangents T"):
        Dual(x, torch.randn(2, *x.shape)) + Dual(x, torch.randn(3, *x.shape))
    with pytest.raises(ValueError, match="labelled"):
        Dual(x, torch.randn(1, *x.shape), directions=[0]) + Dual(x, torch.randn_like(x))
    with fgkernels.strict_rules(), pytest.raises(TypeError,
                                                 match="no forward-mode rule for 'atanh'"):
        torch.atanh(Dual(x, torch.randn_like(x)))


def test_bad_parameter_tangents_raise():
    net = fgkernels.convert(nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3)))
    with pytest.raises(KeyError, match="unknown parameter name '0.wieght'"):
        fgkernels.set_tangents(net, {"0.wieght": torch.randn(3, 2, 3, 3)})
    with pytest.raises(ValueError, match="tangent of '0.weight' has shape"):
        fgkernels.set_tangents(net, {"0.weight": torch.randn(3, 2, 3)})
    with pytest.raises(TypeError, match="dtype"):
        fgkernels.set_tangents(net, {"0.weight": torch.randn(3, 2, 3, 3, dtype=torch.float64)})
    with pytest.raises(ValueError, match="share"):
        fgkernels.set_tangents(net, {"1.weight": torch.randn(3), "1.bias": torch.randn(2, 3)})
    assert not any(has_tangent(p) for p in net.parameters())  # nothing half-set
    fgkernels.set_tangents(net, {"0.weight": torch.randn(2, 3, 2, 3, 3)})
    with pytest.raises(ValueError, match="different numbers of tangents T"):
        net(Dual(torch.randn(2, 2, 5, 5), torch.randn(3, 2, 2, 5, 5)))


def test_wrong_channel_count_raises_and_keeps_state():
    net = fgkernels.convert(nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3)))
    with pytest.raises(ValueError, match="input has 4 channels"):
        net(Dual(torch.randn(2, 4, 5, 5)))
    bn = fgkernels.convert(nn.BatchNorm2d(3))
    with pytest.raises(ValueError, match="expected 3 channels"):
        bn(Dual(torch.randn(2, 4, 5, 5)))
    assert int(net[1].num_batches_tracked) == 0 and int(bn.num_batches_tracked) == 0


STATELESS_BATCH_NORM_CASES = {  # a batch norm of 3 features, on inputs of 5 channels
    "BatchNorm2d": (lambda: nn.BatchNorm2d(3, affine=False, track_running_stats=False),
                    (2, 5, 4, 4)),
    "BatchNorm1d": (lambda: nn.BatchNorm1d(3, affine=False, track_running_stats=False), (4, 5)),
    "BatchNorm1d-3d": (lambda: nn.BatchNorm1d(3, affine=False, track_running_stats=False),
                       (2, 5, 6)),
    "conv-bn-relu": (lambda: nn.Sequential(
        nn.Conv2d(3, 5, 1), nn.BatchNorm2d(3, affine=False, track_running_stats=False),
        nn.ReLU()), (2, 3, 4, 4)),
}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", list(STATELESS_BATCH_NORM_CASES))
def test_a_stateless_batch_norm_takes_any_number_of_channels(backend, case, training):
    """A batch norm with no tensor per channel (affine=False, track_running_stats=False)
    normalises an input of any number of channels, as torch's does, alone or fused after a
    convolution: forward_ad's output and tangents (float64)."""
    make, shape = STATELESS_BATCH_NORM_CASES[case]
    twin = make().double().train(training)
    dual = fgkernels.convert(copy.deepcopy(twin))
    x = torch.randn(shape, dtype=torch.float64)
    xt = torch.randn_like(x)
    tangents = fgkernels.random_tangents(dual)
    out = dual(Dual(x, xt))
    assert_within_torch_error((out.primal, out.tangent),
                              lambda dt: torch_jvp(twin.to(dt), x.to(dt), xt.to(dt), tangents))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine,track", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("fused", [False, True], ids=["batch norm", "conv-bn"])
def test_a_batch_norm_with_tensors_per_channel_refuses_other_channel_counts(
        fused, affine, track, training):
    """A batch norm with a weight, a bias or running statistics refuses an input whose channels
    are not its features, as torch's does, by a message naming both, and changes no state."""
    bn = nn.BatchNorm2d(3, affine=affine, track_running_stats=track)
    net = fgkernels.convert(nn.Sequential(nn.Conv2d(2, 5, 1), bn) if fused else bn)
    net.train(training)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(2, 2 if fused else 5, 4, 4)
    with pytest.raises(RuntimeError):
        copy.deepcopy(net)(x)  # a plain call: torch's own batch norm
    got = "but the convolution before it gives 5" if fused else "got input of shape (2, 5, 4, 4)"
    with pytest.raises(ValueError, match=re.escape(f"DualBatchNorm2d: expected 3 channels, {got}")):
        net(Dual(x, torch.randn_like(x)))
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("eps,training,message", [
    (0.0, True, "eps must be positive during training, but got 0.0"),
    (-1.0, False, "eps must be non-negative, but got -1.0")])
@pytest.mark.parametrize("fused", [False, True], ids=["batch norm", "conv-bn"])
def test_batch_norm_refuses_an_eps_torch_refuses_and_keeps_state(eps, training, message, fused):
    """An eps torch's batch norm refuses (not positive in training, negative in eval) is
    refused with its message on every backend, no statistic changed (the native kernels ran
    and counted the call; at eps = -1 the primal was NaN)."""
    layers = [nn.Conv2d(2, 3, 1)] if fused else []
    net = fgkernels.convert(nn.Sequential(*layers, nn.BatchNorm2d(3 if fused else 2, eps=eps)))
    net.train(training)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(4, 2, 3, 3)
    with pytest.raises(ValueError, match=re.escape(message)):
        copy.deepcopy(net)(x)  # a plain call: torch's own batch norm
    for backend in fgkernels.available_backends():
        with fgkernels.use_backend(backend), pytest.raises(ValueError, match=re.escape(message)):
            net(Dual(x, torch.randn_like(x)))
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_fused_batch_norm_that_raises_keeps_state():
    """A Conv→BN run whose batch norm refuses its input (training on one value per channel)
    changes no running statistic and does not count the call."""
    net = fgkernels.convert(nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3, momentum=None)))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        net(Dual(torch.randn(1, 2, 1, 1), torch.randn(1, 2, 1, 1)))
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_fused_batch_norm_cumulative_average_follows_torch():
    """momentum=None (a cumulative average) on the fused Conv→BN run, step after step."""
    torch.manual_seed(0)
    twin = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3, momentum=None)).double()
    dual = fgkernels.convert(copy.deepcopy(twin))
    for step in range(3):
        x = torch.randn(4, 2, 6, 6, dtype=torch.float64) * (step + 1) + step
        twin(x)
        dual(Dual(x, torch.randn_like(x)))
    for name, buf in twin.named_buffers():
        torch.testing.assert_close(dict(dual.named_buffers())[name], buf, rtol=1e-12, atol=0)


EMPTY_BATCH_NORM_CASES = {  # the layers, their input's shape, the empty inputs torch takes
    "BatchNorm2d": (lambda momentum: nn.BatchNorm2d(3, momentum=momentum), (4, 3, 5, 5),
                    ("batch", "positions")),
    "BatchNorm1d": (lambda momentum: nn.BatchNorm1d(3, momentum=momentum), (4, 3, 5),
                    ("batch", "positions")),
    "conv-bn-relu": (lambda momentum: nn.Sequential(
        nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3, momentum=momentum), nn.ReLU()), (4, 2, 5, 5),
        ("batch",)),  # (torch's convolution refuses an input with no position)
}


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("case,empty", [(case, empty) for case, (_, _, empties)
                                        in EMPTY_BATCH_NORM_CASES.items() for empty in empties])
def test_batch_norm_counts_an_empty_input_and_keeps_its_statistics(backend, case, empty,
                                                                    momentum):
    """An empty input (no sample, or no position along the last dim) to a converted batch
    norm in training, alone or fused after a convolution, is counted in num_batches_tracked
    and leaves the running statistics as torch's batch norm does: unchanged, and a cumulative
    average (momentum=None) goes on from there. Each step's output and buffers are torch's
    own module's, its tangent forward_ad's, whose pass on torch's module changes the
    buffers alike (float64)."""
    make, shape, _ = EMPTY_BATCH_NORM_CASES[case]
    twin = make(momentum).double()
    under_forward_ad = copy.deepcopy(twin)
    dual = fgkernels.convert(copy.deepcopy(twin))
    x = torch.randn(shape, dtype=torch.float64) * 2 + 1
    for step in (x, x[:0] if empty == "batch" else x[..., :0], x * 3 - 1):
        xt = torch.randn_like(step)
        want = twin(step)
        want_ad, want_tangent = forward_ad_jvp(under_forward_ad, [step], [xt[None]])
        out = dual(Dual(step, xt))
        torch.testing.assert_close(want_ad, want)
        torch.testing.assert_close(out.primal, want)
        torch.testing.assert_close(out.tangent, want_tangent[0])
        for name, buf in twin.named_buffers():
            torch.testing.assert_close(dict(dual.named_buffers())[name], buf, rtol=1e-12, atol=0)
            torch.testing.assert_close(dict(under_forward_ad.named_buffers())[name], buf,
                                       rtol=0, atol=0)


class _ConvThenLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        return self.lin(self.conv(x).mean((2, 3)))


def test_a_twin_inside_a_dual_pass_skips_the_module_call_path():
    """Called with a Dual inside a dual pass (started by an enclosing module), a twin that
    nothing watches runs its forward without torch's module call path; a plain call takes it."""
    net = fgkernels.convert(_ConvThenLinear())
    fgkernels.random_tangents(net)
    calls = []
    net.lin._call_impl = lambda *args, **kwargs: calls.append("lin") or nn.Linear.forward(
        net.lin, *args, **kwargs)
    net(Dual(torch.randn(1, 2, 5, 5), torch.randn(1, 2, 5, 5)))
    assert calls == []
    net(torch.randn(1, 2, 5, 5))
    assert calls == ["lin"]


def test_a_watched_twin_inside_a_dual_pass_is_called_the_usual_way():
    """A twin's own forward hook, and a global one, see its call inside a dual pass."""
    net = fgkernels.convert(_ConvThenLinear())
    fgkernels.random_tangents(net)
    seen = []
    own = net.conv.register_forward_hook(lambda m, args, out: seen.append(("own", type(out))))
    net(Dual(torch.randn(1, 2, 5, 5)))
    assert seen == [("own", Dual)]
    own.remove()
    seen.clear()
    from torch.nn.modules import module as torch_module
    handle = torch_module.register_module_forward_hook(
        lambda m, args, out: seen.append(("global", type(m).__name__)))
    try:
        net(Dual(torch.randn(1, 2, 5, 5)))
    finally:
        handle.remove()
    assert [n for _, n in seen] == ["DualConv2d", "DualLinear", "_ConvThenLinear"]


def test_a_converted_layer_subclass_keeps_its_own_call():
    """A layer subclass that overrides ``__call__`` (and keeps its base's forward, so that
    convert mixes the twin in) is still called through it, plain or dual, in a pass or not."""
    class Counted(nn.Linear):
        calls = 0

        def __call__(self, *args, **kwargs):
            Counted.calls += 1
            return super().__call__(*args, **kwargs)

    net = fgkernels.convert(nn.Sequential(nn.Linear(3, 3), Counted(3, 2)))
    fgkernels.random_tangents(net)
    net(torch.randn(1, 3))
    net(Dual(torch.randn(1, 3)))
    assert Counted.calls == 2


def test_public_top_level():
    """The top level holds the value, the tangents and where a pass starts, convert/compile and
    the backend switches; the twins live in fgkernels.nn and resolve from the top level too
    (fgkernels.DualConv2d)."""
    assert len(fgkernels.__all__) <= 17
    assert all(hasattr(fgkernels, name) for name in fgkernels.__all__)
    assert not [n for n in fgkernels.__all__ if n.startswith("Dual") and n != "Dual"]
    assert fgkernels.DualConv2d is fgkernels.nn.DualConv2d
    assert fgkernels.register_twin is fgkernels.nn.register_twin
    with pytest.raises(AttributeError, match="no attribute 'DualConv3d'"):
        _ = fgkernels.DualConv3d


def test_every_twin_is_public():
    """Every built-in twin is exported by fgkernels.nn (and resolves from the top level)."""
    for twin in {t for t in fgkernels.nn.TWINS.values() if t.__module__ == "fgkernels.nn.modules"}:
        assert twin.__name__ in fgkernels.nn.__all__
        assert getattr(fgkernels.nn, twin.__name__) is twin
        assert getattr(fgkernels, twin.__name__) is twin
        # An activation twin's docstring names its rule by a path that resolves.
        for path in re.findall(r"``(fgkernels\.[\w.]+)``", twin.__doc__ or ""):
            module, _, name = path.rpartition(".")
            assert hasattr(importlib.import_module(module), name), path


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_converted_conv_with_a_padding_mode(mode):
    """A convolution padding with input values pads the tangent alike, converted or not (the
    twin refused these modes): forward_ad's numbers, in a Conv→BN→ReLU run too."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=2, dilation=2, padding_mode=mode),
                          nn.BatchNorm2d(3), nn.ReLU()).double()
    x, xt = torch.randn(2, 2, 6, 6, dtype=torch.float64), torch.randn(2, 2, 2, 6, 6,
                                                                       dtype=torch.float64)
    params = {n: torch.randn(2, *p.shape, dtype=torch.float64) for n, p in model.named_parameters()}
    y, yt = torch_jvp_multi(model, x, xt, params)
    net = fgkernels.convert(copy.deepcopy(model))
    fgkernels.set_tangents(net, params)
    out = net(Dual(x, xt))
    torch.testing.assert_close(out.primal, y, **TOL[torch.float64])
    torch.testing.assert_close(out.tangents, yt, **TOL[torch.float64])


# --- layers whose own code a twin or a fused run must not stand in for ------------------------
class _ClampedReLU(nn.ReLU):
    def forward(self, x):
        return torch.clamp(x, 0.0, 0.5)


class _DoubledBN(nn.BatchNorm2d):
    def __call__(self, *args, **kwargs):
        return 2 * super().__call__(*args, **kwargs)


class _StandardisedConv(nn.Conv2d):
    def _conv_forward(self, x, weight, bias):
        w = (weight - weight.mean((1, 2, 3), keepdim=True)) / weight.std((1, 2, 3), keepdim=True)
        return super()._conv_forward(x, w, bias)


class _InPlaceReuse(nn.Module):
    """``y = relu_(h)`` makes h the ReLU's output too, as torch's in-place ReLU does."""

    def __init__(self):
        super().__init__()
        self.conv, self.act = nn.Conv2d(3, 3, 1), nn.ReLU(inplace=True)

    def forward(self, x):
        h = self.conv(x)
        return h + self.act(h)


OWN_CODE_CASES = {
    "conv-bn-relu subclass with its own forward": lambda: nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), _ClampedReLU()),
    "bn-relu subclass with its own forward": lambda: nn.Sequential(
        nn.BatchNorm2d(3), _ClampedReLU()),
    "batch norm with its own __call__": lambda: nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), _DoubledBN(4), nn.ReLU()),
    "convolution with its own _conv_forward": lambda: nn.Sequential(
        _StandardisedConv(3, 4, 3, padding=1), nn.BatchNorm2d(4)),
    "in-place ReLU whose input is read again": _InPlaceReuse,
}


@pytest.mark.parametrize("case", sorted(OWN_CODE_CASES))
def test_converting_keeps_a_layer_s_own_code(case):
    """convert() never changes a number: a layer subclass's own forward, __call__ or
    _conv_forward runs on the dual pass (no twin and no fused op stands in for it), and an
    in-place activation acts in place, converted as unconverted (float64 forward_ad)."""
    torch.manual_seed(0)
    model = OWN_CODE_CASES[case]().double()
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    xt = torch.randn_like(x)
    tangents = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    y, yt = torch_jvp(model, x, xt, tangents)
    fgkernels.convert(model)
    fgkernels.set_tangents(model, tangents)
    out = model(Dual(x, xt))
    torch.testing.assert_close(out.primal, y, **TOL[torch.float64])
    torch.testing.assert_close(out.tangent, yt, **TOL[torch.float64])


class _NamedConv(nn.Conv2d):
    """A subclass adding a method: convert mixes DualConv2d into it (a twin made at run time)."""

    def fan_in(self):
        return self.weight[0].numel()


class _Stage(nn.Sequential):
    """A container subclass, as torchvision's Conv2dNormActivation."""


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL, "torch.save"])
def test_a_converted_model_with_layer_subclasses_pickles(protocol):
    """A converted model holding subclasses of twinned layers (whose twins convert makes at
    run time, which pickle cannot find by name) saves and loads: the loaded model has the same
    classes and state, and its dual pass gives forward_ad's numbers (float64)."""
    torch.manual_seed(0)
    model = nn.Sequential(_Stage(_NamedConv(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU()),
                          nn.Flatten(), nn.Linear(48, 2)).double()
    x, xt = torch.randn(2, 2, 4, 4, dtype=torch.float64), torch.randn(2, 2, 4, 4,
                                                                      dtype=torch.float64)
    tangents = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    y, yt = torch_jvp(model, x, xt, tangents)
    net = fgkernels.convert(model)
    if protocol == "torch.save":
        buffer = io.BytesIO()
        torch.save(net, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
    else:
        loaded = pickle.loads(pickle.dumps(net, protocol))
    assert [type(m) for m in loaded.modules()] == [type(m) for m in net.modules()]
    assert isinstance(loaded[0][0], _NamedConv)
    assert isinstance(loaded[0][0], fgkernels.nn.DualConv2d)
    assert loaded[0][0].fan_in() == 18
    torch.testing.assert_close(loaded.state_dict(), net.state_dict(), rtol=0, atol=0)
    fgkernels.set_tangents(loaded, tangents)
    out = loaded(Dual(x, xt))
    torch.testing.assert_close(out.primal, y, **TOL[torch.float64])
    torch.testing.assert_close(out.tangent, yt, **TOL[torch.float64])
