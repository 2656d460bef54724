"""Datasets (COCO JSON, semantic folders, synthetic shapes) and the evaluation metrics."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import fai_mf.evaluate as evaluate
from conftest import requires
from fai_mf.data import (CocoInstanceDataset, SemanticSegDataset, collate, decode_segmentation, load_dataset,
                         make_synthetic_dataset)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("synth"), n=6, n_val=3, size=48, seed=2)


@requires("pycocotools")
def test_synthetic_dataset_is_written_in_both_formats(synth):
    for split, n in (("train", 6), ("val", 3)):
        root = synth[split]
        assert len(list((root / "images").glob("*.png"))) == n == len(list((root / "labels").glob("*.png")))
        assert json.loads((root / "classes.json").read_text()) == ["circle", "rectangle", "triangle"]
    inst, sem = load_dataset(synth["train"] / "instances.json"), load_dataset(synth["train"])
    assert isinstance(inst, CocoInstanceDataset) and isinstance(sem, SemanticSegDataset)
    assert inst.classes == sem.classes == ["circle", "rectangle", "triangle"] and inst.category_ids == [1, 2, 3]
    total = 0
    for i in range(len(inst)):
        a, b = inst[i], sem[i]
        assert a["image"].shape == (3, 48, 48) and a["image"].dtype == torch.float32
        assert torch.equal(a["image"], b["image"])
        total += len(a["labels"])
        # the semantic map is the union of the instance masks of each class; the rest is ignore
        for c in range(3):
            union = a["masks"][a["labels"] == c].any(0)
            assert torch.equal(union, b["semantic"] == c)
        background = ~a["masks"].any(0) if len(a["labels"]) else torch.ones(48, 48, dtype=torch.bool)
        assert torch.equal(background, b["semantic"] == 255)
        assert sorted(b["labels"].tolist()) == sorted(set(a["labels"].tolist()))
        assert (a["masks"].sum(0) <= 1).all()  # occluded parts belong to the shape on top
    assert total >= len(inst)


def _write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@requires("pycocotools")
def test_coco_polygon_and_rle_segmentations(tmp_path):
    from pycocotools import mask as mask_utils

    _write_png(tmp_path / "imgs" / "a.png", np.zeros((10, 12, 3), np.uint8))
    _write_png(tmp_path / "imgs" / "b.png", np.zeros((10, 12, 3), np.uint8))
    square = np.zeros((10, 12), np.uint8)
    square[2:5, 3:9] = 1
    compressed = mask_utils.encode(np.asfortranarray(square))
    column_major = square.flatten(order="F")
    runs, value, count = [], 0, 0
    for v in column_major:
        if v != value:
            runs.append(count)
            value, count = v, 0
        count += 1
    runs.append(count)
    coco = {
        "images": [{"id": 7, "file_name": "a.png", "height": 10, "width": 12},
                   {"id": 9, "file_name": "b.png", "height": 10, "width": 12}],
        "categories": [{"id": 9, "name": "nine"}, {"id": 5, "name": "five"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 9, "iscrowd": 0, "segmentation": [[1, 1, 6, 1, 6, 4, 1, 4]]},
            {"id": 2, "image_id": 7, "category_id": 5, "iscrowd": 0,
             "segmentation": {"size": [10, 12], "counts": compressed["counts"].decode()}},
            {"id": 3, "image_id": 7, "category_id": 5, "iscrowd": 0, "segmentation": {"size": [10, 12], "counts": runs}},
            {"id": 4, "image_id": 7, "category_id": 9, "iscrowd": 1, "segmentation": {"size": [10, 12], "counts": runs}},
        ],
    }
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    ds = CocoInstanceDataset(tmp_path / "ann.json", image_root=tmp_path / "imgs")
    assert ds.classes == ["five", "nine"] and ds.category_ids == [5, 9]
    item = ds[0]
    assert item["image_id"] == 7 and item["labels"].tolist() == [1, 0, 0]  # crowd skipped
    expected_polygon = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([[1, 1, 6, 1, 6, 4, 1, 4]], 10, 12)))
    assert np.array_equal(item["masks"][0].numpy(), expected_polygon.astype(bool))
    assert np.array_equal(item["masks"][1].numpy(), square.astype(bool))
    assert np.array_equal(item["masks"][2].numpy(), square.astype(bool))
    empty = ds[1]  # an image with no annotation has zero GT masks
    assert empty["labels"].shape == (0,) and empty["masks"].shape == (0, 10, 12)
    resized = CocoInstanceDataset(tmp_path / "ann.json", image_root=tmp_path / "imgs", size=(20, 24), flip=True)[0]
    assert resized["image"].shape == (3, 20, 24) and resized["masks"].shape == (3, 20, 24)
    with pytest.raises(ValueError, match="unsupported"):
        decode_segmentation(5, 10, 12)


def test_semantic_folder_ignores_255_and_checks_class_ids(tmp_path):
    _write_png(tmp_path / "images" / "x.jpg", np.full((6, 8, 3), 100, np.uint8))
    label = np.full((6, 8), 255, np.uint8)
    label[:3, :4] = 0
    label[3:, 5:] = 2
    _write_png(tmp_path / "labels" / "x.png", label)
    ds = SemanticSegDataset(tmp_path, num_classes=3)
    item = ds[0]
    assert item["labels"].tolist() == [0, 2]
    assert torch.equal(item["masks"][1], torch.from_numpy(label == 2))
    assert item["semantic"].dtype == torch.int64 and int(item["semantic"][0, 7]) == 255
    assert SemanticSegDataset(tmp_path).num_classes == 3  # scanned from the labels
    with pytest.raises(ValueError, match=">= num_classes"):
        SemanticSegDataset(tmp_path, num_classes=2)[0]
    images, targets = collate([item, item])
    assert images.shape == (2, 3, 6, 8) and len(targets) == 2


def test_semantic_scores_on_a_known_confusion_matrix():
    confusion = np.array([[8, 2, 0], [1, 3, 0], [0, 0, 0]])  # class 2 absent everywhere
    scores = evaluate.semantic_scores(confusion, ["a", "b", "c"])
    iou_a, iou_b = 8 / (10 + 9 - 8), 3 / (4 + 5 - 3)
    assert scores["mIoU"] == pytest.approx(100 * (iou_a + iou_b) / 2)
    assert scores["mAcc"] == pytest.approx(100 * (8 / 10 + 3 / 4) / 2)
    assert scores["IoU"]["c"] is None
    pred = torch.tensor([[0, 1], [1, 1]])
    label = torch.tensor([[0, 255], [0, 1]])
    assert evaluate.confusion_matrix(pred, label, 2).tolist() == [[1, 1], [0, 1]]


class _PerfectModel:
    """Stands in for a FAIMFModel: `batch_query_probs` is patched to return the ground truth (the
    reference metrics path, which goes through `batch_query_probs`)."""

    kernels = "reference"

    class config:
        num_classes, top_k, mask_threshold = 3, 100, 0.5


def _ground_truth_queries(sample, num_queries=6, num_classes=3):
    """mask_probs [Q, H, W] and class_probs [Q, C] that reproduce an item's ground truth exactly."""
    h, w = sample["image"].shape[-2:]
    probs = torch.zeros(num_queries, h, w)
    classes = torch.zeros(num_queries, num_classes)
    for k, (label, mask) in enumerate(zip(sample["labels"], sample["masks"])):
        probs[k] = mask.float()
        classes[k, label] = 0.9
    return probs, classes


@requires("pycocotools")
def test_perfect_predictions_score_100(synth, monkeypatch):
    inst = load_dataset(synth["val"] / "instances.json")
    sem = load_dataset(synth["val"])

    def fake_query_probs(model, image):
        for ds in (inst, sem):
            for i in range(len(ds)):
                s = ds[i]
                if torch.equal(s["image"], image):
                    return _ground_truth_queries(inst[i])
        raise AssertionError("unknown image")

    def fake_batch_query_probs(model, images, size=None):
        return [fake_query_probs(model, image) for image in images]

    monkeypatch.setattr(evaluate, "batch_query_probs", fake_batch_query_probs)
    metrics = evaluate.evaluate_instances(_PerfectModel(), inst)
    assert metrics["AP"] == pytest.approx(100.0) and metrics["AP50"] == pytest.approx(100.0)
    sem_metrics = evaluate.evaluate_semantic(_PerfectModel(), sem)
    assert sem_metrics["mIoU"] == pytest.approx(100.0) and sem_metrics["mAcc"] == pytest.approx(100.0)
