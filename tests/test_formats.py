"""COCO RLE (byte-identical to pycocotools, the oracle), PNG crops, decode_mask, detections JSON."""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

import fai_mf
from fai_mf.formats import (
    FocoosDet, FocoosDetections, compress_rle_counts, counts_to_mask, decode_mask, decode_rle,
    decompress_rle_counts, encode_mask, encode_rle, rle_area, rle_bbox, rle_counts,
)

from conftest import requires

try:  # the oracle of the tests marked requires("pycocotools"); the others run without it
    from pycocotools import mask as coco_mask
except ImportError:
    coco_mask = None


def _coco(mask: np.ndarray) -> dict:
    return coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))


def _adversarial_masks() -> dict[str, np.ndarray]:
    """Edge cases named in the issue, plus long runs (multi-group values) and negative deltas."""
    masks: dict[str, np.ndarray] = {}
    for h, w in [(1, 1), (1, 7), (9, 1), (1, 300), (300, 1), (5, 8), (375, 500)]:
        masks[f"empty {h}x{w}"] = np.zeros((h, w), bool)
        masks[f"full {h}x{w}"] = np.ones((h, w), bool)
        checker = (np.indices((h, w)).sum(0) % 2).astype(bool)
        masks[f"checker {h}x{w}"] = checker
        masks[f"checker-inverse {h}x{w}"] = ~checker
    for y, x in [(0, 0), (374, 499), (0, 499), (374, 0), (200, 321)]:
        m = np.zeros((375, 500), bool)
        m[y, x] = True
        masks[f"pixel {y},{x}"] = m
    for k in [0, 1, 187, 374]:
        m = np.zeros((375, 500), bool)
        m[k, :] = True
        masks[f"row {k}"] = m
    for k in [0, 1, 250, 499]:
        m = np.zeros((375, 500), bool)
        m[:, k] = True
        masks[f"column {k}"] = m
    m = np.zeros((375, 500), bool)
    m[100:300, 50:60] = True
    m[10:12, 400:480] = True  # short runs after long ones: negative deltas
    masks["blobs"] = m
    big = np.zeros((700, 900), bool)
    big[-1, -1] = True  # a leading run of 629,999 zeros: five 5-bit groups
    masks["long-run"] = big
    return masks


@requires("pycocotools")
@pytest.mark.parametrize("name", sorted(_adversarial_masks()))
def test_rle_matches_pycocotools_on_adversarial_masks(name):
    mask = _adversarial_masks()[name]
    ours, theirs = encode_rle(mask), _coco(mask)
    assert ours["size"] == list(theirs["size"])
    assert ours["counts"] == theirs["counts"].decode("ascii")
    assert np.array_equal(coco_mask.decode(theirs).astype(bool), mask)
    assert np.array_equal(decode_rle(ours), mask)
    assert rle_area(rle_counts(mask)) == int(coco_mask.area(theirs)) == int(mask.sum())


@requires("pycocotools")
def test_rle_matches_pycocotools_on_random_masks():
    rng = np.random.default_rng(0)
    for _ in range(200):
        h, w = (int(v) for v in rng.integers(1, 70, size=2))
        density = rng.choice([0.01, 0.3, 0.5, 0.9, 0.995])
        mask = rng.random((h, w)) < density
        if rng.random() < 0.5:  # also smooth blobs: long runs
            mask = np.cumsum(mask, axis=int(rng.integers(0, 2))) % 3 == 0
        ours, theirs = encode_rle(mask), _coco(mask)
        assert ours["counts"] == theirs["counts"].decode("ascii"), (h, w)
        ours_from_theirs = decode_rle({"size": list(theirs["size"]), "counts": theirs["counts"]})
        assert np.array_equal(ours_from_theirs, mask)


