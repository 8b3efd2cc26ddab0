"""torch.nn layers in the configurations users write (a table, and drawn Conv → BN → activation
blocks), each run on a Dual as it is and after ``fgkernels.convert`` on every CPU backend,
every parameter carrying tangents: forward_ad's numbers in float64, and the running statistics
the plain forward leaves (``convert`` is a speed step and never changes a number)."""
import copy

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import fgkernels
from fgkernels import Dual
from fgkernels.testing import compare_with_forward_ad, oracle_mode

from helpers import CPU_BACKENDS, TOL, BiasedAttention, BiasedTransformer, torch_jvp_multi


class _MaxPoolIndices(nn.Module):
    """A max pool returning its indices, the values used on."""

    def __init__(self):
        super().__init__()
        self.pool = nn.MaxPool2d(2, return_indices=True)

    def forward(self, x):
        y, _ = self.pool(x)
        return 2 * y


class _SequenceOutput(nn.Module):
    """A recurrent layer's output sequence, its final states folded in (one tensor out)."""

    def __init__(self, rnn: nn.Module):
        super().__init__()
        self.rnn = rnn

    def forward(self, x):
        out, states = self.rnn(x)
        h = states[0] if isinstance(states, tuple) else states
        return out * h.sum()


def _conv_bn(mode="zeros", **bn):
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode=mode), nn.BatchNorm2d(4, **bn),
                         nn.ReLU())


def _bn_untracked_eval():
    block = _conv_bn()
    block[1].running_mean.uniform_(-1, 1)
    block[1].running_var.uniform_(0.5, 2)
    block[1].track_running_stats = False
    return block.eval()


