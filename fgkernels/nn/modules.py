"""Dual modules: torch.nn layers that the dual (forward-mode) pass runs faster.

A model needs no conversion to be exact: any ``nn.Module`` called with a ``Dual`` runs every op
on its rule (or on the forward-AD fallback), its parameters handing out their tangents
(``fgkernels.dual.tangents``). ``convert(model)`` is a speed step that never changes a number: it
swaps layers for twins that fuse Conv→BN→ReLU and BN→ReLU runs (``DualSequential``) and reuse a
plain forward's convolution outputs (``reuse_conv_outputs``). Each ``DualX`` subclasses its
``nn.X`` twin and adds no state: same constructor, parameters, buffers and state_dict keys, and
a plain Tensor input runs the twin's own forward (autograd included).
"""
from __future__ import annotations

import contextlib
import copyreg
import functools
from collections.abc import Iterator
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as torch_module
from torch.nn.modules import transformer
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.utils import parametrize

from .. import functional as DF
from ..dual.module_state import check_module, forward_sets_no_attributes, run_as_during_passes
from ..dual.passes import foreign_module_hooks, in_dual_pass
from ..dual.rule_state import in_rule
from ..dual.value import Dual
from ..rules import attention, pointwise

Tensor = torch.Tensor


class _DirectCall:
    """Mixin of the twins: called with a Dual inside a dual pass, a twin that nothing would
    see called (``_unobserved``) runs its forward directly. torch's module call path, which the
    pass's global hooks keep on its slow branch, costs a small layer more than its arithmetic;
    the pass started at an enclosing module, so its hooks have nothing to do here. A layer
    class with a ``__call__`` of its own is always called through it."""

    def __call__(self, *args, **kwargs):
        if args and isinstance(args[0], Dual) and in_dual_pass() and _unobserved(self):
            return self.forward(*args, **kwargs)
        return super().__call__(*args, **kwargs)

    def __prepare_scriptable__(self):
        raise TypeError(f"torch.jit.script: {type(self).__name__} is a layer fgkernels.convert "
                        f"made (its forward takes Duals, which TorchScript cannot type); script "
                        f"the model before converting it")


def _defines_call(cls: type) -> bool:
    return any("__call__" in vars(c) for c in cls.__mro__
               if c not in (nn.Module, _DirectCall, object))


_defines_call_cached = functools.cache(_defines_call)


def _own_call(cls: type) -> bool:
    """True if a class of ``cls``'s MRO besides ``nn.Module`` defines ``__call__`` (a user's
    layer subclass, converted into a twin or not). Cached, but not while Dynamo traces: it
    would trace through the cache, and warn that it does."""
    return _defines_call(cls) if torch.compiler.is_dynamo_compiling() else _defines_call_cached(cls)


class DualModule(_DirectCall):
    """Mixin of the Dual layers. ``forward`` decides once per call: a Dual input runs
    ``dual_forward`` (by default the layer's own forward, whose ops take their Dual rules), any
    other input the torch.nn layer's own forward."""

    # its dual forward hands each parameter to ops that look up the parameter's tangent (so it
    # needs no substitution, which torch.compile cannot trace)
    reads_parameter_tangents = True

    def forward(self, input, *args, **kwargs):
        if isinstance(input, Dual):
            with in_rule():
                return self.dual_forward(input, *args, **kwargs)
        if isinstance(input, torch.fx.Proxy) and _fx_leaf(type(self)):
            # torch.fx keeps torch.nn's own layers whole (a call_module node) and traces into
            # any other class: the twin stays a node as its torch.nn layer would (traced into,
            # torch's batch norm tests its input's rank, which a Proxy cannot answer).
            return input.tracer.create_proxy("call_module", input.tracer.path_of_module(self),
                                             (input, *args), kwargs)
        return self.plain_forward(input, *args, **kwargs)

    def plain_forward(self, input, *args, **kwargs):
        """The torch.nn layer's own forward (autograd included)."""
        return super().forward(input, *args, **kwargs)

    def dual_forward(self, input: Dual, *args, **kwargs) -> Dual:
        """The layer on a Dual input: its output and tangents."""
        return self.plain_forward(input, *args, **kwargs)


