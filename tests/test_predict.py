"""`FAIMFModel.predict` end to end on a tiny random model: inputs, batching, overrides, formats."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import fai_mf
import mf_kernels
from fai_mf.demo import synthetic_image
from fai_mf.formats import FocoosDetections, decode_mask
from fai_mf.postprocess import PostprocessOptions, select_queries
from mf_kernels.postprocess.reference import upsample_probs


def tiny_config(**overrides) -> fai_mf.MaskFormerConfig:
    return fai_mf.MaskFormerConfig(
        num_classes=3, backbone_config={"model_type": "stdc", "layers": [2, 2, 2], "base": 16}, pixel_decoder_feat_dim=32,
        pixel_decoder_out_dim=32, head_out_dim=32, transformer_predictor_hidden_dim=64,
        transformer_predictor_dec_layers=2, transformer_predictor_dim_feedforward=64, num_queries=10, **overrides)


@pytest.fixture(scope="module")
def model() -> fai_mf.FAIMFModel:
    """Random weights; mask_features scaled up so the masks are not all ~0.5 (a fresh model's are)."""
    torch.manual_seed(0)
    config = tiny_config()
    network = fai_mf.FAIMaskFormer(config).eval()
    with torch.no_grad():
        network.pixel_decoder.mask_features.weight.mul_(40)
    return fai_mf.FAIMFModel(config, network, classes=["sky", "road", "car"])


def random_image(height: int, width: int, seed: int) -> np.ndarray:
    """uint8 [H, W, 3]: flat discs on a gradient (gives more varied masks than noise)."""
    return synthetic_image(height, width, seed)[0].round().byte().permute(1, 2, 0).numpy()


def dumps(results: list[FocoosDetections]) -> list[list[dict]]:
    """Detections without latency (which differs run to run)."""
    return [r.model_dump()["detections"] for r in results]


def test_batch_of_different_sizes_equals_one_at_a_time(model):
    images = [random_image(64, 80, 0), random_image(48, 40, 1), random_image(33, 57, 2)]
    for kwargs in ({"threshold": 0.0}, {"threshold": 0.0, "predict_all_pixels": True, "mask_format": "rle"}):
        batched = model.predict(images, **kwargs)
        single = [model.predict(image, **kwargs)[0] for image in images]
        assert len(batched) == 3 and all(len(r) > 0 for r in batched)
        assert dumps(batched) == dumps(single)
        for result, image in zip(batched, images):
            for det in result:
                mask = decode_mask(det, image.shape[:2])
                rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
                assert det.bbox == [cols[0], rows[0], cols[-1], rows[-1]]


def test_same_size_batch_keeps_input_order(model):
    a, b, c = random_image(40, 48, 3), random_image(36, 44, 4), random_image(40, 48, 5)
    batched = model.predict([a, b, c], threshold=0.0)  # a and c run as one batch
    single = [model.predict(x, threshold=0.0)[0] for x in (a, b, c)]
    for got, want in zip(batched, single):
        assert [(d.cls_id, d.bbox, d.mask) for d in got] == [(d.cls_id, d.bbox, d.mask) for d in want]
        assert [d.conf for d in got] == pytest.approx([d.conf for d in want], abs=1e-5)


def test_every_input_kind_gives_the_same_detections(model, tmp_path):
    image = random_image(37, 45, 6)
    path = tmp_path / "image.png"
    Image.fromarray(image).save(path)
    chw = torch.from_numpy(image).permute(2, 0, 1).float()
    inputs = [image, Image.fromarray(image), chw, chw[None], str(path), path,
              Image.fromarray(image).convert("RGBA")]
    results = [model.predict(x, threshold=0.0)[0] for x in inputs]
    for result in results[1:]:
        assert result.detections == results[0].detections
    assert results[4].image == str(path) and results[0].image is None
    assert len(model.predict(torch.stack([chw, chw]), threshold=0.0)) == 2  # [B, 3, H, W] is B images
    assert model.predict([]) == []


def test_matches_model_forward_and_reference(model):
    image = random_image(29, 42, 7)
    x = torch.from_numpy(image).permute(2, 0, 1).float()[None]
    with torch.inference_mode():
        out, raw = model.model(x), model.model.forward_raw(x)
    assert torch.equal(upsample_probs(raw.mask_logits[0], (29, 42)), out.masks[0])
    with mf_kernels.use("reference"):
        kept = select_queries(raw.mask_logits[0], out.logits[0], (29, 42), PostprocessOptions(0.0, 0.5))
    result = model.predict(image, threshold=0.0)[0]
    assert len(result) == len(kept) > 0
    for det, q, cls_id, score in zip(result, kept.indices.tolist(), kept.classes.tolist(), kept.scores.tolist()):
        assert det.cls_id == cls_id and det.conf == score and det.label == model.classes[cls_id]
        assert np.array_equal(decode_mask(det, (29, 42)), (out.masks[0, q] >= 0.5).numpy())


def test_explicit_false_and_zero_override_the_config(model):
    image = random_image(32, 40, 8)
    strict_config = model.config.replace(threshold=0.99, predict_all_pixels=True, use_mask_score=True)
    strict = fai_mf.FAIMFModel(strict_config, model.model, classes=model.classes)
    assert len(strict.predict(image)[0]) == 0  # nothing passes 0.99 on a random model
    overridden = strict.predict(image, threshold=0, predict_all_pixels=False, use_mask_score=False)
    assert dumps(overridden) == dumps(model.predict(image, threshold=0.0))
    assert len(overridden[0]) > 0


def test_class_names_override_model_classes(model):
    image = random_image(32, 40, 9)
    default = model.predict(image, threshold=0.0)[0]
    renamed = model.predict(image, threshold=0.0, class_names=["a", "b", "c"])[0]
    assert [d.label for d in default] == [model.classes[d.cls_id] for d in default]
    assert [d.label for d in renamed] == ["abc"[d.cls_id] for d in renamed]
    with pytest.raises(ValueError, match="class_names"):
        model.predict(image, class_names=["only-one"])


def test_png_and_rle_masks_agree_and_json_round_trips(model):
    image = random_image(30, 50, 10)
    png = model.predict(image, threshold=0.0)[0]
    rle = model.predict(image, threshold=0.0, mask_format="rle")[0]
    assert len(png) == len(rle) > 0
    for a, b in zip(png, rle):
        assert np.array_equal(decode_mask(a, (30, 50)), decode_mask(b, (30, 50)))
    assert set(png.latency) == {"preprocess", "inference", "postprocess"} and png.latency["inference"] > 0
    assert FocoosDetections.from_json(rle.to_json()) == rle


@pytest.mark.parametrize("bad, error, match", [
    (np.zeros((8, 8, 3), np.float32), ValueError, "uint8"),
    (np.zeros((8, 8, 4), np.uint8), ValueError, r"\[H, W, 3\]"),
    (np.zeros((8, 8), np.uint8), ValueError, r"\[H, W, 3\]"),
    (np.zeros((0, 8, 3), np.uint8), ValueError, "empty"),
    (torch.full((3, 8, 8), 300.0), ValueError, "0..255"),
    (torch.full((3, 8, 8), -1.0), ValueError, "0..255"),
    (torch.full((3, 8, 8), float("nan")), ValueError, "NaN"),
    (torch.zeros(1, 8, 8), ValueError, r"\[3, H, W\]"),
    (torch.zeros(3, 8, 8, dtype=torch.int64), ValueError, "dtype"),
    ({"image": 1}, ValueError, "unsupported input type"),
])
def test_bad_inputs_give_clear_errors(model, bad, error, match):
    with pytest.raises(error, match=match):
        model.predict(bad)


def test_bad_files_and_options(model, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        model.predict(str(tmp_path / "missing.png"))
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    with pytest.raises(ValueError, match="cannot read image file"):
        model.predict([random_image(8, 8, 0), not_an_image])
    with pytest.raises(ValueError, match="mask_format"):
        model.predict(random_image(8, 8, 0), mask_format="jpg")


def test_zero_to_one_floats_warn(model):
    with pytest.warns(UserWarning, match="0..255"):
        model.predict(torch.full((3, 8, 8), 0.5))
