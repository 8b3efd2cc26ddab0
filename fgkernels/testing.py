"""The forward-mode oracle of fgkernels' tests and benchmarks: PyTorch's own forward-mode AD.

``forward_ad_jvp`` evaluates a function of plain tensors with ``torch.autograd.forward_ad``,
once per tangent slot, and returns the primal output and the stacked tangents, the layout a
``Dual`` carries. It is the reference every fgkernels rule is checked against.
"""
from __future__ import annotations

import contextlib
import copy
import random
from collections.abc import Iterator, Sequence
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.utils import _pytree as pytree

from .dual import Dual
from .dual.passes import dual_pass
from .dual.tangents import clear_tangents, random_tangents, set_tangents
from .rules.fallback import fallback_ops

__all__ = ["forward_ad_jvp", "model_jvp", "model_jvp_in_place", "compare_with_forward_ad",
           "oracle_mode", "round_to_tf32", "reads_padding_only"]

Tensor = torch.Tensor


def forward_ad_jvp(fn: Callable[..., Any], primals: Sequence[Tensor],
                   tangents: Sequence[Optional[Tensor]]) -> tuple[Any, Any]:
    """``fn(*primals)`` and its tangents by forward_ad, for stacked tangents.

    ``tangents[i]`` is None (argument i is constant) or ``(T, *primals[i].shape)``; every stack
    has the same T. Returns ``(output, tangent)`` with the output's structure, each tangent
    stacked ``(T, *output.shape)`` (zeros where the output does not depend on the inputs).
    """
    count = {t.shape[0] for t in tangents if t is not None}
    if len(count) != 1:
        raise ValueError(f"forward_ad_jvp: every tangent stack needs the same T >= 1, got "
                         f"{sorted(count)}")
    (T,) = count
    primal_out, spec, slots = None, None, []
    for s in range(T):
        with fwAD.dual_level():
            args = [p if t is None else fwAD.make_dual(p, t[s])
                    for p, t in zip(primals, tangents)]
            leaves, spec = pytree.tree_flatten(fn(*args))
            pairs = [fwAD.unpack_dual(v) if isinstance(v, Tensor) else (v, None) for v in leaves]
        if primal_out is None:
            primal_out = pytree.tree_unflatten([p for p, _ in pairs], spec)
        slots.append([(torch.zeros_like(p) if t is None else t) if isinstance(p, Tensor)
                      else None for p, t in pairs])
    stacked = [None if ts[0] is None else torch.stack(ts) for ts in zip(*slots)]
    return primal_out, pytree.tree_unflatten(stacked, spec)


def round_to_tf32(t: Optional[Tensor], truncate: bool = False) -> Optional[Tensor]:
    """``t`` rounded to TF32 (float32 with 10 mantissa bits), in its own dtype and layout: to
    nearest, ties to even, as cuDNN converts its operands, or, with ``truncate``, the low 13 bits
    dropped, as tensor cores read a float32 operand handed to them unconverted (Triton's TF32
    dots). Run an oracle on rounded operands to get the error a TF32 product cannot avoid."""
    if t is None:
        return None
    bits = t.float().view(torch.int32)
    if not truncate:
        # Half a unit of the 13 dropped bits (less one, plus the kept bit's parity: ties go to
        # even); the sign bit is untouched for finite values.
        bits = bits + 0xFFF + ((bits >> 13) & 1)
    return (bits & ~0x1FFF).view(torch.float32).to(t.dtype)


