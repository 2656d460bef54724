"""Mask post-processing (SPEC §4.3): from stride-4 mask logits straight to what SPEC §3 needs.

Ops (registered here; each runs the backend `mf_kernels.dispatch` picks):

    stats = mask_postprocess(mask_logits [Q, h, w], image_size (H, W), mask_threshold=0.5, *, scores=None,
                             queries=None, strict=False, rle=False, crops=False)   # -> MaskStats
    labels = semantic_label_map(mask_logits [Q, h, w], class_probs [Q, C], image_size)  # -> int64 [H, W]
    strings = encode_rle_strings(stats.rle_counts)     # -> list[str], COCO compressed RLE (= pycocotools)
    strings = encode_rle_masks(dense_masks)            # -> list[str], from bool/uint8 [H, W] masks
    pngs = encode_png_crops(stats.crops)               # -> list[bytes], 8-bit grayscale PNG files

threshold mode (scores=None): mask_q = p_q >= mask_threshold (> when strict), for every row of
mask_logits or for the rows `queries` (int64 [K]). ownership mode (scores [Q], predict_all_pixels): every
pixel belongs to argmax_q scores[q] * p_q (ties to the lowest q), reported for `queries`. Per reported
query: area, inclusive int32 box ([-1] * 4 when empty), prob sum inside the mask, and on request the COCO
RLE counts and the bbox crop. The fused backends expand only the reported queries (ownership: every
query competes, only the reported ones are counted) and never write a [K, H, W] float mask.

semantic_label_map: argmax_c sum_q class_probs[q, c] * p_q(y, x). Bilinear interpolation is linear, so the
fused backends compute the [C, h, w] class maps at stride 4 (one small GEMM) and interpolate C values per
output pixel: exact up to rounding and about Q times cheaper.

The package, in reading order:
    limits.py          input checks, dtypes per backend, int32 / grid bounds, the dispatcher's bounded key
    reference.py       the references (the single source of truth), `MaskStats`, `to_host`
    native.py          cpp and cuda backends: shims over the extension mf_kernels._C
    bits.py            host side of the GPU backends: bit masks -> RLE counts and crops
    triton_kernels.py  the Triton kernels, their launchers and AOT specs (imported lazily: it imports triton)
    roofline.py        bytes and FLOPs of every kernel (python -m mf_kernels.roofline, fai-mf bench roofline)
    __init__.py        this file: the registration
Outputs of the GPU backends: areas, boxes, prob sums stay on the device (`MaskStats.to_host` copies them
with one synchronisation); RLE counts and crops are CPU tensors. SPEC §3's selection of the kept queries
and the `FocoosDet` mask strings are `fai_mf.postprocess`, on top of these ops.
"""
from __future__ import annotations

import torch

from .. import dispatch
from . import limits, native
from .limits import CUDA_DTYPES, HOST_DTYPES, LOGIT_DTYPES, TRITON_DTYPES
from .reference import (MaskStats, encode_png_crops_ref, encode_rle_masks_ref, encode_rle_strings_ref,
                        mask_postprocess_ref, semantic_label_map_ref)

TRITON_MODULE = "mf_kernels.postprocess.triton_kernels"


def _mask_postprocess_triton(*args, **kwargs) -> MaskStats:
    from .triton_kernels import mask_postprocess_triton

    return mask_postprocess_triton(*args, **kwargs)


def _semantic_label_map_triton(*args, **kwargs) -> torch.Tensor:
    from .triton_kernels import semantic_label_map_triton

    return semantic_label_map_triton(*args, **kwargs)


mask_postprocess = dispatch.define_op("mask_postprocess", mask_postprocess_ref, limits.inputs_of)
mask_postprocess.__doc__ = """mask_postprocess(mask_logits [Q, h, w], image_size (H, W), mask_threshold=0.5, *,
scores=None, queries=None, strict=False, rle=False, crops=False) -> MaskStats; see `mf_kernels.postprocess`."""
mask_postprocess.register(
    "cpp", native.mask_postprocess_cpp, devices=("cpu",), dtypes=LOGIT_DTYPES,
    environment=dispatch.extension_environment, check=limits.index_reasons,
    description="C++/OpenMP column-major pass per query (stats + RLE counts + crops in one pass), ownership map "
                "parallel over columns (csrc/postprocess.cpp)")
mask_postprocess.register(
    "triton", _mask_postprocess_triton, devices=("cpu", "cuda"), dtypes=TRITON_DTYPES,
    environment=dispatch.triton_environment(TRITON_MODULE), check=limits.triton_stats_reasons,
    description="Triton stats + bit masks per (query, row block), two-stage reduction; RLE counts and crops on "
                "the host from the bit masks")
