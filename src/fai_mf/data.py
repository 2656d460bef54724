"""Datasets for training and evaluation, and a small synthetic dataset (SPEC §6).

Every dataset item is a dict:
    image     float [3, H, W], RGB 0..255
    labels    int64 [N], contiguous class ids 0..C-1
    masks     bool [N, H, W], one mask per ground-truth instance (or per class present, semantic)
    image_id  int
and, for semantic datasets, `semantic` int64 [H, W] with 255 = ignore.

Formats:
- COCO instance JSON (`CocoInstanceDataset`): polygon and RLE segmentations (pycocotools); COCO
  category ids are mapped to 0..C-1 in increasing id order; crowd annotations are skipped.
- Semantic folders (`SemanticSegDataset`): `ROOT/images/NAME.{png,jpg,jpeg}` with
  `ROOT/labels/NAME.png` (8-bit class ids, 255 = ignore) and optional `ROOT/classes.json` (names).
- `make_synthetic_dataset` (CLI `fai-mf data synth`): coloured circles, rectangles and triangles
  (class = shape) written in both formats: `OUT/{train,val}/images`, `labels`, `instances.json`,
  `classes.json`.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

logger = logging.getLogger(__name__)

IGNORE_LABEL = 255
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
SYNTH_CLASSES = ["circle", "rectangle", "triangle"]


# ---- shared transforms -------------------------------------------------------------------------
def _as_size(size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int):
        return (size, size)
    return (int(size[0]), int(size[1]))


def _resize_image(image: Image.Image, size: tuple[int, int] | None) -> Image.Image:
    if size is None or image.size == (size[1], size[0]):
        return image
    return image.resize((size[1], size[0]), Image.BILINEAR)


def _resize_nearest(array: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """uint8 [H, W] label or mask -> [h, w] with nearest-neighbour sampling."""
    if size is None or array.shape == tuple(size):
        return array
    return np.asarray(Image.fromarray(array).resize((size[1], size[0]), Image.NEAREST))


def _to_sample(image: np.ndarray, labels: list[int], masks: np.ndarray, image_id: int, flip: bool,
               semantic: np.ndarray | None = None) -> dict[str, Any]:
    """numpy image uint8 [H, W, 3], masks bool [N, H, W] (and semantic [H, W]) -> a dataset item, with
    a random horizontal flip when `flip`. Arrays stay in numpy until here: small torch ops are slow
    on a busy CPU (thread-pool start-up per op)."""
    if flip and torch.rand(()).item() < 0.5:
        image, masks = image[:, ::-1], masks[..., ::-1]
        semantic = semantic[:, ::-1] if semantic is not None else None
    sample = {
        "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "masks": torch.from_numpy(np.ascontiguousarray(masks, dtype=bool)),
        "image_id": image_id,
    }
    if semantic is not None:
        sample["semantic"] = torch.from_numpy(np.ascontiguousarray(semantic, dtype=np.int64))
    return sample


def collate(samples: list[dict[str, Any]]) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Items of one size -> (images [B, 3, H, W], targets [{"labels", "masks"}, ...])."""
    sizes = {tuple(s["image"].shape[-2:]) for s in samples}
    if len(sizes) > 1:
        raise ValueError(f"a batch needs images of one size, got {sorted(sizes)}; resize them (train --size)")
    images = torch.stack([s["image"] for s in samples])
    targets = [{"labels": s["labels"], "masks": s["masks"]} for s in samples]
    return images, targets


# ---- COCO instance JSON ------------------------------------------------------------------------
def decode_segmentation(segm: Any, height: int, width: int) -> np.ndarray:
    """COCO polygon list, uncompressed RLE or compressed RLE -> uint8 [H, W] mask."""
    from pycocotools import mask as mask_utils

    if isinstance(segm, list):
        polygons = [p for p in segm if len(p) >= 6]
        if not polygons:
            return np.zeros((height, width), dtype=np.uint8)
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segm, dict) and isinstance(segm.get("counts"), list):
        rle = mask_utils.frPyObjects(segm, height, width)
    elif isinstance(segm, dict) and isinstance(segm.get("counts"), (str, bytes)):
        rle = segm
    else:
        raise ValueError(f"unsupported COCO segmentation: {type(segm).__name__}")
    return mask_utils.decode(rle).astype(np.uint8)


