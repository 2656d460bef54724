"""Parity of the mask post-processing ops (SPEC §4.3) on every backend and device this machine runs
(reference, cpp: the C++ extension, built once per session; triton: the interpreter on CPU, compiled on
CUDA; cuda: the CUDA extension), against the reference and against pycocotools.

Oracle for masks: a fused mask may differ from the reference only at pixels whose reference probability
is within NEAR of the threshold (ownership: whose two best weighted scores are within NEAR of each
other), and then IoU >= 0.999; areas, boxes and RLE counts must match the fused mask itself; prob sums
match the reference within fp32 summation error plus the probability of the differing pixels.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch

import mf_kernels
from mf_kernels.postprocess import limits, native, reference
from mf_kernels.testing import make_class_probs, make_mask_logits

from conftest import backend_devices, device_params

NEAR = 1e-5
BACKENDS = backend_devices("reference", "cpp", "triton", "cuda")
# (Q, h, w, H, W): odd sizes (not multiples of the 128-column / 4-row blocks, H and W not 4h and 4w),
# Q = 1, exactly 4x, equal sizes (PyTorch's copy rule), a downscale, one-row / one-column maps, and a
# width past one 128-column block (the column loop and its bit-mask bytes).
SHAPES = [(3, 9, 11, 37, 45), (1, 7, 5, 27, 19), (2, 8, 8, 32, 32), (2, 10, 12, 10, 12), (2, 10, 12, 5, 7),
          (2, 1, 5, 3, 17), (3, 4, 1, 9, 1), (1, 2, 33, 5, 130)]


def _backend_fn(backend: str, op: str):
    if backend == "triton":
        from mf_kernels.postprocess import triton_kernels

        return getattr(triton_kernels, f"{op}_triton")
    return {"reference": getattr(reference, f"{op}_ref"), "cpp": getattr(native, f"{op}_cpp", None),
            "cuda": getattr(native, f"{op}_cuda", None)}[backend]


def _on(device: str, value):
    return value.to(device) if isinstance(value, torch.Tensor) else value


def run_op(backend: str, device: str, require_backend, *args, **kwargs) -> reference.MaskStats:
    """`mask_postprocess` of `backend` with the tensor arguments on `device`."""
    require_backend(backend)
    args = [_on(device, a) for a in args]
    kwargs = {k: _on(device, v) for k, v in kwargs.items()}
    return _backend_fn(backend, "mask_postprocess")(*args, **kwargs)


def run_semantic(backend: str, device: str, require_backend, logits, class_probs, size) -> torch.Tensor:
    require_backend(backend)
    return _backend_fn(backend, "semantic_label_map")(logits.to(device), class_probs.to(device), size).cpu()


def mask_of_counts(counts: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """bool [H, W] of COCO run lengths (our own decoder: pycocotools checks the strings separately)."""
    values = torch.arange(counts.numel()) % 2 == 1
    flat = torch.repeat_interleave(values, counts)
    assert flat.numel() == size[0] * size[1], f"counts sum to {flat.numel()}, expected {size[0] * size[1]}"
    return flat.reshape(size[1], size[0]).t()


def full_mask_of_crop(crop: torch.Tensor, box: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    mask = torch.zeros(size, dtype=torch.bool)
    x1, y1, x2, y2 = (int(v) for v in box)
    if x2 >= 0:
        assert crop.shape == (y2 - y1 + 1, x2 - x1 + 1)
        mask[y1:y2 + 1, x1:x2 + 1] = crop
    else:
        assert crop.shape == (0, 0)
    return mask


def assert_self_consistent(out: reference.MaskStats) -> list[torch.Tensor]:
    """Masks from the RLE counts and from the crops agree, and areas / boxes are theirs; returns them."""
    masks = []
    for k in range(len(out)):
        mask = mask_of_counts(out.rle_counts[k], out.image_size)
        assert torch.equal(full_mask_of_crop(out.crops[k], out.boxes[k].cpu(), out.image_size), mask), f"query {k}"
        assert int(out.areas[k]) == int(mask.sum()), f"query {k}: area vs its own mask"
        assert torch.equal(reference.boxes_of_masks(mask[None])[0], out.boxes[k].cpu()), f"query {k}: box vs its own mask"
        masks.append(mask)
    return masks


def assert_masks_match(masks: list[torch.Tensor], ref_masks: torch.Tensor, near: torch.Tensor, what: str) -> None:
    """Every differing pixel is `near` (a rounding tie of the reference) and IoU >= 0.999."""
    for k, (mask, ref) in enumerate(zip(masks, ref_masks)):
        differ = mask != ref
        assert not (differ & ~near[k]).any(), (
            f"{what} query {k}: {int((differ & ~near[k]).sum())} pixels differ away from any rounding tie")
        union = int((mask | ref).sum())
        if union and differ.any():
            assert int((mask & ref).sum()) / union >= 0.999, f"{what} query {k}: IoU below 0.999"


def assert_prob_sums_match(out: reference.MaskStats, ref: reference.MaskStats, probs: torch.Tensor, masks: list[torch.Tensor],
                           ref_masks: torch.Tensor) -> None:
    for k in range(len(out)):
        moved = float((probs[k] * (masks[k] ^ ref_masks[k])).sum())
        tol = 1e-6 * float(ref.areas[k]) + 1e-4 + moved
        assert abs(float(out.prob_sums[k]) - float(ref.prob_sums[k])) <= tol, f"query {k} prob sum"


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_threshold_mode_parity(backend, device, dtype, shape, require_backend):
    q, h, w, height, width = shape
    logits = make_mask_logits(q, h, w, dtype, seed=sum(shape))
    size = (height, width)
    probs = reference.upsample_probs(logits, size)
    for threshold, strict in ((0.5, False), (0.3, True)):
        ref = reference.mask_postprocess_ref(logits, size, threshold, strict=strict, rle=True, crops=True)
        out = run_op(backend, device, require_backend, logits, size, threshold, strict=strict, rle=True, crops=True)
        ref_masks = probs > threshold if strict else probs >= threshold
        near = (probs - threshold).abs() <= NEAR
        masks = assert_self_consistent(out)
        assert_masks_match(masks, ref_masks, near, f"{backend} thr={threshold}")
        assert_prob_sums_match(out, ref, probs, masks, ref_masks)
        for k in range(q):  # no near-threshold pixel in these seeds: everything is equal
            if not (masks[k] ^ ref_masks[k]).any():
                assert int(out.areas[k]) == int(ref.areas[k]) and torch.equal(out.boxes[k].cpu(), ref.boxes[k])


@pytest.mark.parametrize("backend,device", backend_devices("reference", "cpp", "cuda"))
def test_bfloat16_logits(backend, device, require_backend):
    logits = make_mask_logits(4, 9, 11, torch.bfloat16, seed=8)
    ref = reference.mask_postprocess_ref(logits, (35, 41), 0.5, rle=True)
    out = run_op(backend, device, require_backend, logits, (35, 41), 0.5, rle=True)
    assert torch.equal(out.areas.cpu(), ref.areas) and torch.equal(out.boxes.cpu(), ref.boxes)
    assert all(torch.equal(a, b) for a, b in zip(out.rle_counts, ref.rle_counts))


def test_reference_pieces_are_the_model_and_metrics_rules():
    """The reference upsamples as the model's forward, owns pixels by argmax (ties to the lowest q), boxes
    its masks inclusively, and its semantic map is fai_mf's metrics path."""
    from fai_mf import postprocess

    logits = make_mask_logits(6, 11, 14, seed=3)
    size = (41, 53)
    probs = reference.upsample_probs(logits, size)
    expected = torch.nn.functional.interpolate(logits.sigmoid()[None], size=size, mode="bilinear",
                                               align_corners=False)[0]
    assert torch.equal(probs, expected)
    ref = reference.mask_postprocess_ref(logits, size, 0.5)
    masks = probs >= 0.5
    assert torch.equal(ref.areas, masks.sum((1, 2)))
    assert torch.equal(ref.boxes, reference.boxes_of_masks(masks)) and ref.boxes.dtype == torch.int32
    class_probs = torch.rand(6, 4, generator=torch.Generator().manual_seed(2))
    assert torch.equal(postprocess.semantic_inference(probs, class_probs),
                       reference.semantic_label_map_ref(logits, class_probs, size))


