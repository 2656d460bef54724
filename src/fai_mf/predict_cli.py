"""`fai-mf predict`: a model over image files, folders, globs, path lists or a COCO file's images.

Output (`--out`, default stdout): JSON Lines, one record per image in input order,
    {"path", ["image_id"], "size": [H, W], "detections": [FocoosDet dicts], "latency": {ms}}
or, for an image that could not be read, {"path", ["image_id"], "error": reason}. Every record is flushed
as soon as it is written, so an interrupted run keeps what it did and `--resume` runs only the rest.
`--format coco` writes a COCO results list instead ({"image_id", "category_id", "segmentation" (RLE),
"score", "bbox" [x, y, w, h]}; ids from the COCO file given as input, else the 1-based input position
and the class id), renamed into place when complete; its per-image records (with the failures, which a
COCO file cannot hold) go to `OUT` with the suffix `.records.jsonl`, which `--resume` reads.

Under `torchrun --nnodes N --nproc_per_node G -m fai_mf.cli predict ... --out OUT`, every process runs
its share of the images and rank 0 merges the shares into OUT in input order (see `fai_mf.engine`).

Exit status: 0 every image done; 3 the run finished but some images failed (their records say why and
the summary counts them); 1 an error stopped the command before or during the work (one line on stderr;
`-v` shows the traceback); 2 bad command-line usage.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch

from . import distributed
from .cli_support import (EXIT_FAILED_IMAGES, add_runtime_arguments, check_kernels, check_output_dir,
                          check_output_file, check_weights, kernels_report, probability, resolve_device,
                          resolve_dtype, start_distributed)
from .engine import MAX_LISTED_FAILURES, Progress, RunStats, ShardedOutput, is_failure, write_atomic
from .sources import Entry, InputSet, resolve_inputs

logger = logging.getLogger("fai_mf.predict")


# ---- COCO results -----------------------------------------------------------------------------
def coco_results(records: list[dict[str, Any]], category_ids: list[int] | None) -> list[dict[str, Any]]:
    """COCO results of prediction records whose masks are RLE: class k -> category_ids[k] (the class
    id itself without a COCO file), bbox inclusive [x1, y1, x2, y2] -> [x, y, w, h]."""
    results = []
    for record in records:
        for det in record.get("detections", ()):
            x1, y1, x2, y2 = det["bbox"]
            cls_id = det["cls_id"]
            results.append({"image_id": record["image_id"],
                            "category_id": category_ids[cls_id] if category_ids is not None else cls_id,
                            "segmentation": json.loads(det["mask"]), "score": det["conf"],
                            "bbox": [x1, y1, x2 - x1 + 1, y2 - y1 + 1]})
    return results


def _with_image_ids(inputs: InputSet) -> InputSet:
    """COCO output needs an image id per image: the COCO file's, else the 1-based input position."""
    with_id = [e.image_id is not None for e in inputs.entries]
    if all(with_id):
        return inputs
    if any(with_id):
        raise ValueError("--format coco: the inputs mix images of a COCO file with other images, whose image ids "
                         "would be ambiguous; predict them in separate runs")
    entries = [dataclasses.replace(e, image_id=i + 1) for i, e in enumerate(inputs.entries)]
    return InputSet(entries, inputs.category_ids)


def _category_ids(inputs: InputSet, num_classes: int) -> list[int] | None:
    ids = inputs.category_ids
    if ids is not None and len(ids) != num_classes:
        raise ValueError(f"the COCO file has {len(ids)} categories but the model has {num_classes} classes; "
                         "class ids cannot be mapped to category ids")
    return ids


