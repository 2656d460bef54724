"""FPN top-down step of the pixel decoder (SPEC §4.2): references, BN folding, backends, registration, roofline.

Two ops:
  fpn_upsample_add(lateral [B, C, H, W], coarse [B, C, h, w]) -> [B, C, H, W]
      lateral + nearest_upsample(coarse, size=(H, W)), in one pass.
  fpn_lateral_upsample_add(x [B, Cin, H, W], weight [Cout, Cin], bias [Cout], coarse [B, Cout, h, w])
      -> [B, Cout, H, W] = conv1x1(x, weight) + bias + nearest_upsample(coarse): the pixel decoder's
      `adapter_k(x) + upsample(y)` with the adapter's BatchNorm folded into (weight, bias) (eval only,
      see `fold_batchnorm`); one GEMM (M = B·H·W pixels, N = Cout, K = Cin) whose epilogue does the add.

Nearest index rule, as PyTorch's `F.interpolate(mode="nearest", size=...)`: scale = (float)in / out,
src = min(floor(dst * scale), in - 1), the product rounded to fp32 (H need not be a multiple of h: the
backbones ceil-divide, so a 25x37 lateral meets a 13x19 coarse map).

Implementations (`mf_kernels.dispatch` picks one; what each accepts: `mf_kernels.fpn_limits`):
  reference  the functions `*_ref` below (the single source of truth; the model's reference path keeps
             conv + BN + interpolate + add, see `fai_mf.modeling.pixel_decoder.ConvNorm`)
  triton     `mf_kernels.fpn_triton`: a strided upsample-add kernel and the GEMM with the add in its
             epilogue; on sm_75 its `tl.dot` has no tensor cores, so there the lateral op runs cuDNN's
             conv followed by the fused upsample-add kernel instead
  cpp        csrc/fpn.cpp (OpenMP) through `mf_kernels._C`; the lateral op is oneDNN's folded conv with
             the C++ upsample-add done in place on its output
  cuda       csrc/fpn_cuda.cu: an upsample-add kernel and a WMMA (tensor core, fp16) GEMM with the add in its
             epilogue, bound through `mf_kernels._C`
On sm_75 (the T4) auto takes the lateral op's cuda backend before triton for fp16: an `AutoPreference`
resting on the roofline at the end of this file (`t4_decision`), which `python -m mf_kernels.info` shows.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import dispatch
from .fpn_limits import (CPP_DTYPES, CPP_LATERAL_DTYPES, CUDA_DTYPES, TRITON_DTYPES, check_inputs,
                         check_lateral_inputs, lateral_inputs_of, lateral_reasons, size_reasons, upsample_inputs_of)

# ----------------------------------------------------------------------------------------------------
# References


def fpn_upsample_add_ref(lateral: torch.Tensor, coarse: torch.Tensor, upcast: bool = False) -> torch.Tensor:
    """lateral [B, C, H, W] + coarse [B, C, h, w] upsampled with PyTorch's "nearest" rule.

    `upcast` adds in fp64 and rounds once to the input dtype (the parity oracle).
    """
    check_inputs(lateral, coarse)
    if upcast:
        return fpn_upsample_add_ref(lateral.double(), coarse.double()).to(lateral.dtype)
    return lateral + F.interpolate(coarse, size=lateral.shape[-2:], mode="nearest")


def fpn_lateral_upsample_add_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, coarse: torch.Tensor,
                                 upcast: bool = False) -> torch.Tensor:
    """conv1x1(x [B, Cin, H, W], weight [Cout, Cin]) + bias [Cout] + nearest_upsample(coarse [B, Cout, h, w]).

    Computes in x's dtype (weight and bias cast to it), like the unfused model; `upcast` computes in fp64
    and rounds once to x's dtype (the parity oracle).
    """
    check_lateral_inputs(x, weight, bias, coarse)
    dtype = torch.float64 if upcast else x.dtype
    lateral = F.conv2d(x.to(dtype), weight.to(dtype)[:, :, None, None], bias.to(dtype))
    return fpn_upsample_add_ref(lateral, coarse.to(dtype)).to(x.dtype)


def fold_batchnorm(conv_weight: torch.Tensor, bn_weight: torch.Tensor, bn_bias: torch.Tensor,
                   running_mean: torch.Tensor, running_var: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval-mode BatchNorm into the conv before it: (weight, bias [Cout]), fp32.

    conv_weight [Cout, Cin] (a 1x1 conv as a GEMM) or [Cout, Cin/groups, kh, kw]; the folded weight has
    the same shape. weight' = W · γ / sqrt(var + eps), bias' = β − mean · γ / sqrt(var + eps), computed
    in fp64. Valid only for BatchNorm in eval mode (running statistics); training normalises by batch
    statistics.
    """
    if conv_weight.dim() not in (2, 4):
        raise ValueError(f"fold_batchnorm: conv weight must be [Cout, Cin] or [Cout, Cin, kh, kw], "
                         f"got {tuple(conv_weight.shape)}")
    with torch.no_grad():
        scale = bn_weight.double() * torch.rsqrt(running_var.double() + eps)
        weight = conv_weight.double() * scale.view(-1, *([1] * (conv_weight.dim() - 1)))
        bias = bn_bias.double() - running_mean.double() * scale
    return weight.float(), bias.float()


