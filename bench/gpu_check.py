"""What the project does on a real GPU, in one command: `make gpu-check`, or `python bench/gpu_check.py`.

    python bench/gpu_check.py [--out out/gpu-check] [--dry-run] [--steps aot,parity] [--budget 480]

Runs from the source tree with the Python that runs it, and that Python's torch, triton and nvcc: no
venv, no pip, nothing downloaded. Each step runs in a process group of its own under its own time limit
(a step that fails, crashes or hangs does not stop the others), and with a CUDA device all of them within
one budget: a step gets at most what is left once the later steps' estimates are kept back. Steps (limit
/ estimate on an H200 with 16 CPU cores, seconds; without a device, aot and driver get 900 and 300):

  environment  nvidia-smi, versions, missing optional modules, `python -m mf_kernels.info`       30 /   8
  aot          every Triton kernel compiled afresh for sm_75/80/90: no spill, shared memory ok   90 /  30
  build        the CUDA extension through setup.py (build_ext --inplace), loaded and checked    150 /  80
  driver       each kernel once at small edge shapes, checked (in the interpreter without GPU)   40 /  10
  parity       every Triton and CUDA kernel vs its reference: 640² and edge shapes, fp32/fp16   120 /  60
  tests        the test suite on the device (pytest, files spread over 4 processes)             150 / 100
  sanitizer    compute-sanitizer memcheck, racecheck, synccheck over the driver (our kernels)    90 /  45
  bench        do_bench microbenchmarks; `fai-mf bench fps` fp16 + CUDA graphs for
               fai-mf-s-coco-ins and fai-mf-m-ade at 640²; `fai-mf bench roofline` measured     120 /  90
                                                                                   total estimate  423

The output folder holds summary.md (every step: status, time, key figures), summary.json, one JSON per
step, logs/ (every command's output), the FPS plots (when matplotlib exists) and the Triton cache the
steps share. Without a CUDA device only environment, aot and driver (Triton interpreter) run; the other
steps are marked "skipped: no CUDA device" (with --dry-run: "skipped: dry run") and the exit code is 0
when those three pass, so CI runs this. The exit code is 1 when any step failed or ran out of time.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
DEFAULT_BUDGET_S = 480.0  # the whole run, on an H200
MIN_STEP_S = 5.0  # a step is not started with less than this
KILL_GRACE_S = 5.0  # SIGTERM, then SIGKILL after this
NO_DEVICE = "no CUDA device"
TOOLS = ("memcheck", "racecheck", "synccheck")
FPS_MODELS = ("fai-mf-s-coco-ins", "fai-mf-m-ade")
TEST_PROCESSES = 4


# ----------------------------------------------------------------------------------------------------
# Steps, results and the context a step runs in


@dataclass(frozen=True)
class Step:
    """One step: `body(ctx)` runs in a child process and returns its key figures (raising StepFailed, or any
    exception, fails it); `command` replaces that child (tests of the runner use it). `limit_s` and
    `estimate_s` are for the GPU machine; `cpu_limit_s` is the limit of a step that runs without a device
    (a 2-core CI machine compiles for minutes, the interpreter is slow)."""

    name: str
    title: str
    limit_s: float
    estimate_s: float
    needs_gpu: bool
    body: Callable[["Context"], dict[str, Any]] | None = None
    command: Callable[["Context"], list[str]] | None = None
    cpu_limit_s: float | None = None


@dataclass
class StepResult:
    name: str
    title: str
    status: str  # ok | failed | timeout | skipped
    seconds: float = 0.0
    limit_s: float = 0.0
    estimate_s: float = 0.0
    reason: str = ""
    figures: dict[str, Any] = field(default_factory=dict)
    log: str = ""

    @property
    def bad(self) -> bool:
        return self.status in ("failed", "timeout")


class StepFailed(Exception):
    """The step ran and found a problem; its figures are kept."""

    def __init__(self, message: str, figures: dict[str, Any] | None = None):
        super().__init__(message)
        self.figures = figures or {}


@dataclass
class Context:
    """Where a step writes and how it runs commands: the output folder, the environment every child gets
    (the source tree on PYTHONPATH, one Triton cache), and the step's own deadline."""

    out: Path
    device: bool = False  # a CUDA device is present (and --dry-run was not given)
    jobs: int = 1
    deadline: float = float("inf")  # time.monotonic() by which the current step must end
    python: str = sys.executable
    step: str = ""

    @property
    def logs(self) -> Path:
        return self.out / "logs"

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of every child: the source tree first on PYTHONPATH, this Python's bin/ first on PATH
        (its ninja), one Triton cache in the output folder (the AOT step fills it for the later ones)."""
        env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MF_KERNELS")}
        path = [str(REPO), str(REPO / "src")] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        tools = [os.path.dirname(self.python)] + env.get("PATH", os.defpath).split(os.pathsep)  # its ninja, pytest
        env.update(PYTHONPATH=os.pathsep.join(path), PATH=os.pathsep.join(tools), PYTHONUNBUFFERED="1",
                   TRITON_CACHE_DIR=str(self.out / "triton-cache"))
        env.update(extra)
        return env

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, cmd: list[str], log_name: str, timeout: float | None = None, **env: str) -> tuple[int, str]:
        """Run `cmd` in the repository with its output in logs/`log_name`.log; (exit code, output). 124 when it
        ran past `timeout` (default: what is left of the step)."""
        timeout = min(timeout or self.left(), self.left())
        log = self.logs / f"{log_name}.log"
        with open(log, "w") as f:
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            code = run_group(cmd, f, timeout, cwd=REPO, env=self.env(**env))
        return code, log.read_text(errors="replace")

    def record(self, figures: dict[str, Any]) -> None:
        """Write the step's figures so far (what survives a timeout)."""
        (self.out / f"{self.step}.json").write_text(json.dumps(figures, indent=1, default=str))


