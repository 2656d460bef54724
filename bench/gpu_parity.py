"""Every Triton and CUDA kernel against its reference on one device, with oracles that hold on a GPU.

    python bench/gpu_parity.py [--device cuda] [--driver] [--json FILE]

The parity step of `bench/gpu_check.py` (every case: the model's 640² shapes and the edge shapes, fp32
and fp16) and, with `--driver`, the small driver that calls each kernel once at a small edge shape, with
the same checks (what compute-sanitizer watches; with no GPU it runs the Triton kernels in the
interpreter: set TRITON_INTERPRET=1 and pass --device cpu). Ops are called through `mf_kernels.<op>`
under `mf_kernels.use(backend)`, the truth through their `*_ref` references, on the same device.

Oracles:
- masked_cross_attention: `mf_kernels.testing.parity` (the fp64 reference; fp32 within 1e-4 of the scale,
  fp16 within twice PyTorch's own fp16 error + 1e-3).
- fpn_upsample_add: bit-exact (one add, one rounding, the same source pixel).
- fpn_lateral_upsample_add: error <= 2 x PyTorch's own error in that precision + a per-dtype tolerance
  (sqrt of the reduction length for the atol). TF32 explicitly: "fp32" runs with TF32 off everywhere
  (cuDNN and matmul), so the Triton GEMM takes its IEEE path and the reference is true fp32; "fp32+tf32"
  runs with TF32 on, where the fused op follows cuDNN (`fpn_triton.input_precision`) and PyTorch's own
  error is that of the TF32 conv.
- mask_postprocess / semantic_label_map: exp and sigmoid are approximate on a GPU, so a mask may differ
  from the reference only at pixels within NEAR of a decision (the probability of the threshold; the two
  best weighted scores of an owner; the two best class sums); areas, boxes, RLE counts and crops must be
  those of the fused mask itself; prob sums within fp32 summation error of the reference over that mask.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "src"):  # run from the source tree, installed or not
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import mf_kernels  # noqa: E402
from mf_kernels.shapes import FPN_SHAPES, MASKED_ATTENTION_SHAPES, NUM_QUERIES, RESOLUTION  # noqa: E402
from mf_kernels.testing import masked_attention_inputs, parity  # noqa: E402

FUSED_BACKENDS = ("triton", "cuda")
NEAR = 1e-5  # probability / relative score distance of a decision that GPU rounding may flip
NEAR_SEMANTIC = 1e-4  # class sums come from stride-4 class maps in the fused ops: more rounding to allow
PROB_SUM_RTOL = 2e-5


@dataclass
class Outcome:
    """One checked call: `ok`, and what was measured against what."""

    op: str
    backend: str
    dtype: str
    case: str
    ok: bool = False
    error: float | None = None
    tolerance: float | None = None
    detail: str = ""
    seconds: float = 0.0


@dataclass
class Case:
    """A call of `op` at one shape and precision: `run(backend)` returns (ok, error, tolerance, detail)."""

    op: str
    dtype: str
    name: str
    run: Callable[[str], tuple[bool, float | None, float | None, str]]
    driver: bool = False  # one of the small cases the driver runs


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """TF32 on or off for cuDNN convolutions and cuBLAS matmuls alike."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def fused(backend: str, op: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    with mf_kernels.use(backend), torch.inference_mode():
        return op(*args, **kwargs)


# ----------------------------------------------------------------------------------------------------
# masked_cross_attention

# (batch, queries, keys, dim, heads): keys not a multiple of any block, Q = 1, one key, two heads of 32.
ATTENTION_EDGES = [(2, 5, 37, 64, 2), (1, 1, 1, 32, 1), (1, 7, 300, 256, 8)]


