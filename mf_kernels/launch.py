"""What every Triton launcher shares: the target's compute capability and SM count, and `Launch`.

No triton import here: the launchers import it lazily (the interpreter flag is read when kernels are
decorated), and this module only holds the jit function objects it is given.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

T4_SM_COUNT = 40  # the target when there is no GPU to ask (interpreter, AOT)


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