@requires("pycocotools")
def test_rle_bbox_agrees_with_pycocotools_tobbox():
    rng = np.random.default_rng(1)
    masks = list(_adversarial_masks().values()) + [rng.random((31, 17)) < p for p in (0.02, 0.1, 0.5)]
    for mask in masks:
        theirs = _coco(mask)
        box = rle_bbox(rle_counts(mask), mask.shape)
        if not mask.any():
            assert box is None
            continue
        x, y, w, h = coco_mask.toBbox(theirs)  # exclusive width/height
        assert box == [int(x), int(y), int(x + w - 1), int(y + h - 1)]


def test_rle_counts_by_hand():
    # column-major: column 0 reads (0, 1), column 1 reads (1, 1) -> one 0 then three 1s
    assert rle_counts(np.array([[0, 1], [1, 1]], bool)).tolist() == [1, 3]
    assert rle_counts(np.ones((2, 2), bool)).tolist() == [0, 4]
    assert rle_counts(np.zeros((2, 3), bool)).tolist() == [6]
    assert rle_counts(np.array([[1, 0, 1]], np.uint8)).tolist() == [0, 1, 1, 1]


@requires("pycocotools")
def test_compress_by_hand():
    # 5 -> '5'; 40 = 8 + 1*32 -> groups (8 | 0x20, 1) -> chr(88) chr(49)
    assert compress_rle_counts([5, 40]) == "5X1"
    # deltas from the 4th count: [1, 2, 3, 2 - 2 = 0] -> "1230"
    assert compress_rle_counts([1, 2, 3, 2]) == "1230"
    # [1, 20, 1, 3]: 20 needs two groups (20 | 0x20, 0) -> "d0" (one group holds -16..15);
    # 3 - 20 = -17 -> groups (-17 & 31 = 15 | 0x20, -1 & 31 = 31) -> "_O"
    assert compress_rle_counts([1, 20, 1, 3]) == "1d01_O"
    for counts in ([5, 40], [1, 2, 3, 2], [1, 20, 1, 3]):
        text = compress_rle_counts(counts)
        assert decompress_rle_counts(text).tolist() == counts
        column = coco_mask.decode({"size": [sum(counts), 1], "counts": text.encode()})  # the oracle agrees
        assert rle_counts(column).tolist() == counts


@requires("pycocotools")
def test_encode_rle_accepts_tensors_and_uint8():
    mask = np.zeros((5, 6), np.uint8)
    mask[1:3, 2:5] = 1
    expected = _coco(mask)["counts"].decode()
    assert encode_rle(mask)["counts"] == expected
    assert encode_rle(torch.from_numpy(mask).bool())["counts"] == expected
    assert fai_mf.encode_rle(mask * 255)["counts"] == expected  # nonzero is foreground


@pytest.mark.parametrize("bad, match", [(np.zeros((2, 2), np.float32), "dtype"), (np.zeros((1, 2, 2), bool), "2-D")])
def test_encode_rle_rejects_bad_masks(bad, match):
    with pytest.raises(ValueError, match=match):
        encode_rle(bad)


def test_decode_rle_rejects_corrupt_input():
    with pytest.raises(ValueError, match="sum"):
        counts_to_mask([1, 2], (2, 2))
    with pytest.raises(ValueError, match="truncated"):
        decompress_rle_counts("5X")  # 'X' announces another group
    with pytest.raises(ValueError, match="RLE"):
        decode_rle("not json")


