"""What a dataset run reads: command-line style inputs -> an ordered list of images (`Entry`).

An input is, in this order of recognition:
* an existing directory: every image file below it (recursively, extensions `IMAGE_EXTENSIONS`,
  case-insensitive), sorted by path;
* an existing `.json` file: a COCO file; its `images` (in file order), `file_name` relative to
  `image_root` (default: the JSON's folder), with their `image_id`s and the file's categories;
* an existing `.txt` / `.lst` / `.list` file: one path per line (blank lines and `#` comments skipped),
  relative paths taken from the list's folder; each line is an image file;
* any other existing file: an image;
* a glob pattern (`*`, `?`, `[`; `**` recursive) matching something: its matches, sorted; matched
  directories are expanded as above and matched files without an image extension are skipped.
A command-line input that is none of these is an error before any work (a typo should not cost a run);
an image named inside a list or a COCO file that is missing or unreadable is left to the decoder, which
records it as a failed image and goes on. The same file reached twice is kept once (the first time),
with a warning. In-memory images (numpy arrays, PIL images, tensors) pass through as they are.
"""
from __future__ import annotations

import glob
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".ppm", ".tif", ".tiff", ".webp")
LIST_EXTENSIONS = (".list", ".lst", ".txt")
_GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class Entry:
    """One image of a run.

    key: how records name it: its path as found (a string), or "#<i>" for the i-th in-memory image;
    item: what `fai_mf.inputs.load_images` reads (a path string or an in-memory image);
    image_id: its COCO id when it came from a COCO file; name: a relative PNG file name for outputs
    derived from it (annotated images: its path below the folder it was found in, else its file name,
    with the suffix .png), unique within one run.
    """

    key: str
    item: Any
    image_id: int | None = None
    name: str = ""

    @property
    def path(self) -> str | None:
        return self.item if isinstance(self.item, str) else None


@dataclass
class InputSet:
    """The images of a run, in order, and the COCO categories (sorted ids) when a COCO file gave them."""

    entries: list[Entry] = field(default_factory=list)
    category_ids: list[int] | None = None

    def __len__(self) -> int:
        return len(self.entries)


class InputError(FileNotFoundError):
    """A command-line input that names nothing: no such file, directory or matching glob."""


def is_image_file(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _images_below(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and is_image_file(p))


def _coco_images(path: Path, image_root: str | os.PathLike | None
                 ) -> tuple[list[tuple[Path, int, str]], list[int] | None]:
    """A COCO file's (image path, image id, file_name) in file order, and its sorted category ids."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{path} is not a COCO file: it has no 'images' list")
    root = Path(image_root) if image_root is not None else path.parent
    images = []
    for k, image in enumerate(data["images"]):
        if not isinstance(image, dict) or "file_name" not in image or "id" not in image:
            raise ValueError(f"{path}: images[{k}] needs 'file_name' and 'id', got {image!r:.120}")
        images.append((root / str(image["file_name"]), int(image["id"]), str(image["file_name"])))
    categories = data.get("categories")
    category_ids = sorted(int(c["id"]) for c in categories) if categories else None
    return images, category_ids


def _list_file(path: Path) -> list[Path]:
    lines = (line.strip() for line in path.read_text().splitlines())
    return [path.parent / line for line in lines if line and not line.startswith("#")]


class _Collector:
    """Builds the ordered, de-duplicated entry list and the names derived from the entries."""

    def __init__(self) -> None:
        self.entries: list[Entry] = []
        self.category_ids: list[int] | None = None
        self._seen: dict[str, str] = {}
        self._names: set[str] = set()
        self.duplicates = 0

    def _unique_name(self, name: str) -> str:
        stem = os.path.splitext(name)[0]
        candidate, k = f"{stem}.png", 1
        while candidate in self._names:
            candidate, k = f"{stem}_{k}.png", k + 1
        self._names.add(candidate)
        return candidate

    def add_path(self, path: Path, name: str, image_id: int | None = None) -> None:
        key = os.path.normpath(path)
        real = os.path.realpath(key)
        if real in self._seen:
            self.duplicates += 1
            return
        self._seen[real] = key
        self.entries.append(Entry(key=key, item=key, image_id=image_id, name=self._unique_name(name)))

    def add_memory(self, item: Any) -> None:
        index = len(self.entries)
        self.entries.append(Entry(key=f"#{index}", item=item, name=self._unique_name(f"image_{index}.png")))

    def add_categories(self, category_ids: list[int] | None, source: Path) -> None:
        if category_ids is None:
            return
        if self.category_ids is not None and self.category_ids != category_ids:
            raise ValueError(f"{source}: its COCO categories differ from those of an earlier COCO input")
        self.category_ids = category_ids


def _add_input(collector: _Collector, source: str | os.PathLike, image_root: str | os.PathLike | None) -> None:
    path = Path(source)
    if path.is_dir():
        found = _images_below(path)
        if not found:
            raise InputError(f"{path}: a directory with no images ({', '.join(IMAGE_EXTENSIONS)}) below it")
        for p in found:
            collector.add_path(p, str(p.relative_to(path)))
    elif path.is_file() and path.suffix.lower() == ".json":
        images, category_ids = _coco_images(path, image_root)
        collector.add_categories(category_ids, path)
        for p, image_id, file_name in images:
            collector.add_path(p, file_name, image_id)
    elif path.is_file() and path.suffix.lower() in LIST_EXTENSIONS:
        for p in _list_file(path):
            collector.add_path(p, p.name)
    elif path.exists():
        collector.add_path(path, path.name)
    elif _GLOB_CHARS & set(str(source)):
        matches = sorted(glob.glob(str(source), recursive=True))
        if not matches:
            raise InputError(f"no file matches {str(source)!r}")
        for match in matches:
            p = Path(match)
            if p.is_dir():
                for q in _images_below(p):
                    collector.add_path(q, str(q.relative_to(p)))
            elif is_image_file(p):
                collector.add_path(p, p.name)
    else:
        raise InputError(f"input not found: {str(source)!r} is no file, directory or glob match")


def resolve_inputs(sources: Any, image_root: str | os.PathLike | None = None) -> InputSet:
    """One input, or a list / tuple / iterator of them (see the module docstring) -> the run's
    `InputSet`, in order.

    A [B, 3, H, W] tensor counts as B images. Raises `InputError` for a command-line input that names
    nothing, ValueError for a malformed COCO file.
    """
    items: Iterable[Any] = sources if isinstance(sources, (list, tuple, Iterator)) else [sources]
    collector = _Collector()
    for source in items:
        if isinstance(source, (str, os.PathLike)):
            _add_input(collector, source, image_root)
        elif isinstance(source, torch.Tensor) and source.dim() == 4:
            for image in source:
                collector.add_memory(image)
        else:
            collector.add_memory(source)
    if collector.duplicates:
        logger.warning("%d input images were given more than once; each runs once", collector.duplicates)
    return InputSet(collector.entries, collector.category_ids)
