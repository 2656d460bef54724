"""Post-processing of FAI-MF outputs (SPEC §3), pure-PyTorch reference.

Two paths:

* the user-facing path (`postprocess_reference`, used by `fai_mf.predict`): for ONE image, from the
  stride-4 mask logits `[Q, h4, w4]` and class probabilities `[Q, C]` to the kept queries, each with its
  index, class, score, inclusive bbox, area and full-size bool mask (`QueryResults`). It upsamples
  exactly as `FAIMaskFormer.forward` does, then binarises (or assigns every pixel to one query with
  predict_all_pixels), drops queries with at most one pixel, applies use_mask_score and the strict
  score threshold. A fused kernel (SPEC §4.3) computes the same `QueryResults` straight from the logits;
  `postprocess_queries` is the one call site it plugs into. Host-side encoding (PNG, RLE strings) lives
  in `fai_mf.formats`, never here.
* the metrics path (`semantic_inference`, `instance_inference`), on probabilities at image size.

Scores and probabilities are compared in their own dtype (float32 for a float32 model), so a score
equal to `threshold` in float32 is dropped (strict `>`), and a probability equal to `mask_threshold`
is foreground (`>=`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .config import MaskFormerConfig


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

        options = cls(threshold=float(pick(threshold, "threshold")),
                      mask_threshold=float(pick(mask_threshold, "mask_threshold")),
                      predict_all_pixels=bool(pick(predict_all_pixels, "predict_all_pixels")),
                      use_mask_score=bool(pick(use_mask_score, "use_mask_score")))
        return options


@dataclass
class QueryResults:
    """The kept queries of one image, in query order (K of them).

    indices: int64 [K] query index; classes: int64 [K] class id; scores: float [K] final score;
    boxes: int64 [K, 4] [x1, y1, x2, y2] with max inclusive; areas: int64 [K] foreground pixels;
    masks: bool [K, H, W] full-size masks; image_size: (H, W).
    """

    indices: torch.Tensor
    classes: torch.Tensor
    scores: torch.Tensor
    boxes: torch.Tensor
    areas: torch.Tensor
    masks: torch.Tensor
    image_size: tuple[int, int]

    def __len__(self) -> int:
        return int(self.indices.numel())


def upsample_mask_probs(mask_logits: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """[Q, h4, w4] stride-4 logits -> [Q, H, W] probabilities, as `FAIMaskFormer.forward`: bilinear
    (align_corners=False) resize of the sigmoid. Computed in float32 (upcast from half)."""
    probs = mask_logits.float().sigmoid()[None]
    return F.interpolate(probs, size=tuple(image_size), mode="bilinear", align_corners=False)[0]


def pixel_owners(mask_probs: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """int64 [H, W]: the query q maximising `scores[q] * mask_probs[q]` at each pixel, ties to the lowest q.

    mask_probs: [Q, H, W]; scores: [Q]. `torch.argmax` is documented to return the first maximal index,
    which is the lowest-q tie rule (tests pin it)."""
    return (scores[:, None, None] * mask_probs).argmax(0)


def binarize(mask_probs: torch.Tensor, scores: torch.Tensor, options: PostprocessOptions) -> torch.Tensor:
    """bool [Q, H, W]: `probs >= mask_threshold`, or with predict_all_pixels `owner == q`."""
    if options.predict_all_pixels:
        owners = pixel_owners(mask_probs, scores)
        return owners[None] == torch.arange(mask_probs.shape[0], device=mask_probs.device)[:, None, None]
    return mask_probs >= options.mask_threshold


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """int64 [K, 4] inclusive [x1, y1, x2, y2] of bool [K, H, W] masks (H, W >= 1); an empty mask gives
    [-1, -1, -1, -1] (as the fused mask post-processing kernels report it)."""
    height, width = masks.shape[-2:]
    rows, cols = masks.any(2), masks.any(1)  # [K, H], [K, W]
    ys = torch.arange(height, device=masks.device)
    xs = torch.arange(width, device=masks.device)
    x1, x2 = torch.where(cols, xs, width).amin(1), torch.where(cols, xs, -1).amax(1)
    y1, y2 = torch.where(rows, ys, height).amin(1), torch.where(rows, ys, -1).amax(1)
    boxes = torch.stack([x1, y1, x2, y2], dim=1).long()
    return boxes.masked_fill(~cols.any(1, keepdim=True), -1)


def postprocess_probs(mask_probs: torch.Tensor, class_probs: torch.Tensor, options: PostprocessOptions) -> QueryResults:
    """User-facing post-processing of one image from full-size probabilities.

    mask_probs: [Q, H, W] mask probabilities at image size; class_probs: [Q, C] class probabilities.
    Steps (SPEC §3): score, class = max over classes; binarise; keep queries with more than one pixel;
    with use_mask_score multiply the score by the mean probability inside the mask; keep score > threshold.
    """
    scores, classes = class_probs.max(-1)
    bins = binarize(mask_probs, scores, options)
    areas = bins.sum((1, 2))
    keep = areas > 1
    if options.use_mask_score:
        inside = (mask_probs * bins).sum((1, 2))
        scores = torch.where(keep, inside / areas.clamp(min=1).to(inside.dtype), torch.zeros_like(inside)) * scores
    keep &= scores > options.threshold
    indices = keep.nonzero().flatten()  # ascending: query order is kept
    masks = bins[indices]
    return QueryResults(indices=indices, classes=classes[indices], scores=scores[indices],
                        boxes=masks_to_boxes(masks), areas=areas[indices], masks=masks,
                        image_size=(int(mask_probs.shape[-2]), int(mask_probs.shape[-1])))


def postprocess_reference(mask_logits: torch.Tensor, class_probs: torch.Tensor, image_size: tuple[int, int],
                          options: PostprocessOptions) -> QueryResults:
    """Reference user-facing post-processing of ONE image, from the model's raw mask output.

    mask_logits: [Q, h4, w4] stride-4 mask logits (`forward_raw(...).mask_logits[i]`);
    class_probs: [Q, C] (`FAIMaskFormer.class_probs`); image_size: (H, W) of the input image.
    Returns the kept queries (see `QueryResults`). This is the single source of truth the fused
    mask post-processing kernels are checked against.
    """
    if mask_logits.dim() != 3 or class_probs.dim() != 2 or mask_logits.shape[0] != class_probs.shape[0]:
        raise ValueError(f"expected mask_logits [Q, h4, w4] and class_probs [Q, C] with the same Q, got "
                         f"{tuple(mask_logits.shape)} and {tuple(class_probs.shape)}")
    return postprocess_probs(upsample_mask_probs(mask_logits, image_size), class_probs.float(), options)


def postprocess_queries(mask_logits: torch.Tensor, class_probs: torch.Tensor, image_size: tuple[int, int],
                        options: PostprocessOptions) -> QueryResults:
    """The call site `fai_mf.predict` uses; today the reference, later the kernel dispatch (SPEC §4.3)."""
    return postprocess_reference(mask_logits, class_probs, image_size, options)


# --------------------------------------------------------------------------------------------------
# Metrics path (evaluation)
# --------------------------------------------------------------------------------------------------

def semantic_inference(mask_probs: torch.Tensor, class_probs: torch.Tensor) -> torch.Tensor:
    """Semantic label map: int64 [H, W] = argmax_c sum_q class_probs[q, c] * mask_probs[q].

    mask_probs: [Q, H, W] probabilities at image size; class_probs: [Q, C]. Ties go to the lowest class.
    """
    scores = torch.einsum("qc,qhw->chw", class_probs.to(mask_probs.dtype), mask_probs)
    return scores.argmax(0)


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
    boxes = masks_to_boxes(masks).to(mask_probs.dtype)
    boxes[areas == 0] = 0
    return {"scores": pair_probs.to(mask_scores.dtype) * mask_scores, "labels": labels, "masks": masks, "boxes": boxes}
