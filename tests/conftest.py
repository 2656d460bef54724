"""Shared fixtures, and the device parametrisation of every kernel parity test.

TRITON_INTERPRET is decided here, once per process, before anything imports triton (the kernels read it
when they are decorated): on a machine without a CUDA device the Triton kernels run in the interpreter on
CPU tensors; on one with a CUDA device they run compiled on CUDA tensors. A value set by the user wins.

Kernel parity tests are parametrised over `backend_devices(...)`: (backend, device) pairs, reference and
cpp on cpu, triton on cpu (the interpreter) and on cuda, cuda on cuda. Every pair appears in the test ids;
a pair this machine cannot run is skipped with the reason (no CUDA device; the interpreter is off where the
compiled kernels run), so on a GPU machine the same tests run the compiled kernels against the same oracle
(`mf_kernels.testing`).
"""
from __future__ import annotations

import os
import importlib.util
import warnings

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fai_mf  # noqa: E402
from mf_kernels import dispatch  # noqa: E402

BACKEND_DEVICES = {"reference": ("cpu",), "sdpa": ("cpu", "cuda"), "cpp": ("cpu",), "triton": ("cpu", "cuda"),
                   "cuda": ("cuda",)}


def device_skip_reason(backend: str, device: str) -> str | None:
    """Why this machine cannot run `backend` on `device` tensors at all (None: it can, as far as the device
    goes; whether the extension built is the `require_backend` fixture's business)."""
    if device == "cuda" and not HAS_CUDA:
        return "no CUDA device here"
    if backend == "triton" and device == "cpu" and not dispatch.interpreter_requested():
        return "Triton runs CPU tensors only in the interpreter, which is off here (a CUDA device runs the kernels)"
    return None


def device_params(backend: str) -> list:
    """pytest params of the devices `backend` runs on, ids "cpu" / "cuda", skipped with the reason here."""
    return [pytest.param(device, id=device, marks=_skip_marks(backend, device)) for device in BACKEND_DEVICES[backend]]


def backend_devices(*backends: str) -> list:
    """pytest params (backend, device) for the given backends, ids "backend-device"."""
    return [pytest.param(backend, device, id=f"{backend}-{device}", marks=_skip_marks(backend, device))
            for backend in backends for device in BACKEND_DEVICES[backend]]


def _skip_marks(backend: str, device: str) -> list:
    reason = device_skip_reason(backend, device)
    return [pytest.mark.skip(reason=reason)] if reason else []


@pytest.fixture
def require_backend(request):
    """`require_backend(backend)`: the extension for cpp / cuda (built once per session; a failed build is an
    error, a missing compiler or an extension without CUDA kernels a skip)."""

    def require(backend: str) -> None:
        if backend in ("cpp", "cuda"):
            request.getfixturevalue("extension")
        if backend == "cuda":
            from mf_kernels import _cpp_lib

            reasons = _cpp_lib.unavailable_reasons("cuda")
            if reasons:
                pytest.skip("; ".join(reasons))

    return require


def requires(module: str) -> pytest.MarkDecorator:
    """Skip the test, with its name in the report, where the optional `module` (e.g. pycocotools) is missing."""
    return pytest.mark.skipif(importlib.util.find_spec(module) is None,
                              reason=f"needs {module}, which is not installed (pip install {module})")


def tiny_config(**overrides) -> fai_mf.MaskFormerConfig:
    """A small but complete FAI-MF config (STDC backbone, 2 decoder layers) for fast CPU tests."""
    base = dict(
        num_classes=3, backbone_config={"model_type": "stdc", "layers": [2, 2, 2], "base": 16},
        pixel_decoder_feat_dim=32, pixel_decoder_out_dim=32, head_out_dim=32,
        transformer_predictor_hidden_dim=64, transformer_predictor_dec_layers=2,
        transformer_predictor_dim_feedforward=64, num_queries=10,
    )
    base.update(overrides)
    return fai_mf.MaskFormerConfig(**base)


@pytest.fixture
def tiny_model() -> fai_mf.FAIMFModel:
    torch.manual_seed(0)
    cfg = tiny_config()
    return fai_mf.FAIMFModel(cfg, fai_mf.FAIMaskFormer(cfg).eval(), name="tiny")


@pytest.fixture(scope="session")
def extension():
    """The C++ extension `mf_kernels._C`, built (or loaded) once per session. Only a machine without a
    compiler (or with the build disabled) skips the cpp tests; a failed build is an error."""
    from mf_kernels import _cpp_lib

    try:
        return _cpp_lib.load()
    except (_cpp_lib.MissingCompilerError, _cpp_lib.ExtensionDisabledError) as exc:
        pytest.skip(f"C++ extension unavailable here: {exc}")


@pytest.fixture(autouse=True)
def _quiet_random_weight_warning():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*RANDOM weights.*")
        yield


@pytest.fixture
def no_tf32():
    """fp32 convs and matmuls in full fp32 (no TF32, torch's default for cuDNN convs on sm_80+) for
    whole-model comparisons on CUDA, whose reference and fused runs would otherwise round differently
    in TF32; the op-level tests bound the TF32 error instead (`mf_kernels.testing`)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