class CocoInstanceDataset(Dataset):
    """COCO-format instance segmentation. `image_root` defaults to the JSON's folder; `size` resizes
    images and masks to a fixed (H, W) (or square int); `flip` is a random horizontal flip."""

    def __init__(self, json_path: str | os.PathLike, image_root: str | os.PathLike | None = None,
                 size: int | tuple[int, int] | None = None, flip: bool = False):
        self.json_path = Path(json_path)
        data = json.loads(self.json_path.read_text())
        for key in ("images", "annotations", "categories"):
            if key not in data:
                raise ValueError(f"{self.json_path} is not a COCO instance file: no '{key}'")
        self.image_root = Path(image_root) if image_root is not None else self.json_path.parent
        categories = sorted(data["categories"], key=lambda c: c["id"])
        self.category_ids = [int(c["id"]) for c in categories]
        self.classes = [str(c.get("name", c["id"])) for c in categories]
        self.contiguous = {cid: i for i, cid in enumerate(self.category_ids)}
        self.images = sorted(data["images"], key=lambda im: im["id"])
        self.annotations: dict[int, list[dict]] = {int(im["id"]): [] for im in self.images}
        for ann in data["annotations"]:
            if ann.get("iscrowd", 0) or int(ann["image_id"]) not in self.annotations:
                continue
            if ann["category_id"] not in self.contiguous:
                raise ValueError(f"{self.json_path}: annotation {ann.get('id')} has unknown category_id {ann['category_id']}")
            self.annotations[int(ann["image_id"])].append(ann)
        self.size = _as_size(size)
        self.flip = flip

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.images)

    def image_path(self, index: int) -> Path:
        return self.image_root / self.images[index]["file_name"]

    def __getitem__(self, index: int) -> dict[str, Any]:
        info = self.images[index]
        image = Image.open(self.image_path(index)).convert("RGB")
        w, h = image.size
        anns = self.annotations[int(info["id"])]
        out_h, out_w = self.size or (h, w)
        masks = np.zeros((len(anns), out_h, out_w), dtype=bool)
        for k, ann in enumerate(anns):
            masks[k] = _resize_nearest(decode_segmentation(ann["segmentation"], h, w), self.size) > 0
        keep = masks.reshape(len(anns), out_h * out_w).any(1)  # a resize can erase tiny objects
        labels = [self.contiguous[a["category_id"]] for a, kept in zip(anns, keep) if kept]
        image_array = np.asarray(_resize_image(image, self.size))
        return _to_sample(image_array, labels, masks[keep], int(info["id"]), self.flip)


