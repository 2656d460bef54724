"""Mask post-processing (SPEC §4.3): from stride-4 mask logits straight to what SPEC §3 needs.

Ops (run by the backend `mf_kernels.dispatch` picks; every one has the PyTorch reference `*_ref` here):

    stats = mask_postprocess(mask_logits, image_size, mask_threshold=0.5, *, scores=None, queries=None,
                             strict=False, rle=False, crops=False)          # -> MaskStats
    labels = semantic_label_map(mask_logits, class_probs, image_size)       # -> int64 [H, W]
    strings = encode_rle_strings(stats.rle_counts)                          # -> list[str] (COCO compressed)
    strings = encode_rle_masks(dense_masks)                                 # -> list[str], from [H, W] masks
    pngs = encode_png_crops(stats.crops)                                    # -> list[bytes] (8-bit PNG files)

Semantics (equal to `fai_mf.postprocess` up to float rounding). With p_q = bilinear resize to
image_size = (H, W) (F.interpolate, align_corners=False) of sigmoid(mask_logits[q]) computed in fp32:
- threshold mode (scores=None): mask_q = p_q >= mask_threshold (p_q > mask_threshold when strict, the
  metrics path), for every row of mask_logits, or for the rows `queries` when given. Pass only the kept
  queries' logits: nothing is computed for the others.
- ownership mode (scores [Q] given, predict_all_pixels): owner(y, x) = argmax over ALL Q rows of
  scores[q] * p_q(y, x), ties to the lowest q; mask_q = owner == q, reported for `queries` (int64 [K],
  default all). mask_threshold and strict are unused.
Per reported query (K of them, in the order given): area (int64), inclusive box [x1, y1, x2, y2] (int32,
[-1, -1, -1, -1] for an empty mask), prob_sum = sum of p_q inside mask_q (fp32; prob_sum / area is
use_mask_score's mean), and on request the COCO RLE counts of the full-size mask (column-major, first run
= zeros, possibly 0) and the bool crop of the mask to its inclusive box. No [K, H, W] float mask is
written by the fused backends.

semantic_label_map: argmax_c sum_q class_probs[q, c] * p_q(y, x) (ties to the lowest c). Bilinear
interpolation is linear, so the fused backends compute the [C, h, w] class maps at stride 4 (one small
GEMM) and interpolate C values per output pixel: exact up to rounding and about Q times cheaper.

Backends: reference (these functions), cpp (csrc/postprocess.cpp via `mf_kernels._C`: one column-major
pass per query that also counts the RLE runs), triton (`mf_kernels.mask_postprocess_triton`: stats and
bit masks on the GPU, RLE counts and crops on the host from the bit masks), cuda (csrc/postprocess_cuda.cu,
same split as triton). The encoders have a reference (Python/Pillow) and a cpp implementation.

Outputs of the GPU backends: areas, boxes, prob_sums stay on the device; rle_counts and crops are CPU
tensors (they are built on the host from one copy of the bit masks).

On top of the ops, `detections_from_logits(mask_logits, class_probs, image_size, threshold=,
mask_threshold=, predict_all_pixels=, use_mask_score=, mask_format="png"|"rle"|None) -> KeptQueries` is
SPEC §3 for one image (what `fai_mf.predict` needs: kept queries in order, classes, final scores, boxes,
and `FocoosDet.mask` strings), equal to fai_mf's reference path up to float rounding.

Note: `mf_kernels.mask_postprocess` (the package attribute) is the dispatched op; this module is
`sys.modules["mf_kernels.mask_postprocess"]` (`from mf_kernels.mask_postprocess import X` works).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import dispatch, rle

MAX_INDEX = 2**31 - 1  # the kernels index pixels with int32
LOGIT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------------------------------
# Result type and shapes


@dataclass
class MaskStats:
    """What `mask_postprocess` returns for K reported queries of one image of size (H, W).

    areas: int64 [K] foreground pixels; boxes: int32 [K, 4] inclusive [x1, y1, x2, y2], -1s when empty;
    prob_sums: fp32 [K] sum of the probability inside the mask; rle_counts: K int64 CPU tensors (COCO
    run lengths) or None; crops: K bool CPU tensors [y2 - y1 + 1, x2 - x1 + 1] ([0, 0] when empty) or
    None; image_size: (H, W).
    """

    areas: torch.Tensor
    boxes: torch.Tensor
    prob_sums: torch.Tensor
    rle_counts: list[torch.Tensor] | None
    crops: list[torch.Tensor] | None
    image_size: tuple[int, int]

    def __len__(self) -> int:
        return int(self.areas.numel())

    def mask_scores(self) -> torch.Tensor:
        """fp32 [K] mean probability inside each mask (0 for an empty mask): use_mask_score's factor."""
        return torch.where(self.areas > 0, self.prob_sums / self.areas.clamp(min=1).to(self.prob_sums.dtype),
                           torch.zeros_like(self.prob_sums))


