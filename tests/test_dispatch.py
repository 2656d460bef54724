"""The dispatcher (SPEC §4): registration, refusal reasons, auto order and its one-time log lines, the
one-flag swap (model `kernels`, `mf_kernels.use`, $MF_KERNELS), `python -m mf_kernels.info`, roofline.

Toy ops built here exercise the rules without depending on what this machine can run.
"""
from __future__ import annotations

import io
import logging
import subprocess
import sys

import pytest
import torch

import fai_mf
import mf_kernels
from mf_kernels import dispatch, info, roofline
from mf_kernels.masked_attention import masked_cross_attention_ref
from mf_kernels.shapes import MASKED_ATTENTION_SHAPES

from conftest import tiny_config


def toy_op(calls: list[str]) -> dispatch.Op:
    """An op (not in the global registry) with a cpu "cpp" that refuses odd sizes, a "triton" that needs
    CUDA, and an "sdpa" that refuses float16."""

    def impl(name):
        def run(x):
            calls.append(name)
            return x + 1

        return run

    op = dispatch.Op("toy", impl("reference"), lambda x: dispatch.make_inputs(x.device, x.dtype, n=x.numel()))
    op.register("cpp", impl("cpp"), devices=("cpu",), dtypes=(torch.float32,),
                check=lambda inputs: [f"n={inputs.n} is odd"] if inputs.n % 2 else [])
    op.register("triton", impl("triton"), devices=("cuda",), dtypes=(torch.float32, torch.float16))
    op.register("sdpa", impl("sdpa"), devices=("cpu", "cuda"), dtypes=(torch.float32,))
    return op


@pytest.fixture
def no_env_choice(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)


def test_auto_walks_the_cpu_order(no_env_choice):
    calls: list[str] = []
    op = toy_op(calls)
    op(torch.zeros(4))
    op(torch.zeros(3))  # cpp refuses odd sizes: next in the CPU order is sdpa
    op(torch.zeros(3, dtype=torch.float16))  # cpp and sdpa refuse fp16: the reference
    assert calls == ["cpp", "sdpa", "reference"]
    assert dispatch.AUTO_ORDER["cpu"] == ("cpp", "sdpa", "reference")
    assert dispatch.AUTO_ORDER["cuda"][:2] == ("triton", "cuda")


def test_an_op_auto_preference_replaces_the_device_order_where_it_applies(no_env_choice):
    calls: list[str] = []
    op = toy_op(calls)
    op.prefer(dispatch.AutoPreference(device="cpu", dtypes=(torch.float32,), order=("sdpa", "cpp", "reference"),
                                      why="toy roofline"))
    op(torch.zeros(4))  # float32 on CPU: the preference, sdpa first
    op(torch.zeros(4, dtype=torch.float16))  # not float32: the CPU order, where cpp and sdpa refuse fp16
    assert calls == ["sdpa", "reference"]
    assert op.auto_preferences[0].describe() == "cpu float32: sdpa > cpp > reference (toy roofline)"


def test_auto_logs_its_fallback_once_with_every_reason(no_env_choice, caplog):
    op = toy_op([])
    x = torch.zeros(3, dtype=torch.float16)
    with caplog.at_level(logging.INFO, logger="mf_kernels"):
        for _ in range(3):
            op(x)
    fallbacks = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(fallbacks) == 1
    message = fallbacks[0].getMessage()
    assert "reference" in message and "n=3 is odd" in message and "float16 not supported" in message


def test_named_backend_refusal_lists_every_reason(no_env_choice):
    op = toy_op([])
    with mf_kernels.use("cpp"), pytest.raises(mf_kernels.NotSupportedError) as err:
        op(torch.zeros(3, dtype=torch.float16))
    assert "dtype float16 not supported" in str(err.value) and "n=3 is odd" in str(err.value)
    with mf_kernels.use("triton"), pytest.raises(mf_kernels.NotSupportedError, match="runs on cuda tensors, not cpu"):
        op(torch.zeros(4))


