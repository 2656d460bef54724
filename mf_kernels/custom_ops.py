"""The fused ops as PyTorch custom ops: `torch.ops.mf_kernels.<op>` (torch.compile, torch.export, CUDA graphs).

    masked_cross_attention(Tensor q, Tensor k, Tensor v, Tensor mask_logits, int num_heads) -> Tensor
    fpn_upsample_add(Tensor lateral, Tensor coarse) -> Tensor
    fpn_lateral_upsample_add(Tensor x, Tensor weight, Tensor bias, Tensor coarse) -> Tensor
    mask_postprocess(Tensor mask_logits, SymInt height, SymInt width, float mask_threshold, bool strict,
                     Tensor? scores, Tensor? queries) -> (Tensor areas, Tensor boxes, Tensor prob_sums)
    semantic_label_map(Tensor mask_logits, Tensor class_probs, SymInt height, SymInt width) -> Tensor

Each op has a fake (meta) implementation with the exact output shapes, dtypes and strides (so Inductor
and torch.export plan around it without running it), one CPU and one CUDA kernel, and an autograd
formula where the op has a backward (masked attention, both FPN ops). The kernels call the dispatched
Python op (`mf_kernels.<op>`, `dispatch.Op.eager`): `kernels=` / `mf_kernels.use` / $MF_KERNELS / auto
pick the backend at run time, from the dispatcher's cached selection, exactly as in eager mode.

How the model reaches them: `dispatch.Op.__call__` routes a call made while torch.compile or
torch.export traces (`torch.compiler.is_compiling()`) to `Op.traced`, set here. So Dynamo records one
opaque node per call and never traces the backend selection or a backend (no graph break, no Python at
trace time per call), while eager calls skip the custom-op layer entirely. The "reference" choice is
not routed: it traces the plain PyTorch reference into aten ops, which is what the reference
torch.export and the ONNX export need.

Not registered: the host encoders (`encode_rle_strings`, `encode_rle_masks`, `encode_png_crops`) return
str / bytes, and `mask_postprocess`'s RLE counts and crops are lists of data-dependent size built on the
host. A traced `mask_postprocess(..., rle=True or crops=True)` runs the eager op outside the graph (one
graph break; `torch.compiler.disable`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import dispatch
from .fpn_limits import check_inputs as check_fpn_inputs
from .fpn_limits import check_lateral_inputs, is_channels_last, output_like
from .masked_attention_limits import check_inputs as check_attention_inputs
from .postprocess.limits import check_inputs as check_postprocess_inputs
from .postprocess.limits import check_semantic_inputs
from .postprocess.reference import MaskStats

NAMESPACE = "mf_kernels"
DEVICE_TYPES = ("cpu", "cuda")


def _register_kernels(op, fn) -> None:
    """The same dispatching kernel for every device type (the Python dispatcher picks the backend)."""
    for device_type in DEVICE_TYPES:
        op.register_kernel(device_type)(fn)


def _like_fake(out: Tensor, fake_format: torch.memory_format) -> Tensor:
    """`out` in the memory format the fake implementation promised (a no-op when it already is): compiled
    code indexes custom-op outputs with the fake's strides."""
    return out if out.is_contiguous(memory_format=fake_format) else out.contiguous(memory_format=fake_format)


def _format_of(t: Tensor) -> torch.memory_format:
    return torch.channels_last if is_channels_last(t) else torch.contiguous_format


# ----------------------------------------------------------------------------------------------------
# masked_cross_attention


@torch.library.custom_op(f"{NAMESPACE}::masked_cross_attention", mutates_args=())
def masked_cross_attention(q: Tensor, k: Tensor, v: Tensor, mask_logits: Tensor, num_heads: int) -> Tensor:
    """[B, Q, D] masked cross-attention (see `mf_kernels.masked_attention`), contiguous."""
    raise NotImplementedError("replaced by the device kernels registered below")


