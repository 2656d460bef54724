"""FAI-MF losses (SPEC §6): class cross-entropy, mask BCE and dice on PointRend-sampled points.

For each prediction (the last decoder layer and, with deep supervision, every earlier one) the
queries are matched to the ground truth (`matcher.HungarianMatcher`), then:

- `loss_ce`: cross-entropy over C+1 classes, weight 1 per class and `criterion_eos_coef` for
  no-object (unmatched queries); with `cls_sigmoid`, per-class BCE on the C real classes (no
  no-object column; an unmatched query has all-zero targets), each query weighted the same way.
  Normalised by the sum of the query weights, which is what `F.cross_entropy(weight=...)` divides
  by in one process; the sum is all-reduced so that N processes give the loss of one big batch.
- `loss_mask` / `loss_dice`: on `criterion_num_points` points per matched mask chosen by PointRend
  importance sampling (candidates `oversample` x P uniform points; the `importance` fraction with
  the highest uncertainty -|logit| are kept, the rest are fresh uniform points). The ground truth
  is sampled at the same points (bilinear, align_corners=False). Per-mask mean BCE and dice are
  summed and divided by the number of GT masks in the global batch divided by the world size
  (at least 1), as in Mask2Former.

Keys: loss_ce, loss_mask, loss_dice for the last layer and loss_ce_i, ... for `aux[i]`, already
multiplied by `weight_dict_loss_*`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .config import MaskFormerConfig
from .matcher import FixedPoints, HungarianMatcher, PointSampler, UniformPoints, pad_to_prediction, point_sample

__all__ = ["ImportancePoints", "FixedPoints", "UniformPoints", "MaskFormerCriterion", "point_sample",
           "sigmoid_bce_loss", "dice_loss"]

OVERSAMPLE_RATIO = 3.0
IMPORTANCE_SAMPLE_RATIO = 0.75


class ImportancePoints:
    """PointRend importance sampling: mask logits [N, 1, h, w] -> coords [N, P, 2] ((x, y) in [0, 1]).

    The first int(importance * P) points are the most uncertain (-|logit|, bilinear at the point) of
    int(oversample * P) uniform candidates; the rest are uniform random. `generator` fixes the draws.
    """

    def __init__(self, num_points: int, oversample: float = OVERSAMPLE_RATIO,
                 importance: float = IMPORTANCE_SAMPLE_RATIO, generator: torch.Generator | None = None):
        if oversample < 1 or not 0 <= importance <= 1:
            raise ValueError(f"need oversample >= 1 and 0 <= importance <= 1, got {oversample}, {importance}")
        self.num_points = num_points
        self.num_candidates = int(num_points * oversample)
        self.num_important = int(importance * num_points)
        self.generator = generator

    def _rand(self, n: int, p: int, device: torch.device) -> torch.Tensor:
        gen_device = self.generator.device if self.generator is not None else device
        return torch.rand(n, p, 2, generator=self.generator, device=gen_device).to(device)

    @torch.no_grad()
    def __call__(self, mask_logits: torch.Tensor) -> torch.Tensor:
        n, device = mask_logits.shape[0], mask_logits.device
        candidates = self._rand(n, self.num_candidates, device)
        uncertainty = -point_sample(mask_logits.float(), candidates)[:, 0].abs()  # [N, K]
        top = uncertainty.topk(self.num_important, dim=1).indices
        important = candidates.gather(1, top.unsqueeze(-1).expand(-1, -1, 2))
        uniform = self._rand(n, self.num_points - self.num_important, device)
        return torch.cat([important, uniform], dim=1)


def sigmoid_bce_loss(point_logits: torch.Tensor, point_labels: torch.Tensor, num_masks: torch.Tensor) -> torch.Tensor:
    """Σ over masks of the mean BCE over points / num_masks; [M, P] each."""
    bce = F.binary_cross_entropy_with_logits(point_logits, point_labels, reduction="none")
    return bce.mean(1).sum() / num_masks


def dice_loss(point_logits: torch.Tensor, point_labels: torch.Tensor, num_masks: torch.Tensor) -> torch.Tensor:
    """Σ over masks of 1 - (2 Σ p·t + 1) / (Σ p + Σ t + 1), / num_masks; [M, P] each."""
    probs = point_logits.sigmoid()
    numerator = 2.0 * (probs * point_labels).sum(-1)
    denominator = probs.sum(-1) + point_labels.sum(-1)
    return (1.0 - (numerator + 1.0) / (denominator + 1.0)).sum() / num_masks


class MaskFormerCriterion(nn.Module):
    """Holds `empty_weight` [C+1] (1 per class, `criterion_eos_coef` for no-object) as in focoos.

    `matcher` and `point_sampler` are plain attributes (no state): replace `point_sampler` (or the
    matcher's) with `FixedPoints` for deterministic losses.
    """

    def __init__(self, config: MaskFormerConfig):
        super().__init__()
        self.config = config
        self.num_classes = config.num_classes
        self.cls_sigmoid = config.cls_sigmoid
        self.eos_coef = config.criterion_eos_coef
        self.deep_supervision = config.criterion_deep_supervision
        empty_weight = torch.ones(config.num_classes + 1)
        empty_weight[-1] = config.criterion_eos_coef
        self.register_buffer("empty_weight", empty_weight)
        self.weight_dict = {"loss_ce": config.weight_dict_loss_ce, "loss_mask": config.weight_dict_loss_mask,
                            "loss_dice": config.weight_dict_loss_dice}
        self.matcher = HungarianMatcher(config.matcher_cost_class, config.matcher_cost_mask, config.matcher_cost_dice,
                                        num_points=config.criterion_num_points, cls_sigmoid=config.cls_sigmoid)
        self.point_sampler: PointSampler = ImportancePoints(config.criterion_num_points)

    # ---- inputs -------------------------------------------------------------------------------
    def _check_targets(self, targets: list[dict], mask_logits: torch.Tensor) -> list[dict]:
        b, _, h4, w4 = mask_logits.shape
        if not isinstance(targets, (list, tuple)) or len(targets) != b:
            raise ValueError(f"targets must be a list of {b} dicts (one per image), got "
                             f"{len(targets) if isinstance(targets, (list, tuple)) else type(targets).__name__}")
        out = []
        for i, t in enumerate(targets):
            labels, masks = t.get("labels"), t.get("masks")
            if not isinstance(labels, torch.Tensor) or not isinstance(masks, torch.Tensor):
                raise ValueError(f"targets[{i}] needs tensors 'labels' [N] and 'masks' [N, H, W]")
            if labels.dim() != 1 or masks.dim() != 3 or masks.shape[0] != labels.shape[0]:
                raise ValueError(f"targets[{i}]: labels must be [N] and masks [N, H, W], got "
                                 f"{tuple(labels.shape)} and {tuple(masks.shape)}")
            h, w = masks.shape[-2:]
            if (h + 3) // 4 != h4 or (w + 3) // 4 != w4:
                raise ValueError(f"targets[{i}]: masks are {h}x{w} but the stride-4 prediction is {h4}x{w4}; "
                                 "masks must be at the input image's resolution")
            if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise ValueError(f"targets[{i}]: labels must be in 0..{self.num_classes - 1}, got "
                                 f"{labels.min().item()}..{labels.max().item()}")
            out.append({"labels": labels.to(mask_logits.device, torch.int64), "masks": masks.to(mask_logits.device)})
        return out

    def _normalisers(self, targets: list[dict], num_queries: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(num_masks, class weight sum): global sums / world size; num_masks at least 1."""
        num_masks = sum(int(t["labels"].numel()) for t in targets)
        matched = sum(min(int(t["labels"].numel()), num_queries) for t in targets)
        weight_sum = matched + (len(targets) * num_queries - matched) * self.eos_coef
        local = torch.tensor([num_masks, weight_sum], dtype=torch.float32, device=device)
        total = distributed.all_reduce_sum(local) / distributed.world_size()
        num_masks_t = total[0].clamp(min=1.0)
        weight_sum_t = torch.where(total[1] > 0, total[1], torch.ones_like(total[1]))
        return num_masks_t, weight_sum_t

    # ---- the losses ---------------------------------------------------------------------------
    def loss_classes(self, class_logits: torch.Tensor, targets: list[dict],
                     indices: list[tuple[torch.Tensor, torch.Tensor]], weight_sum: torch.Tensor) -> torch.Tensor:
        """class_logits [B, Q, C+1] -> weighted CE (or BCE with cls_sigmoid) / weight_sum."""
        logits = class_logits.float()
        b, q, _ = logits.shape
        target_classes = torch.full((b, q), self.num_classes, dtype=torch.int64, device=logits.device)
        for i, (src, tgt) in enumerate(indices):
            target_classes[i, src.to(logits.device)] = targets[i]["labels"][tgt.to(logits.device)]
        weight = self.empty_weight.to(logits.device)
        if not self.cls_sigmoid:
            loss = F.cross_entropy(logits.transpose(1, 2), target_classes, weight=weight, reduction="sum")
            return loss / weight_sum
        onehot = F.one_hot(target_classes, self.num_classes + 1)[..., :-1].to(logits.dtype)
        bce = F.binary_cross_entropy_with_logits(logits[..., :-1], onehot, reduction="none").sum(-1)  # [B, Q]
        return (bce * weight[target_classes]).sum() / weight_sum

    def loss_masks(self, mask_logits: torch.Tensor, targets: list[dict],
                   indices: list[tuple[torch.Tensor, torch.Tensor]], num_masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """mask_logits [B, Q, h, w] -> (BCE, dice) over matched masks on importance-sampled points."""
        pred_size = mask_logits.shape[-2:]
        src = torch.cat([mask_logits[i, s.to(mask_logits.device)] for i, (s, _) in enumerate(indices)])  # [M, h, w]
        if src.shape[0] == 0:  # no GT in this batch: zero losses that still reach the mask branch
            zero = mask_logits.sum() * 0.0
            return zero, zero.clone()
        gt = torch.cat([pad_to_prediction(targets[i]["masks"][t.to(mask_logits.device)], pred_size)
                        for i, (_, t) in enumerate(indices)])  # [M, 4h, 4w]
        src = src.float().unsqueeze(1)
        with torch.no_grad():
            coords = self.point_sampler(src)  # [M, P, 2]
            point_labels = point_sample(gt.unsqueeze(1), coords)[:, 0]
        point_logits = point_sample(src, coords)[:, 0]
        return sigmoid_bce_loss(point_logits, point_labels, num_masks), dice_loss(point_logits, point_labels, num_masks)

    def layer_losses(self, class_logits: torch.Tensor, mask_logits: torch.Tensor, targets: list[dict],
                     num_masks: torch.Tensor, weight_sum: torch.Tensor) -> dict[str, torch.Tensor]:
        """Match one layer's prediction and return its weighted losses (keys without suffix)."""
        indices = self.matcher(class_logits, mask_logits, targets)
        loss_mask, loss_dice = self.loss_masks(mask_logits, targets, indices, num_masks)
        raw = {"loss_ce": self.loss_classes(class_logits, targets, indices, weight_sum),
               "loss_mask": loss_mask, "loss_dice": loss_dice}
        return {k: v * self.weight_dict[k] for k, v in raw.items()}

    def forward(self, raw, targets: list[dict]) -> dict[str, torch.Tensor]:
        """raw: `RawOutput` (class_logits [B, Q, C+1], mask_logits [B, Q, h, w], aux); targets: per image
        {"labels": int64 [N], "masks": bool [N, H, W] at input resolution}."""
        targets = self._check_targets(targets, raw.mask_logits)
        num_masks, weight_sum = self._normalisers(targets, raw.class_logits.shape[1], raw.class_logits.device)
        with torch.autocast(device_type=raw.mask_logits.device.type, enabled=False):
            losses = self.layer_losses(raw.class_logits, raw.mask_logits, targets, num_masks, weight_sum)
            if self.deep_supervision:
                for i, aux in enumerate(raw.aux):
                    aux_losses = self.layer_losses(aux.class_logits, aux.mask_logits, targets, num_masks, weight_sum)
                    losses.update({f"{k}_{i}": v for k, v in aux_losses.items()})
        return losses
