"""Training loop and `fai-mf train` (SPEC §6).

AdamW (no weight decay on norms and query embeddings), poly learning-rate schedule with linear
warm-up, gradient clipping on the whole model, AMP (fp16 autocast + GradScaler) on CUDA, and
multi-process data parallel through torch.distributed: launch with
`torchrun --nproc_per_node N -m fai_mf.cli train ...` (NCCL on CUDA, gloo on CPU). `batch_size` is
per process; the losses normalise by the global number of GT masks, so N processes with batch b
train like one process with batch N*b (BatchNorm: SyncBatchNorm across CUDA processes; on CPU
(gloo) the statistics stay per process unless `freeze_bn`).

The output folder is a focoos model directory that `fai_mf.load_model` reads (`model_info.json` +
`model_final.pth`, rewritten every `checkpoint_every` iterations and at the end), plus
`train_state.pth` (optimizer, grad scaler, iteration) used by `resume`.

Training runs the reference kernels: fused kernels are inference-only.
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

import mf_kernels

from . import distributed
from .config import ConfigError, MaskFormerConfig
from .data import collate, load_dataset
from .io import MODEL_INFO, WEIGHTS, FAIMFModel, load_state_dict_strict, read_state_dict
from .modeling.model import FAIMaskFormer
from .zoo import ZOO, zoo_config_dict

logger = logging.getLogger(__name__)

TRAIN_STATE = "train_state.pth"
# Class-count dependent entries: re-initialised when fine-tuning to another number of classes.
CLASS_HEAD_KEYS = ("head.predictor.forward_prediction_heads.classifier.weight",
                   "head.predictor.forward_prediction_heads.classifier.bias", "head.criterion.empty_weight")


@dataclass
class TrainOptions:
    """Training hyper-parameters. `batch_size` is per process."""

    iters: int = 2000
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.05
    backbone_lr_mult: float = 1.0
    clip_grad: float = 1.0  # max total gradient norm; 0 disables clipping
    warmup_iters: int = 0
    poly_power: float = 0.9
    amp: bool = False  # fp16 autocast + GradScaler; CUDA only
    freeze_bn: bool = False  # BatchNorm layers use (and keep) their running statistics
    sync_bn: bool = True  # several CUDA processes: BatchNorm statistics over the global batch (SyncBatchNorm)
    shuffle: bool = True
    num_workers: int = 0
    seed: int = 0
    checkpoint_every: int = 500
    log_every: int = 20
    resume: bool = False
    stop_after: int | None = None  # end this run at that iteration (checkpointed; the schedule stays that of `iters`)
    device: str | None = None  # default: cuda:LOCAL_RANK when available, else cpu


@dataclass
class TrainResult:
    out_dir: Path
    iterations: int
    losses: list[float] = field(default_factory=list)  # total loss per step, averaged over processes
    seconds: float = 0.0


# ---- model ------------------------------------------------------------------------------------
def _source_config(source: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any], Path | None]:
    """(config dict, model_info dict, default weights path or None) of a zoo name, model dir or model_info.json."""
    path = Path(source)
    if path.is_dir():
        path = path / MODEL_INFO
    if path.is_file() and path.suffix == ".json":
        info = json.loads(path.read_text())
        if "config" not in info:  # a bare config dict
            return info, {}, None
        weights = path.parent / WEIGHTS
        return dict(info["config"]), info, weights if weights.is_file() else None
    if str(source) in ZOO:
        return zoo_config_dict(str(source)), {}, None
    raise FileNotFoundError(f"{source!s} is neither a model directory, a JSON config nor a zoo model "
                            f"({', '.join(sorted(ZOO))})")


def build_model(source: str | os.PathLike, weights: str | os.PathLike | None = None, num_classes: int | None = None,
                classes: list[str] | None = None, **config_overrides: Any) -> FAIMFModel:
    """A model to train: the architecture of `source` (zoo name, model directory, model_info.json or
    a JSON config dict) with `config_overrides`; weights from `weights` or the directory's
    model_final.pth, else random (zoo). With a different `num_classes` than the checkpoint, the class
    head is re-initialised (logged); every other key must match."""
    config_dict, info, default_weights = _source_config(source)
    if num_classes is not None:
        config_overrides["num_classes"] = num_classes
    config = MaskFormerConfig.from_dict({**config_dict, **config_overrides})
    model = FAIMaskFormer(config)
    weights = weights if weights is not None else default_weights
    if weights is not None:
        state = read_state_dict(weights)
        fresh = model.state_dict()
        reinit = [k for k in CLASS_HEAD_KEYS if k in state and state[k].shape != fresh[k].shape]
        if reinit:
            logger.info("%s: %d classes in the checkpoint, %d now: re-initialising %s", weights,
                        state[reinit[0]].shape[0] - 1, config.num_classes, ", ".join(reinit))
            state.update({k: fresh[k] for k in reinit})
        load_state_dict_strict(model, state, source=str(weights))
    else:
        logger.info("%s: training from random initialisation", source)
    name = info.get("name", Path(str(source)).name)
    kept_info = {k: v for k, v in info.items() if k not in ("config", "classes")}
    return FAIMFModel(config, model, classes=classes or info.get("classes"), name=name, info=kept_info)


def _set_bn_eval(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def param_groups(model: nn.Module, lr: float, weight_decay: float, backbone_lr_mult: float) -> list[dict[str, Any]]:
    """AdamW groups: backbone at lr * backbone_lr_mult; no weight decay on norm layers and query embeddings."""
    norm_types = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
    no_decay = set()
    for module in model.modules():
        if isinstance(module, norm_types + (nn.Embedding,)):
            no_decay.update(id(p) for p in module.parameters(recurse=False))
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((".backbone." in f".{name}", id(p) in no_decay), []).append(p)
    return [{"params": params, "lr": lr * (backbone_lr_mult if backbone else 1.0), "base_lr_mult":
             backbone_lr_mult if backbone else 1.0, "weight_decay": 0.0 if nd else weight_decay}
            for (backbone, nd), params in sorted(groups.items())]


def lr_factor(iteration: int, options: TrainOptions) -> float:
    """Linear warm-up to 1, then (1 - it/iters)^poly_power."""
    if iteration < options.warmup_iters:
        return (iteration + 1) / options.warmup_iters
    return max(0.0, 1.0 - iteration / max(1, options.iters)) ** options.poly_power


# ---- checkpoints ------------------------------------------------------------------------------
def save_checkpoint(model: FAIMFModel, out_dir: Path, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, iteration: int, options: TrainOptions) -> None:
    """Write the focoos model directory and train_state.pth; files are replaced atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".ckpt-", dir=out_dir))
    try:
        model.save(tmp)
        torch.save({"iteration": iteration, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                    "options": asdict(options), "world_size": distributed.world_size(),
                    "rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None},
                   tmp / TRAIN_STATE)
        for name in (WEIGHTS, TRAIN_STATE, MODEL_INFO):  # model_info last: a dir with it is complete
            os.replace(tmp / name, out_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_train_state(out_dir: Path, device: torch.device) -> dict[str, Any] | None:
    path = out_dir / TRAIN_STATE
    if not path.is_file():
        return None
    return torch.load(path, map_location=device, weights_only=False)


def _restore_rng(state: dict[str, Any], options: TrainOptions, start: int) -> None:
    """One process: the saved RNG state, so that a resumed run draws what an uninterrupted one would.
    Several: only rank 0's state was saved, so every rank is reseeded from (seed, rank, iteration)."""
    if distributed.world_size() == 1 and state.get("world_size", 1) == 1 and state.get("rng") is not None:
        torch.set_rng_state(state["rng"].cpu())
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
    else:
        torch.manual_seed(options.seed + distributed.rank() + 1000003 * start)


# ---- data -------------------------------------------------------------------------------------
class _ResumableSampler(Sampler[int]):
    """A DistributedSampler whose next epoch can start `skip` samples in (resuming mid-epoch)."""

    def __init__(self, base: DistributedSampler):
        self.base, self.skip = base, 0

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.base), self.skip, None)

    def __len__(self) -> int:
        return len(self.base) - self.skip


