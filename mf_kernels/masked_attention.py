"""Masked cross-attention of the Mask2Former decoder.

Inputs are already projected: q [B, Q, D], k and v [B, HW, D], `num_heads` heads of D / num_heads,
and the level's mask logits [B, Q, HW]. A key is blocked for a query where its logit < 0; a query
whose keys are all blocked attends to every key. Returns [B, Q, D] (heads concatenated, before the
output projection).
"""
from __future__ import annotations

import torch


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_logits: torch.Tensor, num_heads: int) -> None:
    """Raise a ValueError that names the problem for inputs no implementation can take."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"masked_cross_attention: q, k, v must be 3-D [B, L, D], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    b, nq, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[2] != d:
        raise ValueError(f"masked_cross_attention: k and v must be [B={b}, HW, D={d}], got {tuple(k.shape)} and {tuple(v.shape)}")
    if tuple(mask_logits.shape) != (b, nq, k.shape[1]):
        raise ValueError(f"masked_cross_attention: mask_logits must be [B, Q, HW] = {(b, nq, k.shape[1])}, "
                         f"got {tuple(mask_logits.shape)}")
    if num_heads < 1 or d % num_heads:
        raise ValueError(f"masked_cross_attention: D={d} is not divisible by num_heads={num_heads}")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(f"masked_cross_attention: q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape[1] == 0:
        raise ValueError("masked_cross_attention: HW must be at least 1")


def masked_cross_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_logits: torch.Tensor,
                               num_heads: int, upcast: bool = False) -> torch.Tensor:
    """Plain PyTorch reference (the single source of truth). `upcast` computes in fp64."""
    check_inputs(q, k, v, mask_logits, num_heads)
    out_dtype = q.dtype
    if upcast:
        q, k, v, mask_logits = (t.double() for t in (q, k, v, mask_logits))
    b, nq, d = q.shape
    hd = d // num_heads
    blocked = mask_logits < 0
    blocked = blocked & ~blocked.all(dim=-1, keepdim=True)  # all-blocked rows attend everywhere
    qh = q.reshape(b, nq, num_heads, hd).transpose(1, 2)
    kh = k.reshape(b, -1, num_heads, hd).transpose(1, 2)
    vh = v.reshape(b, -1, num_heads, hd).transpose(1, 2)
    scores = (qh * hd**-0.5) @ kh.transpose(-1, -2)  # [B, h, Q, HW]
    scores = scores.masked_fill(blocked[:, None], float("-inf"))
    attn = torch.softmax(scores.float() if not upcast else scores, dim=-1).to(vh.dtype)
    out = attn @ vh  # [B, h, Q, hd]
    return out.transpose(1, 2).reshape(b, nq, d).to(out_dtype)
