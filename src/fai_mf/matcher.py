"""Hungarian matching of predicted queries to ground-truth masks (SPEC §6).

Per image, the cost of assigning query q to target t is

    cost_mask * BCE(q, t) + cost_class * (-prob of t's class under q) + cost_dice * dice(q, t)

with BCE and dice measured on one shared set of `num_points` uniform random points (the same
points for every query and target of the image), in fp32 and without gradients. The assignment
minimising the total cost is solved with scipy's `linear_sum_assignment` (imported when the first
assignment is solved: scipy is a training dependency, and inference builds the criterion without it).

Point coordinates follow `losses.point_sample`: normalised (x, y) in [0, 1] over the extent of the
stride-4 prediction; ground-truth masks are zero-padded to that extent first (`pad_to_prediction`).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

# mask logits [N, 1, h, w] -> point coordinates [N, P, 2], (x, y) in [0, 1]
PointSampler = Callable[[torch.Tensor], torch.Tensor]


def point_sample(maps: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear values of `maps` [N, C, H, W] at `coords` [N, P, 2] ((x, y) in [0, 1]) -> [N, C, P].

    Coordinate 0 is the outer edge of the first pixel and 1 that of the last (align_corners=False);
    outside the pixel centres the border pixels are blended with zeros (grid_sample's zero padding).
    """
    grid = (2.0 * coords - 1.0).unsqueeze(2)  # [N, P, 1, 2] in grid_sample's [-1, 1]
    return F.grid_sample(maps, grid.to(maps.dtype), mode="bilinear", padding_mode="zeros",
                         align_corners=False).squeeze(3)


def pad_to_prediction(masks: torch.Tensor, pred_size: tuple[int, int], stride: int = 4) -> torch.Tensor:
    """GT masks [N, H, W] zero-padded to the area the prediction covers (stride * pred_size) -> float.

    The stride-4 prediction of an H x W image has ceil(H/4) x ceil(W/4) cells, so it covers
    4*ceil(H/4) x 4*ceil(W/4) input pixels; padding the GT to that extent (as Mask2Former pads
    images and masks together) makes normalised coordinates mean the same place in both.
    """
    h, w = masks.shape[-2:]
    ph, pw = stride * pred_size[0] - h, stride * pred_size[1] - w
    if ph < 0 or pw < 0:
        raise ValueError(f"GT masks {h}x{w} are larger than the prediction's extent "
                         f"{stride * pred_size[0]}x{stride * pred_size[1]} (masks must be at input resolution)")
    masks = masks.float()
    return F.pad(masks, (0, pw, 0, ph)) if ph or pw else masks


class UniformPoints:
    """Uniform random points, `num_points` per mask: [N, P, 2]. `generator` fixes the draw."""

    def __init__(self, num_points: int, generator: torch.Generator | None = None):
        self.num_points = num_points
        self.generator = generator

    def __call__(self, mask_logits: torch.Tensor) -> torch.Tensor:
        n = mask_logits.shape[0]
        coords = torch.rand(n, self.num_points, 2, generator=self.generator,
                            device=self.generator.device if self.generator is not None else mask_logits.device)
        return coords.to(mask_logits.device)


class FixedPoints:
    """The same given points [P, 2] for every mask (tests, deterministic runs): [N, P, 2]."""

    def __init__(self, coords: torch.Tensor):
        if coords.dim() != 2 or coords.shape[1] != 2:
            raise ValueError(f"FixedPoints takes coords [P, 2], got {tuple(coords.shape)}")
        self.coords = coords.float()

    def __call__(self, mask_logits: torch.Tensor) -> torch.Tensor:
        return self.coords.to(mask_logits.device).unsqueeze(0).expand(mask_logits.shape[0], -1, -1)


def pairwise_sigmoid_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean BCE over points of every (prediction, target) pair: logits [Q, P], targets [N, P] -> [Q, N]."""
    p = logits.shape[1]
    pos = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")
    neg = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    return (pos @ targets.T + neg @ (1.0 - targets).T) / p


def pairwise_dice(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1 - (2|p t| + 1) / (|p| + |t| + 1) for every pair: logits [Q, P], targets [N, P] -> [Q, N]."""
    probs = logits.sigmoid()
    numerator = 2.0 * probs @ targets.T
    denominator = probs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1.0 - (numerator + 1.0) / (denominator + 1.0)


