"""Masked cross-attention (SPEC §4.1): reference semantics, the sdpa and Triton backends against the fp64
reference (the shared oracle in `mf_kernels.testing`) on every device here (`conftest.device_params`: the
Triton interpreter on CPU, the compiled kernels on CUDA), the split plan, and the whole tiny model.
"""
from __future__ import annotations

import math

import pytest
import torch

import fai_mf
import mf_kernels
from mf_kernels.masked_attention import masked_cross_attention_ref, masked_cross_attention_sdpa
from mf_kernels.shapes import MASKED_ATTENTION_SHAPES
from mf_kernels.testing import ROW_KINDS, assert_close_outputs, assert_parity, masked_attention_inputs

from conftest import backend_devices, device_params

DTYPES = (torch.float32, torch.float16)
TRITON_DEVICES = device_params("triton")


def triton_backend():
    from mf_kernels.masked_attention_triton import masked_cross_attention_triton

    return masked_cross_attention_triton


# ---------------------------------------------------------------------------------------------------
# Reference semantics


def test_reference_rules_blocked_open_and_all_blocked_rows():
    q, k, v, logits = masked_attention_inputs(1, 4, 9, dim=16, heads=2, seed=1)
    out = masked_cross_attention_ref(q, k, v, logits, 2, upcast=True)
    unmasked = masked_cross_attention_ref(q, k, v, torch.ones_like(logits), 2, upcast=True)
    assert ROW_KINDS == ("random", "all_blocked", "all_open", "one_open")
    torch.testing.assert_close(out[:, 1:3], unmasked[:, 1:3])  # all blocked == all open == no mask
    open_key = int((logits[0, 3] >= 0).nonzero())
    torch.testing.assert_close(out[0, 3], v[0, open_key])  # one open key: its value, every head
    assert not torch.allclose(out[:, 0], unmasked[:, 0])


def test_nan_logit_is_open_like_the_reference():
    q, k, v, logits = masked_attention_inputs(1, 2, 5, dim=16, heads=2, seed=2, edge_rows=False)
    logits[:] = -1.0
    logits[0, 0, 3] = float("nan")
    out = masked_cross_attention_sdpa(q, k, v, logits, 2)
    torch.testing.assert_close(out[0, 0], v[0, 3])
    assert_parity(out, masked_cross_attention_ref, q, k, v, logits, 2)


# ---------------------------------------------------------------------------------------------------
# sdpa (the CPU path auto picks)


