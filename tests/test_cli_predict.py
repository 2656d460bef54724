"""`fai-mf predict` in-process on generated images: single images, whole folders (JSON Lines and COCO
output, a corrupt file and an odd size among them), batching, inputs of every kind, annotated PNGs,
`predict_iter`, and the one-line errors of the CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import fai_mf
from conftest import tiny_config
from fai_mf import cli
from fai_mf.demo import synthetic_image
from fai_mf.predict import predict_iter

CLASSES = ["sky", "road", "car"]


def make_model(directory) -> "Path":  # noqa: F821
    """A focoos model directory holding a tiny random model with decisive masks."""
    torch.manual_seed(0)
    config = tiny_config(postprocessing_type="instance")
    network = fai_mf.FAIMaskFormer(config).eval()
    with torch.no_grad():
        network.pixel_decoder.mask_features.weight.mul_(40)
    return fai_mf.FAIMFModel(config, network, classes=CLASSES, name="tiny").save(directory)


def write_image(path, height: int, width: int, seed: int = 0) -> np.ndarray:
    image = synthetic_image(height, width, seed)[0].round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(image).save(path)
    return image


def make_folder(root, size=(40, 48), odd=(36, 52), count=12):
    """`count` images in two sub-folders: one of another size (odd), one corrupt file; returns the
    expected input order (sorted paths) and the corrupt path."""
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    paths = []
    for i in range(count - 1):
        path = root / ("a" if i < 6 else "b") / f"img{i:02d}.{'png' if i % 3 else 'jpg'}"
        write_image(path, *(odd if i == 4 else size), seed=i)
        paths.append(path)
    corrupt = root / "b" / "img99_corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n this is not a PNG")
    (root / "b" / "notes.txt").write_text("not an image: folders list image extensions only")
    return sorted(map(str, paths + [corrupt])), str(corrupt)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="module")
def model(model_dir):
    return fai_mf.load_model(model_dir)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    order, corrupt = make_folder(root)
    return root, order, corrupt


@pytest.fixture(scope="module")
def coco_file(folder):
    """A COCO file naming the folder's images (ids 101, 102, ...; categories 7, 8, 9)."""
    root, order, _ = folder
    images = [{"id": 101 + k, "file_name": str(path)[len(str(root)) + 1:]} for k, path in enumerate(order)]
    categories = [{"id": 7 + k, "name": name} for k, name in enumerate(CLASSES)]
    path = root / "images.json"
    path.write_text(json.dumps({"images": images, "categories": categories}))
    return path


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def strip_latency(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "latency"} for r in records]


# ---- one image (the quick-start path) ------------------------------------------------------------
def test_predict_writes_jsonl_and_annotated_png(model_dir, tmp_path):
    image = write_image(tmp_path / "scene.png", 48, 64)
    out, annotated = tmp_path / "result.jsonl", tmp_path / "annotated.png"
    assert cli.main(["predict", "--model", str(model_dir), str(tmp_path / "scene.png"), "--out", str(out),
                     "--annotate", str(annotated), "--threshold", "0"]) == 0
    (record,) = read_jsonl(out)
    assert list(record) == ["path", "size", "detections", "latency"]
    assert record["path"] == str(tmp_path / "scene.png") and record["size"] == [48, 64]
    assert set(record["latency"]) == {"preprocess", "inference", "postprocess"}
    assert len(record["detections"]) > 0
    for det in record["detections"]:
        assert set(det) == {"bbox", "conf", "cls_id", "label", "mask"}
        assert det["label"] == CLASSES[det["cls_id"]] and det["conf"] > 0
        mask = fai_mf.decode_mask(det, (48, 64))
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        assert det["bbox"] == [cols[0], rows[0], cols[-1], rows[-1]]
    drawn = Image.open(annotated)
    assert drawn.format == "PNG" and drawn.size == (64, 48) and drawn.mode == "RGB"
    assert not np.array_equal(np.asarray(drawn), image)  # masks, boxes and labels were drawn


