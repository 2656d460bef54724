"""Set-up shared by the dataset commands (`fai-mf predict`, `fai-mf eval`): argument types, device,
dtype and kernels checks, output paths, torchrun, the one-line kernels report.

Everything here runs before any work, so that a bad argument costs nothing: an unusable device, a
bad `$MF_KERNELS`, an output path that is a directory or in a missing folder are errors up front.
"""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import torch

import mf_kernels

from . import distributed
from .engine import COLLECTIVE_TIMEOUT

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
EXIT_FAILED_IMAGES = 3  # the run finished, but some images could not be read (their records say why)


# ---- argument types (argparse turns their ValueError / ArgumentTypeError into a usage error) ----------
def probability(text: str) -> float:
    """A finite number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not (math.isfinite(value) and 0 <= value <= 1):
        raise argparse.ArgumentTypeError(f"expected a finite number in [0, 1], got {text!r}")
    return value


def positive_int(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    """--device, --dtype, --kernels, --batch, --workers, --threads (the same in predict and eval)."""
    parser.add_argument("--device", default=None,
                        help="cpu, cuda or cuda:N (default: cuda when available; under torchrun cuda:LOCAL_RANK)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                        help="model precision (bf16 on CUDA needs compute capability >= 8.0)")
    parser.add_argument("--kernels", choices=mf_kernels.CHOICES, default=None,
                        help="fused kernels backend (default: $MF_KERNELS, else auto)")
    parser.add_argument("--batch", type=positive_int, default=1,
                        help="images of one size per model call (mixed sizes run as same-size groups)")
    parser.add_argument("--workers", type=non_negative_int, default=None,
                        help="decoding processes (default: 0 for under 16 images, else min(4, CPUs/2))")
    parser.add_argument("--threads", type=non_negative_int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--log-interval", type=float, default=30.0, metavar="SECONDS",
                        help="seconds between progress lines when stderr is not a terminal")


# ---- checks ---------------------------------------------------------------------------------------
def resolve_device(name: str | None) -> torch.device:
    """--device -> a usable torch.device; bare "cuda" under torchrun is cuda:LOCAL_RANK."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"--device {name!r}: not a device ({exc})") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ValueError(f"--device {name!r}: only cpu and cuda are supported")
    if not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ValueError(f"--device {name}: CUDA is not available ({why}, torch {torch.__version__}); use --device cpu")
    index = device.index if device.index is not None else distributed.local_rank()
    if index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: GPU {index} does not exist ({torch.cuda.device_count()} visible)")
    return torch.device("cuda", index)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """--dtype -> torch dtype; fp32, fp16 and bf16 run on CPU, bf16 on CUDA needs native support (sm_80+)."""
    dtype = DTYPES[name]
    cuda = device.type == "cuda"
    if dtype == torch.bfloat16 and cuda and not torch.cuda.is_bf16_supported(including_emulation=False):
        major, minor = torch.cuda.get_device_capability(device)
        raise ValueError(f"--dtype bf16: {torch.cuda.get_device_name(device)} (sm_{major}{minor}) has no native "
                         "bf16; use --dtype fp16")
    return dtype


def check_kernels(kernels: str | None) -> str:
    """The backend choice in force: --kernels, else $MF_KERNELS (a bad value is an error naming it)."""
    return mf_kernels.dispatch.validate_choice(kernels) if kernels is not None else mf_kernels.current_choice()


def check_weights(path: str | os.PathLike | None) -> None:
    """--weights names a checkpoint file (a model directory goes to --model)."""
    if path is not None and Path(path).is_dir():
        raise IsADirectoryError(f"--weights {path} is a directory; give its model_final.pth, or pass the "
                                "directory as --model")


def check_output_file(path: str | os.PathLike | None, flag: str) -> Path | None:
    """An output file path: not a directory, in an existing, writable folder."""
    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{flag} {path} is a directory; give a file path")
    folder = path.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"{flag} {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"{flag} {path}: the folder {folder} is not writable")
    return path


def check_output_dir(path: str | os.PathLike | None, flag: str) -> Path | None:
    """An output folder: a directory, or a missing one whose nearest existing parent is a writable
    directory (the caller creates it when the work starts)."""
    if path is None:
        return None
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{flag} {path} exists and is not a directory")
    parent = next(p for p in (path, *path.absolute().parents) if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise PermissionError(f"{flag} {path}: cannot create it in {parent}")
    return path


def start_distributed(device: torch.device) -> bool:
    """Join the torchrun process group (NCCL on CUDA, gloo on CPU); nothing without torchrun. True when
    this call created the group: the caller then ends it (`distributed.cleanup()`); a group that
    already exists (a program running several commands) is used as it is and left to its owner."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if distributed.is_distributed():
        return False
    return distributed.init_from_env(device.type, timeout=COLLECTIVE_TIMEOUT)


def kernels_report() -> str:
    """One line: which backend ran each op ("backend: op, op; ..."), from `mf_kernels.last_choices`."""
    by_backend: dict[str, list[str]] = {}
    for op, backend in mf_kernels.dispatch.last_choices().items():
        by_backend.setdefault(backend, []).append(op)
    return "; ".join(f"{backend}: {', '.join(ops)}" for backend, ops in sorted(by_backend.items())) or "none ran"
