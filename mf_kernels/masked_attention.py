"""Masked cross-attention of the Mask2Former decoder: reference, SDPA path, registration.

Inputs are already projected: q [B, Q, D], k and v [B, HW, D], `num_heads` heads of D / num_heads,
and the level's mask logits [B, Q, HW]. A key is blocked for a query where its logit < 0; a query
whose keys are all blocked attends to every key. Returns [B, Q, D] (heads concatenated, before the
output projection). The mask is the same for every head.

Implementations (see `mf_kernels.dispatch` for how one is chosen):
  reference  `masked_cross_attention_ref` below: plain PyTorch, the single source of truth
  sdpa       `masked_cross_attention_sdpa` below: PyTorch's fused `scaled_dot_product_attention` with one
             boolean [B, 1, Q, HW] mask broadcast over the heads (the reference builds [B, h, Q, HW]
             scores, masks and probabilities); what auto picks for CPU tensors, and the CUDA fallback
  triton     `mf_kernels.masked_attention_triton` (split-key flash-decoding kernels), imported lazily
             because triton reads TRITON_INTERPRET when the kernels are decorated
  cpp, cuda  not implemented for this op

What each backend accepts is stated once in `mf_kernels.masked_attention_limits`. The roofline rows
(bytes, FLOPs of the Triton plan) are at the end of this file.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import dispatch
from .masked_attention_limits import DTYPES, TRITON_DTYPES, check_inputs, device_reasons, inputs_of, triton_reasons


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


def masked_cross_attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_logits: torch.Tensor,
                                num_heads: int) -> torch.Tensor:
    """Same result as the reference through `F.scaled_dot_product_attention` and one [B, 1, Q, HW] mask.

    The all-blocked rule is applied to the mask before SDPA, so SDPA never sees a fully masked row
    (which it would turn into NaN or zeros).
    """
    check_inputs(q, k, v, mask_logits, num_heads)
    b, nq, d = q.shape
    hd = d // num_heads
    attend = ~(mask_logits < 0)  # not `>= 0`: a NaN logit is open, as in the reference
    attend |= ~attend.any(dim=-1, keepdim=True)
    qh = q.reshape(b, nq, num_heads, hd).transpose(1, 2)
    kh = k.reshape(b, -1, num_heads, hd).transpose(1, 2)
    vh = v.reshape(b, -1, num_heads, hd).transpose(1, 2)
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=attend[:, None])
    return out.transpose(1, 2).reshape(b, nq, d)


def _masked_cross_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_logits: torch.Tensor,
                                   num_heads: int) -> torch.Tensor:
    from .masked_attention_triton import masked_cross_attention_triton

    return masked_cross_attention_triton(q, k, v, mask_logits, num_heads)


masked_cross_attention = dispatch.define_op("masked_cross_attention", masked_cross_attention_ref, inputs_of)
masked_cross_attention.__doc__ = """masked_cross_attention(q [B, Q, D], k [B, HW, D], v [B, HW, D], mask_logits [B, Q, HW],
num_heads) -> [B, Q, D], run by the backend that `mf_kernels.dispatch` picks; see this module's doc."""
masked_cross_attention.register(
    "sdpa", masked_cross_attention_sdpa, devices=("cpu", "cuda"), dtypes=DTYPES, check=device_reasons,
    description="torch scaled_dot_product_attention, one mask broadcast over heads")
masked_cross_attention.register(
    "triton", _masked_cross_attention_triton, devices=("cpu", "cuda"), dtypes=TRITON_DTYPES,
    environment=dispatch.triton_environment("mf_kernels.masked_attention_triton"), check=triton_reasons,
    description="split-key online-softmax Triton kernels")
dispatch.register_aot_provider("masked_cross_attention", "mf_kernels.masked_attention_triton:aot_specs")


# ----------------------------------------------------------------------------------------------------
# Roofline (`python -m mf_kernels.roofline`, `fai-mf bench roofline`)


def roofline_row(shape, dtype: torch.dtype):
    """One call at an `AttentionShape`: QK^T and PV are 2·B·Q·HW·D multiply-adds each (4·B·Q·HW·D FLOPs; the
    softmax's few ops per score are left out). Minimum traffic: q, k, v, mask logits in, out. The Triton
    plan (sm_75 config, DRAM bytes when the programs of one key split share q, K/V and the bits through
    L2, as the grid order intends) adds the bit mask (written, read back) and the fp32 partial states of
    every split (written, read back by the combine kernel). Its dots run on FMA units on the T4."""
    import math

    from .launch import T4_SM_COUNT
    from .masked_attention_triton import MIN_KEYS_PER_SPLIT, config_for, num_splits_for
    from .roofline import Row

    s = torch.empty((), dtype=dtype).element_size()
    b, q, d, h, hw = shape.batch, shape.queries, shape.dim, shape.heads, shape.hw
    minimum = b * q * d * s + 2 * b * hw * d * s + b * q * hw * s + b * q * d * s
    config = config_for(75, dtype, q)
    n_splits, _ = num_splits_for(b * h, math.ceil(q / config.block_q), math.ceil(hw / config.block_k), T4_SM_COUNT,
                                 math.ceil(MIN_KEYS_PER_SPLIT / config.block_k))
    bits = b * q * math.ceil(hw / 32) * 4
    partials = b * h * n_splits * q * (shape.head_dim + 2) * 4
    return Row("masked_cross_attention", shape.name, dispatch.dtype_name(dtype), minimum, 4 * b * q * hw * d,
               minimum + 2 * bits + 2 * partials, uses_tensor_cores=False)


def roofline_rows() -> list:
    """Rows at the three 640² decoder levels (`MASKED_ATTENTION_SHAPES`), fp16 and fp32."""
    from .shapes import MASKED_ATTENTION_SHAPES

    return [roofline_row(shape, dtype) for dtype in (torch.float16, torch.float32) for shape in MASKED_ATTENTION_SHAPES]


def roofline_call_rows(op: str, args: tuple, kwargs: dict, dtype: torch.dtype) -> list:
    """The row of one recorded call (q, k, v, mask_logits, num_heads) in `dtype`."""
    from .shapes import AttentionShape

    q, k, _, _, heads = args[:5]
    batch, queries, dim = q.shape
    hw = k.shape[1]
    return [roofline_row(AttentionShape(f"Q={queries} HW={hw}", batch, queries, dim, heads, hw, 1), dtype)]


dispatch.register_roofline_provider(("masked_cross_attention",), "mf_kernels.masked_attention:roofline_rows",
                                    "mf_kernels.masked_attention:roofline_call_rows")