def test_stdout_jsonl_rle_and_numbered_annotations(model_dir, tmp_path, capsys):
    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    write_image(paths[0], 40, 40, seed=1)
    write_image(paths[1], 30, 52, seed=2)
    assert cli.main(["predict", "--model", str(model_dir / "model_info.json"), *map(str, paths),
                     "--threshold", "0", "--mask-format", "rle", "--annotate", str(tmp_path / "ann.png")]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]  # no --out: JSONL on stdout
    assert [r["path"] for r in records] == list(map(str, paths))
    for record, size in zip(records, [(40, 40), (30, 52)]):
        assert record["size"] == list(size)
        for det in record["detections"]:
            assert json.loads(det["mask"])["size"] == list(size)
    for i, (height, width) in enumerate([(40, 40), (30, 52)]):
        assert Image.open(tmp_path / f"ann_{i}.png").size == (width, height)


def test_predict_with_a_zoo_name_warns_about_random_weights(tmp_path):
    write_image(tmp_path / "x.png", 32, 32)
    with pytest.warns(UserWarning, match="RANDOM weights"):
        assert cli.main(["predict", "--model", "fai-mf-m-ade", str(tmp_path / "x.png"),
                         "--out", str(tmp_path / "r.jsonl")]) == 0
    assert "detections" in read_jsonl(tmp_path / "r.jsonl")[0]


# ---- whole folders --------------------------------------------------------------------------------
def test_folder_jsonl_records_every_image_and_the_corrupt_one(model_dir, folder, tmp_path, caplog):
    root, order, corrupt = folder
    out = tmp_path / "preds.jsonl"
    caplog.set_level("INFO")
    status = cli.main(["predict", "--model", str(model_dir), str(root), "--out", str(out), "--threshold", "0",
                       "--batch", "4", "--workers", "2", "--log-interval", "0", "--annotate-dir", str(tmp_path / "ann")])
    assert status == 3  # finished, one image failed
    records = read_jsonl(out)
    assert [r["path"] for r in records] == order  # recursive, sorted, images only, input order
    failed = [r for r in records if "error" in r]
    assert [r["path"] for r in failed] == [corrupt] and "cannot read image file" in failed[0]["error"]
    assert {tuple(r["size"]) for r in records if "size" in r} == {(40, 48), (36, 52)}
    assert sum(len(r["detections"]) for r in records if "size" in r) > 0
    # annotated images mirror the folder layout (every image but the corrupt one)
    written = sorted(str(p.relative_to(tmp_path / "ann")) for p in (tmp_path / "ann").rglob("*.png"))
    expected = sorted(str(p)[len(str(root)) + 1:].rsplit(".", 1)[0] + ".png" for p in order if p != corrupt)
    assert written == expected
    log = caplog.text
    assert "predict: 3/12 images" in log  # plain progress lines when stderr is not a terminal
    assert "this run: 12 images (1 failed" in log and "img/s" in log and "kernels:" in log
    assert f"failed: {corrupt}: " in log
    assert "auto picked" not in log  # the per-op backend lines are -v only


def test_coco_output_takes_ids_from_the_coco_file(model_dir, folder, coco_file, tmp_path):
    root, order, corrupt = folder
    out = tmp_path / "results.json"
    assert cli.main(["predict", "--model", str(model_dir), str(coco_file), "--format", "coco", "--out", str(out),
                     "--threshold", "0"]) == 3
    results = json.loads(out.read_text())
    records = read_jsonl(tmp_path / "results.records.jsonl")  # per-image records next to it, failures included
    assert [r["image_id"] for r in records] == list(range(101, 101 + len(order)))
    assert [r["path"] for r in records if "error" in r] == [corrupt]
    expected = [(r["image_id"], d) for r in records if "error" not in r for d in r["detections"]]
    assert len(results) == len(expected) > 0
    for result, (image_id, det) in zip(results, expected):
        x1, y1, x2, y2 = det["bbox"]
        assert result["image_id"] == image_id and result["category_id"] == 7 + det["cls_id"]
        assert result["bbox"] == [x1, y1, x2 - x1 + 1, y2 - y1 + 1] and result["score"] == det["conf"]
        assert result["segmentation"] == json.loads(det["mask"])  # the RLE of the record


