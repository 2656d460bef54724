"""End-to-end FPS profiler (`fai-mf bench fps`): per-stage times, model-only and end-to-end FPS,
peak memory, reference vs fused kernels side by side with an output-agreement check.

Timing is device-synchronised: CUDA events on CUDA (optionally replaying a CUDA graph of the model),
`time.perf_counter` around synchronised calls on CPU. The per-stage breakdown is measured in its own
loop (a sync between stages); the FPS numbers come from loops without inner syncs.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

logger = logging.getLogger(__name__)

STAGES = ("backbone", "pixel_decoder", "transformer_decoder", "postprocess")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device) -> dict[str, Any]:
    """Device, versions and git SHA recorded with every result."""
    env: dict[str, Any] = {
        "device": str(device), "torch": torch.__version__, "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "git_sha": git_sha(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


class Timer:
    """Synchronised wall time of a callable, in milliseconds (CUDA events on CUDA)."""

    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time(self, fn: Callable[[], Any]) -> tuple[float, Any]:
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end), out
        t0 = time.perf_counter()
        out = fn()
        return (time.perf_counter() - t0) * 1e3, out


@dataclass
class RunResult:
    kernels: str
    stage_ms: dict[str, float]
    model_ms: float
    end_to_end_ms: float
    model_fps: float
    end_to_end_fps: float
    peak_memory_mb: float
    peak_memory_kind: str
    cuda_graphs: bool = False
    kernel_choice: dict[str, str] = field(default_factory=dict)


def _peak_memory(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "torch.cuda.max_memory_allocated"
    # ru_maxrss is in KiB on Linux: the whole process' peak, models and reference runs included.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS (ru_maxrss)"


def _stage_fns(m, images: torch.Tensor, postprocess: Callable) -> list[tuple[str, Callable]]:
    model = m.model
    state: dict[str, Any] = {}

    def backbone():
        state["features"] = model.pixel_decoder.backbone(model.normalize(images))

    def pixel_decoder():
        state["mask_features"], state["multi_scale"] = model.pixel_decoder.forward_features(state["features"])

    def transformer_decoder():
        state["raw"] = model.head.predictor(state["multi_scale"], state["mask_features"])[-1]

    def post():
        state["detections"] = postprocess(state["raw"].class_logits, state["raw"].mask_logits)

    return [("backbone", backbone), ("pixel_decoder", pixel_decoder), ("transformer_decoder", transformer_decoder),
            ("postprocess", post)]


def run_once(m, images: torch.Tensor, postprocess: Callable, iters: int, warmup: int, cuda_graphs: bool) -> RunResult:
    """Profile the model `m` (already set to its kernels) on `images`."""
    device = images.device
    timer = Timer(device)
    stage_fns = _stage_fns(m, images, postprocess)

    def model_only():
        return m.model.forward_raw(images)

    def end_to_end():
        raw = m.model.forward_raw(images)
        return postprocess(raw.class_logits, raw.mask_logits)

    graph_replay = None
    with torch.inference_mode():
        for _ in range(warmup):
            for _, fn in stage_fns:
                fn()
            end_to_end()
        timer.sync()
        if cuda_graphs:
            graph_replay = _capture_graph(m, images)
        stage_times: dict[str, list[float]] = {name: [] for name in STAGES}
        for _ in range(iters):
            for name, fn in stage_fns:
                timer.sync()
                stage_times[name].append(timer.time(fn)[0])
        model_times = [timer.time(graph_replay or model_only)[0] for _ in range(iters)]
        e2e_times = []
        for _ in range(iters):
            if graph_replay is not None:
                def e2e_graph():
                    raw = graph_replay()
                    return postprocess(raw.class_logits, raw.mask_logits)
                e2e_times.append(timer.time(e2e_graph)[0])
            else:
                e2e_times.append(timer.time(end_to_end)[0])
    batch = images.shape[0]
    model_ms, e2e_ms = statistics.median(model_times), statistics.median(e2e_times)
    peak, kind = _peak_memory(device)
    return RunResult(
        kernels="", stage_ms={k: statistics.median(v) for k, v in stage_times.items()},
        model_ms=model_ms, end_to_end_ms=e2e_ms, model_fps=batch * 1e3 / model_ms, end_to_end_fps=batch * 1e3 / e2e_ms,
        peak_memory_mb=peak, peak_memory_kind=kind, cuda_graphs=graph_replay is not None,
    )


def _capture_graph(m, images: torch.Tensor) -> Callable:
    """Capture forward_raw in a CUDA graph on a static input; returns a replay function."""
    static_in = images.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            m.model.forward_raw(static_in)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = m.model.forward_raw(static_in)

    def replay():
        graph.replay()
        return static_out

    return replay
