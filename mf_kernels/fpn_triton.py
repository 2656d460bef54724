"""Triton kernels of the FPN top-down step (imported lazily by the `triton` backend of `mf_kernels.fpn`).

Two kernels:
  fpn_upsample_add_kernel          out = lateral + nearest_upsample(coarse)               (one pass)
  fpn_lateral_upsample_add_kernel  out = x^T·W' + b' + nearest_upsample(coarse)          (GEMM + epilogue)

Both treat an image as `C` channels × `P = H·W` pixels and take, for every 4-D tensor, a batch stride,
a channel stride and a *pixel* stride. That covers NCHW (pixel stride 1) and channels_last (channel
stride 1) without copies, as long as each tensor's rows are dense (stride_h == W · stride_w); the
launcher makes other views contiguous first. `coarse` is only ever gathered, so it keeps full 4-D strides.

Nearest index rule (PyTorch's `F.interpolate(mode="nearest", size=...)`): scale = (float)in / out in fp32,
src = min(floor(dst * scale), in - 1), with the product rounded to fp32. The launcher passes the fp32
scale; `_nearest_src` reproduces the fp32 product bit for bit.

Importing this module imports triton; `TRITON_INTERPRET` is read when the kernels below are decorated.
What the launchers accept is stated in `mf_kernels.fpn_limits` (shared with the registration in
`mf_kernels.fpn`, which imports this module lazily; this module never imports it).
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import dispatch

INTERPRETED = dispatch.interpreter_requested()


@triton.jit
def _nearest_src(dst, scale, size_in):
    """Source index of destination indices `dst` (int32 tensor) under PyTorch's nearest rule."""
    src = tl.floor(dst.to(tl.float32) * scale).to(tl.int32)  # fp32 product, as PyTorch
    return tl.minimum(src, size_in - 1)


