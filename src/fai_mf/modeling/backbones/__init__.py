"""Backbones, one module each, selected by the config's `model_type` (focoos's names).

Contract shared by every backbone (`base.Backbone`): `forward(x) -> {"res2", "res3", "res4", "res5"}`
and `output_shape() -> {name: ShapeSpec(channels, stride)}`. Module names follow the focoos
checkpoints, so a focoos state_dict loads strictly.
"""
from __future__ import annotations

from typing import Callable

from ...config import BackboneConfig
from .base import FEATURE_NAMES, Backbone, ShapeSpec
from .resnet import ResNetVD
from .stdc import STDCNet

# model_type -> builder taking the backbone config
BUILDERS: dict[str, Callable[[BackboneConfig], Backbone]] = {
    "resnet": lambda config: ResNetVD(config.depth),
    "stdc": lambda config: STDCNet(config.resolved().layers, config.resolved().base, config.resolved().block_num),
}


def build_backbone(config: BackboneConfig) -> Backbone:
    builder = BUILDERS.get(getattr(config, "model_type", None))
    if builder is None:
        raise TypeError(f"no backbone for config {type(config).__name__}")
    return builder(config)


__all__ = ["BUILDERS", "FEATURE_NAMES", "Backbone", "ShapeSpec", "build_backbone"]
