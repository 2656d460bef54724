"""Microbenchmarks of masked cross-attention (SPEC §4.1) for every backend that can run here, at the shapes a
real model sees (`mf_kernels.shapes.MASKED_ATTENTION_SHAPES`: B=1, Q=100, D=256, 8 heads, HW = 20², 40², 80²).

    pytest bench/bench_masked_attention.py --benchmark-only [--benchmark-min-rounds 20]

CPU runs fp32 with reference and sdpa (what auto picks on CPU); CUDA runs fp16 and fp32 with reference,
sdpa and triton (the Triton interpreter is a test vehicle, not timed). On CUDA every call synchronises,
so the time is the kernels' wall time, launches included. Inputs come from the shared seeded generator
(`mf_kernels.testing.masked_attention_inputs`: a quarter of the rows fully blocked, a quarter fully open,
a quarter with one open key). Timing and the environment record: bench/conftest.py.
"""
from __future__ import annotations

import pytest
import torch

import mf_kernels
from mf_kernels.shapes import MASKED_ATTENTION_SHAPES
from mf_kernels.testing import masked_attention_inputs

from conftest import bench_cases

BACKENDS = ("reference", "sdpa", "triton")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device,dtype", bench_cases(), ids=lambda c: str(c).replace("torch.", ""))
@pytest.mark.parametrize("shape", MASKED_ATTENTION_SHAPES, ids=lambda s: f"HW{s.hw}")
def test_masked_cross_attention(timed, shape, device: str, dtype: torch.dtype, backend: str):
    if backend == "triton" and device != "cuda":
        pytest.skip("triton is timed on CUDA only (the CPU interpreter is a test vehicle)")
    q, k, v, logits = masked_attention_inputs(shape.batch, shape.queries, shape.hw, shape.dim, shape.heads,
                                              dtype=dtype, seed=0, device=device)
    op = mf_kernels.masked_cross_attention
    reasons = op.reasons(backend, op.inputs_of(q, k, v, logits, shape.heads))
    if reasons:
        pytest.skip(f"{backend} cannot run here: {'; '.join(reasons)}")
    impl = op.implementations[backend]
    with torch.no_grad():
        timed(lambda: impl.fn(q, k, v, logits, shape.heads), device, dtype=dtype, backend=backend, shape=shape.name)
