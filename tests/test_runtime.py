"""Custom ops (torch.library), torch.compile, torch.export and the ONNX export (`fai_mf.runtime`).

The custom ops are checked with `torch.library.opcheck` (schema, fake vs real, autograd registration,
AOT dispatch) under the reference and the auto backends, and their backward against the reference's
autograd. The whole-model checks run the tiny config (with the res5 encoder): Dynamo traces the fused
forward into ONE graph (no graph break) that holds the custom ops; a torch.export program round-trips
through save/load; the ONNX file written by `fai-mf export` matches PyTorch within 1e-4 at 640² and at
an odd size under ONNX Runtime, predictions from it go through our post-processing, and the profiler
runs eager and ONNX Runtime side by side. Inductor compiles of real models are measured by
`fai-mf bench fps --runtime torch compile onnxruntime` (too slow for CI on 2 cores).
"""
from __future__ import annotations

import pytest
import torch

import fai_mf
import mf_kernels
from conftest import tiny_config
from fai_mf import runtime as rt
from fai_mf.cli import main
from mf_kernels import custom_ops
from mf_kernels import mask_postprocess_ref
from mf_kernels.testing import make_class_probs, make_mask_logits
from mf_kernels.masked_attention import masked_cross_attention_ref
from mf_kernels.testing import masked_attention_inputs

@pytest.fixture(scope="module")
def encoder_model() -> fai_mf.FAIMFModel:
    torch.manual_seed(0)
    cfg = tiny_config(pixel_decoder_transformer_layers=1)
    return fai_mf.FAIMFModel(cfg, fai_mf.FAIMaskFormer(cfg).eval(), name="tiny-encoder")


def eager_outputs(m: fai_mf.FAIMFModel, images: torch.Tensor, kernels: str) -> tuple[torch.Tensor, torch.Tensor]:
    with rt.eager(m.model, kernels), torch.inference_mode():
        return rt.RawForward(m.model)(images)


def assert_outputs_close(got, expected, atol: float = 1e-4) -> None:
    for name, a, b in zip(rt.OUTPUT_NAMES, got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------------
# torch.library custom ops


def op_cases():
    q, k, v, logits = masked_attention_inputs(2, 5, 37, dim=32, heads=4, seed=3)
    lateral = torch.randn(2, 8, 7, 5)
    coarse = torch.randn(2, 8, 4, 3)
    x = torch.randn(2, 6, 7, 5)
    weight, bias = torch.randn(8, 6), torch.randn(8)
    mask_logits = make_mask_logits(6, 9, 11)
    scores = torch.rand(6)
    queries = torch.tensor([4, 0, 2])
    probs = make_class_probs(6, 5, kept=3)
    grads = lambda *ts: tuple(t.clone().requires_grad_() for t in ts)  # noqa: E731
    return {
        "masked_cross_attention": (*grads(q, k, v), logits, 4),
        "fpn_upsample_add": grads(lateral, coarse),
        "fpn_upsample_add channels_last": grads(lateral.contiguous(memory_format=torch.channels_last),
                                                coarse.contiguous(memory_format=torch.channels_last)),
        "fpn_lateral_upsample_add": grads(x, weight, bias, coarse),
        "mask_postprocess threshold": (mask_logits, 35, 43, 0.5, False, None, queries),
        "mask_postprocess ownership": (mask_logits, 35, 43, 0.5, False, scores, None),
        "semantic_label_map": (mask_logits, probs, 35, 43),
    }


@pytest.mark.parametrize("case", list(op_cases()))
def test_opcheck(case, extension):
    """Under auto the kernels run the fused CPU backends (cpp, sdpa): their outputs must match the fakes."""
    op = custom_ops.CUSTOM_OPS[case.split()[0]]
    with mf_kernels.use("auto"):
        torch.library.opcheck(op, op_cases()[case])


def test_opcheck_reference_backend():
    with mf_kernels.use("reference"):
        torch.library.opcheck(custom_ops.masked_cross_attention, op_cases()["masked_cross_attention"])


def test_custom_ops_equal_the_dispatched_ops(extension):
    cases = op_cases()
    with mf_kernels.use("auto"):
        out = torch.ops.mf_kernels.masked_cross_attention(*cases["masked_cross_attention"])
        torch.testing.assert_close(out, masked_cross_attention_ref(*cases["masked_cross_attention"]))
        lateral, coarse = cases["fpn_upsample_add channels_last"]
        out = torch.ops.mf_kernels.fpn_upsample_add(lateral, coarse)
        assert out.is_contiguous(memory_format=torch.channels_last)  # as the fake promises
        torch.testing.assert_close(out, mf_kernels.fpn_upsample_add_ref(lateral, coarse))
        mask_logits, height, width, threshold, strict, scores, queries = cases["mask_postprocess ownership"]
        areas, boxes, prob_sums = torch.ops.mf_kernels.mask_postprocess(*cases["mask_postprocess ownership"])
        ref = mask_postprocess_ref(mask_logits, (height, width), scores=scores)
        assert torch.equal(areas, ref.areas) and torch.equal(boxes, ref.boxes)
        torch.testing.assert_close(prob_sums, ref.prob_sums)


def test_masked_attention_backward_matches_the_reference_autograd():
    q, k, v, logits = masked_attention_inputs(1, 6, 29, dim=32, heads=4, seed=5)
    q, k, v = (t.double().requires_grad_() for t in (q, k, v))
    grad = torch.randn(1, 6, 32, dtype=torch.float64)
    torch.autograd.backward(torch.ops.mf_kernels.masked_cross_attention(q, k, v, logits, 4), grad)
    fused = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    torch.autograd.backward(masked_cross_attention_ref(q, k, v, logits, 4), grad)
    for got, expected in zip(fused, (q.grad, k.grad, v.grad)):
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)