def test_named_backend_the_op_lacks_runs_the_reference_and_says_so(no_env_choice, caplog):
    calls: list[str] = []
    op = toy_op(calls)
    with caplog.at_level(logging.INFO, logger="mf_kernels"), mf_kernels.use("cuda"):
        op(torch.zeros(4))
        op(torch.zeros(4))
    assert calls == ["reference", "reference"]
    assert sum("no 'cuda' implementation" in r.getMessage() for r in caplog.records) == 1
    assert op.reasons("cuda", dispatch.make_inputs("cpu", torch.float32, n=4)) == [dispatch.NOT_IMPLEMENTED]


def test_use_nests_and_env_var_sets_the_default(monkeypatch):
    calls: list[str] = []
    op = toy_op(calls)
    monkeypatch.setenv(dispatch.ENV_VAR, "sdpa")
    assert mf_kernels.current_choice() == "sdpa"
    with mf_kernels.use("reference"):
        with mf_kernels.use("cpp"):
            op(torch.zeros(4))
        op(torch.zeros(4))
    op(torch.zeros(4))
    assert calls == ["cpp", "reference", "sdpa"]
    monkeypatch.setenv(dispatch.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="MF_KERNELS"):
        op(torch.zeros(4))
    with pytest.raises(ValueError, match="unknown kernels choice"):
        with mf_kernels.use("tensorrt"):
            pass


def test_registration_rejects_unknown_backends():
    with pytest.raises(ValueError, match="unknown backend"):
        toy_op([]).register("opencl", lambda x: x, devices=("cpu",), dtypes=(torch.float32,))


def test_masked_attention_registrations():
    op = mf_kernels.masked_cross_attention
    assert dispatch.OPS["masked_cross_attention"] is op and dispatch.OPS["fpn_upsample_add"] is mf_kernels.fpn_upsample_add
    cpu32 = dispatch.make_inputs("cpu", torch.float32, head_dim=32, queries=100, logits_dtype=torch.float32,
                                 devices=("cpu",), needs_grad=False)
    for backend in ("cpp", "cuda"):
        assert op.reasons(backend, cpu32) == [dispatch.NOT_IMPLEMENTED]
    assert op.reasons("sdpa", cpu32) == [] and op.reasons("reference", cpu32) == []
    odd = dispatch.make_inputs("cpu", torch.bfloat16, head_dim=48, queries=200, logits_dtype=torch.float32,
                               devices=("cpu",), needs_grad=True)
    reasons = " | ".join(op.reasons("triton", odd))
    for expected in ("bfloat16 not supported", "head dim 48", "Q=200 > 128", "no backward"):
        assert expected in reasons


def test_auto_picks_sdpa_for_cpu_attention(no_env_choice):
    q, k, v = torch.randn(1, 3, 16), torch.randn(1, 5, 16), torch.randn(1, 5, 16)
    logits = torch.randn(1, 3, 5)
    inputs = mf_kernels.masked_cross_attention.inputs_of(q, k, v, logits, 2)
    assert mf_kernels.masked_cross_attention.select(inputs, "auto").backend == "sdpa"
    torch.testing.assert_close(mf_kernels.masked_cross_attention(q, k, v, logits, 2),
                               masked_cross_attention_ref(q, k, v, logits, 2))


# ---------------------------------------------------------------------------------------------------
# The model flag


def tiny(kernels: str | None = None) -> fai_mf.FAIMFModel:
    torch.manual_seed(0)
    cfg = tiny_config()
    return fai_mf.FAIMFModel(cfg, fai_mf.FAIMaskFormer(cfg).eval(), name="tiny").set_kernels(kernels)


def test_reference_model_is_exactly_the_unfused_model(no_env_choice, monkeypatch):
    """kernels="reference" calls the references themselves: bit-identical to the model whose ops are the
    plain reference functions, with no dispatcher at all."""
    images = torch.rand(1, 3, 64, 72, generator=torch.Generator().manual_seed(1)) * 255
    with torch.no_grad():
        ours = tiny("reference").model.forward_raw(images)
        assert dispatch.last_choices()["masked_cross_attention"] == "reference"
        monkeypatch.setattr(mf_kernels, "masked_cross_attention", masked_cross_attention_ref)
        monkeypatch.setattr(mf_kernels, "fpn_upsample_add", mf_kernels.fpn_upsample_add_ref)
        with mf_kernels.use("reference"):  # the pixel decoder also reads the choice (unfolded BN path)
            plain = tiny().model.forward_raw(images)
    assert torch.equal(ours.class_logits, plain.class_logits) and torch.equal(ours.mask_logits, plain.mask_logits)


