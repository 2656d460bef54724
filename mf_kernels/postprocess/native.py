"""The `cpp` and `cuda` backends of the post-processing ops: thin shims over the extension `mf_kernels._C`.

cpp  (csrc/postprocess.cpp, csrc/encode.cpp): one column-major pass per query that thresholds, counts the
     RLE runs and cuts the crop at once; the ownership map parallel over columns; the semantic argmax
     from stride-4 class maps; the host encoders (RLE strings, PNG files).
cuda (csrc/postprocess_cuda.cu): stats and ballot bit masks on the device; RLE counts and crops on the host
     from one copy of the bits (`bits.host_outputs_from_bits`).
Whether the extension loads (and has CUDA) is `mf_kernels._cpp_lib`'s answer, asked by the dispatcher
(`dispatch.extension_environment`); these shims only call it.
"""
from __future__ import annotations

import torch

from .bits import host_outputs_from_bits
from .limits import check_inputs, check_mask_list, check_png_crops, check_semantic_inputs
from .reference import MaskStats, to_device


def _extension():
    from .. import _cpp_lib

    return _cpp_lib.load()


def mask_postprocess_cpp(mask_logits: torch.Tensor, image_size, mask_threshold: float = 0.5, *,
                         scores: torch.Tensor | None = None, queries: torch.Tensor | None = None,
                         strict: bool = False, rle: bool = False, crops: bool = False) -> MaskStats:
    """`mask_postprocess` on CPU tensors with the C++ extension (one pass per query, parallel)."""
    height, width = check_inputs(mask_logits, image_size, scores, queries)
    ext = _extension()
    if scores is None:
        logits = mask_logits if queries is None else mask_logits[queries]
        out = ext.mask_stats(logits, height, width, float(mask_threshold), bool(strict), bool(rle), bool(crops))
    else:
        ids = torch.arange(mask_logits.shape[0]) if queries is None else queries
        out = ext.owner_stats(mask_logits, scores, ids, height, width, bool(rle), bool(crops))
    areas, boxes, prob_sums, counts, crop_list = out
    return MaskStats(areas, boxes, prob_sums, counts if rle else None, crop_list if crops else None, (height, width))


def semantic_label_map_cpp(mask_logits: torch.Tensor, class_probs: torch.Tensor, image_size) -> torch.Tensor:
    height, width = check_semantic_inputs(mask_logits, class_probs, image_size)
    return _extension().semantic_label_map(mask_logits, class_probs, height, width)


def encode_rle_strings_cpp(counts: list[torch.Tensor]) -> list[str]:
    return [s.decode("ascii") for s in _extension().rle_strings(list(counts))]


def encode_rle_masks_cpp(masks) -> list[str]:
    return [s.decode("ascii") for s in _extension().rle_encode_many(check_mask_list(masks))]


def encode_png_crops_cpp(crops: list[torch.Tensor]) -> list[bytes]:
    check_png_crops(crops)
    return list(_extension().png_encode_many(list(crops)))


def mask_postprocess_cuda(mask_logits: torch.Tensor, image_size, mask_threshold: float = 0.5, *,
                          scores: torch.Tensor | None = None, queries: torch.Tensor | None = None,
                          strict: bool = False, rle: bool = False, crops: bool = False) -> MaskStats:
    """`mask_postprocess` on CUDA tensors: stats and bit masks on the device, counts and crops on the host."""
    height, width = check_inputs(mask_logits, image_size, scores, queries)
    ext = _extension()
    device = mask_logits.device
    if scores is None:
        logits = mask_logits if queries is None else mask_logits[to_device(queries, device)]
        areas, boxes, prob_sums, bits = ext.mask_stats_cuda(logits, height, width, float(mask_threshold),
                                                            bool(strict), rle or crops)
    else:
        ids = torch.arange(mask_logits.shape[0], device=device) if queries is None else to_device(queries, device)
        areas, boxes, prob_sums, bits = ext.owner_stats_cuda(mask_logits, scores, ids, height, width, rle or crops)
    counts, crop_list = host_outputs_from_bits(bits, boxes, width, rle, crops)
    return MaskStats(areas, boxes, prob_sums, counts, crop_list, (height, width))


def semantic_label_map_cuda(mask_logits: torch.Tensor, class_probs: torch.Tensor, image_size) -> torch.Tensor:
    height, width = check_semantic_inputs(mask_logits, class_probs, image_size)
    return _extension().semantic_label_map_cuda(mask_logits, class_probs, height, width)