def _attention_kernel(q: Tensor, k: Tensor, v: Tensor, mask_logits: Tensor, num_heads: int) -> Tensor:
    with torch.no_grad():  # the custom op's autograd formula below owns the backward
        out = dispatch.OPS["masked_cross_attention"].eager(q, k, v, mask_logits, num_heads)
    return _like_fake(out, torch.contiguous_format)


_register_kernels(masked_cross_attention, _attention_kernel)


@masked_cross_attention.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, mask_logits: Tensor, num_heads: int) -> Tensor:
    check_attention_inputs(q, k, v, mask_logits, num_heads)
    return q.new_empty(q.shape)


def _attention_setup(ctx, inputs, output) -> None:
    q, k, v, mask_logits, num_heads = inputs
    ctx.num_heads = num_heads
    ctx.save_for_backward(q, k, v, mask_logits)


def _attention_backward(ctx, grad: Tensor):
    """Recompute the probabilities P (fp32) and back-propagate O = P V, P = softmax(masked(Q K^T / sqrt(d))):
    dV = P^T dO, dS = P * (dO V^T - rowsum(dO V^T * P)), dQ = dS K / sqrt(d), dK = dS^T Q / sqrt(d).
    The mask logits only select keys: no gradient."""
    q, k, v, mask_logits = ctx.saved_tensors
    b, nq, d = q.shape
    heads = ctx.num_heads
    hd = d // heads
    scale = hd ** -0.5

    def split(t: Tensor) -> Tensor:
        return t.float().reshape(b, t.shape[1], heads, hd).transpose(1, 2)

    def merge(t: Tensor, like: Tensor) -> Tensor:
        return t.transpose(1, 2).reshape(b, t.shape[2], d).to(like.dtype)

    qh, kh, vh, g = split(q), split(k), split(v), split(grad)
    blocked = mask_logits < 0
    blocked = blocked & ~blocked.all(dim=-1, keepdim=True)
    probs = torch.softmax((qh * scale) @ kh.transpose(-1, -2) + torch.where(blocked[:, None], float("-inf"), 0.0), -1)
    grad_probs = g @ vh.transpose(-1, -2)
    grad_scores = probs * (grad_probs - (grad_probs * probs).sum(-1, keepdim=True))
    grad_q = merge(grad_scores @ kh * scale, q) if ctx.needs_input_grad[0] else None
    grad_k = merge(grad_scores.transpose(-1, -2) @ qh * scale, k) if ctx.needs_input_grad[1] else None
    grad_v = merge(probs.transpose(-1, -2) @ g, v) if ctx.needs_input_grad[2] else None
    return grad_q, grad_k, grad_v, None, None


masked_cross_attention.register_autograd(_attention_backward, setup_context=_attention_setup)


# ----------------------------------------------------------------------------------------------------
# fpn_upsample_add, fpn_lateral_upsample_add


@torch.library.custom_op(f"{NAMESPACE}::fpn_upsample_add", mutates_args=())
def fpn_upsample_add(lateral: Tensor, coarse: Tensor) -> Tensor:
    """lateral [B, C, H, W] + nearest_upsample(coarse [B, C, h, w]), in lateral's memory format."""
    raise NotImplementedError("replaced by the device kernels registered below")


def _upsample_add_kernel(lateral: Tensor, coarse: Tensor) -> Tensor:
    with torch.no_grad():
        out = dispatch.OPS["fpn_upsample_add"].eager(lateral, coarse)
    return _like_fake(out, _format_of(lateral))


_register_kernels(fpn_upsample_add, _upsample_add_kernel)


@fpn_upsample_add.register_fake
def _(lateral: Tensor, coarse: Tensor) -> Tensor:
    check_fpn_inputs(lateral, coarse)
    return output_like(lateral)


def _upsample_backward(grad: Tensor, coarse_shape) -> Tensor:
    """Nearest-upsample backward: each coarse pixel gets the sum of the output pixels that read it."""
    return torch.ops.aten.upsample_nearest2d_backward(grad, list(grad.shape[-2:]), list(coarse_shape))


