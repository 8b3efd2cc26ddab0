"""Softmax and attention on Duals.

softmax:      y = softmax(x),       ẏ = y ⊙ (ẋ − Σ y ⊙ ẋ)       (sums along ``dim``)
log_softmax:  y = log_softmax(x),   ẏ = ẋ − Σ softmax(x) ⊙ ẋ

Scaled dot-product attention, with S = q·kᵀ·scale + bias (bias: an additive mask, −∞ where a bool
mask or the causal mask excludes), P = softmax(S) (rows with nothing to attend to give 0, as
torch's own kernels do), O = P·v:

    Ṡ = (q̇·kᵀ + q·k̇ᵀ)·scale + ḃias,    Ṗ = P ⊙ (Ṡ − Σ P ⊙ Ṡ),    Ȯ = Ṗ·v + P·v̇

torch has no forward-mode derivative for its fused CPU attention kernel, so forward_ad itself
fails there; this rule needs none. ``F.multi_head_attention_forward`` (``nn.MultiheadAttention``)
is written here in those ops, projections and masks included.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ..dual import slots as _slots
from ..dual.lifting import with_recorded_tangent
from ..dual.rule_table import implements
from ..dual.value import Dual, in_primal_layout
from .layers import dropout, linear
from .operands import as_dual, parts, primal_of
from .products import matmul, matmul_tangents

Tensor = torch.Tensor


# --- softmax --------------------------------------------------------------------------------------
@implements(F.softmax, torch.softmax, torch.Tensor.softmax)
@torch.no_grad()
def softmax(input, dim: Optional[int] = None, _stacklevel: int = 3, dtype=None) -> Dual:
    """Dual softmax along ``dim``."""
    d, dim = _softmax_input(input, "softmax", dim, _stacklevel, dtype)
    y = torch.softmax(d.primal, dim)
    t = d.tangents
    if t is None:
        return d.with_tangents(y, None)
    c = _centred_slots(t, y, dim)  # (a fresh tensor: updated in place)
    # (laid out as y: torch gives a channels_last input's softmax contiguous)
    return d.with_tangents(y, in_primal_layout(c.sub_(_along(y * c, y, dim)).mul_(y)
                                               .to(t.dtype), y))


@implements(F.softmin)
def softmin(input, dim: Optional[int] = None, _stacklevel: int = 3, dtype=None) -> Dual:
    """Dual ``softmin``: ``softmax(−x)``, as torch computes it."""
    return F.softmax(-input, dim, _stacklevel, dtype)


@implements(F.log_softmax, torch.log_softmax, torch.Tensor.log_softmax)
@torch.no_grad()
def log_softmax(input, dim: Optional[int] = None, _stacklevel: int = 3, dtype=None) -> Dual:
    """Dual log-softmax along ``dim``."""
    d, dim = _softmax_input(input, "log_softmax", dim, _stacklevel, dtype)
    y = torch.log_softmax(d.primal, dim)
    t = d.tangents
    if t is None:
        return d.with_tangents(y, None)
    c = _centred_slots(t, y, dim)  # (a fresh tensor: updated in place)
    return d.with_tangents(y, in_primal_layout(c.sub_(_along(y.exp() * c, y, dim))
                                               .to(t.dtype), y))


def _along(stack: Tensor, x: Tensor, dim: int) -> Tensor:
    """The slots of ``stack`` summed along x's ``dim`` (kept); a 0-dim x sums one element."""
    return stack.sum(dim + 1, keepdim=True) if x.dim() else stack


def _centred_slots(t: Tensor, y: Tensor, dim: int) -> Tensor:
    """The slots ``t`` in y's precision, their mean along y's ``dim`` taken out (``centred``):
    ẋ − Σ w ⊙ ẋ for weights w that sum to 1 is unchanged by it but for rounding, and a large
    common part of ẋ would cancel there after its rounding (the weights' own rounding, to a
    narrower tangent dtype or in exp(log_softmax), leaves their sum off 1 by a few ulps, times
    that part). A fresh tensor."""
    t = t.to(y.dtype)
    return centred(t, dim + 1) if y.dim() else torch.zeros_like(t)


def centred(t: Tensor, dim: int) -> Tensor:
    """``t`` less its mean along ``dim``, where that mean is finite: a row holding an Inf stays
    as it is, since its mean taken out would make the whole row NaN, where torch's
    ``ẋ − Σ w ⊙ ẋ`` is ∓Inf but at the Inf. A fresh tensor."""
    mean = t.mean(dim, keepdim=True)
    return t - mean.masked_fill_(~mean.isfinite(), 0)


