"""The dataset engine's parts without a model: input resolution, same-size grouping in input order,
record files cut by a kill, and the resumable output of one process."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from fai_mf.engine import (Decoded, RecordWriter, ShardedOutput, iterate, read_records, same_size_groups)
from fai_mf.sources import Entry, InputError, resolve_inputs


def touch_image(path, size=(4, 6)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size[1], size[0])).save(path)
    return str(path)


def test_resolve_inputs_of_every_kind(tmp_path):
    root = tmp_path / "data"
    a = touch_image(root / "sub" / "x.jpg")
    b = touch_image(root / "sub" / "x.png")  # same stem: annotated names stay unique
    c = touch_image(root / "top.PNG")
    (root / "readme.md").write_text("skipped: not an image extension")
    listing = root / "list.txt"
    listing.write_text("# comment\ntop.PNG\n\nmissing.jpg\n")
    coco = root / "coco.json"
    coco.write_text(json.dumps({"images": [{"id": 5, "file_name": "x.jpg"}], "categories": [{"id": 3}, {"id": 1}]}))
    found = resolve_inputs([str(root), str(listing), str(tmp_path / "data" / "**" / "*.jpg"), str(coco)],
                           image_root=root / "sub")
    assert [e.key for e in found.entries] == [a, b, c, str(root / "missing.jpg")]  # duplicates kept once
    assert [e.name for e in found.entries] == ["sub/x.png", "sub/x_1.png", "top.png", "missing.png"]
    assert found.category_ids == [1, 3]
    coco_only = resolve_inputs(coco, image_root=root / "sub")
    assert [(e.key, e.image_id) for e in coco_only.entries] == [(a, 5)]
    memory = resolve_inputs(iter([torch.zeros(2, 3, 4, 4), torch.zeros(3, 5, 5)]))
    assert [e.key for e in memory.entries] == ["#0", "#1", "#2"] and memory.entries[2].item.shape == (3, 5, 5)


@pytest.mark.parametrize("bad, error, match", [
    ("nope.png", InputError, "input not found"),
    ("*.nothing", InputError, "no file matches"),
    ("empty", InputError, "a directory with no images"),
    ("bad.json", ValueError, "not a COCO file"),
])
def test_resolve_inputs_errors(tmp_path, bad, error, match):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.json").write_text(json.dumps({"annotations": []}))
    with pytest.raises(error, match=match):
        resolve_inputs(str(tmp_path / bad))


def decoded(position: int, size: tuple[int, int] | None) -> Decoded:
    image = None if size is None else torch.zeros(3, *size)
    return Decoded(position, Entry(str(position), None), image, error=None if size else "bad")


def test_same_size_groups_fill_batches_and_flush_the_oldest():
    sizes = [(2, 2), (3, 3), (2, 2), None, (2, 2), (3, 3), (4, 4), (2, 2), (2, 2)]
    groups = [[d.position for d in g] for g in same_size_groups([decoded(i, s) for i, s in enumerate(sizes)],
                                                                batch=3, window=4)]
    # (2,2) fills at 4; the failed item passes at once; then 4 waiting -> the oldest group (3,3) runs partly
    assert groups == [[3], [0, 2, 4], [1, 5], [6], [7, 8]]
    assert sorted(p for g in groups for p in g) == list(range(len(sizes)))


def test_iterate_yields_in_input_order_with_failures(tmp_path):
    paths = [touch_image(tmp_path / f"{i}.png", size) for i, size in enumerate([(4, 6), (5, 5), (4, 6), (5, 5)])]
    (tmp_path / "broken.png").write_text("no")
    entries = resolve_inputs(paths[:2] + [str(tmp_path / "broken.png")] + paths[2:]).entries
    calls = []

    def process(group):
        calls.append([d.position for d in group])
        return [d.size for d in group]

    out = list(iterate(entries, process, batch=2))
    assert [item.position for item, _ in out] == [0, 1, 2, 3, 4]
    assert [result for _, result in out] == [(4, 6), (5, 5), None, (4, 6), (5, 5)]
    assert "cannot read image file" in out[2][0].error and calls == [[0, 3], [1, 4]]


def test_record_files_survive_a_cut_last_line(tmp_path):
    path = tmp_path / "r.jsonl"
    writer = RecordWriter(path, append=False)
    writer.write({"path": "a", "size": [1, 1]})
    writer.close()
    with open(path, "a") as file:
        file.write('{"path": "b", "si')  # killed mid-line
    assert read_records(path) == [{"path": "a", "size": [1, 1]}]
    writer = RecordWriter(path, append=True)  # the cut line is dropped before appending
    writer.write({"path": "b", "error": "x"})
    writer.close()
    assert [r["path"] for r in read_records(path)] == ["a", "b"]
    path.write_text('{"path": "a"}\nnot json\n{"path": "b"}\n')
    with pytest.raises(ValueError, match="r.jsonl:2: not a JSON record"):
        read_records(path)


def test_resume_keeps_successes_retries_failures_and_rewrites_in_order(tmp_path):
    entries = [Entry(k, k) for k in "abcd"]
    out = tmp_path / "out.jsonl"
    first = ShardedOutput(out, resume=False, device=torch.device("cpu"))
    assert first.start(entries) == entries
    first.write({"path": "c", "size": [1, 1]})
    first.write({"path": "a", "error": "unreadable"})
    first.close()  # "killed" here: b and d never ran

    again = ShardedOutput(out, resume=True, device=torch.device("cpu"))
    assert [e.key for e in again.start(entries)] == ["a", "b", "d"] and again.skipped == 1
    for key in "dab":
        again.write({"path": key, "size": [2, 2]})
    merged = again.finish(entries)
    assert [r["path"] for r in merged] == ["a", "b", "c", "d"] and all("error" not in r for r in merged)
    assert read_records(out) == merged

    fresh = ShardedOutput(out, resume=False, device=torch.device("cpu"))  # no --resume: start over
    assert fresh.start(entries) == entries and read_records(out) == []
    fresh.close()