def reads_padding_only(size: int, kernel: int, stride: int, padding: int,
                       dilation: int = 1) -> bool:
    """Whether every output position of a convolution along an axis of ``size`` has all its
    taps in the padding (its output is the bias alone). torch's oneDNN convolution kills the
    process there on an x86 CPU for a float32 channels_last input with a bias and a batch of 2
    or more when the axis is the width: random draws of tests keep out of it."""
    out = (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    return not any(0 <= o * stride - padding + j * dilation < size
                   for o in range(out) for j in range(kernel))


# torch's recurrent functions, as torch.nn's RNN layers call them (``torch._VF.<name>``)
_RECURRENT = ("lstm", "gru", "rnn_tanh", "rnn_relu")


class _PackPaddedSequence(torch.autograd.Function):
    """``torch._VF._pack_padded_sequence`` with its forward-mode derivative: the tangent packed
    as the input is (packing selects elements)."""

    @staticmethod
    def forward(input: Tensor, lengths: Tensor, batch_first: bool):
        return torch._C._VariableFunctions._pack_padded_sequence(input, lengths, batch_first)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, ctx.lengths, ctx.batch_first = inputs
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def jvp(ctx, input_t: Tensor, *_):
        return _PackPaddedSequence.forward(input_t, ctx.lengths, ctx.batch_first)[0], None


class _PadPackedSequence(torch.autograd.Function):
    """``torch._VF._pad_packed_sequence`` with its forward-mode derivative: the tangent padded
    as the data is, with zeros (the padding is a constant)."""

    @staticmethod
    def forward(data: Tensor, batch_sizes: Tensor, batch_first: bool, padding_value: float,
                total_length: int):
        return torch._C._VariableFunctions._pad_packed_sequence(
            data, batch_sizes, batch_first, padding_value, total_length)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, ctx.batch_sizes, ctx.batch_first, _, ctx.total_length = inputs
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def jvp(ctx, data_t: Tensor, *_):
        return _PadPackedSequence.forward(data_t, ctx.batch_sizes, ctx.batch_first, 0.0,
                                          ctx.total_length)[0], None


def _on_composite_kernels(func: Callable) -> Callable:
    """``func`` run with oneDNN off: on torch's composite CPU kernels."""
    def call(*args, **kwargs):
        enabled = torch._C._get_mkldnn_enabled()
        torch._C._set_mkldnn_enabled(False)
        try:
            return func(*args, **kwargs)
        finally:
            torch._C._set_mkldnn_enabled(enabled)
    return call


@contextlib.contextmanager
def oracle_mode(exact_hardsigmoid: bool = False) -> Iterator[None]:
    """forward_ad where torch's own kernels have no forward-mode derivative: attention by its
    math kernel (the fused CPU kernel has none), weight normalisation written out as
    ``g·v/‖v‖`` (its fused kernel has none), the recurrent layers on torch's composite kernels
    (oneDNN's, which a float32 or bfloat16 RNN takes on the CPU, has none), and packing and
    padding a packed sequence with a derivative (torch's ops have none; both are linear in
    their data).

    ``exact_hardsigmoid``: hardsigmoid's slope is 1/6 of the input's dtype, as a compiled pass
    computes it (Inductor's decomposition of its derivative). Torch's CPU kernel of that
    derivative, which forward_ad and the eager pass call, multiplies by float32's 1/6 at every
    precision: 3e-8 relative in float64."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    fused, hardsigmoid = torch._weight_norm, F.hardsigmoid
    fast_mha = torch.backends.mha.get_fastpath_enabled()
    torch._weight_norm = lambda v, g, dim=0: v * (g / torch.norm_except_dim(v, 2, dim))
    if exact_hardsigmoid:
        F.hardsigmoid = _hardsigmoid_of_exact_slope
    torch.backends.mha.set_fastpath_enabled(False)  # the fused kernel has no forward AD
    replacements = {name: _on_composite_kernels(getattr(torch._VF, name)) for name in _RECURRENT}
    replacements.update(_pack_padded_sequence=_PackPaddedSequence.apply,
                        _pad_packed_sequence=_PadPackedSequence.apply)
    patched = {name: torch._VF.__dict__.get(name) for name in replacements}
    for name, replacement in replacements.items():
        setattr(torch._VF, name, replacement)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch._weight_norm, F.hardsigmoid = fused, hardsigmoid
        torch.backends.mha.set_fastpath_enabled(fast_mha)
        for name, before in patched.items():
            if before is None:
                delattr(torch._VF, name)
            else:
                setattr(torch._VF, name, before)


_hardsigmoid = F.hardsigmoid


def _hardsigmoid_of_exact_slope(input: Tensor, inplace: bool = False) -> Tensor:
    # torch's primal, plus a term whose value is exactly 0 and whose tangent is ẋ/6 strictly
    # between -3 and 3 (0 elsewhere and at a NaN x, as torch's kernel selects)
    inside = (input > -3) & (input < 3)
    x = input.detach()
    y = _hardsigmoid(x) + torch.where(inside, (input - x) / 6, 0.0)
    return input.copy_(y) if inplace else y


def model_jvp(model: torch.nn.Module, args: Sequence[Any],
              arg_tangents: Sequence[Optional[Tensor]],
              param_tangents: Optional[dict[str, Tensor]] = None) -> tuple[Any, Any]:
    """``model(*args)`` and its tangents by forward_ad (in ``oracle_mode``), on a deep copy of
    the model (its buffers untouched): ``arg_tangents[i]`` stacks ``(T, ...)`` tangents of
    ``args[i]`` (None: constant), ``param_tangents`` stacks of parameters by name (a tied
    parameter by any of its names). A closure the model holds is not copied, and reads the
    model's own parameters: for such a model, ``model_jvp_in_place``."""
    return model_jvp_in_place(copy.deepcopy(model), args, arg_tangents, param_tangents)


def compare_with_forward_ad(model: torch.nn.Module, inputs: Union[Tensor, Sequence[Any]],
                            num_tangents: int = 1, seed: int = 0,
                            run: Optional[Callable[..., Any]] = None,
                            exact_hardsigmoid: bool = False) -> dict[str, Any]:
    """Run ``model``'s dual pass, every parameter and floating or complex input carrying
    ``num_tangents`` random tangents (other inputs, such as lengths or token ids, are passed as
    they are), and the same pass by forward_ad (``model_jvp_in_place``), both from the same
    buffers and random state. Returns the relative errors of the outputs and their tangents
    (every floating or complex output, nested ones included) and of the buffers after the pass,
    and the ops that took the forward-AD fallback. ``inputs`` is the model's positional inputs
    (a single tensor: the one input). No copy of the model is made (large models fit).
    The tangents are drawn on the model's device (its first parameter's, else the first
    input's). ``run`` calls the model for the dual pass (``model`` itself by default; e.g.
    ``fgkernels.compile(model)`` checks the compiled pass, whose hardsigmoid slope is exact:
    ``exact_hardsigmoid`` gives the oracle that slope, see ``oracle_mode``). A model whose
    inputs are all integers (token ids) runs its pass inside ``fgkernels.dual_pass(model)``."""
    if isinstance(inputs, Tensor):
        inputs = (inputs,)
    elif not isinstance(inputs, (tuple, list)):
        raise TypeError(f"compare_with_forward_ad: inputs must be a tensor or a sequence of the "
                        f"model's positional inputs, got {type(inputs).__name__}")
    if run is not None and not callable(run):
        raise TypeError(f"compare_with_forward_ad: run must be callable, got "
                        f"{type(run).__name__}")
    first_input = next((x for x in inputs if isinstance(x, Tensor)), torch.empty(0))
    device = next(model.parameters(), first_input).device
    g = torch.Generator(device=device).manual_seed(seed)
    tangents = random_tangents(model, num_tangents=num_tangents, generator=g)
    clear_tangents(model)
    input_tangents = [torch.randn(num_tangents, *x.shape, generator=g, dtype=x.dtype,
                                  device=x.device) if _inexact(x) else None
                      for x in inputs]
    # With no floating or complex input (a language model's token ids) the pass runs inside
    # dual_pass(model), the parameters bringing the tangents in.
    no_dual_input = all(t is None for t in input_tangents)
    if no_dual_input and not tangents:
        raise ValueError("compare_with_forward_ad: no floating or complex input and no "
                         "parameter: nothing carries a tangent")
    buffers = dict(model.named_buffers())
    start = {k: v.clone() for k, v in buffers.items()}
    caches = _ModuleCaches(model)
    _seed_every_generator(seed)  # both passes draw the same random numbers (dropout, masks)
    y, yt = model_jvp_in_place(model, inputs, input_tangents, tangents, exact_hardsigmoid)
    expected_buffers = {k: v.clone() for k, v in buffers.items()}
    with torch.no_grad():
        for k, v in buffers.items():
            v.copy_(start[k])
    caches.restore()  # what the oracle cached (LeViT's attention biases) goes
    before = fallback_ops()
    _seed_every_generator(seed)
    set_tangents(model, tangents)
    try:
        with dual_pass(model) if no_dual_input else contextlib.nullcontext():
            out = (run or model)(*[x if t is None else Dual(x, t)
                                   for x, t in zip(inputs, input_tangents)])
    finally:
        clear_tangents(model)
    fallback = {k: v - before.get(k, 0) for k, v in fallback_ops().items()
                if v > before.get(k, 0)}
    is_output = lambda v: isinstance(v, Dual) or (isinstance(v, Tensor) and _inexact(v))
    flat_out = [v for v in pytree.tree_leaves(out, is_leaf=lambda v: isinstance(v, Dual))
                if is_output(v)]
    pairs = [(p, t) for p, t in zip(pytree.tree_leaves(y), pytree.tree_leaves(yt))
             if is_output(p)]
    if len(flat_out) != len(pairs):
        raise AssertionError(f"the dual pass gave {len(flat_out)} floating outputs, "
                             f"forward_ad {len(pairs)}")
    primal = max(_rel(o.primal if isinstance(o, Dual) else o, p)
                 for o, (p, _) in zip(flat_out, pairs))
    tangent = max(_rel(o.tangents if isinstance(o, Dual) and o.tangents is not None
                       else torch.zeros_like(t), t) for o, (_, t) in zip(flat_out, pairs))
    return dict(primal=primal, tangent=tangent, buffers=_buffer_error(buffers, expected_buffers),
                fallback=fallback)


def _buffer_error(buffers: dict[str, Tensor], expected: dict[str, Tensor]) -> float:
    """The largest relative error of one module's floating buffers taken together. Together:
    a batch norm's running mean of a centred input is rounding noise (~1e-17) whose own relative
    error means nothing; measured against the module's running variance beside it, it does."""
    by_module: dict[str, list[str]] = {}
    for k, v in buffers.items():
        if v.is_floating_point():
            by_module.setdefault(k.rpartition(".")[0], []).append(k)
    flat = lambda source, names: torch.cat([source[k].detach().double().flatten()
                                            for k in names])
    return max([_rel(flat(buffers, names), flat(expected, names))
                for names in by_module.values()] or [0.0])


def _seed_every_generator(seed: int) -> None:
    """Seed the generators a model may draw from: torch's, Python's ``random`` and NumPy's
    global one (transformers' audio models draw their SpecAugment masks from ``np.random``)."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


class _RandomStates:
    """The states of the generators a model may draw from (torch's on the CPU and on the given
    CUDA devices, Python's ``random``, NumPy's global one), as they are now; ``restore`` puts
    them back."""

    def __init__(self, devices: Sequence[str]):
        self.devices = list(devices)
        self.cpu = torch.get_rng_state()
        self.cuda = [torch.cuda.get_rng_state(d) for d in self.devices]
        self.python = random.getstate()
        self.numpy = np.random.get_state()

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for d, state in zip(self.devices, self.cuda):
            torch.cuda.set_rng_state(state, d)
        random.setstate(self.python)
        np.random.set_state(self.numpy)


class _ModuleCaches:
    """The dicts ``model``'s modules hold as public attributes (caches), as they are now:
    ``restore()`` puts each back with this content, and drops those made since (a cache a
    forward creates on its first call)."""

    def __init__(self, model: torch.nn.Module):
        self.modules = list(model.modules())
        self.saved = [{k: (v, dict(v)) for k, v in m.__dict__.items() if _is_cache(k, v)}
                      for m in self.modules]

    def restore(self) -> None:
        for m, saved in zip(self.modules, self.saved):
            for k in [k for k, v in m.__dict__.items() if _is_cache(k, v) and k not in saved]:
                del m.__dict__[k]
            for k, (cache, content) in saved.items():
                cache.clear()
                cache.update(content)
                m.__dict__[k] = cache


def _is_cache(name: str, value) -> bool:
    return not name.startswith("_") and type(value) is dict


def _inexact(v) -> bool:
    """Whether ``v`` has tangents: a floating or complex tensor (not lengths, token ids, masks
    or a Python value)."""
    return isinstance(v, Tensor) and (v.is_floating_point() or v.is_complex())


def _rel(a: Tensor, b: Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64 (0 for empty tensors)."""
    if not b.numel():
        return 0.0
    a, b = a.detach().to(torch.complex128 if b.is_complex() else torch.float64), \
        b.detach().to(torch.complex128 if b.is_complex() else torch.float64)
    return float((a - b).abs().norm() / b.abs().norm().clamp_min(1e-300))


def model_jvp_in_place(model: torch.nn.Module, args: Sequence[Any],
                       arg_tangents: Sequence[Optional[Tensor]],
                       param_tangents: Optional[dict[str, Tensor]] = None,
                       exact_hardsigmoid: bool = False) -> tuple[Any, Any]:
    """``model_jvp`` on ``model`` itself (its buffers updated, as a training pass updates
    them), in ``oracle_mode(exact_hardsigmoid)``. forward_ad runs the model once per tangent
    slot: each run starts from the buffers and the random state the call found, so that the
    model is updated once (running statistics) and every slot sees the same random draws
    (dropout), as in one dual pass, and with the caches its modules hold as they were (LeViT's
    attention biases: a slot must not take the bias, and tangent, another slot cached)."""
    param_tangents = dict(param_tangents or {})
    params = dict(model.named_parameters(remove_duplicate=False))
    names = list(param_tangents)
    tensor_args = [i for i, a in enumerate(args) if isinstance(a, Tensor)]
    buffers = list(model.buffers())
    start = [b.clone() for b in buffers]
    devices = sorted({str(t.device) for t in [*buffers, *params.values()]
                      if t.device.type == "cuda"})
    rng = _RandomStates(devices)
    caches = _ModuleCaches(model)

    def call(*values):
        with torch.no_grad():
            for b, v in zip(buffers, start):
                b.copy_(v)
        caches.restore()
        rng.restore()
        call_args = list(args)
        for i, v in zip(tensor_args, values):
            call_args[i] = v
        # Each parameter becomes a dual tensor in place (its own values copied onto itself, the
        # tangent with them), so that whatever reads it, however it reaches it (its module, a
        # list or closure of the model's own), reads the tangent; leaving the level drops it.
        with torch.no_grad():
            for n, v in zip(names, values[len(tensor_args):]):
                # (the same values: an autograd graph that saved the parameter stays valid)
                with torch.autograd.grad_mode._unsafe_preserve_version_counter(params[n]):
                    params[n].copy_(v)
        return model(*call_args)

    primals = [args[i] for i in tensor_args] + [params[n].detach() for n in names]
    tangents = [arg_tangents[i] for i in tensor_args] + [param_tangents[n] for n in names]
    with oracle_mode(exact_hardsigmoid):
        try:
            return forward_ad_jvp(call, primals, tangents)
        finally:
            caches.restore()  # no slot's cache (a dual tensor of a level gone) outlives it