def _softmax_input(input, op: str, dim: Optional[int], stacklevel, dtype) -> tuple[Dual, int]:
    """The input of a softmax (cast to ``dtype`` first, as torch does, its tangent as
    ``Dual.to`` casts it) and the dim it runs along. ``torch.softmax(x, dim, dtype)`` and the
    Tensor method take dtype third, where ``F.softmax`` takes ``_stacklevel``."""
    d = as_dual(input, op)
    if isinstance(stacklevel, torch.dtype):
        dtype = stacklevel
    if dtype is not None:
        d = d.to(dtype)
    x = d.primal
    if dim is None:  # torch's legacy choice for an implicit dim
        dim = 0 if x.dim() in (0, 1, 3) else 1
    n = max(x.dim(), 1)  # a 0-d input has one dim to take, as in torch
    if not -n <= dim < n:
        raise IndexError(f"{op}: dim {dim} is out of range for a tensor of {x.dim()} dims "
                         f"(expected in [{-n}, {n - 1}])")
    return d, dim % n


# --- scaled dot-product attention -----------------------------------------------------------------
def _additive_bias(mask, is_causal: bool, L: int, S: int, like: Tensor):
    """The additive bias of the scores (a Dual when the mask carries a tangent), or None."""
    bias = None
    if is_causal:
        keep = torch.ones(L, S, dtype=torch.bool, device=like.device).tril()
        bias = torch.zeros(L, S, dtype=like.dtype, device=like.device).masked_fill(
            ~keep, float("-inf"))
    if mask is None:
        return bias
    if isinstance(mask, Tensor) and mask.dtype == torch.bool:
        m = torch.zeros(mask.shape, dtype=like.dtype, device=like.device).masked_fill(
            ~mask, float("-inf"))
    else:
        m = mask
    return m if bias is None else m + bias


def _repeat_heads(x, heads: int):
    """Grouped-query attention: each key/value head serves ``heads / kv_heads`` query heads."""
    kv = x.shape[-3]
    return x if kv == heads else x.repeat_interleave(heads // kv, dim=-3)


@implements(F.scaled_dot_product_attention)
@torch.no_grad()
def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False) -> Dual:
    """Dual scaled dot-product attention (arguments as ``F.scaled_dot_product_attention``)."""
    q, k, v = (as_dual(t, "scaled_dot_product_attention") for t in (query, key, value))
    if min(q.dim(), k.dim(), v.dim()) < 2:
        raise ValueError("scaled_dot_product_attention: query, key and value must be at least "
                         f"2-D (..., L or S, E), got {q.dim()}-D, {k.dim()}-D and {v.dim()}-D")
    if enable_gqa:
        if min(q.dim(), k.dim(), v.dim()) < 3 or q.shape[-3] % k.shape[-3] \
                or q.shape[-3] % v.shape[-3]:
            raise ValueError("scaled_dot_product_attention: with enable_gqa, the number of "
                             "heads in key and value must divide the number in query, got "
                             f"{tuple(q.shape)}, {tuple(k.shape)} and {tuple(v.shape)}")
        k, v = _repeat_heads(k, q.shape[-3]), _repeat_heads(v, q.shape[-3])
    mask = parts(attn_mask) if attn_mask is not None else None
    slots = [q.slot_operand(), k.slot_operand(), v.slot_operand(),
             None if mask is None else mask.slots]
    plan = _slots.plan(slots, "scaled_dot_product_attention")
    L, S = q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    mask_primal = None if mask is None else mask.primal
    if plan.count == 0 or dropout_p > 0.0:
        if plan.count == 0:
            return Dual._unchecked(F.scaled_dot_product_attention(
                q.primal, k.primal, v.primal, mask_primal, dropout_p, is_causal, scale=scale),
                None, None, False)
        # Dropout: one mask drawn once for the primal and every slot, the math written out.
        return _attention_math(q, k, v, _additive_bias(attn_mask, is_causal, L, S, q.primal),
                               scale, dropout_p)
    # torch's primal, the written-out tangents (the last product's tangent terms alone), laid
    # out as the primal, which takes the query's layout (heads transposed out of a (B, L, H, D)
    # projection: its ``.transpose(1, 2).reshape(B, L, H·D)`` then views both)
    y = F.scaled_dot_product_attention(q.primal, k.primal, v.primal, mask_primal, 0.0,
                                       is_causal, scale=scale)
    out = _attention_math(q, k, v, _additive_bias(attn_mask, is_causal, L, S, q.primal), scale,
                          0.0, primal=y)
    return out.with_tangents(y, in_primal_layout(out.tangents, y))