def _fx_leaf(cls: type) -> bool:
    """Whether torch.fx's default tracer keeps a layer of the torch.nn class this twin stands
    for whole: a class of torch.nn's own modules (a twin of a user's subclass is traced into,
    as that subclass is)."""
    layer = next(c for c in cls.__mro__
                 if issubclass(c, nn.Module) and not issubclass(c, _DirectCall))
    return layer.__module__.startswith(("torch.nn", "torch.ao.nn"))


class _KeptOutput(NamedTuple):
    """A plain forward's output kept for a dual call, with what must not have changed."""

    output: Tensor
    input_meta: tuple                  # shape, strides, dtype, device
    training: bool
    params: tuple[Optional[Tensor], ...]  # the weight and bias tensors themselves
    versions: tuple[int, ...]          # of the output and the parameters


def _meta(x: Tensor) -> tuple:
    return x.shape, x.stride(), x.dtype, x.device


class DualConv2d(DualModule, nn.Conv2d):
    """``nn.Conv2d`` that also runs the dual pass: ``ẏ = W*ẋ + Ẇ*x + ḃ``."""

    def plain_forward(self, input):
        out = super().plain_forward(input)
        kept = self.__dict__.get("_fg_kept")
        if kept is not None and isinstance(out, Tensor) and not out.is_inference():
            params = self._parameter_tensors()  # in reuse_conv_outputs
            if params is not None:
                kept.append(_KeptOutput(out.detach(), _meta(input), self.training, params,
                                        _versions(out, params)))
        return out

    def dual_forward(self, input: Dual) -> Dual:
        primal = self._take_kept_output(input)
        if self.padding_mode != "zeros":  # as nn.Conv2d: the input padded first, its tangent too
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return DF.conv2d(input, self.weight, self.bias, self.stride, 0, self.dilation,
                             self.groups, primal=primal)
        return DF.conv2d(input, self.weight, self.bias, self.stride, self.padding, self.dilation,
                         self.groups, primal=primal)

    def _parameter_tensors(self) -> Optional[tuple[Optional[Tensor], ...]]:
        """The weight and bias tensors the layer reads (during a dual pass a parameter with a
        tangent is its Dual: the parameter itself); None when one is computed on each read (a
        parametrization), which no kept output can be checked against."""
        if parametrize.is_parametrized(self):
            return None
        tensors = []
        for p in (self.weight, self.bias):
            if isinstance(p, Dual):
                p = p._parameter()
                if p is None:
                    return None
            tensors.append(p)
        return tuple(tensors)

    def _take_kept_output(self, input: Dual) -> Optional[Tensor]:
        """The output kept by ``reuse_conv_outputs`` for this dual call (the oldest one: a
        layer called twice keeps two), or None when there is none, or when the layer's
        parameters, its mode or the input's layout changed since (then every kept one is
        dropped). The output is handed over: its version is bumped, so that a backward through
        a graph that saved it and runs after the dual call, which may overwrite it, raises."""
        kept = self.__dict__.get("_fg_kept")
        if not kept:
            return None
        k = kept.pop(0)
        params = self._parameter_tensors()
        if (params is None or k.input_meta != _meta(input.primal)
                or k.output.dtype != input.primal.dtype or k.training != self.training
                or any(a is not b for a, b in zip(k.params, params))
                or k.versions != _versions(k.output, params)):
            kept.clear()
            return None
        torch.autograd.graph.increment_version(k.output)
        return k.output


def _versions(out: Tensor, params: tuple[Optional[Tensor], ...]) -> tuple[int, ...]:
    return (out._version, *(p._version for p in params if p is not None))