def attention_case(batch: int, queries: int, keys: int, dim: int, heads: int, dtype: torch.dtype, device: str,
                   name: str, driver: bool = False) -> Case:
    def run(backend: str):
        q, k, v, logits = masked_attention_inputs(batch, queries, keys, dim, heads, dtype=dtype, device=device)
        out = fused(backend, mf_kernels.masked_cross_attention, q, k, v, logits, heads)
        result = parity(out, mf_kernels.masked_cross_attention_ref, q, k, v, logits, heads)
        return result.ok, result.max_error, result.tolerance, str(result)

    return Case("masked_cross_attention", dtype_name(dtype), name, run, driver)


# ----------------------------------------------------------------------------------------------------
# FPN

# (B, C, H, W, h, w): odd sizes, PyTorch's fp32 index rule (46 <- 14, 22 <- 26), a 1x1 coarse map, one
# column (W = 1) and one row (H = 1) maps, whose pixel stride is not stride(3).
UPSAMPLE_EDGES = [(1, 20, 25, 37, 13, 19), (2, 3, 46, 22, 14, 26), (1, 5, 6, 9, 1, 1), (1, 17, 7, 5, 3, 4),
                  (1, 6, 9, 1, 5, 1), (1, 6, 1, 9, 1, 5)]
# (B, Cin, Cout, H, W, h, w): K and N not multiples of any block, a W = 1 map.
LATERAL_EDGES = [(1, 24, 20, 25, 37, 13, 19), (2, 40, 70, 9, 11, 5, 6), (1, 16, 8, 46, 22, 14, 26),
                 (1, 16, 8, 9, 1, 5, 1)]
LAYOUTS = ("nchw", "channels_last")


def in_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else t.contiguous()


def upsample_case(shape: tuple, dtype: torch.dtype, device: str, layout: str, name: str, driver: bool = False) -> Case:
    def run(backend: str):
        b, c, height, width, h, w = shape
        g = generator(1)
        lateral = in_layout(torch.randn(b, c, height, width, generator=g).to(device, dtype), layout)
        coarse = in_layout(torch.randn(b, c, h, w, generator=g).to(device, dtype), layout)
        out = fused(backend, mf_kernels.fpn_upsample_add, lateral, coarse)
        expected = mf_kernels.fpn_upsample_add_ref(lateral, coarse)
        error = (out.double() - expected.double()).abs().max().item() if out.numel() else 0.0
        return bool(torch.equal(out, expected)), error, 0.0, "bit-exact"

    return Case("fpn_upsample_add", dtype_name(dtype), f"{name} {layout}", run, driver)


def lateral_tolerance(dtype: torch.dtype, reduction: int) -> tuple[float, float]:
    """(rtol, atol) of the fused GEMM vs the fp64 truth rounded to `dtype`: a few ulps of the output dtype, the
    atol scaled by sqrt of the reduction length (the accumulation order differs)."""
    scale = max(1.0, math.sqrt(reduction) / 4)
    return (2e-3, 2e-3 * scale) if dtype == torch.float16 else (1e-5, 1e-5 * scale)


def lateral_case(shape: tuple, dtype: torch.dtype, device: str, layout: str, name: str, allow_tf32: bool = False,
                 strided_bias: bool = False, driver: bool = False) -> Case:
    def run(backend: str):
        b, cin, cout, height, width, h, w = shape
        g = generator(2)
        x = in_layout(torch.randn(b, cin, height, width, generator=g).to(device, dtype), layout)
        weight = (torch.randn(cout, cin, generator=g) * cin ** -0.5).to(device)
        bias = torch.randn(2 * cout if strided_bias else cout, generator=g).to(device)
        bias = bias[::2] if strided_bias else bias
        coarse = torch.randn(b, cout, h, w, generator=g).to(device, dtype)
        with tf32(allow_tf32):
            out = fused(backend, mf_kernels.fpn_lateral_upsample_add, x, weight, bias, coarse)
            truth = mf_kernels.fpn_lateral_upsample_add_ref(x, weight, bias, coarse, upcast=True).double()
            own = mf_kernels.fpn_lateral_upsample_add_ref(x, weight, bias, coarse).double()
        rtol, atol = lateral_tolerance(dtype, cin)
        own_error = (own - truth).abs().max().item()
        bound = 2 * own_error + atol + rtol * truth.abs().max().item()
        error = (out.double() - truth).abs().max().item()
        ok = out.shape == truth.shape and out.dtype == x.dtype and error <= bound
        return ok, error, bound, f"PyTorch's own error {own_error:.3g}"

    label = dtype_name(dtype) + ("+tf32" if allow_tf32 else "")
    return Case("fpn_lateral_upsample_add", label, f"{name} {layout}" + (" strided bias" if strided_bias else ""), run,
                driver)