def _attention_math(q: Dual, k: Dual, v: Dual, bias, scale: float, dropout_p: float,
                    primal: Optional[Tensor] = None) -> Dual:
    """Attention written in Dual ops (every product, the softmax and the bias by their rules),
    rows with nothing to attend to giving 0; the output's primal ``primal`` where given (the
    last product then computes its tangent alone)."""
    s = matmul(q, k.transpose(-2, -1)) * scale
    if bias is not None:
        s = s + bias
    empty = torch.isneginf(s.primal).all(-1, keepdim=True)
    p = softmax(s, -1)
    # Eagerly the select is skipped when no row is empty; a compiled graph cannot branch on
    # the data, so it always selects.
    if torch.compiler.is_dynamo_compiling() or bool(empty.any()):
        p = torch.where(empty, 0.0, p)
    if dropout_p > 0.0:
        p = dropout(p, dropout_p, True)
    return matmul(p, v) if primal is None else matmul_tangents(p, v, primal)


# --- multi-head attention -------------------------------------------------------------------------
def _as_float_mask(mask, like: Tensor):
    """A bool mask of nn.MultiheadAttention (True: may not attend) as an additive one."""
    if mask is None or not (isinstance(mask, Tensor) and mask.dtype == torch.bool):
        return mask
    return torch.zeros(mask.shape, dtype=like.dtype, device=like.device).masked_fill(
        mask, float("-inf"))


def _pad_last(mask):
    return None if mask is None else F.pad(mask, (0, 1))


