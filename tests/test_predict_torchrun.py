"""`torchrun --nproc_per_node 2` (gloo, CPU) runs of `fai-mf predict` and `fai-mf eval` against one
process: byte-identical merged output, the same metrics whatever the number of processes, and a job
killed midway then completed by `--resume` (each image exactly once).

Each torchrun launch costs seconds of process start-up (three torch imports), so there are two: one job
runs predict and then eval (`run_cli_commands.py`), the other is the killed job."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fai_mf import cli
from fai_mf.data import make_synthetic_dataset
from test_cli_predict import make_folder, make_model, read_jsonl

REPO = Path(__file__).resolve().parents[1]


def torchrun(*args: str, cwd: Path, wait: bool = True):
    """`python -m torch.distributed.run --standalone --nproc_per_node 2 ARGS` (ARGS: `-m fai_mf.cli ...`
    or a script)."""
    env = {k: v for k, v in os.environ.items() if k != "MF_KERNELS"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO), env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if not wait:
        return process
    try:
        output, _ = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        _kill_job(process.pid)  # leave no hung workers behind
        raise
    return process.returncode, output


@pytest.fixture
def one_thread():
    """In-process runs use --threads 1, as each torchrun worker does (OMP_NUM_THREADS=1); restore after."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("torchrun")
    make_model(root / "model")
    make_folder(root / "imgs", size=(120, 160), odd=(96, 128))  # big enough that a run takes a while
    return root


def test_two_processes_predict_and_eval_as_one(workdir, one_thread, monkeypatch):
    """Fresh 2-process JSON Lines output is byte-identical to one process's (input order, failures too),
    and eval's metrics are equal."""
    monkeypatch.chdir(workdir)
    splits = make_synthetic_dataset(workdir / "data", n=1, n_val=7, size=48, seed=3)
    predict = ["predict", "imgs", "--model", "model", "--threshold", "0", "--no-latency", "--threads", "1"]
    evaluate = ["eval", "--model", "model", "--data", str(splits["val"] / "instances.json"), str(splits["val"]),
                "--threads", "1", "--batch", "2"]
    assert cli.main([*predict, "--out", "one.jsonl"]) == 3  # the corrupt image
    assert cli.main([*evaluate, "--json", "one.json"]) == 0
    status, output = torchrun(str(REPO / "tests" / "run_cli_commands.py"), *predict, "--out", "two.jsonl", "--next",
                              *evaluate, "--json", "two.json", cwd=workdir)
    assert status != 0 and "statuses [3, 0]" in output and "exitcode  : 3" in output, output  # torchrun reports the 3
    assert "on 2 processes" in output and "wrote two.jsonl (jsonl): 12 images" in output
    assert (workdir / "two.jsonl").read_bytes() == (workdir / "one.jsonl").read_bytes()
    assert not (workdir / "two.jsonl.parts").exists()
    one, two = (json.loads((workdir / name).read_text()) for name in ("one.json", "two.json"))
    assert [m["images"] for m in two] == [7, 7] and [m["task"] for m in two] == ["instance", "semantic"]
    assert one == two


def _kill_job(pid: int) -> None:
    """SIGKILL a torchrun agent and its workers (which it starts in sessions of their own), as a scheduler
    ending the job would."""
    def descendants(parent: int) -> list[int]:
        try:
            children = [int(c) for c in Path(f"/proc/{parent}/task/{parent}/children").read_text().split()]
        except OSError:
            return []
        return [d for child in children for d in (child, *descendants(child))]

    for process in [pid, *descendants(pid)]:
        try:
            os.kill(process, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _wait_for_records(parts: Path, process: subprocess.Popen, count: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        lines = sum(p.read_text().count("\n") for p in parts.glob("rank-*.jsonl")) if parts.is_dir() else 0
        if lines >= count:
            return
        time.sleep(0.002)
    raise AssertionError(f"the job ended or stalled before writing {count} records: {process.communicate()[0]}")


def test_killed_job_resumes_with_each_image_once(workdir, one_thread, caplog, monkeypatch):
    """SIGKILL a 2-process COCO run after its first records; --resume (here in one process) runs only the
    rest and leaves the output one fresh run writes, byte for byte."""
    monkeypatch.chdir(workdir)
    args = ["predict", "imgs", "--model", "model", "--threshold", "0", "--no-latency", "--threads", "1",
            "--format", "coco"]
    assert cli.main([*args, "--out", "fresh.json"]) == 3

    job = torchrun("-m", "fai_mf.cli", *args, "--out", "killed.json", cwd=workdir, wait=False)
    parts = workdir / "killed.records.jsonl.parts"
    _wait_for_records(parts, job, count=2)
    _kill_job(job.pid)
    job.communicate()
    assert not (workdir / "killed.json").exists()  # nothing half-written
    written = [r for p in sorted(parts.glob("rank-*.jsonl")) for r in read_jsonl(p)]
    assert 2 <= len(written) < 12
    with open(parts / "rank-00001.jsonl", "a") as part:
        part.write('{"path": "imgs/a/img01.png", "size": [1')  # a record cut short by the kill

    caplog.set_level("INFO")
    assert cli.main([*args, "--out", "killed.json", "--resume"]) == 3
    done_before = sum("error" not in r for r in written)
    assert f"this run: {12 - done_before} images" in caplog.text
    assert "kept from an earlier run" in caplog.text
    records = read_jsonl(workdir / "killed.records.jsonl")
    assert sorted(r["path"] for r in records) == sorted({r["path"] for r in records})  # each image once
    assert len(records) == 12 and not parts.exists()
    assert (workdir / "killed.json").read_bytes() == (workdir / "fresh.json").read_bytes()
    assert (workdir / "killed.records.jsonl").read_bytes() == (workdir / "fresh.records.jsonl").read_bytes()
