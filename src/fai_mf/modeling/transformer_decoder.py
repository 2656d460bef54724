"""Masked-attention transformer decoder (focoos `head.predictor.*`).

Layer i attends to FPN level i % 3 (strides 32, 16, 8, 32, ...). Each layer is pre-norm:
masked cross-attention -> self-attention -> FFN, each with a residual add. Predictions are made
from `query_feat` before the first layer and after every layer; the attention mask of the next
layer is the previous mask logits resized (bilinear, align_corners=False) to the next level.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import mf_kernels

from .inference import inference_rewrites_apply
from .position_encoding import PositionEmbeddingSine

NUM_LEVELS = 3
NUM_HEADS = 8


class CrossAttentionLayer(nn.Module):
    """q = LN(tgt) + query_pos, k = src + pos, v = src; the attention itself is `mf_kernels`'s op."""

    def __init__(self, dim: int, nheads: int):
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(dim, nheads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.nheads = nheads

    def forward(self, tgt: torch.Tensor, src: torch.Tensor, pos: torch.Tensor, query_pos: torch.Tensor,
                mask_logits: torch.Tensor) -> torch.Tensor:
        """tgt, query_pos [B, Q, D]; src, pos [B, HW, D]; mask_logits [B, Q, HW] -> [B, Q, D]."""
        w_q, w_k, w_v = self.multihead_attn.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.multihead_attn.in_proj_bias.chunk(3)
        q = F.linear(self.norm(tgt) + query_pos, w_q, b_q)
        k = F.linear(src + pos, w_k, b_k)
        v = F.linear(src, w_v, b_v)
        attn = mf_kernels.masked_cross_attention(q, k, v, mask_logits, self.nheads)
        return tgt + self.multihead_attn.out_proj(attn)


class SelfAttentionLayer(nn.Module):
    def __init__(self, dim: int, nheads: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, nheads, batch_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tgt: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
        x = self.norm(tgt)
        qk = x + query_pos
        return tgt + self.self_attn(qk, qk, x, need_weights=False)[0]


class FFNLayer(nn.Module):
    def __init__(self, dim: int, dim_feedforward: int):
        super().__init__()
        self.linear1 = nn.Linear(dim, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tgt: torch.Tensor) -> torch.Tensor:
        return tgt + self.linear2(F.relu(self.linear1(self.norm(tgt))))


class MLP(nn.Module):
    def __init__(self, dim_in: int, hidden: int, dim_out: int, num_layers: int):
        super().__init__()
        dims = [dim_in] + [hidden] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:] + [dim_out]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class PredictionHeads(nn.Module):
    """decoder_norm -> classifier (C+1 logits) and mask_classifier MLP -> einsum with mask_features."""

    def __init__(self, hidden: int, num_classes: int, mask_dim: int):
        super().__init__()
        self.decoder_norm = nn.LayerNorm(hidden)
        self.classifier = nn.Linear(hidden, num_classes + 1)
        self.mask_classifier = MLP(hidden, hidden, mask_dim, 3)

    def forward(self, tgt: torch.Tensor, mask_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tgt [B, Q, D], mask_features [B, M, H4, W4] -> (class_logits [B, Q, C+1], mask_logits [B, Q, H4, W4])."""
        x = self.decoder_norm(tgt)
        mask_embed = self.mask_classifier(x)
        return self.classifier(x), torch.einsum("bqc,bchw->bqhw", mask_embed, mask_features)


@dataclass
class LayerPrediction:
    class_logits: torch.Tensor  # [B, Q, C+1]
    mask_logits: torch.Tensor  # [B, Q, H/4, W/4]


def attention_mask_logits(mask_logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Mask logits [B, Q, H4, W4] resized to a level's size, flattened: [B, Q, h*w]."""
    resized = F.interpolate(mask_logits, size=size, mode="bilinear", align_corners=False)
    return resized.flatten(2)


class MultiScaleMaskedTransformerDecoder(nn.Module):
    def __init__(self, in_channels: int, mask_dim: int, num_classes: int, hidden_dim: int, num_queries: int,
                 dec_layers: int, dim_feedforward: int):
        super().__init__()
        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2)
        self.num_layers = dec_layers
        self.transformer_self_attention_layers = nn.ModuleList(SelfAttentionLayer(hidden_dim, NUM_HEADS) for _ in range(dec_layers))
        self.transformer_cross_attention_layers = nn.ModuleList(CrossAttentionLayer(hidden_dim, NUM_HEADS) for _ in range(dec_layers))
        self.transformer_ffn_layers = nn.ModuleList(FFNLayer(hidden_dim, dim_feedforward) for _ in range(dec_layers))
        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.input_proj = nn.ModuleList(nn.Conv2d(in_channels, hidden_dim, 1) for _ in range(NUM_LEVELS))
        self.forward_prediction_heads = PredictionHeads(hidden_dim, num_classes, mask_dim)

    def forward(self, features: list[torch.Tensor], mask_features: torch.Tensor,
                intermediate: bool = True) -> list[LayerPrediction]:
        """features: [y32, y16, y8] from the pixel decoder; mask_features [B, M, H/4, W/4].

        Returns the predictions before the first layer and after each layer (length dec_layers + 1);
        the last one is the model's output, the others are the aux outputs used in training.

        With `intermediate=False` (only the last prediction is wanted) where the inference rewrites apply
        (`inference_rewrites_apply`), the attention masks come from `_forward_last_only`: the same logits
        computed at each level's size directly, and only the last prediction is returned.
        """
        if len(features) != NUM_LEVELS:
            raise ValueError(f"the decoder takes {NUM_LEVELS} feature levels, got {len(features)}")
        srcs, poss, sizes = [], [], []
        for level, x in enumerate(features):
            sizes.append(tuple(x.shape[-2:]))
            poss.append(self.pe_layer(x).flatten(2).transpose(1, 2))
            srcs.append(self.input_proj[level](x).flatten(2).transpose(1, 2))
        b = mask_features.shape[0]
        query_pos = self.query_embed.weight.unsqueeze(0).expand(b, -1, -1)
        tgt = self.query_feat.weight.unsqueeze(0).expand(b, -1, -1)

        if not intermediate and inference_rewrites_apply(self, mask_features):
            return [self._forward_last_only(tgt, query_pos, srcs, poss, sizes, mask_features)]
        class_logits, mask_logits = self.forward_prediction_heads(tgt, mask_features)
        predictions = [LayerPrediction(class_logits, mask_logits)]
        for i in range(self.num_layers):
            level = i % NUM_LEVELS
            attn_logits = attention_mask_logits(mask_logits, sizes[level])
            tgt = self.transformer_cross_attention_layers[i](tgt, srcs[level], poss[level], query_pos, attn_logits)
            tgt = self.transformer_self_attention_layers[i](tgt, query_pos)
            tgt = self.transformer_ffn_layers[i](tgt)
            class_logits, mask_logits = self.forward_prediction_heads(tgt, mask_features)
            predictions.append(LayerPrediction(class_logits, mask_logits))
        return predictions

    def _forward_last_only(self, tgt: torch.Tensor, query_pos: torch.Tensor, srcs: list[torch.Tensor],
                           poss: list[torch.Tensor], sizes: list[tuple[int, int]],
                           mask_features: torch.Tensor) -> LayerPrediction:
        """The decoder for inference: intermediate mask logits only at the size of the level they mask.

        A layer's attention mask is bilinear(einsum(embed, mask_features)) at the next level's size.
        Bilinear resizing is linear and acts per channel, so it commutes with the channel contraction:
        einsum(embed, bilinear(mask_features)) is the same logits, at 1/64, 1/16, 1/4 of the stride-4 cost
        (the stride-4 einsum of each intermediate prediction is most of the decoder's FLOPs). Only the
        last prediction is computed at stride 4; intermediate class logits are skipped (unused).
        """
        heads = self.forward_prediction_heads
        level_features = [F.interpolate(mask_features, size=size, mode="bilinear", align_corners=False)
                          for size in sizes]
        for i in range(self.num_layers):
            level = i % NUM_LEVELS
            embed = heads.mask_classifier(heads.decoder_norm(tgt))
            attn_logits = torch.einsum("bqc,bchw->bqhw", embed, level_features[level]).flatten(2)
            tgt = self.transformer_cross_attention_layers[i](tgt, srcs[level], poss[level], query_pos, attn_logits)
            tgt = self.transformer_self_attention_layers[i](tgt, query_pos)
            tgt = self.transformer_ffn_layers[i](tgt)
        class_logits, mask_logits = heads(tgt, mask_features)
        return LayerPrediction(class_logits, mask_logits)