def _batches(dataset: Dataset, options: TrainOptions, start_iteration: int) -> Iterator[tuple[torch.Tensor, list[dict]]]:
    """Endless batches, the same sequence whether or not the run was resumed at `start_iteration`.

    The sampler is a DistributedSampler in every case (one replica when not distributed) so that N
    processes see, step by step, the images one process sees with N times the batch. The loader has
    its own generator so that it never draws from the global RNG (which the losses use).
    """
    base = DistributedSampler(dataset, num_replicas=distributed.world_size(), rank=distributed.rank(),
                              shuffle=options.shuffle, seed=options.seed, drop_last=False)
    per_epoch = len(base) // options.batch_size
    if per_epoch == 0:
        raise ValueError(f"dataset of {len(dataset)} images is smaller than one global batch "
                         f"({options.batch_size} x {distributed.world_size()} processes)")
    sampler = _ResumableSampler(base)
    loader = DataLoader(dataset, batch_size=options.batch_size, sampler=sampler, collate_fn=collate,
                        num_workers=options.num_workers, drop_last=True,
                        generator=torch.Generator().manual_seed(options.seed + distributed.rank()))
    epoch, skip = divmod(start_iteration, per_epoch)
    while True:
        base.set_epoch(epoch)
        sampler.skip = skip * options.batch_size
        yield from loader
        epoch, skip = epoch + 1, 0


