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
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import dispatch

SUPPORTED_HEAD_DIMS = (16, 32, 64)  # Triton: tl.dot needs a power of two >= 16; 32 is FAI-MF's (256 / 8)
MAX_QUERIES = 128  # Triton: the parity-tested range (FAI-MF uses 100)


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


def _inputs_of(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_logits: torch.Tensor,
               num_heads: int, **_: object) -> dispatch.Inputs:
    check_inputs(q, k, v, mask_logits, num_heads)
    devices = {str(t.device) for t in (q, k, v, mask_logits)}
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    return dispatch.make_inputs(q.device, q.dtype, head_dim=q.shape[2] // num_heads, queries=q.shape[1],
                                logits_dtype=mask_logits.dtype, devices=tuple(sorted(devices)), needs_grad=needs_grad)


def _triton_check(inputs: dispatch.Inputs) -> list[str]:
    reasons = ["inputs require grad and the Triton kernels have no backward"] if inputs.needs_grad else []
    if inputs.head_dim not in SUPPORTED_HEAD_DIMS:
        reasons.append(f"head dim {inputs.head_dim} not in {SUPPORTED_HEAD_DIMS}")
    if inputs.queries > MAX_QUERIES:
        reasons.append(f"Q={inputs.queries} > {MAX_QUERIES}")
    if not inputs.logits_dtype.is_floating_point:
        reasons.append(f"mask_logits dtype {inputs.logits_dtype} is not floating point")
    if len(inputs.devices) > 1:
        reasons.append(f"inputs on several devices: {', '.join(inputs.devices)}")
    return reasons


def _sdpa_check(inputs: dispatch.Inputs) -> list[str]:
    return [f"inputs on several devices: {', '.join(inputs.devices)}"] if len(inputs.devices) > 1 else []


masked_cross_attention = dispatch.define_op("masked_cross_attention", masked_cross_attention_ref, _inputs_of)
masked_cross_attention.__doc__ = """masked_cross_attention(q [B, Q, D], k [B, HW, D], v [B, HW, D], mask_logits [B, Q, HW],
num_heads) -> [B, Q, D], run by the backend that `mf_kernels.dispatch` picks; see this module's doc."""
masked_cross_attention.register(
    "sdpa", masked_cross_attention_sdpa, devices=("cpu", "cuda"),
    dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64), check=_sdpa_check,
    description="torch scaled_dot_product_attention, one mask broadcast over heads")
masked_cross_attention.register(
    "triton", _masked_cross_attention_triton, devices=("cpu", "cuda"), dtypes=(torch.float16, torch.float32),
    environment=dispatch.triton_environment("mf_kernels.masked_attention_triton"), check=_triton_check,
    description="split-key online-softmax Triton kernels")
dispatch.register_aot_provider("masked_cross_attention", "mf_kernels.masked_attention_triton:aot_specs")