class _DualBatchNorm(DualModule):
    """The dual forward shared by the batch-norm twins; follows ``_BatchNorm.forward``."""

    def _dual_bn_args(self, x: Optional[Tensor]):
        """(running_mean, running_var, training, momentum factor) as ``_BatchNorm.forward``
        computes them for this call, which counts in ``num_batches_tracked`` only once it has
        run (``_count_call``): a call that raises changes no state. ``x`` (None when a fused
        convolution produces it) is checked for its number of dimensions and channels.

        A cumulative average (``momentum=None``) takes the factor ``1/(count + 1)``, which
        torch's layer reads on the host: a graph break in a compiled pass, whose resumed frame
        under ``dynamic=True`` lost the factor (Dynamo returned None for it). Here the count
        stays on the device: the batch statistics go into zeroed buffers (a momentum of 1),
        and ``_count_call`` blends them into the running ones."""
        if x is not None:
            self._check_input_dim(x)
            self._check_channels(x.shape[1], f"got input of shape {tuple(x.shape)}")
        training = self.training or (self.running_mean is None and self.running_var is None)
        if self._cumulative_average():
            return (torch.zeros_like(self.running_mean), torch.zeros_like(self.running_var),
                    training, 1.0)
        use_running = self._uses_running_stats()
        return (self.running_mean if use_running else None,
                self.running_var if use_running else None, training,
                0.0 if self.momentum is None else self.momentum)

    def _check_channels(self, channels: int, got: str) -> None:
        """Refuse an input of ``channels`` channels, other than ``num_features``, where the
        call hands the batch norm a tensor per channel (weight, bias, running statistics); a
        layer with none (affine=False, track_running_stats=False) normalises any number of
        channels, as torch's. ``got`` says what the input is, for the message."""
        if channels != self.num_features and self._reads_per_channel_tensors():
            raise ValueError(f"{type(self).__name__}: expected {self.num_features} channels, "
                             f"{got}")

    def _reads_per_channel_tensors(self) -> bool:
        running = (self.running_mean, self.running_var) if self._uses_running_stats() else ()
        return any(t is not None for t in (self.weight, self.bias, *running))

    def _uses_running_stats(self) -> bool:
        """True if this call reads (or updates) the running statistics, as torch's
        ``_BatchNorm.forward`` decides: in eval mode, or when the layer tracks them."""
        return not self.training or self.track_running_stats

    def _counts_calls(self) -> bool:
        return self.training and self.track_running_stats and self.num_batches_tracked is not None

    def _cumulative_average(self) -> bool:
        """True if this call updates running statistics by a cumulative average."""
        return self.momentum is None and self._counts_calls() \
            and self.running_mean is not None and self.running_var is not None

    def _count_call(self, batch_mean: Optional[Tensor], batch_var: Optional[Tensor],
                    output: Tensor) -> None:
        """Count a call that has run in ``num_batches_tracked``, as ``_BatchNorm.forward``.
        For a cumulative average, ``batch_mean`` and ``batch_var`` are the statistics the call
        wrote into ``_dual_bn_args``'s buffers, blended into the running ones as torch's
        update does (``factor * batch + (1 - factor) * running``, in float64). An empty
        ``output`` (no batch, or no spatial position) had no statistics: the call is counted
        and the running ones are left as they are, as torch's batch norm leaves them."""
        if not self._counts_calls():
            return
        if self._cumulative_average() and output.numel() > 0:
            factor = 1.0 / (self.num_batches_tracked + 1).double()
            for running, batch in ((self.running_mean, batch_mean),
                                   (self.running_var, batch_var)):
                running.copy_(factor * batch.double() + (1 - factor) * running.double())
        self.num_batches_tracked.add_(1)

    def dual_forward(self, input: Dual, relu: bool = False) -> Dual:
        """The dual batch norm; ``relu`` fuses the ReLU after it (as DualSequential does)."""
        running_mean, running_var, training, factor = self._dual_bn_args(input.primal)
        out = DF.batch_norm(input, running_mean, running_var, self.weight,
                            self.bias, training, factor, self.eps, relu)
        self._count_call(running_mean, running_var, out.primal)
        return out


