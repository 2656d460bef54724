"""FPN top-down step (SPEC §4.2): every backend of `fpn_upsample_add` and `fpn_lateral_upsample_add` on every
device here (`conftest.backend_devices`: the Triton interpreter on CPU, the compiled kernels and the CUDA
extension on CUDA) against the reference with the shared oracle and generators (`mf_kernels.testing`,
`mf_kernels.shapes.FpnShape`), TF32 explicitly, BN folding, the pixel decoder's fused path, and the CUDA
sources' compile check.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mf_kernels
from mf_kernels import fpn
from mf_kernels.launch import fp32_ratio
from mf_kernels.shapes import FPN_SHAPES, FpnShape
from mf_kernels.testing import assert_parity, parity, tf32_abs_dot, tf32_in_use

from conftest import backend_devices, device_params, tiny_config

REPO = Path(__file__).resolve().parents[1]
DTYPES = (torch.float32, torch.float16)
FUSED = backend_devices("triton", "cpp", "cuda")


def upsample_case(b: int, c: int, height: int, width: int, h: int, w: int) -> FpnShape:
    return FpnShape("case", "", b, c, c, height, width, h, w)


def lateral_case(b: int, cin: int, cout: int, height: int, width: int, h: int, w: int) -> FpnShape:
    return FpnShape("case", "", b, cin, cout, height, width, h, w)


# Odd sizes as the ceil-dividing backbones give them (25x37 <- 13x19), non-integer and < 1 ratios, pairs
# where PyTorch's fp32 index rule differs from exact and from fp64 arithmetic (46 <- 14, 22 <- 26), exact
# 2x, 1x1 coarse maps, channel counts that are not a multiple of any block.
UPSAMPLE_CASES = [upsample_case(1, 20, 25, 37, 13, 19), upsample_case(2, 3, 46, 22, 14, 26),
                  upsample_case(2, 130, 8, 8, 4, 4), upsample_case(1, 17, 7, 5, 3, 4), upsample_case(1, 5, 6, 9, 1, 1)]
# The lateral op: K (Cin) and N (Cout) not multiples of the GEMM blocks.
LATERAL_CASES = [lateral_case(1, 24, 20, 25, 37, 13, 19), lateral_case(2, 40, 70, 9, 11, 5, 6),
                 lateral_case(1, 16, 8, 46, 22, 14, 26)]


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------------
# Index rule and checks


def test_nearest_scale_is_pytorch_fp32_rule():
    """floor(dst * fp32(in / out)) in fp32, clamped, is exactly F.interpolate's index for every pair here."""
    for in_size in range(1, 40):
        for out_size in range(1, 90):
            dst = np.arange(out_size, dtype=np.float32)
            ours = np.minimum(np.floor(dst * np.float32(fp32_ratio(in_size, out_size))), in_size - 1)
            src = torch.arange(in_size, dtype=torch.float32).view(1, 1, 1, in_size)
            theirs = F.interpolate(src, size=(1, out_size), mode="nearest").view(-1).numpy()
            np.testing.assert_array_equal(ours, theirs, err_msg=f"{in_size} -> {out_size}")


def test_checks_name_the_problem():
    lateral, coarse = UPSAMPLE_CASES[0].upsample_inputs(torch.float32)
    with pytest.raises(ValueError, match="channel counts differ"):
        mf_kernels.fpn_upsample_add(lateral, coarse[:, :3])
    with pytest.raises(ValueError, match="dtype"):
        mf_kernels.fpn_upsample_add(lateral, coarse.half())
    x, weight, bias, coarse = LATERAL_CASES[0].lateral_inputs(torch.float32)
    with pytest.raises(ValueError, match=r"\[Cout, Cin\]"):
        mf_kernels.fpn_lateral_upsample_add(x, weight[:, :, None, None], bias, coarse)
    with pytest.raises(ValueError, match="bias"):
        mf_kernels.fpn_lateral_upsample_add(x, weight, bias[:-1], coarse)


# ----------------------------------------------------------------------------------------------------
# fpn_upsample_add: every backend is bit-exact (one add, one rounding, same source pixel)


@pytest.mark.parametrize("backend,device", FUSED)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_upsample_add_parity(backend, device, dtype, require_backend):
    require_backend(backend)
    with mf_kernels.use(backend):
        for case in UPSAMPLE_CASES:
            lateral, coarse = case.upsample_inputs(dtype, device, generator())
            expected = fpn.fpn_upsample_add_ref(lateral, coarse)
            assert torch.equal(mf_kernels.fpn_upsample_add(lateral, coarse), expected), case


