"""Dual modules: torch.nn layers that also run the dual (forward-mode) pass.

Each ``DualX`` subclasses its ``nn.X`` twin and adds no state: same constructor, parameters,
buffers and state_dict keys, and a plain Tensor input runs the twin's own forward (autograd
included). A ``Dual`` input runs the dual pass, with the parameter tangents set by
``fgkernels.set_tangents`` (none set: the parameters are constants of the pass).
``convert(model)`` turns the torch.nn layers of any model into their twins in place.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import NamedTuple, Optional, Union

import torch
from torch import nn
from torch.nn.utils import parametrize

from . import checks, derived
from . import functional as DF
from .dual import Dual

Tensor = torch.Tensor


class DualModule:
    """Mixin of the Dual layers: holds the per-step parameter tangents (not parameters, not in
    the state_dict) and hands out each parameter as a Dual when it has one, computed ones
    included (a parametrization's, weight_norm's or prune's weight carries the JVP of its
    computation along its sources' tangents).

    ``forward`` decides once per call: a Dual input runs ``dual_forward`` (each twin's one
    method), anything else the torch.nn layer's own forward."""

    def forward(self, input, *args, **kwargs):
        if isinstance(input, Dual):
            return self.dual_forward(input, *args, **kwargs)
        return self.plain_forward(input, *args, **kwargs)

    def plain_forward(self, input, *args, **kwargs):
        """The torch.nn layer's own forward (autograd included)."""
        return super().forward(input, *args, **kwargs)

    def dual_forward(self, input: Dual, *args, **kwargs) -> Dual:
        """The layer on a Dual input: its output and tangents."""
        raise NotImplementedError

    def _dual_param(self, name: str) -> Union[Tensor, Dual, None]:
        p = getattr(self, name)
        entries = self.__dict__.get("_fg_tangents", {})
        if p is None or not entries:
            return p
        how = derived.derivation(self, name)
        if how is None:
            entry = entries.get(name)
            if entry is None:
                return p
            self._check_not_replaced(name, entry, p)
            return Dual._unchecked(p.detach(), entry.stack, entry.directions, entry.single)
        live = {k: entries[k] for k in how.sources if k in entries}
        if not live:
            return p
        values = {k: self.get_parameter(k) for k in how.sources}
        for k, entry in live.items():
            self._check_not_replaced(k, entry, values[k])
        stack = derived.derived_tangent(self, how, values, {k: e.stack for k, e in live.items()})
        some = next(iter(live.values()))
        return Dual._unchecked(p.detach(), stack, some.directions, some.single)

    def _check_not_replaced(self, name: str, entry, p: Tensor) -> None:
        if entry.parameter is not p:
            raise RuntimeError(
                f"{type(self).__name__}.{name} was replaced after its tangent was set (now "
                f"{tuple(p.shape)}, then {tuple(entry.parameter.shape)}); set its tangent again "
                "with fgkernels.set_tangents, or clear it with fgkernels.clear_tangents")


class _KeptOutput(NamedTuple):
    """A plain forward's output kept for the next dual call, with what must not have changed."""

    output: Tensor
    input_meta: tuple          # shape, dtype, device
    training: bool
    versions: tuple[int, ...]  # of the output and the parameters


def _meta(x: Tensor) -> tuple:
    return x.shape, x.dtype, x.device


class DualConv2d(DualModule, nn.Conv2d):
    """``nn.Conv2d`` that also runs the dual pass: ``ẏ = W*ẋ + Ẇ*x + ḃ``."""

    def plain_forward(self, input):
        out = super().plain_forward(input)
        if "_fg_kept" in self.__dict__:  # inside reuse_conv_outputs
            self.__dict__["_fg_kept"] = _KeptOutput(out.detach(), _meta(input), self.training,
                                                    self._versions(out))
        return out

    def dual_forward(self, input: Dual) -> Dual:
        self._check_dual()
        return DF.conv2d(input, self._dual_param("weight"), self._dual_param("bias"), self.stride,
                         self.padding, self.dilation, self.groups,
                         primal=self._take_kept_output(input))

    def _versions(self, out: Tensor) -> tuple[int, ...]:
        return (out._version, *(p._version for p in (self.weight, self.bias) if p is not None))

    def _take_kept_output(self, input: Dual) -> Optional[Tensor]:
        """The output kept by ``reuse_conv_outputs`` for this dual call (then forgotten), or
        None when there is none or the layer, its mode or the input's shape, dtype or device
        changed since."""
        kept = self.__dict__.get("_fg_kept")
        if kept is None:
            return None
        self.__dict__["_fg_kept"] = None
        if (kept.input_meta != _meta(input.primal) or kept.training != self.training
                or kept.versions != self._versions(kept.output)):
            return None
        return kept.output

    def _check_dual(self) -> None:
        if self.padding_mode != "zeros":
            raise NotImplementedError(
                f"DualConv2d: padding_mode={self.padding_mode!r} has no dual kernel; only "
                "'zeros' is supported (the other modes pad with input values, which would need "
                "their own tangent rule)")


class _DualBatchNorm(DualModule):
    """The dual forward shared by the batch-norm twins; follows ``_BatchNorm.forward``."""

    def _dual_bn_args(self, x: Optional[Tensor]):
        """(running_mean, running_var, training, momentum factor) as ``_BatchNorm.forward``
        computes them, counting this call in ``num_batches_tracked``. ``x`` (None when a fused
        convolution produces it) is checked for its number of dimensions."""
        if x is not None:
            self._check_input_dim(x)
            if x.shape[1] != self.num_features:
                raise ValueError(f"{type(self).__name__}: expected {self.num_features} channels, "
                                 f"got input of shape {tuple(x.shape)}")
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None \
                else self.momentum
        training = self.training or (self.running_mean is None and self.running_var is None)
        use_running = not self.training or self.track_running_stats
        return (self.running_mean if use_running else None,
                self.running_var if use_running else None, training, factor)

    def dual_forward(self, input: Dual, relu: bool = False) -> Dual:
        """The dual batch norm; ``relu`` fuses the ReLU after it (as DualSequential does)."""
        running_mean, running_var, training, factor = self._dual_bn_args(input.primal)
        return DF.batch_norm(input, running_mean, running_var, self._dual_param("weight"),
                             self._dual_param("bias"), training, factor, self.eps, relu)


class DualBatchNorm2d(_DualBatchNorm, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that also runs the dual pass (train: batch statistics, with their
    derivative; eval: the running statistics' affine map)."""


class DualBatchNorm1d(_DualBatchNorm, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` that also runs the dual pass."""


class DualReLU(DualModule, nn.ReLU):
    """``nn.ReLU`` that also runs the dual pass: ``ẏ = ẋ·[x>0]``."""

    def dual_forward(self, input: Dual) -> Dual:
        return DF.relu(input)


class DualLinear(DualModule, nn.Linear):
    """``nn.Linear`` that also runs the dual pass: ``ẏ = ẋWᵀ + xẆᵀ + ḃ``."""

    def dual_forward(self, input: Dual) -> Dual:
        return DF.linear(input, self._dual_param("weight"), self._dual_param("bias"))


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


class DualSequential(nn.Sequential):
    """``nn.Sequential`` that, on a Dual input, runs each Conv→BatchNorm2d(→ReLU) and
    BatchNorm→ReLU run of its children as one fused op. Same children, same state_dict. A child
    with forward hooks or pre-hooks is not fused: it runs on its own, so its hooks see its Dual
    input and output as they see tensors on the plain pass."""

    def forward(self, input):
        if not isinstance(input, Dual):
            return super().forward(input)
        layers = list(self)
        i = 0
        while i < len(layers):
            layer = layers[i]
            nxt = layers[i + 1] if i + 1 < len(layers) else None
            after = layers[i + 2] if i + 2 < len(layers) else None
            if _fusable_conv(layer) and isinstance(nxt, DualBatchNorm2d) and _unhooked(nxt):
                relu = isinstance(after, nn.ReLU) and _unhooked(after)
                input = _conv_bn(layer, nxt, input, relu)
                i += 3 if relu else 2
            elif (isinstance(layer, _DualBatchNorm) and _unhooked(layer)
                  and isinstance(nxt, nn.ReLU) and _unhooked(nxt)):
                input = layer.dual_forward(input, relu=True)
                i += 2
            else:
                input = layer(input)
                i += 1
        return input


def _unhooked(layer: nn.Module) -> bool:
    """True if no forward hook or pre-hook (the layer's own or a global one) would run on it."""
    from torch.nn.modules import module as torch_module
    return not (layer._forward_hooks or layer._forward_pre_hooks
                or torch_module._global_forward_hooks
                or torch_module._global_forward_pre_hooks)


def _fusable_conv(layer) -> bool:
    return isinstance(layer, DualConv2d) and layer.padding_mode == "zeros" and _unhooked(layer)


def _conv_bn(conv: DualConv2d, bn: _DualBatchNorm, input: Dual, relu: bool) -> Dual:
    if conv.out_channels != bn.num_features:
        raise ValueError(f"{type(bn).__name__}: expected {bn.num_features} channels, but the "
                         f"convolution before it gives {conv.out_channels}")
    conv._check_dual()
    # Checked before _dual_bn_args counts the call: a bad input changes no state.
    checks.check_conv(input.primal, conv.weight, conv.bias, conv.groups)
    running_mean, running_var, training, factor = bn._dual_bn_args(None)
    return DF.conv2d_batch_norm(
        input, conv._dual_param("weight"), conv._dual_param("bias"), conv.stride, conv.padding,
        conv.dilation, conv.groups, running_mean, running_var, bn._dual_param("weight"),
        bn._dual_param("bias"), training, factor, bn.eps, relu,
        conv_primal=conv._take_kept_output(input))


@contextlib.contextmanager
def reuse_conv_outputs(module: nn.Module) -> Iterator[None]:
    """Inside the ``with`` block, each ``DualConv2d`` of ``module`` keeps the output of its
    plain (autograd) forward, and its next dual call takes that output as its primal instead of
    computing it again: one convolution less per layer, for a caller that runs the same layers
    on the same input first plainly, then dual (the forward-gradient trainer runs each block
    under autograd for its guess, then in the dual pass).

    The caller guarantees that the dual input is the plain one (to rounding: a batch norm
    between two convolutions is computed by different kernels on the two passes); values are
    not compared. A kept output is dropped, unused, when the layer's parameters, its training
    mode or the input's shape, dtype or device changed, or the output was modified since. It is
    handed over to the dual call, which may overwrite it in place (a fused batch norm does).
    Leaving the block drops whatever is left (an enclosing block keeps its own layers on)."""
    convs = [m for m in module.modules()
             if isinstance(m, DualConv2d) and "_fg_kept" not in m.__dict__]
    for conv in convs:
        conv.__dict__["_fg_kept"] = None
    try:
        yield
    finally:
        for conv in convs:
            conv.__dict__.pop("_fg_kept", None)


class DualGeneric(DualModule):
    """Mixin that runs a layer's own ``forward`` on a Dual input, its parameters handed out as
    Duals while it runs: every torch op inside then takes its fgkernels rule or the forward-AD
    fallback. The twin of any layer with parameters that has no fused twin (LayerNorm,
    GroupNorm, Conv1d, a user's layer, a subclass that overrides ``forward``, ...)."""

    def dual_forward(self, input: Dual, *args, **kwargs):
        with self._parameters_as_duals():
            return super().plain_forward(input, *args, **kwargs)

    @contextlib.contextmanager
    def _parameters_as_duals(self) -> Iterator[None]:
        computed = [n for n in self.__dict__.get("_fg_tangents", {})
                    if n not in self._parameters]
        if computed:
            raise NotImplementedError(
                f"{type(self).__name__}: tangents on {', '.join(computed)}, sources of a "
                "computed parameter, need a fused Dual twin of this layer; register one with "
                "fgkernels.register_twin")
        saved = dict(self._parameters)
        try:
            for name, p in saved.items():
                if p is not None:
                    # nn.Module.__getattr__ hands out whatever _parameters holds.
                    self._parameters[name] = self._dual_param(name)
            yield
        finally:
            self._parameters.update(saved)


class DualLayerNorm(DualGeneric, nn.LayerNorm):
    """``nn.LayerNorm`` that also runs the dual pass (``fgkernels.norms``)."""


class DualGroupNorm(DualGeneric, nn.GroupNorm):
    """``nn.GroupNorm`` that also runs the dual pass (``fgkernels.norms``)."""


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
}
_DUAL_CLASSES = set(TWINS.values())


def register_twin(cls: type, dual_cls: type) -> None:
    """Make ``convert`` turn layers of class ``cls`` into ``dual_cls``: a subclass of ``cls``
    and of ``fgkernels.DualModule`` that adds no state and runs the dual pass for a Dual
    input."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_twin: cls must be an nn.Module class, got {cls!r}")
    if not (isinstance(dual_cls, type) and issubclass(dual_cls, cls)
            and issubclass(dual_cls, (DualModule, DualSequential))):
        raise TypeError(f"register_twin: {getattr(dual_cls, '__name__', dual_cls)} must subclass "
                        f"both {cls.__name__} and fgkernels.DualModule")
    TWINS[cls] = dual_cls
    _DUAL_CLASSES.add(dual_cls)


@functools.cache
def _derived_twin(cls: type) -> Optional[type]:
    """The twin of a class without a registered one: for a subclass of a twinned layer that
    keeps its base's ``forward`` (a parametrized layer, a subclass adding methods), the base's
    twin mixed into the subclass; for any other layer with parameters of its own, the generic
    twin; None for a layer without parameters (its ops take Duals as they are)."""
    for base in cls.__mro__[1:]:
        twin = TWINS.get(base)
        if twin is not None and cls.forward is base.forward:
            return type(f"Dual{cls.__name__}", (twin, cls), {"__module__": cls.__module__})
    return type(f"Dual{cls.__name__}", (DualGeneric, cls), {"__module__": cls.__module__})


def twin_of(module: nn.Module) -> Optional[type]:
    """The class ``convert`` gives ``module`` (None: it stays as it is)."""
    cls = type(module)
    if cls in _DUAL_CLASSES or isinstance(module, (DualModule, parametrize.ParametrizationList)):
        return None  # a parametrization's sources are its layer's (fgkernels.derived)
    if cls in TWINS:
        return TWINS[cls]
    if isinstance(module, nn.Sequential) and cls.forward is nn.Sequential.forward:
        return _derived_twin(cls)
    if not any(p is not None for p in module._parameters.values()):
        return None
    return _derived_twin(cls)


def convert(module: nn.Module) -> nn.Module:
    """Turn the layers of ``module`` (itself included) into their Dual twins, in place, and
    return it. Parameters, buffers, hooks and state_dict keys are untouched: the twins add no
    state, so each layer simply changes class. A subclass of a twinned layer keeps its own
    methods; a layer with parameters and no fused twin runs its own forward on Duals
    (``DualGeneric``). Conv→BN→ReLU and BN→ReLU runs inside ``nn.Sequential`` containers are
    fused on the dual pass."""
    for m in module.modules():
        twin = twin_of(m)
        if twin is not None:
            m.__class__ = twin
    return module
