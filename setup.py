"""Build hook for the optional extension `mf_kernels._C`; everything else is declared in pyproject.toml.

`pip install --no-build-isolation -e .` (what the Makefile runs) compiles csrc/ with ninja when torch is
importable and a C++ compiler is present: the CPU (C++/OpenMP) sources always, the CUDA sources only
with a CUDA torch and nvcc (mf_kernels/build.py decides, and holds the flags). The build is optional:
if anything about it fails, setup prints why and continues, and the install is pure Python; the
extension is then JIT-built on first use by `mf_kernels._cpp_lib` (or never, without a compiler).

Environment: MF_KERNELS_BUILD_EXT=0 skips the build here (JIT on first use instead);
MF_KERNELS_NO_CUDA=1 builds the CPU parts only.
"""
from __future__ import annotations

import importlib.util
import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _note(message: str) -> None:
    print(f"mf_kernels setup: {message}", file=sys.stderr)


def _build_helpers():
    """mf_kernels/build.py loaded by path: importing the package would import torch-dependent modules."""
    spec = importlib.util.spec_from_file_location("_mf_kernels_build", os.path.join(HERE, "mf_kernels", "build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def extension_kwargs() -> dict:
    """`ext_modules` and `cmdclass` for setup(), or {} when the extension cannot be built here."""
    if os.environ.get("MF_KERNELS_BUILD_EXT", "1").strip().lower() in ("0", "false", "off", "no"):
        _note("MF_KERNELS_BUILD_EXT=0: not building mf_kernels._C (it is JIT-built on first use)")
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension
    except Exception as exc:  # an isolated build env or no torch: a pure-Python install is fine
        _note(f"torch is not importable ({type(exc).__name__}: {exc}); not building mf_kernels._C")
        return {}
    try:
        build = _build_helpers()
        if build.compiler_available() is None:
            _note("no C++ compiler found; not building mf_kernels._C")
            return {}
        extension = build.setuptools_extension()
    except Exception as exc:
        _note(f"cannot configure mf_kernels._C ({type(exc).__name__}: {exc}); not building it")
        return {}

    class OptionalBuildExtension(BuildExtension):
        """BuildExtension whose failure leaves a working pure-Python install."""

        failed = False

        def run(self) -> None:
            try:
                super().run()
            except Exception as exc:  # e.g. copying a module that did not build, after build_extension said why
                if not self.failed:
                    _note(f"building mf_kernels._C failed ({type(exc).__name__}: {exc}); continuing without it")

        def build_extension(self, ext) -> None:
            try:
                super().build_extension(ext)
            except Exception as exc:
                self.failed = True
                _note(f"building {ext.name} failed ({type(exc).__name__}: {exc}); continuing without it (it is "
                      "JIT-built on first use; `python -m mf_kernels.build --verbose` shows the compiler log)")

        def get_outputs(self) -> list[str]:  # only what was built: an editable install maps these files
            return [path for path in super().get_outputs() if os.path.exists(path)]

    return {"ext_modules": [extension], "cmdclass": {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}}


setup(**extension_kwargs())
