"""The one place that loads the C++/CUDA extension `mf_kernels._C`.

`load()` returns the extension module or raises a typed `ExtensionError`; it tries, once per process:

1. the module setup.py built (`mf_kernels._C`, placed next to this file by `pip install -e .`), if it
   was compiled against this torch version and, when csrc/ is present, from the current sources;
2. else the JIT build (`mf_kernels.build.jit_build`: torch.utils.cpp_extension.load with ninja into a
   cache directory, so later processes reuse it), unless $MF_KERNELS_JIT=0.

The outcome is logged once (INFO when loaded, WARNING with the reason when not) and cached: later calls
return the module or raise the same error without trying again. `status()` and `unavailable_reasons()`
feed `python -m mf_kernels.info` and the dispatcher. $MF_KERNELS_EXT=0 disables the extension.
Importing this module does nothing: building and loading happen on the first `load()`.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import threading
from types import ModuleType

logger = logging.getLogger("mf_kernels")

LOG_HEAD_LINES = 15


class ExtensionError(RuntimeError):
    """The extension cannot be used; the message says why and what to do."""


class ExtensionDisabledError(ExtensionError):
    """$MF_KERNELS_EXT=0."""


class MissingCompilerError(ExtensionError):
    """No prebuilt module and no C++ compiler / ninja to build one."""


class BuildFailedError(ExtensionError):
    """The compiler ran and failed; `log_head` holds the first error lines of its output."""

    def __init__(self, message: str, log_head: str = ""):
        super().__init__(message + (f"\n{log_head}" if log_head else ""))
        self.log_head = log_head


class StaleBuildError(ExtensionError):
    """A prebuilt module exists but was built for another torch or from other sources."""


_lock = threading.Lock()
_module: ModuleType | None = None
_error: ExtensionError | None = None
_loaded_from: str | None = None
_notes: list[str] = []  # why an earlier candidate was skipped (e.g. a stale setup.py build)


def _flag_off(name: str) -> bool:
    return os.environ.get(name, "1").strip().lower() in ("0", "false", "off", "no")


def _torch_version() -> str:
    import torch

    return torch.__version__.split("+")[0]


def _check_build_info(module: ModuleType, origin: str) -> None:
    """Raise StaleBuildError when `module` was compiled for another torch or from other sources."""
    from . import build

    info = dict(getattr(module, "build_info", {}))
    built_for = str(info.get("torch_version", "unknown")).split("+")[0]
    if built_for != _torch_version():
        raise StaleBuildError(f"{origin} was built for torch {built_for}, this is torch {_torch_version()}; "
                              "rebuild it (pip install --no-build-isolation -e . or python -m mf_kernels.build)")
    current = build.sources_hash(bool(info.get("with_cuda")))
    if current and info.get("sources_hash") != current:
        raise StaleBuildError(f"{origin} was built from other sources (csrc/ hash {info.get('sources_hash')}, now "
                              f"{current})")


def _load_prebuilt() -> ModuleType | None:
    """setup.py's build, or None when there is none; StaleBuildError when it cannot be used."""
    if importlib.util.find_spec("mf_kernels._C") is None:
        return None
    try:
        module = importlib.import_module("mf_kernels._C")
    except ImportError as exc:  # e.g. undefined symbols: compiled against another libtorch
        raise StaleBuildError(f"mf_kernels._C (setup.py build) does not import, probably built for another torch: "
                              f"{exc}") from exc
    _check_build_info(module, "mf_kernels._C (setup.py build)")
    return module


