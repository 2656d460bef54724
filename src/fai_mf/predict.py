"""Predictions (SPEC §3): `predict(model, images, ...) -> list[FocoosDetections]`, and `predict_iter` for
whole datasets (the engine is `fai_mf.engine`; the command `fai-mf predict` is `fai_mf.predict_cli`).

Flow per call: load and validate the images (`fai_mf.inputs`); group images of the same size into
batches (results equal running them one at a time, up to float round-off of batched convolutions);
run `forward_raw`; per image, `fai_mf.postprocess.select_queries` gives the kept queries with their mask
strings through the post-processing ops, run by the model's kernels (`kernels="reference"`: the ops'
PyTorch references), and they become `FocoosDet`s (see `detections_from_raw`).
"""
from __future__ import annotations

import logging
import math
import numbers
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
import torch

import mf_kernels

from .formats import FocoosDet, FocoosDetections, check_mask_format
from .inputs import LoadedImage, load_images
from .postprocess import PostprocessOptions, select_queries

if TYPE_CHECKING:
    from .engine import RunStats
    from .io import FAIMFModel

logger = logging.getLogger(__name__)

MAX_BATCH = 8  # images of one size run together at most this many at a time (bounds activation memory)


def _now_ms(device: torch.device) -> float:
    """Wall clock in ms, after waiting for queued GPU work so timings are real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() * 1e3


def _size_batches(images: list[LoadedImage], batch_size: int = MAX_BATCH) -> list[list[int]]:
    """Indices of `images` grouped by (H, W), in first-seen order, at most batch_size per group."""
    by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, image in enumerate(images):
        by_size[image.size].append(i)
    return [ids[s:s + batch_size] for ids in by_size.values() for s in range(0, len(ids), batch_size)]


def _resolve_class_names(model: "FAIMFModel", class_names: Sequence[str] | None) -> list[str] | None:
    """Per-call class names override the model's; explicit ones must cover every class id."""
    if class_names is None:
        return list(model.classes) if model.classes else None
    names = list(class_names)
    if len(names) < model.config.num_classes:
        raise ValueError(f"class_names has {len(names)} names but the model has {model.config.num_classes} classes")
    return names


def detections_from_raw(mask_logits: torch.Tensor, class_probs: torch.Tensor, image_size: tuple[int, int],
                        options: PostprocessOptions, class_names: Sequence[str] | None = None,
                        mask_format: str = "png", kernels: str | None = None) -> list[FocoosDet]:
    """One image: stride-4 mask logits [Q, h4, w4] and class probs [Q, C] -> its `FocoosDet`s, in query order.

    kernels: the backend of the post-processing ops (None follows `mf_kernels.use` / $MF_KERNELS / auto;
    "reference" runs their PyTorch references, every mask upsampled to full size as the model does).
    """
    with torch.inference_mode(), mf_kernels.use(kernels or mf_kernels.current_choice()):
        kept = select_queries(mask_logits, class_probs, image_size, options, mask_format)
    return [FocoosDet(bbox=[int(v) for v in box], conf=float(score), cls_id=int(cls_id),
                      label=_label(class_names, int(cls_id)), mask=mask)
            for cls_id, score, box, mask in zip(kept.classes.tolist(), kept.scores.tolist(), kept.boxes.tolist(),
                                                kept.masks)]


def _label(class_names: Sequence[str] | None, cls_id: int) -> str | None:
    return class_names[cls_id] if class_names is not None and cls_id < len(class_names) else None


