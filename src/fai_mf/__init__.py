"""FAI-MF: FocoosAI's lightweight Mask2Former, with fused kernels from `mf_kernels`.

Importing this package never touches CUDA and never compiles anything.
"""
from __future__ import annotations

from .config import ConfigError, MaskFormerConfig, ResNetConfig, STDCConfig
from .io import CheckpointError, FAIMFModel, load_model
from .modeling.model import FAIMaskFormer, MaskFormerModelOutput, RawOutput
from .zoo import ZOO

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "ConfigError", "FAIMFModel", "FAIMaskFormer", "MaskFormerConfig", "MaskFormerModelOutput",
    "RawOutput", "ResNetConfig", "STDCConfig", "ZOO", "load_model",
]
