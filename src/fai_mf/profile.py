"""End-to-end FPS profiler (`fai-mf bench fps`): per-stage times, model-only and end-to-end FPS,
peak memory, reference vs fused kernels side by side with an output-agreement check.

Timing is device-synchronised: CUDA events on CUDA (optionally replaying a CUDA graph of the model),
`time.perf_counter` around synchronised calls on CPU. The per-stage breakdown is measured in its own
loop (a sync between stages); the FPS numbers come from loops without inner syncs.

Runtimes (`runtimes=`, `--runtime torch compile onnxruntime`) run side by side in the same interleaved loop,
same weights and image: `torch` (eager: reference and the chosen kernels), `compile` (torch.compile of both:
`fai_mf.runtime.CompiledForward`; the first call's compile time is reported as `setup_s`, apart from the
timings), `onnxruntime` (the reference path exported to ONNX, run by ONNX Runtime, then our post-processing
with the chosen kernels). A compiled or ONNX forward is one opaque call, so only its post-processing stage
is timed separately. Every run's outputs are checked against eager reference.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

import mf_kernels

from .runtime import RUNTIMES, installed, make_runtime

logger = logging.getLogger(__name__)

STAGES = ("backbone", "pixel_decoder", "transformer_decoder", "postprocess")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


@dataclass(frozen=True)
class Variant:
    """One profiled configuration: the kernels choice of the ops and the runtime of the forward."""

    kernels: str
    runtime: str = "torch"

    @property
    def label(self) -> str:
        return self.kernels if self.runtime == "torch" else f"{self.runtime}:{self.kernels}"


def variants_for(kernels: str, runtimes: tuple[str, ...], compare: bool) -> list[Variant]:
    """Eager reference first (the agreement baseline), then `kernels` on each runtime; compile also runs
    the reference (compiled reference vs compiled fused); ONNX Runtime runs the exported reference graph
    with the `kernels` post-processing."""
    out = []
    for runtime in runtimes:
        if runtime not in RUNTIMES:
            raise ValueError(f"unknown runtime {runtime!r}; expected one of {', '.join(RUNTIMES)}")
        if runtime == "onnxruntime":
            out.append(Variant(kernels, runtime))
            continue
        if compare and kernels != "reference":
            out.append(Variant("reference", runtime))
        out.append(Variant(kernels, runtime))
    if compare and Variant("reference") not in out:
        out.insert(0, Variant("reference"))
    return list(dict.fromkeys(out))


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device) -> dict[str, Any]:
    """Device, versions and git SHA recorded with every result."""
    env: dict[str, Any] = {
        "device": str(device), "torch": torch.__version__, "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "git_sha": git_sha(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


class Timer:
    """Synchronised wall time of a callable, in milliseconds (CUDA events on CUDA)."""

    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time(self, fn: Callable[[], Any]) -> tuple[float, Any]:
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end), out
        t0 = time.perf_counter()
        out = fn()
        return (time.perf_counter() - t0) * 1e3, out


@dataclass
class RunResult:
    kernels: str
    stage_ms: dict[str, float]
    model_ms: float
    end_to_end_ms: float
    model_fps: float
    end_to_end_fps: float
    peak_memory_mb: float
    peak_memory_kind: str
    cuda_graphs: bool = False
    kernel_choice: dict[str, str] = field(default_factory=dict)
    runtime: str = "torch"
    label: str = ""
    setup_s: float | None = None  # compile / ONNX export + session time, apart from the timings


def _peak_memory(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "torch.cuda.max_memory_allocated"
    # ru_maxrss is in KiB on Linux: the whole process' peak, models and reference runs included.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS (ru_maxrss)"


def _stage_fns(m, images: torch.Tensor, postprocess: Callable) -> list[tuple[str, Callable]]:
    model = m.model
    state: dict[str, Any] = {}

    def backbone():
        state["features"] = model.pixel_decoder.backbone(model.normalize(images))

    def pixel_decoder():
        state["mask_features"], state["multi_scale"] = model.pixel_decoder.forward_features(state["features"])

    def transformer_decoder():  # as forward_raw in eval mode: only the last prediction is needed
        state["raw"] = model.head.predictor(state["multi_scale"], state["mask_features"], intermediate=False)[-1]

    def post():
        state["detections"] = postprocess(state["raw"].class_logits, state["raw"].mask_logits)

    return [("backbone", backbone), ("pixel_decoder", pixel_decoder), ("transformer_decoder", transformer_decoder),
            ("postprocess", post)]


def run_interleaved(m, images: torch.Tensor, postprocess: Callable, choices: list, iters: int, warmup: int,
                    cuda_graphs: bool) -> list[RunResult]:
    """Profile `m` with each kernels choice (a str, or a `Variant` with its runtime) on `images`,
    interleaving the choices iteration by iteration so that a change of machine load hits them alike
    (medians of `iters` samples each)."""
    device = images.device
    timer = Timer(device)
    eager_stages = _stage_fns(m, images, postprocess)
    variants = [c if isinstance(c, Variant) else Variant(c) for c in choices]
    runtimes = {v: make_runtime(m, v.runtime) for v in variants}
    setup: dict[Variant, float | None] = {}

    def model_only():
        return m.model.forward_raw(images)

    def end_to_end(forward: Callable) -> Callable:
        def run():
            raw = forward()
            return postprocess(raw.class_logits, raw.mask_logits)
        return run

    own_raw: dict[Variant, Any] = {}

    def stages(v: Variant) -> list[tuple[str, Callable]]:
        """A compiled / ONNX forward is one opaque call: only the post-processing of its output is a stage."""
        if v.runtime == "torch":
            return eager_stages
        return [("postprocess", lambda: postprocess(own_raw[v].class_logits, own_raw[v].mask_logits))]

    samples = {v: {"stages": {name: [] for name in STAGES}, "model": [], "e2e": []} for v in variants}
    forwards: dict[Variant, Callable] = {}
    peaks: dict[Variant, tuple[float, str]] = {}
    with torch.inference_mode():
        for v in variants:
            m.set_kernels(v.kernels)
            with mf_kernels.use(v.kernels), installed(m.model, runtimes[v]):  # stages call sub-modules directly
                start = time.perf_counter()
                own_raw[v] = model_only()  # compiles a compiled runtime: its setup time, apart from the warm-up
                if v.runtime != "torch":
                    setup[v] = time.perf_counter() - start + getattr(runtimes[v], "setup_seconds", 0.0)
                for _ in range(warmup):
                    for _, fn in stages(v):
                        fn()
                    end_to_end(model_only)()
                timer.sync()
                forwards[v] = _capture_graph(m, images) if cuda_graphs and v.runtime == "torch" else model_only
        for _ in range(iters):
            for v in variants:
                m.set_kernels(v.kernels)
                with mf_kernels.use(v.kernels), installed(m.model, runtimes[v]):
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    for name, fn in stages(v):
                        timer.sync()
                        samples[v]["stages"][name].append(timer.time(fn)[0])
                    # with CUDA graphs the captured forward replays the kernels chosen at capture time
                    samples[v]["model"].append(timer.time(forwards[v])[0])
                    samples[v]["e2e"].append(timer.time(end_to_end(forwards[v]))[0])
                    peaks[v] = _peak_memory(device)
    batch = images.shape[0]
    results = []
    for v in variants:
        model_ms, e2e_ms = statistics.median(samples[v]["model"]), statistics.median(samples[v]["e2e"])
        results.append(RunResult(
            kernels=v.kernels, stage_ms={k: statistics.median(x) if x else None for k, x in samples[v]["stages"].items()},
            model_ms=model_ms, end_to_end_ms=e2e_ms, model_fps=batch * 1e3 / model_ms,
            end_to_end_fps=batch * 1e3 / e2e_ms, peak_memory_mb=peaks[v][0], peak_memory_kind=peaks[v][1],
            cuda_graphs=cuda_graphs and v.runtime == "torch", runtime=v.runtime, label=v.label, setup_s=setup.get(v)))
    return results


def _capture_graph(m, images: torch.Tensor) -> Callable:
    """Capture forward_raw in a CUDA graph on a static input; returns a replay function."""
    static_in = images.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            m.model.forward_raw(static_in)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = m.model.forward_raw(static_in)

    def replay():
        graph.replay()
        return static_out

    return replay


# ---------------------------------------------------------------------------------------------------
# reference vs fused, agreement, report


@dataclass
class Agreement:
    """How closely the fused run reproduces the reference on the profiled image."""

    class_logits_max_abs: float
    mask_logits_max_abs: float
    detections_reference: int
    detections_fused: int
    same_classes: bool
    min_mask_iou: float
    max_score_diff: float
    ok: bool


def _mask_iou(a, b) -> float:
    inter = (a & b).sum()
    union = (a | b).sum()
    return 1.0 if union == 0 else float(inter) / float(union)


def compare_outputs(ref: dict[str, Any], fused: dict[str, Any], image_size: tuple[int, int]) -> Agreement:
    """Same count, order and classes of detections; masks IoU >= 0.99; raw outputs close."""
    from .formats import decode_mask

    cls_diff = (ref["class_logits"] - fused["class_logits"]).abs().max().item()
    mask_diff = (ref["mask_logits"] - fused["mask_logits"]).abs().max().item()
    dr, df = ref["detections"], fused["detections"]
    same = len(dr) == len(df) and all(a.cls_id == b.cls_id for a, b in zip(dr, df))
    ious = [_mask_iou(decode_mask(a, image_size), decode_mask(b, image_size)) for a, b in zip(dr, df)] if same else []
    scores = [abs(a.conf - b.conf) for a, b in zip(dr, df)] if same else []
    min_iou = min(ious, default=1.0)
    max_score = max(scores, default=0.0)
    scale = max(1.0, ref["mask_logits"].abs().max().item())
    ok = same and min_iou >= 0.99 and max_score <= 1e-2 and mask_diff <= 1e-2 * scale
    return Agreement(cls_diff, mask_diff, len(dr), len(df), same, min_iou, max_score, ok)


def _outputs(m, images: torch.Tensor, postprocess: Callable) -> dict[str, Any]:
    with torch.inference_mode():
        raw = m.model.forward_raw(images)
        detections = postprocess(raw.class_logits, raw.mask_logits)
    return {"class_logits": raw.class_logits.float().cpu(), "mask_logits": raw.mask_logits.float().cpu(),
            "detections": detections[0]}


def make_random_model_realistic(m, images: torch.Tensor, keep: int) -> list[str]:
    """Random weights give masks that all sit near 0.5 and class scores all near 1/(C+1): post-processing
    would keep nothing, or expand every query, and the agreement check would compare empty lists.
    Make the workload look like a trained model's: sharpen the masks (scale `mask_features`) and the
    class scores (scale the classifier), then set the score threshold so that about `keep` queries are
    kept. Only for zoo architectures without weights; the report's notes say so."""
    heads = m.model.head.predictor.forward_prediction_heads
    with torch.no_grad():
        m.model.pixel_decoder.mask_features.weight.mul_(40.0)
        heads.classifier.weight.mul_(8.0)
        heads.classifier.bias.mul_(8.0)
        with mf_kernels.use("reference"):
            raw = m.model.forward_raw(images[:1])
    everything = make_postprocess(m, tuple(images.shape[-2:]), threshold=0.0)(raw.class_logits, raw.mask_logits)[0]
    finals = sorted((d.conf for d in everything), reverse=True)
    k = min(keep, len(finals) - 1)
    # halfway between the k-th and (k+1)-th best: a score equal to the threshold would be kept or not
    # depending on the last bit of rounding, which differs between reference and fused paths
    threshold = float(finals[k - 1] + finals[k]) / 2 if k >= 1 else 0.0
    m.config.threshold = threshold
    class_scores = m.model.class_probs(raw.class_logits.float())[0].max(-1).values
    candidates = int((class_scores > threshold).sum())
    kept = len(make_postprocess(m, tuple(images.shape[-2:]), threshold=threshold)(raw.class_logits, raw.mask_logits)[0])
    return [f"random weights: mask_features x40 and classifier x8 so masks and scores look trained, threshold "
            f"{threshold:.4f}: {candidates} of {m.config.num_queries} queries are candidates, {kept} kept"]