def test_batch_4_equals_batch_1(model, folder):
    """Mixed sizes run as same-size groups (never padded): batch 4 gives batch 1's detections. Batched
    convolutions round differently (logits within ~1e-6), so a mask may differ at a pixel whose
    probability is a near-tie with the mask threshold, and nowhere else."""
    root, order, _ = folder
    one = list(predict_iter(model, str(root), batch=1, threshold=0.0))
    four = list(model.predict_iter(str(root), batch=4, threshold=0.0, keep_images=True))
    assert [r.path for r in one] == [r.path for r in four] == order
    assert [r.ok for r in one] == [r.ok for r in four] and sum(not r.ok for r in one) == 1
    for a, b in zip(one, four):
        if not a.ok:
            continue
        assert a.size == b.size and len(a.detections) == len(b.detections) > 0
        for da, db in zip(a.detections, b.detections):
            assert da.cls_id == db.cls_id and abs(da.conf - db.conf) <= 1e-5
            if (da.bbox, da.mask) == (db.bbox, db.mask):
                continue
            differ = fai_mf.decode_mask(da, a.size) != fai_mf.decode_mask(db, b.size)
            with torch.inference_mode():
                probs = model.model(b.image[None]).masks[0]  # [Q, H, W]
            tie_distance = (probs - model.config.mask_threshold).abs().amin(0).numpy()
            assert (tie_distance[differ] < 1e-4).all(), f"{a.path}: masks differ away from the threshold"


def test_inputs_globs_lists_and_duplicates(model_dir, folder, tmp_path, capsys, caplog):
    root, order, corrupt = folder
    listing = tmp_path / "list.txt"
    listing.write_text(f"# two images, one twice\n{order[1]}\n\n{order[0]}\n")
    assert cli.main(["predict", "--model", str(model_dir), str(listing), str(root / "a" / "*.jpg"), order[1],
                     "--no-latency"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    jpgs = sorted(p for p in order if p.endswith(".jpg") and "/a/" in p)
    assert [r["path"] for r in records] == [order[1], order[0]] + [p for p in jpgs if p not in order[:2]]
    assert all("latency" not in r for r in records)
    assert "given more than once" in caplog.text


def test_predict_iter_over_in_memory_images_and_bad_options(model):
    images = [np.zeros((20, 24, 3), np.uint8), synthetic_image(24, 20, 3)[0]]
    results = list(model.predict_iter(images, threshold=0.0, keep_images=True))
    assert [(r.path, r.size, r.ok) for r in results] == [(None, (20, 24), True), (None, (24, 20), True)]
    assert results[1].image.shape == (3, 24, 20)
    expected = model.predict(images, threshold=0.0)
    assert [r.detections.model_dump()["detections"] for r in results] == [e.model_dump()["detections"] for e in expected]
    with pytest.raises(ValueError, match="mask_threshold"):
        model.predict_iter(images, mask_threshold=1.5)  # checked at the call, before any image runs


# ---- per-call option checks ----------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, error, match", [
    ({"threshold": float("nan")}, ValueError, "threshold must be a finite number in \\[0, 1\\], got nan"),
    ({"threshold": -0.1}, ValueError, "threshold"),
    ({"mask_threshold": 1.5}, ValueError, "mask_threshold"),
    ({"mask_threshold": float("inf")}, ValueError, "mask_threshold"),
    ({"threshold": "high"}, TypeError, "threshold must be a number"),
    ({"threshold": True}, TypeError, "threshold"),
    ({"predict_all_pixels": "false"}, TypeError, "predict_all_pixels must be True, False or None"),
    ({"use_mask_score": 1}, TypeError, "use_mask_score"),
])
def test_predict_checks_per_call_options(model, kwargs, error, match):
    with pytest.raises(error, match=match):
        model.predict(np.zeros((16, 16, 3), np.uint8), **kwargs)


def test_explicit_zero_and_false_are_honoured(model_dir):
    model = fai_mf.load_model(model_dir, threshold=0.9, use_mask_score=True)
    image = synthetic_image(32, 32, 5)[0]
    strict, zero = model.predict(image)[0], model.predict(image, threshold=0, use_mask_score=False)[0]
    assert len(zero) > len(strict)
    class_scores = model.model(image[None]).logits[0].max(-1).values.tolist()
    for det in zero:  # without the mask score, conf is the class probability of a query
        assert min(abs(det.conf - s) for s in class_scores) < 1e-6


# ---- one-line errors, nothing half-written -------------------------------------------------------
@pytest.fixture
def image(tmp_path):
    write_image(tmp_path / "x.png", 24, 24)
    return str(tmp_path / "x.png")


def run_cli(argv, capsys) -> tuple[int, str]:
    status = cli.main(argv)
    err = capsys.readouterr().err
    return status, err


