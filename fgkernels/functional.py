"""The dual ops as functions, as ``torch.nn.functional`` has them: each takes Duals (or plain
tensors, meaning a zero tangent) and returns a Dual with the primal and the tangent(s) of the
output. They are the ops' rules (``fgkernels.rules``), which ``Dual`` also runs for
``F.conv2d(dual, w)``, ``dual + dual`` and the like; ``conv2d_batch_norm`` (a convolution and
the batch norm after it as one op) and ``add_direction`` (a new tangent direction) have no torch
twin.
"""
from .rules.layers import (
    adaptive_avg_pool2d,
    add_direction,
    avg_pool2d,
    batch_norm,
    cat,
    conv2d,
    conv2d_batch_norm,
    dropout,
    flatten,
    interpolate,
    linear,
    max_pool2d,
    pad,
    relu,
    reshape,
)
from .rules.losses import cross_entropy
from .rules.pointwise import add, clamp, div, mul, sub, where

__all__ = [
    "conv2d", "linear", "batch_norm", "conv2d_batch_norm", "relu", "max_pool2d", "avg_pool2d",
    "adaptive_avg_pool2d", "interpolate", "flatten", "reshape", "dropout", "pad", "cat", "add",
    "sub", "mul", "div", "where", "clamp", "cross_entropy", "add_direction",
]