class DualBatchNorm2d(_DualBatchNorm, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that also runs the dual pass (train: batch statistics, with their
    derivative; eval: the running statistics' affine map)."""


class DualBatchNorm1d(_DualBatchNorm, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` that also runs the dual pass."""


class DualReLU(DualModule, nn.ReLU):
    """``nn.ReLU`` that also runs the dual pass: ``ẏ = ẋ·[x>0]``."""

    def dual_forward(self, input: Dual) -> Dual:
        return DF.relu(input, inplace=self.inplace)


def _activation_twin(cls: type, rule, *attributes: str) -> type:
    """The twin of activation layer ``cls``: its dual forward calls fgkernels' rule for it with
    the layer's ``attributes``, the numbers the layer's own forward gets from that rule through
    ``Dual.__torch_function__``, but with no torch function in between, which torch.compile
    cannot call on a Dual."""

    def dual_forward(self, input: Dual) -> Dual:
        return rule(input, *(getattr(self, a) for a in attributes))

    name = f"Dual{cls.__name__}"
    return type(name, (DualModule, cls), {
        "dual_forward": dual_forward, "__module__": __name__, "__qualname__": name,
        "__doc__": f"``nn.{cls.__name__}`` that also runs the dual pass (``fgkernels."
                   f"rules.pointwise.{rule.__name__}``)."})


DualHardswish = _activation_twin(nn.Hardswish, pointwise.hardswish, "inplace")
DualHardsigmoid = _activation_twin(nn.Hardsigmoid, pointwise.hardsigmoid, "inplace")
DualSiLU = _activation_twin(nn.SiLU, pointwise.silu, "inplace")
DualGELU = _activation_twin(nn.GELU, pointwise.gelu, "approximate")
DualSigmoid = _activation_twin(nn.Sigmoid, pointwise.sigmoid)
DualTanh = _activation_twin(nn.Tanh, pointwise.tanh)
DualHardtanh = _activation_twin(nn.Hardtanh, pointwise.hardtanh, "min_val", "max_val", "inplace")
DualReLU6 = _activation_twin(nn.ReLU6, pointwise.hardtanh, "min_val", "max_val", "inplace")
DualLeakyReLU = _activation_twin(nn.LeakyReLU, pointwise.leaky_relu, "negative_slope", "inplace")
DualELU = _activation_twin(nn.ELU, pointwise.elu, "alpha", "inplace")
DualMish = _activation_twin(nn.Mish, pointwise.mish, "inplace")
_ACTIVATION_TWINS = {
    nn.Hardswish: DualHardswish, nn.Hardsigmoid: DualHardsigmoid, nn.SiLU: DualSiLU,
    nn.GELU: DualGELU, nn.Sigmoid: DualSigmoid, nn.Tanh: DualTanh, nn.Hardtanh: DualHardtanh,
    nn.ReLU6: DualReLU6, nn.LeakyReLU: DualLeakyReLU, nn.ELU: DualELU, nn.Mish: DualMish}


class DualLinear(DualModule, nn.Linear):
    """``nn.Linear`` that also runs the dual pass: ``ẏ = ẋWᵀ + xẆᵀ + ḃ``."""

    def dual_forward(self, input: Dual) -> Dual:
        return DF.linear(input, self.weight, self.bias)


class DualMaxPool2d(DualModule, nn.MaxPool2d):
    """``nn.MaxPool2d`` that also runs the dual pass (tangent taken at the argmax)."""

    def dual_forward(self, input: Dual) -> Dual:
        return DF.max_pool2d(input, self.kernel_size, self.stride, self.padding, self.dilation,
                             self.ceil_mode, self.return_indices)


class DualAvgPool2d(DualModule, nn.AvgPool2d):
    """``nn.AvgPool2d`` that also runs the dual pass."""

    def dual_forward(self, input: Dual) -> Dual:
        return DF.avg_pool2d(input, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                             self.count_include_pad, self.divisor_override)


class DualAdaptiveAvgPool2d(DualModule, nn.AdaptiveAvgPool2d):
    """``nn.AdaptiveAvgPool2d`` that also runs the dual pass."""

    def dual_forward(self, input: Dual) -> Dual:
        return DF.adaptive_avg_pool2d(input, self.output_size)


class DualFlatten(DualModule, nn.Flatten):
    """``nn.Flatten`` that also runs the dual pass."""

    def dual_forward(self, input: Dual) -> Dual:
        return DF.flatten(input, self.start_dim, self.end_dim)


class DualSequential(_DirectCall, nn.Sequential):
    """``nn.Sequential`` that, on a Dual input, runs each Conv→BatchNorm2d(→ReLU) and
    BatchNorm→ReLU run of its children as one fused op. Same children, same state_dict. A child
    with forward hooks or pre-hooks is not fused: it runs on its own, so its hooks see its Dual
    input and output as they see tensors on the plain pass."""

    reads_parameter_tangents = True

    def forward(self, input):
        if not isinstance(input, Dual):
            return super().forward(input)
        layers = list(self)
        i = 0
        while i < len(layers):
            layer = layers[i]
            nxt = layers[i + 1] if i + 1 < len(layers) else None
            after = layers[i + 2] if i + 2 < len(layers) else None
            # (an input of another rank runs layer by layer: torch's errors, from the layer
            # that raises them)
            if _fusable_conv(layer) and isinstance(nxt, DualBatchNorm2d) and _fusable(nxt) \
                    and input.dim() == 4:
                relu = _fusable_relu(after)
                with in_rule():
                    input = _conv_bn(layer, nxt, input, relu)
                i += 3 if relu else 2
            elif isinstance(layer, _DualBatchNorm) and _fusable(layer) and _fusable_relu(nxt):
                with in_rule():
                    input = layer.dual_forward(input, relu=True)
                i += 2
            else:
                input = _call(layer, input)
                i += 1
        return input


def _call(layer: nn.Module, input: Dual):
    """``layer(input)``, straight to the layer's forward when nothing would see the call (as
    ``_DirectCall`` does for the twins)."""
    return layer.forward(input) if _unobserved(layer) else layer(input)


def _unobserved(layer: nn.Module) -> bool:
    """True if nothing would see ``layer`` called: neither torch.compile (where fgkernels' hook
    checks what the pass cannot substitute) nor the JIT tracer running, no hook of its own or
    global one (forward or backward, fgkernels' own aside), no in-place compile of the layer,
    and no ``__call__`` of its class's own."""
    return (not torch.compiler.is_dynamo_compiling() and not torch._C._get_tracing_state()
            and _unhooked(layer) and layer._compiled_call_impl is None
            and not (layer._backward_hooks or layer._backward_pre_hooks
                     or torch_module._global_backward_hooks
                     or torch_module._global_backward_pre_hooks)
            and not _own_call(type(layer)))


def _unhooked(layer: nn.Module) -> bool:
    """True if no forward hook or pre-hook (the layer's own or a global one) would run on it."""
    return not (layer._forward_hooks or layer._forward_pre_hooks or foreign_module_hooks())


def _fusable(layer: nn.Module) -> bool:
    """True if a fused op may stand for ``layer``'s call: nothing would see the call (no hook),
    its class has no ``__call__`` of its own, and the layer no ``forward`` of its own (one set
    on the instance, as libraries wrap a layer's forward: ``layer.forward = f``; asked of the
    attribute's code, which a compiled pass both folds and guards on, so that it fuses and sees
    a forward set after it compiled)."""
    return _unhooked(layer) and not _own_call(type(layer)) \
        and getattr(layer.forward, "__code__", None) is type(layer).forward.__code__


def _fusable_conv(layer) -> bool:
    return isinstance(layer, DualConv2d) and layer.padding_mode == "zeros" and _fusable(layer)


def _fusable_relu(layer) -> bool:
    """A ReLU whose call is torch's ReLU (a subclass with a forward of its own is not one)."""
    return isinstance(layer, nn.ReLU) and type(layer).forward in (nn.ReLU.forward,
                                                                  DualReLU.forward) \
        and _fusable(layer)


def _conv_bn(conv: DualConv2d, bn: _DualBatchNorm, input: Dual, relu: bool) -> Dual:
    bn._check_channels(conv.out_channels,
                       f"but the convolution before it gives {conv.out_channels}")
    running_mean, running_var, training, factor = bn._dual_bn_args(None)
    out = DF.conv2d_batch_norm(
        input, conv.weight, conv.bias, conv.stride, conv.padding,
        conv.dilation, conv.groups, running_mean, running_var, bn.weight,
        bn.bias, training, factor, bn.eps, relu,
        conv_primal=conv._take_kept_output(input))
    bn._count_call(running_mean, running_var, out.primal)
    return out


@contextlib.contextmanager
def reuse_conv_outputs(module: nn.Module) -> Iterator[None]:
    """Inside the ``with`` block, each ``DualConv2d`` of ``module`` keeps the output of its
    plain (autograd) forward, and its next dual call takes that output as its primal instead of
    computing it again: one convolution less per layer, for a caller that runs the same layers
    on the same input first plainly, then dual (the forward-gradient trainer runs each block
    under autograd for its guess, then in the dual pass).

    The caller guarantees that the dual input is the plain one (to rounding: a batch norm
    between two convolutions is computed by different kernels on the two passes; the same
    random draws, such as dropout masks) and that the parameters do not change in between;
    values are not compared. A layer called several times keeps each output, taken in the
    same order. The kept outputs are dropped, unused, when a parameter was replaced or written
    by an op autograd tracks (``p.data`` writes and fused optimizers are not seen), or the
    layer's training mode, the input's shape, layout, dtype or device, or the output changed
    since; a layer whose weight a parametrization computes keeps none. An output is handed over
    to the dual call, which may overwrite it in place (a fused batch norm does): a backward
    through a graph that saved it must run before (it raises after). Leaving the block drops
    whatever is left (an enclosing block keeps its own layers on)."""
    check_module(module, "reuse_conv_outputs")
    convs = [m for m in module.modules()
             if isinstance(m, DualConv2d) and "_fg_kept" not in m.__dict__]
    for conv in convs:
        conv.__dict__["_fg_kept"] = []
    try:
        yield
    finally:
        for conv in convs:
            conv.__dict__.pop("_fg_kept", None)


class DualLayerNorm(DualModule, nn.LayerNorm):
    """``nn.LayerNorm``; its dual pass is layer norm's rule (``fgkernels.rules.norms``)."""


class DualGroupNorm(DualModule, nn.GroupNorm):
    """``nn.GroupNorm``; its dual pass is group norm's rule (``fgkernels.rules.norms``)."""


class DualMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` taking Dual masks (a learned additive bias, a mask computed
    from a Dual): torch's forward asks a mask's dtype of a Tensor only, so with a Dual mask the
    layer's arguments go to multi-head attention's rule (``fgkernels.rules.attention``) as
    torch's forward hands them on. A full dual pass gives every ``nn.MultiheadAttention`` of
    the model's tree this class while it runs (a subclass keeping torch's forward: this class
    mixed into it); ``convert`` gives it for good."""

    # its dual forward hands each parameter to a rule that looks up the parameter's tangent
    reads_parameter_tangents = True

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True,
                attn_mask=None, average_attn_weights=True, is_causal=False):
        if not (isinstance(attn_mask, Dual) or isinstance(key_padding_mask, Dual)):
            return super().forward(query, key, value, key_padding_mask, need_weights, attn_mask,
                                   average_attn_weights, is_causal)
        batched = query.dim() == 3
        if self.batch_first and batched:  # the rule takes sequence-first inputs
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        with in_rule():
            out, weights = attention.multi_head_attention_forward(
                query, key, value, self.embed_dim, self.num_heads, self.in_proj_weight,
                self.in_proj_bias, self.bias_k, self.bias_v, self.add_zero_attn, self.dropout,
                self.out_proj.weight, self.out_proj.bias, training=self.training,
                key_padding_mask=key_padding_mask, need_weights=need_weights,
                attn_mask=attn_mask, use_separate_proj_weight=not self._qkv_same_embed_dim,
                q_proj_weight=self.q_proj_weight, k_proj_weight=self.k_proj_weight,
                v_proj_weight=self.v_proj_weight, average_attn_weights=average_attn_weights,
                is_causal=is_causal)
        return (out.transpose(0, 1) if self.batch_first and batched else out), weights


class DualTransformerEncoderLayer(nn.TransformerEncoderLayer):
    """``nn.TransformerEncoderLayer`` taking a Dual ``src_mask`` (a learned additive bias):
    torch's forward asks the mask's dtype of a Tensor only. With one, the padding mask is
    checked against the mask's dtype as torch checks it, and the layer runs its blocks as
    torch's forward runs them off its fused fast path, handing the mask to its attention. A full
    dual pass gives every ``nn.TransformerEncoderLayer`` of the model's tree this class while it
    runs; ``convert`` gives it for good."""

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
        if not isinstance(src_mask, Dual):
            return super().forward(src, src_mask, src_key_padding_mask, is_causal)
        src_key_padding_mask = _padding_mask_beside(src_key_padding_mask, src_mask, "src_mask",
                                                    src)
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask,
                                   is_causal=is_causal)
            return x + self._ff_block(self.norm2(x))
        x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask,
                                          is_causal=is_causal))
        return self.norm2(x + self._ff_block(x))


class DualTransformerEncoder(nn.TransformerEncoder):
    """``nn.TransformerEncoder`` taking a Dual ``mask``, which torch's forward refuses as
    ``nn.TransformerEncoderLayer``'s does: the padding mask is checked against the mask's
    dtype, whether the mask is causal is read from its primal when not given, and each layer
    takes the Dual mask (torch's nested-tensor fast path never runs beside a mask). A full dual
    pass gives every ``nn.TransformerEncoder`` of the model's tree this class while it runs;
    ``convert`` gives it for good."""

    def forward(self, src, mask=None, src_key_padding_mask=None, is_causal=None):
        if is_causal is None and mask is not None and torch.is_floating_point(mask):
            # Asked here, as torch asks it: the compiled pass fails to trace torch's own
            # asking of a mask with a tangent (a float mask is torch's canonical form as it is).
            seq_len = transformer._get_seq_len(src, self.layers[0].self_attn.batch_first)
            is_causal = _is_causal_mask(mask.primal if isinstance(mask, Dual) else mask,
                                        seq_len)
        if not isinstance(mask, Dual):
            return super().forward(src, mask, src_key_padding_mask, is_causal)
        src_key_padding_mask = _padding_mask_beside(src_key_padding_mask, mask, "mask", src)
        output = src
        for layer in self.layers:
            output = layer(output, src_mask=mask, is_causal=is_causal,
                           src_key_padding_mask=src_key_padding_mask)
        return output if self.norm is None else self.norm(output)


def _padding_mask_beside(padding_mask, mask: Dual, mask_name: str, src):
    """A padding mask checked and converted as torch's encoder forwards do beside ``mask``,
    whose dtype they ask of a Tensor only. (A float mask passes torch's canonical form as it
    is, and a bool or integer one carries no tangent: the Dual mask itself needs none.)"""
    return F._canonical_mask(mask=padding_mask, mask_name="src_key_padding_mask",
                             other_type=mask.primal.dtype, other_name=mask_name,
                             target_type=src.dtype)


def _is_causal_mask(mask: Tensor, size: int) -> bool:
    """Whether the float ``mask`` is the causal mask over ``size`` tokens (-inf above the
    diagonal, 0 elsewhere), as torch's encoder asks it (``_detect_is_causal_mask``)."""
    causal = transformer._generate_square_subsequent_mask(size, device=mask.device,
                                                          dtype=mask.dtype)
    return mask.size() == causal.size() and bool((mask == causal).all())


# torch.nn layer -> its Dual twin, for convert().
TWINS: dict[type, type] = {
    nn.Conv2d: DualConv2d,
    nn.BatchNorm2d: DualBatchNorm2d,
    nn.BatchNorm1d: DualBatchNorm1d,
    nn.ReLU: DualReLU,
    nn.Linear: DualLinear,
    nn.MaxPool2d: DualMaxPool2d,
    nn.AvgPool2d: DualAvgPool2d,
    nn.AdaptiveAvgPool2d: DualAdaptiveAvgPool2d,
    nn.Flatten: DualFlatten,
    nn.Sequential: DualSequential,
    nn.LayerNorm: DualLayerNorm,
    nn.GroupNorm: DualGroupNorm,
    nn.MultiheadAttention: DualMultiheadAttention,
    nn.TransformerEncoderLayer: DualTransformerEncoderLayer,
    nn.TransformerEncoder: DualTransformerEncoder,
    **_ACTIVATION_TWINS,
}
_DUAL_CLASSES = set(TWINS.values())
for _twin in _DUAL_CLASSES:
    forward_sets_no_attributes(_twin)


def register_twin(cls: type, dual_cls: type) -> None:
    """Make ``convert`` turn layers of class ``cls`` into ``dual_cls``: a subclass of ``cls``
    and of ``fgkernels.nn.DualModule`` that adds no state and runs the dual pass for a Dual
    input."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_twin: cls must be an nn.Module class, got {cls!r}")
    if not (isinstance(dual_cls, type) and issubclass(dual_cls, cls)
            and issubclass(dual_cls, (DualModule, DualSequential))):
        raise TypeError(f"register_twin: {getattr(dual_cls, '__name__', dual_cls)} must subclass "
                        f"both {cls.__name__} and fgkernels.nn.DualModule")
    TWINS[cls] = dual_cls
    _DUAL_CLASSES.add(dual_cls)
    _class_twin.cache_clear()  # a class seen before (and its subclasses) now take the new twin


# The methods of a twinned layer that a twin's dual forward stands in for: a subclass that
# overrides one (a weight-standardised convolution's ``_conv_forward``) keeps its own code.
_REPLACED = ("forward", "_conv_forward")


def _reduce_as_layer(self, protocol):
    """Pickle a layer of a twin made at run time (``_class_twin``), which pickle cannot find by
    name, as a layer of the class it twins: loading makes the twin again. (``torch.save`` and
    ``copy.deepcopy`` both come here.)"""
    reduced = object.__reduce_ex__(self, protocol)  # (copyreg.__newobj__, (cls,), state, ...)
    if reduced[0] not in (copyreg.__newobj__, copyreg._reconstructor):
        return reduced  # the layer class's own __reduce__: its way of being made again
    return (_new_twinned, (type(self).__bases__[1],), *reduced[2:])


def _new_twinned(layer_cls: type) -> nn.Module:
    """An empty layer of ``layer_cls``'s twin, for pickle to fill with its state."""
    twin = _class_twin(layer_cls) or layer_cls
    return twin.__new__(twin)


@functools.cache
def _class_twin(cls: type) -> Optional[type]:
    """The twin of layers of class ``cls``: the registered one, or for a subclass of a twinned
    layer that keeps its base's ``forward`` (and ``_conv_forward``: a subclass adding methods)
    the base's twin mixed into the subclass; None for any other class (its ops take Duals as
    they are)."""
    if cls in TWINS:
        return TWINS[cls]
    for base in cls.__mro__[1:]:
        twin = TWINS.get(base)
        if twin is not None:
            if any(getattr(cls, name, None) is not getattr(base, name, None)
                   for name in _REPLACED):
                return None
            body = {"__module__": cls.__module__, "__reduce_ex__": _reduce_as_layer}
            become = getattr(cls, "cls_to_become", None)
            if issubclass(cls, LazyModuleMixin) and become is not None:
                # A lazy layer becomes its class at its first call: the twin, the twin's
                # (nn.LazyConv2d becomes DualConv2d, not nn.Conv2d, which has no dual forward).
                body["cls_to_become"] = _class_twin(become) or become
            mixed = type(f"Dual{cls.__name__}", (twin, cls), body)
            if twin is DualSequential:
                # Its forward only calls its children (torchvision's Conv2dNormActivation):
                # no dual pass need look for a Dual left on it. (A subclass of another layer
                # may override a method its forward calls, and is looked at.)
                forward_sets_no_attributes(mixed)
            return mixed
    return None


# A dual pass gives an unconverted nn.MultiheadAttention, nn.TransformerEncoderLayer or
# nn.TransformerEncoder (or a subclass keeping its forward) its twin while it runs: torch's
# forwards refuse Dual masks. (_class_twin is cached, and forgets what it found when
# register_twin adds a twin.)
for _cls in (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerEncoder):
    run_as_during_passes(_cls, _class_twin)


def _parametrized_twin(cls: type) -> Optional[type]:
    """For the class ``torch.nn.utils.parametrize`` made for one parametrized layer (a subclass
    of the layer's class holding the parametrized properties), the same class made on the
    twin: ``remove_parametrizations`` then leaves the twin."""
    base_twin = _class_twin(cls.__bases__[0])
    if base_twin is None:
        return None
    body = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    return type(cls.__name__, (base_twin,), body)


def twin_of(module: nn.Module) -> Optional[type]:
    """The class ``convert`` gives ``module`` (None: it stays as it is)."""
    cls = type(module)
    if cls in _DUAL_CLASSES or isinstance(module, (DualModule, DualSequential)):
        return None
    if parametrize.is_parametrized(module) \
            and cls.__name__ == f"Parametrized{cls.__bases__[0].__name__}":
        return _parametrized_twin(cls)
    return _class_twin(cls)


def convert(module: nn.Module) -> nn.Module:
    """Turn the layers of ``module`` (itself included) that have a twin into it, in place, and
    return it: a speed step that never changes a number (any model is exact on Duals as it is).
    Parameters, buffers, hooks and state_dict keys are untouched: the twins add no state, so
    each layer simply changes class. A subclass of a twinned layer keeps its own methods. A
    converted model pickles and ``torch.save``s whole; loaded, its layers are still converted.
    Conv→BN→ReLU and BN→ReLU runs inside ``nn.Sequential`` containers are fused on the dual
    pass."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"convert: expected an nn.Module, got {type(module).__name__}")
    # Every twin found before any layer changes class: a twin that cannot be made leaves the
    # model as it was.
    twins = [(m, twin) for m in module.modules() if (twin := twin_of(m)) is not None]
    for m, twin in twins:
        m.__class__ = twin
    return module
