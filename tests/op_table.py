"""The op table: one row per op family that fgkernels has a rule for, iterated by every op suite
(tests/rules/test_ops.py: float64 exactness on every backend, zero tangents skipped, channels_last;
tests/dual/test_mixed_precision.py: bfloat16 tangents and bfloat16 networks).

A row is a function of ``(x, w)`` that runs on Duals (fgkernels' rules) and on forward_ad's dual
tensors (the oracle) alike, the shapes of x and w, and the oracle's own function where forward_ad
cannot run the op (torch has no forward-mode rule for its CPU flash attention or its weight
norm kernel: their definitions stand in). Adding an op to fgkernels adds its row here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from helpers import ForwardADOracle

TARGET = torch.tensor([1, 0, 3, 2])
IDS = torch.tensor([4, 0, 3, 3])


def math_attention(q, k, v, causal: bool = False, mask=None):
    """softmax(q kᵀ / √d) v, the definition: forward_ad's stand-in for the fused kernel (a bool
    ``mask``: True where a query may attend)."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if causal:
        later = torch.ones(scores.shape[-2:], dtype=torch.bool).triu(1)
        scores = scores.masked_fill(later, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, -1) @ v


def glu_definition(v, dim: int):
    """a·σ(b) over the halves of ``dim``: forward_ad's stand-in for the GLU kernel, whose
    forward mode has no bfloat16 CPU kernel."""
    a, b = v.chunk(2, dim)
    return a * torch.sigmoid(b)


def _distances(x, w, definition: bool = False):
    """cdist at p = 2 (and at 30 rows, where torch forms it by a matrix product), 1, 3 and ∞,
    of rows against themselves too (distances of 0), and at ∞ of a row whose largest
    coordinates tie; pdist: by torch's ops, or (``definition``) as the norms of the rows'
    differences, the oracle's stand-in (torch's forward mode has no rule for either op)."""
    def cdist(a, b, p):
        if definition:
            return torch.linalg.vector_norm(a.unsqueeze(-2) - b.unsqueeze(-3), ord=p, dim=-1)
        return torch.cdist(a, b, p)

    def pdist(a):
        if definition:
            rows, cols = torch.triu_indices(a.shape[0], a.shape[0], 1)
            return cdist(a, a, 2.0)[rows, cols]
        return F.pdist(a)

    y, z = x * w, x[:3] - w
    tall = torch.cat([y] * 8)[:30]
    near = [cdist(y, z, p) for p in (2.0, 1.0, 3.0, math.inf)]
    own = [cdist(y, y, p) for p in (2.0, 3.0, 1.0, math.inf)]
    tied = torch.stack([w[0], -w[0], w[0] * 0.5]).view(1, 3)
    return torch.cat([*(d.flatten() for d in near + own), cdist(tall, z, 2.0).flatten(),
                      pdist(y), cdist(tied, x[:2, :3] * 0, math.inf).flatten()])


BAG_IDS, BAG_OFFSETS = torch.tensor([1, 2, 4, 5, 4, 3]), torch.tensor([0, 2, 2, 5])


def _bag_definition(table, mode: str, per_sample_weights=None, padding_idx=None, ids=BAG_IDS,
                    offsets=BAG_OFFSETS):
    """An embedding bag by its definition, bag by bag (the oracle's stand-in: torch's forward
    mode has no rule for embedding_bag): the sum, mean or max of the rows each bag picks, each
    row scaled by its sample weight, padding skipped, 0 for a bag with no row."""
    ends = [*offsets[1:].tolist(), len(ids)]
    bags = []
    for start, end in zip(offsets.tolist(), ends):
        picks = [k for k in range(start, end) if ids[k] != padding_idx]
        rows = [table[ids[k]] * (1 if per_sample_weights is None else per_sample_weights[k])
                for k in picks]
        if not rows:
            bags.append(table.new_zeros(table.shape[1:]))
            continue
        rows = torch.stack(rows)
        bags.append(rows.sum(0) if mode == "sum" else rows.mean(0) if mode == "mean"
                    else rows.amax(0))
    return torch.stack(bags)


def _bags(x, w, definition: bool = False):
    """embedding_bag of each mode, with an empty bag, sample weights and padding, and of a 2-D
    input (a bag per row); by torch's op or (``definition``) bag by bag."""
    table, samples = x * w, x[:, 0]
    if definition:
        bag = _bag_definition
        rows = lambda t: _bag_definition(t, "mean", ids=BAG_IDS[:4], offsets=torch.tensor([0, 2]))
    else:
        bag = lambda t, mode, **kw: F.embedding_bag(BAG_IDS, t, BAG_OFFSETS, mode=mode, **kw)
        rows = lambda t: F.embedding_bag(BAG_IDS[:4].view(2, 2), t, mode="mean")
    outs = [bag(table, "sum"), bag(table, "mean"), bag(table, "max"), rows(table),
            bag(table, "sum", per_sample_weights=samples), bag(table, "max", padding_idx=4)]
    return torch.cat([o.flatten() for o in outs])


CTC_TARGETS = torch.tensor([[1, 2, 1], [3, 3, 0]])
CTC_INPUT_LENGTHS, CTC_TARGET_LENGTHS = torch.tensor([6, 5]), torch.tensor([3, 2])


