"""How the extension is built and which environments the project refuses, without compiling anything:
object names, the CUDA toolkit lookup, the arch flags, and the Triton-interpreter / numpy guard."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from mf_kernels import build, dispatch


def setuptools_objects(sources: list[str]) -> list[str]:
    """The object files setuptools' compiler names for `sources` (what torch's BuildExtension compiles to)."""
    import setuptools  # noqa: F401  (provides distutils on Python >= 3.12)
    from distutils.ccompiler import new_compiler

    compiler = new_compiler()
    compiler.src_extensions += [".cu", ".cuh"]  # as torch's BuildExtension adds them
    return compiler.object_filenames(sources, output_dir="build/temp")


def test_every_source_compiles_to_its_own_object(monkeypatch):
    """The sources of the full (CUDA) build, as setup.py's Extension lists them, map to distinct objects; the
    rule `check_distinct_objects` enforces is the one that makes setuptools clash."""
    import torch.utils.cpp_extension as cpp_extension

    if build.cuda_home() is not None:  # build the CUDA Extension even with a CPU torch: only its sources are used
        monkeypatch.setattr(cpp_extension, "CUDA_HOME", cpp_extension.CUDA_HOME)
        monkeypatch.setenv("CUDA_HOME", build.cuda_home())
        monkeypatch.setattr(build, "build_with_cuda", lambda: True)
    sources = build.setuptools_extension().sources
    assert len(sources) == len(build.cpu_sources()) + (len(build.cuda_sources()) if build.cuda_home() else 0)
    objects = setuptools_objects(build.cpu_sources() + build.cuda_sources())
    assert len(set(objects)) == len(objects), objects
    assert len(set(setuptools_objects(sources))) == len(sources)
    clash = ["csrc/fpn.cpp", "csrc/fpn.cu"]
    assert len(set(setuptools_objects(clash))) == 1  # what the rule below guards against
    with pytest.raises(ValueError, match=r"fpn\.cpp and fpn\.cu"):
        build.check_distinct_objects(clash)


def fake_toolkit(root: Path) -> Path:
    """A CUDA toolkit layout: bin/nvcc (answers --dryrun like nvcc) and include/cuda_runtime.h."""
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "include" / "cuda_runtime.h").write_text("")
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho '#$ _HERE_={root / 'bin'}' >&2\n")
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IEXEC)
    return root


def test_cuda_home_is_found_by_its_headers_not_by_a_wrapper_on_path(tmp_path, monkeypatch):
    """An `nvcc` wrapper script in <prefix>/bin (as /usr/local/bin/nvcc execs the real one) must not make
    <prefix> the toolkit: it has no include/cuda_runtime.h. The toolkit nvcc reports is taken instead."""
    toolkit = fake_toolkit(tmp_path / "cuda-12.9")
    wrapper_bin = tmp_path / "prefix" / "bin"
    wrapper_bin.mkdir(parents=True)
    wrapper = wrapper_bin / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {toolkit / "bin" / "nvcc"} "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", f"{wrapper_bin}{os.pathsep}{os.environ['PATH']}")
    build.cuda_home.cache_clear()
    try:
        assert str(tmp_path / "prefix") in build.cuda_home_candidates()  # `which nvcc`'s parent: a candidate ...
        assert not build.is_cuda_home(tmp_path / "prefix")  # ... that has no headers
        assert build.cuda_home() == str(toolkit)
        assert build.nvcc_available() and build.nvcc_path() == str(toolkit / "bin" / "nvcc")
        monkeypatch.setenv("CUDA_HOME", str(tmp_path / "prefix"))  # an explicit but wrong CUDA_HOME is skipped too
        build.cuda_home.cache_clear()
        assert build.cuda_home() == str(toolkit)
    finally:
        build.cuda_home.cache_clear()


def test_cuda_arch_flags_are_sass_for_each_target_and_ptx_for_the_newest():
    flags = build.flags(with_cuda=True)["nvcc"]
    assert [f for f in flags if f.startswith("-gencode")] == [
        "-gencode=arch=compute_75,code=sm_75", "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90,code=sm_90", "-gencode=arch=compute_90,code=compute_90"]


@pytest.mark.parametrize("triton_release, numpy_release, broken", [
    ((3, 6, 0), (2, 4, 6), True), ((3, 5, 1), (2, 4, 0), True), ((3, 6, 0), (2, 3, 5), False),
    ((3, 7, 0), (2, 4, 6), False), ((3, 8, 0), (2, 4, 6), False)])
def test_the_interpreter_refuses_triton_before_3_7_with_numpy_2_4(monkeypatch, triton_release, numpy_release, broken):
    releases = {"triton": triton_release, "numpy": numpy_release}
    monkeypatch.setattr(dispatch, "_release", releases.get)
    dispatch.interpreter_version_reasons.cache_clear()
    try:
        reasons = dispatch.interpreter_version_reasons()
    finally:
        dispatch.interpreter_version_reasons.cache_clear()
    assert bool(reasons) == broken
    if broken:
        version = ".".join(map(str, triton_release))
        assert f"triton {version} with numpy {'.'.join(map(str, numpy_release))}" in reasons[0]
        assert "numpy<2.4" in reasons[0] and "triton>=3.7" in reasons[0]


def make_python_with(root: Path, package: str, version: str) -> Path:
    """A venv (no pip) whose own site-packages holds `package` with its distribution metadata, as the torch of a
    GPU machine lives in a venv; its python."""
    import subprocess
    import venv

    venv.EnvBuilder(with_pip=False).create(root)
    python = root / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / f"{package}.py").write_text(f"VERSION = {version!r}\n")
    dist = site / f"{package}-{version}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
    return python


def test_system_venv_sees_a_torch_that_lives_in_another_venv_and_needs_no_network(tmp_path):
    """`make venv TORCH=system PYTHON=<machine venv python>` (.ci/system_venv.py, pip never run): the project venv
    imports the machine venv's packages, which `venv --system-site-packages` would hide; the project is on
    its path; a missing required package is an error naming it, a missing optional one a note."""
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    machine = make_python_with(tmp_path / "machine", "machine_torch", "2.11.0")
    project = tmp_path / "project"
    done = subprocess.run([str(machine), str(repo / ".ci" / "system_venv.py"), "--venv", str(project), "--no-pip",
                           "--require", "machine_torch>=2.4", "--optional", "no_such_optional_dist", "--project",
                           str(repo)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no_such_optional_dist not installed" in done.stdout
    probe = ("import importlib.util, machine_torch; "
             "print(machine_torch.VERSION, importlib.util.find_spec('fai_mf').origin)")
    out = subprocess.run([str(project / "bin" / "python"), "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["2.11.0", str(repo / "src" / "fai_mf" / "__init__.py")]

    hidden = tmp_path / "system-site"
    subprocess.run([str(machine), "-m", "venv", "--without-pip", "--system-site-packages", str(hidden)], check=True)
    assert subprocess.run([str(hidden / "bin" / "python"), "-c", "import machine_torch"],
                          capture_output=True).returncode != 0  # why the flag alone is not enough

    missing = subprocess.run([str(machine), str(repo / ".ci" / "system_venv.py"), "--venv", str(project), "--no-pip",
                              "--require", "machine_torch>=3 no_such_required_dist"], capture_output=True, text=True,
                             timeout=120)
    assert missing.returncode == 1
    assert "machine_torch>=3 no_such_required_dist required but not installed" in missing.stderr