# ---- semantic folders --------------------------------------------------------------------------
class SemanticSegDataset(Dataset):
    """`ROOT/images/*` with `ROOT/labels/<stem>.png` (255 = ignore). Each class present in an image is
    one GT mask. Class names come from `classes`, `ROOT/classes.json`, or `num_classes` (names
    "0".."C-1"); with none of them the labels are scanned for the largest id."""

    def __init__(self, root: str | os.PathLike, classes: list[str] | None = None, num_classes: int | None = None,
                 size: int | tuple[int, int] | None = None, flip: bool = False):
        self.root = Path(root)
        self.image_dir, self.label_dir = self.root / "images", self.root / "labels"
        if not self.image_dir.is_dir() or not self.label_dir.is_dir():
            raise FileNotFoundError(f"{self.root} is not a semantic dataset folder: needs images/ and labels/")
        images = sorted(p for p in self.image_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        self.items = []
        for p in images:
            label = self.label_dir / f"{p.stem}.png"
            if not label.is_file():
                raise FileNotFoundError(f"no label PNG {label} for image {p}")
            self.items.append((p, label))
        if not self.items:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {self.image_dir}")
        if classes is None and (self.root / "classes.json").is_file():
            classes = json.loads((self.root / "classes.json").read_text())
        if classes is None:
            if num_classes is None:
                num_classes = self._scan_num_classes()
            classes = [str(i) for i in range(num_classes)]
        self.classes = list(classes)
        self.size = _as_size(size)
        self.flip = flip

    def _scan_num_classes(self) -> int:
        top = 0
        for _, label in self.items:
            values = np.unique(np.asarray(Image.open(label)))
            values = values[values != IGNORE_LABEL]
            top = max(top, int(values.max()) + 1 if values.size else 0)
        logger.info("%s: no classes.json, found %d classes by scanning the labels", self.root, top)
        return max(top, 1)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_path, label_path = self.items[index]
        image = Image.open(image_path).convert("RGB")
        label = np.asarray(Image.open(label_path))
        if label.ndim != 2:
            raise ValueError(f"{label_path}: label PNG must be single-channel class ids, got shape {label.shape}")
        if label.shape != (image.size[1], image.size[0]):
            raise ValueError(f"{label_path} is {label.shape[1]}x{label.shape[0]} but {image_path} is "
                             f"{image.size[0]}x{image.size[1]}")
        label = _resize_nearest(label.astype(np.uint8), self.size)
        present = [int(c) for c in np.unique(label) if int(c) != IGNORE_LABEL]
        bad = [c for c in present if c >= self.num_classes]
        if bad:
            raise ValueError(f"{label_path} has class ids {bad} >= num_classes {self.num_classes}")
        masks = label[None] == np.asarray(present, dtype=np.uint8).reshape(-1, 1, 1)
        image_array = np.asarray(_resize_image(image, self.size))
        return _to_sample(image_array, present, masks, index, self.flip, semantic=label)


def load_dataset(path: str | os.PathLike, size: int | tuple[int, int] | None = None, flip: bool = False,
                 num_classes: int | None = None, image_root: str | os.PathLike | None = None) -> Dataset:
    """A `.json` file is COCO instances; a folder with images/ and labels/ is semantic; a folder with
    only `instances.json` is COCO instances."""
    path = Path(path)
    if path.is_file() and path.suffix == ".json":
        return CocoInstanceDataset(path, image_root=image_root, size=size, flip=flip)
    if path.is_dir() and (path / "labels").is_dir():
        return SemanticSegDataset(path, num_classes=num_classes, size=size, flip=flip)
    if path.is_dir() and (path / "instances.json").is_file():
        return CocoInstanceDataset(path / "instances.json", image_root=image_root, size=size, flip=flip)
    raise FileNotFoundError(f"{path}: expected a COCO instances .json or a folder with images/ and labels/")


# ---- synthetic shapes --------------------------------------------------------------------------
def _shape_polygon(kind: int, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]] | None:
    if kind == 1:  # rectangle, axis-aligned with a random aspect
        a = r * (0.6 + 0.4 * math.cos(angle) ** 2)
        b = r * (0.6 + 0.4 * math.sin(angle) ** 2)
        return [(cx - a, cy - b), (cx + a, cy - b), (cx + a, cy + b), (cx - a, cy + b)]
    if kind == 2:  # triangle, equilateral with a random rotation
        return [(cx + r * math.cos(angle + k * 2 * math.pi / 3), cy + r * math.sin(angle + k * 2 * math.pi / 3))
                for k in range(3)]
    return None


