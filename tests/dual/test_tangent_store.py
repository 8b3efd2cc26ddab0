"""Tangents belong to tensors: wherever a model reads a parameter during a dual pass (its own
layer, a tied layer, a ParameterList or ParameterDict, an attention block, a parametrization,
an op on the parameter alone) it carries its tangent, converted or not; every case against
torch.autograd.forward_ad in float64 (``fgkernels.testing.model_jvp``)."""
import collections
import contextlib
import copy
import gc
import io
import pickle
from typing import NamedTuple

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrizations, parametrize, prune

import fgkernels
from fgkernels import Dual
from fgkernels.dual.tangents import has_tangent, tangent_of
from fgkernels.dual.value import census
from fgkernels.testing import compare_with_forward_ad, model_jvp

from helpers import rel_err
from zoo import MODELS

f64 = dict(dtype=torch.float64)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 4), nn.Linear(4, 4)
        self.l2.weight = self.l1.weight

    def forward(self, x):
        return self.l2(torch.relu(self.l1(x)))


class Listed(nn.Module):
    def __init__(self):
        super().__init__()
        self.mats = nn.ParameterList([nn.Parameter(torch.randn(4, 4)) for _ in range(2)])
        self.scales = nn.ParameterDict({"a": nn.Parameter(torch.randn(4))})

    def forward(self, x):
        for m in self.mats:
            x = x @ m
        return x * self.scales["a"]


class Token(nn.Module):
    """Ops on parameters alone: a class token expanded, a scale doubled, a transposed weight."""

    def __init__(self):
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, 4))
        self.scale = nn.Parameter(torch.tensor(1.5))
        self.w = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1)
        return (x @ self.w.t()) * (self.scale * 2)


class Held(nn.Module):
    """Parameters read from containers of the module's own: a list, a tuple, a dict, nested
    ones and a private one, each with ops on the parameter alone."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Parameter(torch.randn(4, 4)), nn.Parameter(torch.randn(4))
        self.weights = [self.a, self.b]
        self.pair = (self.a, [self.b])
        self.named = {"layer": {"a": self.a}}
        self._scales = [self.b]

    def forward(self, x):
        x = torch.tanh(x @ self.weights[0].t() + self.weights[1] * 2)
        x = x @ self.pair[0][:, :3].sum(1, keepdim=True).expand(4, 4) + self.pair[1][0].exp()
        return x @ self.named["layer"]["a"] * self._scales[0].sin()


class Attention(nn.Module):
    def __init__(self, need_weights: bool, **kwargs):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, **kwargs)
        self.need_weights = need_weights

    def forward(self, x):
        out, weights = self.attn(x, x, x, need_weights=self.need_weights)
        return out if weights is None else out * weights.mean()


class Scaled(nn.Module):
    """A parametrization with a parameter of its own."""

    def __init__(self):
        super().__init__()
        self.g = nn.Parameter(torch.tensor(1.5))

    def forward(self, w):
        return w * self.g


def _parametrized_linear():
    lin = nn.Linear(4, 3)
    parametrize.register_parametrization(lin, "weight", Scaled())
    return lin


def _weight_normed_convs():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 2, 1, bias=False))
    for conv in (net[0], net[3]):
        parametrizations.weight_norm(conv)
    return net


CASES = {
    "tied": (Tied, (3, 4)),
    "listed": (Listed, (3, 4)),
    "held in containers": (Held, (3, 4)),
    "token": (Token, (2, 3, 4)),
    "attention": (lambda: Attention(False, batch_first=True), (2, 5, 8)),
    "attention weights": (lambda: Attention(True), (5, 2, 8)),
    "attention bias_kv": (lambda: Attention(True, add_bias_kv=True, add_zero_attn=True),
                          (5, 2, 8)),
    "parametrization": (_parametrized_linear, (2, 4)),
    "weight_norm convs": (_weight_normed_convs, (2, 3, 6, 6)),
}


def _check(model, shape, slots: int = 2, convert: bool = False):
    torch.manual_seed(3)
    model = model.double()
    ref = copy.deepcopy(model)
    if convert:
        fgkernels.convert(model)
    tangents = fgkernels.random_tangents(model, num_tangents=slots)
    x = torch.randn(shape, **f64)
    xt = torch.randn(slots, *shape, **f64)
    out = model(Dual(x, xt))
    y, yt = model_jvp(ref, [x], [xt], tangents)
    assert rel_err(out.primal, y) <= 1e-12
    assert rel_err(out.tangents, yt) <= 1e-10
    return model


@pytest.mark.parametrize("convert", [False, True], ids=["as is", "converted"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_read_of_a_parameter_carries_its_tangent(case, convert):
    build, shape = CASES[case]
    torch.manual_seed(0)
    _check(build(), shape, convert=convert)


def test_parameters_are_handed_back_after_the_pass():
    model = Token().double()
    params = {n: p for n, p in model.named_parameters()}
    fgkernels.random_tangents(model)
    model(Dual(torch.randn(2, 3, 4, **f64)))
    assert {n: p for n, p in model.named_parameters()} == params  # the same tensors, in place
    assert all(isinstance(p, nn.Parameter) for p in model.parameters())
    out = model(torch.randn(2, 3, 4, **f64))  # a plain call stays plain, tangents set or not
    assert type(out) is torch.Tensor and out.requires_grad


def test_a_forward_that_raises_hands_the_parameters_back():
    class Failing(Token):
        def forward(self, x):
            super().forward(x)
            raise ValueError("boom")

    model = Failing().double()
    fgkernels.random_tangents(model)
    with pytest.raises(ValueError, match="boom"):
        model(Dual(torch.randn(2, 3, 4, **f64)))
    assert all(isinstance(p, nn.Parameter) for p in model.parameters())


GLOBAL_SCALE = nn.Parameter(torch.randn(4, **f64))


class ReachedAround(nn.Module):
    """Parameters read where the pass substitutes nothing: a closure (alone, transposed, by
    shape, with its requires_grad set), a global and a list of a bare torch.nn module."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4, **f64))
        self.scale = GLOBAL_SCALE
        self.bare = nn.Module()
        self.bare.held = [nn.Parameter(torch.randn(4, **f64))]
        w = self.w

        def reads(x):
            w.requires_grad = True
            return x @ w.T + w.sum() + w.new_ones(w.shape[1]) * w[0]

        self.reads = reads

    def forward(self, x):
        self.types = {type(self.w), type(GLOBAL_SCALE)}
        return self.reads(x) * GLOBAL_SCALE.exp() + self.bare.held[0].sin()


