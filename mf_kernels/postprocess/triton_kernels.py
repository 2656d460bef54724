"""The `triton` backend of the post-processing ops: kernels, launchers, the backend entry points, AOT specs.

Imported lazily by the registration (`mf_kernels.postprocess`): it imports triton, and TRITON_INTERPRET is
read when the kernels below are decorated. What the launchers accept is `limits`. Three kernels, none of
which writes a float mask at image size; every grid is 1-D (a 2-D grid's second axis stops at 65535,
i.e. at 262140 rows of 4), its program id split in the order given:

1. `_mask_stats_kernel`, K x row-block programs: one program per (query, block of BLOCK_H output rows),
   walking the row block BLOCK_W columns at a time. Threshold mode computes each pixel's probability
   from the four stride-4 logits around it (PyTorch's bilinear taps, `_linear_taps`, and sigmoid in
   fp32) and thresholds it; ownership mode reads the owner map instead. It accumulates the area, the
   prob sum and the box per program and writes them as partials [K, row blocks] (a deterministic
   two-stage reduction: PyTorch finishes it), and optionally the bit mask of its rows (8 pixels per
   byte, little-endian bit order, rows padded to 32 bits), which is what the host turns into RLE counts
   and crops (RLE on the GPU is not worth it: the counts are a sequential scan of a few hundred
   transitions per mask). Queries vary fastest in the grid, so the K programs of one row block run
   together and share its rows of the owner map through L2 (ownership mode reads it once per query).
2. `_owner_kernel`, row tiles x column tiles (row tiles fastest): predict_all_pixels ownership over all Q
   queries (argmax of score · prob, ties to the lowest q), writing the owner [H, W] int32 and its prob.
3. `_semantic_argmax_kernel`, the same tiles: the argmax over C of the bilinear interpolation of the
   stride-4 class maps [C, h, w] (computed by one torch GEMM before the launch).

At the real shape (640², 20 kept queries, h = w = 160) kernel 1 reads about 20 · 160² logits (cached:
each is read by ~16 output pixels) and writes 20 · 640 · 80 bytes of bits, instead of the reference's
100 · 640² fp32 probabilities written and read back (`python -m mf_kernels.roofline` has the numbers).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import dispatch
from ..launch import TRITON_DTYPE_NAMES, Launch, fp32_ratio, run_launches
from .bits import bits_row_bytes, host_outputs_from_bits
from .limits import TRITON_DTYPES, TRITON_STATS_ROWS, check_inputs, check_semantic_inputs
from .reference import MaskStats, to_device

INTERPRETED = dispatch.interpreter_requested()  # read once, when the kernels below are decorated

STATS_BLOCK_H = TRITON_STATS_ROWS  # rows per program: 640 / 4 = 160 programs per query, 3200 for 20 queries
STATS_BLOCK_W = 128  # columns per step (a multiple of 32: whole 32-bit words of the bit mask)
TILE_H, TILE_W = 8, 64  # output tile of the owner and semantic kernels (512 pixels, 4 per thread of 4 warps)


@triton.jit
def _linear_taps(dst, in_size, out_size, scale):
    """PyTorch's bilinear (align_corners=False) taps of int32 output indices `dst`: (i0, i1, l0, l1).

    scale = (float)in / out as fp32; at equal sizes PyTorch copies (one tap of weight 1)."""
    src = tl.maximum(scale * (dst.to(tl.float32) + 0.5) - 0.5, 0.0)
    i0 = tl.minimum(src.to(tl.int32), in_size - 1)  # src >= 0: truncation is floor
    l1 = tl.minimum(tl.maximum(src - i0.to(tl.float32), 0.0), 1.0)
    same = in_size == out_size
    i0 = tl.where(same, dst, i0)
    l1 = tl.where(same, 0.0, l1)
    i1 = tl.where(i0 < in_size - 1, i0 + 1, i0)
    i1 = tl.where(same, i0, i1)
    return i0, i1, 1.0 - l1, l1


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x.to(tl.float32)))


@triton.jit
def _bilinear_prob(base, y0, y1, ly0, ly1, x0, x1, lx0, lx1, stride_y, stride_x, mask, SIGMOID: tl.constexpr):
    """[BH, BW] bilinear value at rows (y0, y1, ly0, ly1) [BH] and columns (x0, x1, lx0, lx1) [BW] of
    the map at `base`, with sigmoid applied to the four taps first when SIGMOID. Same order of
    operations as PyTorch: l0y * (l0x * a + l1x * b) + l1y * (l0x * c + l1x * d)."""
    r0 = base + y0[:, None] * stride_y
    r1 = base + y1[:, None] * stride_y
    c0 = x0[None, :] * stride_x
    c1 = x1[None, :] * stride_x
    a = tl.load(r0 + c0, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(r0 + c1, mask=mask, other=0.0).to(tl.float32)
    c = tl.load(r1 + c0, mask=mask, other=0.0).to(tl.float32)
    d = tl.load(r1 + c1, mask=mask, other=0.0).to(tl.float32)
    if SIGMOID:
        a, b, c, d = _sigmoid(a), _sigmoid(b), _sigmoid(c), _sigmoid(d)
    top = a * lx0[None, :] + b * lx1[None, :]
    bottom = c * lx0[None, :] + d * lx1[None, :]
    return top * ly0[:, None] + bottom * ly1[:, None]


@triton.jit
def _output_tile(h, w, H, W, scale_h, scale_w, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """This program's [BLOCK_H, BLOCK_W] tile of the output (1-D grid, row tiles fastest): its rows and
    columns, the in-image mask, and the bilinear taps of both (`_linear_taps`)."""
    pid = tl.program_id(0)
    row_tiles = tl.cdiv(H, BLOCK_H)
    ys = (pid % row_tiles) * BLOCK_H + tl.arange(0, BLOCK_H)
    xs = (pid // row_tiles) * BLOCK_W + tl.arange(0, BLOCK_W)
    ok = (ys < H)[:, None] & (xs < W)[None, :]
    y0, y1, ly0, ly1 = _linear_taps(ys, h, H, scale_h)
    x0, x1, lx0, lx1 = _linear_taps(xs, w, W, scale_w)
    return ys, xs, ok, y0, y1, ly0, ly1, x0, x1, lx0, lx1


@triton.jit
def _mask_stats_kernel(
    logits_ptr,  # [K, h, w] fp16/fp32 via (stride_lq, stride_ly, stride_lx); threshold mode only
    owner_ptr,  # [H, W] int32 contiguous: the owner query of each pixel; ownership mode only
    owner_prob_ptr,  # [H, W] fp32 contiguous: the owner's prob; ownership mode only
    queries_ptr,  # [K] int32: the query whose mask row k is; ownership mode only
    part_area_ptr,  # [K, n_blocks] int32: foreground pixels per (query, row block)
    part_sum_ptr,  # [K, n_blocks] fp32: prob sum inside the mask per (query, row block)
    part_box_ptr,  # [K, n_blocks, 4] int32: x1, y1, x2, y2 per (query, row block); (W, H, -1, -1) if empty
    bits_ptr,  # [K, H, row_bytes] uint8: bit mask, bit b of byte j = column 8 j + b; written if WRITE_BITS
    K, h, w, H, W, n_blocks, row_bytes,
    scale_h, scale_w,  # fp32 h / H and w / W
    thr,  # fp32 mask threshold (threshold mode)
    stride_lq, stride_ly, stride_lx,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
    OWNER: tl.constexpr,  # ownership mode: mask = owner == queries[k]
    STRICT: tl.constexpr,  # threshold mode: prob > thr instead of prob >= thr
    WRITE_BITS: tl.constexpr,
):
    pid = tl.program_id(0)  # K * n_blocks programs, queries fastest
    k = pid % K
    block = pid // K
    ys = block * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = ys < H
    y0, y1, ly0, ly1 = _linear_taps(ys, h, H, scale_h)
    base = logits_ptr + k.to(tl.int64) * stride_lq
    query = 0
    if OWNER:
        query = tl.load(queries_ptr + k)
    area = tl.zeros([BLOCK_H, BLOCK_W], dtype=tl.int32)
    total = tl.zeros([BLOCK_H, BLOCK_W], dtype=tl.float32)
    x_lo = tl.full([BLOCK_H, BLOCK_W], W, dtype=tl.int32)
    x_hi = tl.full([BLOCK_H, BLOCK_W], -1, dtype=tl.int32)
    y_lo = tl.full([BLOCK_H, BLOCK_W], H, dtype=tl.int32)
    y_hi = tl.full([BLOCK_H, BLOCK_W], -1, dtype=tl.int32)
    bit_shift = tl.arange(0, 8)
    byte_offs = tl.arange(0, BLOCK_W // 8)
    bits_rows = bits_ptr + k.to(tl.int64) * H * row_bytes + ys[:, None] * row_bytes
    for x_start in range(0, W, BLOCK_W):
        xs = x_start + tl.arange(0, BLOCK_W)
        ok = row_ok[:, None] & (xs < W)[None, :]
        if OWNER:
            pix = ys[:, None] * W + xs[None, :]
            owner = tl.load(owner_ptr + pix, mask=ok, other=-1)
            fg = ok & (owner == query)
            prob = tl.load(owner_prob_ptr + pix, mask=fg, other=0.0)  # only this query's pixels
        else:
            x0, x1, lx0, lx1 = _linear_taps(xs, w, W, scale_w)
            prob = _bilinear_prob(base, y0, y1, ly0, ly1, x0, x1, lx0, lx1, stride_ly, stride_lx, ok, True)
            if STRICT:
                fg = ok & (prob > thr)
            else:
                fg = ok & (prob >= thr)
        area += fg.to(tl.int32)
        total += tl.where(fg, prob, 0.0)
        x_lo = tl.minimum(x_lo, tl.where(fg, xs[None, :], W))
        x_hi = tl.maximum(x_hi, tl.where(fg, xs[None, :], -1))
        y_lo = tl.minimum(y_lo, tl.where(fg, ys[:, None], H))
        y_hi = tl.maximum(y_hi, tl.where(fg, ys[:, None], -1))
        if WRITE_BITS:
            groups = tl.reshape(fg.to(tl.int32), [BLOCK_H, BLOCK_W // 8, 8])
            packed = tl.sum(groups << bit_shift[None, None, :], axis=2)  # distinct bits: the sum is the or
            byte_index = x_start // 8 + byte_offs
            tl.store(bits_rows + byte_index[None, :], packed.to(tl.uint8),
                     mask=row_ok[:, None] & (byte_index < row_bytes)[None, :])
    part = k * n_blocks + block
    tl.store(part_area_ptr + part, tl.sum(tl.sum(area, axis=1), axis=0))
    tl.store(part_sum_ptr + part, tl.sum(tl.sum(total, axis=1), axis=0))
    tl.store(part_box_ptr + part * 4 + 0, tl.min(tl.min(x_lo, axis=1), axis=0))
    tl.store(part_box_ptr + part * 4 + 1, tl.min(tl.min(y_lo, axis=1), axis=0))
    tl.store(part_box_ptr + part * 4 + 2, tl.max(tl.max(x_hi, axis=1), axis=0))
    tl.store(part_box_ptr + part * 4 + 3, tl.max(tl.max(y_hi, axis=1), axis=0))


@triton.jit
def _owner_kernel(
    logits_ptr,  # [Q, h, w] fp16/fp32 via (stride_lq, stride_ly, stride_lx): ALL queries
    scores_ptr,  # [Q] fp32
    owner_ptr,  # [H, W] int32 out: argmax_q scores[q] * p_q, ties to the lowest q (Q if every product is NaN)
    owner_prob_ptr,  # [H, W] fp32 out: p_owner
    Q, h, w, H, W,
    scale_h, scale_w,
    stride_lq, stride_ly, stride_lx,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    ys, xs, ok, y0, y1, ly0, ly1, x0, x1, lx0, lx1 = _output_tile(h, w, H, W, scale_h, scale_w, BLOCK_H, BLOCK_W)
    best = tl.full([BLOCK_H, BLOCK_W], float("-inf"), dtype=tl.float32)
    owner = tl.full([BLOCK_H, BLOCK_W], Q, dtype=tl.int32)
    owner_prob = tl.zeros([BLOCK_H, BLOCK_W], dtype=tl.float32)
    for q in range(0, Q):
        score = tl.load(scores_ptr + q)
        prob = _bilinear_prob(logits_ptr + q * stride_lq, y0, y1, ly0, ly1, x0, x1, lx0, lx1, stride_ly,
                              stride_lx, ok, True)
        value = score * prob
        better = value > best  # strict: ties keep the lowest q; NaN never wins
        best = tl.where(better, value, best)
        owner = tl.where(better, q, owner)
        owner_prob = tl.where(better, prob, owner_prob)
    pix = ys[:, None] * W + xs[None, :]
    tl.store(owner_ptr + pix, owner, mask=ok)
    tl.store(owner_prob_ptr + pix, owner_prob, mask=ok)


@triton.jit
def _semantic_argmax_kernel(
    maps_ptr,  # [C, h, w] fp32 contiguous: sum_q class_probs[q, c] * sigmoid(logits[q]) at stride 4
    labels_ptr,  # [H, W] int64 out
    C, h, w, H, W,
    scale_h, scale_w,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    ys, xs, ok, y0, y1, ly0, ly1, x0, x1, lx0, lx1 = _output_tile(h, w, H, W, scale_h, scale_w, BLOCK_H, BLOCK_W)
    best = tl.full([BLOCK_H, BLOCK_W], float("-inf"), dtype=tl.float32)
    label = tl.zeros([BLOCK_H, BLOCK_W], dtype=tl.int32)
    for c in range(0, C):
        value = _bilinear_prob(maps_ptr + c * h * w, y0, y1, ly0, ly1, x0, x1, lx0, lx1, w, 1, ok, False)
        better = value > best  # ties keep the lowest class, as torch.argmax
        best = tl.where(better, value, best)
        label = tl.where(better, c, label)
    tl.store(labels_ptr + ys[:, None] * W + xs[None, :], label.to(tl.int64), mask=ok)


# ----------------------------------------------------------------------------------------------------
# Launchers


def check_triton_inputs(mask_logits: torch.Tensor, op: str) -> None:
    if mask_logits.dtype not in TRITON_DTYPES:
        raise ValueError(f"{op}[triton]: mask_logits {dispatch.dtype_reason(mask_logits.dtype, TRITON_DTYPES)}")
    if mask_logits.device.type == "cpu" and not INTERPRETED:
        raise ValueError(f"{op}[triton]: CPU tensors need the Triton interpreter (TRITON_INTERPRET=1 before import)")


def plan_stats(logits: torch.Tensor | None, size: tuple[int, int], thr: float, strict: bool, want_bits: bool,
               owner: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
               device: torch.device | None = None) -> tuple[Launch, dict[str, torch.Tensor]]:
    """The stats launch (1-D grid of K x row blocks, any height) and its output buffers. Threshold mode:
    logits [K, h, w]. Ownership mode: owner = (owner map [H, W] int32, owner prob [H, W] fp32, queries [K]
    int32), logits unused."""
    height, width = size
    device = device or (logits.device if logits is not None else owner[0].device)
    if owner is None:
        num, h, w = logits.shape
        strides = logits.stride()
        owner_map = torch.empty(1, dtype=torch.int32, device=device)  # unused placeholders
        owner_prob = torch.empty(1, dtype=torch.float32, device=device)
        queries = torch.empty(1, dtype=torch.int32, device=device)
    else:
        owner_map, owner_prob, queries = owner
        num, h, w, strides = queries.numel(), 1, 1, (0, 0, 0)
        logits = torch.empty(1, 1, 1, dtype=torch.float32, device=device)
    n_blocks = triton.cdiv(height, STATS_BLOCK_H)
    row_bytes = bits_row_bytes(width)
    buffers = {
        "area": torch.empty(num, n_blocks, dtype=torch.int32, device=device),
        "sum": torch.empty(num, n_blocks, dtype=torch.float32, device=device),
        "box": torch.empty(num, n_blocks, 4, dtype=torch.int32, device=device),
        "bits": torch.empty(num if want_bits else 1, height if want_bits else 1, row_bytes if want_bits else 1,
                            dtype=torch.uint8, device=device),
    }
    launch = Launch(_mask_stats_kernel, (num * n_blocks,), dict(
        logits_ptr=logits, owner_ptr=owner_map, owner_prob_ptr=owner_prob, queries_ptr=queries,
        part_area_ptr=buffers["area"], part_sum_ptr=buffers["sum"], part_box_ptr=buffers["box"],
        bits_ptr=buffers["bits"], K=num, h=h, w=w, H=height, W=width, n_blocks=n_blocks, row_bytes=row_bytes,
        scale_h=fp32_ratio(h, height), scale_w=fp32_ratio(w, width), thr=float(thr),
        stride_lq=strides[0], stride_ly=strides[1], stride_lx=strides[2],
        BLOCK_H=STATS_BLOCK_H, BLOCK_W=STATS_BLOCK_W, OWNER=owner is not None, STRICT=bool(strict),
        WRITE_BITS=bool(want_bits)), num_warps=4)
    return launch, buffers


def _tiles(height: int, width: int) -> tuple[int]:
    return (triton.cdiv(height, TILE_H) * triton.cdiv(width, TILE_W),)


def plan_owner(logits: torch.Tensor, scores: torch.Tensor, size: tuple[int, int]) -> tuple[Launch, torch.Tensor, torch.Tensor]:
    height, width = size
    num, h, w = logits.shape
    owner = torch.empty(height, width, dtype=torch.int32, device=logits.device)
    owner_prob = torch.empty(height, width, dtype=torch.float32, device=logits.device)
    launch = Launch(_owner_kernel, _tiles(height, width), dict(
        logits_ptr=logits, scores_ptr=scores.float().contiguous(), owner_ptr=owner, owner_prob_ptr=owner_prob,
        Q=num, h=h, w=w, H=height, W=width, scale_h=fp32_ratio(h, height), scale_w=fp32_ratio(w, width),
        stride_lq=logits.stride(0), stride_ly=logits.stride(1), stride_lx=logits.stride(2),
        BLOCK_H=TILE_H, BLOCK_W=TILE_W), num_warps=4)
    return launch, owner, owner_prob


def plan_semantic(maps: torch.Tensor, size: tuple[int, int]) -> tuple[Launch, torch.Tensor]:
    """maps: [C, h, w] fp32 contiguous class maps."""
    height, width = size
    num_classes, h, w = maps.shape
    labels = torch.empty(height, width, dtype=torch.int64, device=maps.device)
    launch = Launch(_semantic_argmax_kernel, _tiles(height, width), dict(
        maps_ptr=maps, labels_ptr=labels, C=num_classes, h=h, w=w, H=height, W=width,
        scale_h=fp32_ratio(h, height), scale_w=fp32_ratio(w, width), BLOCK_H=TILE_H, BLOCK_W=TILE_W), num_warps=4)
    return launch, labels


def reduce_partials(buffers: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Second stage of the reduction: (areas int64 [K], boxes int32 [K, 4] with -1s when empty, sums fp32 [K])."""
    areas = buffers["area"].sum(1, dtype=torch.int64)
    box = buffers["box"]
    boxes = torch.stack([box[..., 0].amin(1), box[..., 1].amin(1), box[..., 2].amax(1), box[..., 3].amax(1)], dim=1)
    boxes = torch.where((areas > 0)[:, None], boxes, torch.full_like(boxes, -1))
    return areas, boxes, buffers["sum"].sum(1)


