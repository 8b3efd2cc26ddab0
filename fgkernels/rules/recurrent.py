"""Recurrent layers on Duals: ``torch.lstm``, ``torch.gru``, ``torch.rnn_tanh`` and
``torch.rnn_relu`` (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``), unrolled into their cells, every step
made of the ops whose rules give its tangent. With the input part gᵢ = x Wᵢₕᵀ + bᵢₕ (one product
for the whole sequence) and the hidden part gₕ = h Wₕₕᵀ + bₕₕ of each step:

    RNN:   h' = act(gᵢ + gₕ)                                       (act: tanh or relu)
    LSTM:  i, f, g, o = chunk₄(gᵢ + gₕ),   c' = σ(f) c + σ(i) tanh(g),   h' = σ(o) tanh(c')
           (h' W_hrᵀ with ``proj_size``)
    GRU:   r = σ(gᵢʳ + gₕʳ),  z = σ(gᵢᶻ + gₕᶻ),  n = tanh(gᵢⁿ + r gₕⁿ),   h' = n + z (h − n)

Layers stack as torch stacks them (the reverse direction reads the sequence backwards; its
outputs sit beside the forward ones), with dropout on every layer's output but the last when
training (drawn by the dropout rule: the same distribution as torch's, not its draw). torch's
forward mode has no derivative for oneDNN's kernel, which a float32 LSTM takes on the CPU, so
forward_ad fails there; these rules need none.

Packed sequences (``nn.utils.rnn.pack_padded_sequence``), which torch's forward mode cannot
differentiate, are served too: packing and padding move every tangent slot as they move the
primal (``torch._pack_padded_sequence``, ``torch._pad_packed_sequence``: torch's own op with the
slots as trailing features; padding gets a zero tangent), and the packed form of each layer runs
step t on the first ``batch_sizes[t]`` sequences (sorted longest first): a sequence that has
ended keeps its last state, which is its final one; in the reverse direction a sequence joins
at its last step from its initial state.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch

from ..dual import slots as _slots
from ..dual.dynamo import eager_under_compile
from ..dual.rule_table import implements
from ..dual.value import Dual
from .layers import dropout, linear
from .operands import as_dual, parts

Tensor = torch.Tensor
_aten = torch.ops.aten


def _lstm_cell(gates: Dual, c: Dual, w_hr: Optional[Dual]) -> tuple[Dual, Dual]:
    """The LSTM cell from its gates' pre-activations and cell state, as one rule: the primal
    as torch's cell computes it, the tangents by the chain rule written out over all slots
    (σ' = σ(1 − σ), tanh' = 1 − tanh²), not a Dual op for each of the cell's dozen terms:

        ċ' = σ'(f) c ḟ + σ'(i) tanh(g) i̇ + σ(i) tanh'(g) ġ + σ(f) ċ
        ḣ' = σ'(o) tanh(c') ȯ + σ(o) tanh'(c') ċ'

    Each coefficient is computed at the primal's precision and rounded once to the tangents'."""
    (gp, gt, g_slots), (cp, ct, c_slots) = parts(gates), parts(c)
    i, f, g, o = gp.chunk(4, -1)
    si, sf, tg, so = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
    c_new = sf * cp + si * tg
    tc = torch.tanh(c_new)
    h_new = so * tc
    plan = _slots.plan([g_slots, c_slots], "lstm")
    if plan.count == 0:
        h_out, c_out = Dual(h_new), Dual(c_new)
    else:
        dtype = plan.dtype_for(gp.dtype)
        like = (lambda v: v) if dtype == gp.dtype else (lambda v: v.to(dtype))
        # σ'(s)·v and tanh'(t)·v as torch's derivative kernels compute them, one kernel each
        d_sigmoid = lambda v, s: like(_aten.sigmoid_backward(v, s))
        d_tanh = lambda v, t: like(_aten.tanh_backward(v, t))
        (g_pos, c_pos), n = plan.positions, plan.count
        c_parts, o_term = [], None
        if gt is not None:
            it, ft, gtt, ot = _slots.cast(gt, dtype).chunk(4, -1)
            c_parts.append((ft * d_sigmoid(cp, sf) + it * d_sigmoid(tg, si)
                            + gtt * d_tanh(si, tg), g_pos))
            o_term = ot * d_sigmoid(tc, so)
        if ct is not None:
            c_parts.append((_slots.cast(ct, dtype) * like(sf), c_pos))
        ct_new = _slots.place(n, c_parts, owned=True)
        ht_new = ct_new * d_tanh(so, tc)
        if o_term is not None:
            _slots.add_into_slots(ht_new, g_pos, o_term)
        h_out = Dual._unchecked(h_new, ht_new, plan.directions, plan.single)
        c_out = Dual._unchecked(c_new, ct_new, plan.directions, plan.single)
    return (h_out if w_hr is None else linear(h_out, w_hr)), c_out


def _gru_cell(gi: Dual, gh: Dual, h: Dual) -> Dual:
    """The GRU cell from the input and hidden parts of its gates and its state, as one rule
    (as ``_lstm_cell``):

        ṙ = σ'(·) (i̇ʳ + ḣʳ),   ż = σ'(·) (i̇ᶻ + ḣᶻ),   ṅ = tanh'(·) (i̇ⁿ + ṙ gₕⁿ + r ḣⁿ)
        ḣ' = (1 − z) ṅ + z ḣ + ż (h − n)

    where i̇, ḣ are the slots of the input and hidden parts. An operand without a slot of the
    output takes zeros there."""
    (ip, it, i_slots), (hp, ht, h_slots), (sp, st, s_slots) = parts(gi), parts(gh), parts(h)
    ir, iz, in_ = ip.chunk(3, -1)
    hr, hz, hn = hp.chunk(3, -1)
    r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
    n = torch.tanh(in_ + r * hn)
    h_new = n + z * (sp - n)
    plan = _slots.plan([i_slots, h_slots, s_slots], "gru")
    if plan.count == 0:
        return Dual(h_new)
    dtype = plan.dtype_for(ip.dtype)
    like = (lambda v: v) if dtype == ip.dtype else (lambda v: v.to(dtype))
    # f'(y)·t: torch's derivative kernel at the tangents' precision, else the slope computed at
    # the primal's and rounded once
    slope = (lambda kernel, t, y: kernel(t, y.expand_as(t))) if dtype == ip.dtype else \
        (lambda kernel, t, y: t * kernel(torch.ones_like(y), y).to(dtype))
    (i_pos, h_pos, s_pos), count = plan.positions, plan.count
    it, ht, st = (_slots.spread(t, pos, count, p, dtype)
                  for t, pos, p in ((it, i_pos, ip), (ht, h_pos, hp), (st, s_pos, sp)))
    (itr, itz, itn), (htr, htz, htn) = it.chunk(3, -1), ht.chunk(3, -1)
    rt = slope(_aten.sigmoid_backward, itr + htr, r)
    zt = slope(_aten.sigmoid_backward, itz + htz, z)
    nt = slope(_aten.tanh_backward, itn + rt * like(hn) + like(r) * htn, n)
    if dtype == ip.dtype:  # torch's composition, (ḣ − ṅ)·z + (h − n)·ż + ṅ (an Inf ṅ: NaN)
        h_t = (st - nt) * z + (sp - n) * zt + nt
    else:  # (1 − z) at the primal's precision: ṅ − z ṅ in a narrower dtype cancels as z nears 1
        h_t = like(1 - z) * nt + like(z) * st + zt * like(sp - n)
    return Dual._unchecked(h_new, h_t, plan.directions, plan.single)


def _direction(mode: str, x: Dual, h: Dual, c: Optional[Dual], weights: Sequence,
               has_biases: bool, reverse: bool) -> tuple[Dual, Dual, Optional[Dual]]:
    """One layer in one direction over x (L, N, E) from the states h, c (N, H): its outputs
    (L, N, H_out) and final states."""
    w_ih, w_hh, b_ih, b_hh, w_hr = _layer_weights(weights, has_biases)
    gi = linear(x, w_ih, b_ih)  # the input part of every step, one product
    steps = range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])
    outputs = [None] * x.shape[0]
    for t in steps:
        h, c = _step(mode, gi[t], h, c, w_hh, b_hh, w_hr)
        outputs[t] = h
    return torch.stack(outputs), h, c


def _layer_weights(weights: Sequence, has_biases: bool) -> tuple:
    """One layer's and direction's weights as torch lists them (w_ih, w_hh[, b_ih, b_hh]
    [, w_hr]): ``(w_ih, w_hh, b_ih, b_hh, w_hr)``, None for those absent."""
    b_ih, b_hh = (weights[2], weights[3]) if has_biases else (None, None)
    w_hr = weights[4 if has_biases else 2] if len(weights) in (3, 5) else None
    return weights[0], weights[1], b_ih, b_hh, w_hr


def _step(mode: str, gi: Dual, h: Dual, c: Optional[Dual], w_hh: Dual, b_hh: Optional[Dual],
          w_hr: Optional[Dual]) -> tuple[Dual, Optional[Dual]]:
    """One step of a cell from its input part ``gi`` and states ``h``, ``c``: the new states."""
    gh = linear(h, w_hh, b_hh)
    if mode == "LSTM":
        return _lstm_cell(gi + gh, c, w_hr)
    if mode == "GRU":
        return _gru_cell(gi, gh, h), None
    return (torch.tanh if mode == "RNN_TANH" else torch.relu)(gi + gh), None


def _packed_direction(mode: str, data: Dual, batch_sizes: list[int], h0: Dual,
                      c0: Optional[Dual], weights: Sequence, has_biases: bool,
                      reverse: bool) -> tuple[Dual, Dual, Optional[Dual]]:
    """One layer in one direction over packed ``data`` (Σ batch_sizes, E), step t holding the
    rows of the first batch_sizes[t] sequences, from the states h0, c0 (N, H): its packed
    outputs and each sequence's final states."""
    w_ih, w_hh, b_ih, b_hh, w_hr = _layer_weights(weights, has_biases)
    gi = linear(data, w_ih, b_ih)  # the input part of every step, one product
    starts = [0]
    for n in batch_sizes[:-1]:
        starts.append(starts[-1] + n)
    outputs = [None] * len(batch_sizes)
    if reverse:
        # From the last step back; a sequence joins at its own last step, from its h0 row.
        h, c = h0[:0], None if c0 is None else c0[:0]
        for t in range(len(batch_sizes) - 1, -1, -1):
            n = batch_sizes[t]
            if n > h.shape[0]:
                h = torch.cat([h, h0[h.shape[0]:n]])
                c = None if c is None else torch.cat([c, c0[c.shape[0]:n]])
            h, c = _step(mode, gi[starts[t]:starts[t] + n], h, c, w_hh, b_hh, w_hr)
            outputs[t] = h
        return torch.cat(outputs), h, c
    # Forward: a sequence that ends leaves its last states, its final ones, among the done.
    h, c, done_h, done_c = h0, c0, [], []
    for t, n in enumerate(batch_sizes):
        if n < h.shape[0]:
            done_h.append(h[n:])
            h = h[:n]
            if c is not None:
                done_c.append(c[n:])
                c = c[:n]
        h, c = _step(mode, gi[starts[t]:starts[t] + n], h, c, w_hh, b_hh, w_hr)
        outputs[t] = h
    h_n = torch.cat([h, *reversed(done_h)]) if done_h else h
    c_n = None if c is None else (torch.cat([c, *reversed(done_c)]) if done_c else c)
    return torch.cat(outputs), h_n, c_n


def _recurrent(mode: str, input, hx, params: Sequence, has_biases: bool, num_layers: int,
               dropout_p: float, train: bool, bidirectional: bool, batch_first: bool = False,
               batch_sizes: Optional[list[int]] = None):
    """The layers over a padded input (``batch_sizes`` None) or a packed one (its data, with
    ``batch_sizes`` the number of sequences at each step)."""
    name = mode.lower()
    x = as_dual(input, name)
    packed = batch_sizes is not None
    if packed and x.dim() != 2:
        raise ValueError(f"{name}: expected packed data of 2 dims (steps of all sequences, "
                         f"features), got shape {tuple(x.shape)}")
    if not packed and x.dim() != 3:
        raise ValueError(f"{name}: expected a 3-d input (sequence, batch, features; batch first "
                         f"with batch_first), got shape {tuple(x.shape)}")
    directions = 2 if bidirectional else 1
    per = len(params) // (num_layers * directions)
    if len(params) % (num_layers * directions) or per - (4 if has_biases else 2) not in (0, 1):
        raise ValueError(f"{name}: {len(params)} weights do not split into {num_layers} layers "
                         f"of {directions} direction(s), each of w_ih, w_hh"
                         f"{', b_ih, b_hh' if has_biases else ''} (and w_hr with proj_size)")
    if not packed and x.shape[1 if batch_first else 0] == 0:
        raise ValueError(f"{name}: expected a sequence length larger than 0, got an input of "
                         f"shape {tuple(x.shape)}")
    weights = [as_dual(p, name) for p in params]
    h0, c0 = (hx[0], hx[1]) if mode == "LSTM" else (hx, None)
    h0 = as_dual(h0, name)
    c0 = None if c0 is None else as_dual(c0, name)
    if batch_first:
        x = x.transpose(0, 1)
    run = (lambda x, *a: _packed_direction(mode, x, batch_sizes, *a)) if packed else \
        (lambda x, *a: _direction(mode, x, *a))
    h_n, c_n = [], []
    for layer in range(num_layers):
        outputs = []
        for direction in range(directions):
            k = layer * directions + direction
            out, h, c = run(x, h0[k], None if c0 is None else c0[k],
                            weights[k * per:(k + 1) * per], has_biases, direction == 1)
            outputs.append(out)
            h_n.append(h)
            c_n.append(c)
        x = outputs[0] if directions == 1 else torch.cat(outputs, -1)
        if train and dropout_p > 0 and layer < num_layers - 1:
            x = dropout(x, dropout_p, True)
    output = x.transpose(0, 1) if batch_first else x
    if mode == "LSTM":
        return output, torch.stack(h_n), torch.stack(c_n)
    return output, torch.stack(h_n)


def _packed(args: tuple, list_at: int) -> bool:
    """True for the packed-sequence form (data, batch_sizes, hx, params, ...), which has a
    tensor at ``list_at``, where the padded form passes a tuple or list (an LSTM's states, the
    other layers' weights)."""
    return len(args) > list_at and not isinstance(args[list_at], (list, tuple))


@eager_under_compile
def _packed_recurrent(mode: str, data, batch_sizes: Tensor, *rest, **kwargs):
    """The packed form, run eagerly under torch.compile as torch's packing is: each step's
    batch size is data."""
    return _recurrent(mode, data, *rest, **kwargs,
                      batch_sizes=[int(n) for n in batch_sizes.tolist()])


def _rule(func, mode: str, list_at: int, returns: str):
    """The rule of ``func`` (torch.lstm, torch.gru, ...) in both its forms: padded
    ``(input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first)``
    and packed ``(data, batch_sizes, hx, params, has_biases, num_layers, dropout, train,
    bidirectional)``."""

    @torch.no_grad()
    def rule(*args, **kwargs):
        if _packed(args, list_at):
            return _packed_recurrent(mode, *args, **kwargs)
        return _recurrent(mode, *args, **kwargs)

    rule.__doc__ = f"Dual ``torch.{func.__name__}``: ``{returns}``."
    return implements(func)(rule)


lstm = _rule(torch.lstm, "LSTM", 1, "(output, h_n, c_n)")
gru = _rule(torch.gru, "GRU", 2, "(output, h_n)")
rnn_tanh = _rule(torch.rnn_tanh, "RNN_TANH", 2, "(output, h_n)")
rnn_relu = _rule(torch.rnn_relu, "RNN_RELU", 2, "(output, h_n)")


@implements(torch._C._nn.pad_sequence)
@torch.no_grad()
def pad_sequence(sequences: Sequence, batch_first: bool = False, padding_value: float = 0.0,
                 padding_side: str = "right") -> Dual:
    """Dual ``nn.utils.rnn.pad_sequence`` (also ``pack_sequence``'s first step): sequences
    (Lᵢ, *F) padded to (max L, N, *F) ((N, max L, *F) batch first), every tangent slot padded
    as the primal, with zeros (the padding is a constant); a slot that some sequence lacks is
    zero in its rows."""
    duals = [as_dual(s, "pad_sequence") for s in sequences]
    padded = torch._C._nn.pad_sequence([d.primal for d in duals], batch_first, padding_value,
                                       padding_side)
    plan = _slots.plan([d.slot_operand() for d in duals], "pad_sequence")
    if plan.count == 0:
        return Dual(padded)
    # Each sequence's slots beside its features, (Lᵢ, *F, T), where padding carries them along
    # with each row.
    stacks = [_slots.spread(d.tangents, pos, plan.count, d.primal, plan.dtype).movedim(0, -1)
              for d, pos in zip(duals, plan.positions)]
    stack = torch._C._nn.pad_sequence(stacks, batch_first, 0.0, padding_side).movedim(-1, 0)
    return Dual._unchecked(padded, stack, plan.directions, plan.single)


@implements(torch._pack_padded_sequence)
@eager_under_compile  # sizes that are data, as torch's packing under torch.compile
@torch.no_grad()
def pack_padded_sequence(input, lengths: Tensor, batch_first: bool) -> tuple[Dual, Tensor]:
    """Dual ``torch._pack_padded_sequence`` (``nn.utils.rnn.pack_padded_sequence``'s step):
    ``(data, batch_sizes)``, every tangent slot packed as the primal."""
    x = as_dual(input, "pack_padded_sequence")
    data, batch_sizes = torch._pack_padded_sequence(x.primal, lengths, batch_first)
    stack = x.tangents
    if stack is not None:
        # The slots beside the features, (T, L, N, *F) as (L, N, T, *F) ((N, L, T, *F) batch
        # first), where packing carries them along with each row.
        stack, _ = torch._pack_padded_sequence(stack.movedim(0, 2), lengths, batch_first)
        stack = stack.movedim(1, 0)
    return x.with_tangents(data, stack), batch_sizes


@implements(torch._pad_packed_sequence)
@eager_under_compile
@torch.no_grad()
def pad_packed_sequence(data, batch_sizes: Tensor, batch_first: bool, padding_value: float,
                        total_length: int) -> tuple[Dual, Tensor]:
    """Dual ``torch._pad_packed_sequence`` (``nn.utils.rnn.pad_packed_sequence``'s step):
    ``(padded, lengths)``, every tangent slot padded as the primal, with zeros (the padding is
    a constant)."""
    d = as_dual(data, "pad_packed_sequence")
    padded, lengths = torch._pad_packed_sequence(d.primal, batch_sizes, batch_first,
                                                 padding_value, total_length)
    stack = d.tangents
    if stack is not None:
        stack, _ = torch._pad_packed_sequence(stack.movedim(0, 1), batch_sizes, batch_first, 0.0,
                                              total_length)
        stack = stack.movedim(2, 0)
    return d.with_tangents(padded, stack), lengths
