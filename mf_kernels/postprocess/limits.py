"""What the mask post-processing ops accept and what each backend can run, in one wording.

Imported by the registration (`mf_kernels.postprocess`) and by every backend module; it imports none of
them, so no two of them import each other.

- `check_inputs` / `check_semantic_inputs` / `check_mask_list` / `check_png_crops`: the contract of every
  backend; a ValueError that names the problem. `queries` is validated on the host: a CPU tensor (what
  `fai_mf`'s selection passes) costs no device synchronisation, a CUDA one costs one copy.
- `inputs_of` / `semantic_inputs_of` / `host_inputs_of`: the dispatcher's view of a call. Every field
  takes a few values (sizes enter only as "over a limit or not"), so the selection cache keeps a handful
  of keys however many image sizes a service sees.
- `index_reasons`, `triton_stats_reasons`, `cuda_stats_reasons`: the refusals of the fused backends.
"""
from __future__ import annotations

import torch

from .. import dispatch

LOGIT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # reference and cpp
TRITON_DTYPES = (torch.float16, torch.float32)
CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HOST_DTYPES = (torch.int64,)  # the host encoders: their "dtype" is a placeholder, they take lists

# Launch grids. The Triton stats kernel runs a 1-D grid of K x row-block programs (any height); the CUDA
# stats kernel has the row blocks on gridDim.y (at most 65535 blocks of 4 rows).
CUDA_STATS_ROWS = 4
MAX_GRID_Y = 65535
CUDA_MAX_HEIGHT = MAX_GRID_Y * CUDA_STATS_ROWS  # 262140
TRITON_STATS_ROWS = 4  # rows per program of the Triton stats kernel


def image_size(size) -> tuple[int, int]:
    if len(size) != 2:
        raise ValueError(f"image_size must be (H, W), got {size!r}")
    height, width = (int(s) for s in size)
    if height < 1 or width < 1:
        raise ValueError(f"image_size must be at least (1, 1), got {(height, width)}")
    return height, width


def _check_queries(queries: torch.Tensor, num: int, op: str) -> None:
    if queries.dim() != 1 or queries.dtype != torch.int64:
        raise ValueError(f"{op}: queries must be an int64 tensor [K], got {tuple(queries.shape)} {queries.dtype}")
    host = queries.cpu()  # no-op for CPU queries; one copy (and sync) for device ones
    if host.numel() and (int(host.min()) < 0 or int(host.max()) >= num):
        raise ValueError(f"{op}: queries must index the Q={num} rows of mask_logits, got {host.tolist()}")
    if host.unique().numel() != host.numel():
        raise ValueError(f"{op}: queries must not repeat, got {host.tolist()}")


def check_inputs(mask_logits: torch.Tensor, size, scores: torch.Tensor | None = None,
                 queries: torch.Tensor | None = None, op: str = "mask_postprocess") -> tuple[int, int]:
    """Raise a ValueError naming the problem for inputs no implementation can take; returns (H, W)."""
    if not isinstance(mask_logits, torch.Tensor) or mask_logits.dim() != 3:
        raise ValueError(f"{op}: mask_logits must be a 3-D tensor [Q, h, w], got "
                         f"{tuple(mask_logits.shape) if isinstance(mask_logits, torch.Tensor) else type(mask_logits)}")
    if mask_logits.dtype not in LOGIT_DTYPES:
        raise ValueError(f"{op}: mask_logits must be floating point, got {mask_logits.dtype}")
    if mask_logits.shape[1] < 1 or mask_logits.shape[2] < 1:
        raise ValueError(f"{op}: mask_logits has an empty map: {tuple(mask_logits.shape)}")
    height, width = image_size(size)
    num = mask_logits.shape[0]
    if scores is not None:
        if num == 0:
            raise ValueError(f"{op}: ownership mode (scores given) needs at least one query")
        if scores.shape != (num,) or not scores.is_floating_point():
            raise ValueError(f"{op}: scores must be a floating tensor [Q={num}], got {tuple(scores.shape)} {scores.dtype}")
        if scores.device != mask_logits.device:
            raise ValueError(f"{op}: scores on {scores.device}, mask_logits on {mask_logits.device}")
    if queries is not None:
        _check_queries(queries, num, op)
    return height, width