def near_owner_ties(probs: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """bool [H, W]: pixels whose two best weighted scores are within NEAR (relative) of each other."""
    weighted = scores[:, None, None] * probs
    top = weighted.topk(2, dim=0).values if probs.shape[0] > 1 else torch.cat([weighted, weighted - 1])
    return (top[0] - top[1]).abs() <= NEAR * top[0].abs().clamp(min=1e-30)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: "x".join(map(str, s)))
def test_ownership_mode_parity(backend, device, dtype, shape, require_backend):
    q, h, w, height, width = shape
    size = (height, width)
    logits = make_mask_logits(q, h, w, dtype, seed=7 + sum(shape), edge_rows=False)
    scores = torch.rand(q, generator=torch.Generator().manual_seed(q))
    queries = torch.arange(q - 1, -1, -2)  # every other query, in a non-sorted order: output keeps it
    ref = reference.mask_postprocess_ref(logits, size, scores=scores, queries=queries, rle=True, crops=True)
    out = run_op(backend, device, require_backend, logits, size, scores=scores, queries=queries, rle=True, crops=True)
    probs = reference.upsample_probs(logits, size)
    owners = reference.pixel_owners(probs, scores)
    ref_masks = owners[None] == queries[:, None, None]
    near = near_owner_ties(probs, scores)[None].expand(len(queries), -1, -1)
    masks = assert_self_consistent(out)
    assert_masks_match(masks, ref_masks, near, f"{backend} ownership")
    assert_prob_sums_match(out, ref, probs[queries], masks, ref_masks)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_ownership_ties_go_to_the_lowest_query(backend, device, require_backend):
    """Queries 1 and 2 are identical (logits and score): query 1 owns their pixels, query 2 none; a query
    with score 0 owns nothing where another has a positive product."""
    base = make_mask_logits(3, 9, 11, seed=5, edge_rows=False)
    logits = torch.stack([base[0], base[1], base[1], base[2]])
    scores = torch.tensor([0.6, 0.8, 0.8, 0.0])
    out = run_op(backend, device, require_backend, logits, (35, 43), scores=scores, rle=True, crops=True)
    masks = assert_self_consistent(out)
    assert int(out.areas[2]) == 0 and out.boxes[2].tolist() == [-1, -1, -1, -1]
    assert int(out.areas[1]) > 0
    assert int(out.areas[3]) == 0
    assert int(out.areas.sum()) == 35 * 43  # every pixel has exactly one owner
    assert not (masks[0] & masks[1]).any()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_empty_full_and_one_pixel_masks(backend, device, require_backend):
    size = (23, 30)
    logits = torch.full((3, 6, 8), -30.0)
    logits[1] = 30.0
    logits[2, 2, 3], logits[2, 2, 4] = 5.0, 3.0  # one peak: a single output pixel is the maximum
    probs = reference.upsample_probs(logits, size)
    peak = probs[2].flatten().topk(2).values
    threshold = float((peak[0] + peak[1]) / 2)  # exactly one pixel passes, with margin on both sides
    out = run_op(backend, device, require_backend, logits, size, threshold, rle=True, crops=True)
    assert_self_consistent(out)
    assert out.areas.tolist() == [0, 23 * 30, 1]
    assert out.boxes[0].tolist() == [-1, -1, -1, -1] and out.boxes[1].tolist() == [0, 0, 29, 22]
    y, x = divmod(int(probs[2].flatten().argmax()), size[1])
    assert out.boxes[2].tolist() == [x, y, x, y]
    assert out.rle_counts[0].tolist() == [23 * 30] and out.rle_counts[1].tolist() == [0, 23 * 30]
    assert out.rle_counts[2].tolist() == [x * 23 + y, 1, 23 * 30 - x * 23 - y - 1]
    assert out.crops[0].shape == (0, 0) and bool(out.crops[1].all()) and out.crops[2].tolist() == [[True]]
    assert float(out.prob_sums[0]) == 0.0
    assert abs(float(out.prob_sums[1]) - 23 * 30) < 1e-2
    assert abs(float(out.prob_sums[2]) - float(peak[0])) < 1e-6
    assert torch.allclose(out.mask_scores().cpu(), torch.tensor([0.0, 1.0, float(peak[0])]), atol=1e-5)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_strided_logits_and_query_subset(backend, device, require_backend):
    """Non-contiguous logits (a transposed view) and `queries` in threshold mode."""
    logits = make_mask_logits(4, 12, 9, seed=11).transpose(1, 2)  # [4, 9, 12], strided
    queries = torch.tensor([3, 0])
    ref = reference.mask_postprocess_ref(logits.contiguous(), (30, 41), 0.5, queries=queries, rle=True)
    out = run_op(backend, device, require_backend, logits, (30, 41), 0.5, queries=queries, rle=True)  # .to keeps strides
    assert torch.equal(out.areas.cpu(), ref.areas) and torch.equal(out.boxes.cpu(), ref.boxes)
    assert all(torch.equal(a, b) for a, b in zip(out.rle_counts, ref.rle_counts))
    assert out.crops is None


