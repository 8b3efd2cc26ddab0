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
forward_ad fails there; these rules need none. The packed-sequence forms are refused with a
clear error: torch's forward mode has no derivative for packing, nor its functional transforms
for the packed layers.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch

from ..dual.value import Dual, implements
from .layers import dropout, linear
from .operands import as_dual

Tensor = torch.Tensor


def _lstm_cell(gates: Dual, h: Dual, c: Dual, w_hr: Optional[Dual]) -> tuple[Dual, Dual]:
    i, f, g, o = gates.chunk(4, -1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    return (h if w_hr is None else linear(h, w_hr)), c


def _gru_cell(gi: Dual, gh: Dual, h: Dual) -> Dual:
    ir, iz, in_ = gi.chunk(3, -1)
    hr, hz, hn = gh.chunk(3, -1)
    r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
    n = torch.tanh(in_ + r * hn)
    return n + z * (h - n)


def _direction(mode: str, x: Dual, h: Dual, c: Optional[Dual], weights: Sequence,
               has_biases: bool, reverse: bool) -> tuple[Dual, Dual, Optional[Dual]]:
    """One layer in one direction over x (L, N, E) from the states h, c (N, H): its outputs
    (L, N, H_out) and final states."""
    w_ih, w_hh = weights[0], weights[1]
    b_ih, b_hh = (weights[2], weights[3]) if has_biases else (None, None)
    w_hr = weights[4 if has_biases else 2] if len(weights) in (3, 5) else None
    gi = linear(x, w_ih, b_ih)  # the input part of every step, one product
    steps = range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])
    outputs = [None] * x.shape[0]
    for t in steps:
        gh = linear(h, w_hh, b_hh)
        if mode == "LSTM":
            h, c = _lstm_cell(gi[t] + gh, h, c, w_hr)
        elif mode == "GRU":
            h = _gru_cell(gi[t], gh, h)
        else:
            h = (torch.tanh if mode == "RNN_TANH" else torch.relu)(gi[t] + gh)
        outputs[t] = h
    return torch.stack(outputs), h, c


def _recurrent(mode: str, input, hx, params: Sequence, has_biases: bool, num_layers: int,
               dropout_p: float, train: bool, bidirectional: bool, batch_first: bool):
    name = mode.lower()
    x = as_dual(input, name)
    if x.dim() != 3:
        raise ValueError(f"{name}: expected a 3-d input (sequence, batch, features; batch first "
                         f"with batch_first), got shape {tuple(x.shape)}")
    directions = 2 if bidirectional else 1
    if len(params) % (num_layers * directions):
        raise ValueError(f"{name}: {len(params)} weights do not split into {num_layers} layers "
                         f"of {directions} direction(s)")
    per = len(params) // (num_layers * directions)
    weights = [as_dual(p, name) for p in params]
    h0, c0 = (hx[0], hx[1]) if mode == "LSTM" else (hx, None)
    h0 = as_dual(h0, name)
    c0 = None if c0 is None else as_dual(c0, name)
    if batch_first:
        x = x.transpose(0, 1)
    h_n, c_n = [], []
    for layer in range(num_layers):
        outputs = []
        for direction in range(directions):
            k = layer * directions + direction
            out, h, c = _direction(mode, x, h0[k], None if c0 is None else c0[k],
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


def _rule(func, mode: str, list_at: int, returns: str):
    """The rule of ``func`` (torch.lstm, torch.gru, ...): its padded form unrolled
    (``_recurrent``); its packed form refused."""

    @torch.no_grad()
    def rule(*args, **kwargs):
        if _packed(args, list_at):
            raise NotImplementedError(
                f"torch.{func.__name__} on a packed sequence: fgkernels has no rule for it, and "
                "torch's forward mode cannot differentiate packing; pass the padded sequence "
                "(torch.nn.utils.rnn.pad_packed_sequence) instead")
        return _recurrent(mode, *args, **kwargs)

    rule.__doc__ = f"Dual ``torch.{func.__name__}``: ``{returns}``."
    return implements(func)(rule)


lstm = _rule(torch.lstm, "LSTM", 1, "(output, h_n, c_n)")
gru = _rule(torch.gru, "GRU", 2, "(output, h_n)")
rnn_tanh = _rule(torch.rnn_tanh, "RNN_TANH", 2, "(output, h_n)")
rnn_relu = _rule(torch.rnn_relu, "RNN_RELU", 2, "(output, h_n)")
