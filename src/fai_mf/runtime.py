"""How a loaded model's forward runs: eager PyTorch, torch.compile or ONNX Runtime; torch.export and ONNX.

    m = fai_mf.load_model(src, compile=True)             # = runtime="compile": Inductor over the fused ops
    m = fai_mf.load_model(src, runtime="onnxruntime")    # the reference path exported to ONNX, run by ORT
    m = fai_mf.load_model(src, runtime="auto")           # CPU: ONNX Runtime where installed, else eager torch
    m.set_runtime("torch")                               # back to eager
    m.predict(images)                                    # any runtime: our fused post-processing after it

    ep = export_program(m, kernels="auto")               # torch.export.ExportedProgram (fused custom ops)
    torch.export.save(ep, "m.pt2"); torch.export.load("m.pt2").module()(images)  # (class_logits, mask_logits)
    export_onnx(m, "model.onnx")                         # `fai-mf export --format onnx` (reference path)

A runtime replaces `FAIMaskFormer.forward_raw` in eval mode (training always runs eager PyTorch), so
`predict`, the profiler and every caller of `forward_raw` use it unchanged.

compile: `torch.compile` (Inductor, weights frozen into the graph: `freezing=True`, the CPU inference
setting) of the eager forward under the model's kernels choice. The fused ops are torch.library custom
ops (`mf_kernels.custom_ops`), so the backbone, pixel decoder and transformer decoder trace with no graph
break. One compiled graph per kernels choice (the traced code reads the choice from a guarded global,
so `set_kernels` switches graphs instead of replaying a stale one: `mf_kernels.dispatch.tracing`); the first call of each choice and
shape compiles (seconds to minutes: `compile_seconds` records it). Frozen weights: compile after the
weights are final (load_model does), or call `set_runtime("compile")` again.

onnxruntime: the reference path exported with `export_onnx` (dynamic batch, H and W) and run by an ONNX
Runtime CPU session; inputs and outputs cross as numpy arrays (fp32). The post-processing stays ours.
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import nn

import mf_kernels

from .modeling.model import RUNTIME_ATTR, FAIMaskFormer, RawOutput

if TYPE_CHECKING:
    from .io import FAIMFModel

logger = logging.getLogger(__name__)

RUNTIMES = ("torch", "compile", "onnxruntime")
CHOICES = ("auto",) + RUNTIMES
ONNX_OPSET = 18
INPUT_NAME = "images"
OUTPUT_NAMES = ("class_logits", "mask_logits")


def validate_runtime(runtime: str) -> str:
    if runtime not in CHOICES:
        raise ValueError(f"unknown runtime {runtime!r}; expected one of {', '.join(CHOICES)}")
    return runtime


def auto_runtime(device: torch.device) -> str:
    """What runtime="auto" runs: on CPU, ONNX Runtime where it is installed (its forward measured fastest
    here: the README's table), else eager torch; on CUDA eager torch with the fused kernels."""
    if device.type == "cpu" and not onnxruntime_reasons():
        return "onnxruntime"
    if device.type == "cpu":
        logger.info("runtime auto: eager torch on CPU because %s", "; ".join(onnxruntime_reasons()))
    return "torch"


def onnxruntime_reasons() -> list[str]:
    """Why the onnxruntime runtime cannot be used here; [] when it can."""
    import importlib.util

    missing = [p for p in ("onnx", "onnxruntime") if importlib.util.find_spec(p) is None]
    return [f"{', '.join(missing)} not installed (pip install 'fai-mf[onnx]')"] if missing else []


# ----------------------------------------------------------------------------------------------------
# Installing a runtime


def current_runtime(model: FAIMaskFormer) -> str:
    runtime = model.__dict__.get(RUNTIME_ATTR)
    return "torch" if runtime is None else runtime.name


def set_runtime(m: "FAIMFModel", runtime: str, **options: Any) -> None:
    """Run `m.model.forward_raw` (eval mode) with `runtime`; options go to `CompiledForward` / `OnnxForward`."""
    if validate_runtime(runtime) == "auto":
        runtime = auto_runtime(m.device)
        logger.info("runtime auto: %s", runtime)
    m.model.__dict__.pop(RUNTIME_ATTR, None)
    m.model.__dict__.get(_RUNTIMES_ATTR, {}).pop(runtime, None)  # afresh: weights may have changed
    forward = make_runtime(m, runtime, **options)
    if forward is not None:
        m.model.__dict__[RUNTIME_ATTR] = forward


_RUNTIMES_ATTR = "_fai_mf_runtimes"


def make_runtime(m: "FAIMFModel", runtime: str, **options: Any):
    """The runtime object of `runtime` for `m` (None for "torch"), created once per model and kept on it, so
    that switching back and forth (the profiler) does not compile or export again."""
    if validate_runtime(runtime) == "auto":
        runtime = auto_runtime(m.device)
    if runtime == "torch":
        return None
    cache = m.model.__dict__.setdefault(_RUNTIMES_ATTR, {})
    if runtime not in cache:
        cache[runtime] = CompiledForward(m.model, **options) if runtime == "compile" else \
            OnnxForward.from_model(m, **options)
    return cache[runtime]


@contextlib.contextmanager
def installed(model: FAIMaskFormer, runtime: Any) -> Iterator[None]:
    """`model.forward_raw` runs `runtime` (None: eager) inside the block."""
    previous = model.__dict__.pop(RUNTIME_ATTR, None)
    if runtime is not None:
        model.__dict__[RUNTIME_ATTR] = runtime
    try:
        yield
    finally:
        model.__dict__.pop(RUNTIME_ATTR, None)
        if previous is not None:
            model.__dict__[RUNTIME_ATTR] = previous


@contextlib.contextmanager
def eager_reference(model: FAIMaskFormer) -> Iterator[FAIMaskFormer]:
    """The plain eager reference model inside the block: no installed runtime, kernels pinned to "reference"
    (what the ONNX export traces), restored afterwards."""
    with eager(model, "reference"):
        yield model


@contextlib.contextmanager
def eager(model: FAIMaskFormer, kernels: str) -> Iterator[FAIMaskFormer]:
    runtime = model.__dict__.pop(RUNTIME_ATTR, None)
    pinned = mf_kernels.attached(model)
    mf_kernels.attach(model, kernels)
    try:
        with mf_kernels.dispatch.tracing(kernels):
            yield model
    finally:
        mf_kernels.attach(model, pinned)
        if runtime is not None:
            model.__dict__[RUNTIME_ATTR] = runtime


# ----------------------------------------------------------------------------------------------------
# torch.compile


def _forward_raw(model: FAIMaskFormer, images: torch.Tensor) -> RawOutput:
    """What `CompiledForward` compiles (inside `mf_kernels.dispatch.tracing(kernels)`)."""
    return model.forward_raw(images)


class CompiledForward:
    """`torch.compile` of the model's eager forward, one graph per kernels choice (see the module doc)."""

    name = "compile"

    def __init__(self, model: FAIMaskFormer, mode: str | None = None, freezing: bool = True,
                 dynamic: bool | None = None, backend: str = "inductor"):
        self.model = model
        self.options = {"freezing": freezing} if backend == "inductor" else None
        self.compiled = torch.compile(_forward_raw, mode=mode, dynamic=dynamic, backend=backend,
                                      options=self.options)
        self.compile_seconds: dict[tuple, float] = {}

    def __call__(self, images: torch.Tensor) -> RawOutput:
        kernels = mf_kernels.attached(self.model) or mf_kernels.current_choice()
        key = (kernels, tuple(images.shape), images.dtype, images.device.type)
        start = time.perf_counter() if key not in self.compile_seconds else None
        with mf_kernels.dispatch.tracing(kernels):  # traced code and the custom ops' kernels read it
            if start is not None:  # an eager pass fills the folded-weight caches the trace takes as constants
                with eager(self.model, kernels):
                    self.model.forward_raw(images)
            with _without_hooks(self.model):
                out = self.compiled(self.model, images)
        if start is not None:
            self.compile_seconds[key] = time.perf_counter() - start
        return out


@contextlib.contextmanager
def _without_hooks(model: FAIMaskFormer) -> Iterator[None]:
    """The compiled call sees the model without `mf_kernels.attach`'s hooks: Dynamo guards on a module's
    hooks, and `set_kernels` registers new ones, which would recompile on every switch of kernels."""
    pinned = mf_kernels.attached(model)
    if pinned is None:
        yield
        return
    mf_kernels.attach(model, None)
    try:
        yield
    finally:
        mf_kernels.attach(model, pinned)


def explain(m: "FAIMFModel", images: torch.Tensor, kernels: str | None = None):
    """`torch._dynamo.explain` of the eager forward under `kernels` (default: the model's): graph breaks."""
    kernels = kernels or m.kernels
    with eager(m.model, kernels), torch.inference_mode():
        return torch._dynamo.explain(_forward_raw)(m.model, images)


# ----------------------------------------------------------------------------------------------------
# torch.export


class RawForward(nn.Module):
    """`forward_raw` as a module with tensor outputs (class_logits [B, Q, C+1], mask_logits [B, Q, H/4, W/4]):
    what torch.export and the ONNX export capture."""

    def __init__(self, model: FAIMaskFormer):
        super().__init__()
        self.model = model
        # in the model's mode: exporters restore the wrapper's mode afterwards, recursively, and a wrapper
        # left in training mode would switch the model's BatchNorms to batch statistics
        self.train(model.training)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raw = self.model.forward_raw(images)
        return raw.class_logits, raw.mask_logits


def example_images(m: "FAIMFModel", batch: int = 1, height: int | None = None, width: int | None = None,
                   seed: int = 0) -> torch.Tensor:
    """Seeded float images [batch, 3, H, W] in 0..255 on the model's device and dtype (default size: the
    config's resolution)."""
    gen = torch.Generator().manual_seed(seed)
    height = height or m.config.resolution
    width = width or m.config.resolution
    dtype = next(m.model.parameters()).dtype
    return (torch.rand(batch, 3, height, width, generator=gen) * 255).to(m.device, dtype)


def export_program(m: "FAIMFModel", kernels: str | None = None, images: torch.Tensor | None = None,
                   dynamic: bool = False) -> torch.export.ExportedProgram:
    """`torch.export` of the inference forward under `kernels` (default: the model's): "reference" gives a
    graph of aten ops only, a fused choice one with `torch.ops.mf_kernels.*` custom ops (which run the
    backend the dispatcher picks when the program runs; `import mf_kernels` before `torch.export.load`).
    `dynamic` exports the batch, H and W as symbolic sizes."""
    kernels = kernels or m.kernels
    images = example_images(m) if images is None else images
    dynamic_shapes = None
    if dynamic:  # sizes 0 and 1 would be specialised: trace a batch of 2; the stride-32 maps need H, W > 32
        images = images.expand(2, -1, -1, -1).contiguous() if images.shape[0] == 1 else images
        dims = {0: torch.export.Dim("batch", max=64), 2: torch.export.Dim("height", min=33, max=4096),
                3: torch.export.Dim("width", min=33, max=4096)}
        dynamic_shapes = {"images": dims}
    with eager(m.model, kernels), torch.no_grad():
        RawForward(m.model)(images)  # fills the folded-weight caches, which the trace takes as constants
        return torch.export.export(RawForward(m.model), (images,), dynamic_shapes=dynamic_shapes)


# ----------------------------------------------------------------------------------------------------
# ONNX


def export_onnx(m: "FAIMFModel", path: str | os.PathLike, opset: int = ONNX_OPSET, images: torch.Tensor | None = None,
                check: bool = True) -> Path:
    """Export the reference forward to ONNX at `path`: input "images" float32 [batch, 3, H, W] (0..255, batch,
    H and W dynamic), outputs "class_logits" [batch, Q, C+1] and "mask_logits" [batch, Q, ceil(H/4), ceil(W/4)].
    With `check`, ONNX Runtime runs the file on `images` and its outputs must match PyTorch's within 1e-4."""
    reasons = onnxruntime_reasons()
    if reasons:
        raise RuntimeError("ONNX export needs onnx and onnxruntime: " + "; ".join(reasons))
    if opset < 17:
        raise ValueError(f"opset must be >= 17, got {opset}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images = (example_images(m) if images is None else images).float().cpu()
    model = m.model
    device, dtype = m.device, next(model.parameters()).dtype
    model.to("cpu", torch.float32)
    try:
        with eager_reference(model), torch.no_grad(), warnings.catch_warnings():
            # the shape checks of the ops are Python bools to the tracer; they guard, they carry no data
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            torch.onnx.export(RawForward(model), (images,), str(path), input_names=[INPUT_NAME],
                              output_names=list(OUTPUT_NAMES), opset_version=opset, dynamo=False,
                              dynamic_axes={INPUT_NAME: {0: "batch", 2: "height", 3: "width"},
                                            OUTPUT_NAMES[0]: {0: "batch"},
                                            OUTPUT_NAMES[1]: {0: "batch", 2: "height4", 3: "width4"}})
            if check:
                expected = RawForward(model)(images)
    finally:
        model.to(device, dtype)
    if check:
        got = OnnxForward(path).run(images)
        for name, ref, out in zip(OUTPUT_NAMES, expected, got):
            diff = (ref - out).abs().max().item()
            if diff > 1e-4:
                raise RuntimeError(f"ONNX export check failed: {name} differs from PyTorch by {diff:.3g} (> 1e-4)")
    return path


class OnnxForward:
    """An ONNX Runtime session over an exported model: images -> RawOutput (fp32 CPU compute)."""

    name = "onnxruntime"

    def __init__(self, path: str | os.PathLike, threads: int | None = None, providers: list[str] | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
        self.owned_dir: tempfile.TemporaryDirectory | None = None
        self.setup_seconds = 0.0  # export + session creation, when `from_model` exported

    @classmethod
    def from_model(cls, m: "FAIMFModel", path: str | os.PathLike | None = None, **options: Any) -> "OnnxForward":
        """A session over `path`, exported from `m` first when it does not exist (a temporary file when None)."""
        reasons = onnxruntime_reasons()
        if reasons:
            raise RuntimeError("the onnxruntime runtime needs: " + "; ".join(reasons))
        owned = None
        if path is None:
            owned = tempfile.TemporaryDirectory(prefix="fai_mf_onnx_")
            path = Path(owned.name) / "model.onnx"
        start = time.perf_counter()
        if not Path(path).is_file():
            export_onnx(m, path)
        forward = cls(path, **options)
        forward.owned_dir = owned
        forward.setup_seconds = time.perf_counter() - start
        return forward

    def run(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feed = {INPUT_NAME: images.detach().to("cpu", torch.float32).contiguous().numpy()}
        return tuple(torch.from_numpy(a) for a in self.session.run(list(OUTPUT_NAMES), feed))

    def __call__(self, images: torch.Tensor) -> RawOutput:
        class_logits, mask_logits = self.run(images)
        return RawOutput(class_logits.to(images.device, images.dtype), mask_logits.to(images.device, images.dtype))
