"""The FPS profiler runs end to end on CPU (timings are never asserted, only their presence)."""
from __future__ import annotations

import json

import torch

import fai_mf
from fai_mf import cli
from fai_mf.profile import STAGES, format_table, profile

from conftest import tiny_config


def test_profile_reference_vs_auto_on_a_tiny_model(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_config(transformer_predictor_hidden_dim=256)
    m = fai_mf.FAIMFModel(cfg, fai_mf.FAIMaskFormer(cfg).eval(), name="tiny")
    report = profile(m, resolution=64, iters=2, warmup=1, kernels="auto", device="cpu")
    assert [r["kernels"] for r in report["runs"]] == ["reference", "auto"]
    for run in report["runs"]:
        assert set(run["stage_ms"]) == set(STAGES)
        assert all(v > 0 for v in run["stage_ms"].values())
        assert run["model_fps"] > 0 and run["end_to_end_fps"] > 0 and run["peak_memory_mb"] > 0
    assert report["agreement"]["ok"], report["agreement"]
    assert report["environment"]["torch"] == torch.__version__
    json.dumps(report)  # JSON-able
    assert "outputs agree: YES" in format_table(report)


def test_bench_fps_cli_writes_json_and_plot(tmp_path):
    out_json, out_png = tmp_path / "fps.json", tmp_path / "fps.png"
    rc = cli.main(["bench", "fps", "--model", "fai-mf-m-ade", "--resolution", "64", "--iters", "1", "--warmup", "0",
                   "--kernels", "reference", "--no-compare", "--json", str(out_json), "--plot", str(out_png)])
    assert rc == 0
    report = json.loads(out_json.read_text())
    assert report["runs"][0]["kernels"] == "reference" and report["agreement"] is None
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["notes"] and "random weights" in report["notes"][0]


def test_bench_roofline_lists_every_fused_call_of_the_model(tmp_path, capsys):
    out_json = tmp_path / "roof.json"
    assert cli.main(["bench", "roofline", "--model", "fai-mf-m-ade", "--resolution", "128", "--no-measure",
                     "--json", str(out_json)]) == 0
    report = json.loads(out_json.read_text())
    ops = [c["op"] for c in report["calls"]]
    assert ops.count("masked_cross_attention") == 3  # one per decoder layer of fai-mf-m-ade
    assert ops.count("fpn_lateral_upsample_add") == 3  # one per FPN level
    assert {"mask_postprocess/owner", "mask_postprocess/stats"} <= set(ops)  # predict_all_pixels: ownership
    assert report["total_floor_us"] == sum(c["floor_us"] for c in report["calls"]) > 0
    assert "sum of the fused kernels' T4 floors" in capsys.readouterr().out