def _first_error_lines(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    # The compiler's "file:line: error: ..." first; torch's own "Error building extension" only as a fallback.
    errors = ([i for i, line in enumerate(lines) if "error:" in line.lower()]
              or [i for i, line in enumerate(lines) if "error" in line.lower()])
    start = max(0, errors[0] - 2) if errors else 0
    return "\n".join(lines[start:start + LOG_HEAD_LINES])


def _jit_build() -> ModuleType:
    from . import build

    if not build.CSRC.is_dir():
        raise MissingCompilerError(f"no prebuilt mf_kernels._C and no sources to build one ({build.CSRC} is missing)")
    if build.compiler_available() is None:
        raise MissingCompilerError("no prebuilt mf_kernels._C and no C++ compiler ($CXX or c++) to build one")
    from torch.utils.cpp_extension import is_ninja_available

    if not is_ninja_available():
        raise MissingCompilerError("no prebuilt mf_kernels._C and no ninja to build one (pip install ninja)")
    logger.info("mf_kernels: building the C++ extension (JIT, once) in %s", build.jit_build_dir())
    # A process that finds another one building in the same directory waits for it and loads its result,
    # which may come from other sources (csrc/ edited meanwhile): then build again, once (torch gives the
    # changed build a new module name). If csrc/ still changed during that build, the module is as fresh
    # as a build can be: use it and say so.
    for attempt in range(2):
        try:
            module = build.jit_build(verbose=os.environ.get("MF_KERNELS_BUILD_VERBOSE", "0") == "1")
        except Exception as exc:  # torch raises RuntimeError/CalledProcessError/OSError with the compiler output
            output = getattr(exc, "output", None)  # subprocess.CalledProcessError carries the compiler's output
            text = str(exc) + ("\n" + output.decode(errors="replace") if isinstance(output, bytes) else "")
            raise BuildFailedError(f"building mf_kernels._C failed ({type(exc).__name__}) in "
                                   f"{build.jit_build_dir()}; rerun `python -m mf_kernels.build --verbose` for the "
                                   "full log", _first_error_lines(text)) from exc
        try:
            _check_build_info(module, f"the JIT build in {build.jit_build_dir()}")
            return module
        except StaleBuildError as exc:
            if attempt:
                _notes.append(f"{exc} (csrc/ changed while it was being built; using it)")
                return module
    raise AssertionError("unreachable")


def _try_load() -> tuple[ModuleType, str]:
    if _flag_off("MF_KERNELS_EXT"):
        raise ExtensionDisabledError("the extension is disabled by $MF_KERNELS_EXT=0")
    try:
        module = _load_prebuilt()
        if module is not None:
            return module, "setup.py build"
    except StaleBuildError as exc:
        _notes.append(str(exc))
    if _flag_off("MF_KERNELS_JIT"):
        raise MissingCompilerError("no usable prebuilt mf_kernels._C and JIT builds are disabled ($MF_KERNELS_JIT=0)"
                                   + "".join(f"; {n}" for n in _notes))
    from . import build

    return _jit_build(), f"JIT build ({build.jit_build_dir()})"


def load() -> ModuleType:
    """The extension module; raises ExtensionError (typed) when it cannot be used. Cached per process."""
    global _module, _error, _loaded_from
    if _module is not None:
        return _module
    if _error is not None:
        raise _error
    with _lock:
        if _module is None and _error is None:
            try:
                _module, _loaded_from = _try_load()
                info = dict(_module.build_info)
                logger.info("mf_kernels: loaded C++ extension from %s (torch %s, cuda %s, zlib %s, openmp %s)%s",
                            _loaded_from, info.get("torch_version"), info.get("with_cuda"), info.get("with_zlib"),
                            info.get("openmp"), "".join(f"; skipped: {n}" for n in _notes))
            except ExtensionError as exc:
                _error = exc
                logger.warning("mf_kernels: C++ extension unavailable: %s", exc)
    if _error is not None:
        raise _error
    return _module


def is_available() -> bool:
    try:
        load()
        return True
    except ExtensionError:
        return False


def has_cuda() -> bool:
    """Whether the loaded extension has its CUDA kernels (False when it is unavailable)."""
    return is_available() and bool(dict(_module.build_info).get("with_cuda"))  # type: ignore[union-attr]


def unavailable_reasons(device_type: str | None = None) -> list[str]:
    """Why the extension cannot run ops on `device_type` ("cpu"/"cuda"; None: at all); [] when it can."""
    try:
        load()
    except ExtensionError as exc:
        return [f"C++ extension: {str(exc).splitlines()[0]}"]
    if device_type == "cuda" and not has_cuda():
        return ["the extension mf_kernels._C was built without CUDA (CPU torch or no nvcc)"]
    return []


def loaded_from() -> str | None:
    return _loaded_from


def status() -> str:
    """One line for `python -m mf_kernels.info`: how the extension was built and loaded, or why not."""
    try:
        module = load()
    except ExtensionError as exc:
        return f"unavailable ({type(exc).__name__}): {exc}"
    info = dict(module.build_info)
    return (f"loaded from {_loaded_from}: torch {info.get('torch_version')}, cuda {info.get('with_cuda')}, "
            f"zlib {info.get('with_zlib')}, openmp {info.get('openmp')}, sources {info.get('sources_hash')}"
            + "".join(f"; skipped: {n}" for n in _notes))


def reset_for_tests() -> None:
    """Forget the cached outcome (tests only; a loaded module stays imported)."""
    global _module, _error, _loaded_from
    with _lock:
        _module, _error, _loaded_from = None, None, None
        _notes.clear()