@dataclass(frozen=True)
class PostprocessShape:
    """One image's post-processing: Q queries, K of them kept, C classes, input (H, W), logits at stride 4."""

    name: str
    queries: int
    kept: int
    classes: int
    height: int
    width: int

    @property
    def logits_hw(self) -> tuple[int, int]:
        return -(-self.height // 4), -(-self.width // 4)


# fai-mf-s-coco-ins at 640² (about 20 of 100 queries kept) and fai-mf-m-ade at 640² (semantic, 150 classes).
POSTPROCESS_SHAPES = (
    PostprocessShape("coco-ins 640² (20 of 100 kept)", queries=100, kept=20, classes=80, height=640, width=640),
    PostprocessShape("ade semantic 640²", queries=100, kept=100, classes=150, height=640, width=640),
)


ROW_KINDS = ("random", "empty", "full", "blob")


def make_mask_logits(queries: int, h: int, w: int, dtype: torch.dtype = torch.float32, seed: int = 0,
                     edge_rows: bool = True) -> torch.Tensor:
    """Seeded stride-4 mask logits [Q, h, w] (shared by the tests and the benchmark).

    Every row is an object-like blob: positive inside an ellipse of random centre and radii, negative
    outside, plus noise, so masks are compact with ragged borders, as a trained model's are. With
    `edge_rows`, rows cycle through ROW_KINDS instead: white noise (many tiny components), all -30
    (empty mask), all +30 (full mask), blob.
    """
    gen = torch.Generator().manual_seed(seed)
    ys = torch.arange(h, dtype=torch.float32)[:, None]
    xs = torch.arange(w, dtype=torch.float32)[None, :]
    rows = []
    for q in range(queries):
        kind = ROW_KINDS[q % len(ROW_KINDS)] if edge_rows else "blob"
        noise = torch.randn(h, w, generator=gen)
        if kind == "random":
            rows.append(4 * noise)
        elif kind == "empty":
            rows.append(torch.full((h, w), -30.0))
        elif kind == "full":
            rows.append(torch.full((h, w), 30.0))
        else:
            cy, cx, ry, rx = (torch.rand(4, generator=gen) * torch.tensor([h, w, h / 3, w / 3])).tolist()
            inside = 1 - ((ys - cy) / (ry + 1)) ** 2 - ((xs - cx) / (rx + 1)) ** 2
            rows.append(8 * inside.clamp(min=-1) + noise)
    return torch.stack(rows).to(dtype)


def make_class_probs(queries: int, classes: int, kept: int, seed: int = 0) -> torch.Tensor:
    """Seeded class probabilities [Q, C] (softmax over C + 1 with a no-object column, as FAI-MF's):
    `kept` queries spread over Q have one confident class (max prob about 0.6-0.99), the others are
    no-object (max prob below 0.1)."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(queries, classes + 1, generator=gen)
    logits[:, classes] += 6.0  # no-object wins by default
    confident = torch.linspace(0, queries - 1, kept).round().long() if kept else torch.zeros(0, dtype=torch.long)
    labels = torch.randint(classes, (kept,), generator=gen)
    logits[confident, labels] += 7.0 + 4.0 * torch.rand(kept, generator=gen)
    return logits.softmax(-1)[:, :classes]


# ----------------------------------------------------------------------------------------------------
# Checks


def _size(image_size) -> tuple[int, int]:
    if len(image_size) != 2:
        raise ValueError(f"image_size must be (H, W), got {image_size!r}")
    height, width = (int(s) for s in image_size)
    if height < 1 or width < 1:
        raise ValueError(f"image_size must be at least (1, 1), got {(height, width)}")
    return height, width


def check_inputs(mask_logits: torch.Tensor, image_size, scores: torch.Tensor | None = None,
                 queries: torch.Tensor | None = None, op: str = "mask_postprocess") -> tuple[int, int]:
    """Raise a ValueError naming the problem for inputs no implementation can take; returns (H, W)."""
    if not isinstance(mask_logits, torch.Tensor) or mask_logits.dim() != 3:
        raise ValueError(f"{op}: mask_logits must be a 3-D tensor [Q, h, w], got "
                         f"{tuple(mask_logits.shape) if isinstance(mask_logits, torch.Tensor) else type(mask_logits)}")
    if mask_logits.dtype not in LOGIT_DTYPES:
        raise ValueError(f"{op}: mask_logits must be floating point, got {mask_logits.dtype}")
    if mask_logits.shape[1] < 1 or mask_logits.shape[2] < 1:
        raise ValueError(f"{op}: mask_logits has an empty map: {tuple(mask_logits.shape)}")
    height, width = _size(image_size)
    num = mask_logits.shape[0]
    if scores is not None:
        if num == 0:
            raise ValueError(f"{op}: ownership mode (scores given) needs at least one query")
        if scores.shape != (num,) or not scores.is_floating_point():
            raise ValueError(f"{op}: scores must be a floating tensor [Q={num}], got {tuple(scores.shape)} {scores.dtype}")
        if scores.device != mask_logits.device:
            raise ValueError(f"{op}: scores on {scores.device}, mask_logits on {mask_logits.device}")
    if queries is not None:
        if queries.dim() != 1 or queries.dtype != torch.int64:
            raise ValueError(f"{op}: queries must be an int64 tensor [K], got {tuple(queries.shape)} {queries.dtype}")
        if queries.numel() and (int(queries.min()) < 0 or int(queries.max()) >= num):
            raise ValueError(f"{op}: queries must index the Q={num} rows of mask_logits, got {queries.tolist()}")
        if queries.unique().numel() != queries.numel():
            raise ValueError(f"{op}: queries must not repeat, got {queries.tolist()}")
    return height, width


def check_semantic_inputs(mask_logits: torch.Tensor, class_probs: torch.Tensor, image_size) -> tuple[int, int]:
    op = "semantic_label_map"
    size = check_inputs(mask_logits, image_size, op=op)
    if class_probs.dim() != 2 or class_probs.shape[0] != mask_logits.shape[0] or class_probs.shape[1] < 1:
        raise ValueError(f"{op}: class_probs must be [Q={mask_logits.shape[0]}, C>=1], got {tuple(class_probs.shape)}")
    if not class_probs.is_floating_point() or class_probs.device != mask_logits.device:
        raise ValueError(f"{op}: class_probs must be floating point on {mask_logits.device}, got "
                         f"{class_probs.dtype} on {class_probs.device}")
    return size


# ----------------------------------------------------------------------------------------------------
# References (the single source of truth; they materialise [Q, H, W] probabilities)


def upsample_probs(mask_logits: torch.Tensor, image_size) -> torch.Tensor:
    """fp32 [Q, H, W]: bilinear (align_corners=False) resize of sigmoid(mask_logits) computed in fp32,
    exactly as `FAIMaskFormer.forward` and `fai_mf.postprocess.upsample_mask_probs`."""
    if mask_logits.shape[0] == 0:  # F.interpolate refuses empty inputs
        return mask_logits.new_zeros((0, *image_size), dtype=torch.float32)
    probs = mask_logits.float().sigmoid()[None]
    return F.interpolate(probs, size=tuple(image_size), mode="bilinear", align_corners=False)[0]


def pixel_owners_ref(probs: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """int64 [H, W]: argmax_q scores[q] * probs[q] with ties to the lowest q. probs [Q, H, W], scores [Q]."""
    weighted = scores.float()[:, None, None] * probs
    best = weighted.amax(0, keepdim=True)
    ids = torch.arange(probs.shape[0], device=probs.device)[:, None, None]
    return torch.where(weighted == best, ids, torch.full_like(ids, probs.shape[0])).amin(0)


def boxes_of_masks(masks: torch.Tensor) -> torch.Tensor:
    """int32 [K, 4] inclusive [x1, y1, x2, y2] of bool [K, H, W] masks; -1s for an empty mask."""
    height, width = masks.shape[-2:]
    rows, cols = masks.any(2), masks.any(1)
    ys = torch.arange(height, device=masks.device)
    xs = torch.arange(width, device=masks.device)
    boxes = torch.stack([torch.where(cols, xs, width).amin(1), torch.where(rows, ys, height).amin(1),
                         torch.where(cols, xs, -1).amax(1), torch.where(rows, ys, -1).amax(1)], dim=1)
    boxes[~cols.any(1)] = -1
    return boxes.to(torch.int32)


def rle_counts_ref(mask: torch.Tensor) -> torch.Tensor:
    """COCO run lengths (int64 [N], CPU) of a bool [H, W] mask read column-major, first run the zeros
    (`mf_kernels.rle.rle_counts`, the one reference)."""
    return torch.from_numpy(rle.rle_counts(mask.cpu().numpy()))


def crop_to_box(mask: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """bool [y2 - y1 + 1, x2 - x1 + 1] CPU crop of a [H, W] mask to an inclusive box ([0, 0] when empty)."""
    x1, y1, x2, y2 = (int(v) for v in box)
    if x2 < 0:
        return torch.zeros(0, 0, dtype=torch.bool)
    return mask[y1:y2 + 1, x1:x2 + 1].cpu().contiguous()


def mask_postprocess_ref(mask_logits: torch.Tensor, image_size, mask_threshold: float = 0.5, *,
                         scores: torch.Tensor | None = None, queries: torch.Tensor | None = None,
                         strict: bool = False, rle: bool = False, crops: bool = False) -> MaskStats:
    """Reference of `mask_postprocess` (see the module doc): full-size probabilities, then plain PyTorch."""
    size = check_inputs(mask_logits, image_size, scores, queries)
    if scores is None:
        logits = mask_logits if queries is None else mask_logits[queries]
        probs = upsample_probs(logits, size)
        masks = probs > mask_threshold if strict else probs >= mask_threshold
    else:
        probs = upsample_probs(mask_logits, size)
        ids = torch.arange(mask_logits.shape[0], device=mask_logits.device) if queries is None else queries
        masks = pixel_owners_ref(probs, scores)[None] == ids.to(probs.device)[:, None, None]
        probs = probs[ids]
    boxes = boxes_of_masks(masks)
    return MaskStats(areas=masks.sum((1, 2)), boxes=boxes, prob_sums=(probs * masks).sum((1, 2)),
                     rle_counts=[rle_counts_ref(m) for m in masks] if rle else None,
                     crops=[crop_to_box(m, b) for m, b in zip(masks, boxes)] if crops else None, image_size=size)


def semantic_label_map_ref(mask_logits: torch.Tensor, class_probs: torch.Tensor, image_size) -> torch.Tensor:
    """Reference: int64 [H, W] = argmax_c sum_q class_probs[q, c] * p_q, with full-size p_q (as
    `fai_mf.postprocess.semantic_inference`)."""
    size = check_semantic_inputs(mask_logits, class_probs, image_size)
    probs = upsample_probs(mask_logits, size)
    return torch.einsum("qc,qhw->chw", class_probs.to(probs.dtype), probs).argmax(0)


def compress_rle_ref(counts: torch.Tensor) -> str:
    """COCO compressed RLE string of int64 run lengths (`mf_kernels.rle.compress_rle_counts`)."""
    return rle.compress_rle_counts(counts.cpu().numpy())


def encode_rle_strings_ref(counts: list[torch.Tensor]) -> list[str]:
    """COCO compressed RLE strings of a list of int64 run-length tensors."""
    return [compress_rle_ref(c) for c in counts]


def _as_mask_tensors(masks) -> list[torch.Tensor]:
    """Tensors of a list of bool/uint8 [H, W] tensors or numpy arrays (zero-copy; Fortran order kept)."""
    out = []
    for mask in masks:
        tensor = mask if isinstance(mask, torch.Tensor) else torch.from_numpy(mask)
        if tensor.dim() != 2 or tensor.dtype not in (torch.bool, torch.uint8):
            raise ValueError(f"encode_rle_masks: masks must be bool/uint8 [H, W], got {tuple(tensor.shape)} "
                             f"{tensor.dtype}")
        out.append(tensor.cpu())
    return out


def encode_rle_masks_ref(masks) -> list[str]:
    """COCO compressed RLE strings of dense bool/uint8 [H, W] masks (tensors or numpy arrays)."""
    return [compress_rle_ref(rle_counts_ref(m.bool())) for m in _as_mask_tensors(masks)]


def encode_png_crops_ref(crops: list[torch.Tensor]) -> list[bytes]:
    """8-bit grayscale PNG files (0 / 255) of bool/uint8 [h, w] masks (h, w >= 1), with Pillow."""
    import io

    import numpy as np
    from PIL import Image

    out = []
    for crop in crops:
        if crop.dim() != 2 or crop.numel() == 0:
            raise ValueError(f"encode_png_crops: a PNG needs a non-empty 2-D mask, got {tuple(crop.shape)}")
        buffer = io.BytesIO()
        Image.fromarray(crop.cpu().numpy().astype(np.uint8) * 255, mode="L").save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


# ----------------------------------------------------------------------------------------------------
# cpp backend (csrc/postprocess.cpp, csrc/encode.cpp)


def _extension():
    from . import _cpp_lib

    return _cpp_lib.load()


def mask_postprocess_cpp(mask_logits: torch.Tensor, image_size, mask_threshold: float = 0.5, *,
                         scores: torch.Tensor | None = None, queries: torch.Tensor | None = None,
                         strict: bool = False, rle: bool = False, crops: bool = False) -> MaskStats:
    """`mask_postprocess` on CPU tensors with the C++ extension (one pass per query, parallel)."""
    height, width = check_inputs(mask_logits, image_size, scores, queries)
    ext = _extension()
    if scores is None:
        logits = mask_logits if queries is None else mask_logits[queries]
        out = ext.mask_stats(logits, height, width, float(mask_threshold), bool(strict), bool(rle), bool(crops))
    else:
        ids = torch.arange(mask_logits.shape[0]) if queries is None else queries
        out = ext.owner_stats(mask_logits, scores, ids, height, width, bool(rle), bool(crops))
    areas, boxes, prob_sums, counts, crop_list = out
    return MaskStats(areas, boxes, prob_sums, counts if rle else None, crop_list if crops else None, (height, width))


def semantic_label_map_cpp(mask_logits: torch.Tensor, class_probs: torch.Tensor, image_size) -> torch.Tensor:
    height, width = check_semantic_inputs(mask_logits, class_probs, image_size)
    return _extension().semantic_label_map(mask_logits, class_probs, height, width)


def encode_rle_strings_cpp(counts: list[torch.Tensor]) -> list[str]:
    return [s.decode("ascii") for s in _extension().rle_strings(list(counts))]


def encode_rle_masks_cpp(masks) -> list[str]:
    return [s.decode("ascii") for s in _extension().rle_encode_many(_as_mask_tensors(masks))]


def encode_png_crops_cpp(crops: list[torch.Tensor]) -> list[bytes]:
    for crop in crops:
        if crop.dim() != 2 or crop.numel() == 0:
            raise ValueError(f"encode_png_crops: a PNG needs a non-empty 2-D mask, got {tuple(crop.shape)}")
    return list(_extension().png_encode_many(list(crops)))


# ----------------------------------------------------------------------------------------------------
# Host side of the GPU backends: bit masks [K, H, 4 * ceil(W / 32)] uint8 -> RLE counts and crops


def bits_row_bytes(width: int) -> int:
    """Bytes per row of a bit mask: rows padded to 32-bit words (bit b of byte j = column 8 j + b)."""
    return 4 * math.ceil(width / 32)


def unpack_bits(bits: torch.Tensor, width: int) -> torch.Tensor:
    """bool [K, H, W] of bit masks uint8 [K, H, row_bytes] (little-endian bit order)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    unpacked = (bits[..., None] >> shifts) & 1
    return unpacked.reshape(*bits.shape[:2], -1)[..., :width].bool()


def host_outputs_from_bits(bits: torch.Tensor, boxes: torch.Tensor, width: int, rle: bool,
                           crops: bool) -> tuple[list[torch.Tensor] | None, list[torch.Tensor] | None]:
    """(rle_counts, crops) of device bit masks: one copy to the host, then the extension (or PyTorch)."""
    if not (rle or crops):
        return None, None
    from . import _cpp_lib

    bits_cpu, boxes_cpu = bits.cpu(), boxes.cpu()
    if _cpp_lib.is_available():
        ext = _cpp_lib.load()
        return (ext.rle_counts_from_bits(bits_cpu, boxes_cpu, width) if rle else None,
                ext.crops_from_bits(bits_cpu, boxes_cpu, width) if crops else None)
    masks = unpack_bits(bits_cpu, width)
    return ([rle_counts_ref(m) for m in masks] if rle else None,
            [crop_to_box(m, b) for m, b in zip(masks, boxes_cpu)] if crops else None)


# ----------------------------------------------------------------------------------------------------
# triton and cuda backends


def mask_postprocess_triton(mask_logits: torch.Tensor, image_size, mask_threshold: float = 0.5, *,
                            scores: torch.Tensor | None = None, queries: torch.Tensor | None = None,
                            strict: bool = False, rle: bool = False, crops: bool = False) -> MaskStats:
    from .mask_postprocess_triton import mask_stats_triton

    size = check_inputs(mask_logits, image_size, scores, queries)
    areas, boxes, prob_sums, bits = mask_stats_triton(mask_logits, size, mask_threshold, scores=scores,
                                                      queries=queries, strict=strict, want_bits=rle or crops)
    counts, crop_list = host_outputs_from_bits(bits, boxes, size[1], rle, crops)
    return MaskStats(areas, boxes, prob_sums, counts, crop_list, size)


def semantic_label_map_triton(mask_logits: torch.Tensor, class_probs: torch.Tensor, image_size) -> torch.Tensor:
    from .mask_postprocess_triton import semantic_label_map_triton as run

    return run(mask_logits, class_probs, check_semantic_inputs(mask_logits, class_probs, image_size))


def mask_postprocess_cuda(mask_logits: torch.Tensor, image_size, mask_threshold: float = 0.5, *,
                          scores: torch.Tensor | None = None, queries: torch.Tensor | None = None,
                          strict: bool = False, rle: bool = False, crops: bool = False) -> MaskStats:
    height, width = check_inputs(mask_logits, image_size, scores, queries)
    ext = _extension()
    want_bits = rle or crops
    if scores is None:
        logits = mask_logits if queries is None else mask_logits[queries]
        areas, boxes, prob_sums, bits = ext.mask_stats_cuda(logits, height, width, float(mask_threshold),
                                                            bool(strict), want_bits)
    else:
        ids = torch.arange(mask_logits.shape[0], device=mask_logits.device) if queries is None else queries
        areas, boxes, prob_sums, bits = ext.owner_stats_cuda(mask_logits, scores, ids.to(mask_logits.device),
                                                             height, width, want_bits)
    counts, crop_list = host_outputs_from_bits(bits, boxes, width, rle, crops)
    return MaskStats(areas, boxes, prob_sums, counts, crop_list, (height, width))


def semantic_label_map_cuda(mask_logits: torch.Tensor, class_probs: torch.Tensor, image_size) -> torch.Tensor:
    height, width = check_semantic_inputs(mask_logits, class_probs, image_size)
    return _extension().semantic_label_map_cuda(mask_logits, class_probs, height, width)


# ----------------------------------------------------------------------------------------------------
# Registration


def _inputs_of(mask_logits: torch.Tensor, image_size, mask_threshold: float = 0.5, *, scores=None, queries=None,
               **_: object) -> dispatch.Inputs:
    height, width = check_inputs(mask_logits, image_size, scores, queries)
    return dispatch.make_inputs(mask_logits.device, mask_logits.dtype, pixels=height * width,
                                logits_numel=mask_logits.numel(), ownership=scores is not None)


def _semantic_inputs_of(mask_logits: torch.Tensor, class_probs: torch.Tensor, image_size, **_: object) -> dispatch.Inputs:
    height, width = check_semantic_inputs(mask_logits, class_probs, image_size)
    return dispatch.make_inputs(mask_logits.device, mask_logits.dtype, pixels=height * width,
                                logits_numel=max(mask_logits.numel(), class_probs.numel()), ownership=False)


def _host_inputs_of(items: list[torch.Tensor], **_: object) -> dispatch.Inputs:
    return dispatch.make_inputs(torch.device("cpu"), torch.int64, pixels=0, logits_numel=0, ownership=False)


def _size_check(inputs: dispatch.Inputs) -> list[str]:
    if max(inputs.pixels, inputs.logits_numel) > MAX_INDEX:
        return [f"{max(inputs.pixels, inputs.logits_numel)} elements exceed the kernels' int32 indexing"]
    return []


def _cuda_environment(device_type: str) -> list[str]:
    from . import _cpp_lib

    reasons = dispatch.extension_environment(device_type)
    if not reasons and device_type == "cuda" and not _cpp_lib.has_cuda():
        reasons = ["the extension mf_kernels._C was built without CUDA"]
    return reasons


_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TRITON_DTYPES = (torch.float16, torch.float32)
_TRITON_ENV = dispatch.triton_environment("mf_kernels.mask_postprocess_triton")

mask_postprocess = dispatch.define_op("mask_postprocess", mask_postprocess_ref, _inputs_of)
mask_postprocess.__doc__ = """mask_postprocess(mask_logits [Q, h, w], image_size (H, W), mask_threshold=0.5, *,
scores=None, queries=None, strict=False, rle=False, crops=False) -> MaskStats; see `mf_kernels.mask_postprocess`."""
mask_postprocess.register("cpp", mask_postprocess_cpp, devices=("cpu",), dtypes=_FUSED_DTYPES,
                          environment=dispatch.extension_environment, check=_size_check,
                          description="C++/OpenMP column-major pass per query (stats + RLE counts + crops in one "
                                      "pass), ownership map parallel over columns (csrc/postprocess.cpp)")
mask_postprocess.register("triton", mask_postprocess_triton, devices=("cpu", "cuda"), dtypes=_TRITON_DTYPES,
                          environment=_TRITON_ENV, check=_size_check,
                          description="Triton stats + bit masks per (query, row block), two-stage reduction; RLE "
                                      "counts and crops on the host from the bit masks")
mask_postprocess.register("cuda", mask_postprocess_cuda, devices=("cuda",), dtypes=(torch.float16, torch.bfloat16,
                                                                                   torch.float32),
                          environment=_cuda_environment, check=_size_check,
                          description="CUDA stats + ballot bit masks (csrc/postprocess_cuda.cu); RLE counts and crops "
                                      "on the host from the bit masks")

semantic_label_map = dispatch.define_op("semantic_label_map", semantic_label_map_ref, _semantic_inputs_of)
semantic_label_map.__doc__ = """semantic_label_map(mask_logits [Q, h, w], class_probs [Q, C], image_size (H, W)) ->
int64 [H, W]; see `mf_kernels.mask_postprocess`."""
semantic_label_map.register("cpp", semantic_label_map_cpp, devices=("cpu",), dtypes=_FUSED_DTYPES,
                            environment=dispatch.extension_environment, check=_size_check,
                            description="stride-4 class maps (one GEMM) + C-way bilinear argmax per pixel, OpenMP")
semantic_label_map.register("triton", semantic_label_map_triton, devices=("cpu", "cuda"), dtypes=_TRITON_DTYPES,
                            environment=_TRITON_ENV, check=_size_check,
                            description="stride-4 class maps (torch GEMM) + Triton C-way bilinear argmax")
semantic_label_map.register("cuda", semantic_label_map_cuda, devices=("cuda",),
                            dtypes=(torch.float16, torch.bfloat16, torch.float32), environment=_cuda_environment,
                            check=_size_check, description="stride-4 class maps (cuBLAS) + CUDA C-way bilinear argmax")

_HOST_DTYPES = (torch.int64,)
encode_rle_strings = dispatch.define_op("encode_rle_strings", encode_rle_strings_ref, _host_inputs_of)
encode_rle_strings.__doc__ = """encode_rle_strings(counts: list of int64 run-length tensors) -> list[str]: COCO
compressed RLE strings, byte-identical to pycocotools."""
encode_rle_strings.register("reference", encode_rle_strings_ref, devices=("cpu",), dtypes=_HOST_DTYPES,
                            description="Python loop")
encode_rle_strings.register("cpp", encode_rle_strings_cpp, devices=("cpu",), dtypes=_HOST_DTYPES,
                            environment=dispatch.extension_environment, description="C++ (csrc/encode.cpp)")

encode_rle_masks = dispatch.define_op("encode_rle_masks", encode_rle_masks_ref, _host_inputs_of)
encode_rle_masks.__doc__ = """encode_rle_masks(masks: list of bool/uint8 [H, W] tensors or numpy arrays) -> list[str]:
COCO compressed RLE strings of dense masks, byte-identical to pycocotools.mask.encode."""
encode_rle_masks.register("reference", encode_rle_masks_ref, devices=("cpu",), dtypes=_HOST_DTYPES,
                          description="PyTorch run lengths + Python string loop")
encode_rle_masks.register("cpp", encode_rle_masks_cpp, devices=("cpu",), dtypes=_HOST_DTYPES,
                          environment=dispatch.extension_environment,
                          description="C++ row-major scan (memcmp of equal rows) or direct column-major scan")

encode_png_crops = dispatch.define_op("encode_png_crops", encode_png_crops_ref, _host_inputs_of)
encode_png_crops.__doc__ = """encode_png_crops(crops: list of bool/uint8 [h, w] tensors) -> list[bytes]: 8-bit
grayscale PNG files (0 / 255); base64 them for FocoosDet.mask."""
encode_png_crops.register("reference", encode_png_crops_ref, devices=("cpu",), dtypes=_HOST_DTYPES,
                          description="Pillow")
encode_png_crops.register("cpp", encode_png_crops_cpp, devices=("cpu",), dtypes=_HOST_DTYPES,
                          environment=dispatch.extension_environment,
                          description="C++ PNG writer, zlib when the build found it (csrc/encode.cpp)")

dispatch.register_aot_provider("mask_postprocess", "mf_kernels.mask_postprocess_triton:aot_specs")


# ----------------------------------------------------------------------------------------------------
# SPEC §3 on top of the ops: one image's kept queries with their encoded masks


@dataclass
class KeptQueries:
    """The kept queries of one image, in query order (K of them), as SPEC §3 selects them.

    indices, classes: int64 [K]; scores: fp32 [K] final scores; boxes: int32 [K, 4] inclusive
    [x1, y1, x2, y2]; areas: int64 [K]; masks: K strings (`FocoosDet.mask`: base64 PNG of the box crop,
    or the JSON of a COCO compressed RLE) or None when no mask_format was asked. CPU tensors.
    """

    indices: torch.Tensor
    classes: torch.Tensor
    scores: torch.Tensor
    boxes: torch.Tensor
    areas: torch.Tensor
    masks: list[str] | None
    image_size: tuple[int, int]

    def __len__(self) -> int:
        return int(self.indices.numel())


def detections_from_logits(mask_logits: torch.Tensor, class_probs: torch.Tensor, image_size, *,
                           threshold: float = 0.5, mask_threshold: float = 0.5, predict_all_pixels: bool = False,
                           use_mask_score: bool = False, mask_format: str | None = "png") -> KeptQueries:
    """SPEC §3 for one image, from the stride-4 mask logits [Q, h, w] and class probs [Q, C], through the
    dispatched ops (so `mf_kernels.use(...)` / $MF_KERNELS pick the backend).

    Same result as `fai_mf.postprocess.postprocess_reference` + `fai_mf.formats.encode_mask` up to float
    rounding, without full-size float masks: score, class = max over classes; only queries whose class
    score exceeds `threshold` can survive (the mask score is a mean of probabilities, at most 1), so only
    they are expanded (in ownership mode every query still competes for the pixels); keep area > 1;
    with use_mask_score multiply by the mean prob inside the mask; keep score > threshold (strict).
    """
    import base64
    import json

    size = check_inputs(mask_logits, image_size)
    if mask_format not in (None, "png", "rle"):
        raise ValueError(f"mask_format must be 'png', 'rle' or None, got {mask_format!r}")
    scores, classes = class_probs.float().max(-1)
    candidates = torch.nonzero(scores > threshold).flatten()
    want_rle, want_crops = mask_format == "rle", mask_format == "png"
    if predict_all_pixels:
        stats = mask_postprocess(mask_logits, size, scores=scores, queries=candidates, rle=want_rle, crops=want_crops)
    else:
        stats = mask_postprocess(mask_logits, size, mask_threshold, queries=candidates, rle=want_rle, crops=want_crops)
    # the selection below runs on the host, on K small per-candidate values copied once each
    candidates, classes = candidates.cpu(), classes.cpu()
    areas, boxes = stats.areas.cpu(), stats.boxes.cpu()
    final = scores.cpu()[candidates]
    if use_mask_score:
        final = final * stats.mask_scores().cpu()
    keep = (areas > 1) & (final > threshold)
    kept = keep.nonzero().flatten().tolist()
    masks = None
    if want_rle:
        strings = encode_rle_strings([stats.rle_counts[k] for k in kept])
        masks = [json.dumps({"size": list(size), "counts": s}) for s in strings]
    elif want_crops:
        masks = [base64.b64encode(png).decode("ascii") for png in encode_png_crops([stats.crops[k] for k in kept])]
    indices = candidates[keep]
    return KeptQueries(indices=indices, classes=classes[indices], scores=final[keep], boxes=boxes[keep],
                       areas=areas[keep], masks=masks, image_size=size)


# ----------------------------------------------------------------------------------------------------
# Roofline (python -m mf_kernels.roofline)

# FLOPs per output pixel and query, counted as: bilinear 9 (6 mul, 3 add); sigmoid of the 4 taps 12
# (exp, add, divide each); threshold, area, prob sum and 4 box updates 7. The ownership argmax adds a
# multiply and a compare; the semantic argmax interpolates class maps (no sigmoid) and compares.
FLOPS_BILINEAR, FLOPS_SIGMOID_TAPS, FLOPS_STATS, FLOPS_ARGMAX = 9, 12, 7, 2


def roofline_rows() -> list:
    """Bytes and FLOPs of each post-processing kernel at POSTPROCESS_SHAPES, next to the reference path.

    `bytes` is the minimum traffic (inputs read once, outputs written once); `kernel_bytes` adds what the
    plan moves on top (partials of the two-stage reduction; the owner map read once more for the stats).
    The reference row is the unfused path the fused kernels replace: all Q masks upsampled to fp32 at
    image size (written, read to threshold), the bool masks written and read: >= 9 bytes per pixel-query.
    """
    from .roofline import Row

    rows = []
    coco, ade = POSTPROCESS_SHAPES
    h, w = coco.logits_hw
    pixels = coco.height * coco.width
    bits = coco.kept * coco.height * bits_row_bytes(coco.width)
    outputs = coco.kept * (8 + 16 + 4)
    partials = coco.kept * -(-coco.height // 4) * 24 * 2
    for dtype, size in (("float16", 2), ("float32", 4)):
        logits = coco.kept * h * w * size
        rows.append(Row("mask_postprocess/stats", f"{coco.name}, threshold", dtype, logits + bits + outputs,
                        coco.kept * pixels * (FLOPS_BILINEAR + FLOPS_SIGMOID_TAPS + FLOPS_STATS),
                        logits + bits + outputs + partials))
        all_logits = coco.queries * h * w * size
        owner_maps = pixels * (4 + 4)
        rows.append(Row("mask_postprocess/owner", f"{coco.name}, all {coco.queries} queries", dtype,
                        all_logits + owner_maps,
                        coco.queries * pixels * (FLOPS_BILINEAR + FLOPS_SIGMOID_TAPS + FLOPS_ARGMAX)))
    rows.append(Row("mask_postprocess/stats", f"{coco.name}, ownership", "float32", pixels * 4 + bits + outputs,
                    coco.kept * pixels * FLOPS_STATS, pixels * 8 + bits + outputs + partials))
    rows.append(Row("mask_postprocess/reference", f"{coco.name}, all {coco.queries} upsampled", "float32",
                    coco.queries * (h * w * 4 + pixels * 9),
                    coco.queries * pixels * (FLOPS_BILINEAR + FLOPS_STATS)))
    h, w = ade.logits_hw
    pixels = ade.height * ade.width
    rows.append(Row("semantic_label_map/class_maps", f"{ade.name}, GEMM C={ade.classes}", "float32",
                    ade.queries * h * w * 4 + ade.queries * ade.classes * 4 + ade.classes * h * w * 4,
                    2 * ade.queries * ade.classes * h * w + ade.queries * h * w * 3))
    rows.append(Row("semantic_label_map/argmax", f"{ade.name}, C={ade.classes}", "float32",
                    ade.classes * h * w * 4 + pixels * 8, pixels * ade.classes * (FLOPS_BILINEAR + FLOPS_ARGMAX)))
    rows.append(Row("semantic_label_map/reference", f"{ade.name}, full-size einsum", "float32",
                    ade.queries * pixels * 4 * 2 + ade.classes * pixels * 4 * 2 + pixels * 8,
                    2 * ade.queries * ade.classes * pixels))
    return rows


dispatch.register_roofline_provider("mask_postprocess", "mf_kernels.mask_postprocess:roofline_rows")
