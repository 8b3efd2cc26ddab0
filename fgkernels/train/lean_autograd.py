"""Autograd with a lower memory peak, for the estimators' local forwards and backwards.

What the forward saves: autograd keeps a ReLU's output for its own backward and for the next
convolution's; where that ReLU follows a batch norm in training, whose input autograd keeps
too, ``relu_outputs_recomputed`` keeps the batch norm's input (and its small statistics) in its
place and recomputes the output when the backward asks for it: one activation less, held from
the forward to the backward, for one more elementwise pass each time it is read. (Where a
ReLU output is modified in place after an op saved it, plain autograd refuses the backward;
here the ReLU's own backward reads the recomputed output, as the forward saw it.)

What the backward holds: two of torch's CPU backward kernels hold more at once than their
results (torch 2.13, oneDNN):

- A convolution's backward asked for its input's and its weight's gradients together holds
  both operands reordered to oneDNN's blocked layout beside the input gradient (three tensors
  of an activation's size, for NCHW operands). Asked for the weight's gradient first and the
  input's after, it holds two at a time: the same gradients, one activation less at the peak.
- Batch norm's backward in training allocates a second tensor of its input gradient's size,
  which it never writes; the allocator counts it (``fgkernels.train.memory``). Its gradients
  are computed here from one pass of ``dual_bn_stats`` over the input and the output gradient
  (training batch norm's input Jacobian is symmetric, so its vector-Jacobian product has the
  form of its tangent) and two in-place products into the one tensor it returns.

``LeanBackward`` is a dispatch mode that swaps those two ops for these compositions while a
backward runs under it; every other op runs as it is. The gradients are the same up to
rounding. Asked to, it also differentiates the convolutions of given weights in a narrower
dtype (bfloat16: float32's range, half its bytes): their operands are cast to it and the
gradients back, for a backward whose results are only a direction to measure along (a guess
that enters the dual pass in bfloat16).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import NamedTuple, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakTensorKeyDictionary

from ..backends.native import native_available

aten = torch.ops.aten
Tensor = torch.Tensor

_LEAN_BATCH_NORM_DTYPES = (torch.float32, torch.float64)


class LeanBackward(TorchDispatchMode):
    """``with LeanBackward(): torch.autograd.grad(...)``: the backward's CPU convolutions and
    training batch norms computed with less memory held at once (see the module docstring).

    With ``reduced_dtype``, the backward of a convolution whose weight is one of
    ``reduced_weights`` runs in that dtype, on any device; the gradients come back in their
    operands' dtypes. A weight is recognised by its data (storage, offset, sizes and
    strides): autograd may hand the backward a new tensor object over the weight's data. One
    it cannot recognise (computed on each read, as by a parametrization, or saved elsewhere by
    a saved-tensor hook) is differentiated in its own dtype."""

    def __init__(self, reduced_weights: Iterable[Tensor] = (),
                 reduced_dtype: Optional[torch.dtype] = None):
        super().__init__()
        self._reduced = {w.data_ptr(): w for w in reduced_weights} if reduced_dtype else {}
        self._reduced_dtype = reduced_dtype

    def _is_reduced(self, weight: Tensor) -> bool:
        known = self._reduced.get(weight.data_ptr())
        return known is not None and weight.is_set_to(known)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten.convolution_backward.default and not kwargs:
            if self._reduced and self._is_reduced(args[2]):
                return _convolution_backward_in(self._reduced_dtype, *args)
            split = _split_convolution_backward(*args)
            if split is not None:
                return split
        elif func is aten.native_batch_norm_backward.default and not kwargs:
            lean = _lean_batch_norm_backward(*args)
            if lean is not None:
                return lean
        return func(*args, **kwargs)


def _split_convolution_backward(grad_output, input, weight, bias_sizes, stride, padding,
                                dilation, transposed, output_padding, groups, output_mask):
    """The weight's (and bias's) gradient, then the input's: two calls instead of one, for a
    CPU convolution whose operands are not channels_last (one that is reorders nothing).
    None where the one call holds no more."""
    if not (output_mask[0] and output_mask[1]) or input.device.type != "cpu" or \
            input.is_contiguous(memory_format=torch.channels_last) and input.dim() == 4:
        return None
    args = (grad_output, input, weight, bias_sizes, stride, padding, dilation, transposed,
            output_padding, groups)
    _, grad_weight, grad_bias = aten.convolution_backward(*args, [False, True, output_mask[2]])
    grad_input = aten.convolution_backward(*args, [True, False, False])[0]
    return grad_input, grad_weight, grad_bias


def _convolution_backward_in(dtype, grad_output, input, weight, bias_sizes, stride, padding,
                             dilation, transposed, output_padding, groups, output_mask):
    """``convolution_backward`` with its three operands cast to ``dtype`` (layouts kept), split
    as any other, and the input's and weight's gradients cast back to theirs; the bias's
    gradient, a sum of the output gradient, in the output gradient's own dtype."""
    args = (grad_output.to(dtype), input.to(dtype), weight.to(dtype), bias_sizes, stride,
            padding, dilation, transposed, output_padding, groups,
            [output_mask[0], output_mask[1], False])
    grad_input, grad_weight, _ = _split_convolution_backward(*args) or \
        aten.convolution_backward(*args)
    if output_mask[0]:
        grad_input = grad_input.to(input.dtype)
    if output_mask[1]:
        grad_weight = grad_weight.to(weight.dtype)
    grad_bias = None
    if output_mask[2]:
        grad_bias = grad_output.sum([d for d in range(grad_output.dim()) if d != 1])
    return grad_input, grad_weight, grad_bias


