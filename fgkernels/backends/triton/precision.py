"""The precision of float32 products, read as cuDNN's convolutions read it, so that the Triton
convolution computes what ``F.conv2d`` would.

PyTorch's current API (``torch.backends.cudnn.conv.fp32_precision``, falling back on
``torch.backends.cudnn.fp32_precision`` and then ``torch.backends.fp32_precision`` while
``"none"``) is read where it exists: reading the legacy ``torch.backends.cudnn.allow_tf32``
raises once the new API has set the convolutions and the recurrent layers apart. Older
versions have the legacy flag only.
"""
from __future__ import annotations

import torch


def cudnn_conv_fp32_precision() -> str:
    """``"tf32"`` when cuDNN's float32 convolutions may use TF32, else ``"ieee"``."""
    cudnn = torch.backends.cudnn
    conv = getattr(cudnn, "conv", None)
    if conv is None:
        return "tf32" if cudnn.allow_tf32 else "ieee"
    for setting in (conv.fp32_precision, cudnn.fp32_precision, torch.backends.fp32_precision):
        if setting != "none":
            return "tf32" if setting == "tf32" else "ieee"
    return "ieee"


def dot_input_precision(requested: str) -> str:
    """Triton's ``input_precision`` for float32 dots: TF32, or, where full float32 precision
    is asked for, three TF32 products per product (the operands split into a high and a low
    TF32 part, the low·low term dropped: about float32's precision, on the tensor cores)."""
    if requested not in ("tf32", "ieee"):
        raise ValueError(f"float32 precision must be 'tf32' or 'ieee', got {requested!r}")
    return "tf32" if requested == "tf32" else "tf32x3"
