"""What the FPN ops accept and what their fused backends can run, in one wording.

Imported by the registration (`mf_kernels.fpn`) and by the Triton launcher (`mf_kernels.fpn_triton`); it
imports neither, so the two never import each other.

- `check_inputs` / `check_lateral_inputs`: the contract of every backend; a ValueError that names the problem.
- `*_inputs_of`: the dispatcher's view of a call. Sizes enter it only as "breaks int32 indexing or not",
  so the selection cache keeps a handful of keys whatever the image sizes.
- `size_reasons` / `lateral_reasons`: the refusals of the fused backends.
- `is_channels_last` / `output_like`: the output layout every fused backend (and its fake) follows.
"""
from __future__ import annotations

import torch

from . import dispatch

TRITON_DTYPES = (torch.float16, torch.float32)
CUDA_DTYPES = (torch.float16, torch.float32)
CPP_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
CPP_LATERAL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # oneDNN's conv has no fp64 path here


def check_inputs(lateral: torch.Tensor, coarse: torch.Tensor, op: str = "fpn_upsample_add") -> None:
    """Raise a ValueError that names the problem for inputs no implementation can take."""
    if lateral.dim() != 4 or coarse.dim() != 4:
        raise ValueError(f"{op}: lateral and coarse must be 4-D [B, C, H, W], got "
                         f"{tuple(lateral.shape)} and {tuple(coarse.shape)}")
    if lateral.shape[:2] != coarse.shape[:2]:
        raise ValueError(f"{op}: batch and channel counts differ: lateral {tuple(lateral.shape)}, "
                         f"coarse {tuple(coarse.shape)}")
    if lateral.dtype != coarse.dtype or not lateral.is_floating_point():
        raise ValueError(f"{op}: lateral and coarse must share one floating dtype, got {lateral.dtype} and {coarse.dtype}")
    if lateral.device != coarse.device:
        raise ValueError(f"{op}: lateral on {lateral.device}, coarse on {coarse.device}")
    if coarse.shape[2] == 0 or coarse.shape[3] == 0:
        raise ValueError(f"{op}: coarse map {tuple(coarse.shape)} has no pixels to upsample")


def check_lateral_inputs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, coarse: torch.Tensor) -> None:
    """Checks of `fpn_lateral_upsample_add`: x [B, Cin, H, W], weight [Cout, Cin], bias [Cout], coarse [B, Cout, h, w]."""
    op = "fpn_lateral_upsample_add"
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be 4-D [B, Cin, H, W], got {tuple(x.shape)}")
    if weight.dim() == 4 and weight.shape[2:] == (1, 1):
        raise ValueError(f"{op}: pass the 1x1 weight as [Cout, Cin] (weight[:, :, 0, 0]), got {tuple(weight.shape)}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[1] or weight.shape[1] == 0:
        raise ValueError(f"{op}: weight must be [Cout, Cin={x.shape[1]}] with Cin > 0, got {tuple(weight.shape)}")
    if bias.shape != (weight.shape[0],):
        raise ValueError(f"{op}: bias must be [Cout={weight.shape[0]}], got {tuple(bias.shape)}")
    if coarse.dim() != 4 or coarse.shape[:2] != (x.shape[0], weight.shape[0]):
        raise ValueError(f"{op}: coarse must be [B={x.shape[0]}, Cout={weight.shape[0]}, h, w], got {tuple(coarse.shape)}")
    if coarse.dtype != x.dtype or not x.is_floating_point():
        raise ValueError(f"{op}: x and coarse must share one floating dtype, got {x.dtype} and {coarse.dtype}")
    if not (weight.is_floating_point() and bias.is_floating_point()):
        raise ValueError(f"{op}: weight and bias must be floating point, got {weight.dtype} and {bias.dtype}")
    devices = {t.device for t in (x, weight, bias, coarse)}
    if len(devices) != 1:
        raise ValueError(f"{op}: inputs on several devices: {sorted(map(str, devices))}")
    if coarse.shape[2] == 0 or coarse.shape[3] == 0:
        raise ValueError(f"{op}: coarse map {tuple(coarse.shape)} has no pixels to upsample")


def upsample_inputs_of(lateral: torch.Tensor, coarse: torch.Tensor, **_: object) -> dispatch.Inputs:
    check_inputs(lateral, coarse)
    return dispatch.make_inputs(lateral.device, lateral.dtype,
                                too_large=dispatch.exceeds_int32(lateral.numel(), coarse.numel()))


def lateral_inputs_of(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, coarse: torch.Tensor,
                      **_: object) -> dispatch.Inputs:
    check_lateral_inputs(x, weight, bias, coarse)
    out_numel = x.shape[0] * weight.shape[0] * x.shape[2] * x.shape[3]
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, weight, bias, coarse))
    return dispatch.make_inputs(x.device, x.dtype, too_large=dispatch.exceeds_int32(x.numel(), coarse.numel(), out_numel),
                                grad=grad)


def size_reasons(inputs: dispatch.Inputs) -> list[str]:
    return [dispatch.INT32_REASON] if inputs.too_large else []


def lateral_reasons(inputs: dispatch.Inputs) -> list[str]:
    reasons = size_reasons(inputs)
    if inputs.grad:
        reasons.append("a gradient is needed and the fused lateral op is inference-only (the pixel decoder keeps "
                       "conv + BN + fpn_upsample_add when training)")
    return reasons


def check_triton_dtype(dtype: torch.dtype, op: str) -> None:
    if dtype not in TRITON_DTYPES:
        raise ValueError(f"{op}[triton]: {dispatch.dtype_reason(dtype, TRITON_DTYPES)}")


def is_channels_last(t: torch.Tensor) -> bool:
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def output_like(t: torch.Tensor, channels: int | None = None) -> torch.Tensor:
    """An uninitialised [B, channels or C, H, W] tensor in t's memory format (NCHW or channels_last)."""
    batch, c, height, width = t.shape
    fmt = torch.channels_last if is_channels_last(t) else torch.contiguous_format
    return torch.empty((batch, c if channels is None else channels, height, width), dtype=t.dtype, device=t.device,
                       memory_format=fmt)
