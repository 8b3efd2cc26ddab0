"""Small builds of the blocks that real classification CNNs are made of, written with plain
torch.nn the way torchvision and timm write them, for checking ``fgkernels.convert`` end to end
(tests/nn/test_model_zoo.py) and timing its dual pass (benchmarks/test_models.py).

Each ``build_*(w)`` returns a randomly initialised model of base width ``w`` (even) taking
``(N, 3, H, W)`` images and giving 10 logits; ``MODELS`` maps the CNNs' names to builders.
``build_patch_transformer`` is a transformer in the style of today's language models (RMS norms,
grouped-query attention with rotary positions, a gated MLP) on image patches.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fgkernels.train.models import BasicBlock


class ConvNormAct(nn.Sequential):
    """Conv → BatchNorm → activation, a Sequential subclass as torchvision's
    Conv2dNormActivation."""

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1,
                 act: Callable[[], nn.Module] = nn.ReLU):
        layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                  nn.BatchNorm2d(cout)]
        super().__init__(*layers, *([act()] if act is not None else []))


class Bottleneck(nn.Module):
    """ResNet-50's block: 1×1 → 3×3 → 1×1 with expansion 4."""

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(ConvNormAct(cin, width, 1), ConvNormAct(width, width, 3, stride),
                                  ConvNormAct(width, 4 * width, 1, act=None))
        self.downsample = None if stride == 1 and cin == 4 * width else \
            ConvNormAct(cin, 4 * width, 1, stride, act=None)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(self.body(x) + identity)


class InvertedResidual(nn.Module):
    """MobileNetV2's block: expand 1×1 → depthwise 3×3 → project 1×1, ReLU6."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int = 4):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.conv = nn.Sequential(ConvNormAct(cin, hidden, 1, act=nn.ReLU6),
                                  ConvNormAct(hidden, hidden, 3, stride, hidden, act=nn.ReLU6),
                                  ConvNormAct(hidden, cout, 1, act=None))

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class SqueezeExcite(nn.Module):
    """EfficientNet's / MobileNetV3's squeeze-excitation: pool, reduce, expand, gate, scale."""

    def __init__(self, channels: int, squeeze: int, act=nn.SiLU, gate=nn.Sigmoid):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.act, self.gate = act(), gate()

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.fc2(self.act(self.fc1(s))))


class MBConv(nn.Module):
    """EfficientNet-B0's block (SiLU, sigmoid gate) or MobileNetV3's (hardswish, hardsigmoid)."""

    def __init__(self, cin: int, cout: int, stride: int, act=nn.SiLU, gate=nn.Sigmoid):
        super().__init__()
        hidden = 4 * cin
        self.block = nn.Sequential(ConvNormAct(cin, hidden, 1, act=act),
                                   ConvNormAct(hidden, hidden, 3, stride, hidden, act=act),
                                   SqueezeExcite(hidden, max(1, cin // 4), act, gate),
                                   ConvNormAct(hidden, cout, 1, act=None))
        self.use_res = stride == 1 and cin == cout

    def forward(self, x):
        out = self.block(x)
        return out + x if self.use_res else out


def channel_shuffle(x, groups: int):
    """ShuffleNet's shuffle, as torchvision writes it: view, transpose, contiguous, view."""
    n, c, h, w = x.size()
    x = x.view(n, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(n, -1, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2's unit (stride 1): split in two with chunk, transform one half, shuffle."""

    def __init__(self, channels: int):
        super().__init__()
        half = channels // 2
        self.branch = nn.Sequential(ConvNormAct(half, half, 1),
                                    ConvNormAct(half, half, 3, groups=half, act=None),
                                    ConvNormAct(half, half, 1))

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat((a, self.branch(b)), dim=1), 2)


class DenseLayer(nn.Module):
    """DenseNet's layer: BN-ReLU-conv on the concatenation of every earlier output."""

    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.norm, self.relu = nn.BatchNorm2d(cin), nn.ReLU()
        self.conv = nn.Conv2d(cin, growth, 3, 1, 1, bias=False)

    def forward(self, features):
        return self.conv(self.relu(self.norm(torch.cat(features, 1))))


class DenseBlock(nn.Module):
    def __init__(self, cin: int, growth: int, layers: int):
        super().__init__()
        self.layers = nn.ModuleList(DenseLayer(cin + i * growth, growth) for i in range(layers))

    def forward(self, x):
        features = [x]
        for layer in self.layers:
            features.append(layer(features))
        return torch.cat(features, 1)


class LayerNorm2d(nn.LayerNorm):
    """ConvNeXt's LayerNorm over the channels of an NCHW tensor: permute, normalise, permute."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """ConvNeXt's block: depthwise 7×7, channels-last LayerNorm, MLP with GELU, layer scale."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1, self.act, self.pwconv2 = nn.Linear(dim, 4 * dim), nn.GELU(), \
            nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(1e-1 * torch.ones(dim))

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        # contiguous(): torch's own group-norm JVP (the oracle of the tests) fails on a
        # channels-last tangent.
        return (x + (self.gamma * y).permute(0, 3, 1, 2)).contiguous()


class RotaryAttention(nn.Module):
    """Self-attention as LLaMA-style models write it: grouped-query heads (``kv_heads`` key and
    value heads, each shared by ``heads // kv_heads`` query heads by repeat_interleave), rotary
    positions (q and k rotated by position-dependent angles: cos, sin, a half-rotation by cat)."""

    def __init__(self, dim: int, heads: int = 4, kv_heads: int = 2):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.head_dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def _rotate(self, x):
        n, d = x.shape[-2], x.shape[-1]
        freq = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=x.dtype) / d)
        angle = torch.outer(torch.arange(n, dtype=x.dtype), freq).repeat(1, 2)
        a, b = x.chunk(2, dim=-1)
        return x * torch.cos(angle) + torch.cat([-b, a], dim=-1) * torch.sin(angle)

    def forward(self, x):
        n, length, _ = x.shape
        q = self.q(x).view(n, length, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(n, length, 2 * self.kv_heads, self.head_dim).transpose(1, 2) \
            .chunk(2, dim=1)
        group = self.heads // self.kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        y = F.scaled_dot_product_attention(self._rotate(q), self._rotate(k), v)
        return self.out(y.transpose(1, 2).reshape(n, length, -1))


class SwiGLU(nn.Module):
    """The gated MLP of LLaMA-style blocks: ``w2(silu(w1 x) · w3 x)``."""

    def __init__(self, dim: int):
        super().__init__()
        self.w1, self.w3 = nn.Linear(dim, 2 * dim, bias=False), nn.Linear(dim, 2 * dim, bias=False)
        self.w2 = nn.Linear(2 * dim, dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class RMSBlock(nn.Module):
    """A pre-norm transformer block with RMS norms: ``x + attn(norm x)``, then the MLP's."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm1, self.attn = nn.RMSNorm(dim), RotaryAttention(dim)
        self.norm2, self.mlp = nn.RMSNorm(dim), SwiGLU(dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchTransformer(nn.Module):
    """Patches of 4×4 pixels embedded by a strided convolution, ``depth`` RMS-norm blocks, the
    mean token normed and classified."""

    def __init__(self, w: int, depth: int = 2):
        super().__init__()
        self.embed = nn.Conv2d(3, w, 4, stride=4)
        self.blocks = nn.Sequential(*[RMSBlock(w) for _ in range(depth)])
        self.norm, self.head = nn.RMSNorm(w), nn.Linear(w, 10)

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        return self.head(self.norm(self.blocks(tokens).mean(1)))


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d: a BatchNorm2d subclass whose own forward applies an activation."""

    def __init__(self, channels: int, act=nn.ReLU):
        super().__init__(channels)
        self.act = act()

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, self.momentum, self.eps)
        return self.act(x)


def _classifier(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.0),
                         nn.Linear(channels, 10))


