"""What every Triton launcher shares: the target's compute capability and SM count, `Launch`, and
PyTorch's fp32 resize scale.

No triton import here: the launchers import it lazily (the interpreter flag is read when kernels are
decorated), and this module only holds the jit function objects it is given.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

T4_SM_COUNT = 40  # the target when there is no GPU to ask (interpreter, AOT)
TRITON_DTYPE_NAMES = {torch.float16: "fp16", torch.float32: "fp32"}  # the dtypes the kernels take, as AOT names them


def fp32_ratio(in_size: int, out_size: int) -> float:
    """PyTorch's resize scale `(float)in / out` (nearest and bilinear), as the Python float holding that exact
    fp32 value. Rounding the double quotient to fp32 equals the fp32 division (53 >= 2·24 + 2 bits), so a
    kernel that takes this as an fp32 argument computes its source indices exactly as PyTorch does."""
    return float(np.float32(in_size / out_size))


@functools.lru_cache(maxsize=None)
def _device_arch_and_sms(device_index: int) -> tuple[int, int]:
    props = torch.cuda.get_device_properties(device_index)
    return props.major * 10 + props.minor, props.multi_processor_count


def arch_and_sms(device: torch.device) -> tuple[int, int]:
    """The target's compute capability (75, 80, ...) and SM count; T4 values for CPU tensors (interpreter)."""
    if device.type != "cuda":
        return 75, T4_SM_COUNT
    return _device_arch_and_sms(device.index if device.index is not None else torch.cuda.current_device())


@dataclass
class Launch:
    """One kernel launch: the jit function, its grid, its arguments by parameter name, its options.

    On CUDA the launch runs under the device of its first CUDA tensor argument, so a tensor on a
    non-current GPU is not launched on the wrong one."""

    kernel: object
    grid: tuple[int, ...]
    args: dict
    num_warps: int = 4
    num_stages: int = 1

    def run(self) -> None:
        device = next((a.device for a in self.args.values() if isinstance(a, torch.Tensor) and a.is_cuda), None)
        if device is None:  # CPU tensors: the Triton interpreter, which some (triton, numpy) pairs break
            from .dispatch import interpreter_version_reasons

            reasons = interpreter_version_reasons()
            if reasons:
                raise RuntimeError(f"{getattr(self.kernel, '__name__', 'kernel')}: {reasons[0]}")
            self.kernel[self.grid](**self.args, num_warps=self.num_warps, num_stages=self.num_stages)
            return
        with torch.cuda.device(device):
            self.kernel[self.grid](**self.args, num_warps=self.num_warps, num_stages=self.num_stages)


def run_launches(launches: list[Launch]) -> None:
    for launch in launches:
        launch.run()
