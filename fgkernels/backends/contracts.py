"""The layer ops' argument contracts, written once: each raises with a message naming the
argument and what was expected, before anything runs or changes. A layer's rule runs its check
in front of every call, and its compiled op's fake runs the same one, so that a traced call
refuses what an eager one refuses (``csrc/checks.h`` keeps the guards the kernels' memory
safety needs)."""
from __future__ import annotations

import math
from typing import Optional

import torch

from .base import BatchNormArgs

Tensor = torch.Tensor


def check_conv(x: Tensor, w: Tensor, b: Optional[Tensor], groups: int, stride=1, padding=0,
               dilation=1) -> None:
    """conv2d's input, weight, bias, groups and geometry (stride, padding, dilation: an int
    or a pair; padding also 'same' or 'valid')."""
    if not _usual_geometry(groups, stride, padding, dilation):
        _check_conv_geometry(groups, stride, padding, dilation)
    _check_differentiable("conv2d", x)
    if x.dim() != 4:
        raise ValueError(f"conv2d: input must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if w.dim() != 4:
        raise ValueError(f"conv2d: weight must be 4-D (C_out, C_in/groups, kH, kW), "
                         f"got shape {tuple(w.shape)}")
    if x.shape[1] != w.shape[1] * groups:
        raise ValueError(f"conv2d: input has {x.shape[1]} channels, but weight of shape "
                         f"{tuple(w.shape)} with groups={groups} expects {w.shape[1] * groups}")
    if b is not None and b.shape != (w.shape[0],):
        raise ValueError(f"conv2d: bias has shape {tuple(b.shape)}, expected ({w.shape[0]},)")
    _check_one_dtype("conv2d", x, w)


def _check_differentiable(op: str, x: Tensor) -> None:
    # (forward mode has no tangent of integers; the compiled ops check it too)
    if not (x.is_floating_point() or x.is_complex()):
        raise TypeError(f"{op}: input must be a floating or complex tensor, got {x.dtype}")


def _check_one_dtype(op: str, x: Tensor, w: Tensor) -> None:
    # (as torch: a float64 batch into a float32 layer is refused, named here, not by a later
    # check of a tangent or of batch norm's statistics; a bias of another dtype gets torch's
    # own refusal, which names it)
    if w.dtype != x.dtype:
        raise TypeError(f"{op}: input is {x.dtype} but weight is {w.dtype}; they must have "
                        f"one dtype, as torch's {op} takes them")


def _usual_geometry(groups, stride, padding, dilation) -> bool:
    """The geometry as an ``nn.Conv2d`` holds it (int pairs) or as ``F.conv2d`` is usually
    called (ints), positive groups, stride and dilation, recognised in a few comparisons:
    checked on every convolution of a pass."""
    return (type(groups) is int and groups >= 1 and _usual(stride, 1) and _usual(dilation, 1)
            and _usual(padding, 0))


def _usual(v, least: int) -> bool:
    """An int, or a pair of ints, each at least ``least``."""
    if type(v) is int:
        return v >= least
    return (type(v) is tuple and len(v) == 2 and type(v[0]) is int and type(v[1]) is int
            and v[0] >= least and v[1] >= least)


def _check_conv_geometry(groups, stride, padding, dilation, op: str = "conv2d",
                         dims: int = 2) -> None:
    what = "a pair of them" if dims == 2 else "a 1-tuple of one"
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"{op}: groups must be a positive int, got {groups!r}")
    for name, value, least in (("stride", stride, 1), ("dilation", dilation, 1),
                               ("padding", padding, 0)):
        if name == "padding" and isinstance(value, str):
            if value not in ("same", "valid"):
                raise ValueError(f"{op}: padding must be 'same', 'valid' or ints, got {value!r}")
            continue
        each = _ntuple(value, dims)
        if len(each) != dims or any(not isinstance(v, int) or isinstance(v, bool) or v < least
                                    for v in each):
            raise ValueError(f"{op}: {name} must be an int >= {least} or {what}, "
                             f"got {value!r}")
    if padding == "same" and any(s != 1 for s in _ntuple(stride, dims)):
        raise ValueError(f"{op}: padding='same' is not supported for strided convolutions")