def mask_stats_triton(mask_logits: torch.Tensor, size: tuple[int, int], thr: float, *,
                      scores: torch.Tensor | None = None, queries: torch.Tensor | None = None, strict: bool = False,
                      want_bits: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(areas int64 [K], boxes int32 [K, 4], prob_sums fp32 [K], bit masks uint8 [K, H, row_bytes] or None),
    all on mask_logits' device; see `mf_kernels.postprocess.reference` for the modes."""
    check_triton_inputs(mask_logits, "mask_postprocess")
    device = mask_logits.device
    if scores is None:
        logits = mask_logits if queries is None else mask_logits[to_device(queries, device)]
        if logits.shape[0] == 0:
            return _empty_stats(size, device, want_bits)
        launch, buffers = plan_stats(logits, size, thr, strict, want_bits)
        run_launches([launch])
    else:
        ids = torch.arange(mask_logits.shape[0], device=device) if queries is None else to_device(queries, device)
        if ids.numel() == 0:
            return _empty_stats(size, device, want_bits)
        owner_launch, owner, owner_prob = plan_owner(mask_logits, scores, size)
        launch, buffers = plan_stats(None, size, thr, False, want_bits,
                                     owner=(owner, owner_prob, ids.to(torch.int32)), device=device)
        run_launches([owner_launch, launch])
    areas, boxes, sums = reduce_partials(buffers)
    return areas, boxes, sums, buffers["bits"] if want_bits else None


def _empty_stats(size: tuple[int, int], device: torch.device, want_bits: bool):
    bits = torch.zeros(0, size[0], bits_row_bytes(size[1]), dtype=torch.uint8, device=device)
    return (torch.zeros(0, dtype=torch.int64, device=device), torch.zeros(0, 4, dtype=torch.int32, device=device),
            torch.zeros(0, dtype=torch.float32, device=device), bits if want_bits else None)


def class_maps(mask_logits: torch.Tensor, class_probs: torch.Tensor) -> torch.Tensor:
    """[C, h, w] fp32: sum_q class_probs[q, c] * sigmoid(mask_logits[q]) (one GEMM at stride 4)."""
    num, h, w = mask_logits.shape
    probs = mask_logits.float().sigmoid().reshape(num, h * w)
    return (class_probs.float().t() @ probs).reshape(-1, h, w).contiguous()


# ----------------------------------------------------------------------------------------------------
# The backend entry points the registration calls


def mask_postprocess_triton(mask_logits: torch.Tensor, image_size, mask_threshold: float = 0.5, *,
                            scores: torch.Tensor | None = None, queries: torch.Tensor | None = None,
                            strict: bool = False, rle: bool = False, crops: bool = False) -> MaskStats:
    """`mask_postprocess` with the Triton kernels: stats and bit masks on the device, counts and crops on
    the host from one copy of the bits."""
    size = check_inputs(mask_logits, image_size, scores, queries)
    areas, boxes, prob_sums, bits = mask_stats_triton(mask_logits, size, mask_threshold, scores=scores,
                                                      queries=queries, strict=strict, want_bits=rle or crops)
    counts, crop_list = host_outputs_from_bits(bits, boxes, size[1], rle, crops)
    return MaskStats(areas, boxes, prob_sums, counts, crop_list, size)


def semantic_label_map_triton(mask_logits: torch.Tensor, class_probs: torch.Tensor, image_size) -> torch.Tensor:
    """`semantic_label_map`: class maps by one torch GEMM at stride 4, then the Triton C-way bilinear argmax."""
    size = check_semantic_inputs(mask_logits, class_probs, image_size)
    check_triton_inputs(mask_logits, "semantic_label_map")
    launch, labels = plan_semantic(class_maps(mask_logits, class_probs), size)
    run_launches([launch])
    return labels


# ----------------------------------------------------------------------------------------------------
# Ahead-of-time specs


def aot_specs(arch: int) -> list:
    """The launches at the real shapes (`mf_kernels.shapes.POSTPROCESS_SHAPES`): threshold-mode stats
    (fp16/fp32 logits; with bits; without bits, >= and > thresholds), ownership (owner kernel fp16/fp32,
    stats from the owner map with and without bits) and the semantic argmax. The configs do not depend on
    the architecture. Inputs are small CPU tensors: only dtypes, strides and alignment count."""
    from ..aot import AotSpec, spec_from_launch
    from ..shapes import POSTPROCESS_SHAPES

    specs: dict[tuple, AotSpec] = {}

    def add(launch: Launch, dtype: str) -> None:
        spec = spec_from_launch(launch, dtype=dtype)
        specs.setdefault(spec.key(), spec)

    for shape in POSTPROCESS_SHAPES:
        size = (shape.height, shape.width)
        h, w = shape.logits_hw
        for dtype, name in TRITON_DTYPE_NAMES.items():
            kept = torch.empty(shape.kept, h, w, dtype=dtype)
            for strict, bits in ((False, True), (False, False), (True, False)):
                add(plan_stats(kept, size, 0.5, strict, bits)[0], name)
            logits = torch.empty(shape.queries, h, w, dtype=dtype)
            add(plan_owner(logits, torch.empty(shape.queries), size)[0], name)
        owner = (torch.empty(size, dtype=torch.int32), torch.empty(size), torch.empty(shape.kept, dtype=torch.int32))
        for bits in (True, False):
            add(plan_stats(None, size, 0.5, False, bits, owner=owner)[0], "fp32")
        add(plan_semantic(torch.empty(shape.classes, h, w), size)[0], "fp32")
    return list(specs.values())