def _to_device(images: torch.Tensor, targets: list[dict], device: torch.device) -> tuple[torch.Tensor, list[dict]]:
    return (images.to(device, non_blocking=True),
            [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets])


# ---- the loop ---------------------------------------------------------------------------------
class _Progress:
    """Plain-text progress lines (rank 0): iteration, losses, lr, speed, ETA."""

    def __init__(self, total: int, start: int, every: int):
        self.total, self.every = total, max(1, every)
        self.t0, self.i0 = time.perf_counter(), start

    def due(self, iteration: int) -> bool:
        """Same answer on every process (the per-part losses are all-reduced only then)."""
        done = iteration + 1
        return done % self.every == 0 or done == self.total

    def __call__(self, iteration: int, loss: float, parts: dict[str, float], lr: float) -> None:
        if not distributed.is_main_process():
            return
        done = iteration + 1
        rate = (done - self.i0) / max(1e-9, time.perf_counter() - self.t0)
        eta = (self.total - done) / max(rate, 1e-9)
        detail = " ".join(f"{k[5:]} {v:.3f}" for k, v in parts.items())
        print(f"[iter {done}/{self.total}] loss {loss:.4f} ({detail}) lr {lr:.2e} {rate:.2f} it/s "
              f"eta {int(eta // 60)}m{int(eta % 60):02d}s", flush=True)


def _main_losses(losses: dict[str, torch.Tensor]) -> dict[str, float]:
    keys = ("loss_ce", "loss_mask", "loss_dice")
    stacked = distributed.all_reduce_mean(torch.stack([losses[k].detach().float() for k in keys]))
    return dict(zip(keys, stacked.tolist()))


