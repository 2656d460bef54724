"""Microbenchmarks of masked cross-attention (SPEC §4.1) for every backend that can run here, at the shapes a
real model sees (`mf_kernels.shapes.MASKED_ATTENTION_SHAPES`: B=1, Q=100, D=256, 8 heads, HW = 20², 40², 80²).

    pytest bench/bench_masked_attention.py --benchmark-only [--benchmark-min-rounds 20]

CPU runs fp32 with reference and sdpa (what auto picks on CPU); CUDA runs fp16 and fp32 with reference,
sdpa and triton (the Triton interpreter is a test vehicle, not timed). On CUDA every call synchronises,
so the time is the kernels' wall time, launches included. Inputs come from the shared seeded generator
(`mf_kernels.testing.masked_attention_inputs`: a quarter of the rows fully blocked, a quarter fully open,
a quarter with one open key). Each result carries device, versions and the git SHA in `extra_info`.
"""
from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import pytest
import torch

import mf_kernels
from mf_kernels.shapes import MASKED_ATTENTION_SHAPES
from mf_kernels.testing import masked_attention_inputs

REPO = Path(__file__).resolve().parents[1]
BACKENDS = ("reference", "sdpa", "triton")


def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


GIT_SHA = _git_sha()


def _cases() -> list[tuple[str, torch.dtype]]:
    cases = [("cpu", torch.float32)]
    if torch.cuda.is_available():
        cases += [("cuda", torch.float16), ("cuda", torch.float32)]
    return cases


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device,dtype", _cases(), ids=lambda c: str(c).replace("torch.", ""))
@pytest.mark.parametrize("shape", MASKED_ATTENTION_SHAPES, ids=lambda s: f"HW{s.hw}")
def test_masked_cross_attention(benchmark, shape, device: str, dtype: torch.dtype, backend: str):
    if backend == "triton" and device != "cuda":
        pytest.skip("triton is timed on CUDA only (the CPU interpreter is a test vehicle)")
    q, k, v, logits = masked_attention_inputs(shape.batch, shape.queries, shape.hw, shape.dim, shape.heads,
                                              dtype=dtype, seed=0, device=device)
    op = mf_kernels.masked_cross_attention
    reasons = op.reasons(backend, op.inputs_of(q, k, v, logits, shape.heads))
    if reasons:
        pytest.skip(f"{backend} cannot run here: {'; '.join(reasons)}")
    impl = op.implementations[backend]
    benchmark.extra_info.update({
        "device": _device_name(device), "dtype": str(dtype).replace("torch.", ""), "backend": backend,
        "shape": shape.name, "torch": torch.__version__, "threads": torch.get_num_threads(), "git_sha": GIT_SHA,
    })
    if backend == "triton":
        import triton

        benchmark.extra_info["triton"] = triton.__version__

    def run():
        out = impl.fn(q, k, v, logits, shape.heads)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    with torch.no_grad():
        run()  # warm-up: Triton compiles here, not in the timed rounds
        benchmark(run)