# ----------------------------------------------------------------------------------------------------
# Mask post-processing

# (Q, h, w, H, W): odd sizes (not multiples of the blocks, H and W not 4h and 4w), Q = 1, exactly 4x,
# equal sizes, a downscale, one-row and one-column maps.
MASK_EDGES = [(5, 13, 17, 50, 67), (1, 7, 5, 27, 19), (4, 16, 16, 64, 64), (2, 10, 12, 10, 12), (2, 10, 12, 5, 7),
              (2, 1, 5, 3, 17), (3, 4, 1, 9, 1)]
MASK_KINDS = ("blob", "empty", "full", "one-pixel")
CLASSES = {"coco-ins": 80, "ade": 150}


def mask_logits(queries: int, h: int, w: int, dtype: torch.dtype, device: str, seed: int = 3) -> torch.Tensor:
    """Seeded stride-4 mask logits [Q, h, w]: rows cycle through an object-like elliptic blob (positive inside,
    negative outside, with noise), an empty mask, a full mask and a one-cell object."""
    g = generator(seed)
    ys = torch.linspace(0, 1, h)[:, None]
    xs = torch.linspace(0, 1, w)[None, :]
    rows = []
    for q in range(queries):
        kind = MASK_KINDS[q % len(MASK_KINDS)]
        noise = 0.3 * torch.randn(h, w, generator=g)
        if kind == "blob":
            cy, cx, ry, rx = torch.rand(4, generator=g) * torch.tensor([1, 1, .4, .4]) + torch.tensor([0, 0, .1, .1])
            rows.append(6.0 * (1 - ((ys - cy) / ry) ** 2 - ((xs - cx) / rx) ** 2) + noise)
        elif kind == "empty":
            rows.append(-4.0 - noise.abs())
        elif kind == "full":
            rows.append(4.0 + noise.abs())
        else:
            row = -4.0 - noise.abs()
            row[int(torch.randint(h, (1,), generator=g)), int(torch.randint(w, (1,), generator=g))] = 8.0
            rows.append(row)
    return torch.stack(rows).to(device, dtype)


def probabilities(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """SPEC §3's p_q: bilinear (align_corners=False) resize of sigmoid(logits) in fp32, [Q, H, W]."""
    if logits.shape[0] == 0:
        return logits.new_zeros((0, *size), dtype=torch.float32)
    return F.interpolate(logits.float().sigmoid()[None], size=size, mode="bilinear", align_corners=False)[0]


def mask_of_runs(counts: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """bool [H, W] of COCO run lengths (column-major, the first run is zeros)."""
    flat = torch.repeat_interleave(torch.arange(counts.numel()) % 2 == 1, counts.cpu())
    if flat.numel() != size[0] * size[1]:
        raise AssertionError(f"RLE counts cover {flat.numel()} pixels, the image has {size[0] * size[1]}")
    return flat.reshape(size[1], size[0]).t()


def box_of(mask: torch.Tensor) -> list[int]:
    rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
    if not rows.numel():
        return [-1, -1, -1, -1]
    return [int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])]


