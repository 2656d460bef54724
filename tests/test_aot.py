"""The GPU-readiness check (`python -m mf_kernels.aot`): every Triton launch of masked cross-attention at the
model's shapes compiles for sm_75 / sm_80 / sm_90 with no GPU, without spills, within shared memory.

Compiles run in subprocesses without TRITON_INTERPRET (this process may have it set for the interpreter
tests), with TRITON_ALWAYS_COMPILE=1 and a fresh cache so that a cached kernel cannot hide a failure.
"""
from __future__ import annotations

import faulthandler
import json
import os
import resource
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mf_kernels import aot
from mf_kernels.aot import SHARED_LIMITS, AotSpec, Result, check_limits

REPO = Path(__file__).resolve().parents[1]
KERNELS = {"_attend_bits_kernel", "_split_attention_kernel", "_combine_splits_kernel"}


def compile_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_ALWAYS_COMPILE="1", TRITON_CACHE_DIR=str(tmp_path / "triton-cache"), **extra)
    return env


def run_python(args: list[str], env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_masked_attention_kernels_compile_for_every_arch(tmp_path):
    report = tmp_path / "aot.json"
    done = run_python(["-m", "mf_kernels.aot", "--arch", "75,80,90", "--op", "masked_cross_attention",
                       "--json", str(report)], compile_env(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads(report.read_text())
    assert {(r["kernel"], r["arch"], r["dtype"]) for r in results} == {
        (k, arch, dtype) for k in KERNELS for arch in (75, 80, 90) for dtype in ("fp16", "fp32")}
    for r in results:
        assert r["ok"] and r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        assert 0 < r["registers"] <= 255 and r["shared"] <= SHARED_LIMITS[r["arch"]], r
    assert all(r["shared"] <= 64 * 1024 for r in results if r["arch"] == 75)
    for column in ("kernel", "arch", "config", "dtype", "regs", "spills", "shared"):
        assert column in done.stdout
    assert "all ok" in done.stdout


BROKEN_PROVIDER = '''
import torch
import triton
import triton.language as tl

from mf_kernels.aot import AotSpec


@triton.jit
def broken_kernel(x_ptr, BLOCK: tl.constexpr):
    tl.store(x_ptr + tl.arange(0, BLOCK), 1.0)  # BLOCK=3: arange needs a power of two


def aot_specs(arch):
    return [AotSpec("broken_kernel", broken_kernel, {"x_ptr": "*fp32", "BLOCK": "constexpr"}, {"BLOCK": 3}, {},
                    num_warps=1, num_stages=1, dtype="fp32")]
'''


def test_a_failing_kernel_fails_the_check(tmp_path):
    """Another op plugs in through `register_aot_provider`; its compile failure is reported and exits 1."""
    (tmp_path / "broken_provider.py").write_text(BROKEN_PROVIDER)
    script = ("import sys, mf_kernels.dispatch as d; d.register_aot_provider('broken', 'broken_provider:aot_specs'); "
              "from mf_kernels.aot import main; sys.exit(main(['--arch', '75', '--op', 'broken', '--jobs', '1']))")
    env = compile_env(tmp_path, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    done = run_python(["-c", script], env)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "broken_kernel" in done.stdout and "compile failed" in done.stdout and "1 FAILED" in done.stdout


def test_aot_signature_matches_triton_specialisation(tmp_path):
    """The AOT specs specialise launch arguments the way Triton's JIT does (unit strides as constexprs,
    16-divisibility hints), so the check compiles what a launch would."""
    script = textwrap.dedent('''
        import torch
        from triton.backends.compiler import BaseBackend
        from triton._C.libtriton import native_specialize_impl
        from mf_kernels.aot import specialize
        from mf_kernels.masked_attention_triton import plan
        from mf_kernels.shapes import MASKED_ATTENTION_SHAPES
        for shape in MASKED_ATTENTION_SHAPES:
            for dtype in (torch.float16, torch.float32):
                launches, _ = plan(*shape.empty_inputs(dtype), shape.heads, arch=75, sm_count=40)
                for launch in launches:
                    for param in launch.kernel.params:
                        value = launch.args[param.name]
                        if param.is_constexpr:
                            continue
                        kind, divisible = specialize(value)
                        native = native_specialize_impl(BaseBackend, value, False, True, True)
                        assert kind == native[0] and divisible == (native[1] == "D"), (param.name, kind, native)
        print("ok")
    ''')
    done = run_python(["-c", script], compile_env(tmp_path))
    if done.returncode != 0 and "native_specialize_impl" in done.stderr and "ImportError" in done.stderr:
        pytest.skip("this triton has no native_specialize_impl to compare with")
    assert done.returncode == 0 and "ok" in done.stdout, done.stdout + done.stderr


def test_limits_flag_spills_and_shared_memory():
    def result(arch: int, shared: int, spills: int) -> Result:
        return check_limits(Result("op", "k", arch, "cfg", "fp16", registers=64, spill_stores=spills, spill_loads=spills,
                                   shared=shared))

    assert result(75, 64 * 1024, 0).ok
    assert not result(75, 64 * 1024 + 1, 0).ok
    assert result(80, 96 * 1024, 0).ok
    assert "spills" in result(90, 0, 8).errors[0]


def test_a_crashing_or_hanging_compile_is_a_failed_row_and_the_others_finish(monkeypatch):
    """One compile aborts its process, one hangs: each is reported as a failure of its own, the rest complete
    (a multiprocessing pool would wait forever for the task of the worker that died)."""

    def fake_compile(op: str, spec: AotSpec, arch: int) -> Result:
        if spec.kernel == "aborts":
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file
            faulthandler.disable()  # and no traceback from pytest's handler, inherited by the fork
            os.abort()
        if spec.kernel == "hangs":
            time.sleep(60)
        return Result(op, spec.kernel, arch, spec.config(), spec.dtype, registers=8, spill_stores=0, spill_loads=0,
                      shared=0)

    names = ["ok_a", "aborts", "hangs", "ok_b", "ok_c"]
    monkeypatch.setattr(aot, "_JOBS", [("op", 75, AotSpec(n, None, {}, {}, {}, 1, 1, "fp32")) for n in names])
    monkeypatch.setattr(aot, "compile_spec", fake_compile)
    start = time.monotonic()
    results = aot.run_jobs(jobs=2, timeout=2.0)
    assert time.monotonic() - start < 30
    assert [r.kernel for r in results] == names
    assert [r.ok for r in results] == [True, False, False, True, True]
    assert "crashed" in results[1].errors[0] and "SIGABRT" in results[1].errors[0]
    assert "timed out after 2 s" in results[2].errors[0]