def make_postprocess(m, image_size: tuple[int, int], threshold: float | None = None) -> Callable:
    """(class_logits, mask_logits) -> list (per image) of FocoosDet lists, PNG masks, as `predict` does."""
    from .postprocess import PostprocessOptions
    from .predict import detections_from_raw

    options = PostprocessOptions.from_config(m.config, threshold=threshold)

    def postprocess(class_logits: torch.Tensor, mask_logits: torch.Tensor) -> list:
        class_probs = m.model.class_probs(class_logits.float())
        return [detections_from_raw(mask_logits[i], class_probs[i], image_size, options, m.classes)
                for i in range(mask_logits.shape[0])]

    return postprocess


def profile(model: str, weights: str | None = None, resolution: int = 640, batch: int = 1, dtype: str = "fp32",
            kernels: str = "auto", iters: int = 10, warmup: int = 2, cuda_graphs: bool = False,
            device: str | None = None, compare: bool = True, seed: int = 0, keep: int = 20,
            runtimes: tuple[str, ...] = ("torch",)) -> dict[str, Any]:
    """Profile `model` with `reference` and with `kernels` on one synthetic image batch, on each of
    `runtimes` (see the module doc); returns a JSON-able dict."""
    from . import load_model
    from .demo import synthetic_image
    from .zoo import ZOO

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if cuda_graphs and dev.type != "cuda":
        logger.warning("--cuda-graphs needs a CUDA device; timing without graphs on %s", dev)
        cuda_graphs = False
    if isinstance(model, str):
        torch.manual_seed(seed)  # random zoo weights: the same model every run
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*RANDOM weights.*")
            m = load_model(model, weights=weights, device=dev)
        random_weights = weights is None and model in ZOO
    else:  # an FAIMFModel
        m, model = model, model.name
        m.model.to(dev)
        random_weights = False
    m.model.to(DTYPES[dtype])
    images = synthetic_image(resolution, resolution, seed=seed).repeat(batch, 1, 1, 1).to(dev, DTYPES[dtype])

    notes = []
    if random_weights:
        notes += make_random_model_realistic(m, images, keep=keep)
    postprocess = make_postprocess(m, (resolution, resolution), threshold=m.config.threshold)

    outputs = {}
    variants = variants_for(kernels, tuple(runtimes), compare)
    runs = run_interleaved(m, images, postprocess, variants, iters, warmup, cuda_graphs)
    for run, variant in zip(runs, variants):
        m.set_kernels(run.kernels)
        reset_kernel_report()
        with mf_kernels.use(run.kernels), installed(m.model, make_runtime(m, variant.runtime)):
            outputs[run.label] = _outputs(m, images, postprocess)
            run.kernel_choice = kernel_report()
    agreements = {run.label: asdict(compare_outputs(outputs["reference"], outputs[run.label], (resolution, resolution)))
                  for run in runs[1:]} if compare else {}
    agreement = None
    if agreements:  # the last run's numbers, ok only when every run agrees
        agreement = dict(list(agreements.values())[-1], ok=all(a["ok"] for a in agreements.values()))
    return {
        "model": model, "weights": weights, "resolution": resolution, "batch": batch, "dtype": dtype,
        "iters": iters, "warmup": warmup, "environment": environment(dev), "notes": notes,
        "threshold": m.config.threshold,
        "runs": [asdict(r) for r in runs],
        "speedup_end_to_end": runs[-1].end_to_end_fps / runs[0].end_to_end_fps,
        "speedup_model": runs[-1].model_fps / runs[0].model_fps,
        "agreement": agreement,
        "agreements": agreements,
    }