def descendants(pid: int) -> list[int]:
    """Every living descendant of `pid` (from /proc; [] where there is no /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped by its new parent, does not)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def kill_tree(process: subprocess.Popen, group: bool) -> None:
    """SIGTERM `process`, everything it started (and its process group when it leads one); SIGKILL whatever is
    still alive after a grace period. The descendants are listed first: once `process` dies they are orphans."""
    pids = [process.pid] + descendants(process.pid)
    for sig, grace in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, 1.0)):
        pids += [p for p in descendants(process.pid) if p not in pids]
        if group:
            try:
                os.killpg(process.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        for pid in pids:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        end = time.monotonic() + grace
        while time.monotonic() < end and (process.poll() is None or any(alive(p) for p in pids[1:])):
            time.sleep(0.05)
    process.wait()


def run_group(cmd: list[str], output: Any, timeout: float, new_group: bool = False, **kwargs: Any) -> int:
    """Run `cmd` (in a process group of its own with `new_group`); past `timeout`, SIGTERM it and everything it
    started, SIGKILL them after a grace period, and return 124 (as timeout(1) does)."""
    process = subprocess.Popen(cmd, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               start_new_session=new_group, **kwargs)
    try:
        return process.wait(timeout=max(0.0, timeout))
    except subprocess.TimeoutExpired:
        kill_tree(process, new_group)
        return 124
    finally:
        if new_group:  # whatever the command left behind in its group (a daemon, a hung grandchild)
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def python_json(ctx: Context, code: str, log_name: str, timeout: float = 120, **env: str) -> dict[str, Any]:
    """Run Python `code` that prints one JSON object on its last line; that object ({} on failure)."""
    code_rc, output = ctx.run([ctx.python, "-c", code], log_name, timeout, **env)
    lines = [line for line in output.splitlines() if line.startswith("{")]
    if code_rc != 0 or not lines:
        return {}
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------------------------------
# Step bodies (each runs in its own process: `python bench/gpu_check.py --run-step NAME`)

ENVIRONMENT_PROBE = r"""
import json, platform, shutil, sys
from importlib import metadata
import torch
info = {"python": platform.python_version(), "executable": sys.executable, "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0, "devices": []}
for i in range(info["cuda_devices"]):
    p = torch.cuda.get_device_properties(i)
    info["devices"].append({"name": p.name, "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
                            "memory_gb": round(p.total_memory / 2**30, 1)})
versions, missing = {}, []
for dist in ("triton", "numpy", "scipy", "pycocotools", "matplotlib", "pillow", "pytest", "pytest-benchmark",
             "ninja", "setuptools"):
    try:
        versions[dist] = metadata.version(dist)
    except metadata.PackageNotFoundError:
        missing.append(dist)
info["versions"], info["missing_modules"] = versions, missing
from mf_kernels import build
info["cuda_home"] = build.cuda_home()
info["ninja"] = shutil.which("ninja")
from fai_mf.profile import git_sha
info["git_sha"] = git_sha()
print(json.dumps(info))
"""


def step_environment(ctx: Context) -> dict[str, Any]:
    figures = python_json(ctx, ENVIRONMENT_PROBE, "environment-probe")
    if not figures:
        raise StepFailed("the environment probe failed (see logs/environment-probe.log)")
    figures["platform"] = platform.platform()
    figures["tools"] = {name: shutil.which(name) for name in ("nvidia-smi", "nvcc", "compute-sanitizer", "ncu")}
    figures["tools"]["compute-sanitizer"] = find_sanitizer(figures.get("cuda_home"))
    ctx.record(figures)
    if figures["tools"]["nvidia-smi"]:
        ctx.run(["nvidia-smi"], "nvidia-smi", 20)
        _, query = ctx.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap,clocks.max.sm",
                            "--format=csv,noheader"], "nvidia-smi-query", 20)
        figures["nvidia_smi"] = [line for line in query.splitlines()[1:] if line.strip()]
    if figures.get("cuda_home"):
        _, nvcc = ctx.run([str(Path(figures["cuda_home"]) / "bin" / "nvcc"), "--version"], "nvcc-version", 20)
        figures["nvcc"] = (re.findall(r"release [\d.]+, V[\d.]+", nvcc) or ["?"])[-1]
    ctx.run([ctx.python, "-m", "mf_kernels.info"], "mf_kernels-info", 60, MF_KERNELS_JIT="0")  # no build here
    return figures


def find_sanitizer(cuda_home: str | None) -> str | None:
    candidates = [shutil.which("compute-sanitizer")]
    candidates += [str(Path(home) / "bin" / "compute-sanitizer") for home in (cuda_home, "/usr/local/cuda") if home]
    return next((c for c in candidates if c and os.path.isfile(c)), None)


def step_aot(ctx: Context) -> dict[str, Any]:
    report = ctx.out / "aot-results.json"
    start = time.monotonic()
    code, output = ctx.run([ctx.python, "-m", "mf_kernels.aot", "--arch", "75,80,90", "--jobs", str(ctx.jobs),
                            "--json", str(report)], "aot", TRITON_ALWAYS_COMPILE="1")
    if code == 124:
        raise StepFailed(f"mf_kernels.aot did not finish in {time.monotonic() - start:.0f} s")
    results = json.loads(report.read_text()) if report.exists() else []
    failed = [r for r in results if not r["ok"]]
    figures = {"compiles": len(results), "failed": len(failed),
               "max_registers": max((r["registers"] or 0 for r in results), default=None),
               "max_shared_by_arch": {str(a): max((r["shared"] or 0 for r in results if r["arch"] == a), default=0)
                                      for a in sorted({r["arch"] for r in results})},
               "failures": [f"{r['kernel']} sm_{r['arch']} {r['config']} {r['dtype']}: {'; '.join(r['errors'])}"
                            for r in failed][:20],
               "summary": next((line for line in reversed(output.splitlines()) if " compiles (" in line), "")}
    if code != 0:
        raise StepFailed(figures["summary"] or f"exit code {code}", figures)
    return figures


EXTENSION_PROBE = r"""
import json
from mf_kernels import _cpp_lib
try:
    ext = _cpp_lib.load()
    print(json.dumps({"loaded_from": _cpp_lib.loaded_from(), **{k: str(v) for k, v in dict(ext.build_info).items()}}))
except _cpp_lib.ExtensionError as exc:
    print(json.dumps({"error": f"{type(exc).__name__}: {exc}".splitlines()[0]}))
"""


def step_build(ctx: Context) -> dict[str, Any]:
    """setup.py's build (the one `pip install -e .` runs, and the one that broke on clashing object names),
    in place, so that every later step loads it; then the extension is loaded and must have CUDA."""
    start = time.monotonic()
    code, _ = ctx.run([ctx.python, "setup.py", "build_ext", "--inplace"], "build-setup", MAX_JOBS=str(ctx.jobs))
    figures: dict[str, Any] = {"setup_exit_code": code, "build_s": round(time.monotonic() - start, 1),
                               "ninja": shutil.which("ninja") is not None}
    info = python_json(ctx, EXTENSION_PROBE, "build-load", MF_KERNELS_JIT="0")
    figures.update(loaded=info)
    ctx.record(figures)
    if code == 0 and info.get("loaded_from") == "setup.py build" and info.get("with_cuda") == "True":
        return figures
    problem = info.get("error") or f"setup.py exit code {code}, extension {info or 'not loadable'}"
    # Later steps still want the CUDA kernels: try the JIT build (ninja) and say whether it works.
    if figures["ninja"]:
        jit = python_json(ctx, EXTENSION_PROBE, "build-jit", timeout=max(MIN_STEP_S, ctx.left()))
        figures["jit_build"] = jit
    raise StepFailed(f"setup.py build of mf_kernels._C with CUDA failed: {problem} (logs/build-setup.log)", figures)


def parity_module():
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    import gpu_parity

    return gpu_parity


def run_checks(ctx: Context, device: str, driver: bool) -> dict[str, Any]:
    """The cases of bench/gpu_parity.py on `device` (only the driver's with `driver`), recorded as they finish."""
    gpu_parity = parity_module()
    selected = [c for c in gpu_parity.cases(device) if c.driver or not driver]

    def record(outcomes: list, unavailable: dict) -> None:
        ctx.record({"device": device, **summarise_checks(gpu_parity.report(outcomes, unavailable))})

    outcomes, unavailable = gpu_parity.run_cases(selected, device, record)
    figures = {"device": device, **summarise_checks(gpu_parity.report(outcomes, unavailable))}
    if figures["failed"]:
        raise StepFailed(f"{figures['failed']} of {figures['checks']} checks failed", figures)
    if not outcomes:
        raise StepFailed(f"no fused backend could run on {device}: {unavailable}", figures)
    return figures


def summarise_checks(report: dict[str, Any]) -> dict[str, Any]:
    by_op: dict[str, str] = {}
    for o in report["outcomes"]:
        key = f"{o['op']}[{o['backend']}]"
        ok, total = (int(n) for n in by_op.get(key, "0/0").split("/"))
        by_op[key] = f"{ok + o['ok']}/{total + 1}"
    return {"checks": report["cases"], "failed": report["failed"], "passed_by_op": by_op,
            "failures": [f"{f['op']}[{f['backend']}] {f['dtype']} {f['case']}: {f['detail']}"
                         for f in report["failures"]],
            "unavailable": report["unavailable"]}


def step_driver(ctx: Context) -> dict[str, Any]:
    """Each kernel once at a small edge shape, with its check: on the GPU when there is one, else the Triton
    kernels in the interpreter (this process was started with TRITON_INTERPRET=1 then)."""
    device = "cuda" if ctx.device else "cpu"
    if device == "cpu":
        from mf_kernels import dispatch

        reasons = dispatch.interpreter_version_reasons()
        if reasons:
            return {"skipped": reasons[0]}
    return run_checks(ctx, device, driver=True)


def step_parity(ctx: Context) -> dict[str, Any]:
    return run_checks(ctx, "cuda", driver=False)


def split_test_files(files: list[Path], count: int) -> list[list[Path]]:
    """Test files spread over `count` buckets of about equal size (each file, largest first, to the lightest)."""
    sizes, buckets = [0] * count, [[] for _ in range(count)]
    for path in sorted(files, key=lambda p: (-p.stat().st_size, p.name)):
        lightest = sizes.index(min(sizes))
        sizes[lightest] += path.stat().st_size
        buckets[lightest].append(path)
    return [sorted(b) for b in buckets if b]


def pytest_counts(output: str) -> dict[str, int]:
    """{passed, failed, skipped, error, ...} from pytest's closing line."""
    lines = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed|error|skipped)", line)]
    return {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected)",
                                               lines[-1])} if lines else {}