@pytest.mark.parametrize("convert", [False, True], ids=["as is", "converted"])
def test_a_tensor_reached_around_the_modules_carries_its_tangent(convert):
    """A closure's parameter, a global and a list of a bare ``nn.Module()`` carry their
    tangents, the tensors lifted for the pass alone: afterwards, even after a forward that
    raised, each is a plain Parameter again."""
    model = ReachedAround()
    if convert:
        fgkernels.convert(model)
    x = torch.randn(3, 4, **f64)
    result = compare_with_forward_ad(model, x)
    assert result["tangent"] < 1e-12 and result["primal"] < 1e-12
    assert not any(t is nn.Parameter for t in model.types)  # lifted during the pass
    assert all(type(p) is nn.Parameter for p in model.parameters())
    fgkernels.random_tangents(model)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        model(Dual(torch.randn(3, 5, **f64)))
    assert all(type(p) is nn.Parameter for p in model.parameters())
    fgkernels.clear_tangents(model)


class _ClosureReader(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4, **f64))
        w = self.w
        self.reads = lambda x: x @ w.T + w.sin().sum()

    def forward(self, x):
        return self.reads(x)


def test_passes_in_two_threads_lift_their_tensors_apart():
    """Two models, each reading its parameter through a closure, run dual passes in two
    threads at once, over and over: each pass is exact, and afterwards each parameter is a
    plain Parameter again (a tensor stays lifted while any thread's pass holds it)."""
    import threading

    from fgkernels.dual.lifting import LIFTS
    from fgkernels.testing import forward_ad_jvp

    models = [_ClosureReader() for _ in range(2)]
    x = torch.randn(3, 4, **f64)
    expected = []
    for m in models:
        wt = torch.randn(1, 4, 4, **f64)
        expected.append(forward_ad_jvp(lambda w: x @ w.T + w.sin().sum(), [m.w.detach()],
                                       [wt])[1])
        fgkernels.set_tangents(m, {"w": wt})
    errors, barrier = [], threading.Barrier(2)

    def run(i):
        barrier.wait()
        for _ in range(40):
            errors.append(rel_err(models[i](Dual(x)).tangents, expected[i]))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 80 and max(errors) < 1e-12
    assert all(type(m.w) is nn.Parameter for m in models) and not LIFTS


def test_a_copy_of_a_lifted_tensor_is_of_its_own_class():
    """deepcopy and pickle of a tensor lifted for a pass (a closure's parameter) give its
    own class, without tangent, as outside the pass."""
    seen = {}

    class Copies(ReachedAround):
        def forward(self, x):
            seen["copy"] = copy.deepcopy(GLOBAL_SCALE)
            buffer = io.BytesIO()
            torch.save(GLOBAL_SCALE, buffer)
            buffer.seek(0)
            seen["loaded"] = torch.load(buffer, weights_only=False)
            return super().forward(x)

    model = Copies()
    fgkernels.random_tangents(model)
    model(Dual(torch.randn(3, 4, **f64)))
    for v in seen.values():
        assert type(v) is nn.Parameter and not has_tangent(v)
        torch.testing.assert_close(v.data, GLOBAL_SCALE.data)
    fgkernels.clear_tangents(model)


@pytest.mark.parametrize("convert", [False, True], ids=["as is", "converted"])
@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
def test_a_pass_an_interrupt_cut_short_ends_at_the_next_call(interrupt, convert):
    """torch runs no forward hook when a forward raises a KeyboardInterrupt (Ctrl-C) or
    SystemExit: the next call of the model, plain or dual (or set_tangents, random_tangents,
    clear_tangents) finds the pass's root call gone, hands the parameters back, and a new pass
    is exact."""
    class Interrupted(Token):
        stop = True

        def forward(self, x):
            y = super().forward(x)
            if self.stop:
                raise interrupt()
            return y

    model = Interrupted().double()
    if convert:
        fgkernels.convert(model)
    fgkernels.random_tangents(model)
    x = torch.randn(2, 3, 4, **f64)
    with pytest.raises(interrupt):
        model(Dual(x))
    model.stop = False
    out = model(x)
    assert type(out) is torch.Tensor
    assert all(type(p) is nn.Parameter for p in model.parameters())  # (no longer lifted)
    for way_out in ("dual call", "random_tangents", "clear_tangents"):
        model.stop = True
        with pytest.raises(interrupt):
            model(Dual(x))
        model.stop = False
        if way_out == "dual call":
            model(Dual(x))
        elif way_out == "random_tangents":
            fgkernels.random_tangents(model)
        else:
            fgkernels.clear_tangents(model)
        assert all(isinstance(p, nn.Parameter) for p in model.parameters()), way_out
    _check(model, (2, 3, 4))


def test_a_module_outside_the_tree_called_in_the_pass_joins_it():
    """A module the root holds in a plain list (not a submodule) and calls on the dual pass:
    its parameters' tangents count as any submodule's."""
    class Holder(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = [inner]  # not registered

        def forward(self, x):
            return torch.tanh(self.inner[0](x))

    inner = Token().double()
    oracle = nn.Sequential(copy.deepcopy(inner), nn.Tanh())
    tangents = fgkernels.random_tangents(inner, num_tangents=2)
    x, xt = torch.randn(2, 3, 4, **f64), torch.randn(2, 2, 3, 4, **f64)
    out = Holder(inner)(Dual(x, xt))
    y, yt = model_jvp(oracle, [x], [xt], {f"0.{n}": t for n, t in tangents.items()})
    assert rel_err(out.tangents, yt) <= 1e-10
    assert all(isinstance(p, nn.Parameter) for p in inner.parameters())


def test_a_second_thread_passing_the_same_model_is_refused_clearly():
    """A dual pass substitutes the model's parameters: a pass on the same model in another
    thread meanwhile is refused with an error that says so, and the first is unharmed."""
    import threading

    class Waiting(Token):
        def forward(self, x):
            inside.set()
            release.wait(60)  # set in the finally below, whatever happens there
            return super().forward(x)

    inside, release, errors = threading.Event(), threading.Event(), []
    model = Waiting().double()
    fgkernels.random_tangents(model)
    x = torch.randn(2, 3, 4, **f64)
    first = threading.Thread(target=lambda: errors.append(model(Dual(x))))
    first.start()
    try:
        assert inside.wait(60), "the first pass never started"
        with pytest.raises(RuntimeError, match="another thread"):
            model(Dual(x))
    finally:
        release.set()
        first.join()
    assert isinstance(errors[0], Dual)
    assert all(isinstance(p, nn.Parameter) for p in model.parameters())


def test_a_parameter_tangent_given_in_another_layout_takes_the_parameter_s():
    """A tangent given transposed is stored in its parameter's layout, so that an in-place
    write through a view of the parameter inside a pass (under no_grad) writes the parameter
    and its tangent alike, as forward_ad writes a dual tensor's."""
    class Doubling(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 4, **f64))

        def forward(self, x):
            with torch.no_grad():
                self.w.view(12).view(2, 6).mul_(2.0)
            return x * self.w

    model = Doubling()
    w0, t = model.w.detach().clone(), torch.randn(4, 3, **f64).t()
    fgkernels.set_tangents(model, {"w": t})
    stack = tangent_of(model.w).stack
    assert stack.is_contiguous() and torch.equal(stack[0], t)
    out = model(Dual(torch.ones(3, 4, **f64)))
    fgkernels.clear_tangents(model)
    assert torch.equal(model.w.detach(), 2 * w0)
    assert torch.equal(out.tangent, 2 * t)


