"""Hungarian matcher: assignment vs brute force, cost matrix vs an independent numpy computation."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from fai_mf.matcher import FixedPoints, HungarianMatcher, solve_assignment


# ---- independent numpy helpers (also used by test_losses) ---------------------------------------
def bilinear_np(image: np.ndarray, x: float, y: float) -> float:
    """Value of image [H, W] at normalised (x, y) in [0, 1]: pixel i covers [i/W, (i+1)/W), its centre
    is sampled exactly; neighbours outside the image count as 0 (zero padding)."""
    h, w = image.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = int(np.floor(px)), int(np.floor(py))
    fx, fy = px - x0, py - y0
    total = 0.0
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            yy, xx = y0 + dy, x0 + dx
            if 0 <= yy < h and 0 <= xx < w:
                total += wy * wx * float(image[yy, xx])
    return total


def sample_points_np(image: np.ndarray, coords: np.ndarray) -> np.ndarray:
    return np.array([bilinear_np(image, x, y) for x, y in coords])


def bce_np(logit: np.ndarray, target: np.ndarray) -> np.ndarray:
    p = 1.0 / (1.0 + np.exp(-logit))
    return -(target * np.log(p) + (1 - target) * np.log(1 - p))


def dice_np(logit: np.ndarray, target: np.ndarray) -> float:
    p = 1.0 / (1.0 + np.exp(-logit))
    return 1.0 - (2.0 * (p * target).sum() + 1.0) / (p.sum() + target.sum() + 1.0)


def padded_gt_np(mask: np.ndarray, pred_hw: tuple[int, int]) -> np.ndarray:
    """GT at input size padded with zeros at the bottom/right to 4x the prediction size."""
    out = np.zeros((4 * pred_hw[0], 4 * pred_hw[1]))
    out[: mask.shape[0], : mask.shape[1]] = mask
    return out


def brute_force_min_cost(cost: np.ndarray) -> float:
    q, n = cost.shape
    if q >= n:
        return min(sum(cost[p[j], j] for j in range(n)) for p in itertools.permutations(range(q), n))
    return min(sum(cost[i, p[i]] for i in range(q)) for p in itertools.permutations(range(n), q))


# ---- tests -------------------------------------------------------------------------------------
@pytest.mark.parametrize("q,n", [(1, 1), (3, 1), (3, 3), (4, 2), (5, 3), (5, 5), (2, 4), (3, 0)])
def test_assignment_equals_brute_force(q, n):
    rng = np.random.default_rng(q * 10 + n)
    for _ in range(5):
        cost = torch.from_numpy(rng.normal(size=(q, n)))
        rows, cols = solve_assignment(cost)
        assert len(rows) == len(cols) == min(q, n)
        assert len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)
        assert rows.tolist() == sorted(rows.tolist())
        if min(q, n):
            assert float(cost[rows, cols].sum()) == pytest.approx(brute_force_min_cost(cost.numpy()), abs=1e-9)


def test_assignment_rejects_non_finite_costs():
    with pytest.raises(ValueError, match="NaN or inf"):
        solve_assignment(torch.tensor([[0.0, float("nan")]]))


@pytest.mark.parametrize("cls_sigmoid", [False, True])
def test_cost_matrix_equals_hand_computation(cls_sigmoid):
    g = torch.Generator().manual_seed(1)
    q, c, hw = 3, 2, (2, 3)  # prediction 2x3 at stride 4 of a 7x10 image (GT padded to 8x12)
    class_logits = torch.randn(q, c + 1, generator=g)
    mask_logits = 3 * torch.randn(q, *hw, generator=g)
    labels = torch.tensor([1, 0])
    masks = torch.rand(2, 7, 10, generator=g) > 0.5
    coords = torch.rand(6, 2, generator=g)
    matcher = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=3.0, cls_sigmoid=cls_sigmoid,
                               point_sampler=FixedPoints(coords))
    cost = matcher.cost_matrix(class_logits, mask_logits, labels, masks)

    logits_np = class_logits.double().numpy()
    probs = 1 / (1 + np.exp(-logits_np)) if cls_sigmoid else np.exp(logits_np) / np.exp(logits_np).sum(1, keepdims=True)
    expected = np.zeros((q, 2))
    for i in range(q):
        pred = sample_points_np(mask_logits[i].double().numpy(), coords.double().numpy())
        for j in range(2):
            gt = sample_points_np(padded_gt_np(masks[j].numpy(), hw), coords.double().numpy())
            expected[i, j] = 5.0 * bce_np(pred, gt).mean() - 2.0 * probs[i, labels[j]] + 3.0 * dice_np(pred, gt)
    np.testing.assert_allclose(cost.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_matcher_recovers_a_permutation():
    """Predictions that are the GT masks in another order are matched back to them."""
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(3, 16, 16, dtype=torch.bool)
    masks[0, :8, :8] = masks[1, 8:, 4:12] = masks[2, 2:6, 10:16] = True
    perm = [2, 0, 3]  # query perm[j] predicts target j; query 1 predicts nothing
    mask_logits = torch.full((1, 4, 4, 4), -8.0)
    class_logits = torch.zeros(1, 4, 4)
    labels = torch.tensor([0, 2, 1])
    for j, qi in enumerate(perm):
        mask_logits[0, qi] = masks[j].float().reshape(4, 4, 4, 4).mean((1, 3)) * 16 - 8
        class_logits[0, qi, labels[j]] = 5.0
    matcher = HungarianMatcher(num_points=256, point_sampler=None)
    matcher.point_sampler.generator = g
    (rows, cols), = matcher(class_logits, mask_logits, [{"labels": labels, "masks": masks}])
    assert dict(zip(cols.tolist(), rows.tolist())) == {j: qi for j, qi in enumerate(perm)}


def test_matcher_handles_images_without_targets():
    matcher = HungarianMatcher(num_points=16)
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 8, 8, dtype=torch.bool)}
    one = {"labels": torch.tensor([0]), "masks": torch.ones(1, 8, 8, dtype=torch.bool)}
    out = matcher(torch.randn(2, 3, 3), torch.randn(2, 3, 2, 2), [empty, one])
    assert [len(r) for r, _ in out] == [0, 1]
