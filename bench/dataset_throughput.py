"""Dataset throughput of `predict_iter` (the engine of `fai-mf predict`): images/s and the time the model
loop waits for decoded images, for several (batch, workers) settings. Not a test (no timing is asserted);
run by hand:

    .venv/bin/python bench/dataset_throughput.py --model fai-mf-s-coco-ins --size 640 --images 32 \
        --settings 1:0 4:2 --rounds 2 --json out/dataset_throughput.json

Images are generated JPEGs (shapes on a gradient plus noise, so they do not compress to nothing), read
from disk as a user's folder would be. A zoo name without weights gets random weights made to look
trained (sharp masks, ~20 kept queries; see `fai_mf.profile.make_random_model_realistic`), so the
post-processing does a realistic amount of work. Settings run interleaved, `--rounds` times each, after
one warm-up image; the report gives each setting's median over rounds.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import fai_mf
from fai_mf.demo import synthetic_image
from fai_mf.engine import RunStats
from fai_mf.profile import environment, make_random_model_realistic


def write_images(folder: Path, count: int, size: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(count):
        image = synthetic_image(size, size, seed=i)[0].permute(1, 2, 0).numpy()
        noisy = np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(folder / f"{i:04d}.jpg", quality=90)


def run_once(model, folder: Path, batch: int, workers: int) -> dict[str, float]:
    stats = RunStats()
    start = time.perf_counter()
    results = list(model.predict_iter(str(folder), batch=batch, workers=workers, stats=stats))
    wall = time.perf_counter() - start
    if any(not r.ok for r in results):
        raise RuntimeError(f"failed images: {[r.error for r in results if not r.ok]}")
    return {"images": len(results), "wall_s": wall, "images_per_s": len(results) / wall,
            "decode_wait_s": stats.decode_wait_s, "detections": sum(len(r.detections) for r in results)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="fai-mf-s-coco-ins")
    parser.add_argument("--weights", default=None)
    parser.add_argument("--size", type=int, default=640, help="images are SIZE x SIZE")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--settings", nargs="+", default=["1:0", "4:2"], metavar="BATCH:WORKERS")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--kernels", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = [tuple(int(v) for v in s.split(":")) for s in args.settings]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = fai_mf.load_model(args.model, weights=args.weights, kernels=args.kernels)
    notes = []
    if args.weights is None:
        probe = synthetic_image(args.size, args.size)
        notes = make_random_model_realistic(model, probe, keep=20)
    runs: dict[str, list[dict[str, float]]] = {f"batch {b}, workers {w}": [] for b, w in settings}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_images(folder, args.images, args.size)
        list(model.predict_iter(str(folder / "0000.jpg")))  # warm-up: extension load, first-call costs
        for _ in range(args.rounds):
            for (batch, workers), name in zip(settings, runs):
                runs[name].append(run_once(model, folder, batch, workers))
                last = runs[name][-1]
                print(f"  {name}: {last['images_per_s']:.3f} img/s, wall {last['wall_s']:.1f} s, waiting for "
                      f"decode {last['decode_wait_s']:.2f} s ({100 * last['decode_wait_s'] / last['wall_s']:.1f}%)",
                      flush=True)
    report = {"model": args.model, "size": args.size, "images": args.images, "rounds": args.rounds,
              "kernels": args.kernels, "notes": notes, "environment": environment(model.device), "settings": {}}
    print(f"{args.model}, {args.images} images of {args.size}x{args.size}, {torch.get_num_threads()} torch threads, "
          f"median of {args.rounds} rounds:")
    for name, values in runs.items():
        median = {key: statistics.median(v[key] for v in values) for key in values[0]}
        median["decode_wait_fraction"] = median["decode_wait_s"] / median["wall_s"]
        report["settings"][name] = {"median": median, "runs": values}
        print(f"  {name}: {median['images_per_s']:.3f} img/s, waiting for decode "
              f"{100 * median['decode_wait_fraction']:.1f}% of {median['wall_s']:.1f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
