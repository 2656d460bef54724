"""Loading and saving FAI-MF models in the focoos format.

A focoos model directory holds `model_info.json` (whose `config` is the `MaskFormerConfig` dict) and
`model_final.pth` = `{"model": state_dict}`. Loading is strict: missing, unexpected or mis-shaped keys
are an error that names them. The `module.` prefix of DDP checkpoints is stripped, and
`head.criterion.empty_weight` (a derived buffer) may be absent.
"""
from __future__ import annotations

import json
import logging
import os
import warnings
import zipfile
from pathlib import Path
from typing import Any, Iterator

import torch

import mf_kernels

from .config import ConfigError, MaskFormerConfig
from .modeling.model import FAIMaskFormer
from .zoo import ZOO, zoo_config_dict

logger = logging.getLogger(__name__)

MODEL_INFO = "model_info.json"
WEIGHTS = "model_final.pth"
OPTIONAL_KEYS = frozenset({"head.criterion.empty_weight"})


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded into the model (corrupt file, wrong keys or shapes)."""


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a `.pth` file: `{"model": state_dict}` (focoos) or a bare state dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, Exception) as exc:  # torch raises many types
        raise CheckpointError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc} "
                              "(truncated or not a torch.save file?)") from exc
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {path} is not a state dict nor {{'model': state_dict}}")
    prefix = "module."
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}


def _summarise(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_state_dict_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load `state` into `model`, raising CheckpointError that names every bad key."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state) - OPTIONAL_KEYS)
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(
        f"{k} (checkpoint {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
        for k in set(state) & set(expected) if state[k].shape != expected[k].shape
    )
    problems = []
    if missing:
        problems.append(f"missing keys: {_summarise(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_summarise(unexpected)}")
    if mismatched:
        problems.append(f"mis-shaped keys: {_summarise(mismatched)}")
    if problems:
        raise CheckpointError(f"{source} does not match the model config: " + "; ".join(problems))
    model.load_state_dict(state, strict=False)


def _read_model_info(path: Path) -> dict[str, Any]:
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(info, dict) or "config" not in info:
        raise ConfigError(f"{path} has no 'config' field (is it a focoos model_info.json?)")
    return info


class FAIMFModel:
    """A loaded FAI-MF model: `config`, `model` (eval mode), class names, and `save()`."""

    def __init__(self, config: MaskFormerConfig, model: FAIMaskFormer, classes: list[str] | None = None,
                 name: str = "fai-mf", info: dict[str, Any] | None = None):
        self.config = config
        self.model = model
        self.classes = classes
        self.name = name
        self._info = dict(info or {})

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def kernels(self) -> str:
        """The kernels backend of this model's ops: the one pinned by `set_kernels` / `load_model(kernels=)`,
        else the current `mf_kernels` choice (`mf_kernels.use`, $MF_KERNELS, or "auto")."""
        return mf_kernels.attached(self.model) or mf_kernels.current_choice()

    def set_kernels(self, kernels: str | None) -> FAIMFModel:
        """Run this model's fused ops with `kernels` = "auto" | "reference" | "triton" | "cpp" | "cuda" | "sdpa"
        (None: follow `mf_kernels.use` / $MF_KERNELS / auto). "reference" is the plain PyTorch model.
        A named backend that an op implements but cannot run (wrong device, dtype, size) raises at the
        forward with every reason; ops without that backend run their reference (see `mf_kernels.dispatch`).
        """
        mf_kernels.attach(self.model, kernels)
        return self

    @property
    def runtime(self) -> str:
        """How `model.forward_raw` runs in eval mode: "torch" (eager), "compile" or "onnxruntime"."""
        from .runtime import current_runtime

        return current_runtime(self.model)

    def set_runtime(self, runtime: str, **options: Any) -> FAIMFModel:
        """Run the forward with `runtime` = "torch" | "compile" | "onnxruntime" | "auto" (see `fai_mf.runtime`);
        options go to `fai_mf.runtime.CompiledForward` / `OnnxForward.from_model`."""
        from .runtime import set_runtime

        set_runtime(self, runtime, **options)
        return self

    def save(self, directory: str | os.PathLike) -> Path:
        """Write a focoos-format model directory (model_info.json + model_final.pth)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        info = dict(self._info)
        info.update(name=self.name, model_family="fai_mf", classes=self.classes,
                    im_size=self.config.resolution, task=self.config.postprocessing_type,
                    config=self.config.to_dict())
        (directory / MODEL_INFO).write_text(json.dumps(info, indent=2))
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        torch.save({"model": state}, directory / WEIGHTS)
        return directory

    def predict(self, images: Any, **kwargs: Any) -> list:
        """Detections per image (`list[FocoosDetections]`); see `fai_mf.predict.predict`."""
        from .predict import predict

        return predict(self, images, **kwargs)

    def predict_iter(self, source: Any, batch: int = 1, workers: int | None = 0, **kwargs: Any) -> Iterator:
        """Per-image results (`fai_mf.predict.ImageResult`) over files, folders, globs, path lists, COCO
        files or in-memory images, in input order, decoded by `workers` processes, `batch` same-size
        images per forward; see `fai_mf.predict.predict_iter`."""
        from .predict import predict_iter

        return predict_iter(self, source, batch=batch, workers=workers, **kwargs)

    def __repr__(self) -> str:
        return f"FAIMFModel(name={self.name!r}, classes={self.config.num_classes}, device={self.device})"


