"""`fai-mf bench fps` (end-to-end profiler) and `fai-mf bench roofline` (bytes, FLOPs, T4 floors)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .cli_support import non_negative_int, positive_int
from .engine import write_atomic


def run_fps(args: argparse.Namespace) -> int:
    from .profile import format_table, plot, profile

    report = profile(args.model, weights=args.weights, resolution=args.resolution, batch=args.batch,
                     dtype=args.dtype, kernels=args.kernels, iters=args.iters, warmup=args.warmup,
                     cuda_graphs=args.cuda_graphs, device=args.device, compare=not args.no_compare,
                     runtimes=tuple(args.runtime))
    print(format_table(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(Path(args.json), [json.dumps(report, indent=2)])
        print(f"wrote {args.json}")
    if args.plot:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        plot(report, args.plot)
        print(f"wrote {args.plot}")
    agreement = report.get("agreement")
    return 0 if agreement is None or agreement["ok"] else 3


def run_roofline(args: argparse.Namespace) -> int:
    from .roofline_model import format_model_roofline, model_roofline

    report = model_roofline(args.model, resolution=args.resolution, device=args.device, measure=not args.no_measure,
                            dtype=args.dtype)
    print(format_model_roofline(report))
    if args.json:
        write_atomic(Path(args.json), [json.dumps(report, indent=2)])
        print(f"wrote {args.json}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from .runtime import RUNTIMES

    bench = subparsers.add_parser("bench", help="profile FPS or print the roofline")
    sub = bench.add_subparsers(dest="bench_command", required=True)

    fps = sub.add_parser("fps", help="end-to-end FPS, per-stage times, reference vs fused kernels")
    fps.add_argument("--model", default="fai-mf-s-coco-ins", help="zoo name, focoos model dir or model_info.json")
    fps.add_argument("--weights", default=None)
    fps.add_argument("--resolution", type=positive_int, default=640)
    fps.add_argument("--batch", type=positive_int, default=1)
    fps.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32")
    fps.add_argument("--kernels", default="auto", help="auto|reference|triton|cpp|cuda|sdpa (compared with reference)")
    fps.add_argument("--runtime", nargs="+", choices=RUNTIMES, default=["torch"],
                     help="forward runtimes side by side: eager torch, torch.compile, ONNX Runtime (see fai_mf.runtime)")
    fps.add_argument("--iters", type=positive_int, default=10)
    fps.add_argument("--warmup", type=non_negative_int, default=2)
    fps.add_argument("--cuda-graphs", action="store_true", help="replay the model as a CUDA graph (CUDA only)")
    fps.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    fps.add_argument("--no-compare", action="store_true", help="skip the reference run and the agreement check")
    fps.add_argument("--json", default=None, help="write the full report here")
    fps.add_argument("--plot", default=None, help="write the per-stage bar chart here (PNG)")
    fps.set_defaults(func=run_fps)

    roof = sub.add_parser("roofline", help="bytes, FLOPs and T4 floor of every kernel at a zoo model's shapes")
    roof.add_argument("--model", default="fai-mf-s-coco-ins")
    roof.add_argument("--resolution", type=positive_int, default=640)
    roof.add_argument("--device", default="t4", help="the roofline device (t4)")
    roof.add_argument("--dtype", choices=["fp16", "fp32"], default="fp16", help="precision the T4 would run")
    roof.add_argument("--no-measure", action="store_true", help="do not time kernels even where a GPU is present")
    roof.add_argument("--json", default=None)
    roof.set_defaults(func=run_roofline)
