"""The extension mf_kernels._C: how it is built and loaded (`mf_kernels._cpp_lib`, `mf_kernels.build`),
its typed errors, and the host-side entry points the ops' tests do not reach directly.

The real extension is built (or loaded) once per session by the `extension` fixture; the error tests
swap `_cpp_lib`'s cached state and restore it afterwards, so they never rebuild anything.
"""
from __future__ import annotations

import sys
import types

import pytest
import torch

from mf_kernels import _cpp_lib, build


@pytest.fixture
def fresh_loader(monkeypatch, extension):
    """An empty `_cpp_lib` cache for one test; the real loaded module is put back afterwards."""
    saved = (_cpp_lib._module, _cpp_lib._error, _cpp_lib._loaded_from, list(_cpp_lib._notes))
    _cpp_lib.reset_for_tests()
    yield
    _cpp_lib._module, _cpp_lib._error, _cpp_lib._loaded_from = saved[:3]
    _cpp_lib._notes[:] = saved[3]


def test_build_info_matches_this_torch_and_these_sources(extension):
    info = dict(extension.build_info)
    assert info["torch_version"] == torch.__version__.split("+")[0]
    assert info["sources_hash"] == build.sources_hash(info["with_cuda"])
    assert info["with_cuda"] is (torch.version.cuda is not None and build.nvcc_available())
    assert info["with_zlib"] is build.zlib_available()
    if sys.platform.startswith("linux"):
        assert info["openmp"] is True, "built without -fopenmp: at::parallel_for would run serially"
    assert _cpp_lib.status().startswith("loaded from")
    assert _cpp_lib.unavailable_reasons("cpu") == []


def test_every_entry_point_is_bound(extension):
    for name in ("mask_stats", "owner_stats", "semantic_label_map", "rle_counts_from_bits", "crops_from_bits",
                 "rle_string", "rle_strings", "png_encode", "png_encode_many", "fpn_upsample_add"):
        assert hasattr(extension, name), name
    cuda_names = ("mask_stats_cuda", "owner_stats_cuda", "semantic_label_map_cuda", "fpn_upsample_add_cuda",
                  "fpn_lateral_upsample_add_cuda")
    assert all(hasattr(extension, n) for n in cuda_names) is bool(extension.build_info["with_cuda"])
    if not extension.build_info["with_cuda"]:
        assert "without CUDA" in _cpp_lib.unavailable_reasons("cuda")[0]


def test_sources_split_cpu_and_cuda():
    cpu = [p.rsplit("/", 1)[-1] for p in build.cpu_sources()]
    cuda = [p.rsplit("/", 1)[-1] for p in build.cuda_sources()]
    assert "bindings.cpp" in cpu and "postprocess.cpp" in cpu and "encode.cpp" in cpu
    assert "postprocess_cuda.cu" in cuda and "cuda_bindings.cpp" in cuda
    assert not set(cpu) & set(cuda)


def test_rle_from_bits_and_crops_from_bits(extension):
    """The host side of the GPU backends, on bit masks built here from known masks."""
    from mf_kernels.postprocess.bits import bits_row_bytes
    from mf_kernels.postprocess.reference import boxes_of_masks, crop_to_box, rle_counts_ref

    gen = torch.Generator().manual_seed(0)
    height, width = 19, 45  # two 32-bit words per row, the second partly used
    masks = torch.rand(6, height, width, generator=gen) > 0.7
    masks[0] = False
    masks[1] = True
    masks[2] = False
    masks[2, 0, :] = True  # box spans full columns' first row: runs continue across columns
    masks[3] = False
    masks[3, :, 44] = True  # last column, every row
    padded = torch.zeros(6, height, bits_row_bytes(width) * 8, dtype=torch.uint8)
    padded[..., :width] = masks.to(torch.uint8)
    weights = (2 ** torch.arange(8, dtype=torch.int32))
    bits = (padded.reshape(6, height, -1, 8).int() * weights).sum(-1).to(torch.uint8).contiguous()
    boxes = boxes_of_masks(masks)
    counts = extension.rle_counts_from_bits(bits, boxes, width)
    crops = extension.crops_from_bits(bits, boxes, width)
    for k in range(6):
        assert torch.equal(counts[k], rle_counts_ref(masks[k])), k
        assert torch.equal(crops[k], crop_to_box(masks[k], boxes[k])), k


