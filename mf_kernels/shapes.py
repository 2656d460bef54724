"""The shapes a real FAI-MF model gives each op (SPEC §5), shared by tests, benchmarks, AOT and roofline.

At a 640² input the decoder attends to the stride-32, 16 and 8 levels: 20², 40², 80² keys, with
Q = 100 queries, hidden D = 256 and 8 heads (head dim 32), batch 1. The FPN steps run at strides 16, 8,
4; the post-processing sees 160² stride-4 logits of 100 queries, about 20 of them kept.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

RESOLUTION = 640
DECODER_STRIDES = (32, 16, 8)
NUM_QUERIES = 100
HIDDEN_DIM = 256
NUM_HEADS = 8


@dataclass(frozen=True)
class AttentionShape:
    """One masked cross-attention call: q [B, Q, D], k / v [B, H*W, D], mask logits [B, Q, H*W]."""

    name: str
    batch: int
    queries: int
    dim: int
    heads: int
    height: int
    width: int

    @property
    def hw(self) -> int:
        return self.height * self.width

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    def empty_inputs(self, dtype: torch.dtype, device: str | torch.device = "cpu") -> tuple[torch.Tensor, ...]:
        """Uninitialised (q, k, v, mask_logits) with the layout the model produces (contiguous)."""
        q = torch.empty(self.batch, self.queries, self.dim, dtype=dtype, device=device)
        k = torch.empty(self.batch, self.hw, self.dim, dtype=dtype, device=device)
        v = torch.empty_like(k)
        logits = torch.empty(self.batch, self.queries, self.hw, dtype=dtype, device=device)
        return q, k, v, logits


def decoder_attention_shapes(resolution: int = RESOLUTION, batch: int = 1) -> list[AttentionShape]:
    """The three levels the decoder attends to at a square `resolution` input (ceil division, like the
    stride-2 convolutions of the backbones)."""
    shapes = []
    for stride in DECODER_STRIDES:
        side = -(-resolution // stride)
        shapes.append(AttentionShape(f"{resolution}px/s{stride} ({side}x{side})", batch, NUM_QUERIES, HIDDEN_DIM,
                                     NUM_HEADS, side, side))
    return shapes


MASKED_ATTENTION_SHAPES = decoder_attention_shapes()


# ----------------------------------------------------------------------------------------------------
# FPN top-down step (mf_kernels.fpn): `adapter_k(res_k) + nearest_upsample(y)` at res4, res3, res2

FPN_LEVELS = (("res4", 16, 1024), ("res3", 8, 512), ("res2", 4, 256))  # ResNet-50/101-vd channels
FPN_MODELS = (("fai-mf-s-coco-ins", 128), ("fai-mf-l-coco-ins", 256))  # pixel_decoder_feat_dim


@dataclass(frozen=True)
class FpnShape:
    """One top-down step: x [B, Cin, H, W] (backbone level), coarse y [B, Cout, h, w] (level above),
    lateral / out [B, Cout, H, W]."""

    model: str
    level: str
    batch: int
    cin: int
    cout: int
    height: int
    width: int
    coarse_height: int
    coarse_width: int

    @property
    def name(self) -> str:
        return (f"{self.model}/{self.level} x{self.cin}x{self.height}x{self.width} "
                f"<- {self.cout}x{self.coarse_height}x{self.coarse_width}")

    def upsample_inputs(self, dtype: torch.dtype, device: str | torch.device = "cpu",
                        generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Random (lateral, coarse) for `fpn_upsample_add`, contiguous NCHW as the model produces them."""
        lateral = torch.randn(self.batch, self.cout, self.height, self.width, generator=generator).to(device, dtype)
        coarse = torch.randn(self.batch, self.cout, self.coarse_height, self.coarse_width,
                             generator=generator).to(device, dtype)
        return lateral, coarse

    def lateral_inputs(self, dtype: torch.dtype, device: str | torch.device = "cpu",
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, ...]:
        """Random (x, weight [Cout, Cin], bias [Cout] fp32, coarse) for `fpn_lateral_upsample_add`."""
        x = torch.randn(self.batch, self.cin, self.height, self.width, generator=generator).to(device, dtype)
        weight = (torch.randn(self.cout, self.cin, generator=generator) * self.cin ** -0.5).to(device, dtype)
        bias = torch.randn(self.cout, generator=generator).to(device)
        coarse = torch.randn(self.batch, self.cout, self.coarse_height, self.coarse_width,
                             generator=generator).to(device, dtype)
        return x, weight, bias, coarse


def fpn_shapes(resolution: int = RESOLUTION, batch: int = 1) -> list[FpnShape]:
    """The three top-down steps of the zoo's ResNet coco-ins models at a square `resolution` (ceil division)."""
    shapes = []
    for model, feat in FPN_MODELS:
        for level, stride, cin in FPN_LEVELS:
            side = -(-resolution // stride)
            coarse = -(-resolution // (2 * stride))
            shapes.append(FpnShape(model, level, batch, cin, feat, side, side, coarse, coarse))
    return shapes


FPN_SHAPES = fpn_shapes()


# ----------------------------------------------------------------------------------------------------
# Mask post-processing (mf_kernels.postprocess): one image's stride-4 logits to its detections


@dataclass(frozen=True)
class PostprocessShape:
    """One image's post-processing: Q queries, K of them kept, C classes, input (H, W), logits at stride 4."""

    name: str
    queries: int
    kept: int
    classes: int
    height: int
    width: int

    @property
    def logits_hw(self) -> tuple[int, int]:
        return -(-self.height // 4), -(-self.width // 4)


# fai-mf-s-coco-ins at 640² (about 20 of 100 queries kept) and fai-mf-m-ade at 640² (semantic, 150 classes).
POSTPROCESS_SHAPES = (
    PostprocessShape("coco-ins 640² (20 of 100 kept)", queries=100, kept=20, classes=80, height=640, width=640),
    PostprocessShape("ade semantic 640²", queries=100, kept=100, classes=150, height=640, width=640),
)
