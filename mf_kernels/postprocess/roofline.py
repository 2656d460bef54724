"""Bytes and FLOPs of the post-processing kernels, declared once: the rows at the SPEC §5 shapes
(`python -m mf_kernels.roofline`) and the rows of one recorded call (`fai-mf bench roofline`) both come
from the traffic functions below.

FLOPs per output pixel and query, counted as: bilinear 9 (6 mul, 3 add); sigmoid of the 4 taps 12 (exp,
add, divide each); threshold, area, prob sum and 4 box updates 7. The ownership argmax adds a multiply
and a compare; the semantic argmax interpolates class maps (no sigmoid) and compares.
"""
from __future__ import annotations

import torch

from .. import dispatch
from ..roofline import Row
from .bits import bits_row_bytes

FLOPS_BILINEAR, FLOPS_SIGMOID_TAPS, FLOPS_STATS, FLOPS_ARGMAX = 9, 12, 7, 2
OUTPUT_BYTES_PER_QUERY = 8 + 16 + 4  # area int64, box 4 x int32, prob sum fp32
PARTIAL_BYTES_PER_BLOCK = 24  # area, prob sum, box of one (query, row block) partial


def _partials(kept: int, height: int) -> int:
    """The two-stage reduction's partials: written, then read back."""
    return kept * -(-height // 4) * PARTIAL_BYTES_PER_BLOCK * 2


def threshold_stats_row(kept: int, h: int, w: int, height: int, width: int, itemsize: int, label: str,
                        dtype: str) -> Row:
    """Threshold-mode stats of `kept` queries: their stride-4 logits read, bit masks and stats written."""
    logits = kept * h * w * itemsize
    nbytes = logits + kept * height * bits_row_bytes(width) + kept * OUTPUT_BYTES_PER_QUERY
    flops = kept * height * width * (FLOPS_BILINEAR + FLOPS_SIGMOID_TAPS + FLOPS_STATS)
    return Row("mask_postprocess/stats", label, dtype, nbytes, flops, nbytes + _partials(kept, height))


def owner_row(queries: int, h: int, w: int, height: int, width: int, itemsize: int, label: str, dtype: str) -> Row:
    """The ownership map: every query's logits read, owner int32 and its prob fp32 written."""
    nbytes = queries * h * w * itemsize + height * width * (4 + 4)
    return Row("mask_postprocess/owner", label, dtype, nbytes,
               queries * height * width * (FLOPS_BILINEAR + FLOPS_SIGMOID_TAPS + FLOPS_ARGMAX))


def owner_stats_row(kept: int, height: int, width: int, label: str) -> Row:
    """Stats of `kept` queries from the owner map (read once, its prob once more for the sums)."""
    outputs = kept * height * bits_row_bytes(width) + kept * OUTPUT_BYTES_PER_QUERY
    return Row("mask_postprocess/stats", label, "float32", height * width * 4 + outputs,
               kept * height * width * FLOPS_STATS, height * width * 8 + outputs + _partials(kept, height))


def semantic_rows(queries: int, classes: int, h: int, w: int, height: int, width: int, itemsize: int,
                  label: str, dtype: str) -> list[Row]:
    """The stride-4 class maps (one GEMM: logits and class probs read, maps written) and the C-way
    bilinear argmax (maps read, int64 labels written)."""
    gemm = Row("semantic_label_map/class_maps", f"{label}, GEMM C={classes}", dtype,
               (queries * h * w + queries * classes + classes * h * w) * itemsize,
               2 * queries * classes * h * w + queries * h * w * 3)
    argmax = Row("semantic_label_map/argmax", f"{label}, C={classes}", dtype,
                 classes * h * w * itemsize + height * width * 8,
                 height * width * classes * (FLOPS_BILINEAR + FLOPS_ARGMAX))
    return [gemm, argmax]


def roofline_rows() -> list[Row]:
    """Every kernel at `POSTPROCESS_SHAPES`, next to the reference path it replaces.

    `bytes` is the minimum traffic (inputs read once, outputs written once); `kernel_bytes` adds what the
    plan moves on top (partials of the two-stage reduction; the owner map read once more for the stats).
    The reference rows are the unfused path: all Q masks upsampled to fp32 at image size (written, read to
    threshold), the bool masks written and read: >= 9 bytes per pixel-query.
    """
    from ..shapes import POSTPROCESS_SHAPES

    coco, ade = POSTPROCESS_SHAPES
    h, w = coco.logits_hw
    pixels = coco.height * coco.width
    rows = []
    for dtype, size in (("float16", 2), ("float32", 4)):
        rows.append(threshold_stats_row(coco.kept, h, w, coco.height, coco.width, size, f"{coco.name}, threshold",
                                        dtype))
        rows.append(owner_row(coco.queries, h, w, coco.height, coco.width, size,
                              f"{coco.name}, all {coco.queries} queries", dtype))
    rows.append(owner_stats_row(coco.kept, coco.height, coco.width, f"{coco.name}, ownership"))
    rows.append(Row("mask_postprocess/reference", f"{coco.name}, all {coco.queries} upsampled", "float32",
                    coco.queries * (h * w * 4 + pixels * 9), coco.queries * pixels * (FLOPS_BILINEAR + FLOPS_STATS)))
    h, w = ade.logits_hw
    pixels = ade.height * ade.width
    rows += semantic_rows(ade.queries, ade.classes, h, w, ade.height, ade.width, 4, ade.name, "float32")
    rows.append(Row("semantic_label_map/reference", f"{ade.name}, full-size einsum", "float32",
                    ade.queries * pixels * 4 * 2 + ade.classes * pixels * 4 * 2 + pixels * 8,
                    2 * ade.queries * ade.classes * pixels))
    return rows


def roofline_call_rows(op: str, args: tuple, kwargs: dict, dtype: torch.dtype) -> list[Row]:
    """The rows of one recorded `mask_postprocess` / `semantic_label_map` call, as the T4 runs it in `dtype`."""
    itemsize, name = torch.empty((), dtype=dtype).element_size(), dispatch.dtype_name(dtype)
    if op == "semantic_label_map":
        logits, class_probs, image_size = args[:3]
        queries, h, w = logits.shape
        height, width = image_size
        return semantic_rows(queries, class_probs.shape[1], h, w, height, width, itemsize,
                             f"Q={queries} {height}x{width}", name)
    logits, image_size = args[:2]
    height, width = image_size
    queries, h, w = logits.shape
    kept = queries if kwargs.get("queries") is None else int(kwargs["queries"].numel())
    if kwargs.get("scores") is None:
        return [threshold_stats_row(kept, h, w, height, width, itemsize, f"threshold expanded={kept} {height}x{width}",
                                    name)]
    label = f"ownership Q={queries} expanded={kept} {height}x{width}"
    return [owner_row(queries, h, w, height, width, itemsize, label, name), owner_stats_row(kept, height, width, label)]
