"""Ahead-of-time check of every registered Triton kernel, with no GPU.

    python -m mf_kernels.aot [--arch 75,80,90] [--json FILE]

compiles, for each architecture, every launch the Triton kernels would make at the model's shapes
(each config and dtype) with `triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`, and
prints kernel, arch, config, dtype, registers, spills and shared memory (rows that differ only in the
alignment specialisation of another shape are merged: worst values, `n` compiles). It exits non-zero on a compile
failure, on any register spill, or on shared memory above the architecture's per-block limit (64 KB on
sm_75, the T4). Registers and spills come from `ptxas -v` on the PTX Triton produced (the same ptxas
Triton uses; loading the cubin to read them would need a driver); shared memory from Triton's metadata.

An op plugs in with `mf_kernels.dispatch.register_aot_provider(name, "module:function")`, where `function(arch)` returns the
`AotSpec`s of its launches (usually built from the launcher's own `Launch` objects with
`spec_from_launch`, so the check compiles exactly what the launcher would launch). The module is
imported only here, so registering costs nothing at `import mf_kernels`.

Run it in a process without TRITON_INTERPRET (the interpreter replaces `@triton.jit` functions).
"""
from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing
import multiprocessing.connection
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

DEFAULT_ARCHS = (75, 80, 90)
# Max shared memory per block (opt-in), bytes. T4 (sm_75): 64 KB.
SHARED_LIMITS = {75: 64 * 1024, 80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
TORCH_TO_TRITON = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
                   torch.int32: "i32", torch.int64: "i64", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}


@dataclass
class AotSpec:
    """One compile: a jit function with its signature, constexprs, alignment attrs and options."""

    kernel: str
    fn: Any = field(repr=False)
    signature: dict[str, str]
    constexprs: dict[str, Any]
    attrs: dict[tuple[int, ...], list]
    num_warps: int
    num_stages: int
    dtype: str

    def config(self) -> str:
        """Tile constexprs (upper-case names) and launch options: what distinguishes the configs."""
        tiles = [f"{k}={v}" for k, v in self.constexprs.items() if k.isupper()]
        return " ".join(tiles + [f"warps={self.num_warps}", f"stages={self.num_stages}"])

    def key(self) -> tuple:
        return (self.kernel, self.dtype, tuple(self.signature.items()), tuple(map(str, self.constexprs.items())),
                tuple(map(str, self.attrs.items())), self.num_warps, self.num_stages)


def specialize(value: Any) -> tuple[str, bool]:
    """(signature type, divisible by 16) of a launch argument, as Triton's JIT specialises it: tensors
    by dtype and 16-byte alignment, ints equal to 1 become constexprs, other ints i32/i64 with a
    divisibility-by-16 hint, floats fp32."""
    if isinstance(value, torch.Tensor):
        return "*" + TORCH_TO_TRITON[value.dtype], value.data_ptr() % 16 == 0
    if isinstance(value, bool):
        return "i1", False
    if isinstance(value, int):
        if value == 1:
            return "constexpr", False
        return ("i32" if -2**31 <= value < 2**31 else "i64"), value % 16 == 0
    if isinstance(value, float):
        return "fp32", False
    raise TypeError(f"cannot specialise a launch argument of type {type(value).__name__}")


def spec_from_launch(launch: Any, dtype: str) -> AotSpec:
    """The AotSpec of a launcher's `Launch` (kernel, args in order, num_warps, num_stages)."""
    fn = launch.kernel
    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(fn.params):
        name, value = param.name, launch.args[param.name]
        if param.is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
            continue
        kind, divisible = specialize(value)
        signature[name] = kind
        if kind == "constexpr":
            constexprs[name] = value
        elif divisible:
            attrs[(index,)] = [["tt.divisibility", 16]]
    return AotSpec(fn.__name__, fn, signature, constexprs, attrs, launch.num_warps, launch.num_stages, dtype)


@dataclass
class Result:
    op: str
    kernel: str
    arch: int
    config: str
    dtype: str
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    shared: int | None = None
    compile_s: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def ptxas_path(arch: int) -> str:
    from triton import knobs

    tool = knobs.nvidia.ptxas_blackwell if arch >= 100 else knobs.nvidia.ptxas
    return tool.path


def ptxas_usage(ptx: str, arch: int) -> dict[str, int]:
    """Registers and spill bytes from `ptxas -v` with the flags Triton compiles with."""
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [ptxas_path(arch), "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(arch)}", src,
               "-o", os.path.join(tmp, "kernel.cubin")]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"ptxas failed ({done.returncode}): {done.stderr.strip()[:500]}")
        log = done.stderr
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if registers is None or spills is None:
        raise RuntimeError(f"cannot parse ptxas -v output:\n{log}")
    return {"registers": int(registers.group(1)), "spill_stores": int(spills.group(1)),
            "spill_loads": int(spills.group(2))}