# name -> (a builder of the layer, the input's shape)
LAYERS = {
    "conv_bn_relu": (_conv_bn, (3, 3, 5, 5)),
    "conv_reflect_bn": (lambda: _conv_bn("reflect"), (3, 3, 5, 5)),
    "conv_replicate_bn": (lambda: _conv_bn("replicate"), (3, 3, 5, 5)),
    "conv_circular_dilated": (lambda: nn.Conv2d(3, 4, 3, padding=2, dilation=2,
                                                padding_mode="circular"), (2, 3, 6, 6)),
    "conv_same_even": (lambda: nn.Conv2d(3, 4, 4, padding="same"), (2, 3, 6, 6)),
    "conv_strided_rect": (lambda: nn.Conv2d(3, 4, (3, 1), stride=(2, 1), padding=(1, 0)),
                          (2, 3, 7, 5)),
    "conv_depthwise_bn_relu6": (lambda: nn.Sequential(
        nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(4), nn.ReLU6()),
        (2, 4, 5, 5)),
    "bn_momentum_none": (lambda: _conv_bn(momentum=None), (3, 3, 4, 4)),
    "bn_no_running_stats": (lambda: _conv_bn(track_running_stats=False), (3, 3, 4, 4)),
    # eval without running statistics normalises by the batch's, as torch does
    "bn_no_running_stats_eval": (lambda: _conv_bn(track_running_stats=False).eval(),
                                 (3, 3, 4, 4)),
    # eval with statistics no longer tracked still normalises by the running ones
    "bn_untracked_eval": (_bn_untracked_eval, (3, 3, 4, 4)),
    "bn_not_affine": (lambda: _conv_bn(affine=False), (3, 3, 4, 4)),
    "bn_eval": (lambda: _conv_bn().eval(), (3, 3, 4, 4)),
    "bn1d_features": (lambda: nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU()),
                      (6, 5)),
    "bn1d_sequence": (lambda: nn.Sequential(nn.Conv1d(3, 4, 1), nn.BatchNorm1d(4)), (6, 3, 5)),
    "group_norm_not_affine": (lambda: nn.GroupNorm(2, 4, affine=False), (2, 4, 3, 3)),
    # γ and β both carrying tangents: ẏ = γẋ̂ + γ̇x̂ + β̇ in one sum
    "group_norm_affine": (lambda: nn.GroupNorm(2, 4), (2, 4, 3, 3)),
    "layer_norm_affine": (lambda: nn.LayerNorm((3, 5)), (2, 3, 5)),
    "layer_norm_no_bias": (lambda: nn.LayerNorm(5, bias=False), (2, 3, 5)),
    "rms_norm_affine": (lambda: nn.RMSNorm((3, 5)), (2, 3, 5)),
    "rms_norm_eps": (lambda: nn.RMSNorm(5, eps=1e-2, elementwise_affine=False), (2, 3, 5)),
    "conv1d_circular": (lambda: nn.Conv1d(3, 4, 3, stride=2, padding=2, dilation=2,
                                          padding_mode="circular"), (2, 3, 9)),
    "instance_norm": (lambda: nn.InstanceNorm2d(4, affine=True), (3, 4, 5, 5)),
    "linear_no_bias_3d": (lambda: nn.Linear(5, 3, bias=False), (2, 4, 5)),
    "max_pool_indices": (_MaxPoolIndices, (2, 3, 4, 4)),
    "avg_pool_ceil_no_pad": (lambda: nn.AvgPool2d(3, 2, 1, ceil_mode=True,
                                                  count_include_pad=False), (2, 3, 7, 7)),
    "adaptive_pool_none": (lambda: nn.AdaptiveAvgPool2d((None, 2)), (2, 3, 5, 6)),
    "flatten_unflatten": (lambda: nn.Sequential(nn.Flatten(0, 1), nn.Unflatten(0, (2, 3))),
                          (2, 3, 4, 5)),
    "activations_in_place": (lambda: nn.Sequential(
        nn.Conv2d(3, 3, 1), nn.ReLU(inplace=True), nn.Hardtanh(-0.2, 0.3, inplace=True),
        nn.LeakyReLU(0.2, inplace=True), nn.ELU(inplace=True)), (2, 3, 3, 3)),
    "activation_layers": (lambda: nn.Sequential(
        nn.Linear(4, 4), nn.Hardswish(), nn.Hardsigmoid(), nn.SiLU(), nn.GELU("tanh"),
        nn.Mish(), nn.Sigmoid(), nn.Tanh(), nn.PReLU()), (3, 4)),
    # p = 1 between layers: the second layer sees zeros, as in torch (the last layer keeps its
    # output); the same pass whichever mask a p < 1 draws
    "lstm_dropout_between_layers": (lambda: _SequenceOutput(
        nn.LSTM(4, 3, num_layers=2, dropout=1.0)), (5, 2, 4)),
    "gru_bidirectional_batch_first": (lambda: _SequenceOutput(
        nn.GRU(4, 3, bidirectional=True, batch_first=True)), (2, 5, 4)),
    "conv_transpose_pixel_shuffle": (lambda: nn.Sequential(
        nn.ConvTranspose2d(3, 8, 3, stride=2, padding=1, output_padding=1),
        nn.PixelShuffle(2)), (2, 3, 3, 3)),
}


def _assert_as_forward_ad_and_plain(out: Dual, expected, dual: nn.Module, plain: nn.Module):
    """The dual pass's output is forward_ad's; its running statistics are the plain pass's."""
    torch.testing.assert_close(out.primal, expected[0], **TOL[torch.float64])
    torch.testing.assert_close(out.tangents, expected[1], **TOL[torch.float64])
    for (n, ours), (_, theirs) in zip(dual.named_buffers(), plain.named_buffers()):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12, msg=n)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("converted", [False, True], ids=["as_is", "converted"])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_config(name, converted, backend):
    build, shape = LAYERS[name]
    torch.manual_seed(0)
    layer = build().double()
    x = torch.randn(shape, dtype=torch.float64)
    xt = torch.randn(2, *shape, dtype=torch.float64)
    tangents = {n: torch.randn(2, *p.shape, dtype=torch.float64)
                for n, p in layer.named_parameters()}
    y, yt = torch_jvp_multi(layer, x, xt, tangents or None)
    plain = copy.deepcopy(layer)
    dual = fgkernels.convert(copy.deepcopy(layer)) if converted else copy.deepcopy(layer)
    fgkernels.set_tangents(dual, tangents)
    with fgkernels.use_backend(backend):
        for _ in range(2):  # the running statistics move as the plain forward moves them
            out = dual(Dual(x, xt))
            plain(x)
    _assert_as_forward_ad_and_plain(out, (y, yt), dual, plain)


