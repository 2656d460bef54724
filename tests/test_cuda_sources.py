"""The CUDA sources compile where nvcc exists, with or without a GPU or a CUDA torch (SPEC §4):

- every csrc/*.cu with `nvcc -arch=sm_XX -c` for sm_75 (T4), sm_80 and sm_90, and the object defines
  every `extern "C"` launcher its torch-free header declares;
- the torch side of the CUDA build (cuda_bindings.cpp and the MF_WITH_CUDA branch of bindings.cpp, in
  one translation unit so that a wrapper whose signature drifted from ops.h is an ambiguous overload)
  passes a syntax-only compile against this torch's headers and nvcc's CUDA headers.
Skipped when nvcc is absent.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

from mf_kernels import build

ARCHS = (75, 80, 90)
CU_FILES = sorted(build.CSRC.glob("*.cu"))


def find_nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return None


NVCC = find_nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH, $CUDA_HOME, /usr/local/cuda)")


def declared_launchers(cu_file: Path) -> set[str]:
    """Names of the extern "C" functions declared by the csrc headers that `cu_file` includes."""
    names: set[str] = set()
    for header in re.findall(r'#include "([^"]+\.h)"', cu_file.read_text()):
        text = (build.CSRC / header).read_text()
        block = text[text.find('extern "C" {'):]
        names |= set(re.findall(r"^\s*(?:int|size_t)\s+(mf_\w+)\s*\(", block, flags=re.M))
    return names


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", CU_FILES, ids=lambda p: p.name)
def test_cu_compiles_for_arch(source, arch, tmp_path):
    obj = tmp_path / f"{source.stem}_sm{arch}.o"
    result = subprocess.run([NVCC, f"-arch=sm_{arch}", "-O3", "-std=c++17", "-c", str(source), "-o", str(obj)],
                            capture_output=True, text=True)
    assert result.returncode == 0, f"nvcc sm_{arch} {source.name}:\n{result.stderr[-3000:]}"
    nm = shutil.which("nm")
    if nm is None:
        return
    symbols = subprocess.run([nm, "--defined-only", str(obj)], capture_output=True, text=True).stdout
    defined = set(re.findall(r" T (mf_\w+)$", symbols, flags=re.M))
    missing = declared_launchers(source) - defined
    assert not missing, f"{source.name} declares but does not define: {sorted(missing)}"


def cuda_include_dir() -> str | None:
    """cuda_runtime.h's directory: next to nvcc (which may be a wrapper script), or under CUDA_HOME."""
    from torch.utils.cpp_extension import CUDA_HOME

    roots = [Path(NVCC).resolve().parent.parent] + [Path(p) for p in (CUDA_HOME, "/usr/local/cuda") if p]
    for root in roots:
        for candidate in (root / "include", root / "targets" / "x86_64-linux" / "include"):
            if (candidate / "cuda_runtime.h").exists():
                return str(candidate)
    return None


def test_cuda_bindings_compile_against_torch_headers(tmp_path):
    import torch.utils.cpp_extension as cpp_extension

    cxx = build.compiler_available()
    cuda_include = cuda_include_dir()
    if cxx is None or cuda_include is None:
        pytest.skip("no C++ compiler or no cuda_runtime.h next to nvcc")
    # A CPU torch ships the c10/cuda headers but not the one CMake generates for CUDA builds: stub it.
    stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    unit = tmp_path / "cuda_side.cpp"
    unit.write_text('#include "cuda_bindings.cpp"\n#include "bindings.cpp"\n')
    includes = [f"-I{build.CSRC}"] + [f"-isystem{p}" for p in cpp_extension.include_paths()]
    includes += [f"-isystem{sysconfig.get_paths()['include']}", f"-isystem{cuda_include}",
                 f"-isystem{tmp_path / 'stub'}"]
    cmd = [cxx, "-fsyntax-only", "-std=c++20", "-DMF_WITH_CUDA", "-DTORCH_EXTENSION_NAME=mf_kernels_C",
           "-DTORCH_API_INCLUDE_EXTENSION_H", *includes, str(unit)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, f"CUDA bindings do not compile:\n{result.stderr[-4000:]}"
