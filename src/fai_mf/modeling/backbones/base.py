"""What every backbone gives the FPN: `forward(x) -> {"res2", "res3", "res4", "res5"}` and
`output_shape() -> {name: ShapeSpec(channels, stride)}`, the strides as focoos reports them."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

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