def check_stats(stats: Any, probs: torch.Tensor, ref_masks: torch.Tensor,
                near: torch.Tensor) -> tuple[bool, float, str]:
    """Fused MaskStats against the reference masks [K, H, W] (bool) and probabilities [K, H, W] (fp32, CPU):
    differences only at `near` pixels; areas, boxes and crops those of the fused mask; prob sums close."""
    problems, worst = [], 0.0
    if len(stats) != ref_masks.shape[0]:
        return False, math.inf, f"{len(stats)} queries reported, expected {ref_masks.shape[0]}"
    areas, boxes, prob_sums = stats.areas.cpu(), stats.boxes.cpu(), stats.prob_sums.cpu()
    for k in range(ref_masks.shape[0]):
        mask = mask_of_runs(stats.rle_counts[k], stats.image_size)
        far = (mask != ref_masks[k]) & ~near[k]
        if far.any():
            problems.append(f"query {k}: {int(far.sum())} pixels differ away from any rounding tie")
        if int(areas[k]) != int(mask.sum()) or boxes[k].tolist() != box_of(mask):
            problems.append(f"query {k}: area {int(areas[k])} / box {boxes[k].tolist()} are not those of its mask")
        x1, y1, x2, y2 = box_of(mask)
        crop = mask[y1:y2 + 1, x1:x2 + 1] if x2 >= 0 else torch.zeros(0, 0, dtype=torch.bool)
        if not torch.equal(stats.crops[k].cpu(), crop):
            problems.append(f"query {k}: the crop is not the mask inside its box")
        expected = probs[k].double()[mask].sum().item()
        error = abs(float(prob_sums[k]) - expected)
        tolerance = PROB_SUM_RTOL * max(1, int(mask.sum())) + 1e-3
        worst = max(worst, error / tolerance)
        if error > tolerance:
            problems.append(f"query {k}: prob sum {float(prob_sums[k]):.6g} vs {expected:.6g}")
    return not problems, worst, "; ".join(problems[:3]) or f"{ref_masks.shape[0]} masks"


def threshold_case(shape: tuple, dtype: torch.dtype, device: str, name: str, queries: list[int] | None = None,
                   strict: bool = False, driver: bool = False) -> Case:
    def run(backend: str):
        q, h, w, height, width = shape
        logits = mask_logits(q, h, w, dtype, device)
        ids = None if queries is None else torch.tensor(queries, dtype=torch.int64, device=device)
        stats = fused(backend, mf_kernels.mask_postprocess, logits, (height, width), 0.5, queries=ids, strict=strict,
                      rle=True, crops=True)
        probs = probabilities(logits if ids is None else logits[ids], (height, width)).cpu()
        ref_masks = probs > 0.5 if strict else probs >= 0.5
        ok, worst, detail = check_stats(stats, probs, ref_masks, (probs - 0.5).abs() <= NEAR)
        return ok, worst, 1.0, detail

    return Case("mask_postprocess", dtype_name(dtype), name, run, driver)


def ownership_case(shape: tuple, dtype: torch.dtype, device: str, name: str, queries: list[int] | None = None,
                   driver: bool = False) -> Case:
    def run(backend: str):
        q, h, w, height, width = shape
        logits = mask_logits(q, h, w, dtype, device, seed=4)
        scores = torch.rand(q, generator=generator(5)).to(device)
        ids = torch.arange(q) if queries is None else torch.tensor(queries, dtype=torch.int64)
        stats = fused(backend, mf_kernels.mask_postprocess, logits, (height, width), scores=scores,
                      queries=ids.to(device), rle=True, crops=True)
        probs = probabilities(logits, (height, width))
        weighted = scores[:, None, None] * probs
        owner = weighted.argmax(0).cpu()  # the first of equal maxima: ties to the lowest query, as the reference
        near = torch.zeros(height, width, dtype=torch.bool)
        if q > 1:  # an owner whose best two weighted scores are within NEAR of each other may flip
            top = weighted.topk(2, dim=0).values
            near = ((top[0] - top[1]).abs() <= NEAR * top[0].abs().clamp(min=1e-30)).cpu()
        ref_masks = owner[None] == ids[:, None, None]
        ok, worst, detail = check_stats(stats, probs[ids.to(device)].cpu(), ref_masks, near[None].expand_as(ref_masks))
        return ok, worst, 1.0, detail

    return Case("mask_postprocess", dtype_name(dtype), name + " ownership", run, driver)


