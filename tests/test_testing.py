"""fgkernels.testing, the forward_ad oracle the suites compare against: with several tangent
slots it runs the model once per slot, and each run must start from the same buffers and random
state, or the oracle itself is wrong for models with running statistics or dropout."""
import random

import numpy as np
import pytest
import torch
from torch import nn

from fgkernels import Dual
from fgkernels.testing import compare_with_forward_ad, model_jvp_in_place


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Dropout2d(0.5), nn.Flatten(), nn.Linear(64, 5)).double().train()


@pytest.mark.parametrize("num_tangents", [1, 3])
def test_the_dual_pass_matches_the_oracle_with_several_slots(num_tangents):
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    result = compare_with_forward_ad(_net(), [x], num_tangents=num_tangents)
    assert result["primal"] < 1e-12 and result["tangent"] < 1e-10 and result["buffers"] < 1e-12


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_the_comparison_runs_on_the_model_s_device():
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, device="cuda")
    result = compare_with_forward_ad(_net().cuda(), [x], num_tangents=2)
    assert result["primal"] < 1e-12 and result["tangent"] < 1e-10 and result["buffers"] < 1e-12


def test_the_oracle_updates_running_statistics_once_and_draws_alike_for_every_slot():
    net, x = _net(), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    plain = _net()
    torch.manual_seed(1)
    expected = plain(x)
    slots = torch.randn(3, *x.shape, dtype=x.dtype)
    torch.manual_seed(1)
    out, tangents = model_jvp_in_place(net, [x], [slots])
    torch.testing.assert_close(out, expected)
    for (name, a), (_, b) in zip(plain.named_buffers(), net.named_buffers()):
        torch.testing.assert_close(b, a, msg=name)
    # one dropout mask for all slots: a channel dropped in one slot is dropped in all
    dropped = (tangents == 0).all(-1)
    assert (dropped == dropped[:1]).all()


class _MasksByNumPyAndPython(nn.Module):
    """A forward that draws a mask from NumPy's global generator (as transformers' audio
    models draw SpecAugment's) and a scale from Python's ``random``."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        mask = torch.from_numpy(np.random.rand(*x.shape[:2]) < 0.5)
        return self.lin(x.masked_fill(mask[..., None], 0.0)) * random.uniform(0.5, 2.0)


def test_the_comparison_draws_alike_from_numpy_and_python_generators():
    """Both passes, and every slot of the oracle's, start from the same NumPy and Python
    random states as from torch's: an exact model was reported 0.9 off."""
    torch.manual_seed(0)
    net = _MasksByNumPyAndPython().double().train()
    result = compare_with_forward_ad(net, torch.randn(2, 6, 8, dtype=torch.float64),
                                     num_tangents=3)
    assert result["primal"] == 0.0 and result["tangent"] < 1e-14, result


def test_run_is_what_the_comparison_calls():
    # a run that doubles the model's output is one relative error of 1 away from the oracle
    net, x = _net(), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    result = compare_with_forward_ad(net, [x], run=lambda d: net(d) * 2)
    assert result["primal"] > 0.9 and result["tangent"] > 0.9
    with pytest.raises(TypeError, match="run must be callable, got str"):
        compare_with_forward_ad(net, [x], run="forward")


@pytest.mark.parametrize("inplace", [False, True])
def test_the_oracle_of_exact_hardsigmoid_slope(inplace):
    x = torch.tensor([-4.0, -3.0, -1.0, 0.0, 2.5, 3.0, 5.0, float("nan")], dtype=torch.float64)
    t = torch.randn(1, *x.shape, dtype=torch.float64)
    net = nn.Sequential(nn.Identity(), nn.Hardsigmoid(inplace))
    hardsigmoid = torch.nn.functional.hardsigmoid
    y, yt = model_jvp_in_place(net, [x.clone()], [t.clone()], exact_hardsigmoid=True)
    assert torch.nn.functional.hardsigmoid is hardsigmoid  # put back
    torch.testing.assert_close(y, hardsigmoid(x), rtol=0, atol=0, equal_nan=True)
    inside = (x > -3) & (x < 3)
    torch.testing.assert_close(yt, torch.where(inside, t / 6, 0.0), rtol=0, atol=0)


