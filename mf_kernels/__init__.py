"""Fused kernels for FAI-MF and their PyTorch references.

Importing this package never touches CUDA and never compiles anything.
"""
from __future__ import annotations

from .fpn import fpn_upsample_add_ref
from .masked_attention import masked_cross_attention_ref


def masked_cross_attention(q, k, v, mask_logits, num_heads: int):
    """Masked cross-attention, see `mf_kernels.masked_attention`."""
    return masked_cross_attention_ref(q, k, v, mask_logits, num_heads)


def fpn_upsample_add(lateral, coarse):
    """`lateral + nearest_upsample(coarse)`, see `mf_kernels.fpn`."""
    return fpn_upsample_add_ref(lateral, coarse)


__all__ = ["masked_cross_attention", "masked_cross_attention_ref", "fpn_upsample_add", "fpn_upsample_add_ref"]