# ----------------------------------------------------------------------------------------------------
# Autograd: the fused upsample-add is used in training too (the pixel decoder's reference path), so its
# fused backends carry the exact backward: d lateral = g, d coarse = the nearest-upsample backward of g
# (sum over the output pixels that read each coarse pixel), PyTorch's own kernel.


class _FusedUpsampleAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernel, lateral: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        ctx.output_size = list(lateral.shape[-2:])
        ctx.coarse_size = list(coarse.shape)
        return kernel(lateral, coarse)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_coarse = None
        if ctx.needs_input_grad[2]:
            grad_coarse = torch.ops.aten.upsample_nearest2d_backward(grad, ctx.output_size, ctx.coarse_size)
        return None, grad if ctx.needs_input_grad[1] else None, grad_coarse


def _differentiable(kernel):
    """`kernel(lateral, coarse)` with the backward above when a gradient is needed."""

    def run(lateral: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (lateral.requires_grad or coarse.requires_grad):
            return _FusedUpsampleAdd.apply(kernel, lateral, coarse)
        return kernel(lateral, coarse)

    run.__name__ = run.__qualname__ = kernel.__name__
    run.__doc__ = kernel.__doc__
    return run


# ----------------------------------------------------------------------------------------------------
# Backend entry points (lazy: triton and the extension are imported on first call)


def _triton_upsample_add(lateral: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
    from .fpn_triton import fpn_upsample_add_triton

    return fpn_upsample_add_triton(lateral, coarse)


def _triton_lateral_upsample_add(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                                 coarse: torch.Tensor) -> torch.Tensor:
    from .fpn_triton import fpn_lateral_upsample_add_triton

    return fpn_lateral_upsample_add_triton(x, weight, bias, coarse)


def _extension():
    from . import _cpp_lib

    return _cpp_lib.load()


def _cpp_upsample_add(lateral: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
    check_inputs(lateral, coarse)
    return _extension().fpn_upsample_add(lateral, coarse, None)


def _cpp_lateral_upsample_add(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                              coarse: torch.Tensor) -> torch.Tensor:
    """oneDNN's conv with the folded weight, then the C++ upsample-add in place on its output: two passes
    over the lateral map instead of the reference's four (conv, BN, interpolate, add)."""
    check_lateral_inputs(x, weight, bias, coarse)
    lateral = F.conv2d(x, weight.to(x.dtype)[:, :, None, None], bias.to(x.dtype))
    return _extension().fpn_upsample_add(lateral, coarse, lateral)


def _cuda_upsample_add(lateral: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
    check_inputs(lateral, coarse)
    return _extension().fpn_upsample_add_cuda(lateral, coarse, None)


def _cuda_lateral_upsample_add(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                               coarse: torch.Tensor) -> torch.Tensor:
    """fp16: the WMMA GEMM with the upsample-add in its epilogue. fp32 (no fp32 tensor cores on sm_75):
    cuDNN's conv, then the CUDA upsample-add in place on its output."""
    check_lateral_inputs(x, weight, bias, coarse)
    ext = _extension()
    if x.dtype == torch.float16:
        return ext.fpn_lateral_upsample_add_cuda(x, weight.to(torch.float16).contiguous(),
                                                 bias.to(torch.float32).contiguous(), coarse)
    lateral = F.conv2d(x, weight.to(x.dtype)[:, :, None, None], bias.to(x.dtype))
    return ext.fpn_upsample_add_cuda(lateral, coarse, lateral)


# ----------------------------------------------------------------------------------------------------
# Registration

fpn_upsample_add = dispatch.define_op("fpn_upsample_add", fpn_upsample_add_ref, upsample_inputs_of)
fpn_upsample_add.__doc__ = """fpn_upsample_add(lateral [B, C, H, W], coarse [B, C, h, w]) -> [B, C, H, W]:
lateral + nearest_upsample(coarse), run by the backend `mf_kernels.dispatch` picks; see `mf_kernels.fpn`."""
fpn_upsample_add.register(
    "triton", _differentiable(_triton_upsample_add), devices=("cpu", "cuda"), dtypes=TRITON_DTYPES,
    environment=dispatch.triton_environment("mf_kernels.fpn_triton"), check=size_reasons,
    description="one strided Triton pass (NCHW or channels_last), fp32/fp16")
fpn_upsample_add.register(
    "cpp", _differentiable(_cpp_upsample_add), devices=("cpu",), dtypes=CPP_DTYPES,
    environment=dispatch.extension_environment, check=size_reasons,
    description="C++/OpenMP strided upsample-add (csrc/fpn.cpp)")
fpn_upsample_add.register(
    "cuda", _differentiable(_cuda_upsample_add), devices=("cuda",), dtypes=CUDA_DTYPES,
    environment=dispatch.extension_environment, check=size_reasons,
    description="CUDA strided upsample-add kernel (csrc/fpn_cuda.cu)")

# Why sm_75 prefers the cuda backend, in one line (the floors behind it: `t4_decision()`, `python -m
# mf_kernels.roofline`; kept out of import time, which must not import the roofline module).
T4_DECISION_SHORT = ("T4 roofline, fp16, 640²: WMMA fused GEMM (memory-bound) < cuDNN conv + fused add (2·M·Cout more "
                     "bytes) < Triton GEMM on FMA units (compute-bound, no tensor cores on sm_75)")

fpn_lateral_upsample_add = dispatch.define_op("fpn_lateral_upsample_add", fpn_lateral_upsample_add_ref,
                                              lateral_inputs_of)
fpn_lateral_upsample_add.__doc__ = """fpn_lateral_upsample_add(x [B, Cin, H, W], weight [Cout, Cin], bias [Cout],
coarse [B, Cout, h, w]) -> [B, Cout, H, W]: BN-folded 1x1 conv + nearest upsample-add; see `mf_kernels.fpn`."""
fpn_lateral_upsample_add.register(
    "triton", _triton_lateral_upsample_add, devices=("cpu", "cuda"), dtypes=TRITON_DTYPES,
    environment=dispatch.triton_environment("mf_kernels.fpn_triton"), check=lateral_reasons,
    description="Triton GEMM (M = B·H·W, N = Cout, K = Cin) with the nearest upsample-add in its epilogue on "
                "sm_80+ (tensor cores); on sm_75 tl.dot has no tensor cores, so it runs cuDNN conv + the Triton "
                "upsample-add kernel")
fpn_lateral_upsample_add.register(
    "cpp", _cpp_lateral_upsample_add, devices=("cpu",), dtypes=CPP_LATERAL_DTYPES,
    environment=dispatch.extension_environment, check=lateral_reasons,
    description="oneDNN conv with the folded weight + C++/OpenMP upsample-add in place on its output")
fpn_lateral_upsample_add.register(
    "cuda", _cuda_lateral_upsample_add, devices=("cuda",), dtypes=CUDA_DTYPES,
    environment=dispatch.extension_environment, check=lateral_reasons,
    description="fp16: WMMA tensor-core GEMM with the upsample-add epilogue (csrc/fpn_cuda.cu); fp32: cuDNN conv + "
                "CUDA upsample-add in place")
fpn_lateral_upsample_add.prefer(dispatch.AutoPreference(
    device="cuda", dtypes=(torch.float16,), below=(8, 0), order=("cuda", "triton", "reference"),
    why=T4_DECISION_SHORT))
dispatch.register_aot_provider("fpn", "mf_kernels.fpn_triton:aot_specs")
dispatch.register_roofline_provider(("fpn_upsample_add", "fpn_lateral_upsample_add"), "mf_kernels.fpn:roofline_rows",
                                    "mf_kernels.fpn:roofline_call_rows")


# ----------------------------------------------------------------------------------------------------
# Roofline (SPEC §5): bytes and FLOPs per call, T4 floors, and the T4 decision


def upsample_add_traffic(shape, itemsize: int) -> tuple[int, int]:
    """(bytes, FLOPs) of `fpn_upsample_add` at an `FpnShape`: lateral read, each coarse pixel read once,
    out written; one add per output element."""
    out = shape.batch * shape.cout * shape.height * shape.width
    return (2 * out + shape.batch * shape.cout * shape.coarse_height * shape.coarse_width) * itemsize, out


def lateral_traffic(shape, itemsize: int) -> dict[str, tuple[int, int]]:
    """(bytes, FLOPs) of the two ways to compute `conv1x1 + BN + upsample + add` (BN folded in both):

    fused     one GEMM with the upsample-add in its epilogue: x, weight, coarse read, out written
    conv+add  conv (x, weight read, lateral written), then the fused upsample-add (lateral and coarse read,
              out written): 2·B·H·W·Cout·itemsize more bytes than fused
    """
    pixels = shape.batch * shape.height * shape.width
    flops = 2 * pixels * shape.cin * shape.cout + 2 * pixels * shape.cout  # GEMM + bias and add
    x_bytes = pixels * shape.cin * itemsize
    w_bytes = shape.cout * shape.cin * itemsize + shape.cout * 4
    coarse_bytes = shape.batch * shape.cout * shape.coarse_height * shape.coarse_width * itemsize
    out_bytes = pixels * shape.cout * itemsize
    return {"fused": (x_bytes + w_bytes + coarse_bytes + out_bytes, flops),
            "conv+add": (x_bytes + w_bytes + coarse_bytes + 3 * out_bytes, flops)}


def roofline_rows() -> list:
    """`mf_kernels.roofline` rows of both ops at `FPN_SHAPES`, fp16 and fp32. The lateral op has one row per
    T4 path: [fused GEMM] (floor = Triton on FMA units; its "TC floor" = the WMMA kernel) and
    [conv+add] (cuDNN's conv on tensor cores, then the fused add: more bytes)."""
    from .roofline import Row
    from .shapes import FPN_SHAPES

    rows = []
    for dtype, itemsize in (("float16", 2), ("float32", 4)):
        for shape in FPN_SHAPES:
            label = f"{shape.model} {shape.level} {shape.cin}->{shape.cout}x{shape.height}x{shape.width}"
            nbytes, flops = upsample_add_traffic(shape, itemsize)
            rows.append(Row("fpn_upsample_add", label, dtype, nbytes, flops, nbytes))
            paths = lateral_traffic(shape, itemsize)
            rows.append(Row("fpn_lateral_upsample_add", label + " [fused GEMM]", dtype, *paths["fused"],
                            paths["fused"][0], uses_tensor_cores=False))
            rows.append(Row("fpn_lateral_upsample_add", label + " [conv+add]", dtype, *paths["conv+add"],
                            paths["conv+add"][0], uses_tensor_cores=dtype == "float16"))
    return rows


def roofline_call_rows(op: str, args: tuple, kwargs: dict, dtype: torch.dtype) -> list:
    """The row of one recorded call as the T4 runs it in `dtype`: fp16 lateral = the WMMA fused GEMM (tensor
    cores, the sm_75 preference); fp32 lateral = cuDNN conv + the fused add on FMA units."""
    from .roofline import Row
    from .shapes import FpnShape

    size, name = torch.empty((), dtype=dtype).element_size(), dispatch.dtype_name(dtype)
    if op == "fpn_upsample_add":
        lateral, coarse = args[:2]
        b, c, height, width = lateral.shape
        shape = FpnShape("", "", b, c, c, height, width, coarse.shape[2], coarse.shape[3])
        nbytes, flops = upsample_add_traffic(shape, size)
        return [Row(op, f"{c}x{height}x{width}", name, nbytes, flops, nbytes)]
    x, weight, _, coarse = args[:4]
    b, cin, height, width = x.shape
    shape = FpnShape("", "", b, cin, weight.shape[0], height, width, coarse.shape[2], coarse.shape[3])
    paths = lateral_traffic(shape, size)
    label = f"{cin}->{shape.cout}x{height}x{width}"
    if dtype == torch.float16:
        return [Row(op, label + " [WMMA fused]", name, *paths["fused"], paths["fused"][0], uses_tensor_cores=True)]
    return [Row(op, label + " [cuDNN conv + add, FMA]", name, *paths["conv+add"], paths["conv+add"][0])]


def t4_lateral_floors(shapes, itemsize: int = 2) -> dict[str, float]:
    """Summed T4 floors (s) over `shapes` (FpnShape) of the candidate paths of the lateral op in fp16:

    triton-fma  the Triton fused GEMM on sm_75 (tl.dot on FMA units, 8.1 TFLOP/s)
    cudnn+add   cuDNN's conv on tensor cores + the fused upsample-add kernel (2·M·N more bytes)
    wmma-fused  the CUDA WMMA fused GEMM (tensor cores) with the add in its epilogue
    """
    from .roofline import T4

    def floor(nbytes: int, flops: int, peak: float) -> float:
        return max(nbytes / T4.bandwidth, flops / peak)

    totals = {"triton-fma": 0.0, "cudnn+add": 0.0, "wmma-fused": 0.0}
    for shape in shapes:
        paths = lateral_traffic(shape, itemsize)
        totals["triton-fma"] += floor(*paths["fused"], T4.fp32_fma)
        totals["cudnn+add"] += floor(*paths["conv+add"], T4.fp16_tensor)
        totals["wmma-fused"] += floor(*paths["fused"], T4.fp16_tensor)
    return totals


@functools.lru_cache(maxsize=None)
def t4_decision() -> str:
    """Which path the T4 (sm_75) takes for the lateral op and why, with the roofline numbers."""
    from .shapes import FPN_SHAPES

    parts = []
    for model in dict.fromkeys(s.model for s in FPN_SHAPES):
        us = {k: f"{v * 1e6:.0f}" for k, v in t4_lateral_floors([s for s in FPN_SHAPES if s.model == model]).items()}
        parts.append(f"{model} (3 levels, fp16, 640²): Triton GEMM on FMA {us['triton-fma']} us, cuDNN conv + fused "
                     f"add {us['cudnn+add']} us, WMMA fused {us['wmma-fused']} us")
    return ("T4 floors: " + "; ".join(parts) + ". So on sm_75 auto takes the cuda backend's WMMA fusion for fp16 "
            "(when the extension has CUDA), else triton runs cuDNN conv + its fused upsample-add; fp32 (no fp32 "
            "tensor cores) is cuDNN conv + fused add on both; Triton's own GEMM runs on sm_80+ only")
