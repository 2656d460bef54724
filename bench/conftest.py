"""Shared plumbing of the microbenchmarks: environment records and device-correct timing.

    pytest bench/ --benchmark-only                 # full rounds
    pytest bench/ --benchmark-only --quick         # CI: one short round per case, so nothing rots

Every result carries device, dtype, backend, shape, versions and the git SHA in `extra_info`. On CUDA,
pytest-benchmark times a synchronised call (launches included) and, in addition, `cuda_median_ms` is
the median of `triton.testing.do_bench` (CUDA events, L2 flushed before every run).
"""
from __future__ import annotations

import platform
from typing import Any, Callable

import pytest
import torch

from fai_mf.profile import git_sha

GIT_SHA = git_sha() or "unknown"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--quick", action="store_true", help="one short round per benchmark (CI smoke run)")


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--quick"):
        config.option.benchmark_min_rounds = 1
        config.option.benchmark_max_time = 0.0
        config.option.benchmark_warmup = False
        config.option.benchmark_calibration_precision = 1


def device_name(device: str | torch.device) -> str:
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())


def bench_cases() -> list[tuple[str, torch.dtype]]:
    """(device, dtype) pairs to time here: fp32 on CPU; fp16 and fp32 on CUDA when present."""
    cases = [("cpu", torch.float32)]
    if torch.cuda.is_available():
        cases += [("cuda", torch.float16), ("cuda", torch.float32)]
    return cases


def versions() -> dict[str, Any]:
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "git_sha": GIT_SHA}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["cuda"] = torch.version.cuda
    return info


@pytest.fixture(autouse=True)
def _record_versions(request: pytest.FixtureRequest) -> None:
    """Every benchmark result carries the versions and git SHA, whichever way it is timed."""
    if "benchmark" in request.fixturenames:
        # the device defaults to the CPU; `record_environment` (used by `timed`) names the real one
        request.getfixturevalue("benchmark").extra_info.update({"device": device_name("cpu"), **versions()})


def record_environment(benchmark: Any, device: str, dtype: torch.dtype, backend: str, shape: str, **extra: Any) -> None:
    benchmark.extra_info.update({"device": device_name(device), "dtype": str(dtype).replace("torch.", ""),
                                 "backend": backend, "shape": shape, **versions(), **extra})


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
