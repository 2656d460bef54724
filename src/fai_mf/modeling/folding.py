"""Inference-time conv + BatchNorm (+ ReLU) folding for every conv-BN block of the model.

When the inference rewrites apply (`inference.inference_rewrites_apply`: eval mode, no gradient needed,
kernels other than "reference"), a conv followed by an eval-mode BatchNorm with running statistics runs
as one conv with the folded weight and bias (W·γ/σ, β − μ·γ/σ, computed in fp64 once and cached on the
module, outside the state_dict): one pass over the activations instead of two. On CPU the folded weights
are channels_last, so oneDNN runs the backbone in that layout. Otherwise conv then BN run, exactly the
reference model, and parameter names never change, so every checkpoint loads into either path.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import mf_kernels

from .inference import inference_rewrites_apply


def cached_on(module: nn.Module, attr: str, tensors: tuple[torch.Tensor, ...], eps: float,
              compute: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """`compute()` cached in `module.__dict__[attr]` (outside the state_dict), recomputed when one of
    `tensors` changes: load_state_dict, .to() and in-place updates bump the version or move the storage."""
    cached = module.__dict__.get(attr)
    if torch.compiler.is_compiling():  # traced tensors have no data pointers: an eager forward filled the cache
        return (cached[1], cached[2]) if cached is not None else compute()
    key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors) + (eps,)
    if cached is None or cached[0] != key:
        cached = (key, *compute())
        module.__dict__[attr] = cached
    return cached[1], cached[2]


def bn_tensors(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> tuple[torch.Tensor, ...]:
    return conv.weight, norm.weight, norm.bias, norm.running_mean, norm.running_var


def fold_conv_bn(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of `conv` with the eval-mode `norm` folded in, in the conv's dtype; cached on `conv`."""

    def compute() -> tuple[torch.Tensor, torch.Tensor]:
        weight, bias = mf_kernels.fold_batchnorm(*bn_tensors(conv, norm), norm.eps)
        weight, bias = weight.to(conv.weight.dtype), bias.to(conv.weight.dtype)
        if weight.device.type == "cpu":
            # oneDNN runs a conv channels_last when its weight is: ~10% faster on CPU, and the layout
            # then propagates through the following convs, pools and adds of the backbone
            weight = weight.contiguous(memory_format=torch.channels_last)
        return weight, bias

    return cached_on(conv, "_folded_conv_bn", bn_tensors(conv, norm), norm.eps, compute)


def folding_applies(conv: nn.Conv2d, norm: nn.BatchNorm2d, x: torch.Tensor) -> bool:
    """A bias-free conv before a BN with running statistics, where the inference rewrites apply."""
    return norm.running_mean is not None and conv.bias is None and inference_rewrites_apply((conv, norm), x)


def conv_bn_act(conv: nn.Conv2d, norm: nn.BatchNorm2d, x: torch.Tensor, relu: bool) -> torch.Tensor:
    """relu?(norm(conv(x))), folded into one conv when `folding_applies`."""
    if folding_applies(conv, norm, x):
        weight, bias = fold_conv_bn(conv, norm)
        out = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    else:
        out = norm(F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups))
    return F.relu(out) if relu else out