def test_the_oracle_runs_recurrent_layers_on_torch_s_composite_kernels():
    """A float32 LSTM's forward_ad fails on oneDNN's kernel; the oracle takes torch's composite
    one, with oneDNN on again and torch's functions put back afterwards."""
    from fgkernels.testing import oracle_mode
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 2)
    x, t = torch.randn(4, 1, 3), torch.randn(1, 4, 1, 3)
    (y, _), (yt, _) = model_jvp_in_place(lstm, [x], [t])
    assert yt.shape == (1, *y.shape) and yt.abs().sum() > 0
    assert torch._C._get_mkldnn_enabled()
    assert all(name not in torch._VF.__dict__ for name in ("lstm", "gru", "rnn_tanh"))
    with oracle_mode():
        assert torch._VF.__dict__["lstm"] is not torch._C._VariableFunctions.lstm


class _PackedTagger(nn.Module):
    """A bidirectional LSTM over packed sequences of the given lengths, or over one sequence
    unpacked (no lengths)."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(3, 4, batch_first=True, bidirectional=True)

    def forward(self, x, lengths=None):
        if lengths is None:
            return self.rnn(x)[0]
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, True, enforce_sorted=False)
        out, _ = nn.utils.rnn.pad_packed_sequence(self.rnn(packed)[0], True,
                                                  total_length=x.shape[1])
        return out


def test_the_oracle_differentiates_packing():
    """torch's packing and padding have no forward-mode derivative; the oracle's do: a packed
    model's tangents equal forward_ad's of each sequence alone, unpacked, and zero past each
    sequence's end; torch's functions are put back afterwards."""
    torch.manual_seed(0)
    model, lengths = _PackedTagger().double(), [2, 4, 1]
    x = torch.randn(3, 4, 3, dtype=torch.float64)
    xt = torch.randn(2, *x.shape, dtype=torch.float64)
    y, yt = model_jvp_in_place(model, [x, torch.tensor(lengths)], [xt, None])
    for b, k in enumerate(lengths):
        alone, alone_t = model_jvp_in_place(model, [x[b:b + 1, :k]], [xt[:, b:b + 1, :k]])
        torch.testing.assert_close(y[b:b + 1, :k], alone)
        torch.testing.assert_close(yt[:, b:b + 1, :k], alone_t)
        assert (yt[:, b, k:] == 0).all()
    assert all(name not in torch._VF.__dict__
               for name in ("_pack_padded_sequence", "_pad_packed_sequence"))


def test_the_comparison_passes_inputs_that_are_not_floating_as_they_are():
    torch.manual_seed(0)
    model, x = _PackedTagger().double(), torch.randn(3, 4, 3, dtype=torch.float64)
    result = compare_with_forward_ad(model, [x, torch.tensor([2, 4, 1])], num_tangents=2)
    assert result["primal"] == 0 and result["tangent"] < 1e-12 and not result["fallback"]
    # token ids alone: the pass runs inside dual_pass, the embedding bringing the tangents in
    embed = nn.Sequential(nn.Embedding(5, 2), nn.Linear(2, 3)).double()
    result = compare_with_forward_ad(embed, [torch.tensor([[1, 3], [4, 4]])], num_tangents=2)
    assert result["primal"] == 0 and result["tangent"] < 1e-12 and not result["fallback"]
    with pytest.raises(ValueError, match="no floating or complex input and no parameter"):
        compare_with_forward_ad(nn.Flatten(), [torch.tensor([1, 3])])


def test_the_comparison_gives_complex_inputs_tangents():
    """A complex input is a Dual with complex tangents in the dual pass and carries the same
    tangents in the oracle's: a model that drops its tangent fails the comparison."""
    class Modulus(nn.Module):
        def __init__(self, keep: bool):
            super().__init__()
            self.keep, self.scale = keep, nn.Parameter(torch.tensor(1.5, dtype=torch.float64))

        def forward(self, z, x):
            z = z if self.keep or not isinstance(z, Dual) else z.primal
            return (z * self.scale).abs() + x

    z = torch.randn(3, dtype=torch.complex128)
    x = torch.randn(3, dtype=torch.float64)
    assert compare_with_forward_ad(Modulus(keep=True), [z, x])["tangent"] < 1e-12
    assert compare_with_forward_ad(Modulus(keep=False), [z, x])["tangent"] > 0.1
    assert compare_with_forward_ad(Modulus(keep=True), [z, x.abs() > 1])["tangent"] < 1e-12


