"""Every zoo model's state_dict equals focoos' key list: names, shapes and dtypes."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import fai_mf
from fai_mf.modeling.model import FAIMaskFormer

KEY_LISTS = Path(__file__).parent / "data" / "focoos-state-dict-keys"


def read_key_list(name: str) -> dict[str, tuple[tuple[int, ...], str]]:
    out = {}
    for line in (KEY_LISTS / f"{name}.txt").read_text().splitlines():
        key, shape, dtype = line.split("\t")
        out[key] = (tuple(int(s) for s in shape.strip("()").split(",") if s.strip()), dtype)
    return out


@pytest.mark.parametrize("name", sorted(fai_mf.ZOO))
def test_zoo_state_dict_matches_focoos(name):
    config = fai_mf.MaskFormerConfig.from_dict(fai_mf.zoo.zoo_config_dict(name))
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = FAIMaskFormer(config)
    got = {k: (tuple(v.shape), str(v.dtype)) for k, v in model.state_dict().items()}
    expected = read_key_list(name)
    assert sorted(set(expected) - set(got)) == []
    assert sorted(set(got) - set(expected)) == []
    assert {k: v for k, v in got.items() if expected[k] != v} == {}


def test_every_zoo_model_has_a_key_list():
    assert sorted(p.stem for p in KEY_LISTS.glob("*.txt")) == sorted(fai_mf.ZOO)