# ---- annotated images -------------------------------------------------------------------------
class _Annotator:
    """Writes annotated PNGs: --annotate FILE (STEM_<k>.png for the k-th of several images) or
    --annotate-dir DIR (each image's `Entry.name`: its path below its input folder, as .png; folders
    are made as needed)."""

    def __init__(self, file: Path | None, directory: Path | None, entries: list[Entry]):
        self.file, self.directory = file, directory
        self.index = {e.key: k for k, e in enumerate(entries)} if file is not None and len(entries) > 1 else None
        self.names = {e.key: e.name for e in entries}

    @property
    def enabled(self) -> bool:
        return self.file is not None or self.directory is not None

    def paths(self, key: str) -> list[Path]:
        paths = []
        if self.file is not None:
            f = self.file
            paths.append(f if self.index is None else f.with_name(f"{f.stem}_{self.index[key]}{f.suffix or '.png'}"))
        if self.directory is not None:
            paths.append(self.directory / self.names[key])
        return paths

    def write(self, result: Any) -> None:
        from .visualize import annotate

        drawn = annotate(result.image, result.detections)
        for path in self.paths(result.path):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            drawn.save(tmp, format="PNG")
            tmp.replace(path)
            logger.debug("wrote %s (%d detections)", path, len(result.detections))


# ---- the command ------------------------------------------------------------------------------
def _summarise(stats: RunStats, records: list[dict[str, Any]] | None, skipped: int, out: Path | None, fmt: str,
               device: torch.device) -> int:
    """Log the summary (rank 0) and return the exit status (the same on every rank)."""
    totals = torch.tensor([stats.images, stats.failed, stats.detections, stats.decode_wait_s], dtype=torch.float64,
                          device=device)
    images, failed, detections, wait = distributed.all_reduce_sum(totals).tolist()
    status = 0
    if distributed.is_main_process():
        world, wall = distributed.world_size(), stats.wall_s
        logger.info("this run: %d images (%d failed, %d detections)%s in %.1f s: %.2f img/s; waiting for decoded "
                    "images %.1f%% of the time; kernels: %s", images, failed, detections,
                    f" on {world} processes" if world > 1 else "", wall, images / wall,
                    100 * wait / world / wall, kernels_report())
        if records is not None:
            failures = [(r["path"], r["error"]) for r in records if is_failure(r)]
            found = sum(len(r["detections"]) for r in records if not is_failure(r))
            logger.info("wrote %s (%s): %d images, %d detections, %d failed%s", out, fmt, len(records), found,
                        len(failures), f", {skipped} kept from an earlier run" if skipped else "")
            count = len(failures)
        else:
            failures, count = stats.failures, int(failed)
        for path, reason in failures[:MAX_LISTED_FAILURES]:
            logger.warning("failed: %s: %s", path, reason)
        if count > MAX_LISTED_FAILURES:
            logger.warning("... and %d more failed images (see their records)", count - MAX_LISTED_FAILURES)
        status = EXIT_FAILED_IMAGES if count else 0
    return int(distributed.broadcast_object(status))


@dataclasses.dataclass
class _Outputs:
    out: Path | None  # the requested output (None: JSON Lines on stdout)
    records: Path | None  # the JSON Lines records: `out` itself, or next to a COCO file
    mask_format: str
    annotate_file: Path | None
    annotate_dir: Path | None


def _check_outputs(args: argparse.Namespace) -> _Outputs:
    """Every output path and output option, checked before any work."""
    out = check_output_file(args.out, "--out")
    mask_format = args.mask_format or ("rle" if args.format == "coco" else "png")
    if args.format == "coco" and mask_format != "rle":
        raise ValueError("--format coco writes RLE segmentations: drop --mask-format png")
    if args.resume and out is None:
        raise ValueError("--resume needs --out (it continues that output)")
    if args.format == "coco" and out is None:
        raise ValueError("--format coco needs --out (the COCO file is written when the run is complete)")
    records = out.with_suffix(".records.jsonl") if out is not None and args.format == "coco" else out
    check_output_file(records, "--out records")
    return _Outputs(out, records, mask_format, check_output_file(args.annotate, "--annotate"),
                    check_output_dir(args.annotate_dir, "--annotate-dir"))


