"""`predict` gives the same detections with kernels="reference" and every fused backend on every device
here (cpp; triton: the interpreter on CPU, compiled on CUDA; cuda), for semantic + predict_all_pixels and
instance (+ use_mask_score) models: same count, order and classes; masks equal except pixels within
rounding of a threshold (IoU >= 0.999); boxes within 1 px; scores within 1e-4.

The interpreter runs the whole model here, so the triton cases use small images and one mask format per
mode (both formats are covered across the modes; every format x mode x backend of the post-processing
itself is `test_mask_postprocess.py`'s).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import fai_mf
import mf_kernels

from conftest import backend_devices, tiny_config

MODES = {
    "instance": dict(postprocessing_type="instance"),
    "instance_mask_score": dict(postprocessing_type="instance", use_mask_score=True),
    "semantic_all_pixels": dict(postprocessing_type="semantic", predict_all_pixels=True),
}


def _model(mode: str, queries: int = 12) -> fai_mf.FAIMFModel:
    torch.manual_seed(7)
    cfg = tiny_config(num_queries=queries, transformer_predictor_hidden_dim=256, **MODES[mode])  # head dim 32
    model = fai_mf.FAIMaskFormer(cfg).eval()
    with torch.no_grad():  # random weights give masks all near 0.5: sharpen them into real shapes
        model.pixel_decoder.mask_features.weight.mul_(40.0)
    return fai_mf.FAIMFModel(cfg, model, classes=["a", "b", "c"], name=mode)


def _images(sizes=((61, 83), (64, 64))) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in sizes]


# The interpreter's cost grows with queries x pixels: the triton and cuda cases run 7 queries on two small
# odd-sized images (ceil-divided strides, several row blocks of the stats kernel, two sizes in one call).
SMALL_SIZES = ((29, 43), (23, 31))
SMALL_QUERIES = 7
# (mode, mask_format) pairs of the triton and cuda cases: every mode, both formats.
GPU_CASES = [("instance", "png"), ("instance_mask_score", "rle"), ("semantic_all_pixels", "rle"),
             ("semantic_all_pixels", "png")]
CASES = ([pytest.param(mode, fmt, *p.values, id=f"{mode}-{fmt}-{p.id}", marks=p.marks)
          for mode in sorted(MODES) for fmt in ("png", "rle") for p in backend_devices("cpp")]
         + [pytest.param(mode, fmt, *p.values, id=f"{mode}-{fmt}-{p.id}", marks=p.marks)
            for mode, fmt in GPU_CASES for p in backend_devices("triton", "cuda")])


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


@pytest.mark.parametrize("mode,mask_format,kernels,device", CASES)
def test_predict_same_with_fused_postprocessing(mode, mask_format, kernels, device, require_backend, no_tf32):
    require_backend(kernels)
    small = kernels != "cpp"
    m = _model(mode, SMALL_QUERIES if small else 12)
    m.model.to(device)
    images = _images(SMALL_SIZES if small else ((61, 83), (64, 64)))
    sizes = [im.shape[:2] for im in images]
    op = mf_kernels.dispatch.OPS["mask_postprocess"]
    m.set_kernels("reference")
    ref = m.predict(images, threshold=0.05, mask_format=mask_format)
    assert sum(len(r.detections) for r in ref) >= 3, "the test needs detections to compare"
    m.set_kernels(kernels)
    fused = m.predict(images, threshold=0.05, mask_format=mask_format)
    _assert_same(ref, fused, sizes)
    assert op.last_backend == kernels


@pytest.mark.parametrize("kernels,device", backend_devices("cpp", "cuda"))
def test_semantic_metrics_path_fused_label_map_matches_reference(kernels, device, require_backend, no_tf32):
    """The metrics path's label map through `mf_kernels.semantic_label_map` equals the reference argmax over
    full-size probabilities, except pixels whose two best class scores tie within rounding."""
    from fai_mf.evaluate import fused_semantic_label_map, query_probs
    from fai_mf.postprocess import semantic_inference

    require_backend(kernels)
    m = _model("semantic_all_pixels")
    m.model.to(device)
    image = torch.from_numpy(_images()[0]).permute(2, 0, 1).float()
    m.set_kernels("reference")
    probs, class_probs = (t.cpu() for t in query_probs(m, image))
    expected = semantic_inference(probs, class_probs)
    m.set_kernels(kernels)
    got = fused_semantic_label_map(m, image)
    assert got.shape == expected.shape
    differ = got != expected
    if differ.any():  # only near-ties may differ
        scores = torch.einsum("qc,qhw->chw", class_probs.double(), probs.double())
        gap = (scores.gather(0, expected[None]) - scores.gather(0, got[None]))[0]
        assert gap[differ].abs().max() < 1e-5
    assert differ.float().mean() < 1e-3
