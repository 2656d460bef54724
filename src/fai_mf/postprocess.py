"""Post-processing of FAI-MF outputs (SPEC §3): the selection of the kept queries, on top of the ops.

Two paths, both through `mf_kernels` (so one tie rule, one box dtype, one upsample: the op's reference is
the reference, and `kernels=` / `mf_kernels.use` / $MF_KERNELS pick the backend):

* the user-facing path (`select_queries`, used by `fai_mf.predict`): for ONE image, from the stride-4
  mask logits [Q, h4, w4] and class probabilities [Q, C] to the kept queries (`KeptQueries`): score and
  class = max over classes; only queries whose class score exceeds `threshold` can survive (the mask
  score is a mean of probabilities, at most 1), so only they are expanded by `mf_kernels.mask_postprocess`
  (with predict_all_pixels every query still competes for the pixels); keep queries with more than one
  pixel; with use_mask_score multiply by the mean probability inside the mask; keep score > threshold
  (strict); keep query order. Their masks become `FocoosDet.mask` strings through the encoder ops
  (`mask_strings`).
* the metrics path (`semantic_inference`, `instance_inference`), on probabilities at image size.

Scores and probabilities are compared in fp32, so a score equal to `threshold` is dropped (strict `>`),
and a probability equal to `mask_threshold` is foreground (`>=`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

import mf_kernels
from mf_kernels.postprocess.reference import MaskStats, boxes_of_masks, semantic_argmax, to_device

from .config import MaskFormerConfig
from .formats import check_mask_format, png_to_base64, rle_to_json


@dataclass(frozen=True)
class PostprocessOptions:
    """Options of the user-facing path; `from_config` fills the ones left as None from the config."""

    threshold: float = 0.5
    mask_threshold: float = 0.5
    predict_all_pixels: bool = False
    use_mask_score: bool = False

    @classmethod
    def from_config(cls, config: MaskFormerConfig, threshold: float | None = None,
                    mask_threshold: float | None = None, predict_all_pixels: bool | None = None,
                    use_mask_score: bool | None = None) -> "PostprocessOptions":
        """Per-call values override the config; only None means "use the config" (False and 0 count)."""
        def pick(value: Any, name: str) -> Any:
            return getattr(config, name) if value is None else value

        return cls(threshold=float(pick(threshold, "threshold")),
                   mask_threshold=float(pick(mask_threshold, "mask_threshold")),
                   predict_all_pixels=bool(pick(predict_all_pixels, "predict_all_pixels")),
                   use_mask_score=bool(pick(use_mask_score, "use_mask_score")))


@dataclass
class KeptQueries:
    """The kept queries of one image, in query order (K of them), as SPEC §3 selects them.

    indices, classes: int64 [K]; scores: fp32 [K] final scores; boxes: int32 [K, 4] inclusive
    [x1, y1, x2, y2]; areas: int64 [K] (all CPU tensors); masks: K `FocoosDet.mask` strings (base64 PNG
    of the box crop, or the JSON of a COCO compressed RLE), or None when no mask format was asked.
    """

    indices: torch.Tensor
    classes: torch.Tensor
    scores: torch.Tensor
    boxes: torch.Tensor
    areas: torch.Tensor
    masks: list[str] | None
    image_size: tuple[int, int]

    def __len__(self) -> int:
        return int(self.indices.numel())


def candidates_of(class_probs: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scores fp32 [Q], classes int64 [Q], candidates int64 [K]) on the host from one copy of class_probs
    [Q, C]: score, class = max over classes; the candidates are the queries whose score exceeds `threshold`
    (a mask score is a mean of probabilities, at most 1, so no other query can be kept)."""
    scores, classes = class_probs.float().cpu().max(-1)
    return scores, classes, (scores > threshold).nonzero().flatten()


def keep(stats: MaskStats, candidates: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor,
         options: PostprocessOptions, mask_format: str | None = "png") -> KeptQueries:
    """SPEC §3's selection from the stats of the candidate queries (`stats` row k is query candidates[k]).

    candidates: int64 [K] CPU; scores, classes: [Q] CPU, the class score and class of every query.
    """
    stats = stats.to_host()
    final = scores[candidates]
    if options.use_mask_score:
        final = final * stats.mask_scores()
    kept = ((stats.areas > 1) & (final > options.threshold)).nonzero().flatten()
    indices = candidates[kept]
    return KeptQueries(indices=indices, classes=classes[indices], scores=final[kept], boxes=stats.boxes[kept],
                       areas=stats.areas[kept], masks=mask_strings(stats, kept.tolist(), mask_format),
                       image_size=stats.image_size)