@pytest.mark.parametrize("backend,device", FUSED)
def test_upsample_add_layouts(backend, device, require_backend):
    """channels_last, mixed layouts, a view whose rows are not dense, a channel slice: any strides."""
    require_backend(backend)
    lateral, coarse = upsample_case(2, 20, 25, 37, 13, 19).upsample_inputs(torch.float16, device, generator(1))
    expected = fpn.fpn_upsample_add_ref(lateral, coarse)
    cl = torch.channels_last
    wide = torch.zeros(2, 40, 25, 74, dtype=lateral.dtype, device=device)
    wide[:, ::2, :, ::2] = lateral  # lateral as a strided view: channel stride 2 * H * W, column stride 2
    variants = {
        "channels_last": (lateral.contiguous(memory_format=cl), coarse.contiguous(memory_format=cl)),
        "mixed": (lateral.contiguous(memory_format=cl), coarse),
        "strided view": (wide[:, ::2, :, ::2], coarse),
        "channel slice": (torch.cat([lateral, lateral], 1)[:, 20:], coarse),
    }
    with mf_kernels.use(backend):
        for name, (lat, co) in variants.items():
            out = mf_kernels.fpn_upsample_add(lat, co)
            assert torch.equal(out, expected), name


@pytest.mark.parametrize("backend,device", FUSED)
def test_upsample_add_backward_matches_reference(backend, device, require_backend):
    """The fused upsample-add also runs in training (reference pixel-decoder path): exact gradients."""
    require_backend(backend)
    lateral, coarse = upsample_case(2, 5, 25, 37, 13, 19).upsample_inputs(torch.float32, device, generator(7))
    upstream = torch.randn(lateral.shape, generator=generator(8)).to(device)
    grads = []
    for choice in ("reference", backend):
        lat, co = lateral.clone().requires_grad_(), coarse.clone().requires_grad_()
        with mf_kernels.use(choice):
            out = mf_kernels.fpn_upsample_add(lat, co)
        (out * upstream).sum().backward()
        grads.append((lat.grad, co.grad))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=0, atol=0)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-6, atol=1e-5)


def test_fused_lateral_refuses_gradients_with_a_reason():
    x, weight, bias, coarse = LATERAL_CASES[0].lateral_inputs(torch.float32)
    with mf_kernels.use("triton"), pytest.raises(mf_kernels.NotSupportedError, match="inference-only"):
        mf_kernels.fpn_lateral_upsample_add(x, weight.requires_grad_(), bias, coarse)


@pytest.mark.parametrize("device", device_params("triton"))
def test_upsample_add_triton_in_place_and_configs(device):
    from mf_kernels import fpn_triton

    lateral, coarse = upsample_case(1, 20, 25, 37, 13, 19).upsample_inputs(torch.float32, device, generator(2))
    expected = fpn.fpn_upsample_add_ref(lateral, coarse)
    for cfg in (fpn_triton.UPSAMPLE_PIXELS_INNER, fpn_triton.UPSAMPLE_CHANNELS_INNER):
        assert torch.equal(fpn_triton.fpn_upsample_add_triton(lateral, coarse, config=cfg), expected)
    inplace = lateral.clone()
    assert fpn_triton.fpn_upsample_add_triton(inplace, coarse, out=inplace) is inplace
    assert torch.equal(inplace, expected)


# ----------------------------------------------------------------------------------------------------
# fpn_lateral_upsample_add: the shared oracle; fp32 dots in TF32 (cuDNN, the Triton GEMM on sm_80+) get
# the TF32 bound, which says how large TF32's error may be


def _check_lateral(out, x, weight, bias, coarse):
    tf32 = tf32_abs_dot(x, weight) if x.dtype == torch.float32 and tf32_in_use(x.device) else None
    assert_parity(out, fpn.fpn_lateral_upsample_add_ref, x, weight, bias, coarse, tf32_abs_dot=tf32)