@triton.jit
def fpn_upsample_add_kernel(
    lateral_ptr,  # [B, C, P] via (stride_lb, stride_lc, stride_lp), P = H * W
    coarse_ptr,  # [B, C, h, w] via (stride_cb, stride_cc, stride_ch, stride_cw)
    out_ptr,  # [B, C, P] via (stride_ob, stride_oc, stride_op), same dtype as lateral
    C, P, W, h, w,
    scale_h, scale_w,  # fp32: h / H and w / W as PyTorch computes them
    stride_lb, stride_lc, stride_lp,
    stride_cb, stride_cc, stride_ch, stride_cw,
    stride_ob, stride_oc, stride_op,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Grid (cdiv(P, BLOCK_P), cdiv(C, BLOCK_C), B): one [BLOCK_C, BLOCK_P] tile of one image each."""
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (offs_c[:, None] < C) & (offs_p[None, :] < P)
    # The source pixel of each destination pixel, computed once per tile column.
    row = offs_p // W
    col = offs_p - row * W
    src = _nearest_src(row, scale_h, h) * stride_ch + _nearest_src(col, scale_w, w) * stride_cw
    lateral = tl.load(lateral_ptr + b * stride_lb + offs_c[:, None] * stride_lc + offs_p[None, :] * stride_lp,
                      mask=mask)
    coarse = tl.load(coarse_ptr + b * stride_cb + offs_c[:, None] * stride_cc + src[None, :], mask=mask)
    # One add in the tensor dtype: the same single rounding as `lateral + interpolate(coarse)`.
    tl.store(out_ptr + b * stride_ob + offs_c[:, None] * stride_oc + offs_p[None, :] * stride_op,
             lateral + coarse, mask=mask)


@triton.jit
def fpn_lateral_upsample_add_kernel(
    x_ptr,  # [B, K, P] via (stride_xb, stride_xk, stride_xp): the backbone feature, K = Cin
    w_ptr,  # [N, K] via (stride_wn, stride_wk): BN-folded 1x1 weight, same dtype as x
    bias_ptr,  # [N] fp32 via stride_bn: BN-folded bias
    coarse_ptr,  # [B, N, h, w] via (stride_cb, stride_cn, stride_ch, stride_cw), dtype of x
    out_ptr,  # [B, N, P] via (stride_ob, stride_on, stride_op), dtype of x
    P, W, K, N, h, w,
    scale_h, scale_w,  # fp32: h / H and w / W as PyTorch computes them
    stride_xb, stride_xk, stride_xp,
    stride_wn, stride_wk,
    stride_bn,
    stride_cb, stride_cn, stride_ch, stride_cw,
    stride_ob, stride_on, stride_op,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,  # "ieee" or "tf32" (fp32 inputs only; fp16 ignores it)
):
    """Grid (cdiv(P, BLOCK_M), cdiv(N, BLOCK_N), B): a [BLOCK_M pixels, BLOCK_N channels] output tile.

    GEMM M = pixels of one image, N = Cout, K = Cin, fp32 accumulation; the epilogue adds the folded
    bias and the nearest-upsampled coarse map and stores once, so the lateral map never hits memory.
    A tile never straddles two images, which keeps the pixel offsets affine (vectorisable loads).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < P
    mask_n = offs_n < N
    a_ptrs = x_ptr + b * stride_xb + offs_m[:, None] * stride_xp + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_left = K - k0
        a = tl.load(a_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
        wt = tl.load(w_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0.0)
        acc = tl.dot(a, wt, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    # Epilogue: + b' + coarse[sy(m), sx(m)], one rounding to the output dtype.
    row = offs_m // W
    col = offs_m - row * W
    src = _nearest_src(row, scale_h, h) * stride_ch + _nearest_src(col, scale_w, w) * stride_cw
    mask = mask_m[:, None] & mask_n[None, :]
    bias = tl.load(bias_ptr + offs_n * stride_bn, mask=mask_n, other=0.0)
    coarse = tl.load(coarse_ptr + b * stride_cb + offs_n[None, :] * stride_cn + src[:, None], mask=mask, other=0.0)
    out = acc + bias[None, :] + coarse.to(tl.float32)
    tl.store(out_ptr + b * stride_ob + offs_n[None, :] * stride_on + offs_m[:, None] * stride_op,
             out.to(out_ptr.dtype.element_ty), mask=mask)




# ----------------------------------------------------------------------------------------------------
# Configs

from dataclasses import dataclass  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from .fpn_limits import check_inputs, check_lateral_inputs, check_triton_dtype, output_like  # noqa: E402
from .launch import TRITON_DTYPE_NAMES as TL_DTYPES  # noqa: E402
from .launch import Launch, arch_and_sms  # noqa: E402
from .launch import fp32_ratio as nearest_scale  # noqa: E402


@dataclass(frozen=True)
class UpsampleConfig:
    """Tile of `fpn_upsample_add_kernel`: BLOCK_C channels × BLOCK_P pixels, 2048 elements, 4 warps."""

    block_c: int
    block_p: int
    num_warps: int = 4


# Long along the contiguous axis so a warp reads whole 128-byte lines: pixels for NCHW, channels for NHWC.
UPSAMPLE_PIXELS_INNER = UpsampleConfig(block_c=16, block_p=128)
UPSAMPLE_CHANNELS_INNER = UpsampleConfig(block_c=64, block_p=32)


@dataclass(frozen=True)
class GemmConfig:
    """Tiles and launch options of `fpn_lateral_upsample_add_kernel`."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def gemm_configs(arch: int, dtype: torch.dtype) -> list[GemmConfig]:
    """Candidate tiles for `arch`, largest first (each checked spill-free by `python -m mf_kernels.aot`).

    sm_75: tl.dot runs on FMA units and there is no cp.async: one stage, 64x64 tiles over 8 warps (16
    accumulators per thread; 25-800 programs for a 40-SM T4 at the model's shapes). fp16 converts its
    operands to fp32 in registers, so it takes K steps of 16 (32 spills with 4 warps). The triton backend
    does not launch this GEMM on sm_75 (cuDNN + the upsample-add kernel has the lower floor, see
    `mf_kernels.fpn.t4_decision`), but a forced call must still compile without spills.
    sm_80+: tensor cores; 128x128 tiles where there are enough of them to fill the SMs, smaller otherwise
    (res4 at 640² is only 1600 pixels); fp32 stages fewer buffers (twice the bytes per stage); 64x128
    takes 8 warps (4 spill in fp32 IEEE), and so does fp32's 64x64 (with 4 warps its IEEE dot spills 4
    bytes on sm_90 under triton 3.6, whose ptxas holds it to 96 registers; 8 warps need 78).
    """
    if arch < 80:
        return [GemmConfig(64, 64, 16 if dtype == torch.float16 else 32, num_warps=8, num_stages=1)]
    fp16 = dtype == torch.float16
    stages = 3 if fp16 else 2
    return [GemmConfig(128, 128, 32, num_warps=8, num_stages=stages),
            GemmConfig(64, 128, 32, num_warps=8, num_stages=stages),
            GemmConfig(64, 64, 32, num_warps=4 if fp16 else 8, num_stages=stages)]


def gemm_config_for(arch: int, sm_count: int, dtype: torch.dtype, batch: int, pixels: int, cout: int) -> GemmConfig:
    """The largest candidate that still gives every SM a program; the smallest when none does."""
    candidates = gemm_configs(arch, dtype)
    for cfg in candidates:
        programs = batch * triton.cdiv(pixels, cfg.block_m) * triton.cdiv(cout, cfg.block_n)
        if programs >= sm_count:
            return cfg
    return candidates[-1]


def input_precision(arch: int, dtype: torch.dtype) -> str:
    """fp32 dots: TF32 on sm_80+ exactly when cuDNN convs may use it (torch.backends.cudnn.allow_tf32,
    on by default), so the fused op is as accurate as the conv it replaces; IEEE fp32 elsewhere."""
    if dtype == torch.float32 and arch >= 80 and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"


# ----------------------------------------------------------------------------------------------------
# Launch plans and launchers


def _pixel_strides(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """(t or a contiguous copy of it, its (batch, channel, pixel) strides), pixel p = y * W + x.

    Affine in p whenever the rows are dense (stride_h == W · stride_w): NCHW, channels_last and their
    batch / channel slices. Other views (a W-slice, a flipped map) are copied once.
    """
    _, _, height, width = t.shape
    if width == 1:
        return t, (t.stride(0), t.stride(1), t.stride(2))
    if height == 1 or t.stride(2) == width * t.stride(3):
        return t, (t.stride(0), t.stride(1), t.stride(3))
    t = t.contiguous()
    return t, (t.stride(0), t.stride(1), t.stride(3))


def plan_upsample_add(lateral: torch.Tensor, coarse: torch.Tensor, out: torch.Tensor | None = None,
                      config: UpsampleConfig | None = None) -> tuple[Launch, torch.Tensor]:
    """The launch of `fpn_upsample_add_kernel` and the tensor it writes (`out`, may alias `lateral`)."""
    check_inputs(lateral, coarse)
    check_triton_dtype(lateral.dtype, "fpn_upsample_add")
    batch, channels, height, width = lateral.shape
    lateral, lateral_strides = _pixel_strides(lateral)
    if out is None:
        out = output_like(lateral)
    elif out.shape != lateral.shape or out.dtype != lateral.dtype or out.device != lateral.device:
        raise ValueError(f"fpn_upsample_add[triton]: out {tuple(out.shape)} {out.dtype} does not match lateral")
    out_view, out_strides = _pixel_strides(out)
    if out_view is not out:
        raise ValueError("fpn_upsample_add[triton]: out must have dense rows (NCHW or channels_last)")
    channels_inner = lateral_strides[1] == 1 and lateral_strides[2] != 1
    cfg = config or (UPSAMPLE_CHANNELS_INNER if channels_inner else UPSAMPLE_PIXELS_INNER)
    pixels = height * width
    h, w = coarse.shape[-2:]
    grid = (triton.cdiv(pixels, cfg.block_p), triton.cdiv(channels, cfg.block_c), batch)
    launch = Launch(fpn_upsample_add_kernel, grid,
                    dict(lateral_ptr=lateral, coarse_ptr=coarse, out_ptr=out, C=channels, P=pixels, W=width, h=h, w=w,
                         scale_h=nearest_scale(h, height), scale_w=nearest_scale(w, width),
                         stride_lb=lateral_strides[0], stride_lc=lateral_strides[1], stride_lp=lateral_strides[2],
                         stride_cb=coarse.stride(0), stride_cc=coarse.stride(1), stride_ch=coarse.stride(2),
                         stride_cw=coarse.stride(3),
                         stride_ob=out_strides[0], stride_oc=out_strides[1], stride_op=out_strides[2],
                         BLOCK_C=cfg.block_c, BLOCK_P=cfg.block_p),
                    num_warps=cfg.num_warps)
    return launch, out


def plan_lateral_upsample_add(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, coarse: torch.Tensor,
                              arch: int | None = None, sm_count: int | None = None,
                              config: GemmConfig | None = None,
                              precision: str | None = None) -> tuple[Launch, torch.Tensor]:
    """The launch of `fpn_lateral_upsample_add_kernel` and its output [B, Cout, H, W] (x's memory format).

    `arch` / `sm_count` default to x's device (T4 values for CPU tensors); the AOT check passes them to
    get another architecture's launch; `precision` overrides `input_precision`. `weight` is cast to x's
    dtype, `bias` to fp32 (both tiny).
    """
    check_lateral_inputs(x, weight, bias, coarse)
    check_triton_dtype(x.dtype, "fpn_lateral_upsample_add")
    device_arch, device_sms = arch_and_sms(x.device)
    arch, sm_count = arch or device_arch, sm_count or device_sms
    batch, cin, height, width = x.shape
    cout = weight.shape[0]
    pixels = height * width
    x, x_strides = _pixel_strides(x)
    weight = weight.to(x.dtype)
    bias = bias.to(torch.float32)
    out = output_like(x, channels=cout)
    _, out_strides = _pixel_strides(out)
    cfg = config or gemm_config_for(arch, sm_count, x.dtype, batch, pixels, cout)
    h, w = coarse.shape[-2:]
    launch = Launch(fpn_lateral_upsample_add_kernel,
                    (triton.cdiv(pixels, cfg.block_m), triton.cdiv(cout, cfg.block_n), batch),
                    dict(x_ptr=x, w_ptr=weight, bias_ptr=bias, coarse_ptr=coarse, out_ptr=out,
                         P=pixels, W=width, K=cin, N=cout, h=h, w=w,
                         scale_h=nearest_scale(h, height), scale_w=nearest_scale(w, width),
                         stride_xb=x_strides[0], stride_xk=x_strides[1], stride_xp=x_strides[2],
                         stride_wn=weight.stride(0), stride_wk=weight.stride(1), stride_bn=bias.stride(0),
                         stride_cb=coarse.stride(0), stride_cn=coarse.stride(1), stride_ch=coarse.stride(2),
                         stride_cw=coarse.stride(3),
                         stride_ob=out_strides[0], stride_on=out_strides[1], stride_op=out_strides[2],
                         BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                         INPUT_PRECISION=precision or input_precision(arch, x.dtype)),
                    num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return launch, out


def fpn_upsample_add_triton(lateral: torch.Tensor, coarse: torch.Tensor, *, out: torch.Tensor | None = None,
                            config: UpsampleConfig | None = None) -> torch.Tensor:
    """lateral [B, C, H, W] + nearest_upsample(coarse [B, C, h, w]) in one kernel; `out` may be `lateral`."""
    launch, out = plan_upsample_add(lateral, coarse, out, config)
    if out.numel():
        launch.run()
    return out


def fpn_lateral_upsample_add_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, coarse: torch.Tensor,
                                    *, path: str | None = None, config: GemmConfig | None = None) -> torch.Tensor:
    """x [B, Cin, H, W] · weight [Cout, Cin]ᵀ + bias + nearest_upsample(coarse [B, Cout, h, w]).

    path "gemm": the fused Triton GEMM. path "conv+add": F.conv2d (cuDNN on CUDA) then the upsample-add
    kernel in place on the conv output. Default: "gemm" except on CUDA sm_75, where tl.dot has no tensor
    cores and cuDNN + the add has the lower floor (`mf_kernels.fpn.t4_decision`).
    """
    if path is None:
        path = "conv+add" if x.device.type == "cuda" and arch_and_sms(x.device)[0] < 80 else "gemm"
    if path == "conv+add":
        check_lateral_inputs(x, weight, bias, coarse)
        lateral = F.conv2d(x, weight.to(x.dtype)[:, :, None, None], bias.to(x.dtype))
        return fpn_upsample_add_triton(lateral, coarse, out=lateral)
    if path != "gemm":
        raise ValueError(f"fpn_lateral_upsample_add[triton]: path must be 'gemm' or 'conv+add', got {path!r}")
    launch, out = plan_lateral_upsample_add(x, weight, bias, coarse, config=config)
    if out.numel():
        launch.run()
    return out


# ----------------------------------------------------------------------------------------------------
# Ahead-of-time specs


def aot_specs(arch: int) -> list:
    """Every launch at the model's FPN shapes (`mf_kernels.shapes.FPN_SHAPES`) for `arch`, fp16 and fp32:
    the upsample-add kernel for NCHW and channels_last inputs, and the GEMM for every candidate config of
    the arch (and both dot precisions for fp32 on sm_80+). What `python -m mf_kernels.aot` compiles."""
    from .aot import AotSpec, spec_from_launch
    from .shapes import FPN_SHAPES

    specs: dict[tuple, AotSpec] = {}

    def add(launch: Launch, dtype: torch.dtype) -> None:
        spec = spec_from_launch(launch, dtype=TL_DTYPES[dtype])
        specs.setdefault(spec.key(), spec)

    for shape in FPN_SHAPES:
        for dtype in TL_DTYPES:
            lateral = torch.empty(shape.batch, shape.cout, shape.height, shape.width, dtype=dtype)
            coarse = torch.empty(shape.batch, shape.cout, shape.coarse_height, shape.coarse_width, dtype=dtype)
            for fmt in (torch.contiguous_format, torch.channels_last):
                add(plan_upsample_add(lateral.contiguous(memory_format=fmt), coarse.contiguous(memory_format=fmt))[0],
                    dtype)
            x = torch.empty(shape.batch, shape.cin, shape.height, shape.width, dtype=dtype)
            weight = torch.empty(shape.cout, shape.cin, dtype=dtype)
            bias = torch.empty(shape.cout, dtype=torch.float32)
            precisions = ("ieee", "tf32") if dtype == torch.float32 and arch >= 80 else ("ieee",)
            for cfg in gemm_configs(arch, dtype):
                for precision in precisions:
                    add(plan_lateral_upsample_add(x, weight, bias, coarse, arch=arch, config=cfg,
                                                  precision=precision)[0], dtype)
    return list(specs.values())