def test_lateral_backward_matches_the_reference_autograd():
    x, weight, bias, coarse = (torch.randn(*s, dtype=torch.float64, requires_grad=True)
                               for s in ((2, 6, 7, 5), (8, 6), (8,), (2, 8, 4, 3)))
    grad = torch.randn(2, 8, 7, 5, dtype=torch.float64)
    inputs = (x, weight, bias, coarse)
    fused = torch.autograd.grad(torch.ops.mf_kernels.fpn_lateral_upsample_add(*inputs), inputs, grad)
    expected = torch.autograd.grad(mf_kernels.fpn_lateral_upsample_add_ref(*inputs), inputs, grad)
    for got, want in zip(fused, expected):
        torch.testing.assert_close(got, want)


def test_every_tensor_op_is_routed_to_its_custom_op_when_traced():
    assert {name for name, op in mf_kernels.OPS.items() if op.traced is not None} == set(custom_ops.CUSTOM_OPS)


def test_traced_choice_is_guarded_one_graph_per_choice(extension):
    """Inside `tracing(choice)` Dynamo reads the choice from a guarded global: "reference" traces the aten
    reference, a fused choice the custom op, and switching back reuses the first graph."""
    graphs = []

    def counting_backend(gm: torch.fx.GraphModule, example_inputs):
        graphs.append({str(n.target) for n in gm.graph.nodes})
        return gm.forward

    compiled = torch.compile(lambda lateral, coarse: mf_kernels.fpn_upsample_add(lateral, coarse) * 2,
                             backend=counting_backend)
    lateral, coarse = torch.randn(1, 4, 6, 5), torch.randn(1, 4, 3, 3)
    expected = mf_kernels.fpn_upsample_add_ref(lateral, coarse) * 2
    for choice in ("reference", "cpp", "reference"):
        with mf_kernels.dispatch.tracing(choice):
            torch.testing.assert_close(compiled(lateral, coarse), expected)
    assert len(graphs) == 2
    assert "mf_kernels.fpn_upsample_add.default" not in graphs[0]
    assert "mf_kernels.fpn_upsample_add.default" in graphs[1]


# ---------------------------------------------------------------------------------------------------
# torch.compile (Dynamo), torch.export


def test_compiled_fused_forward_is_one_graph_with_the_custom_ops(encoder_model, extension):
    """The fused forward (cpp + sdpa + folded convs + level masks) compiles as a single Dynamo graph (no
    break in the backbone, pixel decoder or decoder) holding the custom ops, and matches eager."""
    graphs = []

    def counting_backend(gm: torch.fx.GraphModule, example_inputs):
        graphs.append(gm)
        return gm.forward

    m = encoder_model
    images = rt.example_images(m, 1, 67, 45)
    expected = eager_outputs(m, images, "auto")
    forward = rt.CompiledForward(m.model, backend=counting_backend)
    with rt.installed(m.model, forward), torch.inference_mode():
        for _ in range(2):  # set_kernels registers new hooks: the compiled graph must not depend on them
            m.set_kernels("auto")
            raw = m.model.forward_raw(images)
    m.set_kernels(None)
    assert len(graphs) == 1, f"{len(graphs)} graphs: graph breaks (or a recompile) in the fused forward"
    targets = {str(n.target) for n in graphs[0].graph.nodes}
    assert {"mf_kernels.masked_cross_attention.default", "mf_kernels.fpn_lateral_upsample_add.default"} <= targets
    assert_outputs_close((raw.class_logits, raw.mask_logits), expected, atol=1e-5)
    assert list(forward.compile_seconds) == [("auto", (1, 3, 67, 45), torch.float32, "cpu")]


