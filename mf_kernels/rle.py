"""COCO run-length encoding, the single reference (numpy) for `fai_mf.formats` and the fused kernels.

As pycocotools writes it (`pycocotools.mask.encode(np.asfortranarray(mask))`):
1. `rle_counts`: the mask is read in column-major order (down each column, left to right) and cut into
   alternating runs of 0s and 1s; the first run is the 0s (possibly of length 0).
2. `compress_rle_counts`: each count from the fourth on is replaced by its difference with the count two
   places before it; every value is then written as a little-endian sequence of 5-bit two's-complement
   groups, one character per group, `chr(48 + group)` with bit 0x20 set on every group but the last.
The C++ / CUDA / Triton paths of `mf_kernels.postprocess` are checked against these (and these
against pycocotools, in the tests).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def as_binary_mask(mask: Any, name: str = "mask") -> np.ndarray:
    """A bool [H, W] numpy array from a bool/integer [H, W] numpy array or torch tensor (nonzero = 1)."""
    if hasattr(mask, "detach") and hasattr(mask, "cpu"):  # a torch tensor; no torch import needed
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [H, W] array, got shape {mask.shape}")
    if mask.dtype != np.bool_ and not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(f"{name} must be bool or integer (nonzero = foreground), got dtype {mask.dtype}; "
                         "threshold float probabilities first")
    return mask.astype(bool, copy=False)


def rle_counts(mask: Any) -> np.ndarray:
    """Column-major run lengths of a binary mask, COCO convention.

    mask: bool/integer [H, W] (numpy or torch; nonzero = foreground).
    Returns int64 [N]: alternating runs of 0s and 1s read down the columns, starting with a (possibly
    empty) run of 0s; `sum == H * W`. Empty mask -> `[H*W]`, full mask -> `[0, H*W]`, and a mask with
    no pixels -> `[0]` (as pycocotools).
    """
    flat = as_binary_mask(mask).ravel(order="F")
    if flat.size == 0:
        return np.zeros(1, dtype=np.int64)
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1  # first index of every run but the first
    bounds = np.concatenate(([0], changes, [flat.size]))
    counts = np.diff(bounds).astype(np.int64)
    if flat[0]:  # the first run must be the 0s: prepend an empty one
        counts = np.concatenate(([0], counts))
    return counts


def _delta_encode(counts: np.ndarray) -> np.ndarray:
    """COCO's delta step: counts[i] - counts[i-2] for i > 2, unchanged for i <= 2."""
    deltas = counts.copy()
    deltas[3:] -= counts[1:-2]
    return deltas


def compress_rle_counts(counts: Sequence[int] | np.ndarray) -> str:
    """COCO compressed RLE string of run lengths (byte-identical to pycocotools' `rleToString`).

    counts: int [N] run lengths as `rle_counts` returns. Each value after the delta step is written in
    the fewest 5-bit groups that hold it as a two's-complement number (so n groups hold
    -2**(5n-1) <= x < 2**(5n-1)), least significant group first; a group is the character
    `chr(48 + g)`, with 0x20 added to every group but the last.
    """
    x = _delta_encode(np.asarray(counts, dtype=np.int64).ravel())
    if x.size == 0:
        return ""
    if np.abs(x).max() >= 2**58:  # keeps every shift below 64 bits; no mask comes near this
        raise ValueError("RLE counts too large to compress (>= 2**58)")
    n_groups = np.ones(x.size, dtype=np.int64)
    while True:  # grow each value's group count until it fits (at most 12 groups)
        half_range = np.left_shift(np.int64(1), 5 * n_groups - 1)
        too_big = (x < -half_range) | (x >= half_range)
        if not too_big.any():
            break
        n_groups += too_big
    k = np.arange(int(n_groups.max()), dtype=np.int64)  # group index within a value
    groups = np.right_shift(x[:, None], 5 * k[None, :]) & 0x1F  # arithmetic shift keeps the sign
    more = k[None, :] < (n_groups[:, None] - 1)
    chars = groups + 48 + 0x20 * more
    used = k[None, :] < n_groups[:, None]
    return chars[used].astype(np.uint8).tobytes().decode("ascii")  # row-major: value by value
