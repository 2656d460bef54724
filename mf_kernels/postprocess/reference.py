"""The references of the post-processing ops: the single source of truth of SPEC §3's mask semantics.

Probabilities are the model's own (`FAIMaskFormer.forward`): p_q = bilinear resize to (H, W)
(F.interpolate, align_corners=False) of sigmoid(mask_logits[q]), computed in fp32, for EVERY query, as
the unfused model materialises them. Then, per query:
- threshold mode: mask_q = p_q >= mask_threshold (p_q > mask_threshold when strict, the metrics path);
- ownership mode (predict_all_pixels): owner(y, x) = argmax_q scores[q] * p_q(y, x), ties to the lowest q
  (`pixel_owners`: torch.argmax returns the first maximal index), and mask_q = owner == q;
- area, inclusive box int32 [x1, y1, x2, y2] ([-1, -1, -1, -1] when empty), prob sum inside the mask,
  and on request the COCO run lengths (`mf_kernels.rle`) and the bool crop of the mask to its box.
`stats_of_probs` is that, from given full-size probabilities; `mask_postprocess_ref` adds the upsampling.

The encoders' references (Python RLE strings, Pillow PNGs) are here too. `to_host` / `MaskStats.to_host`
copy device results with one synchronisation, `to_device` moves small host inputs without one.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import rle
from .limits import check_inputs, check_mask_list, check_png_crops, check_semantic_inputs


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device` without a device synchronisation: a small host tensor (queries, scores) is staged at
    once and the copy queued on the stream (`non_blocking`), where a blocking copy would wait for the GPU."""
    return t.to(device, non_blocking=True)


