"""The five FAI-MF zoo architectures (SPEC §2). Weights are never downloaded: pass a local file."""
from __future__ import annotations

from typing import Any

_COMMON: dict[str, Any] = dict(num_queries=100, transformer_predictor_hidden_dim=256, threshold=0.5, mask_threshold=0.5)

ZOO: dict[str, dict[str, Any]] = {
    "fai-mf-l-ade": dict(
        backbone_config={"model_type": "resnet", "depth": 101}, num_classes=150,
        pixel_decoder_feat_dim=128, pixel_decoder_out_dim=128, head_out_dim=128,
        pixel_decoder_transformer_layers=0, transformer_predictor_dec_layers=6,
        transformer_predictor_dim_feedforward=1024, postprocessing_type="semantic", predict_all_pixels=True,
    ),
    "fai-mf-m-ade": dict(
        backbone_config={"model_type": "stdc", "layers": [4, 5, 3]}, num_classes=150,
        pixel_decoder_feat_dim=128, pixel_decoder_out_dim=128, head_out_dim=128,
        pixel_decoder_transformer_layers=0, transformer_predictor_dec_layers=3,
        transformer_predictor_dim_feedforward=512, postprocessing_type="semantic", predict_all_pixels=True,
    ),
    "fai-mf-s-coco-ins": dict(
        backbone_config={"model_type": "resnet", "depth": 50}, num_classes=80,
        pixel_decoder_feat_dim=128, pixel_decoder_out_dim=128, head_out_dim=128,
        pixel_decoder_transformer_layers=3, transformer_predictor_dec_layers=6,
        transformer_predictor_dim_feedforward=1024, postprocessing_type="instance", use_mask_score=True,
    ),
    "fai-mf-m-coco-ins": dict(
        backbone_config={"model_type": "resnet", "depth": 101}, num_classes=80,
        pixel_decoder_feat_dim=128, pixel_decoder_out_dim=128, head_out_dim=128,
        pixel_decoder_transformer_layers=3, transformer_predictor_dec_layers=6,
        transformer_predictor_dim_feedforward=1024, postprocessing_type="instance",
    ),
    "fai-mf-l-coco-ins": dict(
        backbone_config={"model_type": "resnet", "depth": 101}, num_classes=80,
        pixel_decoder_feat_dim=256, pixel_decoder_out_dim=256, head_out_dim=256,
        pixel_decoder_transformer_layers=6, transformer_predictor_dec_layers=9,
        transformer_predictor_dim_feedforward=2048, postprocessing_type="instance",
    ),
}


def zoo_config_dict(name: str) -> dict[str, Any]:
    """A fresh copy of the zoo entry's config dict; KeyError names the known models."""
    if name not in ZOO:
        raise KeyError(f"unknown zoo model {name!r}; known: {', '.join(sorted(ZOO))}")
    out = dict(_COMMON)
    for key, value in ZOO[name].items():
        out[key] = dict(value) if isinstance(value, dict) else value
    return out