# dropout layer -> the shape its input takes (the 8 features of a sample, unflattened)
DROPOUTS = {nn.Dropout: (8,), nn.Dropout1d: (2, 4), nn.Dropout2d: (2, 2, 2),
            nn.Dropout3d: (2, 2, 1, 2), nn.AlphaDropout: (8,), nn.FeatureAlphaDropout: (2, 2, 2)}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("p,inplace", [(0.3, False), (0.3, True), (1.0, False)])
@pytest.mark.parametrize("layer", list(DROPOUTS), ids=lambda c: c.__name__)
def test_dropout_masks_the_primal_and_every_slot_as_torch_draws(layer, p, inplace, backend):
    """In training, one mask (torch's own draw, elementwise or one per channel: the same seed
    gives forward_ad the same one) scales the primal and every tangent slot, in place too;
    p = 1 drops everything. Each is a rule's (strict: no op takes the fallback)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.Unflatten(1, DROPOUTS[layer]),
                        layer(p, inplace=inplace), nn.Flatten(), nn.Linear(8, 3))
    x = torch.randn(5, 6, dtype=torch.float64)
    with fgkernels.use_backend(backend), fgkernels.strict_rules():
        result = compare_with_forward_ad(net.double().train(), [x], num_tangents=3)
    assert result["primal"] < 1e-12 and result["tangent"] < 1e-12, result


class _Transposed(nn.Module):
    """``layer`` of the input's transpose, transposed back: a strided view, which torch draws
    a mask for in its own layout."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x.T).T


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("layer", [nn.Dropout, nn.AlphaDropout], ids=lambda c: c.__name__)
def test_dropout_of_a_strided_view_draws_as_torch_in_its_layout(layer, inplace):
    """Dropout of a transposed activation: torch draws its mask in the view's layout, and so
    do the rules (alpha dropout's was the forward-AD fallback's, whose jvp drew it as if
    contiguous: another mask, primal and tangent unlike torch's)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), _Transposed(layer(0.4, inplace=inplace)),
                        nn.Linear(8, 3))
    x = torch.randn(5, 6, dtype=torch.float64)
    with fgkernels.strict_rules():
        result = compare_with_forward_ad(net.double().train(), [x], num_tangents=2)
    assert result["primal"] < 1e-12 and result["tangent"] < 1e-12, result


ACTIVATIONS = {"none": None, "relu": nn.ReLU, "relu6": nn.ReLU6, "hardtanh": nn.Hardtanh,
               "leaky_relu": nn.LeakyReLU, "silu": nn.SiLU}


@st.composite
def conv_bn_blocks(draw):
    """A Conv2d → (BatchNorm2d) → (activation) block as users write it, and its input shape."""
    groups = draw(st.sampled_from([1, 1, 2]))
    cin, cout = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    k, dilation = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    stride = draw(st.integers(1, 2))
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    padding = draw(st.sampled_from(["same", "valid", 0, 1])) if stride == 1 else \
        draw(st.integers(0, 1))
    if mode != "zeros" and padding == "valid":
        padding = 0
    size = dilation * (k - 1) + 2 + draw(st.integers(0, 3))  # reflect pads less than the size
    layers = [nn.Conv2d(cin, cout, k, stride, padding, dilation, groups,
                        bias=draw(st.booleans()), padding_mode=mode)]
    if draw(st.booleans()):
        layers.append(nn.BatchNorm2d(cout, momentum=draw(st.sampled_from([0.1, None])),
                                     affine=draw(st.booleans()),
                                     track_running_stats=draw(st.booleans())))
    act = ACTIVATIONS[draw(st.sampled_from(sorted(ACTIVATIONS)))]
    if act is not None:
        layers.append(act())
    block = nn.Sequential(*layers)
    if draw(st.booleans()):
        block.eval()
    return block, (draw(st.integers(2, 3)), cin, size, size), draw(st.booleans())


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=conv_bn_blocks(), backend=st.sampled_from(CPU_BACKENDS),
       seed=st.integers(0, 2**31 - 1))
def test_drawn_conv_blocks_converted(case, backend, seed):
    """Drawn Conv → BN → activation blocks (groups, dilation, stride, every padding mode and
    form, batch-norm options, train or eval, NCHW or channels_last), converted: forward_ad's
    numbers and the plain forward's running statistics."""
    block, shape, channels_last = case
    g = torch.Generator().manual_seed(seed)
    block = block.double()
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    xt = torch.randn(2, *shape, generator=g, dtype=torch.float64)
    if channels_last:
        block, x = block.to(memory_format=torch.channels_last), \
            x.contiguous(memory_format=torch.channels_last)
    tangents = {n: torch.randn(2, *p.shape, generator=g, dtype=torch.float64)
                for n, p in block.named_parameters()}
    y, yt = torch_jvp_multi(block, x, xt, tangents)
    plain, dual = copy.deepcopy(block), fgkernels.convert(copy.deepcopy(block))
    fgkernels.set_tangents(dual, tangents)
    with fgkernels.use_backend(backend):
        out = dual(Dual(x, xt))
    plain(x)
    _assert_as_forward_ad_and_plain(out, (y, yt), dual, plain)