def _upsample_setup(ctx, inputs, output) -> None:
    ctx.coarse_shape = inputs[1].shape


def _upsample_add_backward(ctx, grad: Tensor):
    grad_coarse = _upsample_backward(grad, ctx.coarse_shape) if ctx.needs_input_grad[1] else None
    return grad if ctx.needs_input_grad[0] else None, grad_coarse


fpn_upsample_add.register_autograd(_upsample_add_backward, setup_context=_upsample_setup)


@torch.library.custom_op(f"{NAMESPACE}::fpn_lateral_upsample_add", mutates_args=())
def fpn_lateral_upsample_add(x: Tensor, weight: Tensor, bias: Tensor, coarse: Tensor) -> Tensor:
    """conv1x1(x [B, Cin, H, W], weight [Cout, Cin]) + bias + nearest_upsample(coarse), in x's memory format."""
    raise NotImplementedError("replaced by the device kernels registered below")


def _lateral_kernel(x: Tensor, weight: Tensor, bias: Tensor, coarse: Tensor) -> Tensor:
    with torch.no_grad():
        out = dispatch.OPS["fpn_lateral_upsample_add"].eager(x, weight, bias, coarse)
    return _like_fake(out, _format_of(x))


_register_kernels(fpn_lateral_upsample_add, _lateral_kernel)


@fpn_lateral_upsample_add.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor, coarse: Tensor) -> Tensor:
    check_lateral_inputs(x, weight, bias, coarse)
    return output_like(x, weight.shape[0])


def _lateral_setup(ctx, inputs, output) -> None:
    x, weight, bias, coarse = inputs
    ctx.coarse_shape = coarse.shape
    ctx.save_for_backward(x, weight)


def _lateral_backward(ctx, grad: Tensor):
    """The forward computes in x's dtype (weight and bias cast to it), so the gradients do too and are
    cast back to each input's dtype."""
    x, weight = ctx.saved_tensors
    need_x, need_w, need_b, need_coarse = ctx.needs_input_grad
    grad_x = torch.einsum("bohw,oi->bihw", grad, weight.to(grad.dtype)) if need_x else None
    grad_w = torch.einsum("bohw,bihw->oi", grad, x).to(weight.dtype) if need_w else None
    grad_b = grad.sum((0, 2, 3)).to(weight.dtype) if need_b else None
    grad_coarse = _upsample_backward(grad, ctx.coarse_shape) if need_coarse else None
    return grad_x, grad_w, grad_b, grad_coarse


fpn_lateral_upsample_add.register_autograd(_lateral_backward, setup_context=_lateral_setup)


# ----------------------------------------------------------------------------------------------------
# mask_postprocess (the tensor outputs), semantic_label_map


