"""Whole-model forward: every zoo model at 640x640 and 375x500 on CPU, output shapes and contract."""
from __future__ import annotations

import math

import pytest
import torch

import fai_mf

from conftest import tiny_config


@pytest.fixture(scope="module")
def zoo_models():
    return {}


@pytest.mark.parametrize("name", sorted(fai_mf.ZOO))
def test_zoo_forward_shapes(name):
    torch.manual_seed(0)
    m = fai_mf.load_model(name)
    cfg = m.config
    assert not m.model.training
    for h, w in ((640, 640), (375, 500)):
        x = torch.rand(1, 3, h, w) * 255
        with torch.inference_mode():
            raw = m.model.forward_raw(x)
            out = m.model(x)
        assert raw.class_logits.shape == (1, 100, cfg.num_classes + 1)
        assert raw.mask_logits.shape == (1, 100, math.ceil(h / 4), math.ceil(w / 4))
        assert out.masks.shape == (1, 100, h, w)
        assert out.logits.shape == (1, 100, cfg.num_classes)
        assert out.loss is None
        assert torch.isfinite(out.masks).all() and torch.isfinite(out.logits).all()
        assert 0 <= out.masks.min() and out.masks.max() <= 1
        torch.testing.assert_close(out.logits, raw.class_logits.softmax(-1)[..., :-1])


def test_zoo_random_weights_warn():
    with pytest.warns(UserWarning, match="RANDOM weights"):
        fai_mf.load_model("fai-mf-m-ade", transformer_predictor_dec_layers=1)


@pytest.mark.parametrize("hw", [(33, 47), (64, 64), (1, 1), (5, 130)])
def test_any_size_and_batch(tiny_model, hw):
    x = torch.rand(3, 3, *hw) * 255
    with torch.no_grad():
        out = tiny_model.model(x)
        single = tiny_model.model(x[1:2])
    assert out.masks.shape == (3, 10, *hw)
    torch.testing.assert_close(out.masks[1:2], single.masks, rtol=1e-4, atol=1e-5)


def test_images_are_normalised_inside_the_model(tiny_model):
    """A raw-RGB input equals feeding the pixel decoder the (x - mean) / std image."""
    x = torch.rand(1, 3, 64, 64) * 255
    cfg = tiny_model.config
    mean = torch.tensor(cfg.pixel_mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.pixel_std).view(1, 3, 1, 1)
    with torch.no_grad():
        mf, feats = tiny_model.model.pixel_decoder((x - mean) / std)
        expected = tiny_model.model.head.predictor(feats, mf)[-1].mask_logits
        torch.testing.assert_close(tiny_model.model.forward_raw(x).mask_logits, expected)


def test_cls_sigmoid_uses_sigmoid():
    torch.manual_seed(0)
    cfg = tiny_config(cls_sigmoid=True)
    model = fai_mf.FAIMaskFormer(cfg).eval()
    x = torch.rand(1, 3, 32, 32) * 255
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, model.forward_raw(x).class_logits.sigmoid()[..., :-1])


@pytest.mark.parametrize("bad, match", [
    (torch.rand(1, 4, 32, 32), "3, H, W"),
    (torch.rand(3, 32, 32), "3, H, W"),
    (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), "float"),
    (torch.rand(1, 3, 0, 32), "non-empty"),
])
def test_bad_images_are_named(tiny_model, bad, match):
    with pytest.raises(ValueError, match=match):
        tiny_model.model(bad)


def test_pixel_decoder_encoder_path_and_resnet_depths():
    """Every backbone variant builds and runs with the res5 encoder on."""
    for backbone in ({"model_type": "resnet", "depth": 18}, {"model_type": "resnet", "depth": 34},
                     {"model_type": "stdc", "layers": [2, 2, 2]}):
        cfg = tiny_config(backbone_config=backbone, pixel_decoder_transformer_layers=1,
                          pixel_decoder_transformer_nheads=4, pixel_decoder_transformer_dim_feedforward=32)
        model = fai_mf.FAIMaskFormer(cfg).eval()
        shapes = model.pixel_decoder.backbone.output_shape()
        assert [s.stride for s in shapes.values()] == [4, 8, 16, 32]
        with torch.no_grad():
            feats = model.pixel_decoder.backbone(torch.rand(1, 3, 64, 64))
        assert [f.shape[1] for f in feats.values()] == [s.channels for s in shapes.values()]
        assert [f.shape[-1] for f in feats.values()] == [16, 8, 4, 2]
        with torch.no_grad():
            assert model(torch.rand(1, 3, 64, 64) * 255).masks.shape == (1, 10, 64, 64)


def test_conv_bn_folding_matches_reference_and_reference_is_unfolded():
    """With fused kernels, eval-mode conv+BN(+ReLU) blocks run folded; outputs equal the reference."""
    from fai_mf.modeling import folding

    torch.manual_seed(0)
    model = fai_mf.FAIMaskFormer(tiny_config(backbone_config={"model_type": "resnet", "depth": 18})).eval()
    with torch.no_grad():  # non-trivial running statistics
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.5, 1.5)
    m = fai_mf.FAIMFModel(model.config, model)
    x = torch.rand(1, 3, 64, 48) * 255
    calls = []
    real = folding.fold_conv_bn
    folding.fold_conv_bn = lambda conv, norm: calls.append(1) or real(conv, norm)
    try:
        with torch.no_grad():
            m.set_kernels("reference")
            ref = model.forward_raw(x)
            assert not calls, "kernels='reference' must run conv then BN"
            m.set_kernels("auto")
            fused = model.forward_raw(x)
    finally:
        folding.fold_conv_bn = real
    assert calls, "auto must fold conv+BN at inference"
    torch.testing.assert_close(fused.mask_logits, ref.mask_logits, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(fused.class_logits, ref.class_logits, rtol=1e-3, atol=1e-3)