@pytest.mark.parametrize("backend,device", FUSED)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lateral_upsample_add_parity(backend, device, dtype, require_backend):
    require_backend(backend)
    with mf_kernels.use(backend):
        for case in LATERAL_CASES:
            x, weight, bias, coarse = case.lateral_inputs(dtype, device, generator())
            _check_lateral(mf_kernels.fpn_lateral_upsample_add(x, weight, bias, coarse), x, weight, bias, coarse)
        x, weight, bias, coarse = LATERAL_CASES[0].lateral_inputs(dtype, device, generator(3))
        cl = x.contiguous(memory_format=torch.channels_last)
        _check_lateral(mf_kernels.fpn_lateral_upsample_add(cl, weight, bias, coarse), x, weight, bias, coarse)


@pytest.mark.parametrize("backend,device", FUSED)
def test_lateral_upsample_add_strided_weight_and_bias(backend, device, require_backend):
    """weight and bias as strided views (every other column / element of a larger tensor): the kernels take
    their strides, so they neither read the neighbours nor past the end of the bias."""
    require_backend(backend)
    x, weight, bias, coarse = LATERAL_CASES[1].lateral_inputs(torch.float32, device, generator(8))
    wide_weight = torch.stack([weight, torch.full_like(weight, 1e4)], dim=2).flatten(1)  # [Cout, 2 Cin]
    wide_bias = torch.stack([bias, torch.full_like(bias, 1e4)], dim=1).flatten()  # [2 Cout]
    strided_weight, strided_bias = wide_weight[:, ::2], wide_bias[::2]
    assert strided_bias.stride(0) == 2 and torch.equal(strided_bias, bias) and torch.equal(strided_weight, weight)
    with mf_kernels.use(backend):
        out = mf_kernels.fpn_lateral_upsample_add(x, strided_weight, strided_bias, coarse)
    _check_lateral(out, x, weight, bias, coarse)


@pytest.mark.parametrize("device", device_params("triton"))
@pytest.mark.parametrize("arch", [75, 80])
def test_lateral_triton_gemm_configs(arch, device):
    """Every GEMM tile the launcher can pick on sm_75 and sm_80+ (interpreted on CPU, compiled on CUDA),
    fp16 and fp32, plus the sm_75 "conv + add" path, on odd K / N / pixel counts."""
    from mf_kernels import fpn_triton

    for dtype in DTYPES:
        x, weight, bias, coarse = lateral_case(2, 40, 70, 9, 11, 5, 6).lateral_inputs(dtype, device, generator(4))
        for cfg in fpn_triton.gemm_configs(arch, dtype):
            out = fpn_triton.fpn_lateral_upsample_add_triton(x, weight, bias, coarse, path="gemm", config=cfg)
            _check_lateral(out, x, weight, bias, coarse)
        if arch == 75:
            out = fpn_triton.fpn_lateral_upsample_add_triton(x, weight, bias, coarse, path="conv+add")
            _check_lateral(out, x, weight, bias, coarse)


def round_to_tf32(t: torch.Tensor) -> torch.Tensor:
    """fp32 -> the nearest TF32 value (10 mantissa bits, ties away from zero, as cvt.rna.tf32.f32)."""
    bits = t.float().contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def test_tf32_tolerance_bounds_tf32_dots_and_is_needed():
    """The oracle's TF32 term on what a GPU would compute (operands rounded to TF32, exact products): the
    real lateral shape (K = 256) passes with it, and fails the plain fp32 tolerance (so it is not slack)."""
    res2 = next(s for s in FPN_SHAPES if s.level == "res2")
    shape = lateral_case(1, res2.cin, res2.cout, 12, 13, 6, 7)
    x, weight, bias, coarse = shape.lateral_inputs(torch.float32, "cpu", generator(9))
    tf32_out = fpn.fpn_lateral_upsample_add_ref(round_to_tf32(x).double(), round_to_tf32(weight).double(),
                                                bias.double(), coarse.double()).float()
    with_bound = parity(tf32_out, fpn.fpn_lateral_upsample_add_ref, x, weight, bias, coarse,
                        tf32_abs_dot=tf32_abs_dot(x, weight))
    assert with_bound.ok and with_bound.tf32 and "TF32" in str(with_bound), with_bound
    assert not parity(tf32_out, fpn.fpn_lateral_upsample_add_ref, x, weight, bias, coarse).ok


# ----------------------------------------------------------------------------------------------------
# BN folding and the pixel decoder


def _random_adapter(cin=12, cout=10, seed=5):
    from fai_mf.modeling.pixel_decoder import ConvNorm

    torch.manual_seed(seed)
    adapter = ConvNorm(cin, cout, 1, relu=False)
    with torch.no_grad():
        adapter.norm.weight.uniform_(0.5, 2.0)
        adapter.norm.bias.normal_()
        adapter.norm.running_mean.normal_()
        adapter.norm.running_var.uniform_(0.2, 3.0)
    return adapter.eval()


