"""What masked cross-attention accepts and what its Triton kernels can run, in one wording.

Imported by the registration (`mf_kernels.masked_attention`) and by the launcher
(`mf_kernels.masked_attention_triton`); it imports neither, so the two never import each other.

- `check_inputs`: the contract of every backend (shapes, one floating dtype, HW >= 1); a ValueError that
  names the problem.
- `triton_reasons`: what the Triton kernels refuse (dtype, head dim, Q, grad, devices). The dispatcher lists
  them as refusals, the launcher raises them, both with the same words.
- `inputs_of`: the dispatcher's view of a call; every field takes a few values, so the selection cache
  stays small whatever the shapes.
"""
from __future__ import annotations

import torch

from . import dispatch

OP = "masked_cross_attention"
SUPPORTED_HEAD_DIMS = (16, 32, 64)  # tl.dot needs a power of two >= 16; 32 is FAI-MF's (256 / 8)
MAX_QUERIES = 128  # the parity-tested range of the Triton kernels (FAI-MF uses 100)
TRITON_DTYPES = (torch.float16, torch.float32)
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # reference and sdpa


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_logits: torch.Tensor, num_heads: int) -> None:
    """Raise a ValueError that names the problem for inputs no implementation can take."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"{OP}: q, k, v must be 3-D [B, L, D], got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    b, nq, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[2] != d:
        raise ValueError(f"{OP}: k and v must be [B={b}, HW, D={d}], got {tuple(k.shape)} and {tuple(v.shape)}")
    if tuple(mask_logits.shape) != (b, nq, k.shape[1]):
        raise ValueError(f"{OP}: mask_logits must be [B, Q, HW] = {(b, nq, k.shape[1])}, got {tuple(mask_logits.shape)}")
    if num_heads < 1 or d % num_heads:
        raise ValueError(f"{OP}: D={d} is not divisible by num_heads={num_heads}")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(f"{OP}: q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape[1] == 0:
        raise ValueError(f"{OP}: HW must be at least 1")


def inputs_of(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_logits: torch.Tensor, num_heads: int,
              **_: object) -> dispatch.Inputs:
    check_inputs(q, k, v, mask_logits, num_heads)
    devices = {str(t.device) for t in (q, k, v, mask_logits)}
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    return dispatch.make_inputs(q.device, q.dtype, head_dim=q.shape[2] // num_heads, queries=q.shape[1],
                                logits_dtype=mask_logits.dtype, devices=tuple(sorted(devices)), needs_grad=needs_grad)


def device_reasons(inputs: dispatch.Inputs) -> list[str]:
    return [f"inputs on several devices: {', '.join(inputs.devices)}"] if len(inputs.devices) > 1 else []


def kernel_reasons(inputs: dispatch.Inputs) -> list[str]:
    """What the Triton kernels cannot run (the dtype refusal is the dispatcher's, in the same words)."""
    reasons = []
    if inputs.head_dim not in SUPPORTED_HEAD_DIMS:
        reasons.append(f"head dim {inputs.head_dim} not in {SUPPORTED_HEAD_DIMS}")
    if inputs.queries > MAX_QUERIES:
        reasons.append(f"Q={inputs.queries} > {MAX_QUERIES}")
    if not inputs.logits_dtype.is_floating_point:
        reasons.append(f"mask_logits dtype {inputs.logits_dtype} is not floating point")
    return reasons + device_reasons(inputs)


def triton_reasons(inputs: dispatch.Inputs) -> list[str]:
    """The Triton backend's refusals: no backward, and what the kernels cannot run."""
    grad = ["inputs require grad and the Triton kernels have no backward"] if inputs.needs_grad else []
    return grad + kernel_reasons(inputs)


def check_triton_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_logits: torch.Tensor,
                        num_heads: int) -> None:
    """The launcher's check: `check_inputs`, then what the kernels cannot run, as one ValueError."""
    reasons = [dispatch.dtype_reason(q.dtype, TRITON_DTYPES)] if q.dtype not in TRITON_DTYPES else []
    reasons += kernel_reasons(inputs_of(q, k, v, mask_logits, num_heads))
    if reasons:
        raise ValueError(f"{OP}[triton]: " + "; ".join(reasons))
