"""Roofline of each kernel on a T4: bytes moved, FLOPs, and the time floor they imply.

    python -m mf_kernels.roofline

T4 (sm_75): 320 GB/s DRAM, 65 TFLOP/s fp16 on tensor cores, 8.1 TFLOP/s fp32 on FMA units.
floor = max(bytes / bandwidth, FLOPs / peak), where the peak is the one the implementation can use:
Triton's tl.dot has no tensor-core path on sm_75 (it lowers to FMA), so a Triton kernel's peak there is
the 8.1 TFLOP/s FMA peak even with fp16 inputs; the tensor-core floor is shown next to it for what a
WMMA (CUDA) kernel could reach.

An op adds its rows with `register(op, rows)` (rows() -> list[Row]), or, without importing this module
at package import, `mf_kernels.dispatch.register_roofline_provider(op, "module:function")`; both land in
one registry in `mf_kernels.dispatch`, so `python -m mf_kernels.roofline` sees every op. This module's
own rows are the masked cross-attention at the three 640² decoder levels.
"""
from __future__ import annotations

import importlib
import math
import sys
from dataclasses import dataclass
from typing import Callable

import torch

from .shapes import MASKED_ATTENTION_SHAPES, AttentionShape


@dataclass(frozen=True)
class Device:
    name: str
    bandwidth: float  # bytes/s
    fp16_tensor: float  # FLOP/s
    fp32_fma: float  # FLOP/s


T4 = Device("NVIDIA T4 (sm_75)", bandwidth=320e9, fp16_tensor=65e12, fp32_fma=8.1e12)


@dataclass(frozen=True)
class Row:
    """One kernel at one shape: `bytes` is the minimum traffic (every input read once, output written
    once); `kernel_bytes` what the implementation plans to move (extra passes, partial results)."""

    op: str
    shape: str
    dtype: str
    bytes: int
    flops: int
    kernel_bytes: int | None = None
    uses_tensor_cores: bool = False  # whether the fused kernel's dots run on tensor cores on the T4

    def memory_floor(self, device: Device = T4) -> float:
        return self.bytes / device.bandwidth

    def compute_floor(self, device: Device = T4) -> float:
        return self.flops / (device.fp16_tensor if self.uses_tensor_cores else device.fp32_fma)

    def tensor_core_floor(self, device: Device = T4) -> float:
        return max(self.memory_floor(device), self.flops / device.fp16_tensor)

    def floor(self, device: Device = T4) -> float:
        return max(self.memory_floor(device), self.compute_floor(device))

    def bound(self, device: Device = T4) -> str:
        return "compute" if self.compute_floor(device) > self.memory_floor(device) else "memory"


def register(op: str, rows: Callable[[], list[Row]]) -> None:
    from .dispatch import register_roofline_provider

    register_roofline_provider(op, rows)


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def masked_attention_row(shape: AttentionShape, dtype: torch.dtype) -> Row:
    """Masked cross-attention: QK^T and PV are 2·B·Q·HW·D multiply-adds each (4·B·Q·HW·D FLOPs; the
    softmax's few ops per score are left out). Minimum traffic: q, k, v, mask logits in, out.
    The Triton plan (sm_75 config, DRAM bytes when the programs of one key split share q, K/V and the
    bits through L2, as the grid order intends) adds the bit mask (written, read back) and the fp32
    partial states of every split (written, read back by the combine kernel)."""
    from .masked_attention_triton import MIN_KEYS_PER_SPLIT, T4_SM_COUNT, config_for, num_splits_for

    s = _size(dtype)
    b, q, d, h, hw = shape.batch, shape.queries, shape.dim, shape.heads, shape.hw
    minimum = b * q * d * s + 2 * b * hw * d * s + b * q * hw * s + b * q * d * s
    config = config_for(75, dtype, q)
    q_blocks = math.ceil(q / config.block_q)
    n_splits, _ = num_splits_for(b * h, q_blocks, math.ceil(hw / config.block_k), T4_SM_COUNT,
                                 math.ceil(MIN_KEYS_PER_SPLIT / config.block_k))
    bits = b * q * math.ceil(hw / 32) * 4
    partials = b * h * n_splits * q * (shape.head_dim + 2) * 4
    planned = minimum + 2 * bits + 2 * partials
    return Row("masked_cross_attention", shape.name, str(dtype).replace("torch.", ""), minimum,
               4 * b * q * hw * d, planned, uses_tensor_cores=False)


def _masked_attention_rows() -> list[Row]:
    return [masked_attention_row(shape, dtype) for dtype in (torch.float16, torch.float32)
            for shape in MASKED_ATTENTION_SHAPES]


register("masked_cross_attention", _masked_attention_rows)


def rows() -> list[Row]:
    import mf_kernels  # noqa: F401  (importing the package registers every op's rows)
    from .dispatch import ROOFLINE_PROVIDERS

    out = []
    for op in sorted(ROOFLINE_PROVIDERS):
        provider = ROOFLINE_PROVIDERS[op]
        if isinstance(provider, str):
            module, _, function = provider.partition(":")
            provider = getattr(importlib.import_module(module), function)
        out += provider()
    return out


def format_table(all_rows: list[Row], device: Device = T4) -> str:
    header = ("op", "shape", "dtype", "MB min", "MB plan", "GFLOP", "mem floor us", "FMA/TC floor us",
              "floor us", "bound", "TC floor us")
    table = [header]
    for r in all_rows:
        table.append((r.op, r.shape, r.dtype, f"{r.bytes / 1e6:.2f}",
                      "-" if r.kernel_bytes is None else f"{r.kernel_bytes / 1e6:.2f}", f"{r.flops / 1e9:.3f}",
                      f"{r.memory_floor(device) * 1e6:.1f}", f"{r.compute_floor(device) * 1e6:.1f}",
                      f"{r.floor(device) * 1e6:.1f}", r.bound(device), f"{r.tensor_core_floor(device) * 1e6:.1f}"))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table)


def main() -> int:
    print(f"{T4.name}: {T4.bandwidth / 1e9:.0f} GB/s, {T4.fp16_tensor / 1e12:.0f} TFLOP/s fp16 tensor cores, "
          f"{T4.fp32_fma / 1e12:.1f} TFLOP/s fp32 FMA")
    print("floor = max(memory, compute); compute uses the FMA peak for kernels whose dots do not run on tensor cores "
          "(Triton tl.dot on sm_75, any dtype); 'TC floor' = the same bytes with the fp16 tensor-core peak.")
    print(format_table(rows()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