def _ctc_definition(lp, reduction: str):
    """Each sample's −log Σ_paths exp(Σ_t lp[t, path_t]) by the forward recursion over the
    labels with blanks between them (unreachable states left out, not −inf), reduced as
    ``F.ctc_loss`` reduces: the oracle's stand-in (torch's forward mode has no rule for CTC)."""
    losses = []
    for n in range(lp.shape[1]):
        extended = [0]
        for label in CTC_TARGETS[n, :CTC_TARGET_LENGTHS[n]].tolist():
            extended += [label, 0]
        alpha = [lp[0, n, extended[0]], lp[0, n, extended[1]]] + [None] * (len(extended) - 2)
        for t in range(1, int(CTC_INPUT_LENGTHS[n])):
            step = []
            for k, label in enumerate(extended):
                skip = k >= 2 and label != 0 and label != extended[k - 2]
                came = [a for a in (alpha[k], alpha[k - 1] if k else None,
                                    alpha[k - 2] if skip else None) if a is not None]
                step.append(torch.logsumexp(torch.stack(came), 0) + lp[t, n, label] if came
                            else None)
            alpha = step
        losses.append(-torch.logsumexp(torch.stack(alpha[-2:]), 0))
    losses = torch.stack(losses)
    if reduction == "mean":
        return (losses / CTC_TARGET_LENGTHS).mean()
    return losses.sum() if reduction == "sum" else losses


def _ctc(x, w, definition: bool = False):
    """CTC of log-probabilities unnormalised and normalised, every reduction."""
    raw = x * w
    loss = (lambda lp, r: _ctc_definition(lp, r)) if definition else (
        lambda lp, r: F.ctc_loss(lp, CTC_TARGETS, CTC_INPUT_LENGTHS, CTC_TARGET_LENGTHS,
                                 reduction=r))
    return torch.cat([loss(raw, "none"), loss(raw.log_softmax(-1), "none"),
                      loss(raw, "sum").view(1), loss(raw.log_softmax(-1), "mean").view(1)])


def _bilinear_sample(x, grid, align_corners: bool):
    """``F.grid_sample``'s bilinear sampling with zero padding, by its definition: the four
    pixels around each point, weighted by their nearness (the oracle's stand-in: torch's forward
    mode has no rule for grid_sample)."""
    n, c, h, w = x.shape
    gx, gy = grid[..., 0], grid[..., 1]
    if align_corners:
        ix, iy = (gx + 1) / 2 * (w - 1), (gy + 1) / 2 * (h - 1)
    else:
        ix, iy = ((gx + 1) * w - 1) / 2, ((gy + 1) * h - 1) / 2
    left, top = ix.detach().floor(), iy.detach().floor()
    out = 0
    for cx in (left, left + 1):
        for cy in (top, top + 1):
            near = (1 - (ix - cx).abs()) * (1 - (iy - cy).abs())
            inside = (cx >= 0) & (cx < w) & (cy >= 0) & (cy < h)
            at = (cy.clamp(0, h - 1) * w + cx.clamp(0, w - 1)).long().flatten(1)
            pixels = x.flatten(2).gather(2, at.unsqueeze(1).expand(n, c, -1))
            out = out + pixels.view(n, c, *grid.shape[1:3]) * (near * inside).unsqueeze(1)
    return out


def _grid_samples(x, w, definition: bool = False):
    """Bilinear grid sampling with zero padding, corners aligned or not, at points partly
    outside the input."""
    grid = torch.tanh(w) * 1.2
    sample = _bilinear_sample if definition else (
        lambda v, g, corners: F.grid_sample(v, g, align_corners=corners))
    return torch.cat([sample(x, grid, False), sample(x * 2, grid.flip(-1), True)])


def _assign_rows(x, w):
    y = x * w[0]
    y[:, ::2] = w[::2] * 2      # assigned into a strided slice (a Dual as long as x or w is)
    return y


def _eval_batch_norm(x, w):
    mean, var = torch.linspace(-1, 1, x.shape[1]), torch.linspace(0.5, 2, x.shape[1])
    return F.batch_norm(x, mean.to(x.dtype), var.to(x.dtype), w, None, False)


def _instance_norms(x, w):
    mean, var = torch.linspace(-1, 1, 6, dtype=x.dtype), torch.linspace(0.5, 2, 6, dtype=x.dtype)
    return F.instance_norm(x, None, None, w, w * 0.5) \
        + F.instance_norm(x * w[:, None, None], mean, var, use_input_stats=False)


def _index_and_setitem(x, w):
    y = x[:, [0, 2, 3]] * w[1:4]
    y[y > 0.5] = 0.5            # a mask
    y[:, 1] = w[0] * x[:, 1]    # a row from another operand
    return y


def _spreads_and_means(x, w):
    v, m = torch.var_mean(x * w, 1)
    s, n = torch.std_mean(x, (0,), correction=0, keepdim=True)
    return v * m + (s * n).sum(1) + torch.std_mean(x * w)[1]


def _clamps_one_side(x, w):
    bound = x.detach() + (w - w.detach())  # x's values, w's tangents: a tie everywhere
    return x.clamp_min(0.1) + torch.clamp_max(x * w, 0.3) + x.clamp_min(w) \
        + torch.clamp_max(x, w * 0.5) + x.clamp_min(bound) + torch.clamp_max(x * 2, bound * 2)


def _selections(x, w):
    a = x * w
    tied = torch.stack([x, x.detach() + (w - w.detach())])  # equal values, different tangents
    return a.max(1).values + torch.min(a, dim=0, keepdim=True)[0].sum() \
        + torch.sort(a, 1, descending=True).values[:, :2].sum(1) \
        + a.topk(3, dim=0).values.sum(0)[:4] + torch.max(a) + torch.min(x, w.expand(4, 6)).sum(1) \
        + a.max(-1, keepdim=True)[0].squeeze(1) + tied.max(0).values.sum(1) \
        + torch.min(tied, 0).values.sum(1)


COLUMNS = torch.tensor([True, True, True, False, False, True])


def _masked_fills(x, w):
    """masked_fill and index_fill, of Duals and of a plain tensor by a 0-d Dual value."""
    y = (x * w).clone()
    y.masked_fill_((x < -0.5) & COLUMNS, float("-inf"))  # attention's masked scores
    picked = torch.tensor([0, 4])
    return torch.softmax(y, 1) + (x * w).masked_fill(x > 0.5, 2.0) \
        + x.masked_fill(COLUMNS, w.sum()) + torch.masked_fill(x, ~COLUMNS, torch.tensor(3.0)) \
        + torch.ones(4, 6, dtype=x.dtype).index_fill(1, picked, w.sum()) \
        + (x * w).index_fill(0, picked[:1], x.mean()) + torch.index_fill(x, 1, picked, 2.0)


