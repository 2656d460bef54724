"""Evaluation (SPEC §3 metrics path, §6): COCO segm AP and semantic mIoU / mAcc, and `fai-mf eval`.

Per image the model runs in eval mode on the image at its own size (or resized to `size` x `size`,
with the mask probabilities resized back), and
- instance datasets (COCO JSON): `postprocess.instance_inference` (top_k (query, class) pairs, masks
  `probs > mask_threshold`, score = class prob x mean mask prob) -> COCO RLE results -> pycocotools
  COCOeval(iouType="segm"); AP numbers in percent;
- semantic datasets (folders): `postprocess.semantic_inference` -> confusion matrix over the C
  classes, ignoring label 255; IoU / accuracy per class, mIoU over classes that occur in the ground
  truth or the prediction, mAcc over classes that occur in the ground truth; in percent.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .data import IGNORE_LABEL, CocoInstanceDataset, SemanticSegDataset, load_dataset
from .io import FAIMFModel

logger = logging.getLogger(__name__)

COCO_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


@torch.inference_mode()
def query_probs(model: FAIMFModel, image: torch.Tensor, size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One image float [3, H, W] (0..255) -> (mask_probs [Q, H, W], class_probs [Q, C]) at the image's size."""
    net = model.model
    net.eval()
    h, w = image.shape[-2:]
    x = image.unsqueeze(0).to(model.device, next(net.parameters()).dtype)
    if size is not None and (h, w) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    out = net(x)
    masks = out.masks[0].float()
    if masks.shape[-2:] != (h, w):
        masks = F.interpolate(masks[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    return masks, out.logits[0].float()


@torch.inference_mode()
def fused_semantic_label_map(model: FAIMFModel, image: torch.Tensor) -> torch.Tensor:
    """The semantic label map [H, W] straight from the stride-4 logits through `mf_kernels.semantic_label_map`
    (class maps at stride 4, C-way bilinear argmax per pixel; no [Q, H, W] probabilities), with the
    model's kernels. Equals `postprocess.semantic_inference` on the full-size probabilities up to rounding."""
    import mf_kernels

    net = model.model.eval()
    x = image.unsqueeze(0).to(model.device, next(net.parameters()).dtype)
    with mf_kernels.use(model.kernels):
        raw = net.forward_raw(x)
        class_probs = net.class_probs(raw.class_logits.float())[0]
        return mf_kernels.semantic_label_map(raw.mask_logits[0], class_probs, tuple(image.shape[-2:])).cpu()


def _quiet() -> contextlib.AbstractContextManager:
    return contextlib.redirect_stdout(io.StringIO())  # pycocotools prints progress


def evaluate_instances(model: FAIMFModel, dataset: CocoInstanceDataset, size: int | None = None,
                       limit: int | None = None, top_k: int | None = None,
                       mask_threshold: float | None = None) -> dict[str, Any]:
    """COCO segm AP of `model` on a COCO-format dataset (its first `limit` images)."""
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from .postprocess import instance_inference

    top_k = model.config.top_k if top_k is None else top_k
    mask_threshold = model.config.mask_threshold if mask_threshold is None else mask_threshold
    if dataset.num_classes != model.config.num_classes:
        raise ValueError(f"the dataset has {dataset.num_classes} classes, the model {model.config.num_classes}")
    if dataset.size is not None or dataset.flip:
        raise ValueError("evaluate on the dataset at its own size without flips (size=None, flip=False)")
    n = len(dataset) if limit is None else min(limit, len(dataset))
    results, image_ids = [], []
    for i in range(n):
        sample = dataset[i]
        mask_probs, class_probs = query_probs(model, sample["image"], size)
        inst = instance_inference(mask_probs, class_probs, top_k, mask_threshold)
        image_ids.append(sample["image_id"])
        masks = inst["masks"].cpu().numpy()
        for k in range(masks.shape[0]):
            if not masks[k].any():
                continue
            rle = mask_utils.encode(np.asfortranarray(masks[k].astype(np.uint8)))
            results.append({"image_id": sample["image_id"],
                            "category_id": dataset.category_ids[int(inst["labels"][k])],
                            "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                            "score": float(inst["scores"][k])})
    metrics: dict[str, Any] = {"task": "instance", "images": n, "detections": len(results)}
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


def evaluate_semantic(model: FAIMFModel, dataset: SemanticSegDataset, size: int | None = None,
                      limit: int | None = None) -> dict[str, Any]:
    """mIoU / mAcc of `model` on a semantic dataset (its first `limit` images)."""
    from .postprocess import semantic_inference

    num_classes = model.config.num_classes
    if dataset.num_classes != num_classes:
        raise ValueError(f"the dataset has {dataset.num_classes} classes, the model {num_classes}")
    if dataset.size is not None or dataset.flip:
        raise ValueError("evaluate on the dataset at its own size without flips (size=None, flip=False)")
    n = len(dataset) if limit is None else min(limit, len(dataset))
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    for i in range(n):
        sample = dataset[i]
        if size is None and model.kernels != "reference":
            prediction = fused_semantic_label_map(model, sample["image"])
        else:
            mask_probs, class_probs = query_probs(model, sample["image"], size)
            prediction = semantic_inference(mask_probs, class_probs)
        confusion += confusion_matrix(prediction, sample["semantic"], num_classes)
    return {"task": "semantic", "images": n, **semantic_scores(confusion, list(dataset.classes))}


def evaluate(model: FAIMFModel, data: str | os.PathLike, size: int | None = None, limit: int | None = None) -> dict[str, Any]:
    """COCO segm AP for a COCO JSON, mIoU / mAcc for a semantic folder (see `data.load_dataset`)."""
    dataset = load_dataset(data, num_classes=model.config.num_classes)
    if isinstance(dataset, CocoInstanceDataset):
        return evaluate_instances(model, dataset, size=size, limit=limit)
    return evaluate_semantic(model, dataset, size=size, limit=limit)


def format_metrics(metrics: dict[str, Any]) -> str:
    if metrics["task"] == "instance":
        body = "  ".join(f"{k} {metrics[k]:.2f}" for k in COCO_STAT_NAMES)
        return f"segm ({metrics['images']} images, {metrics['detections']} detections): {body}"
    per_class = "  ".join(f"{k} {'-' if v is None else f'{v:.1f}'}" for k, v in metrics["IoU"].items())
    return (f"semantic ({metrics['images']} images): mIoU {metrics['mIoU']:.2f}  mAcc {metrics['mAcc']:.2f}  "
            f"pixel acc {metrics['pixel_acc']:.2f}\n  IoU per class: {per_class}")


def run(args: argparse.Namespace) -> int:
    from .io import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, weights=args.weights, device=args.device)
    t0 = time.perf_counter()
    outputs = []
    for data in args.data:
        metrics = evaluate(model, data, size=args.size, limit=args.limit)
        metrics["data"] = str(data)
        outputs.append(metrics)
        print(f"{data}: {format_metrics(metrics)}", flush=True)
    print(f"evaluated in {time.perf_counter() - t0:.1f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(outputs if len(outputs) > 1 else outputs[0], indent=2))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="COCO segm AP (COCO json) or mIoU/mAcc (semantic folder)")
    p.add_argument("--model", required=True, help="model directory, model_info.json or zoo name")
    p.add_argument("--weights", default=None)
    p.add_argument("--data", required=True, nargs="+", help="COCO instances .json and/or folders with images/ and labels/")
    p.add_argument("--size", type=int, default=None, help="run the model at SIZE x SIZE (default: each image's size)")
    p.add_argument("--limit", type=int, default=None, help="first N images only")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", default=None, help="write the metrics here")
    p.set_defaults(func=run)