def test_float32_lstm_where_torchs_forward_mode_fails():
    """nn.LSTM in float32 on the CPU runs oneDNN's kernel, which has no forward-mode
    derivative: forward_ad raises there. The dual pass gives the float64 oracle's output and
    tangents within float32's rounding, and ``compare_with_forward_ad`` checks such a model."""
    torch.manual_seed(0)
    layer = _SequenceOutput(nn.LSTM(4, 3, num_layers=2, bidirectional=True))
    x, xt = torch.randn(5, 2, 4), torch.randn(2, 5, 2, 4)
    tangents = {n: torch.randn(2, *p.shape) for n, p in layer.named_parameters()}
    if torch.backends.mkldnn.is_available():
        with pytest.raises(NotImplementedError, match="forward AD"):
            torch_jvp_multi(layer, x, xt, tangents)
    y, yt = torch_jvp_multi(copy.deepcopy(layer).double(), x.double(), xt.double(),
                            {n: t.double() for n, t in tangents.items()})
    fgkernels.set_tangents(layer, tangents)
    out = layer(Dual(x, xt))
    torch.testing.assert_close(out.primal.double(), y, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.tangents.double(), yt, rtol=1e-4, atol=1e-5)
    # fgkernels.testing's oracle runs torch's layers on its composite kernels: it serves here
    fgkernels.clear_tangents(layer)
    errors = compare_with_forward_ad(layer, [x], num_tangents=2)
    assert errors["primal"] < 1e-6 and errors["tangent"] < 1e-5, errors


@pytest.mark.parametrize("batch_first", [False, True])
def test_packing_moves_every_slot_as_the_primal(batch_first):
    """pack_padded_sequence and pad_packed_sequence on a Dual (float32, three bfloat16 slots,
    unsorted lengths): each slot is what torch's functions make of that slot alone, and the
    padding's tangent is zero whatever the padding value."""
    rnn = nn.utils.rnn
    torch.manual_seed(0)
    x = torch.randn((3, 4, 2) if batch_first else (4, 3, 2))
    xt = torch.randn(3, *x.shape).to(torch.bfloat16)
    lengths = torch.tensor([2, 4, 1])
    packed = rnn.pack_padded_sequence(Dual(x, xt), lengths, batch_first, enforce_sorted=False)
    for t in range(3):
        slot = rnn.pack_padded_sequence(xt[t], lengths, batch_first, enforce_sorted=False)
        assert torch.equal(packed.data.tangents[t], slot.data)
    assert torch.equal(packed.data.primal,
                       rnn.pack_padded_sequence(x, lengths, batch_first, False).data)
    padded, got_lengths = rnn.pad_packed_sequence(packed, batch_first, padding_value=-1.0)
    assert torch.equal(got_lengths, lengths)
    assert torch.equal(padded.primal, rnn.pad_packed_sequence(
        rnn.pack_padded_sequence(x, lengths, batch_first, False), batch_first, -1.0)[0])
    keep = (torch.arange(4)[:, None] < lengths).to(xt.dtype)  # (time, batch)
    keep = (keep.T if batch_first else keep)[..., None]
    assert padded.tangents.dtype == torch.bfloat16
    assert torch.equal(padded.tangents, xt * keep)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("side", ["right", "left"])