def _png_image(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


@pytest.mark.parametrize("rows, cols", [(slice(2, 6), slice(3, 4)), (slice(4, 5), slice(1, 9)),
                                        (slice(3, 4), slice(7, 8)), (slice(0, 10), slice(0, 12))])
def test_png_mask_is_the_inclusive_bbox_crop(rows, cols):
    """One pixel wide, one pixel tall, a single pixel, and the whole image."""
    mask = np.zeros((10, 12), bool)
    mask[rows, cols] = True
    bbox = [cols.start, rows.start, cols.stop - 1, rows.stop - 1]  # inclusive max
    det = FocoosDet(bbox=bbox, conf=0.9, cls_id=0, mask=encode_mask(mask, bbox, "png"))
    image = _png_image(det.mask)
    assert image.format == "PNG" and image.mode == "L"
    assert image.size == (cols.stop - cols.start, rows.stop - rows.start)  # (W, H)
    pixels = np.asarray(image)
    assert set(np.unique(pixels)) <= {0, 255}
    assert np.array_equal(pixels == 255, mask[rows, cols])
    assert np.array_equal(decode_mask(det, mask.shape), mask)


@requires("pycocotools")
def test_decode_mask_handles_both_formats():
    mask = np.zeros((7, 9), bool)
    mask[1:5, 2] = True
    mask[3, 2:8] = True
    bbox = [2, 1, 7, 4]
    for fmt in ("png", "rle"):
        det = FocoosDet(bbox=bbox, conf=0.5, cls_id=1, mask=encode_mask(mask, bbox, fmt))
        assert np.array_equal(fai_mf.decode_mask(det, (7, 9)), mask)
        assert np.array_equal(fai_mf.decode_mask(det.model_dump(), (7, 9)), mask)
    rle_det = FocoosDet(bbox=bbox, conf=0.5, cls_id=1, mask=encode_mask(mask, bbox, "rle"))
    assert json.loads(rle_det.mask) == {"size": [7, 9], "counts": _coco(mask)["counts"].decode()}


def test_decode_mask_errors():
    mask = np.ones((3, 3), bool)
    png = FocoosDet(bbox=[0, 0, 2, 2], conf=0.5, cls_id=0, mask=encode_mask(mask, [0, 0, 2, 2]))
    with pytest.raises(ValueError, match="image_size"):
        decode_mask(png)
    with pytest.raises(ValueError, match="does not fit"):
        decode_mask(png, (2, 2))
    with pytest.raises(ValueError, match="no mask"):
        decode_mask(FocoosDet(bbox=None, conf=0.5, cls_id=0))
    rle = FocoosDet(bbox=[0, 0, 2, 2], conf=0.5, cls_id=0, mask=encode_mask(mask, None, "rle"))
    with pytest.raises(ValueError, match="size"):
        decode_mask(rle, (4, 3))
    with pytest.raises(ValueError, match="mask_format"):
        encode_mask(mask, [0, 0, 2, 2], "jpg")


def test_detections_json_round_trip():
    dets = FocoosDetections(
        detections=[FocoosDet(bbox=[1, 2, 3, 4], conf=0.75, cls_id=2, label="cat", mask="iVBORw0KGgo="),
                    FocoosDet(bbox=None, conf=0.5, cls_id=0, label=None, mask=None)],
        image="a.png", latency={"preprocess": 1.0, "inference": 2.5, "postprocess": 0.25})
    dumped = dets.model_dump()
    assert dumped == {
        "detections": [{"bbox": [1, 2, 3, 4], "conf": 0.75, "cls_id": 2, "label": "cat", "mask": "iVBORw0KGgo="},
                       {"bbox": None, "conf": 0.5, "cls_id": 0, "label": None, "mask": None}],
        "image": "a.png", "latency": {"preprocess": 1.0, "inference": 2.5, "postprocess": 0.25}}
    assert FocoosDetections.from_json(dets.to_json()) == dets
    assert FocoosDetections.model_validate(json.loads(json.dumps(dumped))) == dets
    assert len(dets) == 2 and dets[0].label == "cat" and [d.cls_id for d in dets] == [2, 0]


def test_detection_validation():
    assert FocoosDet.model_validate({"bbox": [1.0, 2.0, 3.0, 4.0], "conf": 1, "cls_id": 0}).bbox == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="cls_id"):
        FocoosDet.model_validate({"bbox": None, "conf": 0.5, "cls_id": "dog"})
    with pytest.raises(ValueError, match="bbox"):
        FocoosDet.model_validate({"bbox": [1, 2], "conf": 0.5, "cls_id": 0})
    with pytest.raises(ValueError, match="detections"):
        FocoosDetections.model_validate({"latency": None})
