"""FAI-MF losses (SPEC §6): class cross-entropy, mask BCE and dice on PointRend-sampled points."""
from __future__ import annotations

import torch
from torch import nn

from .config import MaskFormerConfig


class MaskFormerCriterion(nn.Module):
    """Holds `empty_weight` [C+1] (1 per class, `criterion_eos_coef` for no-object) as in focoos."""

    def __init__(self, config: MaskFormerConfig):
        super().__init__()
        self.config = config
        self.num_classes = config.num_classes
        empty_weight = torch.ones(config.num_classes + 1)
        empty_weight[-1] = config.criterion_eos_coef
        self.register_buffer("empty_weight", empty_weight)

    def forward(self, raw, targets: list[dict]) -> dict[str, torch.Tensor]:
        raise NotImplementedError("training losses are not implemented yet")
