"""`fai-mf predict` in-process: JSON output and annotated PNGs on generated images."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import fai_mf
from fai_mf import cli
from fai_mf.demo import synthetic_image


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A focoos model directory holding a tiny random model with decisive masks."""
    config = fai_mf.MaskFormerConfig(
        num_classes=3, backbone_config={"model_type": "stdc", "layers": [1, 1, 1]}, pixel_decoder_feat_dim=32,
        pixel_decoder_out_dim=32, head_out_dim=32, transformer_predictor_hidden_dim=64,
        transformer_predictor_dec_layers=2, transformer_predictor_dim_feedforward=64, num_queries=10,
        postprocessing_type="instance")
    torch.manual_seed(0)
    network = fai_mf.FAIMaskFormer(config).eval()
    with torch.no_grad():
        network.pixel_decoder.mask_features.weight.mul_(40)
    return fai_mf.FAIMFModel(config, network, classes=["sky", "road", "car"], name="tiny").save(
        tmp_path_factory.mktemp("tiny-model"))


def write_image(path, height: int, width: int, seed: int = 0) -> np.ndarray:
    image = synthetic_image(height, width, seed)[0].round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(image).save(path)
    return image


def test_predict_writes_json_and_annotated_png(model_dir, tmp_path):
    image = write_image(tmp_path / "scene.png", 48, 64)
    out, annotated = tmp_path / "result.json", tmp_path / "annotated.png"
    assert cli.main(["predict", "--model", str(model_dir), str(tmp_path / "scene.png"), "--out", str(out),
                     "--annotate", str(annotated), "--threshold", "0"]) == 0
    result = json.loads(out.read_text())
    assert set(result) == {"detections", "image", "latency"} and result["image"] == str(tmp_path / "scene.png")
    assert len(result["detections"]) > 0
    for det in result["detections"]:
        assert set(det) == {"bbox", "conf", "cls_id", "label", "mask"}
        assert det["label"] == ["sky", "road", "car"][det["cls_id"]] and det["conf"] > 0
        mask = fai_mf.decode_mask(det, (48, 64))
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        assert det["bbox"] == [cols[0], rows[0], cols[-1], rows[-1]]
    drawn = Image.open(annotated)
    assert drawn.format == "PNG" and drawn.size == (64, 48) and drawn.mode == "RGB"
    assert not np.array_equal(np.asarray(drawn), image)  # masks, boxes and labels were drawn


def test_predict_several_images_rle(model_dir, tmp_path, capsys):
    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    write_image(paths[0], 40, 40, seed=1)
    write_image(paths[1], 30, 52, seed=2)
    assert cli.main(["predict", "--model", str(model_dir / "model_info.json"), *map(str, paths),
                     "--threshold", "0", "--mask-format", "rle", "--annotate", str(tmp_path / "ann.png")]) == 0
    results = json.loads(capsys.readouterr().out)  # no --out: JSON on stdout, a list for several images
    assert [r["image"] for r in results] == list(map(str, paths))
    for result, size in zip(results, [(40, 40), (30, 52)]):
        for det in result["detections"]:
            assert json.loads(det["mask"])["size"] == list(size)
    for i, (height, width) in enumerate([(40, 40), (30, 52)]):
        assert Image.open(tmp_path / f"ann_{i}.png").size == (width, height)


def test_predict_with_a_zoo_name_warns_about_random_weights(tmp_path):
    write_image(tmp_path / "x.png", 32, 32)
    with pytest.warns(UserWarning, match="RANDOM weights"):
        assert cli.main(["predict", "--model", "fai-mf-m-ade", str(tmp_path / "x.png"),
                         "--out", str(tmp_path / "r.json")]) == 0
    assert "detections" in json.loads((tmp_path / "r.json").read_text())


def test_predict_missing_image_fails_clearly(model_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        cli.main(["predict", "--model", str(model_dir), str(tmp_path / "nope.png")])
