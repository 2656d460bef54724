"""FAI-MF: FocoosAI's lightweight Mask2Former, with fused kernels from `mf_kernels`.

Importing this package never touches CUDA and never compiles anything.
"""
from __future__ import annotations

from .config import (
    ConfigError, ConvNeXtV2Config, CSPConfig, MaskFormerConfig, MobileNetV2Config, ResNetConfig, STDCConfig, SwinConfig,
)
from .formats import FocoosDet, FocoosDetections, decode_mask, encode_rle
from .io import CheckpointError, FAIMFModel, load_model
from .modeling.model import FAIMaskFormer, MaskFormerModelOutput, RawOutput
from .zoo import ZOO

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "ConfigError", "ConvNeXtV2Config", "CSPConfig", "FAIMFModel", "FAIMaskFormer", "FocoosDet", "FocoosDetections",
    "MaskFormerConfig", "MaskFormerModelOutput", "MobileNetV2Config", "RawOutput", "ResNetConfig", "STDCConfig",
    "SwinConfig", "ZOO", "decode_mask",
    "encode_rle", "load_model",
]
