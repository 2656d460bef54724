"""Shared plumbing of the microbenchmarks: environment records and device-correct timing.

    pytest bench/ --benchmark-only                 # full rounds
    pytest bench/ --benchmark-only --quick         # CI: one short round per case, so nothing rots

Every result carries device, dtype, backend, shape, versions and the git SHA in `extra_info`. On CUDA,
pytest-benchmark times a synchronised call (launches included) and, in addition, `cuda_median_ms` is
the median of `triton.testing.do_bench` (CUDA events, L2 flushed before every run).
"""
from __future__ import annotations

import functools
import platform
import subprocess
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--quick", action="store_true", help="one short round per benchmark (CI smoke run)")


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--quick"):
        config.option.benchmark_min_rounds = 1
        config.option.benchmark_max_time = 0.0
        config.option.benchmark_warmup = False
        config.option.benchmark_calibration_precision = 1


@functools.lru_cache(maxsize=None)
def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: str | torch.device) -> str:
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())


def bench_cases() -> list[tuple[str, torch.dtype]]:
    """(device, dtype) pairs to time here: fp32 on CPU; fp16 and fp32 on CUDA when present."""
    cases = [("cpu", torch.float32)]
    if torch.cuda.is_available():
        cases += [("cuda", torch.float16), ("cuda", torch.float32)]
    return cases


def record_environment(benchmark: Any, device: str, dtype: torch.dtype, backend: str, shape: str, **extra: Any) -> None:
    info = {"device": device_name(device), "dtype": str(dtype).replace("torch.", ""), "backend": backend,
            "shape": shape, "torch": torch.__version__, "threads": torch.get_num_threads(), "git_sha": git_sha()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.device(device).type == "cuda":
        info["cuda"] = torch.version.cuda
    info.update(extra)
    benchmark.extra_info.update(info)


@pytest.fixture
def timed(benchmark: Any) -> Callable[..., Any]:
    """`timed(fn, device, dtype=, backend=, shape=)`: warm up once, then time `fn` the right way for `device`."""

    def run(fn: Callable[[], Any], device: str, *, dtype: torch.dtype, backend: str, shape: str, **extra: Any) -> Any:
        record_environment(benchmark, device, dtype, backend, shape, **extra)
        fn()  # warm-up: Triton JIT and extension loading happen here, not in the timed rounds
        if torch.device(device).type != "cuda":
            return benchmark(fn)
        import triton.testing

        benchmark.extra_info["cuda_median_ms"] = triton.testing.do_bench(fn, return_mode="median")

        def synchronised() -> Any:
            out = fn()
            torch.cuda.synchronize()
            return out

        return benchmark(synchronised)

    return run