@torch.library.custom_op(f"{NAMESPACE}::mask_postprocess", mutates_args=())
def mask_postprocess(mask_logits: Tensor, height: int, width: int, mask_threshold: float, strict: bool,
                     scores: Optional[Tensor], queries: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """(areas int64 [K], boxes int32 [K, 4], prob_sums fp32 [K]) of `mf_kernels.mask_postprocess`, on
    mask_logits' device; K = len(queries), or Q when queries is None."""
    raise NotImplementedError("replaced by the device kernels registered below")


def _postprocess_kernel(mask_logits: Tensor, height: int, width: int, mask_threshold: float, strict: bool,
                        scores: Optional[Tensor], queries: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    stats = dispatch.OPS["mask_postprocess"].eager(mask_logits, (height, width), mask_threshold, scores=scores,
                                                   queries=queries, strict=strict)
    device = mask_logits.device  # every backend leaves these on the logits' device; the fake says so
    return (stats.areas.to(device).contiguous(), stats.boxes.to(device).contiguous(),
            stats.prob_sums.to(device).contiguous())


_register_kernels(mask_postprocess, _postprocess_kernel)


@mask_postprocess.register_fake
def _(mask_logits: Tensor, height: int, width: int, mask_threshold: float, strict: bool,
      scores: Optional[Tensor], queries: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    check_postprocess_inputs(mask_logits, (height, width), scores)  # query values are checked by the kernel
    if queries is not None and (queries.dim() != 1 or queries.dtype != torch.int64):
        raise ValueError(f"mask_postprocess: queries must be an int64 tensor [K], got {tuple(queries.shape)} "
                         f"{queries.dtype}")
    kept = queries.shape[0] if queries is not None else mask_logits.shape[0]
    return (mask_logits.new_empty((kept,), dtype=torch.int64), mask_logits.new_empty((kept, 4), dtype=torch.int32),
            mask_logits.new_empty((kept,), dtype=torch.float32))


@torch.library.custom_op(f"{NAMESPACE}::semantic_label_map", mutates_args=())
def semantic_label_map(mask_logits: Tensor, class_probs: Tensor, height: int, width: int) -> Tensor:
    """int64 [H, W] semantic label map (see `mf_kernels.mask_postprocess`)."""
    raise NotImplementedError("replaced by the device kernels registered below")


def _semantic_kernel(mask_logits: Tensor, class_probs: Tensor, height: int, width: int) -> Tensor:
    out = dispatch.OPS["semantic_label_map"].eager(mask_logits, class_probs, (height, width))
    return out.to(mask_logits.device).contiguous()


_register_kernels(semantic_label_map, _semantic_kernel)


@semantic_label_map.register_fake
def _(mask_logits: Tensor, class_probs: Tensor, height: int, width: int) -> Tensor:
    check_semantic_inputs(mask_logits, class_probs, (height, width))
    return mask_logits.new_empty((height, width), dtype=torch.int64)


# ----------------------------------------------------------------------------------------------------
# What `dispatch.Op.__call__` runs while torch.compile / torch.export trace (same signature as the op)


def _eager_postprocess(*args, **kwargs) -> MaskStats:
    return dispatch.OPS["mask_postprocess"].eager(*args, **kwargs)


def _traced_mask_postprocess(mask_logits: Tensor, image_size, mask_threshold: float = 0.5, *,
                             scores: Tensor | None = None, queries: Tensor | None = None, strict: bool = False,
                             rle: bool = False, crops: bool = False) -> MaskStats:
    if rle or crops:  # host lists of data-dependent size: outside the graph (disable is applied here, when
        # tracing: at import it would import torch._dynamo and so triton, before TRITON_INTERPRET is read)
        return torch.compiler.disable(_eager_postprocess)(mask_logits, image_size, mask_threshold, scores=scores,
                                                    queries=queries, strict=strict, rle=rle, crops=crops)
    height, width = image_size
    areas, boxes, prob_sums = mask_postprocess(mask_logits, height, width, float(mask_threshold), bool(strict),
                                               scores, queries)
    return MaskStats(areas, boxes, prob_sums, None, None, (height, width))


def _traced_semantic_label_map(mask_logits: Tensor, class_probs: Tensor, image_size) -> Tensor:
    return semantic_label_map(mask_logits, class_probs, image_size[0], image_size[1])


CUSTOM_OPS = {
    "masked_cross_attention": masked_cross_attention,
    "fpn_upsample_add": fpn_upsample_add,
    "fpn_lateral_upsample_add": fpn_lateral_upsample_add,
    "mask_postprocess": mask_postprocess,
    "semantic_label_map": semantic_label_map,
}
TRACED = {
    "masked_cross_attention": masked_cross_attention,
    "fpn_upsample_add": fpn_upsample_add,
    "fpn_lateral_upsample_add": fpn_lateral_upsample_add,
    "mask_postprocess": _traced_mask_postprocess,
    "semantic_label_map": _traced_semantic_label_map,
}
for _name, _traced in TRACED.items():
    dispatch.OPS[_name].traced = _traced
