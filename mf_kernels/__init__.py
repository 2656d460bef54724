"""Fused kernels for FAI-MF and their PyTorch references.

Ops are called by name (`mf_kernels.masked_cross_attention(...)`, `mf_kernels.fpn_upsample_add(...)`);
each runs the backend chosen by `mf_kernels.dispatch` (a model's `kernels`, `mf_kernels.use(backend)`,
$MF_KERNELS, else "auto"). Each op lives in one place: `masked_attention` (+ `masked_attention_limits`,
`masked_attention_triton`), `fpn` (+ `fpn_limits`, `fpn_triton`), and the package `postprocess` for the
mask post-processing ops. `python -m mf_kernels.info` shows which backends can run here and why not;
`python -m mf_kernels.aot` compiles every Triton kernel ahead of time; `python -m mf_kernels.roofline`
prints bytes, FLOPs and T4 floors. The tensor ops are also torch.library custom ops (`torch.ops.mf_kernels.*`,
`mf_kernels.custom_ops`) for torch.compile and torch.export; trace inside `mf_kernels.tracing(backend)`.

Importing this package never touches CUDA and never compiles anything (triton is imported lazily).
"""
from __future__ import annotations

from . import dispatch
from .dispatch import (BACKENDS, CHOICES, OPS, NotSupportedError, attach, attached, clear_caches, current_choice,
                       tracing, use)
from .fpn import (fold_batchnorm, fpn_lateral_upsample_add, fpn_lateral_upsample_add_ref, fpn_upsample_add,
                  fpn_upsample_add_ref)
from .postprocess import (MaskStats, encode_png_crops, encode_rle_masks, encode_rle_strings, mask_postprocess,
                          mask_postprocess_ref, semantic_label_map, semantic_label_map_ref)
from .masked_attention import masked_cross_attention, masked_cross_attention_ref

from . import custom_ops  # noqa: E402  (torch.ops.mf_kernels.*: registers the ops defined above)

__all__ = [
    "BACKENDS", "CHOICES", "OPS", "NotSupportedError", "attach", "attached", "clear_caches", "current_choice",
    "custom_ops", "dispatch", "fold_batchnorm", "fpn_lateral_upsample_add", "fpn_lateral_upsample_add_ref", "fpn_upsample_add",
    "fpn_upsample_add_ref", "masked_cross_attention", "masked_cross_attention_ref", "tracing", "use",
    "MaskStats", "encode_png_crops", "encode_rle_masks", "encode_rle_strings", "mask_postprocess", "mask_postprocess_ref",
    "semantic_label_map", "semantic_label_map_ref",
]
