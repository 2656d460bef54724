"""Evaluation (SPEC §3 metrics path, §6): COCO segm AP and semantic mIoU / mAcc, and `fai-mf eval`.

Per image the model runs in eval mode on the image at its own size (or resized to `size` x `size`,
with the mask probabilities resized back), and
- instance datasets (COCO JSON): `postprocess.instance_inference` (top_k (query, class) pairs, masks
  `probs > mask_threshold`, score = class prob x mean mask prob) -> COCO RLE results -> pycocotools
  COCOeval(iouType="segm"); AP numbers in percent;
- semantic datasets (folders): `postprocess.semantic_inference` -> confusion matrix over the C
  classes, ignoring label 255; IoU / accuracy per class, mIoU over classes that occur in the ground
  truth or the prediction, mAcc over classes that occur in the ground truth; in percent.

Images are decoded by the engine's DataLoader (`fai_mf.engine.iterate`: `batch` same-size images per
forward, `workers` decoding processes). Sharded (`fai-mf eval` under torchrun) every process predicts
the images `[rank::world]`, each image exactly once; the COCO results are gathered on rank 0 in image
order (the semantic confusion matrices are summed), and the metrics are computed once there, over the
whole set. An image that cannot be read is left out of the metrics with a warning and counted.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from . import distributed
from .cli_support import (EXIT_FAILED_IMAGES, add_runtime_arguments, check_kernels, check_output_file,
                          check_weights, kernels_report, positive_int, resolve_device, resolve_dtype,
                          start_distributed)
from .data import IGNORE_LABEL, CocoInstanceDataset, SemanticSegDataset, load_dataset
from .engine import Progress, iterate, load_image, write_atomic
from .io import FAIMFModel
from .sources import Entry

logger = logging.getLogger(__name__)

COCO_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


@torch.inference_mode()
def batch_query_probs(model: FAIMFModel, images: list[torch.Tensor], size: int | None = None
                      ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Images of one size, float [3, H, W] (0..255) -> per image (mask_probs [Q, H, W], class_probs [Q, C])
    at the images' size, from one batched forward."""
    net = model.model
    net.eval()
    h, w = images[0].shape[-2:]
    x = torch.stack(images).to(model.device, next(net.parameters()).dtype)
    if size is not None and (h, w) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    out = net(x)
    masks = out.masks.float()
    if masks.shape[-2:] != (h, w):
        masks = F.interpolate(masks, size=(h, w), mode="bilinear", align_corners=False)
    logits = out.logits.float()
    return [(masks[b], logits[b]) for b in range(len(images))]


