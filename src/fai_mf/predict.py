"""Predictions (SPEC §3): `predict(model, images, ...) -> list[FocoosDetections]` and `fai-mf predict`.

Flow per call: load and validate the images (`fai_mf.inputs`); group images of the same size into
batches (results equal running them one at a time, up to float round-off of batched convolutions);
run `forward_raw`; per image, `fai_mf.postprocess.select_queries` gives the kept queries with their mask
strings through the post-processing ops, run by the model's kernels (`kernels="reference"`: the ops'
PyTorch references), and they become `FocoosDet`s (see `detections_from_raw`).
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

import mf_kernels

from .formats import FocoosDet, FocoosDetections, check_mask_format
from .inputs import LoadedImage, load_images
from .postprocess import PostprocessOptions, select_queries

if TYPE_CHECKING:
    from .io import FAIMFModel

logger = logging.getLogger(__name__)

MAX_BATCH = 8  # images of one size run together at most this many at a time (bounds activation memory)


def _now_ms(device: torch.device) -> float:
    """Wall clock in ms, after waiting for queued GPU work so timings are real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() * 1e3


def _size_batches(images: list[LoadedImage]) -> list[list[int]]:
    """Indices of `images` grouped by (H, W), in first-seen order, at most MAX_BATCH per group."""
    by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, image in enumerate(images):
        by_size[image.size].append(i)
    return [ids[s:s + MAX_BATCH] for ids in by_size.values() for s in range(0, len(ids), MAX_BATCH)]


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


def predict(model: "FAIMFModel", images: Any, threshold: float | None = None, mask_threshold: float | None = None,
            predict_all_pixels: bool | None = None, use_mask_score: bool | None = None,
            class_names: Sequence[str] | None = None, mask_format: str = "png") -> list[FocoosDetections]:
    """Detections of each image, in input order.

    model: a loaded `FAIMFModel`. images: one image or a list (see `fai_mf.inputs`). threshold,
    mask_threshold, predict_all_pixels, use_mask_score: None takes the config value; anything else,
    False and 0 included, overrides it. class_names: overrides `model.classes` for the labels.
    mask_format: "png" (base64 PNG of the inclusive bbox crop) or "rle" (JSON string of a COCO RLE).
    Each result's `latency` is in milliseconds: {"preprocess", "inference", "postprocess"}.
    """
    check_mask_format(mask_format)
    options = PostprocessOptions.from_config(model.config, threshold, mask_threshold, predict_all_pixels, use_mask_score)
    names = _resolve_class_names(model, class_names)
    device = model.device
    dtype = next(model.model.parameters()).dtype

    start = _now_ms(device)
    loaded = load_images(images)
    preprocess_ms = (_now_ms(device) - start) / max(1, len(loaded))
    results: list[FocoosDetections | None] = [None] * len(loaded)
    for batch_ids in _size_batches(loaded):
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
# fai-mf predict
# --------------------------------------------------------------------------------------------------

def _annotated_paths(path: Path, count: int) -> list[Path]:
    """One output path per image: `path` itself for one image, `stem_<i>.suffix` for several."""
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}_{i}{path.suffix or '.png'}") for i in range(count)]


def run(args: argparse.Namespace) -> int:
    from .io import load_model
    from .visualize import annotate

    model = load_model(args.model, weights=args.weights, device=args.device)
    all_dets = predict(model, list(args.images), threshold=args.threshold, mask_threshold=args.mask_threshold,
                       mask_format=args.mask_format)
    dumps = [d.model_dump() for d in all_dets]
    text = json.dumps(dumps[0] if len(dumps) == 1 else dumps, indent=2)
    if args.out:
        Path(args.out).write_text(text)
        logger.info("wrote %s", args.out)
    else:
        print(text)
    if args.annotate:
        for image_path, dets, out_path in zip(args.images, all_dets, _annotated_paths(Path(args.annotate), len(all_dets))):
            annotate(image_path, dets).save(out_path)
            logger.info("wrote %s (%d detections)", out_path, len(dets))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("predict", help="run a model on images; write detections JSON and annotated images")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--model", required=True, help="zoo name (random weights), focoos model dir or model_info.json")
    p.add_argument("--weights", default=None, help="model_final.pth to load (overrides the model dir's)")
    p.add_argument("--out", default=None, help="JSON output (default: stdout); a list when several images")
    p.add_argument("--annotate", default=None,
                   help="annotated PNG output; with several images, STEM_<i>.png next to it")
    p.add_argument("--threshold", type=float, default=None, help="score threshold (default: the model config's)")
    p.add_argument("--mask-threshold", type=float, default=None, help="mask threshold (default: the config's)")
    p.add_argument("--mask-format", choices=["png", "rle"], default="png")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=run)