def near_class_ties(logits: torch.Tensor, class_probs: torch.Tensor, size) -> torch.Tensor:
    probs = reference.upsample_probs(logits, size)
    scores = torch.einsum("qc,qhw->chw", class_probs.float(), probs)
    if scores.shape[0] == 1:
        return torch.zeros(size, dtype=torch.bool)
    top = scores.topk(2, dim=0).values
    return (top[0] - top[1]).abs() <= NEAR * top[0].abs().clamp(min=1.0)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("classes", [1, 5])
def test_semantic_label_map_parity(backend, device, dtype, shape, classes, require_backend):
    q, h, w, height, width = shape
    logits = make_mask_logits(q, h, w, dtype, seed=classes + sum(shape))
    class_probs = torch.rand(q, classes, generator=torch.Generator().manual_seed(q)).softmax(-1)
    ref = reference.semantic_label_map_ref(logits, class_probs, (height, width))
    labels = run_semantic(backend, device, require_backend, logits, class_probs, (height, width))
    assert labels.dtype == torch.int64 and labels.shape == (height, width)
    differ = labels != ref
    assert not (differ & ~near_class_ties(logits, class_probs, (height, width))).any()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_semantic_ties_go_to_the_lowest_class(backend, device, require_backend):
    logits = make_mask_logits(3, 8, 8, seed=2, edge_rows=False)
    class_probs = torch.tensor([[0.8, 0.1, 0.1], [0.0, 0.5, 0.5], [0.4, 0.3, 0.3]])  # classes 1 and 2 equal
    labels = run_semantic(backend, device, require_backend, logits, class_probs, (29, 31))
    assert not (labels == 2).any() and (labels == 1).any()


