"""`fai-mf demo`: build a zoo model, run it on a generated image, print timing and output shapes."""
from __future__ import annotations

import argparse
import time
import warnings

import torch


def synthetic_image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """A float [1, 3, H, W] RGB image in 0..255 with a few flat shapes on a gradient."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    img = torch.stack([xx * 200, yy * 200, (1 - xx) * 120], dim=0)
    for _ in range(4):
        cy, cx = torch.randint(0, height, (1,), generator=g).item(), torch.randint(0, width, (1,), generator=g).item()
        r = max(4, min(height, width) // 6)
        color = torch.randint(0, 256, (3, 1, 1), generator=g).float()
        inside = ((yy * height - cy) ** 2 + (xx * width - cx) ** 2) < r * r
        img = torch.where(inside, color, img)
    return img.unsqueeze(0)


def run(args: argparse.Namespace) -> int:
    import fai_mf

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = fai_mf.load_model(args.model, weights=args.weights)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    x = synthetic_image(args.resolution, args.resolution)
    with torch.inference_mode():
        m.model.forward_raw(x)  # warm-up
        t0 = time.perf_counter()
        for _ in range(args.iters):
            raw = m.model.forward_raw(x)
        dt = (time.perf_counter() - t0) / args.iters
        out = m.model(x)
    print(f"model {args.model} ({'random weights' if args.weights is None else args.weights}), "
          f"input {tuple(x.shape)}, device cpu, {torch.get_num_threads()} threads")
    print(f"forward_raw: {dt * 1e3:.1f} ms/image ({1 / dt:.2f} FPS)")
    print(f"class_logits {tuple(raw.class_logits.shape)}  mask_logits {tuple(raw.mask_logits.shape)}")
    print(f"masks {tuple(out.masks.shape)}  logits {tuple(out.logits.shape)}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="run a zoo model on a generated image and print timing and shapes")
    p.add_argument("--model", default="fai-mf-s-coco-ins")
    p.add_argument("--weights", default=None)
    p.add_argument("--resolution", type=int, default=640)
    p.add_argument("--iters", type=int, default=3)
    p.set_defaults(func=run)
