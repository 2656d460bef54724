"""Parity of the mask post-processing ops (SPEC §4.3) on every backend that runs here: reference, cpp
(the C++ extension, built once per session) and triton (interpreter), against the reference and against
fai_mf's own post-processing and pycocotools.

Oracle for masks: a fused mask may differ from the reference only at pixels whose reference probability
is within NEAR of the threshold (ownership: whose two best weighted scores are within NEAR of each
other), and then IoU >= 0.999; areas, boxes and RLE counts must match the fused mask itself; prob sums
match the reference within fp32 summation error plus the probability of the differing pixels.
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton (kernels run on the CPU)

import importlib  # noqa: E402
import io  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import mf_kernels  # noqa: E402

# The module (its references and backends); `mf_kernels.mask_postprocess` itself is the dispatched op.
mp = importlib.import_module("mf_kernels.mask_postprocess")

pycocotools_mask = pytest.importorskip("pycocotools.mask")

NEAR = 1e-5
BACKENDS = ("reference", "cpp", "triton")
# (Q, h, w, H, W): odd sizes (not multiples of the 128-column / 4-row blocks, H and W not 4h and 4w),
# Q = 1, exactly 4x, equal sizes (PyTorch's copy rule), a downscale, one-row / one-column maps.
SHAPES = [(5, 13, 17, 50, 67), (1, 7, 5, 27, 19), (4, 16, 16, 64, 64), (2, 10, 12, 10, 12), (2, 10, 12, 5, 7),
          (2, 1, 5, 3, 17), (3, 4, 1, 9, 1)]


def run_op(backend: str, request, *args, **kwargs) -> mp.MaskStats:
    if backend == "cpp":
        request.getfixturevalue("extension")
    return {"reference": mp.mask_postprocess_ref, "cpp": mp.mask_postprocess_cpp,
            "triton": mp.mask_postprocess_triton}[backend](*args, **kwargs)


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


def assert_self_consistent(out: mp.MaskStats) -> list[torch.Tensor]:
    """Masks from the RLE counts and from the crops agree, and areas / boxes are theirs; returns them."""
    masks = []
    for k in range(len(out)):
        mask = mask_of_counts(out.rle_counts[k], out.image_size)
        assert torch.equal(full_mask_of_crop(out.crops[k], out.boxes[k].cpu(), out.image_size), mask), f"query {k}"
        assert int(out.areas[k]) == int(mask.sum()), f"query {k}: area vs its own mask"
        assert torch.equal(mp.boxes_of_masks(mask[None])[0], out.boxes[k].cpu()), f"query {k}: box vs its own mask"
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


def assert_prob_sums_match(out: mp.MaskStats, ref: mp.MaskStats, probs: torch.Tensor, masks: list[torch.Tensor],
                           ref_masks: torch.Tensor) -> None:
    for k in range(len(out)):
        moved = float((probs[k] * (masks[k] ^ ref_masks[k])).sum())
        tol = 1e-6 * float(ref.areas[k]) + 1e-4 + moved
        assert abs(float(out.prob_sums[k]) - float(ref.prob_sums[k])) <= tol, f"query {k} prob sum"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_threshold_mode_parity(backend, dtype, shape, request):
    q, h, w, height, width = shape
    logits = mp.make_mask_logits(q, h, w, dtype, seed=sum(shape))
    size = (height, width)
    for threshold, strict in ((0.5, False), (0.3, True)):
        ref = mp.mask_postprocess_ref(logits, size, threshold, strict=strict, rle=True, crops=True)
        out = run_op(backend, request, logits, size, threshold, strict=strict, rle=True, crops=True)
        probs = mp.upsample_probs(logits, size)
        ref_masks = probs > threshold if strict else probs >= threshold
        near = (probs - threshold).abs() <= NEAR
        masks = assert_self_consistent(out)
        assert_masks_match(masks, ref_masks, near, f"{backend} thr={threshold}")
        assert_prob_sums_match(out, ref, probs, masks, ref_masks)
        for k in range(q):  # no near-threshold pixel in these seeds: everything is equal
            if not (masks[k] ^ ref_masks[k]).any():
                assert int(out.areas[k]) == int(ref.areas[k]) and torch.equal(out.boxes[k].cpu(), ref.boxes[k])


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_bfloat16_logits(backend, request):
    logits = mp.make_mask_logits(4, 9, 11, torch.bfloat16, seed=8)
    ref = mp.mask_postprocess_ref(logits, (35, 41), 0.5, rle=True)
    out = run_op(backend, request, logits, (35, 41), 0.5, rle=True)
    assert torch.equal(out.areas, ref.areas) and torch.equal(out.boxes, ref.boxes)
    assert all(torch.equal(a, b) for a, b in zip(out.rle_counts, ref.rle_counts))


def test_reference_equals_fai_mf_postprocess():
    """The op's reference is fai_mf's reference path: same probabilities, masks, areas, boxes, owners."""
    postprocess = pytest.importorskip("fai_mf.postprocess")
    logits = mp.make_mask_logits(6, 11, 14, seed=3)
    size = (41, 53)
    probs = postprocess.upsample_mask_probs(logits, size)
    assert torch.equal(probs, mp.upsample_probs(logits, size))
    ref = mp.mask_postprocess_ref(logits, size, 0.5)
    masks = probs >= 0.5
    assert torch.equal(ref.areas, masks.sum((1, 2)))
    fai_boxes = postprocess.masks_to_boxes(masks)
    nonempty = ref.areas > 0
    assert torch.equal(ref.boxes[nonempty].long(), fai_boxes[nonempty])
    scores = torch.rand(6, generator=torch.Generator().manual_seed(1))
    assert torch.equal(postprocess.pixel_owners(probs, scores), mp.pixel_owners_ref(probs, scores))
    class_probs = torch.rand(6, 4, generator=torch.Generator().manual_seed(2))
    assert torch.equal(postprocess.semantic_inference(probs, class_probs),
                       mp.semantic_label_map_ref(logits, class_probs, size))


def near_owner_ties(probs: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """bool [H, W]: pixels whose two best weighted scores are within NEAR (relative) of each other."""
    weighted = scores[:, None, None] * probs
    top = weighted.topk(2, dim=0).values if probs.shape[0] > 1 else torch.cat([weighted, weighted - 1])
    return (top[0] - top[1]).abs() <= NEAR * top[0].abs().clamp(min=1e-30)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: "x".join(map(str, s)))
def test_ownership_mode_parity(backend, dtype, shape, request):
    q, h, w, height, width = shape
    size = (height, width)
    logits = mp.make_mask_logits(q, h, w, dtype, seed=7 + sum(shape), edge_rows=False)
    scores = torch.rand(q, generator=torch.Generator().manual_seed(q))
    queries = torch.arange(q - 1, -1, -2)  # every other query, in a non-sorted order: output keeps it
    ref = mp.mask_postprocess_ref(logits, size, scores=scores, queries=queries, rle=True, crops=True)
    out = run_op(backend, request, logits, size, scores=scores, queries=queries, rle=True, crops=True)
    probs = mp.upsample_probs(logits, size)
    owners = mp.pixel_owners_ref(probs, scores)
    ref_masks = owners[None] == queries[:, None, None]
    near = near_owner_ties(probs, scores)[None].expand(len(queries), -1, -1)
    masks = assert_self_consistent(out)
    assert_masks_match(masks, ref_masks, near, f"{backend} ownership")
    assert_prob_sums_match(out, ref, probs[queries], masks, ref_masks)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ownership_ties_go_to_the_lowest_query(backend, request):
    """Queries 1 and 2 are identical (logits and score): query 1 owns their pixels, query 2 none; a query
    with score 0 owns nothing where another has a positive product."""
    base = mp.make_mask_logits(3, 9, 11, seed=5, edge_rows=False)
    logits = torch.stack([base[0], base[1], base[1], base[2]])
    scores = torch.tensor([0.6, 0.8, 0.8, 0.0])
    out = run_op(backend, request, logits, (35, 43), scores=scores, rle=True, crops=True)
    masks = assert_self_consistent(out)
    assert int(out.areas[2]) == 0 and out.boxes[2].tolist() == [-1, -1, -1, -1]
    assert int(out.areas[1]) > 0
    assert int(out.areas[3]) == 0
    assert int(out.areas.sum()) == 35 * 43  # every pixel has exactly one owner
    assert not (masks[0] & masks[1]).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_full_and_one_pixel_masks(backend, request):
    size = (23, 30)
    logits = torch.full((3, 6, 8), -30.0)
    logits[1] = 30.0
    logits[2, 2, 3], logits[2, 2, 4] = 5.0, 3.0  # one peak: a single output pixel is the maximum
    probs = mp.upsample_probs(logits, size)
    peak = probs[2].flatten().topk(2).values
    threshold = float((peak[0] + peak[1]) / 2)  # exactly one pixel passes, with margin on both sides
    out = run_op(backend, request, logits, size, threshold, rle=True, crops=True)
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


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_logits_and_query_subset(backend, request):
    """Non-contiguous logits (a transposed view) and `queries` in threshold mode."""
    logits = mp.make_mask_logits(4, 12, 9, seed=11).transpose(1, 2)  # [4, 9, 12], strided
    queries = torch.tensor([3, 0])
    ref = mp.mask_postprocess_ref(logits.contiguous(), (30, 41), 0.5, queries=queries, rle=True)
    out = run_op(backend, request, logits, (30, 41), 0.5, queries=queries, rle=True)
    assert torch.equal(out.areas.cpu(), ref.areas) and torch.equal(out.boxes.cpu(), ref.boxes)
    assert all(torch.equal(a, b) for a, b in zip(out.rle_counts, ref.rle_counts))
    assert out.crops is None


def near_class_ties(logits: torch.Tensor, class_probs: torch.Tensor, size) -> torch.Tensor:
    probs = mp.upsample_probs(logits, size)
    scores = torch.einsum("qc,qhw->chw", class_probs.float(), probs)
    if scores.shape[0] == 1:
        return torch.zeros(size, dtype=torch.bool)
    top = scores.topk(2, dim=0).values
    return (top[0] - top[1]).abs() <= NEAR * top[0].abs().clamp(min=1.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("classes", [1, 5])
def test_semantic_label_map_parity(backend, dtype, shape, classes, request):
    q, h, w, height, width = shape
    logits = mp.make_mask_logits(q, h, w, dtype, seed=classes + sum(shape))
    class_probs = torch.rand(q, classes, generator=torch.Generator().manual_seed(q)).softmax(-1)
    ref = mp.semantic_label_map_ref(logits, class_probs, (height, width))
    if backend == "cpp":
        request.getfixturevalue("extension")
    fn = {"reference": mp.semantic_label_map_ref, "cpp": mp.semantic_label_map_cpp,
          "triton": mp.semantic_label_map_triton}[backend]
    labels = fn(logits, class_probs, (height, width))
    assert labels.dtype == torch.int64 and labels.shape == (height, width)
    differ = labels != ref
    assert not (differ & ~near_class_ties(logits, class_probs, (height, width))).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_semantic_ties_go_to_the_lowest_class(backend, request):
    logits = mp.make_mask_logits(3, 8, 8, seed=2, edge_rows=False)
    class_probs = torch.tensor([[0.8, 0.1, 0.1], [0.0, 0.5, 0.5], [0.4, 0.3, 0.3]])  # classes 1 and 2 equal
    if backend == "cpp":
        request.getfixturevalue("extension")
    fn = {"reference": mp.semantic_label_map_ref, "cpp": mp.semantic_label_map_cpp,
          "triton": mp.semantic_label_map_triton}[backend]
    labels = fn(logits, class_probs, (29, 31))
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


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_rle_strings_byte_identical_to_pycocotools(backend, request):
    if backend == "cpp":
        request.getfixturevalue("extension")
    encode = mp.encode_rle_strings_cpp if backend == "cpp" else mp.encode_rle_strings_ref
    masks = adversarial_masks()
    logits = mp.make_mask_logits(6, 20, 25, seed=9)
    masks += [m.numpy() for m in mp.upsample_probs(logits, (77, 99)) >= 0.5]
    strings = encode([mp.rle_counts_ref(torch.from_numpy(m)) for m in masks])
    encode_masks = mp.encode_rle_masks_cpp if backend == "cpp" else mp.encode_rle_masks_ref
    from_tensors = encode_masks([torch.from_numpy(m) for m in masks])  # row-major bool
    from_fortran = encode_masks([np.asfortranarray(m.astype(np.uint8)) for m in masks])  # column-major uint8
    for mask, string, dense, fortran in zip(masks, strings, from_tensors, from_fortran):
        expected = pycocotools_mask.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode("ascii")
        assert string == expected == dense == fortran, f"mask {mask.shape}"


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_png_crops_decode_to_the_exact_crop(backend, request):
    from PIL import Image

    if backend == "cpp":
        request.getfixturevalue("extension")
    encode = mp.encode_png_crops_cpp if backend == "cpp" else mp.encode_png_crops_ref
    crops = [torch.from_numpy(m) for m in adversarial_masks() if m.size]
    crops += mp.mask_postprocess_ref(mp.make_mask_logits(5, 10, 10, seed=4), (40, 37), crops=True).crops
    crops = [c for c in crops if c.numel()]
    crops.append(torch.ones(1, 300, dtype=torch.uint8))  # uint8 input, one pixel tall
    for crop, png in zip(crops, encode(crops)):
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        image = Image.open(io.BytesIO(png))
        assert image.mode == "L" and image.size == (crop.shape[1], crop.shape[0])
        pixels = np.asarray(image)
        assert set(np.unique(pixels)) <= {0, 255}
        assert np.array_equal(pixels > 0, crop.bool().numpy())


def test_png_rejects_empty_crop(request):
    request.getfixturevalue("extension")
    for encode in (mp.encode_png_crops_ref, mp.encode_png_crops_cpp):
        with pytest.raises(ValueError, match="non-empty 2-D"):
            encode([torch.zeros(0, 0, dtype=torch.bool)])


# ----------------------------------------------------------------------------------------------------
# SPEC §3 end to end: detections_from_logits vs fai_mf's reference predict path


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["instance", "use_mask_score", "predict_all_pixels"])
@pytest.mark.parametrize("mask_format", ["png", "rle"])
def test_detections_match_fai_mf_reference(backend, mode, mask_format, request):
    postprocess = pytest.importorskip("fai_mf.postprocess")
    predict = pytest.importorskip("fai_mf.predict")
    formats = pytest.importorskip("fai_mf.formats")
    if backend == "cpp":
        request.getfixturevalue("extension")
    size = (45, 58)
    logits = mp.make_mask_logits(12, 12, 15, seed=21, edge_rows=False)
    class_probs = mp.make_class_probs(12, 7, kept=5, seed=21)
    options = postprocess.PostprocessOptions(threshold=0.5, mask_threshold=0.5,
                                             predict_all_pixels=mode == "predict_all_pixels",
                                             use_mask_score=mode == "use_mask_score")
    expected = predict.detections_from_raw(logits, class_probs, size, options, None, mask_format)
    with mf_kernels.use(backend):
        kept = mp.detections_from_logits(logits, class_probs, size, threshold=0.5, mask_threshold=0.5,
                                         predict_all_pixels=options.predict_all_pixels,
                                         use_mask_score=options.use_mask_score, mask_format=mask_format)
    assert len(expected) >= 3, "the seeds should keep several queries"
    assert kept.classes.tolist() == [d.cls_id for d in expected]  # same count, order and classes
    for det, box, score, mask in zip(expected, kept.boxes.tolist(), kept.scores.tolist(), kept.masks):
        assert max(abs(a - b) for a, b in zip(det.bbox, box)) <= 1
        assert abs(det.conf - score) <= 1e-4
        ours = formats.decode_mask(formats.FocoosDet(bbox=box, conf=score, cls_id=0, mask=mask), size)
        theirs = formats.decode_mask(det, size)
        assert (ours & theirs).sum() / (ours | theirs).sum() >= 0.999
        if mask_format == "rle":
            assert mask == det.mask or not np.array_equal(ours, theirs)  # same JSON string when masks agree


# ----------------------------------------------------------------------------------------------------
# API: dispatch, checks


def test_dispatch_runs_the_named_backend(request):
    request.getfixturevalue("extension")
    logits = mp.make_mask_logits(3, 8, 8, seed=1)
    with mf_kernels.use("cpp"):
        assert mf_kernels.mask_postprocess.select(mp._inputs_of(logits, (30, 30))).backend == "cpp"
        out = mf_kernels.mask_postprocess(logits, (30, 30), 0.5, rle=True)
        strings = mf_kernels.encode_rle_strings(out.rle_counts)
    with mf_kernels.use("reference"):
        ref = mf_kernels.mask_postprocess(logits, (30, 30), 0.5, rle=True)
        assert mf_kernels.encode_rle_strings(ref.rle_counts) == strings
    assert torch.equal(out.areas, ref.areas)
    with mf_kernels.use("auto"):  # on CPU, auto prefers the extension
        assert mf_kernels.semantic_label_map.select(
            mp._semantic_inputs_of(logits, torch.rand(3, 2), (30, 30))).backend == "cpp"


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


def test_empty_query_list(request):
    request.getfixturevalue("extension")
    logits = mp.make_mask_logits(3, 5, 5)
    for fn in (mp.mask_postprocess_ref, mp.mask_postprocess_cpp, mp.mask_postprocess_triton):
        out = fn(logits, (9, 9), 0.5, queries=torch.zeros(0, dtype=torch.int64), rle=True, crops=True)
        assert len(out) == 0 and out.rle_counts == [] and out.crops == []
        out = fn(logits, (9, 9), scores=torch.rand(3), queries=torch.zeros(0, dtype=torch.int64), rle=True)
        assert len(out) == 0 and out.rle_counts == []
