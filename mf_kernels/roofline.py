"""Roofline of each kernel on a T4: bytes moved, FLOPs, and the time floor they imply.

    python -m mf_kernels.roofline

T4 (sm_75): 320 GB/s DRAM, 65 TFLOP/s fp16 on tensor cores, 8.1 TFLOP/s fp32 on FMA units.
floor = max(bytes / bandwidth, FLOPs / peak), where the peak is the one the implementation can use:
Triton's tl.dot has no tensor-core path on sm_75 (it lowers to FMA), so a Triton kernel's peak there is
the 8.1 TFLOP/s FMA peak even with fp16 inputs; the tensor-core floor is shown next to it for what a
WMMA (CUDA) kernel could reach.

Each op family declares its bytes and FLOPs once, next to its kernels, with
`mf_kernels.dispatch.register_roofline_provider(ops, rows="module:function", call_rows="module:function")`
(imported only when a report runs): `rows()` below collects the rows at the SPEC §5 shapes, `call_rows`
gives the rows of one recorded call (what `fai-mf bench roofline` sums over a whole model).
"""
from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass

import torch


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


def _resolve(provider: str):
    module, _, function = provider.partition(":")
    return getattr(importlib.import_module(module), function)


def rows() -> list[Row]:
    """Every registered op family's rows at the SPEC §5 shapes."""
    import mf_kernels  # noqa: F401  (importing the package registers every op's provider)
    from .dispatch import ROOFLINE_PROVIDERS

    providers = dict.fromkeys(ROOFLINE_PROVIDERS[op] for op in sorted(ROOFLINE_PROVIDERS))
    return [row for provider in providers for row in _resolve(provider.rows)()]


def call_rows(op: str, args: tuple, kwargs: dict, dtype: torch.dtype) -> list[Row]:
    """The rows of one call of `op` (its recorded args and kwargs) as the T4 would run it in `dtype`; [] for an
    op without a roofline (the host encoders)."""
    from .dispatch import ROOFLINE_PROVIDERS

    provider = ROOFLINE_PROVIDERS.get(op)
    return [] if provider is None else _resolve(provider.call_rows)(op, args, kwargs, dtype)


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