def test_an_unconverted_resnet_gives_the_converted_numbers():
    torch.manual_seed(0)
    plain = MODELS["resnet"]().double()
    converted = fgkernels.convert(copy.deepcopy(plain))
    x = torch.randn(2, 3, 16, 16, **f64)
    xt = torch.randn(2, *x.shape, **f64)
    tangents = fgkernels.random_tangents(plain, num_tangents=2)
    fgkernels.set_tangents(converted, tangents)
    a, b = plain(Dual(x, xt)), converted(Dual(x, xt))
    assert rel_err(a.primal, b.primal) <= 1e-13 and rel_err(a.tangents, b.tangents) <= 1e-12
    for (name, u), v in zip(plain.state_dict().items(), converted.state_dict().values()):
        torch.testing.assert_close(u, v, rtol=1e-13, atol=0, msg=name)


def test_a_module_called_with_a_dual_in_second_place():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, a, b):
            return self.lin(a) + b * self.lin.bias

    model = Pair().double()
    ref = copy.deepcopy(model)
    tangents = fgkernels.random_tangents(model, num_tangents=1)
    a, b, bt = torch.randn(3, 4, **f64), torch.randn(3, 4, **f64), torch.randn(1, 3, 4, **f64)
    out = model(a, Dual(b, bt))
    y, yt = model_jvp(ref, [a, b], [None, bt], tangents)
    assert rel_err(out.tangents, yt) <= 1e-12


def test_a_dual_passed_only_by_keyword_is_a_clear_error():
    model = Token().double()
    fgkernels.random_tangents(model)
    with pytest.raises(TypeError, match="by keyword only; pass it positionally, or call the "
                                        "module inside fgkernels.dual_pass"):
        model(x=Dual(torch.randn(2, 3, 4, **f64)))