def check_conv1d(x: Tensor, w: Tensor, b: Optional[Tensor], groups: int, stride=1, padding=0,
                 dilation=1) -> None:
    """conv1d's input, weight, bias, groups and geometry (an int or a 1-tuple each; padding
    also 'same' or 'valid')."""
    _check_conv_geometry(groups, stride, padding, dilation, "conv1d", 1)
    if x.dim() not in (2, 3):
        raise ValueError(f"conv1d: input must be 3-D (N, C, L) or 2-D (C, L), got shape "
                         f"{tuple(x.shape)}")
    if w.dim() != 3:
        raise ValueError(f"conv1d: weight must be 3-D (C_out, C_in/groups, k), got shape "
                         f"{tuple(w.shape)}")
    if x.shape[-2] != w.shape[1] * groups:
        raise ValueError(f"conv1d: input has {x.shape[-2]} channels, but weight of shape "
                         f"{tuple(w.shape)} with groups={groups} expects {w.shape[1] * groups}")
    if b is not None and b.shape != (w.shape[0],):
        raise ValueError(f"conv1d: bias has shape {tuple(b.shape)}, expected ({w.shape[0]},)")
    _check_one_dtype("conv1d", x, w)


def _ntuple(v, n: int) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def check_linear(x: Tensor, w: Tensor, b: Optional[Tensor] = None) -> None:
    """linear's input, weight and bias."""
    _check_differentiable("linear", x)
    if x.dim() == 0 or w.dim() != 2:
        raise ValueError(f"linear: input must have at least 1 dim and weight 2, got shapes "
                         f"{tuple(x.shape)} and {tuple(w.shape)}")
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"linear: input has {x.shape[-1]} features, but weight of shape "
                         f"{tuple(w.shape)} expects {w.shape[1]}")
    if b is not None and b.shape != (w.shape[0],):
        raise ValueError(f"linear: bias has shape {tuple(b.shape)}, expected ({w.shape[0]},)")
    _check_one_dtype("linear", x, w)


def check_batch_norm(shape, bn: BatchNormArgs, w: Optional[Tensor], b: Optional[Tensor],
                     dtype: Optional[torch.dtype] = None) -> None:
    """batch norm's arguments against its input's ``shape`` (and ``dtype``, where given: the
    parameters and running statistics share one dtype, the input's, or float32 beside a
    bfloat16 or float16 input, as torch takes them)."""
    if len(shape) < 2 or shape[1] == 0:
        raise ValueError(f"batch_norm: input must have a channel dimension of at least 1 "
                         f"channel, got shape {tuple(shape)}")
    channels = shape[1]
    for name, t in (("running_mean", bn.running_mean), ("running_var", bn.running_var)):
        if t is not None and not isinstance(t, Tensor):  # a Dual included
            raise TypeError(f"batch_norm: {name} must be a Tensor or None, got "
                            f"{type(t).__name__}")
    for name, t in (("running_mean", bn.running_mean), ("running_var", bn.running_var),
                    ("weight", w), ("bias", b)):
        if t is not None and t.shape != (channels,):
            raise ValueError(f"batch_norm: {name} has shape {tuple(t.shape)}, but the input has "
                             f"{channels} channels")
    if dtype is not None:
        given = [(name, t) for name, t in (("weight", w), ("bias", b),
                                           ("running_mean", bn.running_mean),
                                           ("running_var", bn.running_var)) if t is not None]
        allowed = (dtype, torch.float32) if dtype in (torch.bfloat16, torch.float16) else (dtype,)
        if given and (any(t.dtype != given[0][1].dtype for _, t in given)
                      or given[0][1].dtype not in allowed):
            raise TypeError(f"batch_norm: weight, bias, running_mean and running_var must share "
                            f"one dtype, {' or '.join(map(str, allowed))} beside a {dtype} "
                            f"input, got " + ", ".join(f"{name} {t.dtype}" for name, t in given))
    if (bn.running_mean is None) != (bn.running_var is None):
        raise ValueError("batch_norm: running_mean and running_var must either both be None or "
                         "neither be None")
    if not bn.training and (bn.running_mean is None or bn.running_var is None):
        raise ValueError("batch_norm: eval mode needs running_mean and running_var")
    if bn.training and shape[0] * math.prod(shape[2:]) == 1:  # as torch: an empty input passes
        raise ValueError(f"batch_norm: training needs more than 1 value per channel, got input "
                         f"of shape {tuple(shape)}")
    # (torch's order: the batch first, then eps; 1/sqrt(var + eps) of a constant channel)
    if bn.training and not bn.eps > 0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {bn.eps}")
    if not bn.eps >= 0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {bn.eps}")


def check_primal(op: str, primal: Optional[Tensor], x: Tensor, shape: tuple) -> None:
    """A caller's primal output (if any) must have the op's output shape, x's dtype and
    device."""
    if primal is None:
        return
    if not isinstance(primal, Tensor):
        raise TypeError(f"{op}: primal must be a Tensor, got {type(primal).__name__}")
    if tuple(primal.shape) != tuple(shape) or primal.dtype != x.dtype \
            or primal.device != x.device:
        raise ValueError(f"{op}: primal must be a {x.dtype} tensor of shape {tuple(shape)} on "
                         f"{x.device}, got {primal.dtype} {tuple(primal.shape)} on "
                         f"{primal.device}")