def _gathers(x, w):
    a = x * w
    order = a.detach().argsort(1)
    return a.gather(1, order[:, :4]) + torch.index_select(a, 1, torch.tensor([0, 2, 5, 5])) \
        + torch.take_along_dim(x, order, 1)[:, 2:] + x.index_select(0, torch.tensor([3, 1, 0, 0]))[
            :, :4]


def _index_adds(x, w):
    """An MoE's experts' outputs summed by token (torch's and the Tensor method's forms, along
    either dim, a row added twice), and ``Tensor.where``."""
    a = x * w  # (4, 6)
    tokens = torch.zeros(5, 6, dtype=a.dtype).index_add(0, torch.tensor([4, 0, 4, 2]), a,
                                                        alpha=0.5)
    return torch.index_add(tokens, 1, torch.tensor([5, 5, 1]), a[:3, :5].T) \
        + a.sum(0).where(w > 0, x.mean())


def _linear_maps(x, w):
    a = x * w  # (2, 4, 6, 6)
    cols = F.unfold(a, 3, padding=1, stride=2)
    s = a.sum()  # 0-d: roll and flip are the identity on its slots
    return F.fold(cols, (6, 6), 3, padding=1, stride=2) + F.channel_shuffle(a, 2) \
        + F.avg_pool1d(a.flatten(2), 4, 2, 1).sum(-1)[..., None, None] \
        + F.adaptive_avg_pool1d(a.flatten(2), 5).sum(-1)[..., None, None] \
        + s.roll(1) * s.flip(0)


def _average_pools_3d(x, w):
    a = x * w  # (2, 4, 6, 6): batched as (2, 1, 4, 6, 6), unbatched as (C=2, D=4, H=6, W=6)
    uneven = F.avg_pool3d(a[:, None], 2, 2, ceil_mode=True, count_include_pad=False)
    return F.avg_pool3d(a[:, None], (1, 3, 3), 1, (0, 1, 1))[:, 0] \
        + uneven.sum((1, 2, 3, 4))[:, None, None, None] \
        + F.adaptive_avg_pool3d(a, (4, 3, 2)).sum((-2, -1), keepdim=True)


def _average_pools_3d_ref(x, w):
    """``_average_pools_3d`` for the oracle: in bfloat16, pooled in float32 and rounded back
    (torch's CPU avg_pool3d takes no bfloat16; its other bfloat16 CPU kernels sum in float32
    so)."""
    if x.dtype != torch.bfloat16:
        return _average_pools_3d(x, w)
    return _average_pools_3d(x.float(), w.float()).to(x.dtype)


def _selecting_pools(x, w):
    a = x * w  # (2, 4, 6, 6)
    per_channel = lambda v: v[..., None, None]  # (2, 4) -> (2, 4, 1, 1)
    return F.max_pool2d(a, 2, return_indices=True)[0] + F.adaptive_max_pool2d(a, 3) \
        + per_channel(F.max_pool1d(a.flatten(2), 3, 2, 1, ceil_mode=True).amax(-1)) \
        + per_channel(F.adaptive_max_pool1d(a.flatten(2), 2).sum(-1)) \
        + F.max_pool3d(a[:, None], 2, 2)[:, 0].sum(1, keepdim=True)[..., :1, :] \
        + F.adaptive_max_pool3d(a[:, None], (1, 3, 3))[:, 0]


def _probability_losses(x, w):
    p, q = torch.sigmoid(x * w), torch.sigmoid(w).expand(4, 6)  # a soft target that is a Dual
    return F.binary_cross_entropy(p, q) \
        + F.binary_cross_entropy(p, torch.linspace(0, 1, 24, dtype=x.dtype).reshape(4, 6),
                                 torch.linspace(0.2, 1, 6, dtype=x.dtype), reduction="sum") \
        + F.binary_cross_entropy(torch.sigmoid(x), p, reduction="none").sum(1)


def _trig_hyperbolic_logs(x, w):
    a = x * w
    steps = torch.floor(a) + torch.ceil(x) + torch.round(a, decimals=1) + torch.trunc(x * 3)
    return torch.tan(a * 0.5) + torch.atan(a) + torch.asin(torch.tanh(x) * 0.9) \
        + torch.acos(torch.sigmoid(a)) + torch.sinh(x) * w + torch.cosh(a) \
        + torch.log2(a.abs() + 0.1) + torch.log10(x.abs() + 1) + torch.frac(a * 3) + steps * w


SHUFFLE = torch.randperm(24, generator=torch.Generator().manual_seed(0)).reshape(4, 6)


def _rearrangements(x, w):
    a = x * w
    return a.broadcast_to(2, 4, 6).sum(0) + torch.rot90(a, 1, (0, 1)).T + torch.fliplr(a) \
        + x.flipud() + torch.ravel(a.T).view(4, 6) + torch.take(a, SHUFFLE) \
        + torch.diag(a).sum() + torch.diag_embed(w)[:4] + torch.trace(a)


