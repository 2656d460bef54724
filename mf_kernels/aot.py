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
import os
import re
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


def _compile_job(index: int) -> Result:
    op, arch, spec = _JOBS[index]
    return compile_spec(op, spec, arch)


def run(archs: tuple[int, ...] = DEFAULT_ARCHS, jobs: int = 1, ops: tuple[str, ...] | None = None) -> list[Result]:
    """Compile every spec (of `ops`, default all) for every arch; `jobs` > 1 compiles in forked processes."""
    if os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0"):
        raise RuntimeError("run the AOT check without TRITON_INTERPRET: the interpreter replaces @triton.jit kernels")
    _JOBS[:] = collect(archs, ops)
    if jobs <= 1 or len(_JOBS) <= 1:
        return [_compile_job(i) for i in range(len(_JOBS))]
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(min(jobs, len(_JOBS))) as pool:
        return pool.map(_compile_job, range(len(_JOBS)), chunksize=1)


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
    args = parser.parse_args(argv)
    try:
        archs = tuple(int(a) for a in args.arch.split(",") if a.strip())
    except ValueError:
        parser.error(f"--arch must be comma-separated integers like 75,80,90, got {args.arch!r}")
    start = time.perf_counter()
    ops = tuple(o.strip() for o in args.op.split(",") if o.strip()) if args.op else None
    results = run(archs, jobs=args.jobs, ops=ops)
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
