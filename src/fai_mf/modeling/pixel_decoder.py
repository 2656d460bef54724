"""FPN pixel decoder with an optional transformer encoder on res5 (focoos `pixel_decoder.*`).

Outputs the three coarsest FPN maps (strides 32, 16, 8) for the transformer decoder and
`mask_features` at stride 4. Module names follow the focoos checkpoints: `adapter_k` / `layer_k`
are convs that own their BatchNorm as `.norm`, k = 1 (res2) .. 3 (res4), `layer_4` for res5.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import mf_kernels

from ..config import MaskFormerConfig
from .backbones import Backbone, build_backbone
from .folding import bn_tensors, cached_on, conv_bn_act
from .inference import inference_rewrites_apply
from .position_encoding import PositionEmbeddingSine


class ConvNorm(nn.Conv2d):
    """Conv2d (no bias) that owns its BatchNorm as `.norm`, with an optional ReLU after it."""

    def __init__(self, ch_in: int, ch_out: int, kernel_size: int, relu: bool):
        super().__init__(ch_in, ch_out, kernel_size, padding=kernel_size // 2, bias=False)
        self.norm = nn.BatchNorm2d(ch_out)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv_bn_act(self, self.norm, x, self.relu)

    def is_foldable_1x1(self) -> bool:
        """Whether this module is a 1x1 conv (no bias, no ReLU) + BatchNorm with running statistics."""
        return (self.kernel_size == (1, 1) and self.stride == (1, 1) and self.groups == 1 and not self.relu
                and self.bias is None and self.norm.running_mean is not None)

    def folded_1x1(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight [Cout, Cin], bias [Cout]) fp32 of this 1x1 conv with its eval-mode BatchNorm folded in,
        cached on the module (see `folding.cached_on`)."""
        tensors = bn_tensors(self, self.norm)
        return cached_on(self, "_folded_1x1", tensors, self.norm.eps,
                         lambda: mf_kernels.fold_batchnorm(self.weight[:, :, 0, 0], *tensors[1:], self.norm.eps))

    def lateral_upsample_add(self, x: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        """`self(x) + nearest_upsample(coarse, x's size)`: the FPN top-down step with this adapter.

        Where the inference rewrites apply (`inference_rewrites_apply`), one op
        (`mf_kernels.fpn_lateral_upsample_add`) on the BN-folded weights, so a backend can fuse the conv and
        the add. Training, autograd, and `kernels="reference"` keep conv + BN + `fpn_upsample_add`, exactly
        the reference model.
        """
        if not (self.is_foldable_1x1() and inference_rewrites_apply(self, x)):
            return mf_kernels.fpn_upsample_add(self(x), coarse)
        weight, bias = self.folded_1x1()
        return mf_kernels.fpn_lateral_upsample_add(x, weight, bias, coarse)


class EncoderLayer(nn.Module):
    """Pre-norm transformer encoder layer (self-attention with position added to q and k, ReLU FFN)."""

    def __init__(self, dim: int, nheads: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, nheads, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(dim, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, src: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        x = self.norm1(src)
        qk = x + pos
        src = src + self.dropout(self.self_attn(qk, qk, x, need_weights=False)[0])
        x = self.norm2(src)
        return src + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(x)))))


class TransformerEncoder(nn.Module):
    def __init__(self, num_layers: int, dim: int, nheads: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(dim, nheads, dim_feedforward, dropout) for _ in range(num_layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, src: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            src = layer(src, pos)
        return self.norm(src)


class Transformer(nn.Module):
    """Holds `encoder` so parameter names read `transformer.encoder.*` as in focoos."""

    def __init__(self, num_layers: int, dim: int, nheads: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.encoder = TransformerEncoder(num_layers, dim, nheads, dim_feedforward, dropout)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """x, pos [B, C, H, W] -> [B, C, H, W]."""
        b, c, h, w = x.shape
        out = self.encoder(x.flatten(2).transpose(1, 2), pos.flatten(2).transpose(1, 2))
        return out.transpose(1, 2).reshape(b, c, h, w)


class PixelDecoder(nn.Module):
    def __init__(self, config: MaskFormerConfig, backbone: Backbone | None = None):
        super().__init__()
        self.backbone = backbone if backbone is not None else build_backbone(config.backbone_config)
        shapes = self.backbone.output_shape()
        channels = [shapes[n].channels for n in ("res2", "res3", "res4", "res5")]
        feat = config.pixel_decoder_feat_dim
        self.num_encoder_layers = config.pixel_decoder_transformer_layers
        top_in = channels[3]
        if self.num_encoder_layers > 0:
            self.input_proj = nn.Conv2d(channels[3], feat, 1)
            self.transformer = Transformer(
                self.num_encoder_layers, feat, config.pixel_decoder_transformer_nheads,
                config.pixel_decoder_transformer_dim_feedforward, config.pixel_decoder_transformer_dropout,
            )
            self.pe_layer = PositionEmbeddingSine(feat // 2)
            top_in = feat
        for k in (1, 2, 3):
            self.add_module(f"adapter_{k}", ConvNorm(channels[k - 1], feat, 1, relu=False))
            self.add_module(f"layer_{k}", ConvNorm(feat, feat, 3, relu=True))
        self.layer_4 = ConvNorm(top_in, feat, 3, relu=True)
        self.mask_features = nn.Conv2d(feat, config.pixel_decoder_out_dim, 3, padding=1)
        self.feature_strides = (32, 16, 8)

    def forward_features(self, features: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Backbone features -> (mask_features [B, out, H/4, W/4], [y32, y16, y8] each [B, feat, h, w])."""
        top = features["res5"]
        if self.num_encoder_layers > 0:
            top = self.input_proj(top)
            top = self.transformer(top, self.pe_layer(top))
        y = self.layer_4(top)
        multi_scale = [y]
        for k, name in ((3, "res4"), (2, "res3"), (1, "res2")):
            y = getattr(self, f"layer_{k}")(getattr(self, f"adapter_{k}").lateral_upsample_add(features[name], y))
            if k > 1:
                multi_scale.append(y)
        return self.mask_features(y), multi_scale

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Normalised images [B, 3, H, W] -> (mask_features, [y32, y16, y8])."""
        return self.forward_features(self.backbone(images))