def test_bn_folding_equals_conv_bn_in_eval():
    adapter = _random_adapter()
    x = torch.randn(2, 12, 9, 7)
    weight, bias = adapter.folded_1x1()
    assert weight.shape == (10, 12) and bias.shape == (10,) and weight.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(F.conv2d(x, weight[:, :, None, None], bias), adapter(x), rtol=1e-5, atol=1e-5)


def test_folded_weights_are_cached_and_follow_parameter_changes():
    adapter = _random_adapter()
    first = adapter.folded_1x1()
    assert adapter.folded_1x1()[0] is first[0]  # cached
    with torch.no_grad():
        adapter.norm.running_var.mul_(4.0)  # in place: bumps the version counter
    second = adapter.folded_1x1()
    assert second[0] is not first[0]
    torch.testing.assert_close(second[0], first[0] / 2)
    adapter.load_state_dict(_random_adapter(seed=6).state_dict())
    third = adapter.folded_1x1()
    torch.testing.assert_close(third[0], _random_adapter(seed=6).folded_1x1()[0])
    assert "_folded_1x1" not in adapter.state_dict()


def test_adapter_keeps_reference_path_in_training_and_with_autograd(monkeypatch):
    adapter = _random_adapter()
    calls = []
    monkeypatch.setattr(mf_kernels, "fpn_lateral_upsample_add", lambda *a: calls.append(a))
    x, coarse = torch.randn(1, 12, 6, 6), torch.randn(1, 10, 3, 3)
    out = adapter.lateral_upsample_add(x, coarse)  # grad enabled, parameters require grad
    assert out.requires_grad and not calls
    adapter.train()
    with torch.no_grad():
        adapter.lateral_upsample_add(x, coarse)
    assert not calls
    adapter.eval()
    with torch.no_grad(), mf_kernels.use("reference"):
        adapter.lateral_upsample_add(x, coarse)
    assert not calls
    with torch.no_grad():
        adapter.lateral_upsample_add(x, coarse)
    assert len(calls) == 1


def _pixel_decoder_outputs(backend: str, decoder, images):
    with torch.inference_mode(), mf_kernels.use(backend):
        mask_features, multi_scale = decoder(images)
    return [mask_features] + multi_scale


@pytest.mark.parametrize("backend,device", FUSED + [pytest.param("auto", "cpu", id="auto-cpu")])
def test_pixel_decoder_fused_path_matches_reference(backend, device, require_backend, no_tf32):
    """The fused model path (BN folding, the fused lateral op) vs the unfused reference model; on CUDA
    both run without TF32 (`no_tf32`), so they differ by fp32 rounding only."""
    from fai_mf.modeling.pixel_decoder import PixelDecoder

    require_backend(backend)
    torch.manual_seed(0)
    decoder = PixelDecoder(tiny_config()).eval()
    for k in (1, 2, 3):  # non-trivial BN statistics, so folding matters
        norm = getattr(decoder, f"adapter_{k}").norm
        with torch.no_grad():
            norm.running_mean.normal_(0, 0.5)
            norm.running_var.uniform_(0.5, 2.0)
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_(0, 0.5)
    decoder.to(device)
    images = torch.randn(1, 3, 100, 76).to(device)  # odd sizes: every top-down step has a non-2x ratio
    expected = _pixel_decoder_outputs("reference", decoder, images)
    got = _pixel_decoder_outputs(backend, decoder, images)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4 * e.abs().max().item())