# ----------------------------------------------------------------------------------------------------
# Host encoders: RLE strings and PNG crops


def adversarial_masks() -> list[np.ndarray]:
    gen = np.random.default_rng(0)
    checker = (np.indices((17, 13)).sum(0) % 2).astype(bool)
    single = np.zeros((9, 7), bool)
    single[4, 3] = True
    line_v, line_h = np.zeros((12, 10), bool), np.zeros((12, 10), bool)
    line_v[:, 6], line_h[5, :] = True, True
    corner = np.zeros((5, 5), bool)
    corner[0, 0] = corner[4, 4] = True
    return [np.zeros((6, 4), bool), np.ones((6, 4), bool), single, checker, line_v, line_h, corner,
            gen.random((1, 37)) > 0.5, gen.random((41, 1)) > 0.5, gen.random((375, 500)) > 0.5,
            gen.random((64, 48)) > 0.97, np.ones((1, 1), bool), np.zeros((1, 1), bool)]


@pytest.fixture
def pycocotools_mask():
    """pycocotools' mask module: only the byte-identity test needs it, and only it skips without it."""
    return pytest.importorskip("pycocotools.mask", reason="pycocotools is not installed (the RLE byte-identity "
                               "check compares with it)")


def _encoders(backend: str, require_backend) -> tuple:
    require_backend(backend)
    module = native if backend == "cpp" else reference
    suffix = "cpp" if backend == "cpp" else "ref"
    return tuple(getattr(module, f"{name}_{suffix}") for name in ("encode_rle_strings", "encode_rle_masks",
                                                                 "encode_png_crops"))


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_rle_strings_byte_identical_to_pycocotools(backend, require_backend, pycocotools_mask):
    encode, encode_masks, _ = _encoders(backend, require_backend)
    masks = adversarial_masks()
    logits = make_mask_logits(6, 20, 25, seed=9)
    masks += [m.numpy() for m in reference.upsample_probs(logits, (77, 99)) >= 0.5]
    strings = encode([reference.rle_counts_ref(torch.from_numpy(m)) for m in masks])
    from_tensors = encode_masks([torch.from_numpy(m) for m in masks])  # row-major bool
    from_fortran = encode_masks([np.asfortranarray(m.astype(np.uint8)) for m in masks])  # column-major uint8
    for mask, string, dense, fortran in zip(masks, strings, from_tensors, from_fortran):
        expected = pycocotools_mask.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode("ascii")
        assert string == expected == dense == fortran, f"mask {mask.shape}"


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_png_crops_decode_to_the_exact_crop(backend, require_backend):
    from PIL import Image

    _, _, encode = _encoders(backend, require_backend)
    crops = [torch.from_numpy(m) for m in adversarial_masks() if m.size]
    crops += reference.mask_postprocess_ref(make_mask_logits(5, 10, 10, seed=4), (40, 37), crops=True).crops
    crops = [c for c in crops if c.numel()]
    crops.append(torch.ones(1, 300, dtype=torch.uint8))  # uint8 input, one pixel tall
    for crop, png in zip(crops, encode(crops)):
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        image = Image.open(io.BytesIO(png))
        assert image.mode == "L" and image.size == (crop.shape[1], crop.shape[0])
        pixels = np.asarray(image)
        assert set(np.unique(pixels)) <= {0, 255}
        assert np.array_equal(pixels > 0, crop.bool().numpy())


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_png_rejects_empty_crop(backend, require_backend):
    _, _, encode = _encoders(backend, require_backend)
    with pytest.raises(ValueError, match="non-empty 2-D"):
        encode([torch.zeros(0, 0, dtype=torch.bool)])