def test_export_program_round_trips_with_custom_ops(encoder_model, extension, tmp_path):
    m = encoder_model
    images = rt.example_images(m, 1, 70, 52)
    program = rt.export_program(m, kernels="auto", images=images)
    assert any("mf_kernels.masked_cross_attention" in str(n.target) for n in program.graph.nodes)
    torch.export.save(program, tmp_path / "tiny.pt2")
    loaded = torch.export.load(tmp_path / "tiny.pt2")
    with torch.inference_mode(), mf_kernels.use("auto"):
        got = loaded.module()(images)
    assert_outputs_close(got, eager_outputs(m, images, "auto"), atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# ONNX (reference path) with ONNX Runtime


@pytest.fixture(scope="module")
def onnx_export(encoder_model, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    directory = tmp_path_factory.mktemp("onnx")
    encoder_model.save(directory / "model")
    out = directory / "model.onnx"
    assert main(["export", "--format", "onnx", "--model", str(directory / "model"), "--out", str(out),
                            "--height", "96", "--width", "80"]) == 0
    return out


@pytest.mark.parametrize("shape", [(1, 640, 640), (2, 101, 67)], ids=["640x640", "b2-101x67"])
def test_onnx_export_matches_pytorch_under_onnxruntime(onnx_export, encoder_model, shape):
    import onnx

    opsets = {o.domain: o.version for o in onnx.load(str(onnx_export)).opset_import}
    assert opsets[""] >= 17
    images = rt.example_images(encoder_model, *shape)
    got = rt.OnnxForward(onnx_export).run(images)
    assert got[1].shape == (shape[0], 10, -(-shape[1] // 4), -(-shape[2] // 4))
    assert_outputs_close(got, eager_outputs(encoder_model, images, "reference"), atol=1e-4)


def test_onnxruntime_predictions_go_through_our_postprocessing(onnx_export, encoder_model, extension):
    m = encoder_model
    images = [rt.example_images(m, 1, 83, 61)[0]]
    expected = m.predict(images, threshold=0.0)
    try:
        m.set_runtime("onnxruntime", path=onnx_export)
        assert m.runtime == "onnxruntime"
        mf_kernels.dispatch.clear_caches()
        got = m.predict(images, threshold=0.0)
    finally:
        m.set_runtime("torch")
    assert m.runtime == "torch"
    assert [d.cls_id for d in got[0].detections] == [d.cls_id for d in expected[0].detections]
    assert [d.bbox for d in got[0].detections] == [d.bbox for d in expected[0].detections]
    for a, b in zip(got[0].detections, expected[0].detections):
        assert abs(a.conf - b.conf) < 1e-4
    assert mf_kernels.OPS["mask_postprocess"].last_backend == "cpp"  # our fused post-processing


def test_profiler_runs_runtimes_side_by_side(onnx_export, encoder_model, extension):
    from fai_mf.profile import format_table, profile

    m = encoder_model
    rt.make_runtime(m, "onnxruntime", path=onnx_export)  # the profiler reuses the model's runtime objects
    report = profile(m, resolution=64, iters=1, warmup=0, kernels="auto", device="cpu",
                     runtimes=("torch", "onnxruntime"))
    assert [r["label"] for r in report["runs"]] == ["reference", "auto", "onnxruntime:auto"]
    ort_run = report["runs"][-1]
    assert ort_run["stage_ms"]["backbone"] is None and ort_run["stage_ms"]["postprocess"] > 0
    assert set(report["agreements"]) == {"auto", "onnxruntime:auto"} and report["agreement"]["ok"]
    assert "onnxruntime:auto" in format_table(report)


def test_auto_runtime_is_onnxruntime_on_cpu_where_installed():
    assert rt.auto_runtime(torch.device("cpu")) == ("onnxruntime" if not rt.onnxruntime_reasons() else "torch")
    assert rt.auto_runtime(torch.device("cuda")) == "torch"


def test_bad_runtime_is_named(encoder_model):
    with pytest.raises(ValueError, match="unknown runtime 'tensorrt'"):
        encoder_model.set_runtime("tensorrt")
    with pytest.raises(ValueError, match="compile=True"):
        fai_mf.load_model("fai-mf-m-ade", compile=True, runtime="onnxruntime")