def build_resnet(w: int = 8) -> nn.Module:
    return nn.Sequential(ConvNormAct(3, w), BasicBlock(w, w), BasicBlock(w, 2 * w, 2),
                         Bottleneck(2 * w, w // 2), nn.MaxPool2d(2), _classifier(2 * w))


def build_mobilenet_v2(w: int = 8) -> nn.Module:
    return nn.Sequential(ConvNormAct(3, w, stride=2, act=nn.ReLU6), InvertedResidual(w, w, 1),
                         InvertedResidual(w, 3 * w // 2, 2), _classifier(3 * w // 2))


def build_efficientnet(w: int = 8) -> nn.Module:
    return nn.Sequential(ConvNormAct(3, w, stride=2, act=nn.SiLU), MBConv(w, w, 1),
                         MBConv(w, 3 * w // 2, 2), _classifier(3 * w // 2))


def build_mobilenet_v3(w: int = 8) -> nn.Module:
    return nn.Sequential(ConvNormAct(3, w, stride=2, act=nn.Hardswish),
                         MBConv(w, w, 1, nn.Hardswish, nn.Hardsigmoid),
                         MBConv(w, 3 * w // 2, 2, nn.ReLU, nn.Hardsigmoid),
                         _classifier(3 * w // 2))


def build_shufflenet(w: int = 8) -> nn.Module:
    return nn.Sequential(ConvNormAct(3, w), ShuffleUnit(w), ShuffleUnit(w), _classifier(w))


def build_densenet(w: int = 8) -> nn.Module:
    out = w + 3 * (w // 2)
    return nn.Sequential(ConvNormAct(3, w), DenseBlock(w, w // 2, 3), nn.BatchNorm2d(out),
                         nn.ReLU(), _classifier(out))


def build_convnext(w: int = 8) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, w, 2, 2), LayerNorm2d(w, eps=1e-6), ConvNeXtBlock(w),
                         ConvNeXtBlock(w), nn.GroupNorm(2, w), _classifier(w))


def build_timm_resnet(w: int = 8) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, w, 3, 1, 1, bias=False), BatchNormAct2d(w),
                         nn.Conv2d(w, w, 3, 2, 1, bias=False), BatchNormAct2d(w, nn.LeakyReLU),
                         _classifier(w))


def build_patch_transformer(w: int = 8) -> nn.Module:
    return PatchTransformer(w)


MODELS: dict[str, Callable[[], nn.Module]] = {
    "resnet": build_resnet, "mobilenet_v2": build_mobilenet_v2,
    "efficientnet": build_efficientnet, "mobilenet_v3": build_mobilenet_v3,
    "shufflenet": build_shufflenet, "densenet": build_densenet, "convnext": build_convnext,
    "timm_resnet": build_timm_resnet,
}