def semantic_case(shape: tuple, classes: int, dtype: torch.dtype, device: str, name: str, driver: bool = False) -> Case:
    def run(backend: str):
        q, h, w, height, width = shape
        logits = mask_logits(q, h, w, dtype, device, seed=6)
        class_probs = torch.rand(q, classes, generator=generator(7)).softmax(-1).to(device)
        labels = fused(backend, mf_kernels.semantic_label_map, logits, class_probs, (height, width)).cpu()
        with tf32(False):
            sums = torch.einsum("qc,qhw->chw", class_probs.float(), probabilities(logits, (height, width)))
        near = torch.zeros(height, width, dtype=torch.bool)
        if classes > 1:  # a pixel whose best two class sums are within NEAR_SEMANTIC may flip
            top = sums.topk(2, dim=0).values
            near = ((top[0] - top[1]).abs() <= NEAR_SEMANTIC * top[0].abs().clamp(min=1.0)).cpu()
        far = (labels != sums.argmax(0).cpu()) & ~near
        return not bool(far.any()), float(far.sum()), 0.0, f"{int(near.sum())} near-tie pixels"

    return Case("semantic_label_map", dtype_name(dtype), name, run, driver)


# ----------------------------------------------------------------------------------------------------
# The cases


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.float32: "fp32"}[dtype]


