"""Model configuration: `MaskFormerConfig` and the backbone configs, as focoos writes them.

A focoos `model_info.json` holds the config as a plain dict (`config`), with `backbone_config` a dict
whose `model_type` selects the backbone. Unknown fields are an error: a silently ignored field is a
model that does not match its checkpoint.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Literal

logger = logging.getLogger(__name__)

PostprocessingType = Literal["semantic", "instance"]


class ConfigError(ValueError):
    """A config that cannot describe a valid FAI-MF model (unknown field, bad value)."""


# Fields focoos writes into backbone configs that only concern pretrained-weight download or
# training-time freezing. They do not change the architecture, so they are accepted and ignored.
_BACKBONE_IGNORED_FIELDS = frozenset(
    {"use_pretrained", "backbone_url", "pretrained", "freeze_at", "freeze_norm", "out_features", "num_classes"}
)


@dataclass
class ResNetConfig:
    """PaddleDetection-style ResNet-vd (focoos `resnet`): depth 18, 34, 50 or 101."""

    model_type: Literal["resnet"] = "resnet"
    depth: int = 50
    variant: Literal["d"] = "d"

    def __post_init__(self) -> None:
        if self.depth not in (18, 34, 50, 101):
            raise ConfigError(f"resnet depth must be one of 18, 34, 50, 101, got {self.depth!r}")
        if self.variant != "d":
            raise ConfigError(f"only the ResNet-vd variant 'd' is supported, got {self.variant!r}")


@dataclass
class STDCConfig:
    """STDC (focoos `stdc`): layers [2, 2, 2] is STDC-1, [4, 5, 3] is STDC-2."""

    model_type: Literal["stdc"] = "stdc"
    layers: list[int] = field(default_factory=lambda: [4, 5, 3])
    base: int = 64
    block_num: int = 4

    def __post_init__(self) -> None:
        if len(self.layers) != 3 or any(int(n) < 1 for n in self.layers):
            raise ConfigError(f"stdc layers must be three positive block counts, got {self.layers!r}")
        if self.block_num < 2 or self.base % 2**self.block_num:
            raise ConfigError(f"stdc needs block_num >= 2 and base divisible by 2**block_num, got {self.base}, {self.block_num}")
        self.layers = [int(n) for n in self.layers]


BackboneConfig = ResNetConfig | STDCConfig
_BACKBONE_CONFIGS: dict[str, type] = {"resnet": ResNetConfig, "stdc": STDCConfig}


def backbone_config_from_dict(data: dict[str, Any] | BackboneConfig) -> BackboneConfig:
    """Build a backbone config from a focoos-style dict (`model_type` selects the class)."""
    if isinstance(data, (ResNetConfig, STDCConfig)):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"backbone_config must be a dict with 'model_type', got {type(data).__name__}")
    model_type = data.get("model_type")
    if model_type not in _BACKBONE_CONFIGS:
        raise ConfigError(f"backbone_config.model_type must be one of {sorted(_BACKBONE_CONFIGS)}, got {model_type!r}")
    cls = _BACKBONE_CONFIGS[model_type]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known - _BACKBONE_IGNORED_FIELDS)
    if unknown:
        raise ConfigError(f"unknown field(s) in backbone_config ({model_type}): {', '.join(unknown)}")
    ignored = sorted(set(data) & _BACKBONE_IGNORED_FIELDS)
    if ignored:
        logger.debug("backbone_config: ignoring non-architectural field(s) %s", ignored)
    return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class MaskFormerConfig:
    """FAI-MF configuration: the focoos fields, with the defaults of SPEC §2."""

    num_classes: int
    backbone_config: BackboneConfig = field(default_factory=ResNetConfig)
    num_queries: int = 100
    resolution: int = 640
    pixel_mean: list[float] = field(default_factory=lambda: [123.675, 116.28, 103.53])
    pixel_std: list[float] = field(default_factory=lambda: [58.395, 57.12, 57.375])
    size_divisibility: int = 0
    pixel_decoder_out_dim: int = 256
    pixel_decoder_feat_dim: int = 256
    pixel_decoder_transformer_layers: int = 0
    pixel_decoder_transformer_dropout: float = 0.0
    pixel_decoder_transformer_nheads: int = 8
    pixel_decoder_transformer_dim_feedforward: int = 1024
    transformer_predictor_out_dim: int = 256
    transformer_predictor_hidden_dim: int = 256
    transformer_predictor_dec_layers: int = 6
    transformer_predictor_dim_feedforward: int = 1024
    head_out_dim: int = 256
    cls_sigmoid: bool = False
    postprocessing_type: PostprocessingType = "semantic"
    top_k: int = 100
    mask_threshold: float = 0.5
    predict_all_pixels: bool = False
    use_mask_score: bool = False
    # Written by focoos; empty masks are always dropped by our post-processing (SPEC §3).
    filter_empty_masks: bool = False
    threshold: float = 0.5
    criterion_deep_supervision: bool = True
    criterion_eos_coef: float = 0.1
    criterion_num_points: int = 12544
    weight_dict_loss_dice: float = 5
    weight_dict_loss_mask: float = 5
    weight_dict_loss_ce: float = 2
    matcher_cost_class: float = 2
    matcher_cost_mask: float = 5
    matcher_cost_dice: float = 5

    def __post_init__(self) -> None:
        self.backbone_config = backbone_config_from_dict(self.backbone_config)
        self._validate()

    def _validate(self) -> None:
        def positive(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")

        for name in ("num_classes", "num_queries", "pixel_decoder_out_dim", "pixel_decoder_feat_dim",
                     "transformer_predictor_hidden_dim", "transformer_predictor_dec_layers",
                     "transformer_predictor_dim_feedforward", "head_out_dim",
                     "pixel_decoder_transformer_nheads", "pixel_decoder_transformer_dim_feedforward"):
            positive(name)
        if self.transformer_predictor_hidden_dim % 8:
            raise ConfigError(f"transformer_predictor_hidden_dim must be divisible by the 8 decoder heads, "
                              f"got {self.transformer_predictor_hidden_dim}")
        if self.pixel_decoder_transformer_layers < 0:
            raise ConfigError("pixel_decoder_transformer_layers must be >= 0")
        if self.pixel_decoder_transformer_layers and self.pixel_decoder_feat_dim % self.pixel_decoder_transformer_nheads:
            raise ConfigError("pixel_decoder_feat_dim must be divisible by pixel_decoder_transformer_nheads")
        if self.postprocessing_type not in ("semantic", "instance"):
            raise ConfigError(f"postprocessing_type must be 'semantic' or 'instance', got {self.postprocessing_type!r}")
        if len(self.pixel_mean) != 3 or len(self.pixel_std) != 3:
            raise ConfigError("pixel_mean and pixel_std must have 3 values (RGB)")
        if any(s <= 0 for s in self.pixel_std):
            raise ConfigError(f"pixel_std must be positive, got {self.pixel_std}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MaskFormerConfig":
        """Build from a focoos `model_info.json` `config` dict; unknown fields are an error."""
        if not isinstance(data, dict):
            raise ConfigError(f"config must be a dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown field(s) in MaskFormerConfig: {', '.join(unknown)}")
        if "num_classes" not in data:
            raise ConfigError("MaskFormerConfig needs num_classes")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **overrides: Any) -> "MaskFormerConfig":
        """A copy with some fields changed (same validation as construction)."""
        data = self.to_dict()
        unknown = sorted(set(overrides) - set(data))
        if unknown:
            raise ConfigError(f"unknown config override(s): {', '.join(unknown)}")
        data.update(overrides)
        return MaskFormerConfig.from_dict(data)
