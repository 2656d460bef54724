"""Model configuration: `MaskFormerConfig` and the backbone configs, as focoos writes them.

A focoos `model_info.json` holds the config as a plain dict (`config`), with `backbone_config` a dict
whose `model_type` selects the backbone. Unknown fields are an error: a silently ignored field is a
model that does not match its checkpoint.
"""
from __future__ import annotations

import dataclasses
import logging
import types
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal, Union

logger = logging.getLogger(__name__)

PostprocessingType = Literal["semantic", "instance"]


class ConfigError(ValueError):
    """A config that cannot describe a valid FAI-MF model (unknown field, bad value)."""


# ------------------------------------------------------------------------------------ field checks
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {type(None): "null", bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    """(ok, value converted to `tp`) for the JSON-like types the configs use. No conversion between kinds:
    a string is never a boolean or a number, a bool is never a number, a string is never a list."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in typing.get_args(tp)), value
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, converted = _coerce(value, arg)
            if ok:
                return True, converted
        return False, value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False, value
        item = typing.get_args(tp)[0]
        items = [_coerce(v, item) for v in value]
        return all(ok for ok, _ in items), [v for _, v in items]
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if tp is str:
        return isinstance(value, str), value
    return True, value


def check_field_types(obj: Any, where: str) -> None:
    """Check (and normalise: tuples to lists, ints to floats) every dataclass field of `obj` against its
    annotation; a mismatch is a ConfigError naming `where.field`, the expected type and the value."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        ok, converted = _coerce(value, hints[f.name])
        if not ok:
            raise ConfigError(f"{where}.{f.name} must be {_type_name(hints[f.name])}, got {value!r}")
        if converted is not value:
            object.__setattr__(obj, f.name, converted)


def _known_fields(cls: type, data: dict[str, Any], where: str, allow_unknown: bool) -> dict[str, Any]:
    """`data` restricted to the fields of `cls`. Unknown fields are a ConfigError naming them, or, with
    `allow_unknown`, a warning naming them (the opt-out for files from a newer focoos)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        if not allow_unknown:
            raise ConfigError(f"unknown field(s) in {where}: {', '.join(unknown)} "
                              "(pass allow_unknown_fields=True to ignore them with a warning)")
        warnings.warn(f"ignoring unknown field(s) in {where}: {', '.join(unknown)}", stacklevel=3)
    return {k: v for k, v in data.items() if k in known}


# ------------------------------------------------------------------------------------ backbone configs
_BACKBONE_CONFIGS: dict[str, type] = {}


def register_backbone_config(cls: type) -> type:
    """Class decorator: `cls` (a dataclass with a `model_type` default) is the config of that model_type."""
    _BACKBONE_CONFIGS[cls.model_type] = cls
    return cls


@dataclass
class BackboneConfigBase:
    """The fields focoos's `BackboneConfig` gives every backbone config. Both only concern downloading
    pretrained backbone weights, which a checkpoint loader never does; they are kept so `save()` writes
    them back as focoos wrote them."""

    use_pretrained: bool = False
    backbone_url: str | None = None

    def __post_init__(self) -> None:
        check_field_types(self, f"backbone_config ({self.model_type})")  # type: ignore[attr-defined]
        self.validate()

    def validate(self) -> None:
        """Value checks beyond the field types (subclasses)."""

    def to_dict(self) -> dict[str, Any]:
        """The backbone config as focoos writes it into model_info.json (every field, in its order)."""
        return dataclasses.asdict(self)


_IN_CHANS_WHY = "FAI-MF normalises 3-channel RGB input (pixel_mean and pixel_std have 3 values)"


def _in_chans_3(where: str, value: int) -> None:
    if value != 3:
        raise ConfigError(f"backbone_config ({where}).in_chans = {value} cannot be built: {_IN_CHANS_WHY}")


@register_backbone_config
@dataclass
class ResNetConfig(BackboneConfigBase):
    """focoos `ResnetConfig`: PaddleDetection-style ResNet, depth 18/34/50/101, variants a/b/c/d."""

    model_type: Literal["resnet"] = "resnet"
    in_chans: int = 3
    depth: int = 50
    variant: str = "d"
    freeze_at: int = -1  # training only
    num_stages: int = 4
    freeze_norm: bool = True  # FrozenBatchNorm2d: no num_batches_tracked in the state_dict
    act: str | None = "relu"  # None: no activation at all
    pretrained: bool = False  # unused by focoos

    ACTIVATIONS = ("relu", "gelu", "silu", "leaky_relu")

    def validate(self) -> None:
        _in_chans_3("resnet", self.in_chans)
        if self.depth not in (18, 34, 50, 101):
            raise ConfigError(f"backbone_config (resnet).depth must be one of 18, 34, 50, 101, got {self.depth!r}")
        if self.num_stages != 4:
            raise ConfigError(f"backbone_config (resnet).num_stages = {self.num_stages} cannot be built: FAI-MF "
                              "takes all four stages (res2..res5) from the backbone")
        if self.act is not None and self.act.lower() not in self.ACTIVATIONS:
            why = " (it halves the width, so the residual add cannot run)" if self.act.lower() == "glu" else ""
            raise ConfigError(f"backbone_config (resnet).act must be one of {', '.join(self.ACTIVATIONS)} or null, "
                              f"got {self.act!r}{why}")
        if self.variant not in ("a", "b", "c", "d"):
            logger.warning("backbone_config (resnet).variant %r is not a, b, c or d: built as focoos builds it, "
                           "like 'b' (7x7 stem, strided 1x1 shortcuts)", self.variant)


@register_backbone_config
@dataclass
class STDCConfig(BackboneConfigBase):
    """focoos `STDCConfig`: STDC-1 is layers [2, 2, 2], STDC-2 [4, 5, 3]; `size` is a preset that overrides
    layers, base, block_num and block_type (the fields keep the values written, as in focoos's files)."""

    model_type: Literal["stdc"] = "stdc"
    in_chans: int = 3
    base: int = 64
    layers: list[int] = field(default_factory=lambda: [4, 5, 3])
    out_features: list[str] = field(default_factory=lambda: ["res2", "res3", "res4", "res5"])
    block_num: int = 4
    block_type: str = "cat"
    size: str | None = None
    use_conv_last: bool = False  # read nowhere in focoos 0.25: builds the identical network

    PRESETS = {  # size -> (layers, base, block_num, block_type)
        "nano": ([2, 2, 2], 32, 4, "cat"),
        "small": ([2, 2, 2], 64, 4, "cat"),
        "large": ([4, 5, 3], 64, 4, "cat"),
    }

    def validate(self) -> None:
        where = "backbone_config (stdc)"
        _in_chans_3("stdc", self.in_chans)
        if self.layers not in ([2, 2, 2], [4, 5, 3]):
            raise ConfigError(f"{where}.layers must be [2, 2, 2] (STDC-1) or [4, 5, 3] (STDC-2), got {self.layers!r}")
        if self.size is not None and self.size not in self.PRESETS:
            raise ConfigError(f"{where}.size must be one of {', '.join(self.PRESETS)} or null, got {self.size!r}")
        if self.block_type not in ("cat", "add"):
            raise ConfigError(f"{where}.block_type must be 'cat' or 'add', got {self.block_type!r}")
        if self.block_num < 2:
            raise ConfigError(f"{where}.block_num must be >= 2, got {self.block_num}")
        if self.base < 1:
            raise ConfigError(f"{where}.base must be a positive integer, got {self.base}")
        names = ["res2", "res3", "res4", "res5"]
        if not self.out_features or any(n not in names for n in self.out_features) \
                or len(set(self.out_features)) != len(self.out_features):
            raise ConfigError(f"{where}.out_features must be distinct names from {names}, got {self.out_features!r}")
        r = self.resolved()
        if (r.base * 4) % 2 ** r.block_num:
            raise ConfigError(f"{where}: base {r.base} with block_num {r.block_num} gives fractional block widths")
        if self.size is not None and (self.layers, self.base, self.block_num, self.block_type) != \
                (r.layers, r.base, r.block_num, r.block_type):
            logger.info("%s.size %r overrides layers/base/block_num/block_type as written", where, self.size)

    def resolved(self) -> "STDCConfig":
        """The network actually built: the `size` preset applied (as focoos applies it)."""
        if self.size is None:
            return self
        layers, base, block_num, block_type = self.PRESETS[self.size]
        return dataclasses.replace(self, size=None, layers=list(layers), base=base, block_num=block_num,
                                   block_type=block_type)


@register_backbone_config
@dataclass
class MobileNetV2Config(BackboneConfigBase):
    """focoos `MobileNetV2Config` (MMSegmentation-style MobileNetV2, ReLU6 also after the projection)."""

    backbone_url: str | None = "https://public.focoos.ai/pretrained_models/backbones/mobilenet_v2.pth"
    model_type: Literal["mobilenet_v2"] = "mobilenet_v2"
    in_chans: int = 3
    widen_factor: float = 1.0
    strides: list[int] = field(default_factory=lambda: [1, 2, 2, 2, 1, 2, 1])
    dilations: list[int] = field(default_factory=lambda: [1, 1, 1, 1, 1, 1, 1])
    frozen_stages: int = -1  # checked, never applied by focoos
    norm: str = "BN"

    NORMS = ("BN", "SyncBN", "FrozenBN", "GN", "")

    def validate(self) -> None:
        where = "backbone_config (mobilenet_v2)"
        _in_chans_3("mobilenet_v2", self.in_chans)
        if not self.widen_factor > 0 or self.widen_factor != self.widen_factor:
            raise ConfigError(f"{where}.widen_factor must be a positive number, got {self.widen_factor!r}")
        for name in ("strides", "dilations"):
            values = getattr(self, name)
            if len(values) != 7 or any(v < 1 for v in values):
                raise ConfigError(f"{where}.{name} must be 7 positive integers (one per stage), got {values!r}")
        if not -1 <= self.frozen_stages <= 6:
            raise ConfigError(f"{where}.frozen_stages must be in -1..6, got {self.frozen_stages}")
        if self.norm == "LN":
            raise ConfigError(f"{where}.norm = 'LN' cannot be built: focoos applies a channels-last LayerNorm to "
                              "NCHW maps, which fails at the first conv")
        if self.norm not in self.NORMS:
            raise ConfigError(f"{where}.norm must be one of {', '.join(repr(n) for n in self.NORMS)}, got {self.norm!r}")


@register_backbone_config
@dataclass
class ConvNeXtV2Config(BackboneConfigBase):
    """focoos `ConvNeXtV2Config`: `model_size` is a preset that overrides depths and embed_dims; custom
    depths/embed_dims need `model_size: null`."""

    model_type: Literal["convnextv2"] = "convnextv2"
    model_size: str | None = "atto"
    drop_path_rate: float = 0.0  # training only
    depths: list[int] | None = None
    embed_dims: list[int] | None = None

    PRESETS = {  # model_size -> (depths, embed_dims)
        "atto": ([2, 2, 6, 2], [40, 80, 160, 320]),
        "femto": ([2, 2, 6, 2], [48, 96, 192, 384]),
        "pico": ([2, 2, 6, 2], [64, 128, 256, 512]),
        "nano": ([2, 2, 8, 2], [80, 160, 320, 640]),
        "tiny": ([3, 3, 9, 3], [96, 192, 384, 768]),
        "base": ([3, 3, 27, 3], [128, 256, 512, 1024]),
        "large": ([3, 3, 27, 3], [192, 384, 768, 1536]),
    }

    def validate(self) -> None:
        where = "backbone_config (convnextv2)"
        if self.model_size:
            if self.model_size not in self.PRESETS:
                raise ConfigError(f"{where}.model_size must be one of {', '.join(self.PRESETS)} or null, "
                                  f"got {self.model_size!r}")
            return
        for name in ("depths", "embed_dims"):
            values = getattr(self, name)
            if values is None or len(values) != 4 or any(v < 1 for v in values):
                raise ConfigError(f"{where}.{name} must be 4 positive integers when model_size is null, got {values!r}")

    def resolved(self) -> "ConvNeXtV2Config":
        """The network actually built: the `model_size` preset applied (as focoos applies it)."""
        if not self.model_size:
            return self
        depths, dims = self.PRESETS[self.model_size]
        return dataclasses.replace(self, model_size=None, depths=list(depths), embed_dims=list(dims))


@register_backbone_config
@dataclass
class CSPConfig(BackboneConfigBase):
    """focoos `CSPConfig`: YOLOX-style CSP-Darknet, sizes small / medium / large."""

    model_type: Literal["csp_darknet"] = "csp_darknet"
    size: str = "small"

    SIZES = ("small", "medium", "large")

    def validate(self) -> None:
        if self.size not in self.SIZES:
            raise ConfigError(f"backbone_config (csp_darknet).size must be one of {', '.join(self.SIZES)}, "
                              f"got {self.size!r}")


@register_backbone_config
@dataclass
class SwinConfig(BackboneConfigBase):
    """focoos `SwinConfig`: `model_size` is a preset that overrides embed_dim, depths, num_heads,
    window_size and pretrain_img_size."""

    model_type: Literal["swin"] = "swin"
    model_size: str | None = None
    pretrain_img_size: int = 224
    patch_size: int = 4
    in_chans: int = 3
    embed_dim: int = 96
    depths: list[int] = field(default_factory=lambda: [2, 2, 6, 2])
    num_heads: list[int] = field(default_factory=lambda: [3, 6, 12, 24])
    window_size: int = 7
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    qk_scale: float | None = None
    drop_rate: float = 0.0  # training only, like the next four
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.2
    ape: bool = False
    patch_norm: bool = True
    out_indices: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    frozen_stages: int = -1
    use_checkpoint: bool = False

    PRESETS = {  # model_size -> (embed_dim, depths, num_heads, window_size, pretrain_img_size)
        "tiny": (96, [2, 2, 6, 2], [3, 6, 12, 24], 7, 224),
        "small": (96, [2, 2, 18, 2], [3, 6, 12, 24], 7, 224),
        "base": (128, [2, 2, 18, 2], [4, 8, 16, 32], 12, 384),
        "large": (192, [2, 2, 18, 2], [6, 12, 24, 48], 12, 384),
    }

    def validate(self) -> None:
        where = "backbone_config (swin)"
        _in_chans_3("swin", self.in_chans)
        if self.model_size is not None and self.model_size not in self.PRESETS:
            raise ConfigError(f"{where}.model_size must be one of {', '.join(self.PRESETS)} or null, "
                              f"got {self.model_size!r}")
        if self.out_indices != [0, 1, 2, 3]:
            raise ConfigError(f"{where}.out_indices = {self.out_indices} cannot be built: FAI-MF takes all four "
                              "stages (res2..res5), out_indices must be [0, 1, 2, 3]")
        r = self.resolved()
        if len(r.depths) != 4 or len(r.num_heads) != 4 or any(v < 1 for v in (*r.depths, *r.num_heads)):
            raise ConfigError(f"{where}: depths and num_heads must be 4 positive integers each, "
                              f"got {r.depths!r}, {r.num_heads!r}")
        for i, heads in enumerate(r.num_heads):
            if (r.embed_dim * 2**i) % heads:
                raise ConfigError(f"{where}: stage {i} width {r.embed_dim * 2**i} is not divisible by its "
                                  f"{heads} heads")
        for name in ("patch_size", "window_size", "pretrain_img_size", "embed_dim"):
            if getattr(r, name) < 1:
                raise ConfigError(f"{where}.{name} must be a positive integer, got {getattr(r, name)}")
        if not self.mlp_ratio > 0:
            raise ConfigError(f"{where}.mlp_ratio must be positive, got {self.mlp_ratio}")

    def resolved(self) -> "SwinConfig":
        """The network actually built: the `model_size` preset applied (as focoos applies it)."""
        if self.model_size is None:
            return self
        dim, depths, heads, window, img = self.PRESETS[self.model_size]
        return dataclasses.replace(self, model_size=None, embed_dim=dim, depths=list(depths),
                                   num_heads=list(heads), window_size=window, pretrain_img_size=img)


BackboneConfig = ResNetConfig | STDCConfig | MobileNetV2Config | ConvNeXtV2Config | CSPConfig | SwinConfig


def backbone_config_from_dict(data: dict[str, Any] | BackboneConfig, allow_unknown: bool = False) -> BackboneConfig:
    """Build a backbone config from a focoos-style dict (`model_type` selects the class). Missing fields
    take focoos's defaults; unknown fields are an error unless `allow_unknown` (then a warning)."""
    if isinstance(data, BackboneConfigBase):
        return data  # type: ignore[return-value]
    if not isinstance(data, dict):
        raise ConfigError(f"backbone_config must be a dict with 'model_type', got {type(data).__name__}")
    model_type = data.get("model_type")
    if model_type not in _BACKBONE_CONFIGS:
        raise ConfigError(f"backbone_config.model_type must be one of {sorted(_BACKBONE_CONFIGS)}, got {model_type!r}")
    cls = _BACKBONE_CONFIGS[model_type]
    return cls(**_known_fields(cls, data, f"backbone_config ({model_type})", allow_unknown))


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
        check_field_types(self, "config")
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
    def from_dict(cls, data: dict[str, Any], allow_unknown_fields: bool = False) -> "MaskFormerConfig":
        """Build from a focoos `model_info.json` `config` dict. Unknown fields (here or in backbone_config)
        are an error; `allow_unknown_fields=True` ignores them with a warning that names them."""
        if not isinstance(data, dict):
            raise ConfigError(f"config must be a dict, got {type(data).__name__}")
        data = _known_fields(cls, data, "config", allow_unknown_fields)
        if "num_classes" not in data:
            raise ConfigError("config needs num_classes")
        if isinstance(data.get("backbone_config"), dict):
            data["backbone_config"] = backbone_config_from_dict(data["backbone_config"], allow_unknown_fields)
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """Every field, in focoos's order, the backbone config as focoos writes it."""
        return dataclasses.asdict(self)

    def replace(self, **overrides: Any) -> "MaskFormerConfig":
        """A copy with some fields changed (same validation as construction)."""
        data = self.to_dict()
        unknown = sorted(set(overrides) - set(data))
        if unknown:
            raise ConfigError(f"unknown config override(s): {', '.join(unknown)}")
        data.update(overrides)
        return MaskFormerConfig.from_dict(data)