def test_pad_sequence_pads_every_slot_as_the_primal(batch_first, side):
    """pad_sequence (and so pack_sequence) on rules alone: sequences of three lengths, one a
    plain tensor and two carrying different directions; each output slot is torch's padding of
    that slot's tangents, zero for a sequence without it and in the padding, whatever the
    padding value."""
    rnn = nn.utils.rnn
    torch.manual_seed(0)
    seqs = [torch.randn(k, 2) for k in (2, 4, 1)]
    t0, t2 = torch.randn(2, 2, 2), torch.randn(1, 1, 2)
    with fgkernels.strict_rules():
        out = rnn.pad_sequence([Dual(seqs[0], t0, directions=[1, 4]), seqs[1],
                                Dual(seqs[2], t2, directions=[3])],
                               batch_first, padding_value=-1.0, padding_side=side)
        packed = rnn.pack_sequence([Dual(seqs[0], t0[:1]), seqs[1]], enforce_sorted=False)
    pad = lambda xs, value: rnn.pad_sequence(xs, batch_first, value, side)
    assert torch.equal(out.primal, pad(seqs, -1.0)) and out.directions == (1, 3, 4)
    zeros = [torch.zeros_like(s) for s in seqs]
    for slot, parts in zip(out.tangents, ([t0[0], zeros[1], zeros[2]], [zeros[0], zeros[1], t2[0]],
                                          [t0[1], zeros[1], zeros[2]])):
        assert torch.equal(slot, pad(parts, 0.0))
    assert torch.equal(packed.data.tangents[0],
                       rnn.pack_sequence([t0[0], zeros[1]], enforce_sorted=False).data)


class _CausalSelfAttention(nn.Module):
    def __init__(self, need_weights: bool, **options):
        super().__init__()
        self.attn, self.need_weights = nn.MultiheadAttention(8, 2, **options), need_weights

    def forward(self, x):
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[0], dtype=x.dtype)
        return self.attn(x, x, x, attn_mask=mask, is_causal=True,
                         need_weights=self.need_weights)[0]


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("options", [{}, {"add_bias_kv": True}, {"add_zero_attn": True}],
                         ids=["plain", "bias keys", "zero key"])
def test_causal_attention_takes_torchs_mask(options, need_weights):
    """``is_causal`` with no padding mask and no weights asked for: torch drops the mask it was
    given and attends causally over the keys as they stand after a bias or zero key is added
    (which the mask, padded for that key, would let every query see). The primal is torch's
    own, and the tangents forward_ad's."""
    torch.manual_seed(1)
    model = _CausalSelfAttention(need_weights, **options).double().eval()
    x = torch.randn(4, 2, 8, dtype=torch.float64)
    torch.testing.assert_close(model(Dual(x, torch.randn(2, *x.shape, dtype=torch.float64))).primal,
                               model(x))
    errors = compare_with_forward_ad(model, [x], num_tangents=2)
    assert errors["primal"] < 1e-12 and errors["tangent"] < 1e-12, errors


@pytest.mark.parametrize("convert", [False, True], ids=["as it is", "converted"])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("mask", ["bias", "closure", "padding", "tokens"])
def test_attention_takes_masks_with_tangents(mask, need_weights, batch_first, convert):
    """nn.MultiheadAttention given a float mask that carries a tangent (torch's forward asks a
    mask's dtype of a Tensor only: the mask goes in as a tensor standing for its Dual): the
    primal is the plain model's, the tangents forward_ad's, and after the pass the module is of
    its own class again, holding no Dual."""
    torch.manual_seed(0)
    model = BiasedAttention(mask, need_weights, batch_first).double().eval()
    if convert:
        fgkernels.convert(model)
    cls = type(model.attn)
    x = torch.randn(*((2, 5) if batch_first else (5, 2)), 8, dtype=torch.float64)
    errors = compare_with_forward_ad(model, [x], num_tangents=2)
    assert errors["primal"] < 1e-12 and errors["tangent"] < 1e-12, errors
    assert errors["fallback"] == {}, errors
    assert type(model.attn) is cls
    assert not any(isinstance(v, Dual) for v in vars(model.attn).values())


