"""`fai-mf export`: a model to ONNX (the reference path, checked with ONNX Runtime) or to a torch.export program.

    fai-mf export --format onnx --model fai-mf-s-coco-ins --weights model_final.pth --out model.onnx
    fai-mf export --format pt2 --model runs/a --kernels auto --out model.pt2   # torch.export.save
"""
from __future__ import annotations

import argparse
import logging
import time
import warnings

logger = logging.getLogger(__name__)

FORMATS = ("onnx", "pt2")


def run(args: argparse.Namespace) -> int:
    import torch

    from .io import load_model
    from .runtime import ONNX_OPSET, example_images, export_onnx, export_program

    with warnings.catch_warnings():
        if args.weights is None:
            warnings.filterwarnings("ignore", message=".*RANDOM weights.*")  # logged by load_model as well
        m = load_model(args.model, weights=args.weights, device="cpu")
    images = example_images(m, 1, args.height, args.width)
    start = time.perf_counter()
    if args.format == "onnx":
        path = export_onnx(m, args.out, opset=args.opset or ONNX_OPSET, images=images, check=not args.no_check)
        checked = "" if args.no_check else ", checked with ONNX Runtime (max |diff| <= 1e-4)"
        print(f"wrote {path} (opset {args.opset or ONNX_OPSET}, dynamic batch/H/W, reference path{checked}) "
              f"in {time.perf_counter() - start:.1f} s")
    else:
        program = export_program(m, kernels=args.kernels, images=images, dynamic=args.dynamic)
        torch.export.save(program, args.out)
        print(f"wrote {args.out} (torch.export, kernels {args.kernels}{', dynamic batch/H/W' if args.dynamic else ''}) "
              f"in {time.perf_counter() - start:.1f} s; load with `import mf_kernels; torch.export.load(path)`")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="export a model to ONNX (checked with ONNX Runtime) or torch.export")
    p.add_argument("--format", choices=FORMATS, default="onnx", help="onnx, or pt2 (a torch.export program)")
    p.add_argument("--model", required=True, help="zoo name (random weights), focoos model dir or model_info.json")
    p.add_argument("--weights", default=None, help="model_final.pth to load (overrides the model dir's)")
    p.add_argument("--out", required=True, help="output file (model.onnx / model.pt2)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (>= 17; default 18)")
    p.add_argument("--height", type=int, default=None, help="example image height (default: the config resolution)")
    p.add_argument("--width", type=int, default=None, help="example image width (default: the config resolution)")
    p.add_argument("--no-check", action="store_true", help="skip the ONNX Runtime check of the exported file")
    p.add_argument("--kernels", default="reference", help="pt2 only: reference (aten ops) or a fused choice "
                                                          "(torch.ops.mf_kernels custom ops)")
    p.add_argument("--dynamic", action="store_true", help="pt2 only: symbolic batch, H and W")
    p.set_defaults(func=run)
