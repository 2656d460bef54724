"""Host side of the GPU backends: bit masks -> COCO run lengths and box crops.

The triton and cuda backends write, for each reported query, its full-size mask as bits: uint8
[K, H, row_bytes], bit b of byte j = column 8 j + b (little-endian), rows padded to 32-bit words
(`bits_row_bytes`). One copy of them and of the boxes reaches the host; there the extension
(csrc/encode.cpp, reading only each mask's box) or, without it, PyTorch turns them into RLE counts and
crops. RLE on the GPU is not worth it: the counts are a sequential scan of a few hundred transitions.
"""
from __future__ import annotations

import math

import torch

from .reference import crop_to_box, rle_counts_ref, to_host


def bits_row_bytes(width: int) -> int:
    """Bytes per row of a bit mask: rows padded to 32-bit words (bit b of byte j = column 8 j + b)."""
    return 4 * math.ceil(width / 32)


def unpack_bits(bits: torch.Tensor, width: int) -> torch.Tensor:
    """bool [K, H, W] of bit masks uint8 [K, H, row_bytes] (little-endian bit order)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    unpacked = (bits[..., None] >> shifts) & 1
    return unpacked.reshape(*bits.shape[:2], -1)[..., :width].bool()


def host_outputs_from_bits(bits: torch.Tensor, boxes: torch.Tensor, width: int, rle: bool,
                           crops: bool) -> tuple[list[torch.Tensor] | None, list[torch.Tensor] | None]:
    """(rle_counts, crops) of device bit masks and their boxes: one copy to the host (one synchronisation),
    then the extension when it loads, else PyTorch."""
    if not (rle or crops):
        return None, None
    from .. import _cpp_lib

    bits_cpu, boxes_cpu = to_host(bits, boxes)
    if _cpp_lib.is_available():
        ext = _cpp_lib.load()
        return (ext.rle_counts_from_bits(bits_cpu, boxes_cpu, width) if rle else None,
                ext.crops_from_bits(bits_cpu, boxes_cpu, width) if crops else None)
    masks = unpack_bits(bits_cpu, width)
    return ([rle_counts_ref(m) for m in masks] if rle else None,
            [crop_to_box(m, b) for m, b in zip(masks, boxes_cpu)] if crops else None)