@pytest.mark.parametrize("case, message", [
    ("missing image", "input not found: 'MISSING'"),
    ("missing model", "is neither a model directory, a model_info.json nor a zoo model"),
    ("empty directory", "a directory with no images"),
    ("out is a directory", "--out OUTDIR is a directory"),
    ("annotate into a missing folder", "--annotate MISSINGDIR/a.png: the folder MISSINGDIR does not exist"),
    ("out into a missing folder", "--out MISSINGDIR/p.jsonl: the folder MISSINGDIR does not exist"),
    ("cuda without CUDA", "--device cuda: CUDA is not available"),
    ("bad MF_KERNELS", "$MF_KERNELS='bogus' is not a kernels choice"),
    ("coco with png masks", "--format coco writes RLE segmentations"),
    ("resume without out", "--resume needs --out"),
    ("coco without out", "--format coco needs --out"),
    ("annotate-dir is a file", "exists and is not a directory"),
    ("weights is a directory", "--weights OUTDIR is a directory; give its model_final.pth"),
])
def test_cli_errors_are_one_line_before_any_work(case, message, model_dir, image, tmp_path, capsys, monkeypatch):
    if case == "cuda without CUDA" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    out = tmp_path / "p.jsonl"
    args = {"missing image": [str(tmp_path / "MISSING")],
            "missing model": ["--model", str(tmp_path / "nowhere")],
            "empty directory": [str(tmp_path / "OUTDIR")],
            "out is a directory": ["--out", str(tmp_path / "OUTDIR")],
            "annotate into a missing folder": ["--out", str(out), "--annotate", str(tmp_path / "MISSINGDIR/a.png")],
            "out into a missing folder": ["--out", str(tmp_path / "MISSINGDIR/p.jsonl")],
            "cuda without CUDA": ["--device", "cuda"],
            "bad MF_KERNELS": [],
            "coco with png masks": ["--format", "coco", "--mask-format", "png", "--out", str(out)],
            "resume without out": ["--resume"],
            "coco without out": ["--format", "coco"],
            "annotate-dir is a file": ["--out", str(out), "--annotate-dir", image],
            "weights is a directory": ["--weights", str(tmp_path / "OUTDIR")]}[case]
    (tmp_path / "OUTDIR").mkdir()
    if case == "bad MF_KERNELS":
        monkeypatch.setenv("MF_KERNELS", "bogus")
    argv = ["predict", "--model", str(model_dir), image, *args]
    if case in ("missing image", "empty directory"):
        argv.remove(image)
    status, err = run_cli(argv, capsys)
    assert status == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fai-mf predict: error: "), err
    assert message.replace("MISSINGDIR", str(tmp_path / "MISSINGDIR")).replace("OUTDIR", str(tmp_path / "OUTDIR")) \
        .replace("MISSING'", f"{tmp_path / 'MISSING'}'") in lines[0]
    assert not out.exists()  # nothing was written


def test_verbose_shows_the_traceback(model_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="input not found"):
        cli.main(["predict", "--model", str(model_dir), str(tmp_path / "nope.png"), "-v"])


@pytest.mark.parametrize("argv, message", [
    (["predict", "--model", "m", "x.png", "--threshold", "nan"], "--threshold: expected a finite number in [0, 1]"),
    (["predict", "--model", "m", "x.png", "--mask-threshold", "-1"], "--mask-threshold: expected a finite number"),
    (["predict", "--model", "m", "x.png", "--batch", "0"], "--batch: expected an integer >= 1, got '0'"),
    (["predict", "--model", "m", "x.png", "--workers", "two"], "--workers: expected an integer, got 'two'"),
    (["eval", "--model", "m", "--data", "d", "--size", "0"], "--size: expected an integer >= 1"),
    (["bench", "fps", "--resolution", "0"], "--resolution: expected an integer >= 1, got '0'"),
    (["bench", "fps", "--iters", "0"], "--iters: expected an integer >= 1, got '0'"),
])
def test_usage_errors_exit_2_naming_the_argument(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_eval_errors_are_one_line(model_dir, tmp_path, capsys):
    status, err = run_cli(["eval", "--model", str(model_dir), "--data", str(tmp_path / "none.json")], capsys)
    assert status == 1 and err.strip() == f"fai-mf eval: error: --data {tmp_path / 'none.json'}: no such file or folder"