# ----------------------------------------------------------------------------------------------------
# SPEC §3 end to end: fai_mf's selection through each backend vs through the reference


@pytest.mark.parametrize("backend,device", BACKENDS[1:])
@pytest.mark.parametrize("mode", ["instance", "use_mask_score", "predict_all_pixels"])
@pytest.mark.parametrize("mask_format", ["png", "rle"])
def test_detections_match_the_reference_backend(backend, device, mode, mask_format, require_backend):
    from fai_mf import formats
    from fai_mf.postprocess import PostprocessOptions
    from fai_mf.predict import detections_from_raw

    require_backend(backend)
    size = (45, 58)
    logits = make_mask_logits(12, 12, 15, seed=21, edge_rows=False)
    class_probs = make_class_probs(12, 7, kept=5, seed=21)
    options = PostprocessOptions(threshold=0.5, mask_threshold=0.5, predict_all_pixels=mode == "predict_all_pixels",
                                 use_mask_score=mode == "use_mask_score")
    expected = detections_from_raw(logits, class_probs, size, options, None, mask_format, kernels="reference")
    got = detections_from_raw(logits.to(device), class_probs.to(device), size, options, None, mask_format,
                              kernels=backend)
    assert len(expected) >= 3, "the seeds should keep several queries"
    assert [d.cls_id for d in got] == [d.cls_id for d in expected]  # same count, order and classes
    for det, ours in zip(expected, got):
        assert max(abs(a - b) for a, b in zip(det.bbox, ours.bbox)) <= 1
        assert abs(det.conf - ours.conf) <= 1e-4
        mine, theirs = formats.decode_mask(ours, size), formats.decode_mask(det, size)
        assert (mine & theirs).sum() / (mine | theirs).sum() >= 0.999
        if mask_format == "rle":
            assert ours.mask == det.mask or not np.array_equal(mine, theirs)  # same JSON string when masks agree