def mask_strings(stats: MaskStats, rows: list[int], mask_format: str | None) -> list[str] | None:
    """`FocoosDet.mask` of the stats rows `rows`: the JSON of the COCO compressed RLE of the full-size mask
    ("rle", from `stats.rle_counts`) or the base64 PNG of its box crop ("png", from `stats.crops`)."""
    if mask_format is None:
        return None
    if mask_format == "rle":
        counts = mf_kernels.encode_rle_strings([stats.rle_counts[k] for k in rows])
        return [rle_to_json(stats.image_size, c) for c in counts]
    return [png_to_base64(png) for png in mf_kernels.encode_png_crops([stats.crops[k] for k in rows])]


def select_queries(mask_logits: torch.Tensor, class_probs: torch.Tensor, image_size: tuple[int, int],
                   options: PostprocessOptions, mask_format: str | None = "png") -> KeptQueries:
    """SPEC §3 for ONE image: stride-4 mask logits [Q, h4, w4] (`forward_raw(...).mask_logits[i]`) and
    class probs [Q, C] (`FAIMaskFormer.class_probs`) -> the kept queries with their mask strings.

    Device work: `mf_kernels.mask_postprocess` on the logits' device; the selection itself runs on the host
    from one copy of the class probabilities and one of the per-candidate stats.
    """
    if mask_logits.dim() != 3 or class_probs.dim() != 2 or mask_logits.shape[0] != class_probs.shape[0]:
        raise ValueError(f"expected mask_logits [Q, h4, w4] and class_probs [Q, C] with the same Q, got "
                         f"{tuple(mask_logits.shape)} and {tuple(class_probs.shape)}")
    if mask_format is not None:
        check_mask_format(mask_format)
    scores, classes, candidates = candidates_of(class_probs, options.threshold)
    want = dict(rle=mask_format == "rle", crops=mask_format == "png")
    if options.predict_all_pixels:
        stats = mf_kernels.mask_postprocess(mask_logits, image_size, scores=to_device(scores, mask_logits.device),
                                            queries=candidates, **want)
    else:
        stats = mf_kernels.mask_postprocess(mask_logits, image_size, options.mask_threshold, queries=candidates,
                                            **want)
    return keep(stats, candidates, scores, classes, options, mask_format)


# --------------------------------------------------------------------------------------------------
# Metrics path (evaluation)
# --------------------------------------------------------------------------------------------------

def semantic_inference(mask_probs: torch.Tensor, class_probs: torch.Tensor) -> torch.Tensor:
    """Semantic label map: int64 [H, W] = argmax_c sum_q class_probs[q, c] * mask_probs[q].

    mask_probs: [Q, H, W] probabilities at image size; class_probs: [Q, C]. Ties go to the lowest class.
    The same function as the reference of `mf_kernels.semantic_label_map`.
    """
    return semantic_argmax(mask_probs, class_probs)


def instance_inference(mask_probs: torch.Tensor, class_probs: torch.Tensor, top_k: int,
                       mask_threshold: float) -> dict[str, torch.Tensor]:
    """Instances for COCO evaluation: the top_k (query, class) pairs of class_probs.

    mask_probs: [Q, H, W] probabilities at image size; class_probs: [Q, C].
    Returns scores float [K] (class prob x mean prob inside the mask, 0 for an empty mask), labels int64
    [K], masks bool [K, H, W] (`probs > mask_threshold`, strict), boxes float [K, 4] xyxy with max
    inclusive ([0, 0, 0, 0] for an empty mask); K = min(top_k, Q*C), sorted by descending class prob.
    """
    num_queries, num_classes = class_probs.shape
    k = min(int(top_k), num_queries * num_classes)
    pair_probs, pair_ids = class_probs.flatten().topk(k)
    queries, labels = pair_ids // num_classes, pair_ids % num_classes
    probs = mask_probs[queries]
    masks = probs > mask_threshold
    areas = masks.sum((1, 2))
    inside = (probs * masks).sum((1, 2))
    mask_scores = torch.where(areas > 0, inside / areas.clamp(min=1).to(inside.dtype), torch.zeros_like(inside))
    boxes = boxes_of_masks(masks).to(mask_probs.dtype)
    boxes[areas == 0] = 0
    return {"scores": pair_probs.to(mask_scores.dtype) * mask_scores, "labels": labels, "masks": masks, "boxes": boxes}
