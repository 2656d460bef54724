"""The CUDA sources compile where a CUDA toolkit exists, with or without a GPU or a CUDA torch (SPEC §4):

- every csrc/*.cu with nvcc and the extension's own arch flags (SASS for sm_75 / sm_80 / sm_90, PTX for
  sm_90), without register spills, and the object defines every `extern "C"` launcher its torch-free
  header declares;
- the torch side of the CUDA build (cuda_bindings.cpp and the MF_WITH_CUDA branch of bindings.cpp, in
  one translation unit so that a wrapper whose signature drifted from ops.h is an ambiguous overload)
  passes a syntax-only compile against this torch's ATen headers and the toolkit's CUDA headers.
  bindings.cpp sees a minimal torch/extension.h there (ATen + pybind11): the real one adds torch's whole
  C++ frontend, which the CPU build of the extension already compiles bindings.cpp against.
The toolkit is the one the build itself uses (`mf_kernels.build.cuda_home`: nvcc and cuda_runtime.h);
skipped when there is none.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

from mf_kernels import build

CU_FILES = sorted(build.CSRC.glob("*.cu"))
NVCC = build.nvcc_path()
pytestmark = pytest.mark.skipif(NVCC is None, reason="no CUDA toolkit (bin/nvcc with include/cuda_runtime.h) found in "
                                + ", ".join(build.cuda_home_candidates()))


def declared_launchers(cu_file: Path) -> set[str]:
    """Names of the extern "C" functions declared by the csrc headers that `cu_file` includes."""
    names: set[str] = set()
    for header in re.findall(r'#include "([^"]+\.h)"', cu_file.read_text()):
        text = (build.CSRC / header).read_text()
        block = text[text.find('extern "C" {'):]
        names |= set(re.findall(r"^\s*(?:int|size_t)\s+(mf_\w+)\s*\(", block, flags=re.M))
    return names


@pytest.mark.parametrize("source", CU_FILES, ids=lambda p: p.name)
def test_cu_compiles_with_the_build_flags_without_spills(source, tmp_path):
    """One nvcc run per file with the flags `mf_kernels.build` gives the extension, `-Xptxas -v` for the
    register report of every kernel on every arch."""
    obj = tmp_path / f"{source.stem}.o"
    flags = [f for f in build.flags(with_cuda=True)["nvcc"] if f != "-DMF_WITH_CUDA"]
    result = subprocess.run([NVCC, *flags, "-std=c++17", "-Xptxas", "-v", "-c", str(source), "-o", str(obj)],
                            capture_output=True, text=True)
    log = result.stdout + result.stderr
    assert result.returncode == 0, f"nvcc {source.name}:\n{log[-3000:]}"
    entries = {arch: len(re.findall(rf"Compiling entry function '\w+' for 'sm_{arch}'", log))
               for arch in build.CUDA_ARCHS}
    assert min(entries.values()) > 0 and len(set(entries.values())) == 1, entries  # every kernel for every arch
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    assert spills and all(s == ("0", "0") for s in spills), log
    nm = shutil.which("nm")
    if nm is None:
        return
    symbols = subprocess.run([nm, "--defined-only", str(obj)], capture_output=True, text=True).stdout
    defined = set(re.findall(r" T (mf_\w+)$", symbols, flags=re.M))
    missing = declared_launchers(source) - defined
    assert not missing, f"{source.name} declares but does not define: {sorted(missing)}"


MINIMAL_EXTENSION_H = """#pragma once
// Test stand-in for torch/extension.h: what bindings.cpp uses of it (ATen tensors, pybind11 and its STL casters).
#include <ATen/ATen.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
"""


def test_cuda_bindings_compile_against_torch_headers(tmp_path):
    import torch.utils.cpp_extension as cpp_extension

    cxx = build.compiler_available()
    if cxx is None:
        pytest.skip("no C++ compiler")
    stub = tmp_path / "stub"
    # A CPU torch ships the c10/cuda headers but not the one CMake generates for CUDA builds: stub it.
    (stub / "c10" / "cuda" / "impl").mkdir(parents=True)
    (stub / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").write_text("#pragma once\n")
    (stub / "torch").mkdir()
    (stub / "torch" / "extension.h").write_text(MINIMAL_EXTENSION_H)
    unit = tmp_path / "cuda_side.cpp"
    unit.write_text('#include "cuda_bindings.cpp"\n#include "bindings.cpp"\n')
    includes = [f"-I{build.CSRC}", f"-isystem{stub}"] + [f"-isystem{p}" for p in cpp_extension.include_paths()]
    includes += [f"-isystem{sysconfig.get_paths()['include']}", f"-isystem{Path(build.cuda_home()) / 'include'}"]
    cmd = [cxx, "-fsyntax-only", "-std=c++20", "-DMF_WITH_CUDA", "-DTORCH_EXTENSION_NAME=mf_kernels_C",
           "-DTORCH_API_INCLUDE_EXTENSION_H", *includes, str(unit)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, f"CUDA bindings do not compile:\n{result.stderr[-4000:]}"