# ----------------------------------------------------------------------------------------------------
# API: dispatch, checks, limits


def test_dispatch_runs_the_named_backend(require_backend):
    require_backend("cpp")
    logits = make_mask_logits(3, 8, 8, seed=1)
    with mf_kernels.use("cpp"):
        assert mf_kernels.mask_postprocess.select(limits.inputs_of(logits, (30, 30))).backend == "cpp"
        out = mf_kernels.mask_postprocess(logits, (30, 30), 0.5, rle=True)
        strings = mf_kernels.encode_rle_strings(out.rle_counts)
    with mf_kernels.use("reference"):
        ref = mf_kernels.mask_postprocess(logits, (30, 30), 0.5, rle=True)
        assert mf_kernels.encode_rle_strings(ref.rle_counts) == strings
    assert torch.equal(out.areas, ref.areas)
    with mf_kernels.use("auto"):  # on CPU, auto prefers the extension
        assert mf_kernels.semantic_label_map.select(
            limits.semantic_inputs_of(logits, torch.rand(3, 2), (30, 30))).backend == "cpp"


def test_selection_cache_stays_bounded_over_500_image_sizes(require_backend):
    """The dispatcher caches one selection per (choice, inputs): sizes enter the key only as "over a limit
    or not", so a service that sees 500 image sizes keeps a handful of entries, not 500. mask_postprocess runs
    for real; the other ops' calls are resolved as a call does (inputs_of, then the cached select)."""
    require_backend("cpp")
    ops = (mf_kernels.mask_postprocess, mf_kernels.semantic_label_map, mf_kernels.fpn_upsample_add,
           mf_kernels.fpn_lateral_upsample_add)
    for op in ops:
        op.clear_cache()
    logits, class_probs = make_mask_logits(2, 2, 3, seed=0), torch.rand(2, 3)
    weight, bias = torch.randn(4, 2), torch.randn(4)
    sizes = [(5 + i % 37, 3 + i // 37 * 7 + i % 5) for i in range(500)]
    assert len(set(sizes)) == 500
    with mf_kernels.use("auto"), torch.inference_mode():
        for size in sizes:
            mf_kernels.mask_postprocess(logits, size, 0.5, queries=torch.tensor([1]))
            coarse = torch.empty(1, 4, -(-size[0] // 2), -(-size[1] // 2))
            semantic, fpn_add, fpn_lateral = ops[1:]
            assert semantic.select(semantic.inputs_of(logits, class_probs, size)).backend == "cpp"
            fpn_add.select(fpn_add.inputs_of(torch.empty(1, 4, *size), coarse))
            fpn_lateral.select(fpn_lateral.inputs_of(torch.empty(1, 2, *size), weight, bias, coarse))
    assert ops[0].last_backend == "cpp"
    for op in ops:
        assert len(op._selected) == 1, (op.name, len(op._selected))


@pytest.mark.parametrize("backend,device", [p for p in backend_devices("triton", "cuda") if p.values[1] == "cuda"])
@pytest.mark.parametrize("all_pixels", [False, True])
@pytest.mark.parametrize("mask_format", ["png", None])
def test_selection_synchronises_only_for_its_copies(backend, device, all_pixels, mask_format, require_backend):
    """SPEC §3's selection of one image on CUDA synchronises for its copies only: the class probs to the host,
    the bit masks (when masks are encoded), the candidates' stats. The query checks and the index moves add
    none (they cost ~15 synchronisations per image before)."""
    from fai_mf.postprocess import PostprocessOptions, select_queries

    require_backend(backend)
    logits = make_mask_logits(12, 12, 15, seed=21, edge_rows=False).to(device)
    class_probs = make_class_probs(12, 7, kept=5, seed=21).to(device)
    options = PostprocessOptions(threshold=0.5, mask_threshold=0.5, predict_all_pixels=all_pixels, use_mask_score=True)
    with mf_kernels.use(backend):
        select_queries(logits, class_probs, (45, 58), options, mask_format)  # warm-up: compile, load
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                kept = select_queries(logits, class_probs, (45, 58), options, mask_format)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
    assert len(kept) >= 3 and len(syncs) <= (3 if mask_format else 2), syncs


def test_heights_past_the_cuda_stats_grid_are_refused_by_cuda_only():
    inputs = limits.inputs_of(torch.zeros(2, 1, 1), (limits.CUDA_MAX_HEIGHT + 1, 1), 0.5)
    assert "262140 rows" in " ".join(limits.cuda_stats_reasons(inputs))
    assert limits.triton_stats_reasons(inputs) == [] and limits.index_reasons(inputs) == []
    assert limits.cuda_stats_reasons(limits.inputs_of(torch.zeros(2, 1, 1), (limits.CUDA_MAX_HEIGHT, 1), 0.5)) == []


@pytest.mark.parametrize("device", device_params("triton"))
def test_triton_stats_grid_takes_any_height(device):
    """The Triton stats launch is a 1-D grid (a 2-D grid's second axis would stop at 65535 row blocks, H =
    262140): its plan at H = 300000 fits a launch; on CUDA it also runs and matches the reference."""
    from mf_kernels.postprocess import triton_kernels

    height = 300_001
    logits = make_mask_logits(2, 3, 1, seed=6).to(device)
    launch, _ = triton_kernels.plan_stats(logits, (height, 1), 0.5, False, want_bits=False)
    assert len(launch.grid) == 1 and launch.grid[0] == 2 * -(-height // triton_kernels.STATS_BLOCK_H) <= 2**31 - 1
    if device == "cuda":
        out = triton_kernels.mask_postprocess_triton(logits, (height, 1), 0.5)
        ref = reference.mask_postprocess_ref(logits.cpu(), (height, 1), 0.5)
        assert torch.equal(out.areas.cpu(), ref.areas) and torch.equal(out.boxes.cpu(), ref.boxes)


@pytest.mark.parametrize("bad, message", [
    (dict(mask_logits=torch.zeros(4, 4)), "3-D tensor"),
    (dict(mask_logits=torch.zeros(2, 4, 4, dtype=torch.int64)), "floating point"),
    (dict(mask_logits=torch.zeros(2, 0, 4)), "empty map"),
    (dict(image_size=(0, 5)), "at least"),
    (dict(scores=torch.zeros(3)), "scores must be"),
    (dict(queries=torch.tensor([0, 2])), "must index"),
    (dict(queries=torch.tensor([1, 1])), "must not repeat"),
    (dict(queries=torch.tensor([0], dtype=torch.int32)), "int64"),
])
def test_bad_inputs_name_the_problem(bad, message):
    args = dict(mask_logits=torch.zeros(2, 4, 4), image_size=(8, 8))
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        mf_kernels.mask_postprocess(args.pop("mask_logits"), args.pop("image_size"), 0.5, **args)


def test_semantic_bad_class_probs():
    with pytest.raises(ValueError, match="class_probs must be"):
        mf_kernels.semantic_label_map(torch.zeros(2, 4, 4), torch.zeros(3, 5), (8, 8))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_empty_query_list(backend, device, require_backend):
    logits = make_mask_logits(3, 5, 5)
    none = torch.zeros(0, dtype=torch.int64)
    out = run_op(backend, device, require_backend, logits, (9, 9), 0.5, queries=none, rle=True, crops=True)
    assert len(out) == 0 and out.rle_counts == [] and out.crops == []
    out = run_op(backend, device, require_backend, logits, (9, 9), scores=torch.rand(3), queries=none, rle=True)
    assert len(out) == 0 and out.rle_counts == []