def _recurrent_layers(x, w):
    """torch.lstm (two layers, both directions, initial states from x), torch.gru and the two
    plain RNNs (one without biases, one batch first) on x (L, N, 4), every weight cut from w
    (12, 4): hidden size 3."""
    h = torch.tanh(x[0, :, :3])
    lstm = []
    for layer in range(2):
        for sign in (1.0, -0.5):
            w_ih = w if layer == 0 else torch.cat([w, w[:, :2]], 1)
            lstm += [w_ih * sign, w[:, :3] * 0.5, w[:, 0], w[:, 1] * sign]
    states = torch.stack([h, -h, h * 0.5, h * 0.3])
    out, h_n, c_n = torch.lstm(x, (states, states * 0.7), lstm, True, 2, 0.0, False, True,
                               False)
    gru, gru_h = torch.gru(x, h[None], [w[:9], w[:9, :3], w[:9, 2], w[:9, 3]], True, 1, 0.0,
                           False, False, False)
    tanh, _ = torch.rnn_tanh(x.transpose(0, 1), h[None], [w[:3], w[:3, :3]], False, 1, 0.0,
                             False, False, True)
    relu, _ = torch.rnn_relu(x, h[None], [w[3:6], w[3:6, :3], w[6:9, 0], w[6:9, 1]], True, 1,
                             0.0, False, False, False)
    return torch.cat([t.flatten() for t in (out, h_n, c_n, gru, gru_h, tanh, relu)])


def _on_composite_rnn_kernels(x, w):
    """``_recurrent_layers`` on torch's composite RNN kernels (``oracle_mode``): oneDNN's,
    which torch takes in float32 and bfloat16 on the CPU, has no forward-mode derivative."""
    from fgkernels.testing import _on_composite_kernels
    return _on_composite_kernels(_recurrent_layers)(x, w)


@dataclass(frozen=True)
class OpCase:
    """``fn(x, w)`` on inputs of ``x_shape`` and ``w_shape``; ``ref`` the oracle's function
    (``fn`` when None). ``bf16_network``: torch's own bfloat16 forward mode is a usable yardstick
    for a whole-bfloat16 run of the op (torch computes its CPU layer and group norms'
    statistics in float32 even then, which no bound on a bfloat16 pass can match).
    ``on_rules``: the row runs on fgkernels' rules alone (False: a form of an op that takes
    the forward-AD fallback). ``nan_as_oracle``: a NaN or Inf tangent gives NaN and ±Inf where
    the oracle's do (False: an oracle ``ref`` that defines the op by a formula of its own,
    whose 0·Inf are not torch's; non-finite in the same places)."""

    fn: Callable
    x_shape: tuple
    w_shape: tuple
    ref: Optional[Callable] = None
    bf16_network: bool = True
    on_rules: bool = True
    nan_as_oracle: bool = True

    def oracle(self, x, w, xt, wt) -> ForwardADOracle:
        """forward_ad's ``(y, stacked tangents)`` in any dtype (``oracle(dtype)``); an operand
        whose tangent is None is a constant."""
        return ForwardADOracle(self.ref or self.fn, [x, w], [xt, wt])