def query_probs(model: FAIMFModel, image: torch.Tensor, size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One image float [3, H, W] (0..255) -> (mask_probs [Q, H, W], class_probs [Q, C]) at the image's size."""
    return batch_query_probs(model, [image], size)[0]


@torch.inference_mode()
def batch_fused_semantic_label_maps(model: FAIMFModel, images: list[torch.Tensor]) -> list[torch.Tensor]:
    """Images of one size -> their semantic label maps [H, W], straight from the stride-4 logits through
    `mf_kernels.semantic_label_map` (class maps at stride 4, C-way bilinear argmax per pixel; no [Q, H, W]
    probabilities), with the model's kernels. Equals `postprocess.semantic_inference` on the full-size
    probabilities up to rounding."""
    import mf_kernels

    net = model.model.eval()
    x = torch.stack(images).to(model.device, next(net.parameters()).dtype)
    with mf_kernels.use(model.kernels):
        raw = net.forward_raw(x)
        class_probs = net.class_probs(raw.class_logits.float())
        size = tuple(images[0].shape[-2:])
        return [mf_kernels.semantic_label_map(raw.mask_logits[b], class_probs[b], size).cpu()
                for b in range(len(images))]


def fused_semantic_label_map(model: FAIMFModel, image: torch.Tensor) -> torch.Tensor:
    """One image float [3, H, W] -> its label map [H, W] (see `batch_fused_semantic_label_maps`)."""
    return batch_fused_semantic_label_maps(model, [image])[0]


def _quiet() -> contextlib.AbstractContextManager:
    return contextlib.redirect_stdout(io.StringIO())  # pycocotools prints progress


@dataclass
class EvalRun:
    """How `evaluate` runs: `batch` images of one size per forward; `workers` decoding processes (None:
    `fai_mf.engine.default_workers`); `sharded` over the torchrun processes (every process must call;
    the metrics come back on rank 0, None elsewhere); `progress` a label to report progress under (None:
    silent), a line every `log_interval` seconds when stderr is not a terminal."""

    batch: int = 1
    workers: int | None = 0
    sharded: bool = False
    progress: str | None = None
    log_interval: float = 30.0


def _run_images(entries: list[Entry], process: Any, run: EvalRun,
                load: Any = load_image) -> Iterator[tuple[int, Any, Any]]:
    """(index in `entries`, decoded item, result) for this process's share of `entries` (every
    world-size-th image when sharded), in order; a failed image has result None and `item.error` set."""
    indices = list(range(len(entries)))
    if run.sharded:
        indices = indices[distributed.rank()::distributed.world_size()]
    progress = Progress(len(indices), run.progress or "eval", interval=run.log_interval,
                        enabled=run.progress is not None and distributed.is_main_process())
    try:
        for item, result in iterate([entries[i] for i in indices], process, batch=run.batch, workers=run.workers,
                                    load=load):
            progress.update(failed=item.error is not None)
            yield indices[item.position], item, result
    finally:
        progress.close()


def _gather_failures(failures: list[tuple[int, str, str]], run: EvalRun) -> list[tuple[int, str, str]]:
    """(index, path, reason) of every failed image, in input order (rank 0; [] elsewhere when sharded)."""
    gathered = distributed.gather_objects(failures) if run.sharded else [failures]
    return sorted(f for part in gathered or [] for f in part)


def _warn_failures(failures: list[tuple[int, str, str]], total: int) -> None:
    if failures:
        logger.warning("%d of %d images could not be read and are left out of the metrics; the first: %s",
                       len(failures), total, "; ".join(f"{path}: {reason}" for _, path, reason in failures[:3]))


def evaluate_instances(model: FAIMFModel, dataset: CocoInstanceDataset, size: int | None = None,
                       limit: int | None = None, top_k: int | None = None,
                       mask_threshold: float | None = None, run: EvalRun | None = None) -> dict[str, Any] | None:
    """COCO segm AP of `model` on a COCO-format dataset (its first `limit` images).

    Every image is predicted once (sharded: by one process); the results are gathered in image order
    and COCOeval runs once, so the metrics do not depend on the number of processes."""
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from .postprocess import instance_inference

    run = run or EvalRun()
    top_k = model.config.top_k if top_k is None else top_k
    mask_threshold = model.config.mask_threshold if mask_threshold is None else mask_threshold
    if dataset.num_classes != model.config.num_classes:
        raise ValueError(f"the dataset has {dataset.num_classes} classes, the model {model.config.num_classes}")
    if dataset.size is not None or dataset.flip:
        raise ValueError("evaluate on the dataset at its own size without flips (size=None, flip=False)")
    n = len(dataset) if limit is None else min(limit, len(dataset))
    entries = [Entry(key=str(dataset.image_path(i)), item=str(dataset.image_path(i)),
                     image_id=int(dataset.images[i]["id"])) for i in range(n)]

    def process(group: list) -> list[list[dict[str, Any]]]:
        per_image = []
        for mask_probs, class_probs in batch_query_probs(model, [item.image for item in group], size):
            inst = instance_inference(mask_probs, class_probs, top_k, mask_threshold)
            masks, labels, scores = inst["masks"].cpu().numpy(), inst["labels"].tolist(), inst["scores"].tolist()
            found = []
            for k in range(masks.shape[0]):
                if not masks[k].any():
                    continue
                rle = mask_utils.encode(np.asfortranarray(masks[k].astype(np.uint8)))
                found.append({"category_id": dataset.category_ids[labels[k]],
                              "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                              "score": float(scores[k])})
            per_image.append(found)
        return per_image

    done, failures = [], []
    for index, item, found in _run_images(entries, process, run):
        if item.error is not None:
            failures.append((index, item.entry.key, item.error))
        else:
            done.append((index, item.entry.image_id, found))
    gathered = distributed.gather_objects(done) if run.sharded else [done]
    failures = _gather_failures(failures, run)
    if gathered is None:
        return None
    done = sorted((d for part in gathered for d in part), key=lambda d: d[0])
    _warn_failures(failures, n)
    image_ids = [image_id for _, image_id, _ in done]
    results = [{"image_id": image_id, **r} for _, image_id, found in done for r in found]
    metrics: dict[str, Any] = {"task": "instance", "images": len(done), "failed": len(failures),
                               "detections": len(results)}
    if not results:
        metrics.update({name: 0.0 for name in COCO_STAT_NAMES})
        return metrics
    with _quiet():
        gt = COCO(str(dataset.json_path))
        dt = gt.loadRes(results)
        coco_eval = COCOeval(gt, dt, iouType="segm")
        coco_eval.params.imgIds = image_ids
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    metrics.update({name: float(v) * 100 for name, v in zip(COCO_STAT_NAMES, coco_eval.stats[:6])})
    return metrics


def semantic_scores(confusion: np.ndarray, classes: list[str] | None = None) -> dict[str, Any]:
    """confusion [C, C] (rows ground truth, columns prediction) -> mIoU, mAcc, per-class IoU, in percent."""
    tp = np.diag(confusion).astype(np.float64)
    gt = confusion.sum(1).astype(np.float64)
    pred = confusion.sum(0).astype(np.float64)
    union = gt + pred - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        acc = np.where(gt > 0, tp / gt, np.nan)
    names = classes or [str(i) for i in range(len(tp))]
    return {
        "mIoU": float(np.nanmean(iou) * 100) if np.isfinite(iou).any() else 0.0,
        "mAcc": float(np.nanmean(acc) * 100) if np.isfinite(acc).any() else 0.0,
        "pixel_acc": float(tp.sum() / max(gt.sum(), 1) * 100),
        "IoU": {name: (None if np.isnan(v) else float(v * 100)) for name, v in zip(names, iou)},
    }


def confusion_matrix(prediction: torch.Tensor, label: torch.Tensor, num_classes: int) -> np.ndarray:
    """prediction, label int [H, W] -> [C, C] counts over pixels whose label is not 255."""
    valid = label != IGNORE_LABEL
    index = label[valid].long() * num_classes + prediction[valid].long()
    return torch.bincount(index.cpu(), minlength=num_classes * num_classes).reshape(num_classes, num_classes).numpy()


class _SemanticSample:
    """Loader of semantic dataset items for the decode workers: entry.item is the item index."""

    def __init__(self, dataset: SemanticSegDataset):
        self.dataset = dataset

    def __call__(self, entry: Entry) -> tuple[torch.Tensor, dict[str, Any]]:
        sample = self.dataset[entry.item]
        return sample["image"], {"semantic": sample["semantic"]}


def evaluate_semantic(model: FAIMFModel, dataset: SemanticSegDataset, size: int | None = None,
                      limit: int | None = None, run: EvalRun | None = None) -> dict[str, Any] | None:
    """mIoU / mAcc of `model` on a semantic dataset (its first `limit` images); the confusion matrix
    is summed over processes when sharded (metrics on rank 0, None elsewhere)."""
    from .postprocess import semantic_inference

    run = run or EvalRun()
    num_classes = model.config.num_classes
    if dataset.num_classes != num_classes:
        raise ValueError(f"the dataset has {dataset.num_classes} classes, the model {num_classes}")
    if dataset.size is not None or dataset.flip:
        raise ValueError("evaluate on the dataset at its own size without flips (size=None, flip=False)")
    n = len(dataset) if limit is None else min(limit, len(dataset))
    entries = [Entry(key=str(dataset.items[i][0]), item=i) for i in range(n)]

    def process(group: list) -> list[np.ndarray]:
        images = [item.image for item in group]
        if size is None and model.kernels != "reference":
            predictions = batch_fused_semantic_label_maps(model, images)
        else:
            predictions = [semantic_inference(*probs) for probs in batch_query_probs(model, images, size)]
        return [confusion_matrix(p, item.extras["semantic"], num_classes) for p, item in zip(predictions, group)]

    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    failures, images = [], 0
    for index, item, counts in _run_images(entries, process, run, load=_SemanticSample(dataset)):
        if item.error is not None:
            failures.append((index, item.entry.key, item.error))
        else:
            confusion += counts
            images += 1
    if run.sharded:
        totals = torch.from_numpy(np.append(confusion.ravel(), images)).to(model.device)
        totals = distributed.all_reduce_sum(totals).cpu().numpy()
        confusion, images = totals[:-1].reshape(num_classes, num_classes), int(totals[-1])
    failures = _gather_failures(failures, run)
    if run.sharded and not distributed.is_main_process():
        return None
    _warn_failures(failures, n)
    return {"task": "semantic", "images": images, "failed": len(failures),
            **semantic_scores(confusion, list(dataset.classes))}


def evaluate(model: FAIMFModel, data: str | os.PathLike, size: int | None = None, limit: int | None = None,
             run: EvalRun | None = None) -> dict[str, Any] | None:
    """COCO segm AP for a COCO JSON, mIoU / mAcc for a semantic folder (see `data.load_dataset`)."""
    dataset = load_dataset(data, num_classes=model.config.num_classes)
    if isinstance(dataset, CocoInstanceDataset):
        return evaluate_instances(model, dataset, size=size, limit=limit, run=run)
    return evaluate_semantic(model, dataset, size=size, limit=limit, run=run)


def format_metrics(metrics: dict[str, Any]) -> str:
    if metrics["task"] == "instance":
        body = "  ".join(f"{k} {metrics[k]:.2f}" for k in COCO_STAT_NAMES)
        return f"segm ({metrics['images']} images, {metrics['detections']} detections): {body}"
    per_class = "  ".join(f"{k} {'-' if v is None else f'{v:.1f}'}" for k, v in metrics["IoU"].items())
    return (f"semantic ({metrics['images']} images): mIoU {metrics['mIoU']:.2f}  mAcc {metrics['mAcc']:.2f}  "
            f"pixel acc {metrics['pixel_acc']:.2f}\n  IoU per class: {per_class}")


def run(args: argparse.Namespace) -> int:
    from .io import load_model

    json_out = check_output_file(args.json, "--json")
    for data in args.data:
        if not Path(data).exists():
            raise FileNotFoundError(f"--data {data}: no such file or folder")
    check_weights(args.weights)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    kernels = check_kernels(args.kernels)
    if args.threads:
        torch.set_num_threads(args.threads)
    owns_group = start_distributed(device)
    model = load_model(args.model, weights=args.weights, device=device, kernels=kernels)
    model.model.to(dtype)
    t0 = time.perf_counter()
    outputs = []
    for data in args.data:
        run_options = EvalRun(batch=args.batch, workers=args.workers, sharded=True, progress=f"eval {data}",
                              log_interval=args.log_interval)
        metrics = evaluate(model, data, size=args.size, limit=args.limit, run=run_options)
        if metrics is not None:
            metrics["data"] = str(data)
            outputs.append(metrics)
            print(f"{data}: {format_metrics(metrics)}", flush=True)
    status = 0
    if distributed.is_main_process():
        world = distributed.world_size()
        print(f"evaluated in {time.perf_counter() - t0:.1f} s{f' on {world} processes' if world > 1 else ''}; "
              f"kernels: {kernels_report()}", flush=True)
        if json_out is not None:
            write_atomic(json_out, [json.dumps(outputs if len(outputs) > 1 else outputs[0], indent=2)])
        status = EXIT_FAILED_IMAGES if any(m["failed"] for m in outputs) else 0
    status = int(distributed.broadcast_object(status))
    if owns_group:
        distributed.cleanup()
    return status


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="COCO segm AP (COCO json) or mIoU/mAcc (semantic folder)",
                              epilog="Exit status: 0 done, 3 some images could not be read (left out of the "
                              "metrics), 1 error, 2 usage. Under torchrun every process predicts a share of the "
                              "images and rank 0 computes the metrics over all of them.")
    p.add_argument("--model", required=True, help="model directory, model_info.json or zoo name")
    p.add_argument("--weights", default=None)
    p.add_argument("--data", required=True, nargs="+", help="COCO instances .json and/or folders with images/ and labels/")
    p.add_argument("--size", type=positive_int, default=None, help="run the model at SIZE x SIZE (default: each image's size)")
    p.add_argument("--limit", type=positive_int, default=None, help="first N images only")
    p.add_argument("--json", default=None, help="write the metrics here")
    add_runtime_arguments(p)
    p.set_defaults(func=run)
