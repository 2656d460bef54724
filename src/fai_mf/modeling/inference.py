"""When the model's inference-only rewrites may replace the reference computation.

Three rewrites compute the same outputs as the reference model in another order of operations, valid only
for inference: conv + BatchNorm folded into one conv (`folding`), the BN-folded FPN lateral conv fused
with its upsample-add (`pixel_decoder.ConvNorm.lateral_upsample_add`), and the decoder's attention masks
computed at each level's size (`transformer_decoder`). They apply when fused kernels are chosen (not
`kernels="reference"`, which is the plain model bit for bit), the modules are in eval mode (BatchNorm
uses its running statistics) and nothing needs a gradient.
"""
from __future__ import annotations

import torch
from torch import nn

import mf_kernels


def inference_rewrites_apply(modules: nn.Module | tuple[nn.Module, ...], *inputs: torch.Tensor) -> bool:
    """Whether the rewrites may run for `modules` on `inputs`: eval mode, no gradient needed (through the
    inputs or the modules' parameters), and a kernels choice other than "reference"."""
    modules = modules if isinstance(modules, tuple) else (modules,)
    if any(m.training for m in modules):
        return False
    if torch.is_grad_enabled() and (any(t.requires_grad for t in inputs)
                                    or any(p.requires_grad for m in modules for p in m.parameters())):
        return False
    return mf_kernels.current_choice() != "reference"