def check_semantic_inputs(mask_logits: torch.Tensor, class_probs: torch.Tensor, size) -> tuple[int, int]:
    op = "semantic_label_map"
    checked = check_inputs(mask_logits, size, op=op)
    if class_probs.dim() != 2 or class_probs.shape[0] != mask_logits.shape[0] or class_probs.shape[1] < 1:
        raise ValueError(f"{op}: class_probs must be [Q={mask_logits.shape[0]}, C>=1], got {tuple(class_probs.shape)}")
    if not class_probs.is_floating_point() or class_probs.device != mask_logits.device:
        raise ValueError(f"{op}: class_probs must be floating point on {mask_logits.device}, got "
                         f"{class_probs.dtype} on {class_probs.device}")
    return checked


def check_mask_list(masks) -> list[torch.Tensor]:
    """CPU tensors of a list of bool/uint8 [H, W] tensors or numpy arrays (zero-copy; Fortran order kept)."""
    out = []
    for mask in masks:
        tensor = mask if isinstance(mask, torch.Tensor) else torch.from_numpy(mask)
        if tensor.dim() != 2 or tensor.dtype not in (torch.bool, torch.uint8):
            raise ValueError(f"encode_rle_masks: masks must be bool/uint8 [H, W], got {tuple(tensor.shape)} "
                             f"{tensor.dtype}")
        out.append(tensor.cpu())
    return out


def check_png_crops(crops: list[torch.Tensor]) -> None:
    for crop in crops:
        if crop.dim() != 2 or crop.numel() == 0:
            raise ValueError(f"encode_png_crops: a PNG needs a non-empty 2-D mask, got {tuple(crop.shape)}")


# ----------------------------------------------------------------------------------------------------
# The dispatcher's view of a call, and the refusals


def inputs_of(mask_logits: torch.Tensor, size, mask_threshold: float = 0.5, *, scores=None, queries=None,
              **_: object) -> dispatch.Inputs:
    height, width = check_inputs(mask_logits, size, scores, queries)
    kept = mask_logits.shape[0] if queries is None else queries.numel()
    return dispatch.make_inputs(
        mask_logits.device, mask_logits.dtype, too_large=dispatch.exceeds_int32(height * width, mask_logits.numel()),
        tall_for_cuda=height > CUDA_MAX_HEIGHT,
        too_many_programs=kept * -(-height // TRITON_STATS_ROWS) > dispatch.INT32_LIMIT)


def semantic_inputs_of(mask_logits: torch.Tensor, class_probs: torch.Tensor, size, **_: object) -> dispatch.Inputs:
    height, width = check_semantic_inputs(mask_logits, class_probs, size)
    return dispatch.make_inputs(mask_logits.device, mask_logits.dtype,
                                too_large=dispatch.exceeds_int32(height * width, mask_logits.numel(), class_probs.numel()))


def host_inputs_of(items: list, **_: object) -> dispatch.Inputs:
    return dispatch.make_inputs(torch.device("cpu"), torch.int64)


def index_reasons(inputs: dispatch.Inputs) -> list[str]:
    return [dispatch.INT32_REASON] if inputs.too_large else []


def triton_stats_reasons(inputs: dispatch.Inputs) -> list[str]:
    reasons = index_reasons(inputs)
    if inputs.too_many_programs:
        reasons.append(f"queries x row blocks of {TRITON_STATS_ROWS} exceed the 2**31 - 1 programs of a Triton grid")
    return reasons


def cuda_stats_reasons(inputs: dispatch.Inputs) -> list[str]:
    reasons = index_reasons(inputs)
    if inputs.tall_for_cuda:
        reasons.append(f"images taller than {CUDA_MAX_HEIGHT} rows exceed the CUDA stats grid ({MAX_GRID_Y} blocks of "
                       f"{CUDA_STATS_ROWS} rows)")
    return reasons
