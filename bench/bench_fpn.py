"""Microbenchmarks of the FPN top-down ops (SPEC §4.2) for every backend that can run here, at the shapes a
real model sees (`mf_kernels.shapes.FPN_SHAPES`: fai-mf-s/l-coco-ins at 640², res4 / res3 / res2).

    pytest bench/bench_fpn.py --benchmark-only [--benchmark-min-rounds 3]

Backends: reference, cpp (CPU, needs the extension), triton and cuda (CUDA tensors only: the Triton
interpreter is a test vehicle, not something to time). `fpn_lateral_upsample_add` also times
"reference-unfolded": the model's reference path (conv + BatchNorm + interpolate + add) that the fused op
replaces. CPU runs fp32; CUDA runs fp16 and fp32. On CUDA every call synchronises, so the time is the
kernels' wall time. Each result carries device, versions and the git SHA in `extra_info`.
"""
from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import mf_kernels
from mf_kernels import fpn
from mf_kernels.shapes import FPN_SHAPES

REPO = Path(__file__).resolve().parents[1]
BACKENDS = ("reference", "cpp", "triton", "cuda")


def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


GIT_SHA = _git_sha()


def _devices() -> list[tuple[str, torch.dtype]]:
    cases = [("cpu", torch.float32)]
    if torch.cuda.is_available():
        cases += [("cuda", torch.float16), ("cuda", torch.float32)]
    return cases


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine())


def _extra_info(benchmark, device: str, dtype: torch.dtype, backend: str, shape) -> None:
    benchmark.extra_info.update({
        "device": _device_name(device), "dtype": str(dtype).replace("torch.", ""), "backend": backend,
        "shape": shape.name, "torch": torch.__version__, "threads": torch.get_num_threads(), "git_sha": GIT_SHA,
    })
    if backend == "triton":
        import triton

        benchmark.extra_info["triton"] = triton.__version__


def _skip_unless_runnable(op, backend: str, device: str, dtype: torch.dtype) -> None:
    if backend == "triton" and device == "cpu":
        pytest.skip("Triton on CPU is the interpreter: a test vehicle, not timed")
    reasons = op.reasons(backend, mf_kernels.dispatch.make_inputs(device, dtype, numel=1, grad=False))
    if reasons:
        pytest.skip(f"{op.name}[{backend}]: {'; '.join(reasons)}")


def _timed(fn, device: str):
    if device != "cuda":
        return fn

    def synchronised():
        out = fn()
        torch.cuda.synchronize()
        return out

    return synchronised


CASES = [(shape, device, dtype) for device, dtype in _devices() for shape in FPN_SHAPES]
IDS = [f"{s.model.replace('fai-mf-', '')}-{s.level}-{d}-{str(t).replace('torch.', '')}" for s, d, t in CASES]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,device,dtype", CASES, ids=IDS)
@torch.inference_mode()
def test_fpn_upsample_add(benchmark, shape, device, dtype, backend):
    _skip_unless_runnable(fpn.fpn_upsample_add, backend, device, dtype)
    lateral, coarse = shape.upsample_inputs(dtype, device, torch.Generator().manual_seed(0))
    _extra_info(benchmark, device, dtype, backend, shape)
    with mf_kernels.use(backend):
        benchmark(_timed(lambda: mf_kernels.fpn_upsample_add(lateral, coarse), device))


@pytest.mark.parametrize("backend", ("reference-unfolded",) + BACKENDS)
@pytest.mark.parametrize("shape,device,dtype", CASES, ids=IDS)
@torch.inference_mode()
def test_fpn_lateral_upsample_add(benchmark, shape, device, dtype, backend):
    x, weight, bias, coarse = shape.lateral_inputs(dtype, device, torch.Generator().manual_seed(0))
    _extra_info(benchmark, device, dtype, backend, shape)
    if backend == "reference-unfolded":  # what the model computes without folding: conv, BN, interpolate, add
        bn_weight, bn_bias = torch.rand_like(bias) + 0.5, torch.randn_like(bias)
        mean, var = torch.randn_like(bias), torch.rand_like(bias) + 0.5
        conv_weight = weight[:, :, None, None]

        def unfolded():
            lateral = F.batch_norm(F.conv2d(x, conv_weight), mean.to(dtype), var.to(dtype), bn_weight.to(dtype),
                                   bn_bias.to(dtype), training=False)
            return fpn.fpn_upsample_add_ref(lateral, coarse)

        benchmark(_timed(unfolded, device))
        return
    _skip_unless_runnable(fpn.fpn_lateral_upsample_add, backend, device, dtype)
    with mf_kernels.use(backend):
        benchmark(_timed(lambda: mf_kernels.fpn_lateral_upsample_add(x, weight, bias, coarse), device))
