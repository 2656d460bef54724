"""How the extension `mf_kernels._C` is compiled: sources, flags, and the JIT build.

    python -m mf_kernels.build [--verbose]     # build (or reuse) the JIT extension now and print its info

Used by setup.py (loaded by file path, so that building never imports the package) and by
`mf_kernels._cpp_lib`, the one module that loads the extension. Only `_cpp_lib` imports the result.

Sources (csrc/, see csrc/README.md): every `*.cpp` is compiled, except the CUDA-only files `*.cu` and
`cuda_*.cpp`, which are added (with -DMF_WITH_CUDA) only when torch itself has CUDA and nvcc is found.
The flags carry a hash of csrc/ (MF_SOURCES_HASH) so that `_cpp_lib` can tell a build of older sources.

JIT build directory: $MF_KERNELS_BUILD_DIR, else `<repo>/build/jit/<torch version>` when the repository
is writable (an editable install: `make test` builds once and ninja reuses it), else
`~/.cache/mf_kernels/jit/<torch version>`.
"""
from __future__ import annotations

import ctypes.util
import hashlib
import os
import shutil
import sys
import sysconfig
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent
CSRC = REPO_ROOT / "csrc"
EXTENSION_NAME = "mf_kernels._C"  # setup.py's module; the JIT module is JIT_NAME (a top-level module)
JIT_NAME = "mf_kernels_C"
SOURCE_SUFFIXES = (".cpp", ".h", ".cu", ".cuh")
BUILD_KIND = {"setup.py": 1, "jit": 2}
CUDA_ARCHS = (75, 80, 90)


def is_cuda_only(path: Path) -> bool:
    return path.suffix == ".cu" or path.name.startswith("cuda_")


def cpu_sources() -> list[str]:
    return [str(p) for p in sorted(CSRC.glob("*.cpp")) if not is_cuda_only(p)]


def cuda_sources() -> list[str]:
    return [str(p) for p in sorted(CSRC.glob("*")) if p.suffix in (".cu", ".cpp") and is_cuda_only(p)]


def sources_hash() -> str:
    """First 64 bits (hex) of the sha256 of every csrc/ source file's name and bytes; "" without csrc/."""
    if not CSRC.is_dir():
        return ""
    digest = hashlib.sha256()
    for path in sorted(p for p in CSRC.iterdir() if p.suffix in SOURCE_SUFFIXES):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def zlib_available() -> bool:
    """zlib.h in a standard include directory and libz to link: then PNGs are deflated with zlib."""
    include_dirs = [sysconfig.get_paths().get("include"), "/usr/include", "/usr/local/include",
                    os.path.join(sys.prefix, "include"), os.environ.get("CONDA_PREFIX", "") and
                    os.path.join(os.environ["CONDA_PREFIX"], "include")]
    has_header = any(d and os.path.exists(os.path.join(d, "zlib.h")) for d in include_dirs)
    return has_header and ctypes.util.find_library("z") is not None


def torch_has_cuda() -> bool:
    import torch

    return torch.version.cuda is not None


def nvcc_available() -> bool:
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))


def build_with_cuda() -> bool:
    """CUDA parts only with a CUDA torch (a CPU torch has no libc10_cuda to link) and nvcc."""
    if os.environ.get("MF_KERNELS_NO_CUDA", "0") not in ("", "0"):
        return False
    return torch_has_cuda() and nvcc_available()


def compiler_available() -> str | None:
    """The C++ compiler torch would use ($CXX or c++), or None."""
    cxx = os.environ.get("CXX", "c++")
    return shutil.which(cxx.split()[0]) if cxx else None


def flags(kind: str, with_cuda: bool) -> dict[str, list[str]]:
    """extra_compile_args-style flags: {"cxx": [...], "nvcc": [...], "ld": [...]}."""
    defines = [f"-DMF_SOURCES_HASH=0x{sources_hash() or '0'}ULL", f"-DMF_BUILD_KIND={BUILD_KIND[kind]}"]
    cxx = ["-O3"] + defines  # torch adds its own -std
    ld: list[str] = []
    if sys.platform.startswith("linux"):
        # ATen's parallel_for is OpenMP inline code: without -fopenmp it would run serially. The libgomp
        # torch already loaded is reused (same soname).
        cxx.append("-fopenmp")
        ld.append("-fopenmp")
    if zlib_available():
        cxx.append("-DMF_WITH_ZLIB")
        ld.append("-lz")
    nvcc: list[str] = []
    if with_cuda:
        cxx.append("-DMF_WITH_CUDA")
        nvcc = ["-O3", "-DMF_WITH_CUDA", "-lineinfo"] + defines
        nvcc += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in CUDA_ARCHS]
    return {"cxx": cxx, "nvcc": nvcc, "ld": ld}


def setuptools_extension():
    """The `Extension` setup.py builds (CppExtension, or CUDAExtension for a CUDA torch with nvcc)."""
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    with_cuda = build_with_cuda()
    f = flags("setup.py", with_cuda)
    sources = [os.path.relpath(s, REPO_ROOT) for s in cpu_sources() + (cuda_sources() if with_cuda else [])]
    if with_cuda:
        return CUDAExtension(EXTENSION_NAME, sources, include_dirs=[str(CSRC)],
                             extra_compile_args={"cxx": f["cxx"], "nvcc": f["nvcc"]}, extra_link_args=f["ld"])
    return CppExtension(EXTENSION_NAME, sources, include_dirs=[str(CSRC)], extra_compile_args={"cxx": f["cxx"]},
                        extra_link_args=f["ld"])


def jit_build_dir() -> Path:
    import torch

    explicit = os.environ.get("MF_KERNELS_BUILD_DIR")
    if explicit:
        return Path(explicit)
    tag = f"torch-{torch.__version__}".replace("+", "-")
    in_repo = REPO_ROOT / "build" / "jit" / tag
    if (REPO_ROOT / "pyproject.toml").exists() and os.access(REPO_ROOT, os.W_OK):
        return in_repo
    return Path.home() / ".cache" / "mf_kernels" / "jit" / tag


def jit_build(verbose: bool = False):
    """Compile (or reuse, ninja is incremental) the extension with torch.utils.cpp_extension.load.

    Raises whatever `load` raises (RuntimeError with the compiler output on a failed build)."""
    from torch.utils.cpp_extension import load

    with_cuda = build_with_cuda()
    f = flags("jit", with_cuda)
    build_dir = jit_build_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    return load(name=JIT_NAME, sources=cpu_sources() + (cuda_sources() if with_cuda else []),
                extra_cflags=f["cxx"], extra_cuda_cflags=f["nvcc"] or None, extra_ldflags=f["ld"],
                extra_include_paths=[str(CSRC)], build_directory=str(build_dir), with_cuda=with_cuda,
                verbose=verbose)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m mf_kernels.build", description=__doc__.splitlines()[0])
    parser.add_argument("--verbose", action="store_true", help="show the compiler commands")
    args = parser.parse_args(argv)
    if args.verbose:
        os.environ["MF_KERNELS_BUILD_VERBOSE"] = "1"
    from . import _cpp_lib

    try:
        ext = _cpp_lib.load()
    except _cpp_lib.ExtensionError as exc:
        print(f"mf_kernels._C is unavailable: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"loaded_from": _cpp_lib.loaded_from(), **dict(ext.build_info)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