def load_model(source: str | os.PathLike, weights: str | os.PathLike | None = None, device: str | torch.device = "cpu",
               kernels: str | None = None, compile: bool = False, runtime: str | None = None,
               **config_overrides: Any) -> FAIMFModel:
    """Load a focoos model directory, a `model_info.json`, or a zoo architecture by name.

    A zoo name without `weights` gives random weights and a warning (nothing is downloaded).
    `kernels` pins the backend of the model's fused ops ("auto", "reference", "triton", "cpp", "cuda",
    "sdpa"; see `FAIMFModel.set_kernels`); None follows `mf_kernels.use` / $MF_KERNELS / "auto".
    `compile=True` is `runtime="compile"`: the forward runs `torch.compile`d with the fused kernels;
    `runtime="onnxruntime"` exports it to ONNX and runs it with ONNX Runtime; `runtime="auto"` takes ONNX
    Runtime on CPU where it is installed (its forward is the fastest there), else eager torch (see
    `fai_mf.runtime`).
    `config_overrides` replace config fields (unknown names are an error).
    """
    if kernels is not None:
        mf_kernels.dispatch.validate_choice(kernels)
    if compile and runtime not in (None, "compile"):
        raise ValueError(f"compile=True asks for runtime 'compile', but runtime={runtime!r} was given")
    runtime = "compile" if compile else runtime
    if runtime is not None:
        from .runtime import validate_runtime

        validate_runtime(runtime)
    info: dict[str, Any] = {}
    classes = None
    path = Path(source)
    if path.is_dir():
        info = _read_model_info(path / MODEL_INFO) if (path / MODEL_INFO).is_file() else None
        if info is None:
            raise FileNotFoundError(f"{path} is not a focoos model directory: no {MODEL_INFO}")
        config_dict, name = info["config"], info.get("name", path.name)
        if weights is None:
            weights = path / WEIGHTS
            if not Path(weights).is_file():
                raise FileNotFoundError(f"{path} has no {WEIGHTS}; pass weights= to load another file")
    elif path.is_file() and path.suffix == ".json":
        info = _read_model_info(path)
        config_dict, name = info["config"], info.get("name", path.parent.name)
        if weights is None and (path.parent / WEIGHTS).is_file():
            weights = path.parent / WEIGHTS
    elif str(source) in ZOO:
        config_dict, name = zoo_config_dict(str(source)), str(source)
    else:
        raise FileNotFoundError(f"{source!s} is neither a model directory, a model_info.json nor a zoo model "
                                f"({', '.join(sorted(ZOO))})")
    classes = info.get("classes")
    if not isinstance(config_dict, dict):
        raise ConfigError(f"config of {source} must be a dict")
    config = MaskFormerConfig.from_dict({**config_dict, **config_overrides})
    model = FAIMaskFormer(config)
    if weights is not None:
        load_state_dict_strict(model, read_state_dict(weights), source=str(weights))
    else:
        message = (f"{name}: no weights given, the model has RANDOM weights (nothing is downloaded; "
                   "pass weights=PATH to a focoos model_final.pth)")
        warnings.warn(message, stacklevel=2)
        logger.warning(message)
    model.eval().to(device)
    loaded = FAIMFModel(config, model, classes=classes, name=name, info=info).set_kernels(kernels)
    return loaded.set_runtime(runtime) if runtime is not None else loaded