@pytest.mark.parametrize("convert", [False, True], ids=["as it is", "converted"])
@pytest.mark.parametrize("padding", [False, True], ids=["", "padding"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["", "batch-first"])
@pytest.mark.parametrize("which", ["layer", "encoder", "source", "target", "memory"])
def test_transformer_layers_take_masks_with_tangents(which, batch_first, norm_first, padding,
                                                     convert):
    """torch's encoder layer, encoder and transformer given a learned bias as a mask (torch's
    encoder forwards ask the mask's dtype of a Tensor only), a bool padding mask beside or not:
    the primal is the plain model's, the tangents forward_ad's, and after the pass every layer
    is of its own class again."""
    torch.manual_seed(0)
    model = BiasedTransformer(which, norm_first, batch_first, padding).double().eval()
    if convert:
        fgkernels.convert(model)
    classes = [type(m) for m in model.modules()]
    x = torch.randn(*((2, 5) if batch_first else (5, 2)), 8, dtype=torch.float64)
    errors = compare_with_forward_ad(model, [x], num_tangents=2)
    assert errors["primal"] < 1e-12 and errors["tangent"] < 1e-12, errors
    assert errors["fallback"] == {}, errors
    assert [type(m) for m in model.modules()] == classes


class _PaddedEncoder(nn.Module):
    """nn.TransformerEncoder as torch builds it by default (nested tensors enabled), given a
    bool padding mask of the last key of the first sequence."""

    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2)
        pad = torch.zeros(2, 5, dtype=torch.bool)
        pad[0, -1] = True
        self.register_buffer("pad", pad)

    def forward(self, x):
        return self.encoder(x, src_key_padding_mask=self.pad)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_a_default_encoder_with_a_padding_mask_takes_no_fallback(train):
    """Asked in eval mode whether the padding mask is left-aligned (for its nested-tensor path,
    which a Dual never takes), the encoder gets the primal's answer: forward_ad's numbers, and
    no op on the forward-AD fallback."""
    torch.manual_seed(0)
    model = _PaddedEncoder().double().train(train)
    errors = compare_with_forward_ad(model, [torch.randn(2, 5, 8, dtype=torch.float64)])
    assert errors["primal"] < 1e-12 and errors["tangent"] < 1e-12, errors
    assert errors["fallback"] == {}, errors


@pytest.mark.parametrize("which", ["layer", "encoder"])
def test_a_causal_mask_with_a_tangent_is_dropped_as_torch_drops_it(which):
    """A learned bias whose values are the causal mask's, the layer told so or the encoder
    finding it: torch's attention then attends causally without the mask, whose tangent counts
    for nothing; forward_ad's numbers."""
    torch.manual_seed(0)
    model = BiasedTransformer(which, False, True, False,
                              is_causal=True if which == "layer" else None).double().eval()
    with torch.no_grad():
        model.bias.copy_(nn.Transformer.generate_square_subsequent_mask(5))
    errors = compare_with_forward_ad(model, [torch.randn(2, 5, 8, dtype=torch.float64)])
    assert errors["primal"] < 1e-12 and errors["tangent"] < 1e-12, errors


def test_a_converted_encoder_takes_a_dual_mask_as_the_passs_root():
    """A converted nn.TransformerEncoder called on a Dual input and a Dual mask, every
    parameter carrying tangents too: forward_ad's numbers."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    encoder = fgkernels.convert(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False))
    encoder = encoder.double().eval()
    x, bias = (torch.randn(*shape, dtype=torch.float64) for shape in ((2, 5, 8), (5, 5)))
    errors = compare_with_forward_ad(encoder, [x, bias], num_tangents=2)
    assert errors["primal"] < 1e-12 and errors["tangent"] < 1e-12, errors


class _OwnAttention(nn.MultiheadAttention):
    """A user's subclass of the layer that keeps torch's forward."""


def test_a_subclass_of_attention_takes_a_learned_mask():
    """An unconverted subclass of nn.MultiheadAttention that keeps torch's forward runs as the
    twin mixed into it while the pass runs: forward_ad's numbers, and its own class after."""
    torch.manual_seed(0)
    model = BiasedAttention("bias", False, True).double().eval()
    model.attn.__class__ = _OwnAttention
    errors = compare_with_forward_ad(model, [torch.randn(2, 5, 8, dtype=torch.float64)])
    assert errors["primal"] < 1e-12 and errors["tangent"] < 1e-12, errors
    assert type(model.attn) is _OwnAttention