def solve_assignment(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimum-total-cost assignment of a [Q, N] cost matrix -> (query indices, target indices).

    min(Q, N) pairs, sorted by query index; int64 CPU tensors.
    """
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError as exc:
        raise ImportError("Hungarian matching (training) needs scipy: pip install scipy") from exc
    cost_np = cost.detach().cpu().double().numpy()
    if not np.isfinite(cost_np).all():
        raise ValueError("matching cost has NaN or inf entries (non-finite model outputs?)")
    rows, cols = linear_sum_assignment(cost_np)
    return torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)


class HungarianMatcher:
    """Matches queries to targets per image. Not an nn.Module: it holds no parameters or buffers.

    `point_sampler` is called once per image with a [1, 1, h, w] tensor and must return [1, P, 2];
    the default draws `num_points` uniform random points.
    """

    def __init__(self, cost_class: float = 2.0, cost_mask: float = 5.0, cost_dice: float = 5.0,
                 num_points: int = 12544, cls_sigmoid: bool = False, point_sampler: PointSampler | None = None):
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("all matcher costs are 0")
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.cls_sigmoid = cls_sigmoid
        self.point_sampler = point_sampler if point_sampler is not None else UniformPoints(num_points)

    def class_probs(self, class_logits: torch.Tensor) -> torch.Tensor:
        """[Q, C+1] logits -> [Q, C+1] probabilities (softmax; sigmoid when cls_sigmoid)."""
        return class_logits.sigmoid() if self.cls_sigmoid else class_logits.softmax(-1)

    @torch.no_grad()
    def cost_matrix(self, class_logits: torch.Tensor, mask_logits: torch.Tensor, labels: torch.Tensor,
                    masks: torch.Tensor, coords: torch.Tensor | None = None) -> torch.Tensor:
        """Cost [Q, N] for one image: class_logits [Q, C+1], mask_logits [Q, h, w], labels [N],
        masks [N, H, W] at input resolution; `coords` [P, 2] overrides the point sampler."""
        with torch.autocast(device_type=mask_logits.device.type, enabled=False):
            return self._cost_matrix_fp32(class_logits.float(), mask_logits.float(), labels, masks, coords)

    def _cost_matrix_fp32(self, class_logits: torch.Tensor, mask_logits: torch.Tensor, labels: torch.Tensor,
                          masks: torch.Tensor, coords: torch.Tensor | None) -> torch.Tensor:
        if coords is None:
            coords = self.point_sampler(mask_logits[:1, None])[0]
        gt = pad_to_prediction(masks, mask_logits.shape[-2:]).to(mask_logits.device)
        n, q = gt.shape[0], mask_logits.shape[0]
        gt_points = point_sample(gt[:, None], coords.expand(n, -1, -1))[:, 0]  # [N, P]
        pred_points = point_sample(mask_logits[:, None], coords.expand(q, -1, -1))[:, 0]  # [Q, P]
        cost_class = -self.class_probs(class_logits)[:, labels]  # [Q, N]
        return (self.cost_mask * pairwise_sigmoid_bce(pred_points, gt_points)
                + self.cost_class * cost_class
                + self.cost_dice * pairwise_dice(pred_points, gt_points))

    @torch.no_grad()
    def __call__(self, class_logits: torch.Tensor, mask_logits: torch.Tensor,
                 targets: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """class_logits [B, Q, C+1], mask_logits [B, Q, h, w], one target dict per image ->
        per image (query indices, target indices), each int64 [min(Q, N)]."""
        if len(targets) != class_logits.shape[0]:
            raise ValueError(f"got {len(targets)} target dicts for a batch of {class_logits.shape[0]} images")
        indices = []
        for b, target in enumerate(targets):
            labels = target["labels"]
            if labels.numel() == 0:
                empty = torch.empty(0, dtype=torch.int64)
                indices.append((empty, empty))
                continue
            cost = self.cost_matrix(class_logits[b], mask_logits[b], labels.to(class_logits.device),
                                    target["masks"])
            indices.append(solve_assignment(cost))
        return indices
