"""Losses: values vs an independent numpy computation with fixed points, importance sampling,
the training entry point (finite losses, zero-instance images) and gradient flow."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import fai_mf
import mf_kernels
from conftest import tiny_config
from fai_mf.losses import FixedPoints, ImportancePoints, MaskFormerCriterion
from fai_mf.modeling.transformer_decoder import LayerPrediction
from test_matcher import bce_np, brute_force_min_cost, dice_np, padded_gt_np, sample_points_np


@pytest.fixture(autouse=True)
def _reference_kernels():
    """Training runs the reference ops (fused kernels are inference-only and may have no backward)."""
    with mf_kernels.use("reference"):
        yield


def _hand_losses(class_logits, mask_logits, targets, criterion_coords, matcher_coords, cfg) -> dict[str, float]:
    """Weighted losses of one prediction, from scratch in numpy (brute-force matching)."""
    c = cfg.num_classes
    hw = mask_logits.shape[-2:]
    num_masks = max(1.0, float(sum(len(t["labels"]) for t in targets)))
    ce_sum, weight_sum, bce_sum, dice_sum = 0.0, 0.0, 0.0, 0.0
    for b, t in enumerate(targets):
        logits = class_logits[b].double().numpy()
        q = logits.shape[0]
        gts = [padded_gt_np(m.numpy(), hw) for m in t["masks"]]
        labels = t["labels"].tolist()
        probs = (1 / (1 + np.exp(-logits))) if cfg.cls_sigmoid else np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        # matching cost, then the assignment by brute force over all injective maps target -> query
        cost = np.zeros((q, len(labels)))
        for i in range(q):
            pred = sample_points_np(mask_logits[b, i].double().numpy(), matcher_coords)
            for j, gt in enumerate(gts):
                gt_pts = sample_points_np(gt, matcher_coords)
                cost[i, j] = (cfg.matcher_cost_mask * bce_np(pred, gt_pts).mean()
                              - cfg.matcher_cost_class * probs[i, labels[j]]
                              + cfg.matcher_cost_dice * dice_np(pred, gt_pts))
        best = None
        for perm in itertools.permutations(range(q), len(labels)):
            total = sum(cost[perm[j], j] for j in range(len(labels)))
            if best is None or total < best[0]:
                best = (total, perm)
        assert best is None or best[0] == pytest.approx(brute_force_min_cost(cost))
        query_of = {} if best is None else {j: best[1][j] for j in range(len(labels))}
        target_class = [c] * q
        for j, qi in query_of.items():
            target_class[qi] = labels[j]
        for i in range(q):
            w = 1.0 if target_class[i] < c else cfg.criterion_eos_coef
            if cfg.cls_sigmoid:
                onehot = np.zeros(c)
                if target_class[i] < c:
                    onehot[target_class[i]] = 1
                term = bce_np(logits[i, :c], onehot).sum()
            else:
                term = -(logits[i, target_class[i]] - np.log(np.exp(logits[i]).sum()))
            ce_sum += w * term
            weight_sum += w
        for j, qi in query_of.items():
            pred = sample_points_np(mask_logits[b, qi].double().numpy(), criterion_coords)
            gt_pts = sample_points_np(gts[j], criterion_coords)
            bce_sum += bce_np(pred, gt_pts).mean()
            dice_sum += dice_np(pred, gt_pts)
    return {"loss_ce": cfg.weight_dict_loss_ce * ce_sum / weight_sum,
            "loss_mask": cfg.weight_dict_loss_mask * bce_sum / num_masks,
            "loss_dice": cfg.weight_dict_loss_dice * dice_sum / num_masks}


@pytest.mark.parametrize("cls_sigmoid", [False, True])
def test_losses_equal_hand_computation(cls_sigmoid):
    cfg = tiny_config(num_classes=2, cls_sigmoid=cls_sigmoid, criterion_eos_coef=0.2, weight_dict_loss_ce=2.0,
                      weight_dict_loss_mask=5.0, weight_dict_loss_dice=3.0, matcher_cost_dice=4.0)
    g = torch.Generator().manual_seed(3)
    b, q, hw = 2, 4, (2, 3)  # images 7 x 10 -> stride-4 prediction 2 x 3
    preds = [LayerPrediction(torch.randn(b, q, 3, generator=g), 3 * torch.randn(b, q, *hw, generator=g))
             for _ in range(2)]
    raw = fai_mf.RawOutput(preds[-1].class_logits, preds[-1].mask_logits, aux=preds[:-1])
    targets = [{"labels": torch.tensor([1, 0, 1]), "masks": torch.rand(3, 7, 10, generator=g) > 0.4},
               {"labels": torch.tensor([0]), "masks": torch.rand(1, 7, 10, generator=g) > 0.7}]
    criterion_coords, matcher_coords = torch.rand(9, 2, generator=g), torch.rand(7, 2, generator=g)
    criterion = MaskFormerCriterion(cfg)
    criterion.point_sampler = FixedPoints(criterion_coords)
    criterion.matcher.point_sampler = FixedPoints(matcher_coords)

    losses = criterion(raw, targets)

    assert set(losses) == {"loss_ce", "loss_mask", "loss_dice", "loss_ce_0", "loss_mask_0", "loss_dice_0"}
    for suffix, pred in (("", preds[-1]), ("_0", preds[0])):
        expected = _hand_losses(pred.class_logits, pred.mask_logits, targets, criterion_coords.double().numpy(),
                                matcher_coords.double().numpy(), cfg)
        for key, value in expected.items():
            assert losses[key + suffix].item() == pytest.approx(value, rel=1e-5), key + suffix


def test_importance_sampling_keeps_the_most_uncertain_candidates():
    logits = torch.linspace(-6, 6, 64).reshape(1, 1, 8, 8).repeat(2, 1, 1, 1)
    logits[1] = logits[1].flip(-1)
    sampler = ImportancePoints(num_points=40, oversample=3.0, importance=0.75,
                               generator=torch.Generator().manual_seed(5))
    coords = sampler(logits)
    assert coords.shape == (2, 40, 2) and coords.min() >= 0 and coords.max() <= 1
    candidates = torch.rand(2, 120, 2, generator=torch.Generator().manual_seed(5)).double().numpy()
    for n in range(2):
        uncertainty = -np.abs(sample_points_np(logits[n, 0].double().numpy(), candidates[n]))
        chosen = coords[n, :30].double().numpy()
        threshold = np.sort(uncertainty)[-30]
        chosen_unc = -np.abs(sample_points_np(logits[n, 0].double().numpy(), chosen))
        assert (chosen_unc >= threshold - 1e-5).all()
        # every chosen point is one of the candidates
        assert all(np.abs(candidates[n] - p).sum(1).min() < 1e-6 for p in chosen)


def _images_and_targets(with_empty: bool):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 64, 64, generator=g) * 255
    masks = torch.zeros(2, 64, 64, dtype=torch.bool)
    masks[0, 8:30, 8:40] = masks[1, 35:60, 20:50] = True
    full = {"labels": torch.tensor([0, 2]), "masks": masks}
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 64, 64, dtype=torch.bool)}
    return x, [full, empty if with_empty else full]


@pytest.mark.parametrize("with_empty", [False, True])
def test_training_entry_point_gives_finite_weighted_losses(with_empty):
    torch.manual_seed(0)
    cfg = tiny_config(criterion_num_points=128)
    model = fai_mf.FAIMaskFormer(cfg).train()
    x, targets = _images_and_targets(with_empty)
    out = model(x, targets=targets)
    assert isinstance(out, fai_mf.MaskFormerModelOutput)
    expected = {f"loss_{k}{s}" for k in ("ce", "mask", "dice") for s in ["", "_0", "_1"]}
    assert set(out.loss) == expected
    assert all(torch.isfinite(v) and v.dim() == 0 for v in out.loss.values())
    sum(out.loss.values()).backward()


def test_batch_without_any_instance_still_backpropagates():
    torch.manual_seed(0)
    model = fai_mf.FAIMaskFormer(tiny_config(criterion_num_points=64)).train()
    x, _ = _images_and_targets(True)
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 64, 64, dtype=torch.bool)}
    losses = model(x, targets=[empty, empty]).loss
    assert losses["loss_mask"].item() == 0 and losses["loss_dice"].item() == 0 and losses["loss_ce"].item() > 0
    sum(losses.values()).backward()
    assert model.head.predictor.forward_prediction_heads.mask_classifier.layers[0].weight.grad is not None


def test_deep_supervision_off_gives_three_losses():
    model = fai_mf.FAIMaskFormer(tiny_config(criterion_num_points=64, criterion_deep_supervision=False)).train()
    x, targets = _images_and_targets(False)
    assert set(model(x, targets=targets).loss) == {"loss_ce", "loss_mask", "loss_dice"}


@pytest.mark.parametrize("dec_layers,encoder_layers", [(3, 1), (2, 0)])
def test_gradients_reach_every_trainable_parameter(dec_layers, encoder_layers):
    """All parameters get finite gradients. The one legitimate exception: with fewer than 3 decoder
    layers no layer attends to the stride-8 level, so `input_proj.2` takes no part in the output."""
    torch.manual_seed(0)
    cfg = tiny_config(criterion_num_points=128, transformer_predictor_dec_layers=dec_layers,
                      pixel_decoder_transformer_layers=encoder_layers)
    model = fai_mf.FAIMaskFormer(cfg).train()
    x, targets = _images_and_targets(True)
    sum(model(x, targets=targets).loss.values()).backward()
    no_grad = sorted(n for n, p in model.named_parameters() if p.grad is None)
    expected = [] if dec_layers >= 3 else ["head.predictor.input_proj.2.bias", "head.predictor.input_proj.2.weight"]
    assert no_grad == expected
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name
    # the query embeddings, the class head and the mask branch all learn
    pred = model.head.predictor
    for p in (pred.query_feat.weight, pred.query_embed.weight, pred.forward_prediction_heads.classifier.weight,
              model.pixel_decoder.mask_features.weight if hasattr(model.pixel_decoder, "mask_features") else None):
        if p is not None:
            assert p.grad.abs().sum() > 0


def test_targets_are_validated():
    model = fai_mf.FAIMaskFormer(tiny_config(criterion_num_points=64)).train()
    x, targets = _images_and_targets(False)
    bad_size = [{"labels": t["labels"], "masks": t["masks"][:, :32, :32]} for t in targets]
    with pytest.raises(ValueError, match="input image's resolution"):
        model(x, targets=bad_size)
    bad_label = [{"labels": torch.tensor([0, 3]), "masks": targets[0]["masks"]}] * 2
    with pytest.raises(ValueError, match="labels must be in 0..2"):
        model(x, targets=bad_label)
    with pytest.raises(ValueError, match="list of 2 dicts"):
        model(x, targets=targets[:1])