def test_model_kernels_pin_their_choice_and_restore_it(no_env_choice, monkeypatch):
    seen: list[str] = []
    real = mf_kernels.masked_cross_attention

    def spy(*args):
        seen.append(mf_kernels.current_choice())
        return masked_cross_attention_ref(*args)

    monkeypatch.setattr(mf_kernels, "masked_cross_attention", spy)
    model = tiny("sdpa")
    assert model.kernels == "sdpa" and tiny().kernels == "auto"
    images = torch.rand(1, 3, 32, 32) * 255
    with torch.no_grad(), mf_kernels.use("reference"):
        model.model(images)  # the model's own choice wins over the surrounding use()
        model.model.forward_raw(images)  # and holds for entry points below the model
        assert mf_kernels.current_choice() == "reference"
    assert seen and set(seen) == {"sdpa"}
    model.set_kernels(None)
    seen.clear()
    with torch.no_grad(), mf_kernels.use("reference"):
        model.model(images)
    assert set(seen) == {"reference"}
    monkeypatch.setattr(mf_kernels, "masked_cross_attention", real)


def test_model_choice_is_restored_when_forward_raises(no_env_choice):
    model = tiny("sdpa")
    with pytest.raises(ValueError):
        model.model(torch.rand(1, 4, 32, 32))  # 4 channels: rejected inside forward
    assert mf_kernels.current_choice() == "auto"


def test_model_with_kernels_still_pickles():
    buffer = io.BytesIO()
    torch.save(tiny("sdpa").model, buffer)
    buffer.seek(0)
    assert isinstance(torch.load(buffer, weights_only=False), fai_mf.FAIMaskFormer)


def test_load_model_kernels_flag(tmp_path):
    tiny().save(tmp_path / "m")
    assert fai_mf.load_model(tmp_path / "m", kernels="sdpa").kernels == "sdpa"
    with pytest.raises(ValueError, match="unknown kernels choice"):
        fai_mf.load_model(tmp_path / "m", kernels="fastest")
    with pytest.raises(ValueError, match="unknown kernels choice"):
        tiny().set_kernels("gpu")


# ---------------------------------------------------------------------------------------------------
# Reports


def test_info_table_lists_every_op_and_backend():
    rows = info.table()
    assert {(op, backend) for op, backend, _, _ in rows} >= {(op, b) for op in dispatch.OPS for b in dispatch.BACKENDS}
    cells = {(op, backend): (cpu, cuda) for op, backend, cpu, cuda in rows}
    assert cells[("masked_cross_attention", "cpp")] == (dispatch.NOT_IMPLEMENTED, dispatch.NOT_IMPLEMENTED)
    assert cells[("masked_cross_attention", "reference")][0] == "yes"
    assert cells[("masked_cross_attention", "sdpa")][0] == "yes"
    report = info.format_report()
    for key in ("torch", "triton", "cuda", "extension mf_kernels._C"):
        assert key in report


def test_info_command_runs_without_touching_cuda_at_import():
    done = subprocess.run([sys.executable, "-c", "import mf_kernels, fai_mf, sys; "
                           "assert 'triton' not in sys.modules; import torch; "
                           "assert not torch.cuda.is_initialized(); "
                           "from mf_kernels.info import main; main()"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "masked_cross_attention" in done.stdout and "not implemented for this op" in done.stdout


def test_roofline_rows_at_the_640_shapes():
    rows = [r for r in roofline.rows() if r.op == "masked_cross_attention"]
    assert len(rows) == 2 * len(MASKED_ATTENTION_SHAPES)
    big = next(r for r in rows if r.dtype == "float16" and "80x80" in r.shape)
    assert big.flops == 4 * 100 * 6400 * 256
    assert big.bytes == 2 * (100 * 256 * 2 + 2 * 6400 * 256 + 100 * 6400)
    assert big.floor() == pytest.approx(big.flops / 8.1e12)  # Triton on sm_75: FMA peak even for fp16
    assert big.kernel_bytes > big.bytes
    assert "masked_cross_attention" in roofline.format_table(rows)
