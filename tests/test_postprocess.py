"""Post-processing (SPEC §3) on hand-made probabilities and logits, with hand-checked expected results.

Values are powers of two (0.25, 0.5, 0.75, ...) so float32 holds them exactly and every comparison
against a threshold is decided by the rule under test, not by round-off. Hand-made full-size
probabilities go through the op's reference stats (`stats_of_probs`) and fai_mf's selection (`keep`):
the same code `select_queries` runs on the model's logits.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import fai_mf
import mf_kernels
from fai_mf.postprocess import (PostprocessOptions, candidates_of, instance_inference, keep, select_queries,
                                semantic_inference)
from mf_kernels.postprocess.reference import boxes_of_masks, pixel_owners, stats_of_probs, upsample_probs


def opts(threshold=0.0, mask_threshold=0.5, predict_all_pixels=False, use_mask_score=False) -> PostprocessOptions:
    return PostprocessOptions(threshold, mask_threshold, predict_all_pixels, use_mask_score)


@dataclass
class Selected:
    indices: torch.Tensor
    classes: torch.Tensor
    scores: torch.Tensor
    boxes: torch.Tensor
    areas: torch.Tensor
    masks: torch.Tensor  # bool [K, H, W], rebuilt from the crops and boxes

    def __len__(self) -> int:
        return int(self.indices.numel())


def full_masks(stats, rows: list[int]) -> torch.Tensor:
    """bool [K, H, W] of the stats rows `rows`, from their crops and boxes."""
    height, width = stats.image_size
    masks = torch.zeros(len(rows), height, width, dtype=torch.bool)
    for i, k in enumerate(rows):
        x1, y1, x2, y2 = stats.boxes[k].tolist()
        masks[i, y1:y2 + 1, x1:x2 + 1] = stats.crops[k]
    return masks


def postprocess_probs(probs: torch.Tensor, class_probs: torch.Tensor, options: PostprocessOptions) -> Selected:
    """SPEC §3 from full-size probabilities [Q, H, W]: the reference stats of the candidates, then `keep`."""
    scores, classes, candidates = candidates_of(class_probs, options.threshold)
    stats = stats_of_probs(probs, options.mask_threshold, scores=scores if options.predict_all_pixels else None,
                           queries=candidates, crops=True)
    kept = keep(stats, candidates, scores, classes, options, mask_format=None)
    rows = [int((candidates == q).nonzero()) for q in kept.indices.tolist()]
    return Selected(kept.indices, kept.classes, kept.scores, kept.boxes, kept.areas, full_masks(stats, rows))


def probs_of(*maps: list[list[float]]) -> torch.Tensor:
    """[Q, H, W] from Q nested lists."""
    return torch.tensor(maps, dtype=torch.float32)


def test_mask_threshold_is_inclusive():
    # q0 has two pixels exactly at 0.5 (kept: >=), q1 has two just below (dropped: empty)
    probs = probs_of([[0.5, 0.5, 0.25]], [[0.4999, 0.4999, 0.25]])
    out = postprocess_probs(probs, torch.tensor([[0.75, 0.25], [0.75, 0.25]]), opts())
    assert out.indices.tolist() == [0]
    assert out.masks[0].tolist() == [[True, True, False]]
    assert out.areas.tolist() == [2]


def test_score_threshold_is_strict():
    probs = probs_of([[1.0, 1.0]], [[1.0, 1.0]], [[1.0, 1.0]])
    class_probs = torch.tensor([[0.5, 0.25], [0.25, 0.75], [0.5, 0.5]])  # best scores 0.5, 0.75, 0.5
    out = postprocess_probs(probs, class_probs, opts(threshold=0.5))
    assert out.indices.tolist() == [1]  # 0.5 is not > 0.5
    assert out.classes.tolist() == [1] and out.scores.tolist() == [0.75]
    assert postprocess_probs(probs, class_probs, opts(threshold=0.25)).indices.tolist() == [0, 1, 2]


def test_single_pixel_queries_are_dropped_and_query_order_kept():
    probs = probs_of([[0, 0, 0], [0, 1, 0]],  # one pixel: dropped
                     [[1, 1, 0], [0, 0, 0]],  # two pixels: kept
                     [[0, 0, 0], [0, 0, 0]],  # empty: dropped
                     [[0, 0, 1], [0, 0, 1]])  # kept
    class_probs = torch.tensor([[0.25, 0.75], [0.75, 0.25], [0.5, 0.5], [0.25, 0.5]])
    out = postprocess_probs(probs, class_probs, opts())
    assert out.indices.tolist() == [1, 3]
    assert out.classes.tolist() == [0, 1]
    assert out.scores.tolist() == [0.75, 0.5]
    assert out.boxes.tolist() == [[0, 0, 1, 0], [2, 0, 2, 1]]  # [x1, y1, x2, y2], max inclusive


def test_use_mask_score_multiplies_by_mean_prob_inside_mask():
    # mask pixels 1.0 and 0.5 (the 0.25 is outside): mean 0.75; class prob 0.5 -> score 0.375
    probs = probs_of([[1.0, 0.5, 0.25]])
    class_probs = torch.tensor([[0.5, 0.25]])
    with_score = postprocess_probs(probs, class_probs, opts(threshold=0.25, use_mask_score=True))
    assert with_score.scores.tolist() == [0.375]
    assert postprocess_probs(probs, class_probs, opts(threshold=0.25)).scores.tolist() == [0.5]
    # the threshold applies to the final score: 0.375 is not > 0.375, nor > 0.4
    assert len(postprocess_probs(probs, class_probs, opts(threshold=0.375, use_mask_score=True))) == 0
    assert len(postprocess_probs(probs, class_probs, opts(threshold=0.4, use_mask_score=True))) == 0
    assert len(postprocess_probs(probs, class_probs, opts(threshold=0.4))) == 1


def test_predict_all_pixels_ownership():
    # scores: q0 0.5, q1 1.0; weighted q0 = 0.5 * p0, q1 = 1.0 * p1
    probs = probs_of([[1.0, 1.0, 0.5, 0.25]],   # weighted 0.5, 0.5, 0.25, 0.125
                     [[0.25, 0.75, 0.5, 0.5]])  # weighted 0.25, 0.75, 0.5, 0.5
    class_probs = torch.tensor([[0.5, 0.25], [0.0, 1.0]])
    assert pixel_owners(probs, class_probs.max(-1).values).tolist() == [[0, 1, 1, 1]]
    out = postprocess_probs(probs, class_probs, opts(predict_all_pixels=True))
    # q0 owns one pixel only (dropped), although its probabilities pass mask_threshold on two
    assert out.indices.tolist() == [1]
    assert out.masks[0].tolist() == [[False, True, True, True]]
    # without predict_all_pixels both queries keep their own >= 0.5 pixels
    plain = postprocess_probs(probs, class_probs, opts())
    assert plain.indices.tolist() == [0, 1] and plain.areas.tolist() == [3, 3]


def test_predict_all_pixels_ties_go_to_the_lowest_query():
    # weighted: q0 = 0.5*0.5 = 0.25, q1 = 1.0*0.25 = 0.25, q2 = 0.25*1.0 = 0.25 (three-way tie);
    # second pixel: q0 = 0, q1 = q2 = 0.25 (tie between q1 and q2)
    probs = probs_of([[0.5, 0.0]], [[0.25, 0.25]], [[1.0, 1.0]])
    scores = torch.tensor([0.5, 1.0, 0.25])
    assert pixel_owners(probs, scores).tolist() == [[0, 1]]
    # many queries and pixels (vectorised reductions): q5 and q20 tie above everyone else
    probs = torch.full((37, 33, 65), 0.25)
    probs[5], probs[20] = 0.75, 0.75
    assert torch.equal(pixel_owners(probs, torch.ones(37)), torch.full((33, 65), 5))
    assert torch.equal(pixel_owners(torch.full((37, 33, 65), 0.5), torch.ones(37)), torch.zeros(33, 65, dtype=torch.long))


def test_semantic_vs_instance_configs_on_the_same_outputs():
    """A semantic model (predict_all_pixels) partitions the image; an instance model keeps overlaps."""
    probs = probs_of([[1.0, 1.0, 0.75, 0.0]], [[0.0, 0.75, 1.0, 1.0]])
    class_probs = torch.tensor([[0.75, 0.25], [0.25, 0.5]])
    semantic = postprocess_probs(probs, class_probs, opts(predict_all_pixels=True))
    instance = postprocess_probs(probs, class_probs, opts())
    # owners: weighted q0 = 0.75, 0.75, 0.5625, 0; q1 = 0, 0.375, 0.5, 0.5 -> [0, 0, 0, 1]; q1 has one pixel
    assert semantic.indices.tolist() == [0] and semantic.masks[0].tolist() == [[True, True, True, False]]
    assert instance.indices.tolist() == [0, 1]
    assert instance.masks.tolist() == [[[True, True, True, False]], [[False, True, True, True]]]
    # the metrics path: label map argmax_c sum_q class_probs[q, c] * probs[q]
    # pixel 1: c0 = 0.75 + 0.1875 = 0.9375, c1 = 0.25 + 0.375 = 0.625; pixel 3: c0 = 0.25, c1 = 0.5
    assert semantic_inference(probs, class_probs).tolist() == [[0, 0, 0, 1]]


def test_semantic_inference_by_hand():
    probs = probs_of([[1.0, 0.5, 0.0]], [[0.0, 0.5, 1.0]])
    class_probs = torch.tensor([[0.75, 0.25, 0.0], [0.0, 0.25, 0.5]])
    # pixel 1: c0 = 0.375, c1 = 0.25, c2 = 0.25 -> 0; pixel 2: c2 = 0.5 wins over c1 = 0.25
    labels = semantic_inference(probs, class_probs)
    assert labels.dtype == torch.int64 and labels.tolist() == [[0, 0, 2]]


def test_instance_inference_by_hand():
    probs = probs_of([[1.0, 0.5, 0.75], [0.0, 0.0, 0.0]],  # > 0.5 strictly: pixels (0,0), (0,2); mean 0.875
                     [[0.25, 0.25, 0.25], [0.25, 0.25, 0.25]])  # empty mask -> score 0
    class_probs = torch.tensor([[0.5, 0.25], [0.125, 0.75]])
    out = instance_inference(probs, class_probs, top_k=3, mask_threshold=0.5)
    # pairs by class prob: (q1, c1) 0.75, (q0, c0) 0.5, (q0, c1) 0.25
    assert out["labels"].tolist() == [1, 0, 1]
    assert out["scores"].tolist() == [0.0, 0.5 * 0.875, 0.25 * 0.875]
    assert out["masks"][1].tolist() == [[True, False, True], [False, False, False]]
    assert out["boxes"].tolist() == [[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0], [0.0, 0.0, 2.0, 0.0]]
    assert out["boxes"].dtype == torch.float32 and out["masks"].dtype == torch.bool
    assert len(instance_inference(probs, class_probs, top_k=100, mask_threshold=0.5)["scores"]) == 4  # Q*C


def test_boxes_of_masks_inclusive_and_empty():
    masks = torch.zeros(3, 4, 5, dtype=torch.bool)
    masks[0, 1:3, 2] = True   # one column wide
    masks[1, 3, :] = True     # one row tall
    boxes = boxes_of_masks(masks)
    assert boxes.dtype == torch.int32 and boxes.tolist() == [[2, 1, 2, 2], [0, 3, 4, 3], [-1, -1, -1, -1]]


def test_reference_upsamples_like_the_model():
    """From stride-4 logits: sigmoid, bilinear align_corners=False, then >= mask_threshold."""
    torch.manual_seed(0)
    logits = torch.randn(4, 5, 6) * 3
    expected = F.interpolate(logits.sigmoid()[None], size=(19, 23), mode="bilinear", align_corners=False)[0]
    assert torch.equal(upsample_probs(logits, (19, 23)), expected)
    class_probs = torch.tensor([[0.75, 0.25]] * 4)
    with mf_kernels.use("reference"):
        out = select_queries(logits, class_probs, (19, 23), opts(threshold=0.0, mask_threshold=0.5), None)
    keep_rows = (expected >= 0.5).sum((1, 2)) > 1
    assert out.indices.tolist() == keep_rows.nonzero().flatten().tolist()
    assert torch.equal(out.boxes, boxes_of_masks(expected[keep_rows] >= 0.5))
    assert out.masks is None


def test_reference_with_constant_logits():
    # logit 1 everywhere -> prob 0.73 everywhere -> the whole 7x9 image; logit -1 -> 0.27 -> empty.
    # (Not logit 0: bilinear weights do not sum to exactly 1 in float32, so 0.5 can become 0.49999997.)
    logits = torch.stack([torch.ones(2, 3), torch.full((2, 3), -1.0)])
    with mf_kernels.use("reference"):
        out = select_queries(logits, torch.tensor([[0.75, 0.25], [0.75, 0.25]]), (7, 9), opts())
    assert out.indices.tolist() == [0] and out.boxes.tolist() == [[0, 0, 8, 6]] and out.areas.tolist() == [63]
    with pytest.raises(ValueError, match="same Q"):
        select_queries(logits, torch.ones(3, 2), (7, 9), opts())


def test_options_none_takes_config_and_false_or_zero_override():
    config = fai_mf.MaskFormerConfig(num_classes=2, threshold=0.7, mask_threshold=0.4, predict_all_pixels=True,
                                     use_mask_score=True)
    assert PostprocessOptions.from_config(config) == PostprocessOptions(0.7, 0.4, True, True)
    assert PostprocessOptions.from_config(config, threshold=0, mask_threshold=0, predict_all_pixels=False,
                                          use_mask_score=False) == PostprocessOptions(0.0, 0.0, False, False)