def to_host(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """CPU copies of `tensors` with at most one synchronisation (CPU tensors are returned as they are)."""
    if not any(t.is_cuda for t in tensors):
        return tensors
    copies = tuple(t.to("cpu", non_blocking=True) for t in tensors)  # pinned staging, queued on the stream
    torch.cuda.current_stream(next(t.device for t in tensors if t.is_cuda)).synchronize()
    return copies


@dataclass
class MaskStats:
    """What `mask_postprocess` returns for K reported queries of one image of size (H, W).

    areas: int64 [K] foreground pixels; boxes: int32 [K, 4] inclusive [x1, y1, x2, y2], -1s when empty;
    prob_sums: fp32 [K] sum of the probability inside the mask (on the logits' device); rle_counts: K
    int64 CPU tensors (COCO run lengths) or None; crops: K bool CPU tensors [y2 - y1 + 1, x2 - x1 + 1]
    ([0, 0] when empty) or None; image_size: (H, W).
    """

    areas: torch.Tensor
    boxes: torch.Tensor
    prob_sums: torch.Tensor
    rle_counts: list[torch.Tensor] | None
    crops: list[torch.Tensor] | None
    image_size: tuple[int, int]

    def __len__(self) -> int:
        return int(self.areas.numel())

    def mask_scores(self) -> torch.Tensor:
        """fp32 [K] mean probability inside each mask (0 for an empty mask): use_mask_score's factor."""
        return torch.where(self.areas > 0, self.prob_sums / self.areas.clamp(min=1).to(self.prob_sums.dtype),
                           torch.zeros_like(self.prob_sums))

    def to_host(self) -> "MaskStats":
        """The same stats with areas, boxes and prob sums on the host (one synchronisation at most)."""
        areas, boxes, prob_sums = to_host(self.areas, self.boxes, self.prob_sums)
        return MaskStats(areas, boxes, prob_sums, self.rle_counts, self.crops, self.image_size)


# ----------------------------------------------------------------------------------------------------
# Pieces (also the metrics path of `fai_mf.postprocess`)


def upsample_probs(mask_logits: torch.Tensor, size) -> torch.Tensor:
    """fp32 [Q, H, W]: bilinear (align_corners=False) resize of sigmoid(mask_logits [Q, h, w]) computed in
    fp32, exactly as `FAIMaskFormer.forward` (which runs it on the model's dtype: fp32 here)."""
    if mask_logits.shape[0] == 0:  # F.interpolate refuses empty inputs
        return mask_logits.new_zeros((0, *size), dtype=torch.float32)
    probs = mask_logits.float().sigmoid()[None]
    return F.interpolate(probs, size=tuple(size), mode="bilinear", align_corners=False)[0]


def pixel_owners(probs: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """int64 [H, W]: argmax_q scores[q] * probs[q] (probs [Q, H, W], scores [Q]), ties to the lowest q:
    `torch.argmax` returns the first maximal index (tests pin it)."""
    return (scores.to(probs.dtype)[:, None, None] * probs).argmax(0)


def boxes_of_masks(masks: torch.Tensor) -> torch.Tensor:
    """int32 [K, 4] inclusive [x1, y1, x2, y2] of bool [K, H, W] masks; -1s for an empty mask."""
    height, width = masks.shape[-2:]
    rows, cols = masks.any(2), masks.any(1)
    ys = torch.arange(height, device=masks.device)
    xs = torch.arange(width, device=masks.device)
    boxes = torch.stack([torch.where(cols, xs, width).amin(1), torch.where(rows, ys, height).amin(1),
                         torch.where(cols, xs, -1).amax(1), torch.where(rows, ys, -1).amax(1)], dim=1)
    return boxes.masked_fill(~cols.any(1, keepdim=True), -1).to(torch.int32)


def semantic_argmax(probs: torch.Tensor, class_probs: torch.Tensor) -> torch.Tensor:
    """int64 [H, W] = argmax_c sum_q class_probs[q, c] * probs[q] (probs [Q, H, W]), ties to the lowest c."""
    return torch.einsum("qc,qhw->chw", class_probs.to(probs.dtype), probs).argmax(0)


def rle_counts_ref(mask: torch.Tensor) -> torch.Tensor:
    """COCO run lengths (int64 [N], CPU) of a bool [H, W] mask read column-major, first run the zeros
    (`mf_kernels.rle.rle_counts`, the one reference)."""
    return torch.from_numpy(rle.rle_counts(mask.cpu().numpy()))


def crop_to_box(mask: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """bool [y2 - y1 + 1, x2 - x1 + 1] CPU crop of a [H, W] mask to an inclusive box ([0, 0] when empty)."""
    x1, y1, x2, y2 = (int(v) for v in box)
    if x2 < 0:
        return torch.zeros(0, 0, dtype=torch.bool)
    return mask[y1:y2 + 1, x1:x2 + 1].cpu().contiguous()


# ----------------------------------------------------------------------------------------------------
# The op references


def stats_of_probs(probs: torch.Tensor, mask_threshold: float = 0.5, *, scores: torch.Tensor | None = None,
                   queries: torch.Tensor | None = None, strict: bool = False, rle: bool = False,
                   crops: bool = False) -> MaskStats:
    """`mask_postprocess` semantics from full-size probabilities [Q, H, W] (the module doc); the stats of the
    rows `queries` (int64 [K], default all), in that order."""
    if scores is None:
        masks = probs > mask_threshold if strict else probs >= mask_threshold
    else:
        ids = torch.arange(probs.shape[0], device=probs.device)
        masks = pixel_owners(probs, scores)[None] == ids[:, None, None]
    areas, prob_sums = masks.sum((1, 2)), (probs * masks).sum((1, 2))
    if queries is not None:
        queries = to_device(queries, probs.device)
        masks, areas, prob_sums = masks[queries], areas[queries], prob_sums[queries]
    boxes = boxes_of_masks(masks)
    return MaskStats(areas=areas, boxes=boxes, prob_sums=prob_sums,
                     rle_counts=[rle_counts_ref(m) for m in masks] if rle else None,
                     crops=[crop_to_box(m, b) for m, b in zip(masks, boxes)] if crops else None,
                     image_size=(int(probs.shape[-2]), int(probs.shape[-1])))


def mask_postprocess_ref(mask_logits: torch.Tensor, image_size, mask_threshold: float = 0.5, *,
                         scores: torch.Tensor | None = None, queries: torch.Tensor | None = None,
                         strict: bool = False, rle: bool = False, crops: bool = False) -> MaskStats:
    """Reference of `mask_postprocess`: every query upsampled to full size, then `stats_of_probs`."""
    size = check_inputs(mask_logits, image_size, scores, queries)
    return stats_of_probs(upsample_probs(mask_logits, size), mask_threshold, scores=scores, queries=queries,
                          strict=strict, rle=rle, crops=crops)


def semantic_label_map_ref(mask_logits: torch.Tensor, class_probs: torch.Tensor, image_size) -> torch.Tensor:
    """Reference of `semantic_label_map`: `semantic_argmax` of the full-size probabilities."""
    size = check_semantic_inputs(mask_logits, class_probs, image_size)
    return semantic_argmax(upsample_probs(mask_logits, size), class_probs)


def encode_rle_strings_ref(counts: list[torch.Tensor]) -> list[str]:
    """COCO compressed RLE strings of a list of int64 run-length tensors (`mf_kernels.rle`)."""
    return [rle.compress_rle_counts(c.cpu().numpy()) for c in counts]


def encode_rle_masks_ref(masks) -> list[str]:
    """COCO compressed RLE strings of dense bool/uint8 [H, W] masks (tensors or numpy arrays)."""
    return encode_rle_strings_ref([rle_counts_ref(m.bool()) for m in check_mask_list(masks)])


def encode_png_crops_ref(crops: list[torch.Tensor]) -> list[bytes]:
    """8-bit grayscale PNG files (0 / 255) of bool/uint8 [h, w] masks (h, w >= 1), with Pillow."""
    import io

    import numpy as np
    from PIL import Image

    check_png_crops(crops)
    out = []
    for crop in crops:
        buffer = io.BytesIO()
        Image.fromarray(crop.cpu().numpy().astype(np.uint8) * 255, mode="L").save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out