def run(args: argparse.Namespace) -> int:
    from .io import load_model
    from .predict import check_options, predict_iter

    # Everything that can be wrong with the arguments fails here, before any work.
    outputs = _check_outputs(args)
    out, records_path, mask_format = outputs.out, outputs.records, outputs.mask_format
    check_weights(args.weights)
    check_options(args.threshold, args.mask_threshold, mask_format=mask_format)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    kernels = check_kernels(args.kernels)
    inputs = resolve_inputs(args.inputs, image_root=args.image_root)
    if args.format == "coco":
        inputs = _with_image_ids(inputs)
    if args.threads:
        torch.set_num_threads(args.threads)

    owns_group = start_distributed(device)
    if records_path is None and distributed.world_size() > 1:
        raise ValueError("under torchrun, give --out (rank 0 merges every process's share into it)")
    model = load_model(args.model, weights=args.weights, device=device, kernels=kernels)
    model.model.to(dtype)
    category_ids = _category_ids(inputs, model.config.num_classes)
    annotator = _Annotator(outputs.annotate_file, outputs.annotate_dir, inputs.entries)

    output = ShardedOutput(records_path, args.resume, device) if records_path is not None else None
    mine = output.start(inputs.entries) if output is not None else inputs.entries
    stats = RunStats()
    rank_note = f" (rank 0 of {distributed.world_size()}: its share)" if distributed.world_size() > 1 else ""
    progress = Progress(len(mine), f"predict{rank_note}", enabled=distributed.is_main_process(),
                        interval=args.log_interval)
    try:
        for result in predict_iter(model, InputSet(mine, inputs.category_ids), batch=args.batch, workers=args.workers,
                                   threshold=args.threshold, mask_threshold=args.mask_threshold,
                                   mask_format=mask_format, keep_images=annotator.enabled, stats=stats):
            record = result.to_record(latency=not args.no_latency)
            if output is not None:
                output.write(record)
            else:
                print(json.dumps(record), flush=True)
            if result.ok and annotator.enabled:
                annotator.write(result)
            progress.update(failed=not result.ok)
    finally:
        progress.close()
        if output is not None:
            output.close()
    records = output.finish(inputs.entries) if output is not None else None
    if records is not None and args.format == "coco":
        write_atomic(out, [json.dumps(coco_results(records, category_ids))])
    status = _summarise(stats, records, output.skipped if output is not None else 0, out, args.format, device)
    if owns_group:
        distributed.cleanup()
    return status


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict", help="run a model over images, folders, globs, path lists or a COCO file's images",
        description=__doc__.split("\n\n")[0], epilog="Exit status: 0 all images done, 3 some images failed "
        "(see their records), 1 error, 2 usage. Under torchrun every process runs a share; rank 0 merges.")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files, folders (recursive), globs, .txt lists of paths, COCO .json files")
    p.add_argument("--model", required=True, help="zoo name (random weights), focoos model dir or model_info.json")
    p.add_argument("--weights", default=None, help="model_final.pth to load (overrides the model dir's)")
    p.add_argument("--out", default=None, help="output file (default: JSON Lines on stdout)")
    p.add_argument("--format", choices=["jsonl", "coco"], default="jsonl",
                   help="jsonl: one record per image; coco: a COCO results file (+ OUT.records.jsonl)")
    p.add_argument("--resume", action="store_true", help="keep the images already in --out; run the rest")
    p.add_argument("--image-root", default=None, help="folder of a COCO file's images (default: the file's folder)")
    p.add_argument("--threshold", type=probability, default=None, help="score threshold (default: the config's)")
    p.add_argument("--mask-threshold", type=probability, default=None, help="mask threshold (default: the config's)")
    p.add_argument("--mask-format", choices=["png", "rle"], default=None,
                   help="detections' masks: png (bbox crop, the default) or rle (COCO RLE; always with coco)")
    p.add_argument("--annotate", default=None,
                   help="annotated PNG of the image; with several images, STEM_<k>.png for the k-th")
    p.add_argument("--annotate-dir", default=None, help="an annotated PNG per image in this folder (created)")
    p.add_argument("--no-latency", action="store_true", help="leave latency out of the records (reproducible bytes)")
    add_runtime_arguments(p)
    p.set_defaults(func=run)
