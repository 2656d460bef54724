"""Backbones: ResNet-vd (18/34/50/101) and STDC (1/2).

Contract shared by every backbone: `forward(x) -> {"res2", "res3", "res4", "res5"}` at strides
4/8/16/32, and `output_shape() -> {name: ShapeSpec(channels, stride)}`. Module names follow the focoos
checkpoints (PaddleDetection ResNet-vd as ported by RT-DETR; the STDC-Seg STDCNet).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import BackboneConfig, ResNetConfig, STDCConfig
from .folding import conv_bn_act

FEATURE_NAMES = ("res2", "res3", "res4", "res5")


@dataclass(frozen=True)
class ShapeSpec:
    channels: int
    stride: int


class Backbone(nn.Module):
    """Base class: subclasses set `_out_channels` (4 ints, res2..res5)."""

    _out_channels: tuple[int, int, int, int]
    _out_strides: tuple[int, int, int, int] = (4, 8, 16, 32)

    def output_shape(self) -> dict[str, ShapeSpec]:
        return {n: ShapeSpec(c, s) for n, c, s in zip(FEATURE_NAMES, self._out_channels, self._out_strides)}


# ----------------------------------------------------------------------------------------- ResNet-vd
class ConvNormLayer(nn.Module):
    """conv (no bias, 'same' padding) -> BatchNorm -> optional ReLU (folded into one conv at inference)."""

    def __init__(self, ch_in: int, ch_out: int, kernel_size: int, stride: int, act: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(ch_in, ch_out, kernel_size, stride, padding=(kernel_size - 1) // 2, bias=False)
        self.norm = nn.BatchNorm2d(ch_out)
        self.relu = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv_bn_act(self.conv, self.norm, x, self.relu)


def _shortcut(ch_in: int, ch_out: int, stride: int) -> nn.Module:
    # ResNet-vd: a strided projection shortcut averages 2x2 first, so the 1x1 conv sees every pixel.
    if stride == 2:
        return nn.Sequential(OrderedDict([
            ("pool", nn.AvgPool2d(2, 2, 0, ceil_mode=True)),
            ("conv", ConvNormLayer(ch_in, ch_out, 1, 1)),
        ]))
    return ConvNormLayer(ch_in, ch_out, 1, stride)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, ch_in: int, ch_out: int, stride: int, shortcut: bool):
        super().__init__()
        self.shortcut = shortcut
        if not shortcut:
            self.short = _shortcut(ch_in, ch_out, stride)
        self.branch2a = ConvNormLayer(ch_in, ch_out, 3, stride, act=True)
        self.branch2b = ConvNormLayer(ch_out, ch_out, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branch2b(self.branch2a(x))
        return F.relu(out + (x if self.shortcut else self.short(x)))


class BottleNeck(nn.Module):
    expansion = 4

    def __init__(self, ch_in: int, ch_out: int, stride: int, shortcut: bool):
        super().__init__()
        # variant "d": the stride sits on the 3x3 conv, not on the first 1x1.
        self.branch2a = ConvNormLayer(ch_in, ch_out, 1, 1, act=True)
        self.branch2b = ConvNormLayer(ch_out, ch_out, 3, stride, act=True)
        self.branch2c = ConvNormLayer(ch_out, ch_out * self.expansion, 1, 1)
        self.shortcut = shortcut
        if not shortcut:
            self.short = _shortcut(ch_in, ch_out * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branch2c(self.branch2b(self.branch2a(x)))
        return F.relu(out + (x if self.shortcut else self.short(x)))


class Blocks(nn.Module):
    def __init__(self, block: type, ch_in: int, ch_out: int, count: int, stage_num: int):
        super().__init__()
        self.blocks = nn.ModuleList()
        for i in range(count):
            stride = 2 if i == 0 and stage_num != 2 else 1
            self.blocks.append(block(ch_in, ch_out, stride=stride, shortcut=i != 0))
            ch_in = ch_out * block.expansion

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


RESNET_DEPTHS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


class ResNetVD(Backbone):
    """ResNet-vd: 3-conv stem (3->32->32->64, first stride 2), max-pool 3/2/1, four stages."""

    def __init__(self, depth: int = 50):
        super().__init__()
        if depth not in RESNET_DEPTHS:
            raise ValueError(f"ResNet-vd depth must be one of {sorted(RESNET_DEPTHS)}, got {depth}")
        stem = [(3, 32, 2, "conv1_1"), (32, 32, 1, "conv1_2"), (32, 64, 1, "conv1_3")]
        self.conv1 = nn.Sequential(OrderedDict(
            (name, ConvNormLayer(cin, cout, 3, s, act=True)) for cin, cout, s, name in stem
        ))
        block = BottleNeck if depth >= 50 else BasicBlock
        widths = (64, 128, 256, 512)
        self.res_layers = nn.ModuleList()
        ch_in = 64
        for i, (width, count) in enumerate(zip(widths, RESNET_DEPTHS[depth])):
            self.res_layers.append(Blocks(block, ch_in, width, count, stage_num=i + 2))
            ch_in = width * block.expansion
        self._out_channels = tuple(w * block.expansion for w in widths)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = F.max_pool2d(self.conv1(x), kernel_size=3, stride=2, padding=1)
        outs = {}
        for name, stage in zip(FEATURE_NAMES, self.res_layers):
            x = stage(x)
            outs[name] = x
        return outs


# ---------------------------------------------------------------------------------------------- STDC
class ConvX(nn.Module):
    """conv (no bias) -> BatchNorm -> ReLU (folded into one conv at inference)."""

    def __init__(self, ch_in: int, ch_out: int, kernel: int = 3, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(ch_in, ch_out, kernel, stride, padding=kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(ch_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv_bn_act(self.conv, self.bn, x, relu=True)


class CatBottleneck(nn.Module):
    """STDC module: a chain of convs with halving widths whose outputs are concatenated.

    With stride 2 the first conv's output is downsampled by a depthwise 3x3 conv-BN (`avd_layer`)
    before the chain, and by AvgPool2d(3, 2, 1) (`skip`) for its own place in the concatenation.
    """

    def __init__(self, ch_in: int, ch_out: int, block_num: int = 4, stride: int = 1):
        super().__init__()
        self.stride = stride
        half = ch_out // 2
        if stride == 2:
            self.avd_layer = nn.Sequential(
                nn.Conv2d(half, half, 3, 2, 1, groups=half, bias=False),
                nn.BatchNorm2d(half),
            )
            self.skip = nn.AvgPool2d(3, 2, 1)
        self.conv_list = nn.ModuleList()
        for idx in range(block_num):
            if idx == 0:
                self.conv_list.append(ConvX(ch_in, half, kernel=1))
            elif idx == 1:
                self.conv_list.append(ConvX(half, half if block_num == 2 else ch_out // 4))
            elif idx < block_num - 1:
                self.conv_list.append(ConvX(ch_out // 2**idx, ch_out // 2 ** (idx + 1)))
            else:
                self.conv_list.append(ConvX(ch_out // 2**idx, ch_out // 2**idx))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = self.conv_list[0](x)
        out = self.avd_layer(first) if self.stride == 2 else first
        outs = []
        for conv in self.conv_list[1:]:
            out = conv(out)
            outs.append(out)
        if self.stride == 2:
            first = self.skip(first)
        return torch.cat([first, *outs], dim=1)


class STDCNet(Backbone):
    """STDC backbone: `features` = ConvX s2, ConvX s2, then CatBottleneck stages for strides 8/16/32."""

    def __init__(self, layers: list[int] | tuple[int, ...] = (4, 5, 3), base: int = 64, block_num: int = 4):
        super().__init__()
        features: list[nn.Module] = [ConvX(3, base // 2, 3, 2), ConvX(base // 2, base, 3, 2)]
        self._stage_ends = [2]
        for i, count in enumerate(layers):
            for j in range(count):
                if j == 0:
                    ch_in = base if i == 0 else base * 2 ** (i + 1)
                    features.append(CatBottleneck(ch_in, base * 2 ** (i + 2), block_num, stride=2))
                else:
                    features.append(CatBottleneck(base * 2 ** (i + 2), base * 2 ** (i + 2), block_num, stride=1))
            self._stage_ends.append(len(features))
        self.features = nn.Sequential(*features)
        self._out_channels = (base, base * 4, base * 8, base * 16)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        outs = {}
        start = 0
        for name, end in zip(FEATURE_NAMES, self._stage_ends):
            for layer in self.features[start:end]:
                x = layer(x)
            outs[name] = x
            start = end
        return outs


def build_backbone(config: BackboneConfig) -> Backbone:
    if isinstance(config, ResNetConfig):
        return ResNetVD(config.depth)
    if isinstance(config, STDCConfig):
        return STDCNet(config.layers, config.base, config.block_num)
    raise TypeError(f"no backbone for config {type(config).__name__}")