def step_tests(ctx: Context) -> dict[str, Any]:
    """The suite in TEST_PROCESSES pytest processes at once (16 CPU cores: the CPU-bound tests dominate)."""
    buckets = split_test_files(sorted((REPO / "tests").glob("test_*.py")), TEST_PROCESSES)
    threads = str(max(1, ctx.jobs // len(buckets)))
    processes = []
    for i, files in enumerate(buckets):
        log = open(ctx.logs / f"tests-{i}.log", "w")
        cmd = [ctx.python, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", "--basetemp",
               str(ctx.out / "pytest-tmp" / str(i)), "--junitxml", str(ctx.out / f"tests-{i}.xml"), *map(str, files)]
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        processes.append((log, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                                env=ctx.env(OMP_NUM_THREADS=threads))))
    figures: dict[str, Any] = {"processes": len(buckets), "counts": {}, "failures": [], "exit_codes": []}
    for log, process in processes:
        try:
            code = process.wait(timeout=max(0.0, ctx.left()))
        except subprocess.TimeoutExpired:  # past the step's limit: this bucket (and so the later ones) unfinished
            kill_tree(process, group=False)
            code = 124
        log.close()
        output = Path(log.name).read_text(errors="replace")
        figures["exit_codes"].append(code)
        for key, value in pytest_counts(output).items():
            figures["counts"][key] = figures["counts"].get(key, 0) + value
        figures["failures"] += re.findall(r"^(?:FAILED|ERROR) (\S+)", output, flags=re.M)
        ctx.record(figures)
    if any(figures["exit_codes"]):
        raise StepFailed(f"pytest: {figures['counts']} (exit codes {figures['exit_codes']})", figures)
    return figures


def kernel_regex() -> str:
    """The project's kernels and nothing else, for compute-sanitizer's --kernel-regex: every `@triton.jit`
    function of mf_kernels/ and every __global__ function of csrc/*.cu, as whole names (mangled or not).
    Read from the sources, so it holds however the modules are laid out (and imports no Triton)."""
    names: set[str] = set()
    for source in sorted((REPO / "mf_kernels").rglob("*.py")):
        names |= set(re.findall(r"^@triton\.jit[^\n]*\ndef (\w+)", source.read_text(), flags=re.M))
    for source in sorted((REPO / "csrc").glob("*.cu")):
        names |= set(re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)", source.read_text()))
    return r"(^|[^A-Za-z_])(" + "|".join(sorted(names)) + r")($|[^a-z_])"


def sanitizer_errors(log: str) -> int | None:
    """The error count of a compute-sanitizer report ("ERROR SUMMARY: N errors", racecheck's "RACECHECK SUMMARY:
    H hazards displayed (N errors, W warnings)"), None without a summary (the tool or the driver crashed)."""
    counts = re.findall(r"(?:ERROR SUMMARY: |RACECHECK SUMMARY: \d+ hazards? displayed \()(\d+) error", log)
    return int(counts[-1]) if counts else None


def step_sanitizer(ctx: Context) -> dict[str, Any]:
    from mf_kernels import build

    sanitizer = find_sanitizer(build.cuda_home())
    if sanitizer is None:
        raise StepFailed("compute-sanitizer not found (PATH, the CUDA toolkit's bin/)")
    _, help_text = ctx.run([sanitizer, "--help"], "sanitizer-help", 30)
    regex = kernel_regex()
    limit = ["--kernel-regex", f"kns={regex}"] if "--kernel-regex" in help_text else []
    figures: dict[str, Any] = {"sanitizer": sanitizer, "kernel_filter": regex if limit else "none (no --kernel-regex)"}
    problems = []
    for i, tool in enumerate(TOOLS):
        share = ctx.left() / (len(TOOLS) - i)
        cmd = [sanitizer, "--tool", tool, "--error-exitcode", "99", "--print-limit", "50", *limit,
               ctx.python, str(BENCH / "gpu_parity.py"), "--driver", "--device", "cuda"]
        code, output = ctx.run(cmd, f"sanitizer-{tool}", share)
        errors = sanitizer_errors(output)
        figures[tool] = {"exit_code": code, "errors": errors}
        if code != 0 or errors:
            problems.append(f"{tool}: exit code {code}, {errors} errors")
        ctx.record(figures)
    if problems:
        raise StepFailed("; ".join(problems), figures)
    return figures


def step_bench(ctx: Context) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    problems = []
    micro = ctx.out / "bench-micro.json"
    code, _ = ctx.run([ctx.python, "-m", "pytest", "-q", "bench", "--benchmark-only", "--quick", "-p",
                       "no:cacheprovider", "--benchmark-json", str(micro)], "bench-micro", ctx.left() * 0.35)
    figures["micro"] = summarise_micro(micro)
    problems += [f"microbenchmarks: exit code {code}"] if code else []
    ctx.record(figures)
    plots = has_module("matplotlib")
    for i, model in enumerate(FPS_MODELS):
        report = ctx.out / f"fps-{model}.json"
        cmd = [ctx.python, "-m", "fai_mf.cli", "bench", "fps", "--model", model, "--device", "cuda", "--dtype", "fp16",
               "--kernels", "auto", "--cuda-graphs", "--resolution", "640", "--iters", "30", "--warmup", "5",
               "--json", str(report)] + (["--plot", str(ctx.out / f"fps-{model}.png")] if plots else [])
        code, _ = ctx.run(cmd, f"bench-fps-{model}", ctx.left() * (0.4 if i == 0 else 0.6))
        figures[f"fps {model}"] = summarise_fps(report)
        problems += [f"fps {model}: exit code {code}"] if code else []
        ctx.record(figures)
    roofline = ctx.out / "roofline.json"
    code, _ = ctx.run([ctx.python, "-m", "fai_mf.cli", "bench", "roofline", "--model", FPS_MODELS[0], "--dtype", "fp16",
                       "--json", str(roofline)], "bench-roofline")
    figures["roofline"] = summarise_roofline(roofline)
    problems += [f"roofline: exit code {code}"] if code else []
    if problems:
        raise StepFailed("; ".join(problems), figures)
    return figures


def has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def summarise_micro(path: Path) -> dict[str, Any]:
    """Benchmark count and the do_bench medians (ms) of each case on CUDA."""
    if not path.exists():
        return {}
    benchmarks = json.loads(path.read_text()).get("benchmarks", [])
    medians = {b["name"]: round(b["extra_info"]["cuda_median_ms"], 4) for b in benchmarks
               if "cuda_median_ms" in b.get("extra_info", {})}
    return {"benchmarks": len(benchmarks), "cuda_median_ms": medians}


def summarise_fps(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    report = json.loads(path.read_text())
    runs = {r["kernels"]: r for r in report["runs"]}
    fused = report["runs"][-1]
    return {"end_to_end_fps": round(fused["end_to_end_fps"], 1), "model_fps": round(fused["model_fps"], 1),
            "reference_end_to_end_fps": round(runs["reference"]["end_to_end_fps"], 1) if "reference" in runs else None,
            "speedup_end_to_end": round(report.get("speedup_end_to_end", 0.0), 2),
            "agreement_ok": (report.get("agreement") or {}).get("ok"), "kernels": fused.get("kernel_choice")}


# Peaks of the GPUs this check knows (dense, no sparsity): bandwidth (B/s), fp16 tensor-core and fp32 FLOP/s.
DEVICE_PEAKS = {"H200": (4.8e12, 989e12, 67e12), "H100": (3.35e12, 989e12, 67e12), "A100": (2.0e12, 312e12, 19.5e12),
                "L4": (300e9, 121e12, 30.3e12), "T4": (320e9, 65e12, 8.1e12)}


def device_floor_us(entry: dict[str, Any], device_name: str | None) -> float | None:
    """This GPU's floor (us) of a roofline entry: max(bytes / bandwidth, FLOPs / peak), or None if unknown."""
    peaks = next((p for key, p in DEVICE_PEAKS.items() if device_name and key in device_name), None)
    if peaks is None:
        return None
    bandwidth, tensor, fp32 = peaks
    peak = tensor if entry["dtype"] == "float16" else fp32
    return 1e6 * max(entry["mb"] * 1e6 / bandwidth, entry["gflop"] * 1e9 / peak)


def summarise_roofline(path: Path) -> dict[str, Any]:
    """Measured time of each kernel call, its floor on this GPU (where DEVICE_PEAKS knows it) and the fraction of
    that floor reached (floor / measured; None for an unknown GPU), next to the T4 floor the report carries."""
    if not path.exists():
        return {}
    report = json.loads(path.read_text())
    device = report.get("measured_on")
    rows = []
    for e in report["calls"]:
        if e.get("measured_us") is None:
            continue
        floor = device_floor_us(e, device)
        rows.append({"op": e["op"], "shape": e["shape"], "measured_us": round(e["measured_us"], 1),
                     "t4_floor_us": round(e["floor_us"], 1),
                     "device_floor_us": None if floor is None else round(floor, 2),
                     "achieved": None if floor is None else round(floor / e["measured_us"], 3)})
    return {"measured_on": device, "calls": len(report["calls"]), "measured": rows}


STEPS = [
    Step("environment", "0. environment: nvidia-smi, versions, missing modules", 30, 8, False, step_environment),
    Step("aot", "0. every Triton kernel compiled for sm_75/80/90 (no GPU needed)", 90, 30, False, step_aot,
         cpu_limit_s=900),
    Step("build", "1. CUDA extension build (setup.py)", 150, 80, True, step_build),
    Step("driver", "2/4. each kernel once at small edge shapes (interpreter without GPU)", 40, 10, False, step_driver,
         cpu_limit_s=300),
    Step("parity", "2. every kernel vs its reference on the device, 640² and edge shapes", 120, 60, True, step_parity),
    Step("tests", "3. the test suite on the device", 150, 100, True, step_tests),
    Step("sanitizer", "4. compute-sanitizer memcheck / racecheck / synccheck", 90, 45, True, step_sanitizer),
    Step("bench", "5. microbenchmarks, FPS (fp16, CUDA graphs), roofline", 120, 90, True, step_bench),
]


# ----------------------------------------------------------------------------------------------------
# The runner


def allotment(step: Step, later: list[Step], left: float, limit: float | None = None) -> float:
    """Seconds `step` may take: its own limit (`limit`, default `step.limit_s`), less what the later steps are
    expected to need of the `left` seconds of the budget, but at least its own estimate and at most `left`."""
    reserve = sum(s.estimate_s for s in later)
    return min(step.limit_s if limit is None else limit, max(step.estimate_s, left - reserve), left)


def step_command(step: Step, ctx: Context, limit: float) -> list[str]:
    if step.command is not None:
        return step.command(ctx)
    return [ctx.python, str(Path(__file__).resolve()), "--run-step", step.name, "--out", str(ctx.out),
            "--jobs", str(ctx.jobs), "--limit", f"{limit:.1f}"] + ([] if ctx.device else ["--dry-run"])


def run_step(step: Step, ctx: Context, limit: float) -> StepResult:
    """Run `step` in its own process group under `limit` seconds; its result (figures from its JSON)."""
    result = StepResult(step.name, step.title, "ok", limit_s=round(limit, 1), estimate_s=step.estimate_s,
                        log=str(ctx.logs / f"{step.name}.log"))
    figures_path = ctx.out / f"{step.name}.json"
    figures_path.unlink(missing_ok=True)
    env = ctx.env(**({"TRITON_INTERPRET": "1"} if step.name == "driver" and not ctx.device else {}))
    start = time.monotonic()
    with open(result.log, "w") as log:
        code = run_group(step_command(step, ctx, limit), log, limit, new_group=True, cwd=REPO, env=env)
    result.seconds = round(time.monotonic() - start, 1)
    if figures_path.exists():
        try:
            result.figures = json.loads(figures_path.read_text())
        except json.JSONDecodeError:
            result.figures = {}
    result.reason = str(result.figures.pop("_reason", ""))
    if code == 124:
        result.status, result.reason = "timeout", f"stopped after its {limit:.0f} s limit" + (
            f" ({result.reason})" if result.reason else "")
    elif code != 0:
        result.status = "failed"
        result.reason = result.reason or f"exit code {code} (see {result.log})"
    elif "skipped" in result.figures:
        result.status, result.reason = "skipped", str(result.figures.pop("skipped"))
    return result


Skip = Callable[[Step, list[StepResult]], "str | None"]


def run_steps(steps: list[Step], ctx: Context, budget: float, skip: Skip = lambda step, done: None) -> list[StepResult]:
    """Every step in order, each under min(its limit, the budget left less the later steps' estimates); without
    a CUDA device, a step with a `cpu_limit_s` runs under that instead. `skip(step, results so far)` gives the
    reason a step does not run (no CUDA device), or None."""
    ctx.out.mkdir(parents=True, exist_ok=True)
    ctx.logs.mkdir(exist_ok=True)
    deadline = time.monotonic() + budget
    results: list[StepResult] = []
    for i, step in enumerate(steps):
        reason = skip(step, results)
        if reason:
            results.append(StepResult(step.name, step.title, "skipped", estimate_s=step.estimate_s, reason=reason))
            continue
        later = [s for s in steps[i + 1:] if not skip(s, results)]
        if ctx.device or step.cpu_limit_s is None:
            limit = allotment(step, later, deadline - time.monotonic())
        else:  # no device: the budget is a GPU machine's; a CPU-only run takes what its steps need
            limit = step.cpu_limit_s
        if limit < min(MIN_STEP_S, step.limit_s):
            results.append(StepResult(step.name, step.title, "timeout", estimate_s=step.estimate_s,
                                      reason=f"not started: the {budget:.0f} s budget is spent"))
            continue
        print(f"[gpu-check] {step.name}: running (limit {limit:.0f} s)", flush=True)
        result = run_step(step, ctx, limit)
        print(f"[gpu-check] {step.name}: {result.status} in {result.seconds:.1f} s"
              + (f" ({result.reason})" if result.reason else ""), flush=True)
        results.append(result)
    return results


def run_step_body(step: Step, ctx: Context) -> int:
    """In the step's own process: run its body, write its figures (and a failure's reason); the exit code."""
    ctx.step = step.name
    try:
        figures = step.body(ctx) if step.body else {}
        ctx.record(figures)
        return 0
    except StepFailed as exc:
        ctx.record({**exc.figures, "_reason": str(exc)})
    except Exception as exc:  # a crash of the step is its failure, with the traceback in its log
        traceback.print_exc()
        ctx.record({"_reason": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]})
    return 1


# ----------------------------------------------------------------------------------------------------
# summary.md


def key_figures(result: StepResult) -> str:
    """One line of the figures that matter for each step."""
    f = result.figures
    if not f:
        return ""
    if result.name == "environment":
        devices = ", ".join(f"{d['name']} (sm_{d['capability'].replace('.', '')})" for d in f.get("devices", []))
        return (f"{devices or 'no CUDA device'}; torch {f.get('torch')} (CUDA {f.get('torch_cuda')}), triton "
                f"{f.get('versions', {}).get('triton')}, nvcc {f.get('nvcc', '-')}; missing: "
                f"{', '.join(f.get('missing_modules', [])) or 'none'}")
    if result.name == "aot":
        return f"{f.get('compiles')} compiles, {f.get('failed')} failed, max {f.get('max_registers')} registers"
    if result.name == "build":
        loaded = f.get("loaded", {})
        return (f"setup.py exit {f.get('setup_exit_code')} in {f.get('build_s')} s (ninja: {f.get('ninja')}); loaded "
                f"from {loaded.get('loaded_from', '-')}, CUDA {loaded.get('with_cuda', '-')}")
    if result.name in ("driver", "parity"):
        return (f"{f.get('checks')} checks, {f.get('failed')} failed on {f.get('device', 'cuda')}; "
                + ", ".join(f"{k} {v}" for k, v in f.get("passed_by_op", {}).items()))
    if result.name == "tests":
        return ", ".join(f"{v} {k}" for k, v in f.get("counts", {}).items()) + f" in {f.get('processes')} processes"
    if result.name == "sanitizer":
        return "; ".join(f"{t}: {f[t]['errors']} errors" for t in TOOLS if t in f)
    if result.name == "bench":
        parts = [f"{len(f.get('micro', {}).get('cuda_median_ms', {}))} do_bench medians"]
        for model in FPS_MODELS:
            fps = f.get(f"fps {model}", {})
            if fps:
                parts.append(f"{model}: {fps['end_to_end_fps']} FPS end to end ({fps['speedup_end_to_end']}x "
                             f"reference, agree {fps['agreement_ok']})")
        return "; ".join(parts)
    return ""


def write_summary(results: list[StepResult], ctx: Context, mode: str, budget: float) -> Path:
    total = sum(r.seconds for r in results)
    spent = f"{total:.0f} s of a {budget:.0f} s budget" if ctx.device else f"{total:.0f} s (no budget without a device)"
    lines = [f"# gpu-check {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}", "",
             f"mode: {mode}; {spent}; output: {ctx.out}", "",
             "| step | what | status | time (s) | limit (s) | H200 estimate (s) | key figures |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        status = r.status + (f": {r.reason}" if r.reason else "")
        lines.append(f"| {r.name} | {r.title} | {status} | {r.seconds:.1f} | {r.limit_s:.0f} | {r.estimate_s:.0f} | "
                     f"{key_figures(r).replace('|', '/')} |")
    for r in results:
        details = [x for x in r.figures.get("failures", [])] if isinstance(r.figures.get("failures"), list) else []
        if details or r.bad:
            lines += ["", f"## {r.name}: {r.status}", "", r.reason, ""] + [f"- {d}" for d in details[:30]]
            lines.append(f"\nlog: {r.log}")
    bench = next((r for r in results if r.name == "bench" and r.figures), None)
    if bench:
        lines += ["", "## microbenchmarks (do_bench medians, ms)", ""]
        lines += [f"- {name}: {ms}" for name, ms in bench.figures.get("micro", {}).get("cuda_median_ms", {}).items()]
        rows = bench.figures.get("roofline", {}).get("measured", [])
        if rows:
            lines += ["", "## roofline (measured vs floor)", "",
                      "| op | shape | measured us | floor us here | achieved | T4 floor us |",
                      "|---|---|---|---|---|---|"]
            lines += [f"| {r['op']} | {r['shape']} | {r['measured_us']} | {r['device_floor_us']} | {r['achieved']} | "
                      f"{r['t4_floor_us']} |" for r in rows]
    path = ctx.out / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    (ctx.out / "summary.json").write_text(json.dumps([asdict(r) for r in results], indent=1, default=str))
    return path


def cuda_device_count(ctx: Context) -> int:
    probe = "import json, torch; print(json.dumps({'n': torch.cuda.device_count()}))"
    info = python_json(ctx, probe, "device-count", 120)
    return int(info.get("n", 0))


def device_skip(ctx: Context, dry_run: bool, steps: list[Step]) -> Skip:
    """The skip rule of a real run: GPU steps need a CUDA device (counted by the environment step, else probed
    once) and no --dry-run. Sets `ctx.device` before any step but the environment runs; until the
    environment step has run, every step counts as runnable."""
    known: list[int] = []
    environment_planned = any(s.name == "environment" for s in steps)

    def skip(step: Step, done: list[StepResult]) -> str | None:
        if step.name == "environment":
            return None
        if not known and environment_planned and not any(r.name == "environment" for r in done):
            return None
        if not known:
            env = next((r for r in done if r.name == "environment" and "cuda_devices" in r.figures), None)
            known.append(int(env.figures["cuda_devices"]) if env else cuda_device_count(ctx))
            ctx.device = known[0] > 0 and not dry_run
        if not step.needs_gpu:
            return None
        return NO_DEVICE if known[0] == 0 else ("dry run (--dry-run)" if dry_run else None)

    return skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/gpu_check.py", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "out" / "gpu-check", help="output folder")
    parser.add_argument("--dry-run", action="store_true", help="run only what needs no CUDA device")
    parser.add_argument("--steps", help=f"comma-separated subset of: {', '.join(s.name for s in STEPS)}")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds for the whole run")
    parser.add_argument("--jobs", type=int, default=min(16, os.cpu_count() or 1), help="parallel compiles / threads")
    parser.add_argument("--run-step", help=argparse.SUPPRESS)  # internal: run one step's body in this process
    parser.add_argument("--limit", type=float, default=float("inf"), help=argparse.SUPPRESS)  # with --run-step
    args = parser.parse_args(argv)
    ctx = Context(out=args.out.resolve(), jobs=args.jobs)
    by_name = {s.name: s for s in STEPS}
    if args.run_step:  # leave a moment to write the figures before the runner's kill
        ctx.device, ctx.deadline = not args.dry_run, time.monotonic() + args.limit - 2.0
        return run_step_body(by_name[args.run_step], ctx)
    unknown = sorted(set((args.steps or "").split(",")) - set(by_name) - {""})
    if unknown:
        parser.error(f"unknown steps {', '.join(unknown)}; choose from {', '.join(by_name)}")
    steps = [s for s in STEPS if not args.steps or s.name in args.steps.split(",")]
    results = run_steps(steps, ctx, args.budget, device_skip(ctx, args.dry_run, steps))
    mode = "CUDA device" if ctx.device else "dry: " + next((r.reason for r in results if r.status == "skipped"), "")
    summary = write_summary(results, ctx, mode, args.budget)
    print(summary.read_text())
    return 1 if any(r.bad for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
