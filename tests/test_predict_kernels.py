"""`predict` gives the same detections with kernels="reference", "cpp" and "triton" (interpreter), for
semantic + predict_all_pixels and instance (+ use_mask_score) models: same count, order and classes;
masks equal except pixels within rounding of a threshold (IoU >= 0.999); boxes within 1 px; scores
within 1e-4 (issue 5)."""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton (kernels are decorated on first use)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import fai_mf  # noqa: E402
import mf_kernels  # noqa: E402

from conftest import tiny_config  # noqa: E402

MODES = {
    "instance": dict(postprocessing_type="instance"),
    "instance_mask_score": dict(postprocessing_type="instance", use_mask_score=True),
    "semantic_all_pixels": dict(postprocessing_type="semantic", predict_all_pixels=True),
}


def _model(mode: str) -> fai_mf.FAIMFModel:
    torch.manual_seed(7)
    cfg = tiny_config(num_queries=12, transformer_predictor_hidden_dim=256, **MODES[mode])  # head dim 32
    model = fai_mf.FAIMaskFormer(cfg).eval()
    with torch.no_grad():  # random weights give masks all near 0.5: sharpen them into real shapes
        model.pixel_decoder.mask_features.weight.mul_(40.0)
    return fai_mf.FAIMFModel(cfg, model, classes=["a", "b", "c"], name=mode)


def _images() -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in ((61, 83), (64, 64))]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return 1.0 if union == 0 else float((a & b).sum()) / float(union)


def _assert_same(ref, fused, sizes):
    for r, f, size in zip(ref, fused, sizes):
        assert [d.cls_id for d in r.detections] == [d.cls_id for d in f.detections]
        for dr, df in zip(r.detections, f.detections):
            assert dr.label == df.label
            assert abs(dr.conf - df.conf) <= 1e-4
            assert max(abs(a - b) for a, b in zip(dr.bbox, df.bbox)) <= 1
            assert _iou(fai_mf.decode_mask(dr, size), fai_mf.decode_mask(df, size)) >= 0.999


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("kernels", ["cpp", "triton"])
@pytest.mark.parametrize("mask_format", ["png", "rle"])
def test_predict_same_with_fused_postprocessing(mode, kernels, mask_format):
    m = _model(mode)
    images = _images()
    sizes = [im.shape[:2] for im in images]
    op = mf_kernels.dispatch.OPS["mask_postprocess"]
    reasons = op.reasons(kernels, op.inputs_of(torch.zeros(2, 4, 4), (16, 16), 0.5))
    if kernels == "cpp" and reasons:
        pytest.fail(f"the C++ extension must build here: {reasons}")
    m.set_kernels("reference")
    ref = m.predict(images, threshold=0.05, mask_format=mask_format)
    assert sum(len(r.detections) for r in ref) >= 3, "the test needs detections to compare"
    m.set_kernels(kernels)
    fused = m.predict(images, threshold=0.05, mask_format=mask_format)
    _assert_same(ref, fused, sizes)
    assert op.last_backend == kernels


def test_semantic_metrics_path_fused_label_map_matches_reference():
    """The metrics path's label map through `mf_kernels.semantic_label_map` (cpp) equals the reference
    argmax over full-size probabilities, except pixels whose two best class scores tie within rounding."""
    from fai_mf.evaluate import fused_semantic_label_map, query_probs
    from fai_mf.postprocess import semantic_inference

    m = _model("semantic_all_pixels")
    image = torch.from_numpy(_images()[0]).permute(2, 0, 1).float()
    m.set_kernels("reference")
    probs, class_probs = query_probs(m, image)
    expected = semantic_inference(probs, class_probs)
    m.set_kernels("cpp")
    got = fused_semantic_label_map(m, image)
    assert got.shape == expected.shape
    differ = got != expected
    if differ.any():  # only near-ties may differ
        scores = torch.einsum("qc,qhw->chw", class_probs.double(), probs.double())
        gap = (scores.gather(0, expected[None]) - scores.gather(0, got[None]))[0]
        assert gap[differ].abs().max() < 1e-5
    assert differ.float().mean() < 1e-3