def check_options(threshold: Any = None, mask_threshold: Any = None, predict_all_pixels: Any = None,
                  use_mask_score: Any = None, mask_format: str = "png") -> None:
    """Per-call options of `predict`: thresholds None or finite numbers in [0, 1] (0 counts), the flags
    None or bools (False counts); a ValueError / TypeError names the argument."""
    for name, value in (("threshold", threshold), ("mask_threshold", mask_threshold)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a number in [0, 1] (or None for the config's), got {value!r}")
        if not (math.isfinite(value) and 0 <= value <= 1):
            raise ValueError(f"{name} must be a finite number in [0, 1], got {value!r}")
    for name, value in (("predict_all_pixels", predict_all_pixels), ("use_mask_score", use_mask_score)):
        if value is not None and not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{name} must be True, False or None (the config's), got {value!r}")
    check_mask_format(mask_format)


def predict(model: "FAIMFModel", images: Any, threshold: float | None = None, mask_threshold: float | None = None,
            predict_all_pixels: bool | None = None, use_mask_score: bool | None = None,
            class_names: Sequence[str] | None = None, mask_format: str = "png",
            batch_size: int = MAX_BATCH) -> list[FocoosDetections]:
    """Detections of each image, in input order.

    model: a loaded `FAIMFModel`. images: one image or a list (see `fai_mf.inputs`). threshold,
    mask_threshold (finite, in [0, 1]), predict_all_pixels, use_mask_score (bools): None takes the config
    value; anything else, False and 0 included, overrides it. class_names: overrides `model.classes`
    for the labels. mask_format: "png" (base64 PNG of the inclusive bbox crop) or "rle" (JSON string of
    a COCO RLE). batch_size: images of one size run through the model at most this many at a time.
    Each result's `latency` is in milliseconds: {"preprocess", "inference", "postprocess"}.
    For a whole dataset (files, folders, globs; decode workers; streaming) see `predict_iter`.
    """
    check_options(threshold, mask_threshold, predict_all_pixels, use_mask_score, mask_format)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    options = PostprocessOptions.from_config(model.config, threshold, mask_threshold, predict_all_pixels, use_mask_score)
    names = _resolve_class_names(model, class_names)
    device = model.device
    dtype = next(model.model.parameters()).dtype

    start = _now_ms(device)
    loaded = load_images(images)
    preprocess_ms = (_now_ms(device) - start) / max(1, len(loaded))
    results: list[FocoosDetections | None] = [None] * len(loaded)
    for batch_ids in _size_batches(loaded, batch_size):
        batch = torch.stack([loaded[i].tensor for i in batch_ids]).to(device=device, dtype=dtype)
        start = _now_ms(device)
        with torch.inference_mode():
            raw = model.model.forward_raw(batch)
            class_probs = model.model.class_probs(raw.class_logits)
        inference_ms = (_now_ms(device) - start) / len(batch_ids)
        for j, i in enumerate(batch_ids):
            start = _now_ms(device)
            detections = detections_from_raw(raw.mask_logits[j], class_probs[j], loaded[i].size, options, names,
                                             mask_format, kernels=model.kernels)
            latency = {"preprocess": preprocess_ms, "inference": inference_ms, "postprocess": _now_ms(device) - start}
            results[i] = FocoosDetections(detections=detections, image=loaded[i].source, latency=latency)
    return [r for r in results if r is not None]


# --------------------------------------------------------------------------------------------------
# Whole datasets: predict_iter
# --------------------------------------------------------------------------------------------------

@dataclass
class ImageResult:
    """One image of `predict_iter`.

    path: the image file (None for an in-memory image); size: (H, W); detections: its
    `FocoosDetections` (with `latency` in ms: {"preprocess" (decode + checks), "inference",
    "postprocess"}), or None when the image could not be read; then `error` is the reason.
    image_id: its COCO id when it came from a COCO file. image: float32 [3, H, W] in 0..255, only with
    `keep_images=True`.
    """

    path: str | None
    size: tuple[int, int] | None
    detections: FocoosDetections | None
    error: str | None = None
    image_id: int | None = None
    image: torch.Tensor | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_record(self, latency: bool = True) -> dict[str, Any]:
        """The JSON Lines record: {"path", ["image_id"], "size", "detections", ["latency"]}, or for a
        failed image {"path", ["image_id"], "error"}."""
        record: dict[str, Any] = {"path": self.path}
        if self.image_id is not None:
            record["image_id"] = self.image_id
        if self.error is not None:
            record["error"] = self.error
            return record
        record["size"] = list(self.size)
        record["detections"] = [d.model_dump() for d in self.detections]
        if latency and self.detections.latency is not None:
            record["latency"] = {k: round(v, 3) for k, v in self.detections.latency.items()}
        return record


def predict_iter(model: "FAIMFModel", source: Any, batch: int = 1, workers: int | None = 0, *,
                 threshold: float | None = None, mask_threshold: float | None = None,
                 predict_all_pixels: bool | None = None, use_mask_score: bool | None = None,
                 class_names: Sequence[str] | None = None, mask_format: str = "png", image_root: Any = None,
                 keep_images: bool = False, stats: "RunStats | None" = None) -> Iterator[ImageResult]:
    """Detections of every image of `source`, one `ImageResult` per image, in input order, as they finish.

    source: image files, folders (recursive), globs, text files of paths, COCO JSON files (their images,
    under `image_root`), in-memory images, or a list of these (see `fai_mf.sources`); or an `InputSet`.
    batch: images of one size run through the model together, at most this many (mixed sizes run as
    same-size groups, never padded: results equal batch=1 up to float round-off). workers: processes
    decoding images in a DataLoader while the model runs (0: decode in this process; None: 0 for under
    16 images, else half the CPUs, at most 4). An image that
    cannot be read gives a result with `error` set, and the iteration goes on. The other arguments are
    those of `predict`, checked before anything runs. stats: a `fai_mf.engine.RunStats` to fill in.
    """
    from .engine import RunStats, iterate
    from .sources import InputSet, resolve_inputs

    check_options(threshold, mask_threshold, predict_all_pixels, use_mask_score, mask_format)
    names = _resolve_class_names(model, class_names)
    inputs = source if isinstance(source, InputSet) else resolve_inputs(source, image_root)
    stats = stats if stats is not None else RunStats()

    def process(group: list) -> list[FocoosDetections]:
        return predict(model, [item.image for item in group], threshold=threshold, mask_threshold=mask_threshold,
                       predict_all_pixels=predict_all_pixels, use_mask_score=use_mask_score, class_names=names,
                       mask_format=mask_format, batch_size=len(group))

    def results() -> Iterator[ImageResult]:
        for item, detections in iterate(inputs.entries, process, batch=batch, workers=workers, stats=stats):
            entry = item.entry
            stats.count(item, 0 if detections is None else len(detections))
            if detections is None:
                yield ImageResult(entry.path, None, None, error=item.error, image_id=entry.image_id)
                continue
            detections.image = entry.path
            detections.latency["preprocess"] += item.decode_ms
            yield ImageResult(entry.path, item.size, detections, image_id=entry.image_id,
                              image=item.image if keep_images else None)

    return results()