def test_the_oracle_runs_each_slot_from_the_caches_the_call_found():
    """A module that caches what it computes from a parameter (LeViT's attention biases in
    eval mode): the oracle's second slot computes it again, with its own tangent, instead of
    taking the first slot's."""
    class Cached(nn.Module):
        def __init__(self, made_at_first_call: bool):
            super().__init__()
            self.bias = nn.Parameter(torch.randn(3, dtype=torch.float64))
            if not made_at_first_call:
                self.cache = {}

        def forward(self, x):
            if "cache" not in self.__dict__:
                self.cache = {}
            if "bias" not in self.cache:
                self.cache["bias"] = self.bias * 2
            return x + self.cache["bias"]

    for made_at_first_call in (False, True):
        model = Cached(made_at_first_call)
        result = compare_with_forward_ad(model, [torch.randn(2, 3, dtype=torch.float64)],
                                         num_tangents=3)
        assert result["primal"] == 0 and result["tangent"] < 1e-15


def test_the_oracle_differentiates_parameters_however_the_model_reaches_them():
    """The oracle's parameters carry their tangents as tensors (not swapped into their
    modules): read through a list or a closure of the model's own, they still have them."""
    torch.manual_seed(0)
    a = nn.Parameter(torch.randn(4, 4, dtype=torch.float64))

    class Reached(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.weights = a, [a]
            self.scale = lambda x: x * a.sum()

        def forward(self, x):
            return self.scale(torch.tanh(x @ self.weights[0]))

    x, xt = torch.randn(3, 4, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)
    at = torch.randn(2, 4, 4, dtype=torch.float64)
    y, yt = model_jvp_in_place(Reached(), [x], [xt], {"a": at})
    by_hand = lambda x, a: torch.tanh(x @ a) * a.sum()
    for s in range(2):
        expected, expected_t = torch.func.jvp(by_hand, (x, a.detach()), (xt[s], at[s]))
        torch.testing.assert_close(y, expected, rtol=0, atol=0)
        torch.testing.assert_close(yt[s], expected_t, rtol=1e-14, atol=1e-14)
    assert not torch.autograd.forward_ad.unpack_dual(a).tangent  # no tangent left behind


def test_the_comparison_takes_one_tensor_as_the_one_input_and_python_values_as_they_are():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, dtype=torch.float64))

        def forward(self, x, double=False):
            return x * self.w * (2 if double else 1)

    x = torch.randn(2, 3, dtype=torch.float64)
    assert compare_with_forward_ad(Scaled(), x)["tangent"] < 1e-15
    assert compare_with_forward_ad(Scaled(), (x, True), num_tangents=2)["tangent"] < 1e-15
    with pytest.raises(TypeError, match="inputs must be a tensor or a sequence .* got dict"):
        compare_with_forward_ad(Scaled(), {"x": x})


def test_the_oracle_leaves_a_pending_backward_valid():
    """The oracle's parameters become dual in place (their own values copied onto them): an
    autograd graph that saved one before the comparison still runs its backward."""
    model, x = nn.Linear(3, 3).double(), torch.randn(2, 3, dtype=torch.float64)
    loss = (model.weight ** 2).sum()
    compare_with_forward_ad(model, x)
    loss.backward()
    torch.testing.assert_close(model.weight.grad, 2 * model.weight.detach())