mask_postprocess.register(
    "cuda", native.mask_postprocess_cuda, devices=("cuda",), dtypes=CUDA_DTYPES,
    environment=dispatch.extension_environment, check=limits.cuda_stats_reasons,
    description="CUDA stats + ballot bit masks (csrc/postprocess_cuda.cu); RLE counts and crops on the host from the "
                "bit masks")

semantic_label_map = dispatch.define_op("semantic_label_map", semantic_label_map_ref, limits.semantic_inputs_of)
semantic_label_map.__doc__ = """semantic_label_map(mask_logits [Q, h, w], class_probs [Q, C], image_size (H, W)) ->
int64 [H, W]; see `mf_kernels.postprocess`."""
semantic_label_map.register(
    "cpp", native.semantic_label_map_cpp, devices=("cpu",), dtypes=LOGIT_DTYPES,
    environment=dispatch.extension_environment, check=limits.index_reasons,
    description="stride-4 class maps (one GEMM) + C-way bilinear argmax per pixel, OpenMP")
semantic_label_map.register(
    "triton", _semantic_label_map_triton, devices=("cpu", "cuda"), dtypes=TRITON_DTYPES,
    environment=dispatch.triton_environment(TRITON_MODULE), check=limits.index_reasons,
    description="stride-4 class maps (torch GEMM) + Triton C-way bilinear argmax")
semantic_label_map.register(
    "cuda", native.semantic_label_map_cuda, devices=("cuda",), dtypes=CUDA_DTYPES,
    environment=dispatch.extension_environment, check=limits.index_reasons,
    description="stride-4 class maps (cuBLAS) + CUDA C-way bilinear argmax")

encode_rle_strings = dispatch.define_op("encode_rle_strings", encode_rle_strings_ref, limits.host_inputs_of)
encode_rle_strings.__doc__ = """encode_rle_strings(counts: list of int64 run-length tensors) -> list[str]: COCO
compressed RLE strings, byte-identical to pycocotools."""
encode_rle_strings.register("reference", encode_rle_strings_ref, devices=("cpu",), dtypes=HOST_DTYPES,
                            description="Python loop")
encode_rle_strings.register("cpp", native.encode_rle_strings_cpp, devices=("cpu",), dtypes=HOST_DTYPES,
                            environment=dispatch.extension_environment, description="C++ (csrc/encode.cpp)")

encode_rle_masks = dispatch.define_op("encode_rle_masks", encode_rle_masks_ref, limits.host_inputs_of)
encode_rle_masks.__doc__ = """encode_rle_masks(masks: list of bool/uint8 [H, W] tensors or numpy arrays) -> list[str]:
COCO compressed RLE strings of dense masks, byte-identical to pycocotools.mask.encode."""
encode_rle_masks.register("reference", encode_rle_masks_ref, devices=("cpu",), dtypes=HOST_DTYPES,
                          description="PyTorch run lengths + Python string loop")
encode_rle_masks.register("cpp", native.encode_rle_masks_cpp, devices=("cpu",), dtypes=HOST_DTYPES,
                          environment=dispatch.extension_environment,
                          description="C++ row-major scan (memcmp of equal rows) or direct column-major scan")

encode_png_crops = dispatch.define_op("encode_png_crops", encode_png_crops_ref, limits.host_inputs_of)
encode_png_crops.__doc__ = """encode_png_crops(crops: list of bool/uint8 [h, w] tensors) -> list[bytes]: 8-bit
grayscale PNG files (0 / 255); base64 them for FocoosDet.mask."""
encode_png_crops.register("reference", encode_png_crops_ref, devices=("cpu",), dtypes=HOST_DTYPES,
                          description="Pillow")
encode_png_crops.register("cpp", native.encode_png_crops_cpp, devices=("cpu",), dtypes=HOST_DTYPES,
                          environment=dispatch.extension_environment,
                          description="C++ PNG writer, zlib when the build found it (csrc/encode.cpp)")

dispatch.register_aot_provider("mask_postprocess", f"{TRITON_MODULE}:aot_specs")
dispatch.register_roofline_provider(("mask_postprocess", "semantic_label_map"),
                                    "mf_kernels.postprocess.roofline:roofline_rows",
                                    "mf_kernels.postprocess.roofline:roofline_call_rows")

__all__ = ["MaskStats", "encode_png_crops", "encode_rle_masks", "encode_rle_strings", "mask_postprocess",
           "mask_postprocess_ref", "semantic_label_map", "semantic_label_map_ref"]
