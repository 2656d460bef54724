"""What can run here: every op × backend, available or not and why, plus versions.

    python -m mf_kernels.info

Availability is per device type: `cpu` and `cuda` columns hold "yes" or the reasons the backend cannot
run there at all (shape limits, such as head dim or Q, only show up for real inputs; the dispatcher's
error or auto's log line names them).
"""
from __future__ import annotations

import importlib.metadata
import platform
import sys

import torch

from . import build, dispatch


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cuda_summary() -> str:
    if torch.version.cuda is None:
        return "torch built without CUDA"
    if not torch.cuda.is_available():
        return f"torch built for CUDA {torch.version.cuda}; no CUDA device available"
    names = [f"{torch.cuda.get_device_name(i)} (sm_{''.join(map(str, torch.cuda.get_device_capability(i)))})"
             for i in range(torch.cuda.device_count())]
    return f"CUDA {torch.version.cuda}; " + ", ".join(names)


def extension_summary() -> str:
    from . import _cpp_lib

    return _cpp_lib.status()


def versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": cuda_summary(),
        "CUDA toolkit": build.cuda_home() or "none found (bin/nvcc with include/cuda_runtime.h; $CUDA_HOME, PATH, "
                                            "/usr/local/cuda)",
        "extension mf_kernels._C": extension_summary(),
        "kernels choice": f"{dispatch.current_choice()} (${dispatch.ENV_VAR}, mf_kernels.use, model kernels=)",
    }


def cell(op: dispatch.Op, backend: str, device_type: str) -> str:
    impl = op.implementations.get(backend)
    if impl is None:
        return dispatch.NOT_IMPLEMENTED
    try:
        reasons = impl.availability_reasons(device_type)
    except Exception as exc:  # an environment check that breaks is itself the reason; show it, never crash
        reasons = [f"availability check failed: {type(exc).__name__}: {exc}"]
    return "yes" if not reasons else "no: " + "; ".join(reasons)


def table() -> list[tuple[str, str, str, str]]:
    rows = []
    for name in sorted(dispatch.OPS):
        op = dispatch.OPS[name]
        for backend in dispatch.BACKENDS:
            rows.append((name, backend, cell(op, backend, "cpu"), cell(op, backend, "cuda")))
    return rows


def auto_order() -> str:
    return "; ".join(f"{device}: {' > '.join(order)}" for device, order in dispatch.AUTO_ORDER.items())


def auto_preferences() -> list[str]:
    """One line per op-specific auto order (`dispatch.AutoPreference`): where and why it replaces AUTO_ORDER."""
    return [f"  {name}, {preference.describe()}" for name in sorted(dispatch.OPS)
            for preference in dispatch.OPS[name].auto_preferences]


def format_report() -> str:
    lines = [f"{key:<24} {value}" for key, value in versions().items()]
    lines.append(f"{'auto order':<24} {auto_order()}")
    preferences = auto_preferences()
    if preferences:
        lines += ["op-specific auto orders (these win over the order above where they apply):"] + preferences
    lines.append("")
    header = ("op", "backend", "cpu", "cuda")
    rows = [header] + table()
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for i, row in enumerate(rows):
        if i > 1 and row[0] != rows[i - 1][0]:
            lines.append("")
        lines.append("  ".join(c.ljust(w) for c, w in zip(row[:3], widths)) + "  " + row[3])
    lines += ["", "what each implementation is (and, where a device needs a choice, why):"]
    lines += descriptions()
    return "\n".join(lines)


def descriptions() -> list[str]:
    """One line per registered implementation with a description (what it is, and decisions such as the
    T4 path of the FPN lateral op with the roofline numbers behind it)."""
    out = []
    for name in sorted(dispatch.OPS):
        op = dispatch.OPS[name]
        for backend in dispatch.BACKENDS:
            impl = op.implementations.get(backend)
            if impl is not None and impl.description:
                out.append(f"  {name} [{backend}]: {impl.description}")
    return out


def main() -> int:
    print(format_report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