def train(model: FAIMFModel, dataset: Dataset, out_dir: str | os.PathLike, options: TrainOptions | None = None) -> TrainResult:
    """Train `model` in place on `dataset` (items as `fai_mf.data`) and write checkpoints to `out_dir`.

    Joins torch.distributed when launched by torchrun (WORLD_SIZE > 1) unless a process group already
    exists. Returns the per-step total losses (mean over processes). On return the model is in eval mode.
    """
    options = options or TrainOptions()
    out_dir = Path(out_dir)
    cuda = torch.cuda.is_available() and (options.device is None or options.device.startswith("cuda"))
    distributed.init_from_env("cuda" if cuda else "cpu")
    device = torch.device(options.device or (f"cuda:{distributed.local_rank()}" if cuda else "cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    amp = options.amp and device.type == "cuda"
    if options.amp and not amp:
        warnings.warn("--amp needs CUDA; training in fp32")

    net = model.model.to(device)
    optimizer = torch.optim.AdamW(param_groups(net, options.lr, options.weight_decay, options.backbone_lr_mult),
                                  lr=options.lr, weight_decay=options.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    start = 0
    torch.manual_seed(options.seed + distributed.rank())  # augmentation draws differ per process
    if options.resume:
        state = load_train_state(out_dir, device)
        if state is not None:
            load_state_dict_strict(net, read_state_dict(out_dir / WEIGHTS), source=str(out_dir / WEIGHTS))
            optimizer.load_state_dict(state["optimizer"])
            scaler.load_state_dict(state["scaler"])
            start = int(state["iteration"])
            _restore_rng(state, options, start)
            if distributed.is_main_process():
                print(f"resuming from {out_dir} at iteration {start}", flush=True)
        elif distributed.is_main_process():
            print(f"nothing to resume in {out_dir}; starting from iteration 0", flush=True)
    train_net: nn.Module = net
    if distributed.is_distributed():
        # Layers that no loss reaches (input_proj of a level no decoder layer attends to) need this.
        unused = net.config.transformer_predictor_dec_layers < 3
        if options.sync_bn and device.type == "cuda" and not options.freeze_bn:
            nn.SyncBatchNorm.convert_sync_batchnorm(net)  # in place below the top module; same state_dict keys
        train_net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None,
                                                        find_unused_parameters=unused)
    params = [p for p in net.parameters() if p.requires_grad]
    progress = _Progress(options.iters, start, options.log_every)
    result = TrainResult(out_dir=out_dir, iterations=start)
    batches = _batches(dataset, options, start)
    t0 = time.perf_counter()
    with mf_kernels.use("reference"):  # fused kernels are inference-only (no backward)
        end = options.iters if options.stop_after is None else min(options.iters, options.stop_after)
        for iteration in range(start, end):
            net.train()
            if options.freeze_bn:
                _set_bn_eval(net)
            for group in optimizer.param_groups:
                group["lr"] = options.lr * group["base_lr_mult"] * lr_factor(iteration, options)
            images, targets = _to_device(*next(batches), device)
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
                losses = train_net(images, targets=targets).loss
            loss = sum(losses.values())
            mean_loss = float(distributed.all_reduce_mean(loss.detach().float()))
            if not math.isfinite(mean_loss):  # every process sees the same mean, so all skip together
                logger.warning("iteration %d: non-finite loss %s, step skipped", iteration, mean_loss)
                optimizer.zero_grad(set_to_none=True)
                continue
            scaler.scale(loss).backward()
            if options.clip_grad > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, options.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            result.losses.append(mean_loss)
            result.iterations = iteration + 1
            if progress.due(iteration):
                progress(iteration, mean_loss, _main_losses(losses), options.lr * lr_factor(iteration, options))
            done = iteration + 1
            if options.checkpoint_every > 0 and done % options.checkpoint_every == 0 and done < end:
                if distributed.is_main_process():
                    save_checkpoint(model, out_dir, optimizer, scaler, done, options)
                distributed.barrier()
    if distributed.is_main_process():
        save_checkpoint(model, out_dir, optimizer, scaler, result.iterations, options)
    distributed.barrier()
    result.seconds = time.perf_counter() - t0
    net.eval()
    return result


# ---- CLI --------------------------------------------------------------------------------------
def _config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    if args.config:
        data = json.loads(Path(args.config).read_text())
        if not isinstance(data, dict):
            raise ConfigError(f"{args.config} must hold a JSON object of config fields")
        overrides.update(data.get("config", data))
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set takes KEY=VALUE, got {item!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    dataset = load_dataset(args.data, size=args.size, flip=not args.no_flip, num_classes=args.num_classes)
    num_classes = args.num_classes or dataset.num_classes
    resume_dir = Path(args.out)
    source = args.model
    weights = args.weights
    if args.resume and (resume_dir / MODEL_INFO).is_file() and (resume_dir / TRAIN_STATE).is_file():
        source, weights = resume_dir, resume_dir / WEIGHTS  # the architecture written by the first run
    model = build_model(source, weights=weights, num_classes=num_classes, classes=list(dataset.classes),
                        **_config_overrides(args))
    model.name = args.name or Path(args.out).name
    options = TrainOptions(iters=args.iters, batch_size=args.batch, lr=args.lr, weight_decay=args.weight_decay,
                           backbone_lr_mult=args.backbone_lr_mult, clip_grad=args.clip_grad,
                           warmup_iters=args.warmup, amp=args.amp, freeze_bn=args.freeze_bn,
                           sync_bn=not args.no_sync_bn,
                           num_workers=args.workers, seed=args.seed, checkpoint_every=args.checkpoint_every,
                           log_every=args.log_every, resume=args.resume, stop_after=args.stop_after,
                           device=args.device)
    if distributed.is_main_process():
        n = sum(p.numel() for p in model.model.parameters())
        print(f"training {model.name} ({n / 1e6:.2f} M parameters, {num_classes} classes) on {args.data} "
              f"({len(dataset)} images) -> {args.out}", flush=True)
    result = train(model, dataset, args.out, options)
    if distributed.is_main_process():
        print(f"done: {result.iterations} iterations in {result.seconds:.0f} s; model saved to {args.out}", flush=True)
        if args.eval_data:
            from .evaluate import evaluate, format_metrics

            for data in args.eval_data:
                print(f"{data}: {format_metrics(evaluate(model, data, size=args.size))}", flush=True)
    distributed.cleanup()
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train or fine-tune a model (torchrun for several processes)")
    p.add_argument("--model", required=True, help="zoo name, model directory, model_info.json or JSON config")
    p.add_argument("--weights", default=None, help="initial weights (.pth); default: the model directory's")
    p.add_argument("--data", required=True, help="COCO instances .json, or a folder with images/ and labels/")
    p.add_argument("--out", required=True, help="output model directory (focoos format)")
    p.add_argument("--name", default=None, help="model name in model_info.json (default: the --out folder's name)")
    p.add_argument("--eval-data", nargs="+", default=None,
                   help="after training, evaluate on these datasets (COCO json: segm AP; folder: mIoU)")
    p.add_argument("--config", default=None, help="JSON file of config fields overriding the model's")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="one config override (JSON value)")
    p.add_argument("--num-classes", type=int, default=None, help="default: the dataset's")
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--batch", type=int, default=8, help="images per process")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--backbone-lr-mult", type=float, default=1.0)
    p.add_argument("--clip-grad", type=float, default=1.0, help="max gradient norm (0: off)")
    p.add_argument("--warmup", type=int, default=0, help="linear warm-up iterations")
    p.add_argument("--amp", action="store_true", help="fp16 mixed precision (CUDA)")
    p.add_argument("--size", type=int, default=None, help="resize training images to SIZE x SIZE")
    p.add_argument("--no-flip", action="store_true", help="no random horizontal flip")
    p.add_argument("--freeze-bn", action="store_true", help="keep BatchNorm statistics fixed")
    p.add_argument("--no-sync-bn", action="store_true", help="several CUDA processes: per-process BatchNorm statistics")
    p.add_argument("--workers", type=int, default=0, help="data loader processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--resume", action="store_true", help="continue from OUT/train_state.pth")
    p.add_argument("--stop-after", type=int, default=None, help="end this run at iteration N (resume later)")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.set_defaults(func=run)
