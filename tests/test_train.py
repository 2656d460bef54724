"""Training loop: focoos-format checkpoints that load_model reads, exact resume, a 2-process DDP run
equal to one process, the CLI, and a tiny model that learns to find the synthetic shapes."""
from __future__ import annotations

import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import fai_mf
import mf_kernels
from conftest import requires, tiny_config
from fai_mf import cli
from fai_mf.data import load_dataset, make_synthetic_dataset
from fai_mf.losses import FixedPoints
from fai_mf.train import TRAIN_STATE, TrainOptions, build_model, train


@pytest.fixture(autouse=True)
def _one_thread_reference_kernels():
    """One intra-op thread: on a small shared CPU, tiny ops with a thread pool are many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with mf_kernels.use("reference"):
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("synth"), n=8, n_val=2, size=64, seed=1)


def _tiny_model(seed: int = 0, **overrides) -> fai_mf.FAIMFModel:
    torch.manual_seed(seed)
    cfg = tiny_config(criterion_num_points=128, postprocessing_type="instance", **overrides)
    return fai_mf.FAIMFModel(cfg, fai_mf.FAIMaskFormer(cfg), classes=["circle", "rectangle", "triangle"], name="tiny")


def _options(**kw) -> TrainOptions:
    base = dict(iters=3, batch_size=2, lr=1e-3, log_every=1000, checkpoint_every=0, seed=0)
    base.update(kw)
    return TrainOptions(**base)


@requires("pycocotools")
def test_checkpoint_loads_and_resume_equals_an_uninterrupted_run(synth, tmp_path):
    ds = load_dataset(synth["train"] / "instances.json", flip=True)
    full = _tiny_model()
    full_result = train(full, ds, tmp_path / "full", _options(iters=5))

    part = _tiny_model()
    train(part, ds, tmp_path / "part", _options(iters=5, stop_after=3, checkpoint_every=2))
    assert torch.load(tmp_path / "part" / TRAIN_STATE, weights_only=False)["iteration"] == 3
    loaded = fai_mf.load_model(tmp_path / "part")  # focoos format: model_info.json + model_final.pth
    assert loaded.classes == ["circle", "rectangle", "triangle"] and loaded.config == part.config
    for key, value in part.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key

    resumed = build_model(tmp_path / "part")
    result = train(resumed, ds, tmp_path / "part", _options(iters=5, resume=True))
    assert result.iterations == 5 and len(result.losses) == 2
    np.testing.assert_allclose(result.losses, full_result.losses[3:], rtol=1e-5)
    for key, value in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, rtol=1e-4, atol=1e-6)


def test_build_model_reinitialises_the_class_head_for_new_classes(tmp_path):
    _tiny_model().save(tmp_path / "m")
    five = build_model(tmp_path / "m", num_classes=5)
    assert five.model.head.predictor.forward_prediction_heads.classifier.out_features == 6
    same = build_model(tmp_path / "m")
    assert torch.equal(same.model.pixel_decoder.state_dict()["layer_4.weight"],
                       five.model.pixel_decoder.state_dict()["layer_4.weight"])


# ---- DDP ---------------------------------------------------------------------------------------
DDP_OPTIONS = dict(iters=3, lr=1e-3, freeze_bn=True, shuffle=True, device="cpu")


def _deterministic(model: fai_mf.FAIMFModel) -> fai_mf.FAIMFModel:
    """Fixed points instead of random ones, so that every process samples what one process would."""
    g = torch.Generator().manual_seed(0)
    criterion = model.model.head.criterion
    criterion.point_sampler = FixedPoints(torch.rand(128, 2, generator=g))
    criterion.matcher.point_sampler = FixedPoints(torch.rand(128, 2, generator=g))
    return model


def _ddp_worker(rank: int, world: int, port: int, data: str, out: str, result_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from fai_mf import distributed

    model = _deterministic(_tiny_model())
    ds = load_dataset(data)
    with mf_kernels.use("reference"):
        result = train(model, ds, out, _options(batch_size=2, **DDP_OPTIONS))
    if rank == 0:
        torch.save({"losses": result.losses, "state": model.model.state_dict()}, result_path)
    distributed.cleanup()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@requires("pycocotools")
def test_two_process_ddp_equals_one_process_with_the_global_batch(synth, tmp_path):
    data = str(synth["train"] / "instances.json")
    single = _deterministic(_tiny_model())
    single_result = train(single, load_dataset(data), tmp_path / "single", _options(batch_size=4, **DDP_OPTIONS))

    result_path = tmp_path / "ddp.pt"
    mp.spawn(_ddp_worker, args=(2, _free_port(), data, str(tmp_path / "ddp"), str(result_path)), nprocs=2, join=True)
    ddp = torch.load(result_path, weights_only=False)

    np.testing.assert_allclose(ddp["losses"], single_result.losses, rtol=1e-4)
    assert single_result.losses[-1] < single_result.losses[0]
    for key, value in single.model.state_dict().items():
        # The key bias of attention has an exactly-zero gradient in theory (softmax ignores a per-query
        # constant); Adam turns its rounding noise into steps of up to lr, so it only agrees to lr * iters.
        atol = DDP_OPTIONS["lr"] * DDP_OPTIONS["iters"] if key.endswith("in_proj_bias") else 1e-5
        torch.testing.assert_close(ddp["state"][key], value, rtol=1e-3, atol=atol, msg=key)
    assert fai_mf.load_model(tmp_path / "ddp").config.num_classes == 3


# ---- CLI and learning --------------------------------------------------------------------------
@requires("pycocotools")
def test_cli_data_train_eval(tmp_path, capsys):
    assert cli.main(["data", "synth", "--out", str(tmp_path / "d"), "--n", "4", "--n-val", "2", "--size", "64"]) == 0
    config = tiny_config(criterion_num_points=64).to_dict()
    (tmp_path / "cfg.json").write_text(json.dumps(config))
    assert cli.main(["train", "--model", str(tmp_path / "cfg.json"), "--data", str(tmp_path / "d/train/instances.json"),
                     "--out", str(tmp_path / "m"), "--iters", "2", "--batch", "2", "--log-every", "1",
                     "--set", "num_queries=5", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "[iter 2/2] loss" in out and "it/s" in out
    assert fai_mf.load_model(tmp_path / "m").config.num_queries == 5
    assert cli.main(["eval", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "d/val/instances.json"),
                     str(tmp_path / "d/val"), "--json", str(tmp_path / "metrics.json")]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [m["task"] for m in metrics] == ["instance", "semantic"]
    assert 0 <= metrics[0]["AP"] <= 100 and 0 <= metrics[1]["mIoU"] <= 100


def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


@requires("pycocotools")
def test_trained_model_loads_and_predict_finds_the_shapes(tmp_path):
    """A tiny model fitted to two images finds each shape with its class (the quick-start path)."""
    splits = make_synthetic_dataset(tmp_path / "d", n=2, n_val=1, size=64, min_shapes=2, max_shapes=2, seed=1)
    ds = load_dataset(splits["train"] / "instances.json")
    model = _tiny_model()
    train(model, ds, tmp_path / "m", _options(iters=60, lr=2e-3, shuffle=False))
    loaded = fai_mf.load_model(tmp_path / "m")
    for i in range(len(ds)):
        sample = ds[i]
        detections = loaded.predict(sample["image"])[0].detections
        for label, mask in zip(sample["labels"].tolist(), sample["masks"].numpy()):
            ious = [_mask_iou(fai_mf.decode_mask(d, (64, 64)), mask) for d in detections if d.cls_id == label]
            assert ious and max(ious) > 0.5, (i, label, ious)
