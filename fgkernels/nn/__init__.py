"""Modules for the dual pass: the twins of torch.nn layers that run the fused kernels
(``DualConv2d``, ...), ``convert`` that swaps them in, the fused Conv→BN→ReLU sequences, the
reuse of a plain forward's convolution outputs (``modules``), and ``compile`` (``compiled``)."""
from .compiled import compile
from .modules import (
    TWINS,
    DualAdaptiveAvgPool2d,
    DualAvgPool2d,
    DualBatchNorm1d,
    DualBatchNorm2d,
    DualConv2d,
    DualELU,
    DualFlatten,
    DualGELU,
    DualGroupNorm,
    DualHardsigmoid,
    DualHardswish,
    DualHardtanh,
    DualLayerNorm,
    DualLeakyReLU,
    DualLinear,
    DualMaxPool2d,
    DualMish,
    DualModule,
    DualMultiheadAttention,
    DualReLU,
    DualReLU6,
    DualSequential,
    DualSigmoid,
    DualSiLU,
    DualTanh,
    convert,
    register_twin,
    reuse_conv_outputs,
    twin_of,
)

__all__ = ["DualConv2d", "DualBatchNorm2d", "DualBatchNorm1d", "DualReLU", "DualLinear",
           "DualMaxPool2d", "DualAvgPool2d", "DualAdaptiveAvgPool2d", "DualFlatten",
           "DualSequential", "DualModule", "DualLayerNorm", "DualGroupNorm", "DualHardswish",
           "DualHardsigmoid", "DualSiLU", "DualGELU", "DualSigmoid", "DualTanh", "DualHardtanh",
           "DualReLU6", "DualLeakyReLU", "DualELU", "DualMish", "DualMultiheadAttention",
           "TWINS", "convert", "register_twin", "reuse_conv_outputs", "twin_of", "compile"]
