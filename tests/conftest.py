"""Shared fixtures. Never imports triton: interpreter tests set TRITON_INTERPRET in their own module."""
from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch

import fai_mf


def requires(module: str) -> pytest.MarkDecorator:
    """Skip the test, with its name in the report, where the optional `module` (e.g. pycocotools) is missing."""
    return pytest.mark.skipif(importlib.util.find_spec(module) is None,
                              reason=f"needs {module}, which is not installed (pip install {module})")


def tiny_config(**overrides) -> fai_mf.MaskFormerConfig:
    """A small but complete FAI-MF config (STDC backbone, 2 decoder layers) for fast CPU tests."""
    base = dict(
        num_classes=3, backbone_config={"model_type": "stdc", "layers": [1, 1, 1]},
        pixel_decoder_feat_dim=32, pixel_decoder_out_dim=32, head_out_dim=32,
        transformer_predictor_hidden_dim=64, transformer_predictor_dec_layers=2,
        transformer_predictor_dim_feedforward=64, num_queries=10,
    )
    base.update(overrides)
    return fai_mf.MaskFormerConfig(**base)


@pytest.fixture
def tiny_model() -> fai_mf.FAIMFModel:
    torch.manual_seed(0)
    cfg = tiny_config()
    return fai_mf.FAIMFModel(cfg, fai_mf.FAIMaskFormer(cfg).eval(), name="tiny")


@pytest.fixture(scope="session")
def extension():
    """The C++ extension `mf_kernels._C`, built (or loaded) once per session. Only a machine without a
    compiler (or with the build disabled) skips the cpp tests; a failed build is an error."""
    from mf_kernels import _cpp_lib

    try:
        return _cpp_lib.load()
    except (_cpp_lib.MissingCompilerError, _cpp_lib.ExtensionDisabledError) as exc:
        pytest.skip(f"C++ extension unavailable here: {exc}")


@pytest.fixture(autouse=True)
def _quiet_random_weight_warning():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*RANDOM weights.*")
        yield
