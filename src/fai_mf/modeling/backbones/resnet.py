"""ResNet-vd (focoos `resnet`): PaddleDetection ResNet as ported by RT-DETR; module names follow the focoos checkpoints."""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from ..folding import conv_bn_act
from .base import FEATURE_NAMES, Backbone


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
