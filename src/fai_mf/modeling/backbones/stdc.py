"""STDC (focoos `stdc`): the STDC-Seg STDCNet; module names follow the focoos checkpoints."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..folding import conv_bn_act
from .base import FEATURE_NAMES, Backbone


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