@implements(F.multi_head_attention_forward)
@torch.no_grad()
def multi_head_attention_forward(
        query, key, value, embed_dim_to_check: int, num_heads: int, in_proj_weight,
        in_proj_bias, bias_k, bias_v, add_zero_attn: bool, dropout_p: float, out_proj_weight,
        out_proj_bias, training: bool = True, key_padding_mask=None, need_weights: bool = True,
        attn_mask=None, use_separate_proj_weight: bool = False, q_proj_weight=None,
        k_proj_weight=None, v_proj_weight=None, static_k=None, static_v=None,
        average_attn_weights: bool = True, is_causal: bool = False):
    """Dual multi-head attention (arguments and results as ``F.multi_head_attention_forward``:
    sequence-first inputs, ``(output, weights or None)``)."""
    q_in, k_in, v_in = (as_dual(t, "multi_head_attention") for t in (query, key, value))
    # (a mask may be a tensor with a recorded tangent that the pass lifted rather than
    # substituted: a learned bias read from a closure)
    key_padding_mask, attn_mask = map(with_recorded_tangent, (key_padding_mask, attn_mask))
    batched = F._mha_shape_check(q_in.primal, k_in.primal, v_in.primal,
                                 primal_of(key_padding_mask), primal_of(attn_mask), num_heads)
    if not batched:
        q_in, k_in, v_in = q_in.unsqueeze(1), k_in.unsqueeze(1), v_in.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    L, N, E = q_in.shape
    if E != embed_dim_to_check:
        raise ValueError(f"multi_head_attention: expected embedding dim {embed_dim_to_check}, "
                         f"got {E}")
    S_in = k_in.shape[0]
    if k_in.shape[:2] != v_in.shape[:2]:
        raise ValueError("multi_head_attention: key and value must have one length and batch, "
                         f"got {tuple(k_in.shape)} and {tuple(v_in.shape)}")
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (N, S_in):
        raise ValueError(f"multi_head_attention: key_padding_mask must have shape {(N, S_in)} "
                         f"(batch, keys), got {tuple(key_padding_mask.shape)}")
    mask_shape = (L, S_in) if attn_mask is None or attn_mask.dim() == 2 \
        else (N * num_heads, L, S_in)
    if attn_mask is not None and tuple(attn_mask.shape) != mask_shape:
        raise ValueError(f"multi_head_attention: a {attn_mask.dim()}-D attn_mask must have shape "
                         f"{mask_shape}, got {tuple(attn_mask.shape)}")
    for name, mask in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
        # (torch's layer refuses any other dtype before its function sees it; a Dual is floating)
        if isinstance(mask, Tensor) and mask.dtype != torch.bool and not mask.is_floating_point():
            raise TypeError(f"multi_head_attention: {name} must be a bool or floating mask, "
                            f"got {mask.dtype}")
    if E % num_heads:
        raise ValueError(f"multi_head_attention: embedding dim {E} is not divisible by "
                         f"num_heads {num_heads}")
    if is_causal and attn_mask is None:
        raise RuntimeError("multi_head_attention: is_causal is a hint that attn_mask is the "
                           "causal mask; it needs attn_mask")
    # As torch: without a padding mask or weights to return, the hint replaces the mask, and
    # attention is causal over the keys as they stand after the bias and zero keys are added.
    causal = is_causal and key_padding_mask is None and not need_weights
    if causal:
        attn_mask = None
    H, hd = num_heads, E // num_heads
    # parameters as Duals (a tensor with a recorded tangent carries it into its chunks)
    in_proj_weight, in_proj_bias, bias_k, bias_v, q_proj_weight, k_proj_weight, \
        v_proj_weight, static_k, static_v = (
            None if t is None else as_dual(t, "multi_head_attention")
            for t in (in_proj_weight, in_proj_bias, bias_k, bias_v, q_proj_weight,
                      k_proj_weight, v_proj_weight, static_k, static_v))

    # projections
    if use_separate_proj_weight:
        w = (q_proj_weight, k_proj_weight, v_proj_weight)
    else:
        w = in_proj_weight.chunk(3)
    b = (None,) * 3 if in_proj_bias is None else in_proj_bias.chunk(3)
    q, k, v = (linear(t, wi, bi) for t, wi, bi in zip((q_in, k_in, v_in), w, b))

    like = q.primal
    attn_mask = _as_float_mask(attn_mask, like)
    if attn_mask is not None and attn_mask.dim() == 2:
        attn_mask = attn_mask.unsqueeze(0)
    key_padding_mask = _as_float_mask(key_padding_mask, like)
    if bias_k is not None and bias_v is not None:
        k = torch.cat([k, bias_k.repeat(1, N, 1)])
        v = torch.cat([v, bias_v.repeat(1, N, 1)])
        attn_mask, key_padding_mask = _pad_last(attn_mask), _pad_last(key_padding_mask)

    # (L, N, E) -> (N·H, L, hd)
    q = q.reshape(L, N * H, hd).transpose(0, 1)
    k = k.reshape(k.shape[0], N * H, hd).transpose(0, 1) if static_k is None else static_k
    v = v.reshape(v.shape[0], N * H, hd).transpose(0, 1) if static_v is None else static_v
    if add_zero_attn:
        zeros = torch.zeros((N * H, 1, hd), dtype=like.dtype, device=like.device)
        k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros], dim=1)
        attn_mask, key_padding_mask = _pad_last(attn_mask), _pad_last(key_padding_mask)
    S = k.shape[1]
    if key_padding_mask is not None:
        kpm = key_padding_mask.reshape(N, 1, 1, S).expand(-1, H, -1, -1).reshape(N * H, 1, S)
        attn_mask = kpm if attn_mask is None else attn_mask + kpm
    p = dropout_p if training else 0.0

    if need_weights:
        scores = matmul(q * (1.0 / math.sqrt(hd)), k.transpose(-2, -1))
        if attn_mask is not None:
            scores = scores + attn_mask
        weights = softmax(scores, -1)
        if p > 0.0:
            weights = dropout(weights, p, True)
        out = matmul(weights, v)
    else:
        mask4 = None if attn_mask is None else (
            attn_mask.reshape(N, H, -1, S) if attn_mask.shape[0] == N * H
            else attn_mask.unsqueeze(0))
        out = scaled_dot_product_attention(q.reshape(N, H, L, hd), k.reshape(N, H, S, hd),
                                           v.reshape(N, H, S, hd), mask4, p, causal)
        out = out.permute(2, 0, 1, 3)
    out = out.transpose(0, 1).reshape(L * N, E) if need_weights else out.reshape(L * N, E)
    out = linear(out, out_proj_weight, out_proj_bias).reshape(L, N, E)
    if not batched:
        out = out.squeeze(1)
    if not need_weights:
        return out, None
    weights = weights.reshape(N, H, L, S)
    if average_attn_weights:
        weights = weights.mean(1)
    return out, (weights if batched else weights.squeeze(0))