class _TiedLanguageModel(nn.Module):
    """Token ids in, logits out, the output layer tied to the embedding."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.mix = nn.Linear(6, 6)
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids, attention_mask=None):
        h = torch.tanh(self.mix(self.embed(ids)))
        if attention_mask is not None:
            h = h * attention_mask[..., None]
        return self.head(h)


def test_dual_pass_runs_a_model_of_token_ids():
    """Inside ``dual_pass(model)`` a call with integers only (and keywords) is a dual pass: the
    tied embedding brings its tangent in at both ends, as forward_ad's; outside it the call is
    plain."""
    model = _TiedLanguageModel().double()
    ids, mask = torch.tensor([[1, 4, 9], [3, 3, 0]]), torch.tensor([[1.0, 1, 1], [1, 1, 0]], **f64)
    tangents = fgkernels.random_tangents(model, num_tangents=2)
    assert type(model(ids)) is torch.Tensor
    with fgkernels.dual_pass(model):
        out = model(ids, attention_mask=mask)
    y, yt = model_jvp(model, [ids, mask], [None, None], tangents)
    torch.testing.assert_close(out.primal, y, rtol=0, atol=0)
    assert rel_err(out.tangents, yt) <= 1e-12
    assert type(model(ids)) is torch.Tensor and type(model.embed.weight) is nn.Parameter


def test_dual_pass_takes_duals_by_keyword_and_nests():
    model = Token().double()
    tangents = fgkernels.random_tangents(model)
    x = torch.randn(2, 3, 4, **f64)
    with fgkernels.dual_pass(model):
        with fgkernels.dual_pass(model):
            inner = model(x=Dual(x))
        outer = model(x=Dual(x))
    y, yt = model_jvp(model, [x], [None], {k: t[None] for k, t in tangents.items()})
    for out in (inner, outer):
        assert rel_err(out.tangents, yt) <= 1e-12
    with pytest.raises(TypeError, match="by keyword only"):
        model(x=Dual(x))
    with pytest.raises(TypeError, match="dual_pass: expected an nn.Module, got Tensor"):
        with fgkernels.dual_pass(x):
            pass


@pytest.mark.parametrize("stacked", [False, True], ids=["one tangent", "stacked"])
def test_tied_names_share_one_tangent_and_may_not_disagree(stacked):
    """A tied parameter takes its tangent by either name, or by both given the same tensor
    (which was refused in the parameter's shape: each name's stack was a view of its own);
    two tensors are refused, and nothing is set."""
    model = Tied().double()
    t = torch.randn(*(2,) * stacked, 4, 4, **f64)
    fgkernels.set_tangents(model, {"l2.weight": t})  # the alias of l1.weight
    assert torch.equal(tangent_of(model.l1.weight).stack, t if stacked else t[None])
    fgkernels.clear_tangents(model)
    fgkernels.set_tangents(model, {"l1.weight": t, "l2.weight": t})
    assert torch.equal(tangent_of(model.l2.weight).stack, t if stacked else t[None])
    fgkernels.clear_tangents(model)
    with pytest.raises(ValueError, match="same .tied. parameter"):
        fgkernels.set_tangents(model, {"l1.weight": t, "l2.weight": t.clone()})
    assert tangent_of(model.l1.weight) is None


def test_a_parameters_requires_grad_during_a_pass_is_the_parameters():
    """``layer.weight.requires_grad`` read or set inside a dual pass (a model freezing a layer
    in its forward) is the parameter's, as on the plain call."""
    class Freezes(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            self.seen = self.fc.weight.requires_grad
            self.fc.weight.requires_grad = False
            return self.fc(x)

    model = Freezes()
    fgkernels.random_tangents(model)
    model(Dual(torch.randn(2, 3)))
    assert model.seen is True and model.fc.weight.requires_grad is False


def test_a_parameters_data_set_during_a_pass_is_set():
    """``self.fc.weight.data = ...`` in a forward (weight clipping) sets the parameter during a
    dual pass, as on a plain call; the tangent stays, as forward_ad's does."""
    class Clipped(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            self.fc.weight.data = self.fc.weight.data.clamp(-0.1, 0.1)
            return self.fc(x)

    torch.manual_seed(0)
    model = Clipped().double()
    result = compare_with_forward_ad(model, [torch.randn(2, 3, **f64)], num_tangents=2)
    assert result["primal"] == 0 and result["tangent"] < 1e-15
    fresh = Clipped().double()  # (the oracle's pass above clips the parameter itself too)
    fgkernels.random_tangents(fresh)
    fresh(Dual(torch.randn(2, 3, **f64)))
    assert fresh.fc.weight.abs().max() == 0.1 and type(fresh.fc.weight) is nn.Parameter
    with pytest.raises(ValueError, match=r"\.data keeps its shape \(3,\)"):
        Dual(torch.ones(3), torch.ones(3)).data = torch.ones(4)


def test_a_parameter_written_in_place_under_no_grad_is_written():
    class Clamped(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.tensor([-2.0, 0.5, 3.0]))

        def forward(self, x):
            with torch.no_grad():
                self.w.clamp_(-1.0, 1.0)
            return x * self.w

    model = Clamped().double()
    ref = copy.deepcopy(model)
    t = torch.tensor([1.0, 2.0, 3.0], **f64)
    fgkernels.set_tangents(model, {"w": t.clone()})
    out = model(Dual(torch.ones(3, **f64)))
    y, yt = model_jvp(ref, [torch.ones(3, **f64)], [None], {"w": t.unsqueeze(0)})
    torch.testing.assert_close(model.w.detach(), torch.tensor([-1.0, 0.5, 1.0], **f64))
    torch.testing.assert_close(out.primal, y)
    torch.testing.assert_close(out.tangent, yt[0])


def test_tangents_do_not_travel_with_a_copy_and_clear_removes_them():
    model = Tied().double()
    fgkernels.random_tangents(model)
    assert not any(has_tangent(p) for p in copy.deepcopy(model).parameters())
    assert not any(has_tangent(v) for v in model.state_dict().values())
    saved = io.BytesIO()
    torch.save(model, saved)  # a whole pickled model, loaded again
    saved.seek(0)
    loaded = torch.load(saved, weights_only=False)
    assert not any(has_tangent(p) for p in loaded.parameters())
    assert loaded(Dual(torch.randn(3, 4, **f64))).tangents is None
    fgkernels.clear_tangents(model)
    assert not any(has_tangent(p) for p in model.parameters())
    assert model(Dual(torch.randn(3, 4, **f64))).tangents is None


def test_stale_and_changed_parameters_are_refused():
    model = nn.Linear(3, 2).double()
    fgkernels.random_tangents(model)
    model.weight = nn.Parameter(torch.randn(2, 3, **f64))
    with pytest.raises(RuntimeError, match="weight was replaced after its tangent was set"):
        model(Dual(torch.randn(1, 3, **f64)))
    fgkernels.random_tangents(model)
    model.float()  # the parameter's data changes dtype under its tangent
    with pytest.raises(RuntimeError, match="set its tangent again"):
        model(Dual(torch.randn(1, 3)))
    fgkernels.random_tangents(model)
    model.weight.data = torch.randn(2, 1)  # ... or shape (a (2, 1) weight broadcasts)
    with pytest.raises(RuntimeError, match=r"shape \(2, 1\).*set its tangent again"):
        model(Dual(torch.randn(1, 3)))


def test_set_tangents_refuses_what_it_cannot_set_and_sets_nothing():
    """Tangents of one call with different T, and a stacked tangent given to one direction:
    refused, naming the problem, before any tangent is set."""
    model = nn.Linear(3, 2).double()
    with pytest.raises(ValueError, match=r"must share T, got \[1, 2\]"):
        fgkernels.set_tangents(model, {"weight": torch.randn(2, 2, 3, **f64),
                                       "bias": torch.randn(1, 2, **f64)})
    with pytest.raises(ValueError, match="with direction=1, the tangent of 'weight' must have "
                                         r"the parameter's shape \(2, 3\)"):
        fgkernels.set_tangents(model, {"weight": torch.randn(2, 2, 3, **f64)}, direction=1)
    with pytest.raises(TypeError, match="set_tangents: the tangent of 'weight' is None; give a "
                                        "tensor, or leave the parameter out"):
        fgkernels.set_tangents(model, {"weight": None, "bias": torch.randn(2, **f64)})
    with pytest.raises(TypeError, match="set_tangents: the tangent of 'bias' has dtype "
                                        "torch.complex128"):
        fgkernels.set_tangents(model, {"bias": torch.randn(2, dtype=torch.complex128)})
    assert not any(has_tangent(p) for p in model.parameters())


def test_functional_use_of_a_parameter_with_a_tangent():
    lin = nn.Linear(3, 2).double()
    tangents = fgkernels.random_tangents(lin, num_tangents=1)
    x = torch.randn(4, 3, **f64)
    out = F.linear(Dual(x), lin.weight, lin.bias)
    expected = x @ tangents["weight"][0].t() + tangents["bias"][0]
    torch.testing.assert_close(out.tangents[0], expected)


# Reads of a tensor's metadata or values: each a getter or method torch hands to a torch
# function mode.
READS = {
    "shape": lambda p: p.shape, "dtype": lambda p: p.dtype, "device": lambda p: p.device,
    "ndim": lambda p: p.ndim, "requires_grad": lambda p: p.requires_grad,
    "is_leaf": lambda p: p.is_leaf, "grad": lambda p: p.grad, "size": lambda p: p.size(0),
    "dim": lambda p: p.dim(), "numel": lambda p: p.numel(), "stride": lambda p: p.stride(),
    "is_contiguous": lambda p: p.is_contiguous(), "data": lambda p: p.data,
    "detach": lambda p: p.detach(),
}


@pytest.mark.parametrize("read", sorted(READS))
def test_reading_a_parameter_under_the_compiled_pass_mode_answers_as_its_dual(read):
    """Under ParameterTangents (fgkernels.compile's pass, where torch's own runtime reads its
    graph's inputs too: ``p.data``, ``t.dtype``), a read of a parameter with a tangent gives
    what the parameter's Dual gives in an eager pass, with no op on the forward-AD fallback
    (strict_rules refuses one); its transpose still carries the tangent."""
    from fgkernels.dual.function_mode import ParameterTangents
    from fgkernels.dual.tangent_store import dual_of
    lin = nn.Linear(3, 2).double()
    lin.weight.grad = torch.ones_like(lin.weight)  # the Dual's primal has none
    tangents = fgkernels.random_tangents(lin, num_tangents=1)
    with fgkernels.strict_rules(), ParameterTangents():
        got = READS[read](lin.weight)
        transposed = lin.weight.T
    expected = READS[read](dual_of(lin.weight))
    if isinstance(expected, torch.Tensor):
        assert type(got) is torch.Tensor
        torch.testing.assert_close(got, expected)
    else:
        assert got == expected
    assert isinstance(transposed, Dual)
    torch.testing.assert_close(transposed.tangents, tangents["weight"].transpose(1, 2))


# Python's protocols on a parameter -> what its Dual's protocols make of them (repr: a
# Parameter's repr puts its own line before its data's)
PROTOCOLS = {
    "len": (len, len), "format": (lambda p: f"{p:}", lambda d: f"{d:}"),
    "contains": (lambda p: 0.5 in p, lambda d: 0.5 in d),
    "repr": (repr, lambda d: "Parameter containing:\n" + repr(d)),
}


@pytest.mark.parametrize("name", sorted(PROTOCOLS))
def test_python_protocols_on_a_parameter_under_the_compiled_pass_mode(name):
    """``len(p)``, ``repr(p)``, ``f"{p}"`` and ``x in p`` under ParameterTangents answer as
    the parameter's Dual does in an eager pass, with no op on the forward-AD fallback."""
    from fgkernels.dual.function_mode import ParameterTangents
    from fgkernels.dual.tangent_store import dual_of
    lin = nn.Linear(3, 2).double()
    fgkernels.random_tangents(lin, num_tangents=1)
    on_parameter, on_dual = PROTOCOLS[name]
    with fgkernels.strict_rules(), ParameterTangents():
        got = on_parameter(lin.weight)
    assert got == on_dual(dual_of(lin.weight))


def test_the_compiled_pass_mode_finds_parameters_inside_a_list():
    """Under ParameterTangents a parameter handed to an op inside a list or by keyword takes
    its tangent as one handed to it directly does."""
    from fgkernels.dual.function_mode import ParameterTangents
    lin = nn.Linear(3, 2).double()
    tangents = fgkernels.random_tangents(lin, num_tangents=2)
    x = torch.randn(3, 2, **f64)
    with ParameterTangents():
        joined = torch.cat([lin.weight, lin.weight])
        added = torch.add(x, other=lin.bias)
    wt = tangents["weight"]
    torch.testing.assert_close(joined.tangents, torch.cat([wt, wt], 1))
    torch.testing.assert_close(added.tangents, tangents["bias"][:, None].expand(2, 3, 2))


def test_remove_parametrizations_after_convert_leaves_the_twin():
    conv = parametrizations.weight_norm(nn.Conv2d(2, 3, 3, bias=False))
    fgkernels.convert(conv)
    assert isinstance(conv, fgkernels.nn.DualConv2d)
    parametrize.remove_parametrizations(conv, "weight")
    assert type(conv) is fgkernels.nn.DualConv2d
    assert conv(Dual(torch.randn(1, 2, 5, 5))).shape == (1, 3, 3, 3)


@pytest.mark.parametrize("hook", ["the layer's own", "global"])
def test_a_dual_a_hook_stores_on_a_layer_does_not_outlive_the_pass(hook):
    """torch.nn's layers and fgkernels' twins store nothing on their module in a forward, but a
    hook on them may (the root's hook runs after the pass: what it stores is the output, the
    caller's own)."""
    model = fgkernels.convert(nn.Sequential(nn.Linear(3, 3), nn.Tanh())).double()
    fgkernels.random_tangents(model)

    fired = []

    def keep(module, args, output):
        module.seen = output
        fired.append(type(output))

    handle = model[0].register_forward_hook(keep) if hook == "the layer's own" \
        else torch.nn.modules.module.register_module_forward_hook(keep)
    try:
        out = model(Dual(torch.randn(2, 3, **f64)))
    finally:
        handle.remove()
    assert isinstance(out, Dual)
    assert Dual in fired  # the hook ran on the pass and stored a Dual
    assert all(not isinstance(m.__dict__.get("seen"), Dual) for m in model[:])


def test_a_cache_entry_a_pass_overwrites_is_put_back():
    class Cached(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.randn(3))
            self.cache = {"scale": torch.ones(3)}

        def forward(self, x):
            self.cache["scale"] = self.scale * 1.0
            return x * self.cache["scale"]

    model = Cached().double()
    before = model.cache["scale"]
    fgkernels.random_tangents(model)
    model(Dual(torch.randn(3, **f64)))
    assert model.cache["scale"] is before


def test_old_style_weight_norm_leaves_no_dual_behind():
    conv = nn.utils.weight_norm(nn.Conv2d(2, 3, 3).double())
    fgkernels.random_tangents(conv)
    conv(Dual(torch.randn(1, 2, 5, 5, **f64)))
    assert type(conv.weight) is torch.Tensor


def test_what_a_forward_caches_on_its_module_does_not_outlive_the_pass():
    """A cache filled from a parameter (LeViT's attention biases in eval mode) holds a Dual
    during the pass, carrying its tangent, and is as it was afterwards."""
    class Cached(nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = nn.Parameter(torch.randn(3))
            self.cache, self.history, self._doubled = {}, [], None

        def forward(self, x):
            if "bias" not in self.cache:
                self.cache["bias"] = self.bias * 2
            self.last = x * 1.0
            self.history.append(self.bias * 1.0)  # a record, public
            self.history.append("seen")            # a plain entry of the same call
            self._doubled = self.bias * 2         # a cache, private
            return x + self.cache["bias"]

    model = Cached().double()
    t = torch.randn(3, **f64)
    fgkernels.set_tangents(model, {"bias": t})
    out = model(Dual(torch.randn(3, **f64)))
    torch.testing.assert_close(out.tangent, 2 * t)
    assert model.cache == {} and "last" not in model.__dict__
    assert model.history == ["seen"] and model._doubled is None
    plain = model(torch.randn(3, **f64))
    assert type(plain) is torch.Tensor and type(model.cache["bias"]) is torch.Tensor


@pytest.mark.parametrize("tangents", ["parameters", "input only"])
def test_a_buffer_a_forward_rebinds_keeps_its_value_without_the_tangent(tangents):
    """A carried state (``self.state = h``, a buffer, and one a forward registers anew): after
    the pass it holds the pass's value, a plain tensor, as forward_ad's dual tensor is once its
    level ends; the next plain call reads that value and returns a plain tensor. The pass's
    output is forward_ad's, with parameter tangents or the input's alone."""
    class Streaming(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.register_buffer("state", torch.zeros(3, 4))
            self.head = Recording()

        def forward(self, x):
            h = torch.tanh(self.fc(x) + self.state)
            self.state = h
            self.register_buffer("last", h * 2, persistent=False)
            return self.head(h)

    class Recording(nn.Module):  # holds no buffer until its forward registers one
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, h):
            self.register_buffer("seen", h * 1.0, persistent=False)
            return self.fc(h) * 2

    torch.manual_seed(0)
    model, x, xt = Streaming().double(), torch.randn(3, 4, **f64), torch.randn(3, 4, **f64)
    oracle = copy.deepcopy(model)
    if tangents == "parameters":
        fgkernels.random_tangents(model)
    stacks = {n: tangent_of(p).stack for n, p in model.named_parameters() if has_tangent(p)}
    y, yt = model_jvp(oracle, [x], [xt[None]], stacks)
    out = model(Dual(x, xt))
    torch.testing.assert_close(out.primal, y)
    torch.testing.assert_close(out.tangents, yt)
    for holder, name in ((model, "state"), (model, "last"), (model.head, "seen")):
        assert type(holder._buffers[name]) is torch.Tensor, name
    state = model.state
    torch.testing.assert_close(model.last, 2 * state)
    plain = model(x)
    assert type(plain) is torch.Tensor
    torch.testing.assert_close(plain, 2 * model.head.fc(torch.tanh(model.fc(x) + state)))


def test_a_dual_inside_a_container_a_forward_stores_does_not_outlive_the_pass():
    """A Dual at any depth of what a forward stores (a tuple of states, a dict of lists, an
    entry of a record that is itself a container) is put back as a Dual on its own is."""
    class Stores(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.state, self.record = ("none yet",), [torch.zeros(1), "kept"]
            self.log = {"steps": [], "by_layer": {"fc": 0}}

        def forward(self, x):
            y = self.fc(x)
            self.state = (y, 1)
            self.by_name = {"a": [y], "b": 2}
            self.record[0] = (y,)
            self.record.append([{"k": y}])
            self.record.append(3)
            self.log["steps"].append(y)  # nested containers changed in place
            self.log["steps"].append("step")
            self.log["by_layer"]["head"] = [y]
            return y

    model = Stores().double()
    first, steps = model.record[0], model.log["steps"]
    fgkernels.random_tangents(model)
    model(Dual(torch.randn(2, 3, **f64)))
    assert model.state == ("none yet",) and model.by_name == {"b": 2}
    assert model.record[0] is first and model.record[1:] == ["kept", 3]
    assert model.log == {"steps": ["step"], "by_layer": {"fc": 0}}
    assert model.log["steps"] is steps


@pytest.mark.parametrize("raises", [False, True], ids=["returns", "raises"])
def test_containers_holding_parameters_hold_them_again_after_the_pass(raises):
    """The pass puts the Duals into the module's own containers in place, every reference to
    them seeing them; afterwards each holds its parameters again, what the forward added or
    removed as the forward left it (a Dual it added taken out)."""
    class Grows(Held):
        def forward(self, x):
            y = super().forward(x)
            assert isinstance(self.weights[0], Dual) and isinstance(shared[1], Dual)
            self.weights.pop()
            self.weights.append("added")
            self._scales.clear()
            self.named["layer"]["y"] = y
            if raises:
                raise ValueError("boom")
            return y

    model = Grows().double()
    shared, pair = model.weights, model.pair
    fgkernels.random_tangents(model)
    with pytest.raises(ValueError, match="boom") if raises else contextlib.nullcontext():
        model(Dual(torch.randn(3, 4, **f64)))
    assert model.weights is shared and shared[0] is model.a and shared[1:] == ["added"]
    assert model._scales == []
    assert model.pair is pair and pair[1][0] is model.b
    assert model.named == {"layer": {"a": model.a}}


@pytest.mark.parametrize("name", ["weights", "_weights"])
def test_a_list_the_forward_reorders_holds_its_parameters_in_the_new_order(name):
    """A forward that reorders the list it reads its parameters from (``reverse``) leaves it
    reordered, as a plain call does, holding the parameters: no Dual stays behind, whether the
    list is public or private."""
    class Reorders(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1, self.w2 = nn.Parameter(torch.randn(3, 3)), nn.Parameter(torch.randn(3, 3))
            setattr(self, name, [self.w1, self.w2])

        def forward(self, x):
            held = getattr(self, name)
            held.reverse()
            return torch.tanh(x @ held[0]) @ held[1]

    model = Reorders().double()
    fgkernels.random_tangents(model)
    model(Dual(torch.randn(2, 3, **f64)))
    held = getattr(model, name)
    assert held[0] is model.w2 and held[1] is model.w1
    assert type(model(torch.randn(2, 3, **f64))) is torch.Tensor


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU, nn.RNN])
def test_a_recurrent_layer_lists_its_parameters_again_after_the_pass(kind):
    """A recurrent layer's forward lists its weights anew (``_flat_weights``), Duals on the
    dual pass: afterwards the list holds the parameters again, not the pass's Duals with their
    tangent stacks (held until the next call, and read by ``flatten_parameters``)."""
    layer = kind(3, 4, num_layers=2).double()
    fgkernels.random_tangents(layer, num_tangents=2)
    out, _ = layer(Dual(torch.randn(5, 2, 3, **f64)))
    assert isinstance(out, Dual) and out.tangents.shape[0] == 2
    assert all(w is getattr(layer, name) and type(w) is nn.Parameter
               for w, name in zip(layer._flat_weights, layer._flat_weights_names, strict=True))


class _Symmetric(nn.Module):
    def forward(self, w):
        return w.triu() + w.triu(1).T


def test_a_cached_parametrization_is_computed_anew_for_the_pass_and_after_it():
    """Within ``parametrize.cached()`` a parametrized weight is computed once and kept: the
    plain weight a call before the pass kept has no tangent, and the Dual the pass computed
    must not reach a plain call after it. Against forward_ad of the same parametrization."""
    torch.manual_seed(0)
    layer = nn.Linear(4, 4).double()
    parametrize.register_parametrization(layer, "weight", _Symmetric())
    tangents = {name: torch.randn(1, *p.shape, **f64) for name, p in layer.named_parameters()}
    fgkernels.set_tangents(layer, tangents)
    x = torch.randn(3, 4, **f64)
    y, yt = model_jvp(layer, [x], [None], tangents)
    with parametrize.cached():
        layer(x)  # kept: the plain weight
        out = layer(Dual(x))
        after = layer(x)
    torch.testing.assert_close(out.tangents, yt)
    assert type(after) is torch.Tensor
    torch.testing.assert_close(after, y)


class _Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.scale = nn.Linear(3, 2), nn.Parameter(torch.tensor(0.5))

    def forward(self, batch):
        return self.lin(batch["x"][0]) * self.scale.exp()


class _Batched(nn.Module):
    """The oracle's form of ``_Scaled``: the input as a tensor argument."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner({"x": [x]})


def test_a_dual_nested_in_the_inputs_starts_the_pass_at_the_model():
    """A Dual inside a list inside a dict is an input of the model's call as one directly
    among its arguments: the pass starts there, and a parameter the model reads itself
    (``self.scale``) carries its tangent."""
    torch.manual_seed(0)
    model = _Scaled().double()
    tangents = {name: torch.randn(1, *p.shape, **f64) for name, p in model.named_parameters()}
    fgkernels.set_tangents(model, tangents)
    x = torch.randn(4, 3, **f64)
    out = model({"x": [Dual(x)]})
    _, yt = model_jvp(_Batched(model), [x], [None],
                      {f"inner.{name}": t for name, t in tangents.items()})
    torch.testing.assert_close(out.tangents, yt)


def test_a_forward_hook_of_the_passs_root_reads_its_parameters_with_their_tangents():
    """torch runs the global forward hooks before a module's own: the pass ends after the
    root's own hooks, so that one reading the root's weight (``out · ‖W‖``) carries its tangent,
    as the same hook on a child does; after the call the weight is the parameter again."""
    torch.manual_seed(0)
    layer = nn.Linear(4, 3).double()
    layer.register_forward_hook(lambda m, args, out: out * m.weight.norm())
    tangents = {name: torch.randn(2, *p.shape, **f64) for name, p in layer.named_parameters()}
    fgkernels.set_tangents(layer, tangents)
    x = torch.randn(5, 4, **f64)
    out = layer(Dual(x))
    _, yt = model_jvp(layer, [x], [None], tangents)
    torch.testing.assert_close(out.tangents, yt)
    assert type(layer.weight) is nn.Parameter
    assert len(layer._forward_hooks) == 1  # its own: the pass's ending hook is gone


class _FillsFromTheInput(nn.Module):
    """A forward that fills a tensor of its own from the Duals its input brings (an MoE's sum
    of experts, row by row)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        out = torch.zeros_like(x)
        for i in range(x.shape[0]):
            out[i] = self.fc(x[i]).tanh()
        return out


def test_the_hooks_stay_while_a_dual_exists_and_go_with_the_last():
    """No parameter has a tangent: a Dual an op made, whose own origin is gone, reaches a
    model after a plain module call and still runs a dual pass there (a temporary filled from
    it under no_grad kept its tangent only inside a pass: without one it was dropped); once
    the last Dual is gone, the next plain call takes fgkernels' global hooks away. A copy or
    an unpickled Dual counts as one (it counted as freed only)."""
    from torch.nn.modules import module as torch_module

    from fgkernels.dual.passes import hooks as our_hooks
    from fgkernels.dual.tangent_store import LIVE
    model = _FillsFromTheInput().double()
    x, xt = torch.randn(3, 3, **f64), torch.randn(3, 3, **f64)
    y, yt = model_jvp(model, [x.sin()], [(xt * x.cos()).unsqueeze(0)], {})
    h = torch.sin(Dual(x, xt))  # (the Dual made here is freed at once)
    nn.Identity()(x)  # a plain call, with h alive
    with torch.no_grad():
        out = model(h)
    torch.testing.assert_close(out.primal, y)
    torch.testing.assert_close(out.tangents, yt)
    gc.collect()
    gc.disable()  # (the collector would free other tests' Duals between the counts)
    try:
        before = census.alive()
        copies = [copy.copy(h), copy.deepcopy(h), pickle.loads(pickle.dumps(h))]
        assert census.alive() == before + 3  # each counted as made, and as freed below
        del copies
        assert census.alive() == before
    finally:
        gc.enable()
    del h, out
    gc.collect()
    nn.Identity()(x)
    hooks = [*torch_module._global_forward_pre_hooks.values(),
             *torch_module._global_forward_hooks.values()]
    # (gone, unless an earlier test's model still holds a tangent or its Dual)
    wanted = bool(LIVE) or census.alive() > 0
    assert any(getattr(h, "__self__", None) is our_hooks for h in hooks) == wanted


def test_dual_pass_runs_a_pass_for_a_dual_by_keyword_alone():
    """Inside ``dual_pass(model)`` a model takes the input's Dual by keyword
    (``inputs_embeds=``, ``pixel_values=``) with no parameter tangent anywhere: its call is a
    pass still, and a tensor it fills from the Dual keeps the tangent (it was dropped)."""
    model = _FillsFromTheInput().double()
    x, xt = torch.randn(3, 3, **f64), torch.randn(1, 3, 3, **f64)
    y, yt = model_jvp(model, [x], [xt], {})
    with fgkernels.dual_pass(model), torch.no_grad():
        out = model(x=Dual(x, xt))
    torch.testing.assert_close(out.primal, y)
    torch.testing.assert_close(out.tangents, yt)


class _ReshapesWhatItFills(nn.Module):
    """A forward that fills a tensor of its own from a Dual, then gives it a new shape in
    place, with a view of it taken before."""

    def forward(self, x):
        buf = torch.zeros(2, 3, dtype=x.dtype)
        buf[0] = x[0]
        row = buf[1]
        buf.t_()
        buf.mul_(x[1, :2])
        buf.unsqueeze_(0)
        buf[0, 2] = x[1, 1:]
        return buf, row * 1.0


def test_a_tensor_a_pass_filled_from_a_dual_takes_in_place_view_ops():
    """``buf.t_()``, ``buf.unsqueeze_(0)`` on a tensor the forward made and filled from a Dual
    give it and its tangent the new shape, as forward_ad's dual tensor takes it, and a view
    taken before sees the later writes (they were refused as if it were a parameter)."""
    model = _ReshapesWhatItFills()
    x, xt = torch.randn(2, 3, **f64), torch.randn(2, 2, 3, **f64)
    (y, row), (yt, row_t) = model_jvp(model, [x], [xt], {})
    out, out_row = model(Dual(x, xt))
    torch.testing.assert_close(out.primal, y, rtol=0, atol=0)
    torch.testing.assert_close(out.tangents, yt, rtol=0, atol=0)
    torch.testing.assert_close(out_row.primal, row, rtol=0, atol=0)
    torch.testing.assert_close(out_row.tangents, row_t, rtol=0, atol=0)


def test_hooks_set_aside_leaves_a_baseline_torchs_own_call_path():
    """A benchmark's baseline runs without fgkernels' global hooks (a tangent set on another
    model keeps them registered, and torch's slower call path cost a batch-1 forward_ad
    10-20 %); they come back after the block, and no pass may run inside it."""
    from torch.nn.modules import module as torch_module

    from fgkernels.dual.passes import hooks as our_hooks
    from fgkernels.dual.passes import hooks_set_aside

    def ours() -> int:
        hooks = [*torch_module._global_forward_pre_hooks.values(),
                 *torch_module._global_forward_hooks.values()]
        return sum(getattr(h, "__self__", None) is our_hooks for h in hooks)

    layer = nn.Linear(3, 2).double()
    fgkernels.random_tangents(layer)
    assert ours() == 2
    with hooks_set_aside():
        assert ours() == 0
        nn.Identity()(torch.randn(2))
    assert ours() == 2
    x = torch.randn(4, 3, **f64)
    layer.register_forward_pre_hook(lambda m, args: hooks_set_aside().__enter__())
    with pytest.raises(RuntimeError, match="a dual pass is running"):
        layer(Dual(x))
    fgkernels.clear_tangents(layer)


class _Tagged(nn.Parameter):
    """A parameter of a class of its own: not lifted (its class keeps its own
    ``__torch_function__``), so that it reaches a forward through the pass's substitution
    alone."""


class _Pair(NamedTuple):
    first: torch.Tensor
    second: torch.Tensor


class _HoldsTagged(nn.Module):
    """Two parameters of a class of their own, read from a container the module holds."""

    def __init__(self, holder: str):
        super().__init__()
        self.a = _Tagged(torch.randn(3, 3, **f64))
        self.b = _Tagged(torch.randn(3, **f64))
        self.holder = holder
        self.held = {"tuple": lambda: (self.a, self.b),
                     "named tuple": lambda: _Pair(self.a, self.b),
                     "OrderedDict": lambda: collections.OrderedDict(first=self.a, second=self.b),
                     }[holder]()

    def forward(self, x):
        if self.holder == "named tuple":
            w, b = self.held.first, self.held.second
        elif self.holder == "OrderedDict":
            w, b = self.held["first"], self.held["second"]
        else:
            w, b = self.held
        return torch.tanh(x @ w.t() + 2.0 * b)  # (ops on a parameter alone first)


@pytest.mark.parametrize("holder", ["tuple", "named tuple", "OrderedDict"])
def test_a_parameter_of_its_own_class_in_a_container_carries_its_tangent(holder):
    """A tuple, a named tuple (rebuilt as its own type) or an OrderedDict a module holds its
    parameters in holds their Duals during the pass: a parameter of a class of its own, which
    is not lifted, carries its tangent through an op on it alone (``w.t()``) only so."""
    model = _HoldsTagged(holder)
    result = compare_with_forward_ad(model, [torch.randn(2, 3, **f64)], num_tangents=2)
    assert result["primal"] == 0 and result["tangent"] < 1e-14
    assert type(model.held) is type(_HoldsTagged(holder).held)


@pytest.mark.parametrize("how", ["prune", "weight_norm"])
def test_a_parameter_moved_part_way_through_training_takes_fresh_tangents(how):
    """A layer pruned (``torch.nn.utils.prune``) or weight-normalised between steps moves its
    weight under another name; the next steps' tangents, drawn for the model as it now is,
    are taken, and the pass is exact (the old name's record refused every later pass)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x = torch.randn(2, 4, **f64)
    for step in range(3):
        if step == 1:
            if how == "prune":
                prune.l1_unstructured(model[0], "weight", amount=0.5)
            else:
                parametrizations.weight_norm(model[0])
        fgkernels.random_tangents(model)  # (a training loop's draw, never cleared)
        assert isinstance(model(Dual(x)), Dual)
    result = compare_with_forward_ad(model, x)
    assert result["primal"] < 1e-14 and result["tangent"] < 1e-13


def test_a_parameter_deleted_and_not_given_a_tangent_again_is_refused():
    """A parameter deleted and replaced by a plain tensor after its tangent was set is refused
    at the next pass, as a replaced one is: only a new set_tangents, which gives the model's
    parameters as they now are their tangents, forgets it."""
    model = nn.Sequential(nn.Linear(4, 3)).double()
    fgkernels.random_tangents(model)
    weight = model[0].weight.detach().clone()
    del model[0].weight
    model[0].weight = weight
    with pytest.raises(RuntimeError, match="Linear.weight was replaced after its tangent"):
        model(Dual(torch.randn(2, 4, **f64)))
    fgkernels.random_tangents(model)
    assert isinstance(model(Dual(torch.randn(2, 4, **f64))), Dual)
    fgkernels.clear_tangents(model)


def test_a_torchscript_module_is_refused_before_any_tangent_is_set():
    """TorchScript reads its parameters in C++, where no tangent reaches them: tangents for a
    scripted module's parameters are refused by name, and none is set (the scripted module
    failed inside the pass with an AttributeError, or half its tangents stayed set)."""
    inner = nn.Sequential(nn.Linear(4, 4), nn.Tanh()).double()
    model = nn.Sequential(torch.jit.script(inner), nn.Linear(4, 3).double())
    with pytest.raises(TypeError, match="'0.0.weight' belongs to a TorchScript module"):
        fgkernels.set_tangents(model, {"1.weight": torch.randn(3, 4, **f64),
                                       "0.0.weight": torch.randn(4, 4, **f64)})
    with pytest.raises(TypeError, match="'0.weight' belongs to a TorchScript module"):
        fgkernels.random_tangents(model[0])
    assert not any(has_tangent(p) for p in model.parameters())


def test_a_torchscript_module_called_on_a_dual_is_its_input_s_jvp():
    """A TorchScript module called on a Dual (no tangent on its parameters, which it reads in
    C++) gives forward_ad's jvp along the input, as it does inside an eager model, and the
    next pass runs as usual (a pass begun on it failed to end on a hook it refuses)."""
    torch.manual_seed(0)
    scripted = torch.jit.script(nn.Sequential(nn.Linear(3, 4), nn.Tanh()).double())
    x, t = torch.randn(2, 3, **f64), torch.randn(2, 3, **f64)
    with pytest.warns(UserWarning, match="'forward' has no fgkernels rule"):  # one op
        out = scripted(Dual(x, t))
    with fwAD.dual_level():
        expected = fwAD.unpack_dual(scripted(fwAD.make_dual(x, t)))
    torch.testing.assert_close(out.primal, expected.primal, rtol=0, atol=0)
    torch.testing.assert_close(out.tangent, expected.tangent, rtol=1e-13, atol=1e-15)
    result = compare_with_forward_ad(nn.Linear(3, 2).double(), x)
    assert result["tangent"] < 1e-12 and result["primal"] < 1e-12


def test_the_old_spectral_norm_hook_in_eval_mode_is_exact():
    """``torch.nn.utils.spectral_norm``'s hook updates nothing in eval mode: the pass is exact
    there, and refused in training, where the hook's power iteration writes in place."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)).double()
    torch.nn.utils.spectral_norm(model[0])
    x = torch.randn(2, 4, **f64)
    with torch.no_grad():
        model(x)
    model.eval()
    result = compare_with_forward_ad(model, x)
    assert result["primal"] < 1e-14 and result["tangent"] < 1e-13
    model.train()
    fgkernels.random_tangents(model)
    with pytest.raises(NotImplementedError, match="in training updates its power-iteration"):
        model(Dual(x))
    fgkernels.clear_tangents(model)


def test_a_module_deep_copied_in_its_forward_gets_plain_parameters():
    """``copy.deepcopy`` of a module inside a dual pass (an EMA teacher refreshed in forward)
    copies each parameter as the parameter, without tangent, as forward_ad's dual parameter
    copies to a plain one (the copy kept the pass's Duals: its later plain calls returned
    Duals, and an optimizer refused it); the pass itself stays exact."""
    snapshots = []

    class Student(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3).double()

        def forward(self, x):
            snapshots.append(copy.deepcopy(self.lin))
            return self.lin(x)

    model, x = Student(), torch.randn(2, 4, **f64)
    result = compare_with_forward_ad(model, x)
    assert result["primal"] < 1e-14 and result["tangent"] < 1e-14
    teacher = snapshots[-1]
    assert all(type(p) is nn.Parameter and not has_tangent(p) for p in teacher.parameters())
    assert type(teacher(x)) is torch.Tensor
    torch.testing.assert_close(teacher(x), model.lin(x), rtol=0, atol=0)
    torch.optim.SGD(teacher.parameters(), lr=0.1)


class _WritesThroughACopyingView(nn.Module):
    """A parameter of transposed strides written, under no_grad, through a view of its primal
    that would copy a tangent laid out otherwise (``w.T.reshape(12)``)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 4, dtype=torch.float64).T)  # strides (1, 4)

    def forward(self, x):
        with torch.no_grad():
            self.w.T.reshape(12)[:5].mul_(2.0)
        return x * self.w


def test_a_strided_parameter_s_tangent_takes_writes_through_copying_views():
    """``set_tangents`` lays a strided parameter's tangent out in the parameter's strides, as
    forward_ad lays out a dual tensor's: a write through ``w.T.reshape(12)`` reaches the
    parameter and its tangent (the contiguous tangent given kept, the view copied it, and the
    write reached neither)."""
    model = _WritesThroughACopyingView()
    x = torch.randn(4, 3, dtype=torch.float64)
    tangents = {"w": torch.randn(2, 4, 3, dtype=torch.float64)}
    oracle = model_jvp(model, [x], [None], tangents)
    fgkernels.set_tangents(model, tangents)
    with fgkernels.dual_pass(model):
        out = model(x)
    torch.testing.assert_close(out.primal, oracle[0], rtol=0, atol=0)
    torch.testing.assert_close(out.tangents, oracle[1], rtol=0, atol=0)
