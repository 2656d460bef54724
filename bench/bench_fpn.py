"""Microbenchmarks of the FPN top-down ops (SPEC §4.2) for every backend that can run here, at the shapes a
real model sees (`mf_kernels.shapes.FPN_SHAPES`: fai-mf-s/l-coco-ins at 640², res4 / res3 / res2).

    pytest bench/bench_fpn.py --benchmark-only [--benchmark-min-rounds 3]

Backends: reference, cpp (CPU, needs the extension), triton and cuda (CUDA tensors only: the Triton
interpreter is a test vehicle, not something to time). `fpn_lateral_upsample_add` also times
"reference-unfolded": the model's reference path (conv + BatchNorm + interpolate + add) that the fused op
replaces. CPU runs fp32; CUDA runs fp16 and fp32. On CUDA every call synchronises, so the time is the
kernels' wall time. Timing and the environment record: bench/conftest.py.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mf_kernels
from mf_kernels import fpn
from mf_kernels.shapes import FPN_SHAPES

from conftest import bench_cases

BACKENDS = ("reference", "cpp", "triton", "cuda")


def _skip_unless_runnable(op, backend: str, inputs: tuple) -> None:
    if backend == "triton" and inputs[0].device.type == "cpu":
        pytest.skip("Triton on CPU is the interpreter: a test vehicle, not timed")
    reasons = op.reasons(backend, op.inputs_of(*inputs))
    if reasons:
        pytest.skip(f"{op.name}[{backend}]: {'; '.join(reasons)}")


CASES = [(shape, device, dtype) for device, dtype in bench_cases() for shape in FPN_SHAPES]
IDS = [f"{s.model.replace('fai-mf-', '')}-{s.level}-{d}-{str(t).replace('torch.', '')}" for s, d, t in CASES]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,device,dtype", CASES, ids=IDS)
@torch.inference_mode()
def test_fpn_upsample_add(timed, shape, device, dtype, backend):
    lateral, coarse = shape.upsample_inputs(dtype, device, torch.Generator().manual_seed(0))
    _skip_unless_runnable(fpn.fpn_upsample_add, backend, (lateral, coarse))
    with mf_kernels.use(backend):
        timed(lambda: mf_kernels.fpn_upsample_add(lateral, coarse), device, dtype=dtype, backend=backend,
              shape=shape.name)


@pytest.mark.parametrize("backend", ("reference-unfolded",) + BACKENDS)
@pytest.mark.parametrize("shape,device,dtype", CASES, ids=IDS)
@torch.inference_mode()
def test_fpn_lateral_upsample_add(timed, shape, device, dtype, backend):
    x, weight, bias, coarse = shape.lateral_inputs(dtype, device, torch.Generator().manual_seed(0))
    if backend == "reference-unfolded":  # what the model computes without folding: conv, BN, interpolate, add
        bn_weight, bn_bias = torch.rand_like(bias) + 0.5, torch.randn_like(bias)
        mean, var = torch.randn_like(bias), torch.rand_like(bias) + 0.5
        conv_weight = weight[:, :, None, None]

        def unfolded():
            lateral = F.batch_norm(F.conv2d(x, conv_weight), mean.to(dtype), var.to(dtype), bn_weight.to(dtype),
                                   bn_bias.to(dtype), training=False)
            return fpn.fpn_upsample_add_ref(lateral, coarse)

        timed(unfolded, device, dtype=dtype, backend=backend, shape=shape.name)
        return
    _skip_unless_runnable(fpn.fpn_lateral_upsample_add, backend, (x, weight, bias, coarse))
    with mf_kernels.use(backend):
        timed(lambda: mf_kernels.fpn_lateral_upsample_add(x, weight, bias, coarse), device, dtype=dtype,
              backend=backend, shape=shape.name)
