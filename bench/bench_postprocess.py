"""Microbenchmarks of the mask post-processing (SPEC §4.3) at the shapes a real model sees
(`mf_kernels.shapes.POSTPROCESS_SHAPES`).

    pytest bench/bench_postprocess.py --benchmark-only --benchmark-group-by=group [--benchmark-columns=min,median,mean]

Groups (compare the rows of one group):
- `instance-<png|rle>`: fai-mf-s-coco-ins at 640², Q=100 stride-4 logits (160²), 80 classes, 20 queries
  confident, use_mask_score: stride-4 logits -> FocoosDetections (boxes, scores, classes, base64 PNG
  crops or RLE JSON strings), `fai_mf.predict.detections_from_raw` with the post-processing ops'
  `reference` (sigmoid + bilinear upsampling of ALL 100 masks to 640², threshold, stats, then Pillow /
  numpy encoding of the kept masks) or `cpp` (the C++ extension: only the candidate queries are expanded,
  never as float masks; counts, crops, strings and PNGs in C++). Target: cpp >= 10x faster.
- `predict-all-pixels-png`: the same for a semantic model (ownership over all queries, ADE-like 150 classes).
- `semantic-label-map`: the metrics path's argmax_c sum_q class_prob * prob, reference vs cpp.
- `rle-encode`: COCO compressed RLE strings of the same 20 full-size masks: pycocotools.mask.encode
  (given Fortran-ordered uint8 masks, its best case), the cpp encoder on row-major bool tensors and on
  Fortran-ordered arrays, and the reference Python encoder. Target: cpp at least as fast as pycocotools.
- `png-encode`: PNG files of the 20 bbox crops, Pillow vs cpp.
CPU only (the GPU backends are timed where a GPU is present by the model-level profiler). Inputs come
from the seeded generators the tests use (`mf_kernels.testing.make_mask_logits`, `make_class_probs`).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mf_kernels import _cpp_lib
from mf_kernels.postprocess import native, reference
from mf_kernels.shapes import POSTPROCESS_SHAPES
from mf_kernels.testing import make_class_probs, make_mask_logits

from conftest import record_environment

COCO, ADE = POSTPROCESS_SHAPES


def _require_cpp() -> None:
    reasons = _cpp_lib.unavailable_reasons("cpu")
    if reasons:
        pytest.skip("; ".join(reasons))


def _predict_path():
    try:
        from fai_mf.postprocess import PostprocessOptions
        from fai_mf.predict import detections_from_raw
    except ImportError as exc:
        pytest.skip(f"fai_mf predict path unavailable: {exc}")
    return PostprocessOptions, detections_from_raw


def _inputs(shape, seed: int = 0):
    h, w = shape.logits_hw
    logits = make_mask_logits(shape.queries, h, w, seed=seed, edge_rows=False)
    return logits, make_class_probs(shape.queries, shape.classes, shape.kept, seed=seed)


# (group, shape, predict_all_pixels, use_mask_score, mask_format)
PREDICT_CASES = [("instance-png", COCO, False, True, "png"), ("instance-rle", COCO, False, True, "rle"),
                 ("predict-all-pixels-png", ADE, True, False, "png")]


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("group,shape,all_pixels,mask_score,mask_format", PREDICT_CASES, ids=[c[0] for c in PREDICT_CASES])
def test_predict_postprocess(benchmark, backend, group, shape, all_pixels, mask_score, mask_format):
    options_cls, detections_from_raw = _predict_path()
    logits, class_probs = _inputs(shape)
    size = (shape.height, shape.width)
    benchmark.group = group
    record_environment(benchmark, "cpu", torch.float32, backend, shape.name, mask_format=mask_format)
    if backend == "cpp":
        _require_cpp()
    options = options_cls(threshold=0.5, mask_threshold=0.5, predict_all_pixels=all_pixels, use_mask_score=mask_score)
    dets = benchmark(lambda: detections_from_raw(logits, class_probs, size, options, None, mask_format, kernels=backend))
    benchmark.extra_info["detections"] = len(dets)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_semantic_label_map(benchmark, backend):
    logits, class_probs = _inputs(ADE)
    size = (ADE.height, ADE.width)
    benchmark.group = "semantic-label-map"
    record_environment(benchmark, "cpu", torch.float32, backend, ADE.name)
    if backend == "cpp":
        _require_cpp()
    fn = {"reference": reference.semantic_label_map_ref, "cpp": native.semantic_label_map_cpp}[backend]
    benchmark(lambda: fn(logits, class_probs, size))


def _kept_masks() -> list[torch.Tensor]:
    logits, _ = _inputs(COCO)
    kept = logits[torch.linspace(0, COCO.queries - 1, COCO.kept).round().long()]
    return list(reference.upsample_probs(kept, (COCO.height, COCO.width)) >= 0.5)


@pytest.mark.parametrize("encoder", ["pycocotools", "cpp", "cpp-fortran", "reference"])
def test_rle_encode(benchmark, encoder):
    masks = _kept_masks()
    benchmark.group = "rle-encode"
    record_environment(benchmark, "cpu", torch.bool, encoder, f"{COCO.kept} masks {COCO.height}x{COCO.width}")
    if encoder == "pycocotools":
        coco_mask = pytest.importorskip("pycocotools.mask")
        fortran = [np.asfortranarray(m.numpy().astype(np.uint8)) for m in masks]
        benchmark(lambda: [coco_mask.encode(m)["counts"].decode("ascii") for m in fortran])
    elif encoder == "reference":
        benchmark(lambda: reference.encode_rle_masks_ref(masks))
    else:
        _require_cpp()
        inputs = masks if encoder == "cpp" else [np.asfortranarray(m.numpy().astype(np.uint8)) for m in masks]
        benchmark(lambda: native.encode_rle_masks_cpp(inputs))


@pytest.mark.parametrize("encoder", ["reference", "cpp"])
def test_png_encode(benchmark, encoder):
    masks = torch.stack(_kept_masks())
    boxes = reference.boxes_of_masks(masks)
    crops = [reference.crop_to_box(m, b) for m, b in zip(masks, boxes)]
    benchmark.group = "png-encode"
    record_environment(benchmark, "cpu", torch.bool, encoder, f"{COCO.kept} bbox crops of {COCO.height}x{COCO.width}")
    if encoder == "cpp":
        _require_cpp()
    fn = {"reference": reference.encode_png_crops_ref, "cpp": native.encode_png_crops_cpp}[encoder]
    benchmark(lambda: fn(crops))