def cases(device: str) -> list[Case]:
    """Every case: edge shapes (the first of each kind is a driver case) and the model's 640² shapes."""
    out: list[Case] = []
    for dtype in (torch.float32, torch.float16):
        for i, shape in enumerate(ATTENTION_EDGES):
            out.append(attention_case(*shape, dtype, device, f"edge {shape}", driver=i == 0))
        for s in MASKED_ATTENTION_SHAPES:
            out.append(attention_case(s.batch, s.queries, s.hw, s.dim, s.heads, dtype, device, s.name))
        for i, shape in enumerate(UPSAMPLE_EDGES):
            for layout in LAYOUTS:
                out.append(upsample_case(shape, dtype, device, layout, f"edge {shape}",
                                         driver=i in (3, 4) and layout == "nchw"))
        for s in FPN_SHAPES:
            shape = (s.batch, s.cout, s.height, s.width, s.coarse_height, s.coarse_width)
            out.append(upsample_case(shape, dtype, device, "nchw", s.name))
        precisions = (False, True) if dtype == torch.float32 else (False,)
        for allow in precisions:
            for i, shape in enumerate(LATERAL_EDGES):
                for layout in LAYOUTS:
                    out.append(lateral_case(shape, dtype, device, layout, f"edge {shape}", allow,
                                            driver=not allow and layout == "nchw" and i in (1, 3)))
            out.append(lateral_case(LATERAL_EDGES[1], dtype, device, "nchw", f"edge {LATERAL_EDGES[1]}", allow,
                                    strided_bias=True, driver=not allow))
            for s in FPN_SHAPES:
                shape = (s.batch, s.cin, s.cout, s.height, s.width, s.coarse_height, s.coarse_width)
                out.append(lateral_case(shape, dtype, device, "nchw", s.name, allow))
        for i, shape in enumerate(MASK_EDGES):  # the driver's: one-row maps, 17 columns (not a multiple of 32)
            out.append(threshold_case(shape, dtype, device, f"edge {shape}", driver=i == 5))
            out.append(ownership_case(shape, dtype, device, f"edge {shape}", driver=i == 5))
            out.append(semantic_case(shape, 4, dtype, device, f"edge {shape} C=4", driver=i == 5))
        out.append(threshold_case(MASK_EDGES[0], dtype, device, f"edge {MASK_EDGES[0]} queries 4,0,2 strict",
                                  queries=[4, 0, 2], strict=True))
        out.append(threshold_case(MASK_EDGES[0], dtype, device, f"edge {MASK_EDGES[0]} no query", queries=[]))
        side = -(-RESOLUTION // 4)
        model = (NUM_QUERIES, side, side, RESOLUTION, RESOLUTION)
        out.append(threshold_case(model, dtype, device, f"{RESOLUTION}² coco-ins, 20 of {NUM_QUERIES} kept",
                                  queries=list(range(0, NUM_QUERIES, 5))))
        out.append(ownership_case(model, dtype, device, f"{RESOLUTION}² all-pixels, 20 of {NUM_QUERIES} reported",
                                  queries=list(range(0, NUM_QUERIES, 5))))
        out.append(semantic_case(model, CLASSES["ade"], dtype, device, f"{RESOLUTION}² ade C={CLASSES['ade']}"))
    return out


def backends_for(op_name: str, device: str) -> tuple[list[str], dict[str, str]]:
    """(fused backends of `op_name` that can run on `device`, {backend: why not} for the others)."""
    op = mf_kernels.dispatch.OPS[op_name]
    usable, refused = [], {}
    for backend in FUSED_BACKENDS:
        impl = op.implementations.get(backend)
        if impl is None:
            continue
        reasons = impl.availability_reasons(torch.device(device).type)
        if reasons:
            refused[backend] = "; ".join(reasons)
        else:
            usable.append(backend)
    return usable, refused


def run_cases(selected: list[Case], device: str, record: Callable[[list[Outcome], dict], None] | None = None,
              ) -> tuple[list[Outcome], dict[str, dict[str, str]]]:
    """Run every case on every usable backend; `record(outcomes, unavailable)` after each (partial results)."""
    outcomes: list[Outcome] = []
    unavailable: dict[str, dict[str, str]] = {}
    for case in selected:
        usable, refused = backends_for(case.op, device)
        if refused:
            unavailable[case.op] = refused
        for backend in usable:
            outcome = Outcome(case.op, backend, case.dtype, case.name)
            start = time.perf_counter()
            try:
                outcome.ok, outcome.error, outcome.tolerance, outcome.detail = case.run(backend)
                if device == "cuda":
                    torch.cuda.synchronize()
            except Exception as exc:  # a crash is a failed case with its reason; the other cases go on
                outcome.ok, outcome.detail = False, f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                traceback.print_exc()
            outcome.seconds = time.perf_counter() - start
            outcomes.append(outcome)
            print(f"{'ok  ' if outcome.ok else 'FAIL'} {case.op}[{backend}] {case.dtype} {case.name}: {outcome.detail}",
                  flush=True)
            if record:
                record(outcomes, unavailable)
    return outcomes, unavailable


def report(outcomes: list[Outcome], unavailable: dict[str, dict[str, str]]) -> dict[str, Any]:
    failed = [o for o in outcomes if not o.ok]
    return {"cases": len(outcomes), "failed": len(failed), "failures": [asdict(o) for o in failed],
            "unavailable": unavailable, "outcomes": [asdict(o) for o in outcomes]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/gpu_parity.py", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--driver", action="store_true", help="only the small driver cases (one call per kernel)")
    parser.add_argument("--json", type=Path, help="write the outcomes here")
    args = parser.parse_args(argv)
    selected = [c for c in cases(args.device) if c.driver or not args.driver]

    def record(outcomes: list[Outcome], unavailable: dict) -> None:
        if args.json:
            args.json.write_text(json.dumps(report(outcomes, unavailable), indent=1))

    outcomes, unavailable = run_cases(selected, args.device, record)
    record(outcomes, unavailable)
    result = report(outcomes, unavailable)
    print(f"{result['cases']} checks on {args.device}, {result['failed']} failed"
          + "".join(f"; {op}[{b}] unavailable: {why}" for op, r in unavailable.items() for b, why in r.items()))
    return 1 if result["failed"] or not outcomes else 0


if __name__ == "__main__":
    sys.exit(main())