@pytest.mark.parametrize("device", device_params("sdpa"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("queries,hw", [(1, 37), (7, 37), (7, 401), (100, 401)])
def test_sdpa_matches_reference(queries: int, hw: int, dtype: torch.dtype, device: str):
    for first_kind in range(len(ROW_KINDS) if queries == 1 else 1):
        q, k, v, logits = masked_attention_inputs(2, queries, hw, dtype=dtype, seed=hw + queries, first_kind=first_kind,
                                                  device=device)
        out = masked_cross_attention_sdpa(q, k, v, logits, 8)
        assert out.dtype == dtype
        assert_parity(out, masked_cross_attention_ref, q, k, v, logits, 8)


# ---------------------------------------------------------------------------------------------------
# Triton (interpreter)

# (batch, queries, hw, dtype); Q=1 runs every row kind. HW=161 is 6 key blocks of 32 (the last one ragged)
# in 2 splits of 128 keys; Q=65 is 2 query blocks of 64, the second with one row; HW=1 a single key.
TRITON_CASES = [
    (1, 1, 37, torch.float32),
    (1, 7, 37, torch.float16),
    (2, 7, 161, torch.float32),
    (1, 65, 161, torch.float32),
    (1, 65, 161, torch.float16),
    (1, 65, 1, torch.float32),
]


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("batch,queries,hw,dtype", TRITON_CASES,
                         ids=[f"B{b}-Q{q}-HW{hw}-{str(d)[6:]}" for b, q, hw, d in TRITON_CASES])
def test_triton_matches_reference(batch: int, queries: int, hw: int, dtype: torch.dtype, device: str):
    from mf_kernels.masked_attention_triton import plan

    run = triton_backend()
    if hw == 161:  # the case exists to split the keys: check that the plan does
        assert plan(*masked_attention_inputs(batch, queries, hw, dtype=dtype), 8)[0][1].grid[2] > 1
    for first_kind in range(len(ROW_KINDS) if queries == 1 else 1):
        q, k, v, logits = masked_attention_inputs(batch, queries, hw, dtype=dtype, seed=7 * hw + queries,
                                                  first_kind=first_kind, device=device)
        out = run(q, k, v, logits, 8)
        assert out.dtype == dtype and out.shape == q.shape
        assert_parity(out, masked_cross_attention_ref, q, k, v, logits, 8)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_takes_strided_inputs_and_other_head_dims(device: str):
    """Strides are passed explicitly: q sliced from a wider tensor, k/v from one packed kv tensor, logits
    transposed in memory; head dim 16 (D=64, 4 heads) and 64 (D=128, 2 heads)."""
    run = triton_backend()
    for dim, heads in ((64, 4), (128, 2)):
        q, k, v, logits = masked_attention_inputs(2, 5, 45, dim=dim, heads=heads, seed=dim, device=device)
        q_wide = torch.cat([q, torch.randn_like(q)], dim=-1)[..., :dim]
        kv = torch.stack([k, v], dim=2)  # [B, HW, 2, D]
        logits_t = logits.transpose(1, 2).contiguous().transpose(1, 2)
        out = run(q_wide, kv[:, :, 0], kv[:, :, 1], logits_t, heads)
        assert_parity(out, masked_cross_attention_ref, q, k, v, logits, heads)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_row_whose_only_open_key_is_in_the_last_split(device: str):
    """Every split but one sees a fully blocked row: the combine must not fall back to all keys."""
    run = triton_backend()
    q, k, v, logits = masked_attention_inputs(1, 3, 300, seed=3, edge_rows=False, device=device)
    logits[0, 0] = -1.0
    logits[0, 0, 299] = 0.5
    logits[0, 1] = -1.0  # all blocked: every key
    out = run(q, k, v, logits, 8)
    torch.testing.assert_close(out[0, 0], v[0, 299])
    assert_parity(out, masked_cross_attention_ref, q, k, v, logits, 8)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_with_no_queries_launches_nothing(device: str):
    q, k, v, logits = masked_attention_inputs(1, 0, 5, device=device)
    assert triton_backend()(q, k, v, logits, 8).shape == (1, 0, 256)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_refuses_what_it_cannot_run(device: str):
    run = triton_backend()
    q, k, v, logits = masked_attention_inputs(1, 3, 8, dim=48, heads=1, device=device)
    with pytest.raises(ValueError, match="head dim 48"):
        run(q, k, v, logits, 1)
    q, k, v, logits = masked_attention_inputs(1, 3, 8, dtype=torch.bfloat16, device=device)
    with pytest.raises(ValueError, match="dtype bfloat16 not supported"):
        run(q, k, v, logits, 8)


# ---------------------------------------------------------------------------------------------------
# The plan at the real shapes: split keys, small buffers


@pytest.mark.parametrize("arch", [75, 80, 90])
@pytest.mark.parametrize("shape", MASKED_ATTENTION_SHAPES, ids=lambda s: s.name)
def test_plan_splits_keys_and_never_materialises_scores(shape, arch: int):
    from mf_kernels.masked_attention_triton import T4_SM_COUNT, plan

    q, k, v, logits = shape.empty_inputs(torch.float16)
    launches, out = plan(q, k, v, logits, shape.heads, arch=arch, sm_count=T4_SM_COUNT)
    attention = launches[1]
    programs = math.prod(attention.grid)
    assert programs >= T4_SM_COUNT, f"{programs} attention programs for {T4_SM_COUNT} SMs"
    assert attention.grid[2] > 1, "keys are split across programs"
    scores = shape.batch * shape.heads * shape.queries * shape.hw
    buffers = {id(t): t for launch in launches for t in launch.args.values() if isinstance(t, torch.Tensor)}
    written = [t for t in buffers.values() if all(t is not x for x in (q, k, v, logits))]
    assert all(shape.hw not in t.shape for t in written), "no [.., HW] mask or score tensor"
    assert sum(t.numel() for t in written) < scores / 2


# ---------------------------------------------------------------------------------------------------
# Whole tiny model


def tiny_attention_model() -> fai_mf.FAIMFModel:
    torch.manual_seed(0)
    cfg = fai_mf.MaskFormerConfig(
        num_classes=3, backbone_config={"model_type": "stdc", "layers": [2, 2, 2], "base": 16}, pixel_decoder_feat_dim=32,
        pixel_decoder_out_dim=32, head_out_dim=32, transformer_predictor_hidden_dim=256,
        transformer_predictor_dec_layers=2, transformer_predictor_dim_feedforward=64, num_queries=7)
    return fai_mf.FAIMFModel(cfg, fai_mf.FAIMaskFormer(cfg).eval(), name="tiny-attention")


def run_model(model: fai_mf.FAIMFModel, images: torch.Tensor, kernels: str):
    model.set_kernels(kernels)
    with torch.no_grad():
        return model.model.forward_raw(images), model.model(images)


@pytest.mark.parametrize("kernels,device", backend_devices("triton", "sdpa"))
def test_whole_model_matches_reference(kernels: str, device: str, monkeypatch):
    model = tiny_attention_model()
    model.model.to(device)
    images = (torch.rand(1, 3, 64, 72, generator=torch.Generator().manual_seed(5)) * 255).to(device)
    ran = []
    op = mf_kernels.masked_cross_attention
    original_select = op.select

    def spy(inputs, choice=None):
        impl = original_select(inputs, choice)
        ran.append(impl.backend)
        return impl

    monkeypatch.setattr(op, "select", spy)
    raw_ref, out_ref = run_model(model, images, "reference")
    assert ran == []  # the reference model does not even consult the dispatcher
    raw, out = run_model(model, images, kernels)
    assert ran and set(ran) == {kernels}
    assert_close_outputs(raw.class_logits, raw_ref.class_logits, torch.float32, "class_logits")
    assert_close_outputs(raw.mask_logits, raw_ref.mask_logits, torch.float32, "mask_logits")
    assert_close_outputs(out.masks, out_ref.masks, torch.float32, "masks")
    assert_close_outputs(out.logits, out_ref.logits, torch.float32, "class probs")