def _draw_shape(kind: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """bool [S, S] mask of one shape of class `kind` at a random place, size and rotation."""
    r = float(rng.uniform(size / 9, size / 4.5))
    cx, cy = rng.uniform(r, size - r, 2)
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    polygon = _shape_polygon(kind, cx, cy, r, float(rng.uniform(0, 2 * math.pi)))
    if polygon is None:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
    else:
        draw.polygon(polygon, fill=1)
    return np.asarray(canvas, dtype=bool)


def _contrasting_color(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random colour at least 80 (RGB distance) from the mean colour it covers, so no shape is invisible."""
    below = image[mask].mean(0)
    for _ in range(20):
        color = rng.integers(0, 256, 3)
        if np.linalg.norm(color - below) >= 80:
            break
    return color


def synthetic_sample(size: int, rng: np.random.Generator, min_shapes: int = 1, max_shapes: int = 4,
                     min_area: int = 30, max_tries: int = 20) -> tuple[np.ndarray, list[int], list[np.ndarray]]:
    """One image: (uint8 [S, S, 3], classes per instance, visible bool masks [S, S] per instance).

    Shapes may overlap a little (a new shape covers at most 20% of its area of earlier ones, and
    every earlier shape keeps at least 60% of its pixels) so that the class stays readable from
    the visible outline; a shape with no such place in `max_tries` draws is left out.
    """
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0.0, 1.0, size)[None, :, None]
    background = (c0 * (1 - t) + c1 * t) * np.ones((size, 1, 1))
    image = np.clip(background + rng.normal(0, 6, (size, size, 3)), 0, 255)
    classes, masks, full_areas = [], [], []
    for _ in range(int(rng.integers(min_shapes, max_shapes + 1))):
        kind = int(rng.integers(0, len(SYNTH_CLASSES)))
        for _ in range(max_tries):
            mask = _draw_shape(kind, size, rng)
            covered = np.zeros_like(mask)
            for m in masks:
                covered |= m
            area = mask.sum()
            if (mask & covered).sum() <= 0.2 * area and all(
                    (m & ~mask).sum() >= 0.6 * full for m, full in zip(masks, full_areas)):
                break
        else:
            continue
        image[mask] = _contrasting_color(image, mask, rng)
        masks = [m & ~mask for m in masks]  # later shapes occlude earlier ones
        classes.append(kind)
        masks.append(mask)
        full_areas.append(area)
    keep = [i for i, m in enumerate(masks) if m.sum() >= min_area]
    return image.astype(np.uint8), [classes[i] for i in keep], [masks[i] for i in keep]


def _write_split(out: Path, n: int, size: int, rng: np.random.Generator, min_shapes: int, max_shapes: int) -> None:
    from pycocotools import mask as mask_utils

    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(n):
        image, classes, masks = synthetic_sample(size, rng, min_shapes, max_shapes)
        name = f"{i:06d}.png"
        Image.fromarray(image).save(out / "images" / name)
        semantic = np.full((size, size), IGNORE_LABEL, dtype=np.uint8)
        for cls, mask in zip(classes, masks):
            semantic[mask] = cls
        Image.fromarray(semantic).save(out / "labels" / name)
        images.append({"id": i + 1, "file_name": f"images/{name}", "height": size, "width": size})
        for cls, mask in zip(classes, masks):
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            ys, xs = np.nonzero(mask)
            annotations.append({
                "id": len(annotations) + 1, "image_id": i + 1, "category_id": cls + 1, "iscrowd": 0,
                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                "area": int(mask.sum()),
                "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)],
            })
    categories = [{"id": k + 1, "name": name} for k, name in enumerate(SYNTH_CLASSES)]
    (out / "instances.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                     "categories": categories}))
    (out / "classes.json").write_text(json.dumps(SYNTH_CLASSES))


def make_synthetic_dataset(out: str | os.PathLike, n: int = 64, size: int = 128, n_val: int | None = None,
                           seed: int = 0, min_shapes: int = 1, max_shapes: int = 4) -> dict[str, Path]:
    """Write `OUT/train` (n images) and `OUT/val` (n_val, default max(8, n // 4)) in both formats.

    Each split folder holds images/, labels/ (semantic PNGs, background 255 = ignore),
    instances.json (COCO, RLE segmentations, category ids 1..3) and classes.json.
    Returns {"train": dir, "val": dir}.
    """
    out = Path(out)
    rng = np.random.default_rng(seed)
    n_val = max(8, n // 4) if n_val is None else n_val
    splits = {"train": out / "train", "val": out / "val"}
    _write_split(splits["train"], n, size, rng, min_shapes, max_shapes)
    _write_split(splits["val"], n_val, size, rng, min_shapes, max_shapes)
    return splits


def _run_synth(args: argparse.Namespace) -> int:
    splits = make_synthetic_dataset(args.out, n=args.n, size=args.size, n_val=args.n_val, seed=args.seed,
                                    min_shapes=args.min_shapes, max_shapes=args.max_shapes)
    for name, path in splits.items():
        print(f"{name}: {path}  (instance: {path / 'instances.json'}, semantic: {path})")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("data", help="dataset utilities")
    sub = p.add_subparsers(dest="data_command", required=True)
    s = sub.add_parser("synth", help="write a synthetic shapes dataset (COCO instances + semantic folders)")
    s.add_argument("--out", required=True)
    s.add_argument("--n", type=int, default=64, help="training images")
    s.add_argument("--n-val", type=int, default=None, help="validation images (default max(8, n/4))")
    s.add_argument("--size", type=int, default=128)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--min-shapes", type=int, default=1)
    s.add_argument("--max-shapes", type=int, default=4)
    s.set_defaults(func=_run_synth)