def _same_layout(a: Tensor, b: Tensor) -> bool:
    """Both contiguous, or both 4-D channels_last: layouts ``dual_bn_stats`` reads in place."""
    if a.is_contiguous() and b.is_contiguous():
        return True
    return a.dim() == 4 and a.is_contiguous(memory_format=torch.channels_last) and \
        b.is_contiguous(memory_format=torch.channels_last)


def _lean_batch_norm_backward(grad_out, input, weight, running_mean, running_var, save_mean,
                              save_invstd, train, eps, output_mask):
    """Training batch norm's gradients with the input gradient the only activation-sized
    allocation; None where torch's op should run (eval, not CPU, no input gradient, a dtype
    other than float32/float64, or no compiled ``dual_bn_stats``).

    With x̂ = (x − μ)·r (μ, r: the batch's mean and inverse std), a = γ·r, and per channel
    m_g = mean(ġ), c_g = mean(ġ·(x − μ)) over the M values of the channel:
        ∂L/∂x = a·(ġ − m_g − (x − μ)·r²·c_g) = a·ġ + k·x + (−a·m_g − k·μ),  k = −a·r²·c_g
        ∂L/∂γ = M·r·c_g,   ∂L/∂β = M·m_g"""
    if not train or not output_mask[0] or input.device.type != "cpu" or input.dim() < 2 or \
            input.numel() == 0 or input.dtype not in _LEAN_BATCH_NORM_DTYPES or \
            grad_out.dtype != input.dtype or not _same_layout(grad_out, input) or \
            save_mean is None or save_invstd is None or not native_available():
        return None
    channels = input.shape[1]
    _, _, g_mean, g_cov = torch.ops.fgkernels.dual_bn_stats(input, grad_out.unsqueeze(0))
    g_mean, g_cov = g_mean[0], g_cov[0]
    r = save_invstd
    a = r if weight is None else weight * r
    k = -a * r * r * g_cov
    per_channel = (channels,) + (1,) * (input.dim() - 2)
    # ġ·a + (−a·m_g − k·μ), then + x·k in place: one allocation of the input's size.
    grad_input = torch.addcmul((-a * g_mean - k * save_mean).view(per_channel), grad_out,
                               a.view(per_channel))
    grad_input.addcmul_(input, k.view(per_channel))
    count = input.numel() // channels
    grad_weight = g_cov * (count * r) if output_mask[1] and weight is not None else None
    grad_bias = g_mean * count if output_mask[2] else None
    return grad_input, grad_weight, grad_bias