OPS = {
    "conv2d": OpCase(lambda x, w: F.conv2d(x, w, padding=1), (4, 6, 8, 8), (5, 6, 3, 3)),
    "conv2d_stride2": OpCase(lambda x, w: F.conv2d(x, w, stride=2), (4, 6, 9, 9), (5, 6, 3, 3)),
    "conv2d_unbatched": OpCase(lambda x, w: F.conv2d(x, w, padding=1), (6, 5, 5), (5, 6, 3, 3)),
    "conv2d_groups": OpCase(lambda x, w: F.conv2d(x, w, padding=1, groups=3), (2, 6, 5, 5),
                            (6, 2, 3, 3)),
    "conv1d": OpCase(lambda x, w: F.conv1d(x, w, w[:, 0, 1], stride=2, padding=1)[..., 1:]
                     + torch.conv1d(x, w[:, :, 1:], None, 2, "valid", 2, 1),
                     (3, 6, 9), (5, 6, 3)),
    "conv1d_unbatched_groups": OpCase(lambda x, w: F.conv1d(x, w, padding="same", dilation=2,
                                                            groups=3), (6, 9), (6, 2, 3)),
    "conv_transpose2d": OpCase(lambda x, w: F.conv_transpose2d(x, w, w[0, :, 0, 0], stride=2,
                                                               padding=1, output_padding=1),
                               (4, 6, 5, 5), (6, 5, 3, 3)),
    "conv_transpose1d_unbatched_groups": OpCase(
        lambda x, w: F.conv_transpose1d(x, w, w[:, 0, 0], 2, 0, 1, 3, 2), (6, 9), (6, 2, 3)),
    "conv3d_then_transposed": OpCase(
        lambda x, w: F.conv_transpose3d(F.conv3d(x, w, w[0, :, 0, 0, 0], padding=1), w, stride=2),
        (2, 4, 3, 4, 4), (4, 4, 2, 2, 2)),
    "linear": OpCase(lambda x, w: F.linear(x, w), (4, 12), (7, 12)),
    # (torch has no bfloat16 cdist on the CPU)
    "distances": OpCase(_distances, (4, 6), (6,),
                        ref=lambda x, w: _distances(x, w, definition=True), bf16_network=False),
    "batch_norm_relu": OpCase(lambda x, w: F.relu(F.batch_norm(x, None, None, w, None, True)),
                              (4, 6, 5, 5), (6,)),
    "batch_norm_eval": OpCase(_eval_batch_norm, (4, 6, 5, 5), (6,)),
    "conv_bn_relu": OpCase(lambda x, w: F.relu(F.batch_norm(F.conv2d(x, w, padding=1), None,
                                                            None, None, None, True)),
                           (4, 6, 8, 8), (5, 6, 3, 3)),
    "max_pool": OpCase(lambda x, w: F.max_pool2d(F.conv2d(x, w), 2), (4, 6, 8, 8),
                       (5, 6, 1, 1)),
    "avg_pools": OpCase(lambda x, w: F.adaptive_avg_pool2d(F.avg_pool2d(x * w, 2), 1),
                        (4, 6, 8, 8), (6, 1, 1)),
    # torch's CPU avg_pool3d takes no bfloat16: no bfloat16 network of it
    "avg_pools_3d": OpCase(_average_pools_3d, (2, 4, 6, 6), (4, 1, 1), _average_pools_3d_ref,
                           bf16_network=False),
    "silu_mul": OpCase(lambda x, w: F.silu(x) * torch.sigmoid(w), (4, 6, 5, 5), (6, 1, 1)),
    "gelu_tanh": OpCase(lambda x, w: F.gelu(x * w, approximate="tanh").tanh(), (4, 6, 5, 5),
                        (6, 1, 1)),
    "hardtanh": OpCase(lambda x, w: F.hardtanh(x * w, -0.5, 1.5), (4, 6, 5, 5), (6, 1, 1)),
    "exp": OpCase(lambda x, w: (x * w).exp() + torch.exp(w), (4, 6), (6,)),
    "normalize": OpCase(lambda x, w: F.normalize(x * w, dim=-1) + F.normalize(w, dim=0),
                        (4, 6), (6,)),
    "layer_norm": OpCase(lambda x, w: F.layer_norm(x, (6,), w), (4, 5, 6), (6,),
                         bf16_network=False),
    "robust_losses": OpCase(
        lambda x, w: F.smooth_l1_loss(x * w, x.detach() * 0.5, beta=0.5)
        + F.huber_loss(x, w.expand(4, 6), reduction="sum", delta=0.7)
        + F.smooth_l1_loss(x, w.expand(4, 6), reduction="none", beta=0.0), (4, 6), (6,)),
    "rms_norm": OpCase(lambda x, w: F.rms_norm(x, [6], w) + F.rms_norm(x * w, (5, 6), eps=1e-3),
                       (4, 5, 6), (6,)),
    "group_norm": OpCase(lambda x, w: F.group_norm(x, 3, w), (4, 6, 5, 5), (6,),
                         bf16_network=False),
    "instance_norm": OpCase(_instance_norms, (4, 6, 5, 5), (6,), bf16_network=False),
    # denominators of either sign, at least 1 away from 0
    "div_add": OpCase(lambda x, w: (x + 1) / ((w * w + 1) * torch.where(w > 0, 1, -1)),
                      (4, 6, 5, 5), (6, 1, 1)),
    "cat_flatten": OpCase(lambda x, w: torch.cat([x, x * w], 1).flatten(1), (4, 6, 2, 2),
                          (6, 1, 1)),
    "matmul_softmax": OpCase(lambda x, w: torch.softmax(x @ w, -1), (3, 4, 5), (5, 6)),
    # heads split from tokens (N, L, H, E): batch dims that torch.matmul cannot fold unmoved
    "matmul_heads_split": OpCase(
        lambda x, w: torch.softmax(x.transpose(1, 2) @ w.transpose(1, 2).mT, -1)
        @ w.transpose(1, 2), (2, 5, 3, 4), (2, 5, 3, 4)),
    "softmax_vector": OpCase(lambda x, w: torch.softmax(x * w, 0) + F.log_softmax(w, 0),
                             (6,), (6,)),
    "attention": OpCase(lambda x, w: F.scaled_dot_product_attention(x, x * w, x),
                        (2, 3, 5, 4), (4,),
                        ref=lambda x, w: math_attention(x, x * w, x)),
    # a constant pad of value 3: the tangent is padded with 0
    "pad_interpolate": OpCase(lambda x, w: F.interpolate(F.pad(x * w, (1, 0, 2, 1), value=3.0),
                                                         scale_factor=2, mode="bilinear"),
                              (2, 3, 4, 4), (3, 1, 1)),
    "log_softmax": OpCase(lambda x, w: F.log_softmax(x + w, -1), (4, 7), (7,)),
    "where_clamp": OpCase(lambda x, w: torch.where(x > 0, x * w, w).clamp(-0.5, 1.0),
                          (4, 6), (6,)),
    "clamp_tensor_bounds": OpCase(lambda x, w: torch.clamp(x, min=w - 0.5, max=w + 0.5)
                                  + x.clamp(max=w) * x.clamp(min=-w), (4, 6), (6,)),
    # min > max: torch gives max and its tangent (everywhere in the first term; in the second
    # where w² > w)
    "clamp_crossed_bounds": OpCase(lambda x, w: torch.clamp(x, min=w + 0.5, max=w - 0.5)
                                   + torch.clamp(x, min=w * w, max=w), (4, 6), (6,)),
    # ties: a bound equal to x gives the bound's tangent, two bounds give x's (torch's rule)
    "clamp_bound_ties": OpCase(lambda x, w: x.clamp(min=x.detach()) * w
                               + x.clamp(max=x.detach()) + x.clamp(x.detach(), x.detach() + w),
                               (4, 6), (6,)),
    "index_and_setitem": OpCase(_index_and_setitem, (4, 6), (6,)),
    "select_method": OpCase(lambda x, w: x.select(-1, 2)[:, None] * w + x.select(0, 1),
                            (4, 6), (6,)),
    "vector_norm": OpCase(lambda x, w: torch.linalg.vector_norm(x * w, dim=-1), (4, 6), (6,)),
    "weight_norm": OpCase(lambda x, w: torch._weight_norm(x, w, 0), (5, 3, 2, 2), (5, 1, 1, 1),
                          ref=lambda x, w: x * w / torch.linalg.vector_norm(x, dim=(1, 2, 3),
                                                                     keepdim=True)),
    "weight_norm_all_dims": OpCase(lambda x, w: torch._weight_norm(x, w, -1), (5, 3, 2, 2),
                                   (1, 1, 1, 1),
                                   ref=lambda x, w: x * w / torch.linalg.vector_norm(x)),
    "baddbmm_einsum": OpCase(lambda x, w: torch.einsum("bij,jk->bik",
                                                       torch.baddbmm(x, x, x), w),
                             (2, 4, 4), (4, 3)),
    "cross_entropy": OpCase(lambda x, w: F.cross_entropy(F.linear(x, w), TARGET), (4, 12),
                            (5, 12)),
    "fallback_cumprod": OpCase(lambda x, w: torch.cumprod(x * w, 1), (4, 6), (6,),
                               on_rules=False),
    "lerp_addcmul_addcdiv": OpCase(
        lambda x, w: torch.lerp(x, x * w, 0.3) + torch.lerp(x, w.expand(4, 6), x * w)
        + torch.addcmul(x, x, w, value=0.5) + x.addcdiv(x * w, w.abs() + 1, value=-2.0),
        (4, 6), (6,)),
    # log of negative values: NaN primals that nan_to_num replaces (their tangents then 0)
    "atan2_nan_to_num": OpCase(
        lambda x, w: torch.atan2(x, w) + x.arctan2(x * w)
        + torch.nan_to_num((x * w).log(), nan=0.5, neginf=-3.0), (4, 6), (6,)),
    "softsign_tanhshrink_softmin": OpCase(
        lambda x, w: F.softsign(x * w) + F.tanhshrink(x) * w + F.softmin(x * w, dim=1),
        (4, 6), (6,)),
    "softplus": OpCase(lambda x, w: F.softplus(x * w, beta=2.0, threshold=1.0) + F.softplus(w),
                       (4, 6), (6,)),
    # bases above 0 and of either sign, exponents tensor and number (0 among them), bases of 0
    # (the exponent's term is 0 there where the exponent is ≥ 0, the base's where it is 0)
    "pow": OpCase(lambda x, w: (x.abs() + 0.5) ** w + torch.pow(x, 2) * w + 2 ** (x * w)
                  + (x * w).pow(3.0) + x ** 0 + torch.pow(0.0, w.abs()) + torch.square(x - w)
                  + torch.pow(F.relu(x), torch.where(w > 0, w + 1, 0 * w)),
                  (4, 6), (6,)),
    # exponents of 0: the base's term is 0 whatever its tangent (a NaN one included)
    "pow_exponent_zero": OpCase(lambda x, w: x ** 0 * w + torch.pow(x.abs() + 0.5, w * 0),
                                (4, 6), (6,)),
    # the larger or smaller operand's tangent, their mean at ties (x against itself)
    "maximum_minimum": OpCase(lambda x, w: torch.maximum(x, w) + torch.minimum(x * w, x)
                              + torch.maximum(x, x.detach()) * w + x.minimum(x.detach()),
                              (4, 6), (6,)),
    # |x| at 0 too (slope 0 there, as torch's sgn)
    "abs": OpCase(lambda x, w: torch.abs(x * w) + (x - x.detach()).abs() * w + abs(w),
                  (4, 6), (6,)),
    # an RMS norm written out, and roots and logarithms of positive values
    "sqrt_rsqrt_log": OpCase(lambda x, w: torch.sqrt(x * x + 0.5) * w + torch.log(w * w + 0.5)
                             + x * torch.rsqrt((x * w).pow(2).mean(-1, keepdim=True) + 1e-6),
                             (4, 6), (6,)),
    # rows picked by a batch of indices and by a 2-D one (a padding index among them)
    # (torch has no bfloat16 CTC on the CPU)
    "ctc_loss": OpCase(_ctc, (6, 2, 4), (4,), ref=lambda x, w: _ctc(x, w, definition=True),
                       bf16_network=False),
    # (in bfloat16 the points move across pixel edges, where the derivative in the grid jumps:
    # torch's own bfloat16 forward mode of the definition is 10% off, no yardstick)
    "grid_sample": OpCase(_grid_samples, (2, 3, 5, 6), (2, 4, 3, 2),
                          ref=lambda x, w: _grid_samples(x, w, definition=True),
                          bf16_network=False, nan_as_oracle=False),
    "embedding_bag": OpCase(_bags, (6, 5), (5,), ref=lambda x, w: _bags(x, w, definition=True)),
    "embedding": OpCase(lambda x, w: F.embedding(IDS, w) * x
                        + F.embedding(IDS.view(2, 2), w, padding_idx=3).flatten(0, 1),
                        (4, 6), (5, 6)),
    "addmm": OpCase(lambda x, w: torch.addmm(w[0], x, w, beta=0.5, alpha=2.0) + x.addmm(x, w),
                    (4, 6), (6, 6)),
    "addmv_addr_addbmm": OpCase(
        lambda x, w: torch.addmv(x[:, 0], x, w[0], beta=0.5, alpha=2.0)[:, None]
        + torch.addr(x, x[:, 1], w[2], beta=2.0, alpha=-1.5) + x[:, 3].addmv(x, w[1])[:, None]
        + torch.addbmm(x, torch.stack([x, x.flip(0)]), torch.stack([w, w.T]), beta=0.5, alpha=3.0)
        + x.addr(x[:, 2], x[3]),
        (4, 6), (6, 6)),
    "matmul_forms": OpCase(lambda x, w: torch.mm(x, w) + torch.bmm(x[None], w[None])[0]
                           + x.mv(w[0])[:, None] + torch.outer(x[:, 0], w[1])
                           + torch.dot(x[0], w[2]) + torch.vdot(w[3], x[1]) + x[:, 2].ger(w[4]),
                           (4, 6), (6, 6)),
    "sin_cos_reciprocal": OpCase(lambda x, w: torch.sin(x * w) + torch.cos(x).mul(w)
                                 + (x * x + 0.5).reciprocal() + torch.reciprocal(w), (4, 6), (6,)),
    "repeats_cumsum_triangles": OpCase(
        lambda x, w: (x * w).repeat_interleave(torch.tensor([1, 0, 2, 1, 1, 1]), dim=1)
        + torch.cumsum(x, 0) + x.tril(-1) + torch.triu(w.tile(4, 1), 2)
        + torch.repeat_interleave(w[:3], 2), (4, 6), (6,)),
    "pixel_shuffle": OpCase(lambda x, w: F.pixel_unshuffle(F.pixel_shuffle(x * w, 2).relu(), 2),
                            (2, 8, 4, 4), (8, 1, 1)),
    "stack": OpCase(lambda x, w: torch.stack([x, x * w, x.detach()], 1).flatten(1)
                    + torch.stack([w.expand(4, 6), x], -1).sum(-1).repeat(1, 3), (4, 6), (6,)),
    # --- the edges of each op's arguments ----------------------------------------------------
    "conv2d_same_even_kernel": OpCase(lambda x, w: F.conv2d(x, w, padding="same"),
                                      (2, 3, 6, 6), (4, 3, 2, 4)),
    "conv2d_dilated_valid": OpCase(lambda x, w: F.conv2d(x, w, padding="valid", dilation=2),
                                   (2, 3, 7, 7), (4, 3, 3, 3)),
    "linear_3d_bias": OpCase(lambda x, w: F.linear(x, w, w[:, 0]), (2, 3, 6), (4, 6)),
    # torch's other forms: a 1-D weight, a bias that broadcasts ((1,), one per row)
    "linear_vector_broadcast_bias": OpCase(
        lambda x, w: F.linear(x, w[0])[:, None] + F.linear(x, w, w[0, :1])
        + F.linear(x, w, w[:4, :1]), (4, 12), (7, 12)),
    "batch_norm_3d": OpCase(lambda x, w: F.batch_norm(x, None, None, w, None, True),
                            (4, 6, 5), (6,)),
    "layer_norm_2d_bias": OpCase(lambda x, w: F.layer_norm(x, (5, 6), None, w.expand(5, 6)),
                                 (3, 5, 6), (6,), bf16_network=False),
    # weight and bias both carrying tangents, over a strided input
    "layer_norm_affine_strided": OpCase(
        lambda x, w: F.layer_norm(x.transpose(0, 1), (6,), w[0], w[1], eps=1e-3),
        (5, 4, 6), (2, 6), bf16_network=False),
    "max_pool_ceil_dilated": OpCase(lambda x, w: F.max_pool2d(x * w, 3, 2, 1, 2, ceil_mode=True),
                                    (2, 3, 9, 8), (3, 1, 1)),
    "max_pool_unbatched": OpCase(lambda x, w: F.max_pool2d(x * w, 2), (3, 8, 8), (3, 1, 1)),
    "avg_pool_ceil_no_pad": OpCase(lambda x, w: F.avg_pool2d(x * w, 3, 2, 1, ceil_mode=True,
                                                             count_include_pad=False),
                                   (2, 3, 8, 7), (3, 1, 1)),
    "avg_pool_divisor": OpCase(lambda x, w: F.avg_pool2d(x * w, 2, divisor_override=3),
                               (2, 3, 6, 6), (3, 1, 1)),
    "adaptive_pool_uneven": OpCase(lambda x, w: F.adaptive_avg_pool2d(x * w, (3, 2)),
                                   (2, 3, 7, 5), (3, 1, 1)),
    "pad_modes": OpCase(lambda x, w: F.pad(F.pad(F.pad(x * w, (2, 1, 1, 2), mode="reflect"),
                                                 (1, 1, 0, 1), mode="replicate"),
                                           (1, 0, 1, 0), mode="circular"),
                        (2, 3, 5, 5), (3, 1, 1)),
    "interpolate_modes": OpCase(lambda x, w: F.interpolate(
        F.interpolate(x * w, size=(7, 3), mode="nearest"), scale_factor=1.5, mode="bicubic",
        align_corners=True), (2, 3, 4, 4), (3, 1, 1)),
    "cross_entropy_smoothed_weighted": OpCase(
        lambda x, w: F.cross_entropy(x, TARGET, weight=w.abs() + 0.1, label_smoothing=0.2),
        (4, 6), (6,), on_rules=False),
    "nll_loss": OpCase(  # class weights, an ignored sample, each reduction
        lambda x, w: F.nll_loss(F.log_softmax(x * w, 1), torch.tensor([1, -100, 3, 2]),
                                torch.linspace(0.5, 2, 6).to(x.dtype))
        + F.nll_loss(x, TARGET, reduction="none").sum() + F.nll_loss(x, TARGET, reduction="sum"),
        (4, 6), (6,)),
    "cross_entropy_smoothed": OpCase(  # an ignored sample; an Inf tangent meets ε/C, not 0
        lambda x, w: F.cross_entropy(x * w, torch.tensor([1, -100, 3, 2]), reduction="none",
                                     label_smoothing=0.2), (4, 6), (6,)),
    "cross_entropy_ignored_summed": OpCase(
        lambda x, w: F.cross_entropy(x * w, torch.tensor([1, -100, 3, 2]), reduction="sum"),
        (4, 6), (6,)),
    "cross_entropy_probabilities": OpCase(
        lambda x, w: F.cross_entropy(x, torch.softmax(w, -1).expand(4, 6)), (4, 6), (6,),
        on_rules=False),
    "cross_entropy_spatial": OpCase(
        lambda x, w: F.cross_entropy(x * w, torch.tensor([[[1, 0], [2, 3]]] * 2),
                                     reduction="none"),
        (2, 4, 2, 2), (4, 1, 1), on_rules=False),
    "reductions": OpCase(  # the last amax: every element a tie of two different tangents
        lambda x, w: torch.logsumexp(x * w, 1) + (x * w).var(1) + torch.std(x, 1, False)
        + x.amax(1) + torch.amin(x, (0,), True).sum()
        + torch.amax(torch.stack([x, x.detach() + w[:1] - w[:1].detach()]), 0).sum(1),
        (4, 6), (6,)),
    "glu_logsigmoid": OpCase(
        lambda x, w: F.glu(x * w, 1) + F.logsigmoid(x[:, 3:] * 2), (4, 6, 5, 5), (6, 1, 1),
        ref=lambda x, w: glu_definition(x * w, 1) + F.logsigmoid(x[:, 3:] * 2)),
    "logit_losses": OpCase(  # a soft target that is a Dual too; class and positive weights
        lambda x, w: F.binary_cross_entropy_with_logits(x * w, torch.sigmoid(w).expand(4, 6))
        + F.binary_cross_entropy_with_logits(
            x, torch.linspace(0, 1, 24, dtype=x.dtype).reshape(4, 6),
            torch.linspace(0.2, 1, 6, dtype=x.dtype), reduction="sum",
            pos_weight=torch.linspace(0.5, 2, 6, dtype=x.dtype))
        + F.binary_cross_entropy_with_logits(x, torch.sigmoid(x * w), reduction="none",
                                             pos_weight=torch.linspace(2, 0.5, 6, dtype=x.dtype)),
        (4, 6), (6,)),
    "kl_div": OpCase(  # targets that are Duals (distributions, log-probabilities, others), zeros
        lambda x, w: F.kl_div(F.log_softmax(x * w, 1), torch.softmax(w, 0).expand(4, 6),
                              reduction="batchmean")
        + F.kl_div(x, w.expand(4, 6) * 0.5, reduction="sum", log_target=True)
        + F.kl_div(x * w, torch.sigmoid(x), reduction="mean")  # a target that sums to no 1
        + F.kl_div(x, torch.linspace(0, 1, 24, dtype=x.dtype).reshape(4, 6),
                   reduction="none").sum(1),
        (4, 6), (6,)),
    "cosine_similarity": OpCase(  # operands broadcast along the reduced dim and across it
        lambda x, w: F.cosine_similarity(x * w, w + 1)
        + F.cosine_similarity(x[:, :1], x * w, dim=1, eps=1e-6), (4, 6), (6,)),
    "spreads_and_means": OpCase(_spreads_and_means, (4, 6), (6,)),
    "prelu": OpCase(lambda x, w: F.prelu(x, w) + F.prelu(x - x.detach(), w[:1]),  # ties at 0
                    (4, 6, 5, 5), (6,)),
    "regression_losses": OpCase(  # l1 at ties (x against itself detached): slope 0
        lambda x, w: F.mse_loss(x, w.expand(4, 6)) + F.l1_loss(x * w, x.detach(), reduction="sum")
        + F.mse_loss(w, x[0], reduction="none") + F.l1_loss(x * 1.0, x.detach()), (4, 6), (6,)),
    "activations": OpCase(lambda x, w: F.mish(F.gelu(F.elu(F.leaky_relu(x * w, 0.1), 0.7)))
                          + F.hardswish(x * 4) * F.hardsigmoid(w * 4), (4, 6), (6,)),
    # (CELU's alpha 0.7, whose reciprocal torch takes of its float32 rounding)
    "more_activations": OpCase(lambda x, w: F.selu(x * w) + F.celu(x, 0.5) * w + F.celu(x, 0.7)
                               + F.hardshrink(x * 2) + F.softshrink(x * w, 0.3) + torch.erf(x * w),
                               (4, 6), (6,)),
    "relu6_in_place": OpCase(lambda x, w: F.relu6((x * w * 8).clone(), inplace=True), (4, 6),
                             (6,)),
    "norms_p1_frobenius": OpCase(lambda x, w: torch.norm(x * w, p=1, dim=1) + (x * w).norm(),
                                 (4, 6), (6,), on_rules=False),
    "products_reversed": OpCase(lambda x, w: torch.einsum("ii->", x * w) + (w @ x).sum()
                                + (1 / (2 + x * x) - w).sum(), (6, 6), (6,)),
    "index_advanced": OpCase(lambda x, w: (x * w)[torch.tensor([0, 2, 2]), 1:5:2], (4, 6),
                             (6,)),
    "assign_strided_rows": OpCase(_assign_rows, (4, 6), (6,)),
    "clamps_one_side": OpCase(_clamps_one_side, (4, 6), (6,)),
    "selections": OpCase(_selections, (4, 6), (6,)),
    "masked_fills": OpCase(_masked_fills, (4, 6), (6,)),
    "gathers": OpCase(_gathers, (4, 6), (6,)),
    "index_adds": OpCase(_index_adds, (4, 6), (6,)),
    "exp_log1p_sign": OpCase(lambda x, w: torch.log1p((x * w).abs()) + torch.expm1(x * w)
                             + torch.exp2(x) * w + torch.sign(x) * w, (4, 6), (6,)),
    "linear_maps": OpCase(_linear_maps, (2, 4, 6, 6), (4, 1, 1)),
    "selecting_pools": OpCase(_selecting_pools, (2, 4, 6, 6), (4, 1, 1)),
    "probability_losses": OpCase(_probability_losses, (4, 6), (6,)),
    "trig_hyperbolic_logs": OpCase(_trig_hyperbolic_logs, (4, 6), (6,)),
    "rearrangements": OpCase(_rearrangements, (4, 6), (6,)),
    "recurrent_layers": OpCase(_recurrent_layers, (3, 2, 4), (12, 4),
                               ref=_on_composite_rnn_kernels),
    "attention_causal": OpCase(
        lambda x, w: F.scaled_dot_product_attention(x, x * w, x, is_causal=True),
        (2, 3, 5, 4), (4,), ref=lambda x, w: math_attention(x, x * w, x, causal=True)),
}


def inputs(case: OpCase, slots: int = 2, seed: int = 0, dtype=torch.float32):
    """``x, w`` and their stacked tangents ``xt, wt`` (``slots`` each) for a row."""
    g = torch.Generator().manual_seed(seed)
    draw = lambda *shape: torch.randn(shape, generator=g, dtype=dtype)
    return (draw(*case.x_shape), draw(*case.w_shape), draw(slots, *case.x_shape),
            draw(slots, *case.w_shape))
