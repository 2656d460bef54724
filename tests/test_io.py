"""Loading and saving in the focoos format: round trip and clear errors."""
from __future__ import annotations

import json

import pytest
import torch

import fai_mf
from fai_mf.io import CheckpointError

from conftest import tiny_config


@pytest.fixture
def saved(tmp_path, tiny_model):
    tiny_model.classes = ["a", "b", "c"]
    return tiny_model.save(tmp_path / "model"), tiny_model


def test_save_load_round_trip_identical_outputs(saved):
    directory, original = saved
    assert (directory / "model_info.json").is_file() and (directory / "model_final.pth").is_file()
    info = json.loads((directory / "model_info.json").read_text())
    assert info["config"]["backbone_config"]["model_type"] == "stdc"
    loaded = fai_mf.load_model(directory)
    assert loaded.config == original.config
    assert loaded.classes == ["a", "b", "c"]
    x = torch.rand(2, 3, 48, 40) * 255
    with torch.no_grad():
        a, b = original.model(x), loaded.model(x)
    assert torch.equal(a.masks, b.masks) and torch.equal(a.logits, b.logits)
    # a path to model_info.json works too
    again = fai_mf.load_model(directory / "model_info.json")
    assert torch.equal(again.model.state_dict()["head.predictor.query_feat.weight"],
                       original.model.state_dict()["head.predictor.query_feat.weight"])


def test_checkpoint_file_is_focoos_format(saved):
    directory, original = saved
    ckpt = torch.load(directory / "model_final.pth", weights_only=True)
    assert set(ckpt) == {"model"}
    assert set(ckpt["model"]) == set(original.model.state_dict())


def test_ddp_prefix_and_missing_empty_weight_are_accepted(saved, tmp_path):
    directory, original = saved
    state = torch.load(directory / "model_final.pth", weights_only=True)["model"]
    state = {f"module.{k}": v for k, v in state.items() if k != "head.criterion.empty_weight"}
    torch.save({"model": state}, tmp_path / "ddp.pth")
    loaded = fai_mf.load_model(directory, weights=tmp_path / "ddp.pth")
    torch.testing.assert_close(loaded.model.head.criterion.empty_weight, original.model.head.criterion.empty_weight)


def test_truncated_checkpoint_is_a_clear_error(saved, tmp_path):
    directory, _ = saved
    data = (directory / "model_final.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pth"):
        fai_mf.load_model(directory, weights=tmp_path / "cut.pth")


def test_wrong_key_is_named(saved, tmp_path):
    directory, _ = saved
    state = torch.load(directory / "model_final.pth", weights_only=True)["model"]
    state["head.predictor.query_featt.weight"] = state.pop("head.predictor.query_feat.weight")
    torch.save({"model": state}, tmp_path / "renamed.pth")
    with pytest.raises(CheckpointError) as err:
        fai_mf.load_model(directory, weights=tmp_path / "renamed.pth")
    assert "missing keys: head.predictor.query_feat.weight" in str(err.value)
    assert "unexpected keys: head.predictor.query_featt.weight" in str(err.value)


def test_wrong_shape_is_named(saved, tmp_path):
    directory, _ = saved
    state = torch.load(directory / "model_final.pth", weights_only=True)["model"]
    state["head.predictor.query_feat.weight"] = torch.zeros(11, 64)
    torch.save({"model": state}, tmp_path / "shape.pth")
    with pytest.raises(CheckpointError, match=r"query_feat.weight \(checkpoint \(11, 64\), model \(10, 64\)\)"):
        fai_mf.load_model(directory, weights=tmp_path / "shape.pth")


def test_checkpoint_of_another_zoo_model_is_rejected(saved):
    directory, _ = saved
    with pytest.raises(CheckpointError, match="does not match"):
        fai_mf.load_model("fai-mf-m-ade", weights=directory / "model_final.pth")


def test_unknown_config_field_is_named(saved):
    directory, _ = saved
    info = json.loads((directory / "model_info.json").read_text())
    info["config"]["num_querys"] = 50
    (directory / "model_info.json").write_text(json.dumps(info))
    with pytest.raises(fai_mf.ConfigError, match="num_querys"):
        fai_mf.load_model(directory)


def test_unknown_override_and_bad_values_are_named():
    with pytest.raises(fai_mf.ConfigError, match="not_a_field"):
        fai_mf.load_model("fai-mf-m-ade", not_a_field=1)
    with pytest.raises(fai_mf.ConfigError, match="model_type"):
        tiny_config(backbone_config={"model_type": "vgg"})
    with pytest.raises(fai_mf.ConfigError, match="unknown field.*widht"):
        tiny_config(backbone_config={"model_type": "stdc", "widht": 3})
    with pytest.raises(fai_mf.ConfigError, match="postprocessing_type"):
        tiny_config(postprocessing_type="panoptic")
    with pytest.raises(fai_mf.ConfigError, match="depth"):
        tiny_config(backbone_config={"model_type": "resnet", "depth": 152})


def test_missing_sources_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="zoo model"):
        fai_mf.load_model("fai-mf-xxl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="model_info.json"):
        fai_mf.load_model(tmp_path / "empty")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(fai_mf.ConfigError, match="not valid JSON"):
        fai_mf.load_model(tmp_path / "bad.json")


def test_not_a_state_dict_is_rejected(tmp_path, saved):
    directory, _ = saved
    torch.save({"model": [1, 2, 3]}, tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="not a state dict"):
        fai_mf.load_model(directory, weights=tmp_path / "list.pth")