def kernel_report() -> dict[str, str]:
    """op -> backend of its latest call (call `reset_kernel_report` before the run to attribute)."""
    return mf_kernels.dispatch.last_choices()


def reset_kernel_report() -> None:
    for op in mf_kernels.dispatch.OPS.values():
        op.last_backend = None


def format_table(report: dict[str, Any]) -> str:
    runs = report["runs"]
    width = max(14, *(len(r.get("label") or r["kernels"]) + 2 for r in runs))
    header = f"{'stage / metric':<28}" + "".join(f"{r.get('label') or r['kernels']:>{width}}" for r in runs)
    lines = [f"{report['model']} @ {report['resolution']}x{report['resolution']}, batch {report['batch']}, "
             f"{report['dtype']}, {report['environment']['device']}, torch {report['environment']['torch']}",
             header, "-" * len(header)]
    for stage in STAGES:
        lines.append(f"{stage + ' (ms)':<28}" + "".join(_cell(r["stage_ms"][stage], width, ".2f") for r in runs))
    for key, label, fmt in (("model_ms", "model only (ms)", ".2f"), ("end_to_end_ms", "end to end (ms)", ".2f"),
                            ("model_fps", "model FPS", ".2f"), ("end_to_end_fps", "end-to-end FPS", ".2f"),
                            ("peak_memory_mb", "peak memory (MB)", ".0f"), ("setup_s", "compile / export (s)", ".1f")):
        lines.append(f"{label:<28}" + "".join(_cell(r.get(key), width, fmt) for r in runs))
    if len(runs) > 1:
        lines.append(f"speed-up {runs[-1]['kernels']} vs reference: end to end {report['speedup_end_to_end']:.2f}x, "
                     f"model {report['speedup_model']:.2f}x")
    agreements = report.get("agreements") or ({"": report["agreement"]} if report["agreement"] else {})
    if len(agreements) == 1:  # reference vs one choice: no label needed
        agreements = {"": next(iter(agreements.values()))}
    for label, a in agreements.items():
        lines.append(f"outputs agree{' (' + label + ')' if label else ''}: {'YES' if a['ok'] else 'NO'} (detections "
                     f"{a['detections_reference']} vs {a['detections_fused']}, same classes {a['same_classes']}, min mask "
                     f"IoU {a['min_mask_iou']:.4f}, max |dscore| {a['max_score_diff']:.2e}, max |dmask logit| "
                     f"{a['mask_logits_max_abs']:.2e})")
    for r in runs:
        if r["kernel_choice"]:
            lines.append(f"{r.get('label') or r['kernels']}: "
                         + ", ".join(f"{op}={b}" for op, b in r["kernel_choice"].items()))
    lines += [f"note: {n}" for n in report.get("notes", [])]
    return "\n".join(lines)


