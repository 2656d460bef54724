"""FAI-MF: backbone + FPN pixel decoder + masked-attention decoder (focoos `FAIMaskFormer`)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, MaskFormerConfig
from ..losses import MaskFormerCriterion
from .pixel_decoder import PixelDecoder
from .transformer_decoder import LayerPrediction, MultiScaleMaskedTransformerDecoder


RUNTIME_ATTR = "_fai_mf_runtime"  # set by fai_mf.runtime: a callable images -> RawOutput (outside the state_dict)


@dataclass
class RawOutput:
    """Raw head output of the last decoder layer (and the earlier ones as `aux` when training)."""

    class_logits: torch.Tensor  # [B, Q, C+1]
    mask_logits: torch.Tensor  # [B, Q, ceil(H/4), ceil(W/4)]
    aux: list[LayerPrediction] = field(default_factory=list)


@dataclass
class MaskFormerModelOutput:
    masks: torch.Tensor | None  # [B, Q, H, W] probabilities at input size (eval)
    logits: torch.Tensor | None  # [B, Q, C] class probabilities (eval)
    loss: dict[str, torch.Tensor] | None = None


class MaskFormerHead(nn.Module):
    """Holds `predictor` (the transformer decoder) and `criterion` (losses) under focoos' names."""

    def __init__(self, config: MaskFormerConfig):
        super().__init__()

        self.predictor = MultiScaleMaskedTransformerDecoder(
            in_channels=config.pixel_decoder_feat_dim,
            mask_dim=config.head_out_dim,
            num_classes=config.num_classes,
            hidden_dim=config.transformer_predictor_hidden_dim,
            num_queries=config.num_queries,
            dec_layers=config.transformer_predictor_dec_layers,
            dim_feedforward=config.transformer_predictor_dim_feedforward,
        )
        self.criterion = MaskFormerCriterion(config)


class FAIMaskFormer(nn.Module):
    """Images are raw RGB in 0..255, [B, 3, H, W] float, any H and W (no resize, no padding)."""

    def __init__(self, config: MaskFormerConfig):
        super().__init__()
        if config.head_out_dim != config.pixel_decoder_out_dim:
            raise ConfigError(f"head_out_dim ({config.head_out_dim}) must equal pixel_decoder_out_dim "
                              f"({config.pixel_decoder_out_dim}): the mask embedding is dotted with mask_features")
        self.config = config
        self.pixel_decoder = PixelDecoder(config)
        self.head = MaskFormerHead(config)
        self.register_buffer("pixel_mean", torch.tensor(config.pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(config.pixel_std).view(1, 3, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def _check_images(self, images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor [B, 3, H, W], got {type(images).__name__}")
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W] RGB, got shape {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"images must be a float tensor in 0..255, got dtype {images.dtype}")
        if images.shape[0] == 0 or images.shape[2] < 1 or images.shape[3] < 1:
            raise ValueError(f"images must be non-empty, got shape {tuple(images.shape)}")

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        self._check_images(images)
        mean, std = self.pixel_mean.to(images.dtype), self.pixel_std.to(images.dtype)
        return (images.to(self.device) - mean) / std

    def forward_predictions(self, images: torch.Tensor, intermediate: bool = True) -> list[LayerPrediction]:
        """Every prediction of the decoder (`intermediate=False`: possibly only the last, see the decoder)."""
        mask_features, multi_scale = self.pixel_decoder(self.normalize(images))
        return self.head.predictor(multi_scale, mask_features, intermediate=intermediate)

    def forward_raw(self, images: torch.Tensor) -> RawOutput:
        """Raw head output: class_logits [B, Q, C+1], mask_logits [B, Q, ceil(H/4), ceil(W/4)].

        In eval mode this runs the runtime installed by `fai_mf.runtime` (torch.compile, ONNX Runtime)
        when there is one; what it traces or exports is this eager body."""
        if not torch.compiler.is_compiling() and not self.training:
            runtime = self.__dict__.get(RUNTIME_ATTR)
            if runtime is not None:
                return runtime(images)
        predictions = self.forward_predictions(images, intermediate=self.training)
        last = predictions[-1]
        aux = predictions[:-1] if self.training else []
        return RawOutput(last.class_logits, last.mask_logits, aux)

    def class_probs(self, class_logits: torch.Tensor) -> torch.Tensor:
        """[B, Q, C+1] logits -> [B, Q, C] probabilities (softmax, or sigmoid when cls_sigmoid)."""
        if self.config.cls_sigmoid:
            return class_logits.sigmoid()[..., :-1]
        return class_logits.softmax(-1)[..., :-1]

    def forward(self, images: torch.Tensor, targets: list[dict] | None = None) -> MaskFormerModelOutput:
        raw = self.forward_raw(images)
        if self.training:
            if targets is None:
                raise ValueError("training mode needs targets=[{'labels': LongTensor[N], 'masks': BoolTensor[N, H, W]}, ...]")
            return MaskFormerModelOutput(masks=None, logits=None, loss=self.head.criterion(raw, targets))
        masks = F.interpolate(raw.mask_logits.sigmoid(), size=images.shape[-2:], mode="bilinear", align_corners=False)
        return MaskFormerModelOutput(masks=masks, logits=self.class_probs(raw.class_logits), loss=None)