def test_rle_string_rejects_negative_counts(extension):
    with pytest.raises(RuntimeError, match="non-negative"):
        extension.rle_string(torch.tensor([3, -1, 2]))


def test_cpp_checks_name_the_problem(extension):
    with pytest.raises(RuntimeError, match=r"mask_logits must be \[Q, h, w\]"):
        extension.mask_stats(torch.zeros(4, 4), 8, 8, 0.5, False, False, False)
    with pytest.raises(RuntimeError, match="query index 5 out of"):
        extension.owner_stats(torch.zeros(2, 4, 4), torch.ones(2), torch.tensor([5]), 8, 8, False, False)


def test_disabled_by_environment(fresh_loader, monkeypatch):
    monkeypatch.setenv("MF_KERNELS_EXT", "0")
    with pytest.raises(_cpp_lib.ExtensionDisabledError):
        _cpp_lib.load()
    with pytest.raises(_cpp_lib.ExtensionDisabledError):  # cached: not tried again
        _cpp_lib.load()
    assert "MF_KERNELS_EXT" in _cpp_lib.unavailable_reasons()[0]
    assert _cpp_lib.status().startswith("unavailable (ExtensionDisabledError)")
    assert not _cpp_lib.has_cuda()


def test_missing_compiler(fresh_loader, monkeypatch):
    monkeypatch.setattr(_cpp_lib, "_load_prebuilt", lambda: None)
    monkeypatch.setattr(build, "compiler_available", lambda: None)
    with pytest.raises(_cpp_lib.MissingCompilerError, match="no C\\+\\+ compiler"):
        _cpp_lib.load()


def test_jit_disabled_without_prebuilt(fresh_loader, monkeypatch):
    monkeypatch.setattr(_cpp_lib, "_load_prebuilt", lambda: None)
    monkeypatch.setenv("MF_KERNELS_JIT", "0")
    with pytest.raises(_cpp_lib.MissingCompilerError, match="MF_KERNELS_JIT=0"):
        _cpp_lib.load()


def test_build_failure_reports_the_first_error_lines(fresh_loader, monkeypatch):
    log = "\n".join([f"[{i}/4] c++ -c file{i}.cpp" for i in range(3)]
                    + ["csrc/encode.cpp:12:5: error: 'foo' was not declared in this scope", "   12 |   foo();",
                       "ninja: build stopped: subcommand failed."])

    def failing_build(verbose=False):
        raise RuntimeError("Error building extension 'mf_kernels_C':\n" + log)

    monkeypatch.setattr(_cpp_lib, "_load_prebuilt", lambda: None)
    monkeypatch.setattr(build, "jit_build", failing_build)
    with pytest.raises(_cpp_lib.BuildFailedError) as info:
        _cpp_lib.load()
    assert "error: 'foo' was not declared" in info.value.log_head
    assert info.value.log_head.splitlines()[0].startswith("[1/4]")  # two lines of context before the error


def test_stale_builds_are_refused_with_the_reason(fresh_loader, monkeypatch):
    old_torch = types.SimpleNamespace(build_info={"torch_version": "1.13.1", "sources_hash": build.sources_hash()})
    with pytest.raises(_cpp_lib.StaleBuildError, match="built for torch 1.13.1"):
        _cpp_lib._check_build_info(old_torch, "test module")
    old_sources = types.SimpleNamespace(build_info={"torch_version": torch.__version__, "sources_hash": "0" * 16})
    with pytest.raises(_cpp_lib.StaleBuildError, match="other sources"):
        _cpp_lib._check_build_info(old_sources, "test module")

    def stale_prebuilt():
        raise _cpp_lib.StaleBuildError("mf_kernels._C (setup.py build) was built for torch 1.13.1")

    monkeypatch.setattr(_cpp_lib, "_load_prebuilt", stale_prebuilt)
    monkeypatch.setenv("MF_KERNELS_JIT", "0")
    with pytest.raises(_cpp_lib.MissingCompilerError, match="built for torch 1.13.1"):
        _cpp_lib.load()  # the stale build's reason is part of the final error