def _cell(value: float | None, width: int, fmt: str) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}{fmt}}"


def plot(report: dict[str, Any], path: str | os.PathLike) -> None:
    """Stacked per-stage bars, one bar per kernels choice, with end-to-end FPS on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    names = [r.get("label") or r["kernels"] for r in runs]
    bottoms = [0.0] * len(runs)
    colors = ["#4C72B0", "#55A868", "#C44E52", "#8172B2", "#937860"]
    # a compiled / ONNX forward is one opaque call: its bar is "whole forward" + post-processing
    whole = [r["model_ms"] if r["stage_ms"]["backbone"] is None else 0.0 for r in runs]
    for stage, color in zip(("whole forward",) + STAGES, colors[-1:] + colors[:-1]):
        values = whole if stage == "whole forward" else [r["stage_ms"][stage] or 0.0 for r in runs]
        if stage == "whole forward" and not any(whole):
            continue
        ax.bar(names, values, bottom=bottoms, label=stage.replace("_", " "), color=color, width=0.55)
        bottoms = [b + v for b, v in zip(bottoms, values)]
    for i, r in enumerate(runs):
        ax.text(i, bottoms[i] * 1.01, f"{r['end_to_end_fps']:.2f} FPS", ha="center", va="bottom", fontsize=9)
    ax.set_ylabel("time per batch (ms)")
    env = report["environment"]
    ax.set_title(f"{report['model']} {report['resolution']}² b{report['batch']} {report['dtype']} on {env.get('gpu', env['device'])}",
                 fontsize=10)
    ax.set_ylim(0, max(bottoms) * 1.12)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=5, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