class _BatchNormOutput(NamedTuple):
    """How to compute a training batch norm's output again: ``(input − mean)·invstd·γ + β``."""

    input: Tensor
    weight: Optional[Tensor]
    bias: Optional[Tensor]
    mean: Tensor
    invstd: Tensor
    versions: tuple[int, ...]  # of input, weight and bias when the forward read them

    @staticmethod
    def of(input, weight, bias, mean, invstd) -> _BatchNormOutput:
        return _BatchNormOutput(input, weight, bias, mean, invstd,
                                _versions(input, weight, bias))

    def relu(self) -> Tensor:
        """``relu`` of the batch norm's output, from its operands as the forward saw them."""
        if _versions(self.input, self.weight, self.bias) != self.versions:
            raise RuntimeError("a batch norm's input, weight or bias was modified in place "
                               "after the forward; its ReLU output, saved for the backward, "
                               "cannot be recomputed")
        scale = self.invstd if self.weight is None else self.weight * self.invstd
        shift = -self.mean * scale if self.bias is None else self.bias - self.mean * scale
        per_channel = (-1,) + (1,) * (self.input.dim() - 2)
        return torch.addcmul(shift.view(per_channel), self.input,
                             scale.view(per_channel)).relu_()


def _versions(*tensors: Optional[Tensor]) -> tuple[int, ...]:
    return tuple(-1 if t is None else t._version for t in tensors)


class _FollowBatchNormReLU(TorchDispatchMode):
    """Notes which tensors are ReLU outputs of a training batch norm, and how to recompute
    each: a batch norm's output modified in place before its ReLU is none, and the recipe
    refuses to run once the batch norm's input, weight or bias has been modified in place."""

    def __init__(self):
        super().__init__()
        self.batch_norms = WeakTensorKeyDictionary()   # output -> (_BatchNormOutput, version)
        self.relu_outputs = WeakTensorKeyDictionary()  # output -> (_BatchNormOutput, version)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        before = args[0]._version if func is aten.relu_.default else None
        out = func(*args, **kwargs)
        if func is aten.native_batch_norm.default and not kwargs and args[5] and \
                args[0].dtype in _LEAN_BATCH_NORM_DTYPES and out[1].numel():
            x, weight, bias = args[:3]
            recipe = _BatchNormOutput.of(x, weight, bias, out[1], out[2])
            self.batch_norms[out[0]] = (recipe, out[0]._version)
        elif func in (aten.relu.default, aten.relu_.default) and not kwargs:
            known = self.batch_norms.get(args[0])
            version = before if before is not None else args[0]._version
            if known is not None and known[1] == version:
                # An in-place op's version counter is bumped once it has returned from here.
                bump = 1 if func is aten.relu_.default else 0
                self.relu_outputs[out] = (known[0], out._version + bump)
        return out


@contextlib.contextmanager
def relu_outputs_recomputed() -> Iterator[None]:
    """Inside: an autograd forward whose saved ReLU outputs of training batch norms are saved
    as the batch norms' inputs instead, and recomputed by the backward (see the module
    docstring). Tensors the forward saves that it did not compute are saved as usual."""
    follow = _FollowBatchNormReLU()

    def pack(t: Tensor):
        known = follow.relu_outputs.get(t)
        return known[0] if known is not None and known[1] == t._version else t

    def unpack(saved):
        return saved.relu() if isinstance(saved, _BatchNormOutput) else saved

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack), follow:
            yield
    finally:
        # The recipes live on in what autograd saved; these hold every batch norm's input.
        follow.batch_norms.clear()
        follow.relu_outputs.clear()