def compile_spec(op: str, spec: AotSpec, arch: int) -> Result:
    import triton
    from triton.backends.compiler import GPUTarget

    result = Result(op, spec.kernel, arch, spec.config(), spec.dtype)
    start = time.perf_counter()
    try:
        source = triton.compiler.ASTSource(spec.fn, spec.signature, spec.constexprs, spec.attrs)
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
        result.shared = int(compiled.metadata.shared)
        usage = ptxas_usage(compiled.asm["ptx"], arch)
        result.registers, result.spill_stores, result.spill_loads = (
            usage["registers"], usage["spill_stores"], usage["spill_loads"])
    except Exception as exc:  # report every failure in the table; the exit code says it failed
        result.errors.append(f"compile failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}")
    result.compile_s = time.perf_counter() - start
    return check_limits(result)


def check_limits(result: Result) -> Result:
    """Add an error for any spill and for shared memory above the architecture's per-block limit."""
    if result.spill_stores or result.spill_loads:
        result.errors.append(f"spills {result.spill_stores} B stored / {result.spill_loads} B loaded")
    limit = SHARED_LIMITS.get(result.arch)
    if result.shared is not None and limit is not None and result.shared > limit:
        result.errors.append(f"shared memory {result.shared} B > {limit} B limit of sm_{result.arch}")
    return result


def load_provider(provider: str) -> Callable[[int], list[AotSpec]]:
    module, _, function = provider.partition(":")
    return getattr(importlib.import_module(module), function)


def collect(archs: tuple[int, ...], ops: tuple[str, ...] | None = None) -> list[tuple[str, int, AotSpec]]:
    """(op, arch, spec) for every registered provider (or those named in `ops`) and arch, deduplicated."""
    import mf_kernels  # noqa: F401  (importing the package registers every op's provider)
    from .dispatch import AOT_PROVIDERS

    unknown = sorted(set(ops or ()) - set(AOT_PROVIDERS))
    if unknown:
        raise ValueError(f"no AOT provider named {', '.join(unknown)}; registered: {', '.join(sorted(AOT_PROVIDERS))}")
    jobs, seen = [], set()
    for op, provider in sorted(AOT_PROVIDERS.items()):
        if ops and op not in ops:
            continue
        specs_of = load_provider(provider)
        for arch in archs:
            for spec in specs_of(arch):
                if (arch, spec.key()) not in seen:
                    seen.add((arch, spec.key()))
                    jobs.append((op, arch, spec))
    return jobs


_JOBS: list[tuple[str, int, AotSpec]] = []  # read by forked workers (jit functions do not pickle)
COMPILE_TIMEOUT_S = 300.0  # one compile; the slowest here (fp32 GEMM on sm_90) takes a few seconds


def _compile_job(index: int) -> Result:
    op, arch, spec = _JOBS[index]
    return compile_spec(op, spec, arch)


def _worker(index: int, conn: Any) -> None:
    conn.send(_compile_job(index))
    conn.close()


def _failed_job(index: int, reason: str) -> Result:
    op, arch, spec = _JOBS[index]
    return Result(op, spec.kernel, arch, spec.config(), spec.dtype, errors=[reason])


def _exit_reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


def _warm_up_compiler() -> None:
    """Do once, before forking, what the first compile of every process would otherwise redo (about a second
    each): import Triton's code generator and hash Triton's own files for the cache key (lru-cached).
    Only a speed-up: a Triton without these names just compiles a little slower."""
    try:
        import triton.compiler.code_generator  # noqa: F401
        from triton.runtime.cache import triton_key

        triton_key()
    except (ImportError, AttributeError):
        pass


