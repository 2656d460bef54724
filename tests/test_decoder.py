"""Semantics of the masked-attention decoder (SPEC §2)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mf_kernels
from fai_mf.modeling import transformer_decoder as td
from fai_mf.modeling.model import FAIMaskFormer

from conftest import tiny_config


def _record_attention_calls(monkeypatch):
    calls = []
    real = mf_kernels.masked_cross_attention

    def recording(q, k, v, mask_logits, num_heads):
        calls.append({"hw": k.shape[1], "mask_logits": mask_logits.detach().clone()})
        return real(q, k, v, mask_logits, num_heads)

    monkeypatch.setattr(mf_kernels, "masked_cross_attention", recording)
    return calls


def test_level_schedule_is_32_16_8_repeating(monkeypatch):
    torch.manual_seed(0)
    model = FAIMaskFormer(tiny_config(transformer_predictor_dec_layers=5)).eval()
    calls = _record_attention_calls(monkeypatch)
    with torch.no_grad():
        model.forward_raw(torch.rand(1, 3, 128, 96) * 255)
    h32, w32 = 4, 3  # 128x96 at strides 32, 16, 8
    expected = [h32 * w32, (2 * h32) * (2 * w32), (4 * h32) * (4 * w32)]
    assert [c["hw"] for c in calls] == [expected[i % 3] for i in range(5)]


def test_attention_mask_is_previous_prediction_resized_to_next_level(monkeypatch):
    torch.manual_seed(1)
    model = FAIMaskFormer(tiny_config(transformer_predictor_dec_layers=4)).eval()
    calls = _record_attention_calls(monkeypatch)
    with torch.no_grad():
        predictions = model.forward_predictions(torch.rand(2, 3, 96, 64) * 255)
    assert len(predictions) == 5  # initial prediction from query_feat + one per layer
    sizes = [(3, 2), (6, 4), (12, 8)]
    for i, call in enumerate(calls):
        prev = predictions[i].mask_logits
        expected = F.interpolate(prev, size=sizes[i % 3], mode="bilinear", align_corners=False).flatten(2)
        torch.testing.assert_close(call["mask_logits"], expected)


def test_fully_blocked_row_attends_to_all_keys():
    torch.manual_seed(2)
    b, nq, hw, d, h = 1, 3, 11, 32, 4
    q, k, v = torch.randn(b, nq, d), torch.randn(b, hw, d), torch.randn(b, hw, d)
    logits = torch.randn(b, nq, hw)
    logits[0, 1] = -1.0  # row 1: every key blocked
    out = mf_kernels.masked_cross_attention_ref(q, k, v, logits, h)
    unmasked = mf_kernels.masked_cross_attention_ref(q, k, v, torch.ones_like(logits), h)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0, 1], unmasked[0, 1])
    assert out[0, 1].abs().sum() > 0
    # a row with open keys differs from the unmasked result
    assert not torch.allclose(out[0, 0], unmasked[0, 0])


def test_cross_attention_matches_torch_multihead_attention_with_repeated_mask():
    """Independent check: nn.MultiheadAttention with a per-head repeated boolean mask (Mask2Former's way)."""
    torch.manual_seed(3)
    dim, heads, b, nq, hw = 64, 8, 2, 5, 13
    layer = td.CrossAttentionLayer(dim, heads).eval()
    tgt, query_pos = torch.randn(b, nq, dim), torch.randn(b, nq, dim)
    src, pos = torch.randn(b, hw, dim), torch.randn(b, hw, dim)
    logits = torch.randn(b, nq, hw)
    logits[1, 2] = -3.0
    blocked = logits < 0
    blocked[blocked.all(-1)] = False
    attn_mask = blocked.repeat_interleave(heads, dim=0)
    x = layer.norm(tgt)
    ref, _ = layer.multihead_attn(x + query_pos, src + pos, src, attn_mask=attn_mask)
    with torch.no_grad():
        torch.testing.assert_close(layer(tgt, src, pos, query_pos, logits), tgt + ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["cross", "self", "ffn"])
def test_layers_are_pre_norm_residual(kind):
    """With its output projection zeroed, a pre-norm residual layer is the identity (post-norm is not)."""
    torch.manual_seed(4)
    dim, b, nq, hw = 64, 2, 5, 9
    tgt, query_pos = torch.randn(b, nq, dim) * 3 + 1, torch.randn(b, nq, dim)
    with torch.no_grad():
        if kind == "cross":
            layer = td.CrossAttentionLayer(dim, 8)
            layer.multihead_attn.out_proj.weight.zero_(); layer.multihead_attn.out_proj.bias.zero_()
            out = layer(tgt, torch.randn(b, hw, dim), torch.randn(b, hw, dim), query_pos, torch.randn(b, nq, hw))
        elif kind == "self":
            layer = td.SelfAttentionLayer(dim, 8)
            layer.self_attn.out_proj.weight.zero_(); layer.self_attn.out_proj.bias.zero_()
            out = layer(tgt, query_pos)
        else:
            layer = td.FFNLayer(dim, 32)
            layer.linear2.weight.zero_(); layer.linear2.bias.zero_()
            out = layer(tgt)
    torch.testing.assert_close(out, tgt)


def test_layer_order_is_cross_then_self_then_ffn(monkeypatch):
    torch.manual_seed(5)
    model = FAIMaskFormer(tiny_config(transformer_predictor_dec_layers=2)).eval()
    predictor = model.head.predictor
    order = []
    for name in ("transformer_cross_attention_layers", "transformer_self_attention_layers", "transformer_ffn_layers"):
        for i, layer in enumerate(getattr(predictor, name)):
            layer.register_forward_pre_hook(lambda mod, args, n=name, i=i: order.append((i, n.split("_")[1])))
    with torch.no_grad():
        model.forward_raw(torch.rand(1, 3, 64, 64) * 255)
    assert order == [(0, "cross"), (0, "self"), (0, "ffn"), (1, "cross"), (1, "self"), (1, "ffn")]


def test_query_embed_is_position_and_query_feat_is_content():
    """The initial prediction depends on query_feat only; query_embed changes the layers' output."""
    torch.manual_seed(6)
    model = FAIMaskFormer(tiny_config(transformer_predictor_dec_layers=1)).eval()
    x = torch.rand(1, 3, 64, 64) * 255
    with torch.no_grad():
        before = model.forward_predictions(x)
        model.head.predictor.query_embed.weight.add_(1.0)
        after = model.forward_predictions(x)
    torch.testing.assert_close(before[0].class_logits, after[0].class_logits)
    assert not torch.allclose(before[1].class_logits, after[1].class_logits)


def test_inference_decoder_with_level_size_masks_matches_reference():
    """Fused inference path: attention masks computed at each level's size (einsum with the resized
    mask features, exact by linearity) give the reference's last prediction."""
    torch.manual_seed(8)
    model = FAIMaskFormer(tiny_config(transformer_predictor_dec_layers=4)).eval()
    with torch.no_grad():
        model.pixel_decoder.mask_features.weight.mul_(20.0)  # masks that actually block keys
        mask_features, feats = model.pixel_decoder(model.normalize(torch.rand(2, 3, 70, 52) * 255))
        with mf_kernels.use("reference"):
            ref = model.head.predictor(feats, mask_features)
        with mf_kernels.use("auto"):
            fast = model.head.predictor(feats, mask_features, intermediate=False)
    assert len(fast) == 1 and len(ref) == 5
    torch.testing.assert_close(fast[0].mask_logits, ref[-1].mask_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast[0].class_logits, ref[-1].class_logits, rtol=1e-4, atol=1e-4)