def test_pixel_decoder_reference_is_the_unfused_model():
    """kernels="reference" computes conv + BN + interpolate + add exactly as written in the spec."""
    from fai_mf.modeling.pixel_decoder import PixelDecoder

    torch.manual_seed(1)
    decoder = PixelDecoder(tiny_config()).eval()
    features = {name: torch.randn(1, s.channels, -(-64 // s.stride), -(-48 // s.stride))
                for name, s in decoder.backbone.output_shape().items()}
    with torch.inference_mode(), mf_kernels.use("reference"):
        _, multi_scale = decoder.forward_features(features)
        y = decoder.layer_4(features["res5"])
        for k, name in ((3, "res4"), (2, "res3")):
            lateral = getattr(decoder, f"adapter_{k}")(features[name])
            y = getattr(decoder, f"layer_{k}")(lateral + F.interpolate(y, size=lateral.shape[-2:], mode="nearest"))
            assert torch.equal(multi_scale[4 - k], y)


# ----------------------------------------------------------------------------------------------------
# Registration, roofline, AOT specs


def test_registered_backends_and_t4_decision():
    for op in (fpn.fpn_upsample_add, fpn.fpn_lateral_upsample_add):
        assert set(op.implementations) == {"reference", "triton", "cpp", "cuda"}
        assert all(impl.description for impl in op.implementations.values())
    decision = fpn.t4_decision()
    floors = fpn.t4_lateral_floors([s for s in FPN_SHAPES if s.model == "fai-mf-s-coco-ins"])
    assert floors["wmma-fused"] < floors["cudnn+add"] < floors["triton-fma"]  # what the decision rests on
    assert "WMMA" in decision and "us" in decision
    assert "WMMA" in fpn.fpn_lateral_upsample_add.implementations["cuda"].description


@pytest.mark.parametrize("capability,dtype,preferred", [((7, 5), torch.float16, True), ((7, 5), torch.float32, False),
                                                        ((8, 0), torch.float16, False)])
def test_auto_on_t4_prefers_the_wmma_kernel_for_the_fp16_lateral_op(monkeypatch, capability, dtype, preferred):
    """No GPU here: fake a device of `capability` and ask the op's auto order. sm_75 fp16 walks cuda first
    (an order, not a refusal: triton still accepts the inputs, and is next)."""
    from mf_kernels import info

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    op = fpn.fpn_lateral_upsample_add
    inputs = mf_kernels.dispatch.make_inputs("cuda", dtype, too_large=False, grad=False)
    order = op.auto_order(inputs)
    assert (order[:2] == ("cuda", "triton")) == preferred
    assert order == mf_kernels.dispatch.AUTO_ORDER["cuda"] or preferred
    assert "triton" in order and op.implementations["triton"].check(inputs) == []
    report = "\n".join(info.auto_preferences())
    assert "fpn_lateral_upsample_add, cuda float16 below sm_80: cuda > triton" in report and "WMMA" in report


def test_roofline_rows_at_the_model_shapes():
    from mf_kernels import roofline

    res2 = next(s for s in FPN_SHAPES if s.model == "fai-mf-s-coco-ins" and s.level == "res2")
    paths = fpn.lateral_traffic(res2, itemsize=2)
    assert paths["fused"][1] >= 2 * 160 * 160 * 256 * 128
    assert paths["conv+add"][0] - paths["fused"][0] == 2 * 160 * 160 * 128 * 2  # the lateral map's round trip
    rows = [r for r in roofline.rows() if r.op.startswith("fpn_")]
    assert len(rows) == 2 * len(FPN_SHAPES) * 3  # 2 dtypes x shapes x (upsample-add, fused GEMM, conv+add)
    assert all(r.bytes > 0 and r.flops > 0 and r.floor() > 0 for r in rows)


AOT_SPECS_SCRIPT = """
import json
from mf_kernels.fpn_triton import aot_specs
print(json.dumps({arch: [[s.kernel, s.dtype, s.constexprs.get("BLOCK_M"), s.constexprs.get("BLOCK_N"),
                          s.constexprs.get("BLOCK_K"), s.num_stages] for s in aot_specs(arch)] for arch in (75, 80, 90)}))
"""


def test_aot_specs_cover_both_kernels_within_t4_limits():
    """The specs `python -m mf_kernels.aot` compiles (built in a process without the interpreter; the
    compile itself is the CI's `python -m mf_kernels.aot --arch 75,80,90`)."""
    import json
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", AOT_SPECS_SCRIPT], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=120)
    assert run.returncode == 0, run.stderr
    specs = json.loads(run.stdout.strip().splitlines()[-1])
    for arch, rows in specs.items():
        assert {r[0] for r in rows} == {"fpn_upsample_add_kernel", "fpn_lateral_upsample_add_kernel"}, arch
        assert {r[1] for r in rows} == {"fp16", "fp32"}
    for kernel, dtype, bm, bn, bk, stages in specs["75"]:
        if kernel == "fpn_lateral_upsample_add_kernel":  # A + B tiles per stage within the T4's 64 KB
            assert (bm + bn) * bk * (4 if dtype == "fp32" else 2) * max(1, stages) <= 64 * 1024