def run_jobs(jobs: int = 1, timeout: float = COMPILE_TIMEOUT_S) -> list[Result]:
    """Compile every entry of `_JOBS`, each in a process of its own forked from this one, `jobs` at a time.

    A compile that crashes its process (an abort or segfault inside LLVM or ptxas) or runs past `timeout`
    seconds is a failed row of its own; the others go on. A pool would hang instead: a worker that dies
    takes its task with it and `Pool.map` waits for it forever."""
    _warm_up_compiler()
    context = multiprocessing.get_context("fork")
    results: dict[int, Result] = {}
    pending = list(range(len(_JOBS)))
    running: dict[Any, tuple[int, Any, float]] = {}  # the result pipe's read end -> (job, process, deadline)
    while pending or running:
        while pending and len(running) < max(1, jobs):
            index = pending.pop(0)
            receiver, sender = context.Pipe(duplex=False)
            process = context.Process(target=_worker, args=(index, sender), daemon=True)
            process.start()
            sender.close()  # the child holds the only write end: its exit, however it dies, wakes the wait below
            running[receiver] = (index, process, time.monotonic() + timeout)
        next_deadline = min(deadline for _, _, deadline in running.values())
        for receiver in multiprocessing.connection.wait(list(running), max(0.0, next_deadline - time.monotonic())):
            index, process, _ = running.pop(receiver)
            try:
                result = receiver.recv()
            except EOFError:  # the process ended without sending its result
                result = None
            receiver.close()
            process.join()
            results[index] = result or _failed_job(index, f"compile process crashed ({_exit_reason(process.exitcode)})")
        for receiver, (index, process, deadline) in list(running.items()):
            if time.monotonic() >= deadline:
                process.kill()
                process.join()
                receiver.close()
                del running[receiver]
                results[index] = _failed_job(index, f"compile timed out after {timeout:.0f} s")
    return [results[i] for i in range(len(_JOBS))]


def run(archs: tuple[int, ...] = DEFAULT_ARCHS, jobs: int = 1, ops: tuple[str, ...] | None = None,
        timeout: float = COMPILE_TIMEOUT_S) -> list[Result]:
    """Compile every spec (of `ops`, default all) for every arch, `jobs` forked processes at a time."""
    if os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0"):
        raise RuntimeError("run the AOT check without TRITON_INTERPRET: the interpreter replaces @triton.jit kernels")
    _JOBS[:] = collect(archs, ops)
    return run_jobs(jobs, timeout)


def group(results: list[Result]) -> list[tuple[Result, int]]:
    """Merge rows that differ only in argument specialisation (alignment hints of another shape):
    worst registers / spills / shared, all errors, and how many compiles the row stands for."""
    merged: dict[tuple, tuple[Result, int]] = {}
    for r in results:
        key = (r.op, r.kernel, r.arch, r.config, r.dtype)
        if key not in merged:
            merged[key] = (Result(**{**asdict(r), "errors": list(r.errors)}), 1)
            continue
        m, count = merged[key]
        for name in ("registers", "spill_stores", "spill_loads", "shared"):
            values = [v for v in (getattr(m, name), getattr(r, name)) if v is not None]
            setattr(m, name, max(values) if values else None)
        m.errors += [e for e in r.errors if e not in m.errors]
        merged[key] = (m, count + 1)
    return list(merged.values())


def format_table(results: list[Result]) -> str:
    header = ("kernel", "arch", "config", "dtype", "regs", "spills st/ld B", "shared B", "n", "status")
    rows = [header]
    for r, count in group(results):
        spills = "-" if r.spill_stores is None else f"{r.spill_stores}/{r.spill_loads}"
        rows.append((r.kernel, f"sm_{r.arch}", r.config, r.dtype, "-" if r.registers is None else str(r.registers),
                     spills, "-" if r.shared is None else str(r.shared), str(count),
                     "ok" if r.ok else "; ".join(r.errors)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1] for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mf_kernels.aot", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default=",".join(map(str, DEFAULT_ARCHS)),
                        help="comma-separated compute capabilities, e.g. 75,80,90")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON (one entry per compile)")
    parser.add_argument("--op", help="comma-separated AOT provider names (default: all registered)")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1),
                        help="compile in this many processes (default: min(4, CPUs))")
    parser.add_argument("--timeout", type=float, default=COMPILE_TIMEOUT_S,
                        help=f"seconds one compile may take, else it fails (default {COMPILE_TIMEOUT_S:.0f})")
    args = parser.parse_args(argv)
    try:
        archs = tuple(int(a) for a in args.arch.split(",") if a.strip())
    except ValueError:
        parser.error(f"--arch must be comma-separated integers like 75,80,90, got {args.arch!r}")
    start = time.perf_counter()
    ops = tuple(o.strip() for o in args.op.split(",") if o.strip()) if args.op else None
    results = run(archs, jobs=args.jobs, ops=ops, timeout=args.timeout)
    print(format_table(results))
    failed = [r for r in results if not r.ok]
    print(f"{len(results)} compiles ({args.jobs} jobs) for sm_{', sm_'.join(map(str, archs))} in {time.perf_counter() - start:.1f} s: "
          + ("all ok (no spills, shared memory within limits)" if not failed else f"{len(failed)} FAILED"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{**asdict(r), "ok": r.ok} for r in results], f, indent=2)
    return 1 if failed or not results else 0


if __name__ == "__main__":
    sys.exit(main())
