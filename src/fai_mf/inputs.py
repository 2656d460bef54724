"""Image loading and validation for `fai_mf.predict` (SPEC §3 inputs).

Accepted, alone or in a list (mixed kinds and sizes are fine):
* uint8 numpy arrays [H, W, 3], RGB;
* PIL images (converted to RGB; no channel swap);
* float (or uint8) torch tensors [3, H, W] or [B, 3, H, W] with values in 0..255;
* paths (str or os.PathLike) to image files Pillow can read.
Every image becomes a float32 [3, H, W] tensor in 0..255. Anything else is a ValueError (or
FileNotFoundError for a missing file) that says which image and what is wrong.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch


@dataclass
class LoadedImage:
    """One input image: `tensor` float32 [3, H, W] in 0..255; `source` its path when read from a file."""

    tensor: torch.Tensor
    source: str | None = None

    @property
    def size(self) -> tuple[int, int]:
        return int(self.tensor.shape[-2]), int(self.tensor.shape[-1])


def _check_size(height: int, width: int, where: str) -> None:
    if height < 1 or width < 1:
        raise ValueError(f"{where}: empty image (H={height}, W={width})")


def _from_numpy(array: np.ndarray, where: str) -> torch.Tensor:
    if array.dtype != np.uint8:
        raise ValueError(f"{where}: numpy images must be uint8 [H, W, 3] RGB in 0..255, got dtype {array.dtype} "
                         "(convert with np.clip(x, 0, 255).astype(np.uint8), or pass a float tensor [3, H, W])")
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"{where}: numpy images must be [H, W, 3] RGB, got shape {array.shape}")
    _check_size(array.shape[0], array.shape[1], where)
    return torch.from_numpy(np.array(array, copy=True)).permute(2, 0, 1).float()  # copy: input may be read-only


def _from_pil(image: Any, where: str) -> torch.Tensor:
    _check_size(image.height, image.width, where)
    return _from_numpy(np.asarray(image.convert("RGB")), where)


def _from_path(path: str | os.PathLike, where: str) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{where}: image file not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            return _from_pil(image, f"{where} ({path})")
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"{where}: cannot read image file {path}: {exc}") from exc


def _check_tensor(tensor: torch.Tensor, where: str) -> torch.Tensor:
    """float/uint8 [3, H, W] or [B, 3, H, W] in 0..255 -> float32 [B, 3, H, W] (on its device)."""
    if tensor.dim() not in (3, 4) or tensor.shape[-3] != 3:
        raise ValueError(f"{where}: tensors must be [3, H, W] or [B, 3, H, W] RGB, got shape {tuple(tensor.shape)}")
    if not (tensor.is_floating_point() or tensor.dtype == torch.uint8):
        raise ValueError(f"{where}: tensors must be float (or uint8) in 0..255, got dtype {tensor.dtype}")
    _check_size(tensor.shape[-2], tensor.shape[-1], where)
    batch = tensor.float() if tensor.dim() == 4 else tensor.float()[None]
    if batch.shape[0] == 0:
        raise ValueError(f"{where}: empty batch, shape {tuple(tensor.shape)}")
    if tensor.is_floating_point():
        if not torch.isfinite(batch).all():
            raise ValueError(f"{where}: image tensor holds NaN or infinite values")
        low, high = batch.min().item(), batch.max().item()
        if low < 0 or high > 255:
            raise ValueError(f"{where}: tensor values must lie in 0..255 (raw RGB, not normalised), "
                             f"got min {low:.4g}, max {high:.4g}")
        if 0 < high <= 1:
            warnings.warn(f"{where}: all values are <= 1; images are expected in 0..255, not 0..1", stacklevel=4)
    return batch


def load_images(images: Any) -> list[LoadedImage]:
    """One image or a list of them (see the module docstring) -> one `LoadedImage` per image.

    A [B, 3, H, W] tensor counts as B images. An empty list gives an empty list.
    """
    from PIL import Image

    items = list(images) if isinstance(images, (list, tuple)) else [images]
    loaded: list[LoadedImage] = []
    for i, item in enumerate(items):
        where = f"image {i}" if isinstance(images, (list, tuple)) else "image"
        if isinstance(item, (str, os.PathLike)):
            loaded.append(LoadedImage(_from_path(item, where), source=str(item)))
        elif isinstance(item, Image.Image):
            loaded.append(LoadedImage(_from_pil(item, where)))
        elif isinstance(item, np.ndarray):
            loaded.append(LoadedImage(_from_numpy(item, where)))
        elif isinstance(item, torch.Tensor):
            loaded.extend(LoadedImage(t) for t in _check_tensor(item, where))
        else:
            raise ValueError(f"{where}: unsupported input type {type(item).__name__}; expected a uint8 [H, W, 3] "
                             "numpy array, a PIL image, a float tensor [3, H, W] / [B, 3, H, W] in 0..255, or a path")
    return loaded