class _MaskedAttention(nn.Module):
    """A converted nn.MultiheadAttention whose float mask is an input of the model (a Dual in
    the pass): query, key-and-value and mask given positionally, the layer's options and the
    call's other arguments fixed; the output, and the weights when asked for."""

    def __init__(self, options: dict, call: dict):
        super().__init__()
        self.attn = fgkernels.convert(nn.MultiheadAttention(8, 2, **options))
        self.call = call

    def forward(self, q, kv, mask):
        out, weights = self.attn(q, kv, kv, attn_mask=mask, **self.call)
        return out if weights is None else (out, weights)


# name -> (layer options, call arguments, query, key-and-value and mask shapes)
_MASKED_FORMS = {
    "key and value dims": (dict(kdim=6, vdim=6), {}, (4, 2, 8), (5, 2, 6), (4, 5)),
    "bias keys": (dict(add_bias_kv=True), {}, (4, 2, 8), (5, 2, 8), (4, 5)),
    "zero key": (dict(add_zero_attn=True), {}, (4, 2, 8), (5, 2, 8), (4, 5)),
    "causal": ({}, dict(is_causal=True, need_weights=False), (4, 2, 8), (4, 2, 8), (4, 4)),
    "unbatched, batch first": (dict(batch_first=True), {}, (4, 8), (5, 8), (4, 5)),
    "per head": ({}, {}, (4, 2, 8), (5, 2, 8), (4, 4, 5)),
    "bool padding beside": ({}, dict(key_padding_mask=torch.tensor([[False] * 4 + [True],
                                                                     [False] * 5])),
                            (4, 2, 8), (5, 2, 8), (4, 5)),
    "weights of each head": ({}, dict(average_attn_weights=False), (4, 2, 8), (5, 2, 8),
                             (4, 5)),
}


@pytest.mark.parametrize("form", list(_MASKED_FORMS))
def test_attention_with_a_dual_mask_takes_every_form(form):
    """The twin's own path (a Dual mask goes to the rule with the layer's arguments) in each
    form torch's forward takes: the outputs (and weights) and their tangents, the mask's among
    them, against forward_ad through torch's own forward."""
    options, call, *shapes = _MASKED_FORMS[form]
    torch.manual_seed(0)
    model = _MaskedAttention(options, call).double().eval()
    inputs = [torch.randn(shape, dtype=torch.float64) for shape in shapes]
    errors = compare_with_forward_ad(model, inputs, num_tangents=2)
    assert errors["primal"] < 1e-12 and errors["tangent"] < 1e-12, errors


def test_attention_mask_from_input_tangent_alone():
    """With no parameter carrying a tangent the pass substitutes nothing; the converted layer
    still takes a mask computed from the Dual input (the input's tangent alone, against
    forward_ad)."""
    torch.manual_seed(0)
    model = fgkernels.convert(BiasedAttention("tokens", False, True).double().eval())
    x, t = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(2, 5, 8, dtype=torch.float64)
    out = model(Dual(x, t))
    with oracle_mode():
        primal, tangents = torch_jvp_multi(model, x, t.unsqueeze(0))
    # (the plain call and the dual rule reach the attention by different kernels, whose
    # float64 sums may differ by an ulp: they do on an AVX2 CPU)
    torch.testing.assert_close(out.primal, model(x), rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(out.primal, primal, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.tangents, tangents, rtol=1e-12, atol=1e-12)


def test_attention_with_a_dual_mask_alone():
    """A Dual mask beside plain query, key and value (the converted layer called by itself):
    the output carries the mask's tangent, as forward_ad's."""
    torch.manual_seed(0)
    attn = fgkernels.convert(nn.MultiheadAttention(8, 2).double().eval())
    x = torch.randn(5, 2, 8, dtype=torch.float64)
    m, mt = torch.randn(5, 5, dtype=torch.float64), torch.randn(5, 5, dtype=torch.float64)
    out, _ = attn(x, x, x, attn_mask=Dual(m, mt), need_weights=False)
    with oracle_mode(), fwAD.dual_level():
        y, yt = fwAD.unpack_dual(attn(x, x, x, attn_mask=fwAD.make_dual(m, mt),
                                      need_weights=False)[0])
    torch.testing.assert_close(out.primal, y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.tangent, yt, rtol=1e-12, atol=1e-12)
