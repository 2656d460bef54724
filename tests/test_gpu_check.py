"""The runner of `make gpu-check` (bench/gpu_check.py), with stand-in steps: time limits that kill a step and
everything it started, a budget shared by the steps, failure isolation, GPU steps skipped without a device,
the summary; and the parsers of what the real steps produce. `make test` runs the real dry mode itself."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = gpu_check
spec.loader.exec_module(gpu_check)


def python_step(name: str, code: str, limit: float = 30, estimate: float = 1, needs_gpu: bool = False):
    """A step whose process runs `code` (with OUT = the output folder, NAME = the step's name)."""
    script = f"import json, os, sys, time, subprocess\nOUT, NAME = sys.argv[1], {name!r}\n" + textwrap.dedent(code)
    return gpu_check.Step(name, f"stand-in {name}", limit, estimate, needs_gpu,
                          command=lambda ctx: [sys.executable, "-c", script, str(ctx.out)])


def write_figures(figures: dict) -> str:
    return f"open(os.path.join(OUT, NAME + '.json'), 'w').write(json.dumps({figures!r}))\n"


@pytest.fixture
def ctx(tmp_path):
    return gpu_check.Context(out=tmp_path / "out")


def test_a_failing_or_crashing_step_does_not_stop_the_others(ctx):
    steps = [python_step("first", write_figures({"answer": 42})),
             python_step("fails", write_figures({"_reason": "found 3 problems", "failures": ["a", "b", "c"]})
                         + "sys.exit(1)"),
             python_step("crashes", "os.abort()"),
             python_step("last", write_figures({"answer": 43}))]
    results = gpu_check.run_steps(steps, ctx, budget=120)
    assert [r.status for r in results] == ["ok", "failed", "failed", "ok"]
    assert results[0].figures == {"answer": 42} and results[3].figures == {"answer": 43}
    assert results[1].reason == "found 3 problems" and results[1].figures["failures"] == ["a", "b", "c"]
    assert "exit code" in results[2].reason
    summary = gpu_check.write_summary(results, ctx, "test", 120).read_text()
    for r in results:
        assert f"| {r.name} | {r.title} | {r.status}" in summary
    assert "## fails: failed" in summary and "- b" in summary
    assert [r["status"] for r in json.loads((ctx.out / "summary.json").read_text())] == ["ok", "failed", "failed", "ok"]


def test_a_step_past_its_limit_is_killed_with_everything_it_started(ctx):
    """The step and a grandchild it started both sleep; at the limit both die, and the figures the step had
    recorded by then survive."""
    pid_file = ctx.out.parent / "grandchild.pid"
    hang = python_step("hangs", write_figures({"partial": True}) + textwrap.dedent(f"""
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        open({str(pid_file)!r}, "w").write(str(child.pid))
        time.sleep(120)
    """), limit=3)
    start = time.monotonic()
    result, after = gpu_check.run_steps([hang, python_step("after", write_figures({"ran": True}))], ctx, budget=120)
    assert time.monotonic() - start < 3 + gpu_check.KILL_GRACE_S + 10
    assert result.status == "timeout" and "3 s limit" in result.reason and result.figures == {"partial": True}
    grandchild = int(pid_file.read_text())
    for _ in range(50):
        if not gpu_check.alive(grandchild):
            break
        time.sleep(0.1)
    assert not gpu_check.alive(grandchild), "the step's grandchild outlived the step"
    assert after.status == "ok" and after.figures == {"ran": True}


def test_the_budget_keeps_time_for_the_later_steps():
    step = gpu_check.Step("s", "s", limit_s=100, estimate_s=10, needs_gpu=False)
    later = [gpu_check.Step("t", "t", 100, 30, False), gpu_check.Step("u", "u", 100, 20, False)]
    assert gpu_check.allotment(step, later, left=400) == 100  # its own limit
    assert gpu_check.allotment(step, later, left=90) == 40  # what the later steps' 50 s estimates leave
    assert gpu_check.allotment(step, later, left=30) == 10  # at least its own estimate ...
    assert gpu_check.allotment(step, later, left=5) == 5  # ... but never past the budget


def test_a_spent_budget_stops_the_run_instead_of_overrunning(ctx, monkeypatch):
    """A 3 s budget: the slow step gets 2 s (1 s is kept for the next one's estimate) and is stopped; the next
    one is then not started at all."""
    monkeypatch.setattr(gpu_check, "MIN_STEP_S", 1.0)
    steps = [python_step("slow", "time.sleep(60)", limit=100, estimate=1), python_step("next", "", estimate=1)]
    start = time.monotonic()
    slow, nxt = gpu_check.run_steps(steps, ctx, budget=3)
    assert time.monotonic() - start < 3 + gpu_check.KILL_GRACE_S + 5
    assert slow.status == "timeout" and slow.limit_s == pytest.approx(2, abs=0.2) and slow.seconds >= 1.5
    assert nxt.status == "timeout" and "budget is spent" in nxt.reason


def test_without_a_device_the_gpu_steps_are_skipped_and_the_run_passes(ctx):
    """... and a step that also runs without a device takes its CPU limit (1.5 s of work past a 1 s GPU limit)."""
    cpu_step = python_step("cpu", "time.sleep(1.5)\n" + write_figures({"ran": True}), limit=1)
    steps = [python_step("environment", write_figures({"cuda_devices": 0})),
             python_step("gpu", "sys.exit(1)", needs_gpu=True),
             dataclasses.replace(cpu_step, cpu_limit_s=30)]
    results = gpu_check.run_steps(steps, ctx, budget=60, skip=gpu_check.device_skip(ctx, False, steps))
    assert [(r.status, r.reason) for r in results] == [("ok", ""), ("skipped", "no CUDA device"), ("ok", "")]
    assert not any(r.bad for r in results) and ctx.device is False
    summary = gpu_check.write_summary(results, ctx, "dry", 60).read_text()
    assert "| gpu | stand-in gpu | skipped: no CUDA device |" in summary


def test_a_step_body_reports_its_failure_or_crash(ctx, capsys):
    ctx.out.mkdir(parents=True)

    def fails(_):
        raise gpu_check.StepFailed("2 checks failed", {"checks": 5})

    def crashes(_):
        raise RuntimeError("boom")

    assert gpu_check.run_step_body(gpu_check.Step("f", "f", 1, 1, False, fails), ctx) == 1
    assert json.loads((ctx.out / "f.json").read_text()) == {"checks": 5, "_reason": "2 checks failed"}
    assert gpu_check.run_step_body(gpu_check.Step("c", "c", 1, 1, False, crashes), ctx) == 1
    assert json.loads((ctx.out / "c.json").read_text()) == {"_reason": "RuntimeError: boom"}
    assert "Traceback" in capsys.readouterr().err
    assert gpu_check.run_step_body(gpu_check.Step("o", "o", 1, 1, False, lambda _: {"x": 1}), ctx) == 0


def test_the_steps_and_their_estimates_fit_the_budget():
    names = [s.name for s in gpu_check.STEPS]
    assert names == ["environment", "aot", "build", "driver", "parity", "tests", "sanitizer", "bench"]
    assert sum(s.estimate_s for s in gpu_check.STEPS) <= gpu_check.DEFAULT_BUDGET_S - 30
    assert all(s.estimate_s <= s.limit_s for s in gpu_check.STEPS)
    assert [s.name for s in gpu_check.STEPS if not s.needs_gpu] == ["environment", "aot", "driver"]


def test_parsers_of_pytest_and_compute_sanitizer_output():
    assert gpu_check.pytest_counts("....\n3 failed, 250 passed, 12 skipped, 1 error in 95.2s\n") == {
        "failed": 3, "passed": 250, "skipped": 12, "error": 1}
    assert gpu_check.pytest_counts("no summary") == {}
    assert gpu_check.sanitizer_errors("========= ERROR SUMMARY: 0 errors\n") == 0
    assert gpu_check.sanitizer_errors("========= ERROR SUMMARY: 7 errors\n") == 7
    assert gpu_check.sanitizer_errors("========= RACECHECK SUMMARY: 4 hazards displayed (1 error, 3 warnings)\n") == 1
    assert gpu_check.sanitizer_errors("crashed before the summary") is None


def test_test_files_are_spread_evenly(tmp_path):
    sizes = [90, 50, 40, 30, 30, 20, 10, 5]
    files = []
    for i, size in enumerate(sizes):
        files.append(tmp_path / f"test_{i}.py")
        files[-1].write_text("x" * size)
    buckets = gpu_check.split_test_files(files, 3)
    assert sorted(p for b in buckets for p in b) == sorted(files)
    totals = sorted(sum(p.stat().st_size for p in b) for b in buckets)
    assert totals[-1] - totals[0] <= max(sizes[1:])


def test_the_sanitizer_filter_names_whole_project_kernels():
    import re

    regex = re.compile(gpu_check.kernel_regex())
    for name in ("fpn_upsample_add_kernel", "_attend_bits_kernel",  # Triton: plain names
                 "_ZN12_GLOBAL__N_114sigmoid_kernelIfEEvPKT_Pfl",  # CUDA, mangled
                 "void (anonymous namespace)::mask_stats_kernel(const float*, int)"):  # CUDA, demangled
        assert regex.search(name), name
    for name in ("void at::native::vectorized_elementwise_kernel<4, at::native::sigmoid_kernel_cuda(at::Tensor&)>",
                 "_ZN2at6native19sigmoid_kernel_cudaERNS_18TensorIteratorBaseE", "ampere_sgemm_128x64_nn"):
        assert not regex.search(name), name


def test_roofline_fractions_use_this_gpus_peaks(tmp_path):
    report = {"measured_on": "NVIDIA H200", "calls": [
        {"op": "fpn_upsample_add", "shape": "s", "dtype": "float16", "mb": 4.8, "gflop": 0.001, "floor_us": 15.0,
         "measured_us": 2.0},
        {"op": "x", "shape": "s", "dtype": "float16", "mb": 1.0, "gflop": 1.0, "floor_us": 1.0, "measured_us": None}]}
    path = tmp_path / "roofline.json"
    path.write_text(json.dumps(report))
    summary = gpu_check.summarise_roofline(path)
    assert summary["calls"] == 2 and len(summary["measured"]) == 1
    row = summary["measured"][0]
    assert row["device_floor_us"] == pytest.approx(1.0) and row["achieved"] == pytest.approx(0.5)
    assert gpu_check.device_floor_us(report["calls"][0], "Some Unknown GPU") is None


def test_the_context_runs_commands_from_the_source_tree(ctx):
    ctx.logs.mkdir(parents=True)
    probe = "import importlib.util as u, os; print(u.find_spec('fai_mf').origin, os.environ['TRITON_CACHE_DIR'])"
    code, output = ctx.run([sys.executable, "-c", probe], "probe", timeout=60)
    origin, cache = output.strip().splitlines()[-1].split()
    assert code == 0 and origin == str(REPO / "src" / "fai_mf" / "__init__.py")
    assert cache == str(ctx.out / "triton-cache")
    assert "TRITON_INTERPRET" not in ctx.env() and str(REPO / "src") in ctx.env()["PYTHONPATH"].split(os.pathsep)
