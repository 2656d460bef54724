"""Roofline of a whole zoo model (`fai-mf bench roofline`): every fused-kernel call the model makes at a
resolution, with its bytes, FLOPs and floor on a T4, their sum, and the measured time where a GPU is present.

The calls are recorded from a real forward (the model on CPU with the `auto` kernels, then the predict
post-processing), so the list follows the model's schedule: one masked cross-attention per decoder
layer at its level, one FPN step per level, the post-processing of the kept queries. The byte and FLOP
models are the ops' own, declared once next to each op (`mf_kernels.roofline.call_rows`). Floors use the
peak the T4 path can use: FMA for Triton's tl.dot on sm_75, tensor cores for the WMMA / cuDNN fp16 paths
(see `python -m mf_kernels.info`).
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any, Iterator

import torch


@contextlib.contextmanager
def record_op_calls() -> Iterator[list[tuple[str, tuple, dict]]]:
    """Record (op name, args, kwargs) of every `mf_kernels` op call inside the block."""
    from mf_kernels import dispatch

    calls: list[tuple[str, tuple, dict]] = []
    original = dispatch.Op.__call__

    def recording(self, *args: Any, **kwargs: Any) -> Any:
        calls.append((self.name, args, kwargs))
        return original(self, *args, **kwargs)

    dispatch.Op.__call__ = recording
    try:
        yield calls
    finally:
        dispatch.Op.__call__ = original


def _measure(name: str, args: tuple, kwargs: dict) -> float | None:
    """Median microseconds of the op under `auto` on CUDA (triton.testing.do_bench: events, L2 flushed)."""
    import mf_kernels
    import triton.testing

    op = mf_kernels.dispatch.OPS[name]
    moved_args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
    moved_kwargs = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    with mf_kernels.use("auto"), torch.inference_mode():
        return 1e3 * triton.testing.do_bench(lambda: op(*moved_args, **moved_kwargs), return_mode="median")


def model_roofline(model: str, resolution: int = 640, device: str = "t4", measure: bool = True,
                   dtype: str = "fp16") -> dict[str, Any]:
    """Every fused-kernel call of `model` at `resolution`², its T4 floor, the sum, and measured times on CUDA."""
    import mf_kernels
    from mf_kernels.roofline import T4, call_rows

    from . import load_model
    from .demo import synthetic_image
    from .postprocess import PostprocessOptions
    from .predict import detections_from_raw
    from .profile import make_random_model_realistic

    if device.lower() != "t4":
        raise ValueError(f"only the T4 roofline is defined (320 GB/s, 65 TFLOP/s fp16 TC, 8.1 fp32), got {device!r}")
    torch_dtype = {"fp16": torch.float16, "fp32": torch.float32}[dtype]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*RANDOM weights.*")
        m = load_model(model)
    images = synthetic_image(resolution, resolution)
    make_random_model_realistic(m, images, keep=20)
    options = PostprocessOptions.from_config(m.config)
    with mf_kernels.use("auto"), torch.inference_mode(), record_op_calls() as calls:
        raw = m.model.forward_raw(images)
        detections_from_raw(raw.mask_logits[0], m.model.class_probs(raw.class_logits)[0], (resolution, resolution),
                            options)
    gpu = measure and torch.cuda.is_available()
    entries, total = [], 0.0
    for name, args, kwargs in calls:
        rows = call_rows(name, args, kwargs, torch_dtype)  # [] for the host encoders
        measured = _measure(name, args, kwargs) if gpu and rows else None
        for row in rows:
            floor_us = row.floor(T4) * 1e6
            total += floor_us
            entries.append({"op": row.op, "shape": row.shape, "dtype": row.dtype, "mb": row.bytes / 1e6,
                            "gflop": row.flops / 1e9, "floor_us": floor_us, "bound": row.bound(T4),
                            "tensor_cores": row.uses_tensor_cores, "measured_us": measured})
            measured = None  # one measurement per call (a call may have several rows)
    return {"model": model, "resolution": resolution, "dtype": dtype, "device": T4.name, "calls": entries,
            "total_floor_us": total, "measured_on": torch.cuda.get_device_name() if gpu else None}


def format_model_roofline(report: dict[str, Any]) -> str:
    header = ("op", "shape", "dtype", "MB", "GFLOP", "floor us", "bound", "measured us")
    table = [header]
    for e in report["calls"]:
        table.append((e["op"], e["shape"], e["dtype"], f"{e['mb']:.2f}", f"{e['gflop']:.3f}", f"{e['floor_us']:.1f}",
                      e["bound"] + (" (TC)" if e["tensor_cores"] else ""),
                      "-" if e["measured_us"] is None else f"{e['measured_us']:.1f}"))
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = [f"{report['model']} at {report['resolution']}², {report['dtype']}, floors on {report['device']}"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]
    lines.append(f"sum of the fused kernels' T4 floors: {report['total_floor_us']:.1f} us "
                 f"({1e6 / report['total_floor_us'] if report['total_floor_us'] else math.inf:.0f} FPS if nothing else ran)")
    lines.append("measured: " + (report["measured_on"] or "no GPU here, nothing measured"))
    return "\n".join(lines)
