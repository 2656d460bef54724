"""FPN top-down step: `lateral + nearest_upsample(coarse, size=lateral.shape[-2:])`."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def check_inputs(lateral: torch.Tensor, coarse: torch.Tensor) -> None:
    if lateral.dim() != 4 or coarse.dim() != 4:
        raise ValueError(f"fpn_upsample_add: lateral and coarse must be 4-D [B, C, H, W], got "
                         f"{tuple(lateral.shape)} and {tuple(coarse.shape)}")
    if lateral.shape[:2] != coarse.shape[:2]:
        raise ValueError(f"fpn_upsample_add: batch and channel counts differ: lateral {tuple(lateral.shape)}, "
                         f"coarse {tuple(coarse.shape)}")
    if lateral.dtype != coarse.dtype:
        raise ValueError(f"fpn_upsample_add: dtypes differ: {lateral.dtype} vs {coarse.dtype}")


def fpn_upsample_add_ref(lateral: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
    """lateral [B, C, H, W] + coarse [B, C, h, w] upsampled with PyTorch's "nearest" rule."""
    check_inputs(lateral, coarse)
    return lateral + F.interpolate(coarse, size=lateral.shape[-2:], mode="nearest")
