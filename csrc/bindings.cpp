// The one registration file of the extension mf_kernels._C (pybind11, through torch/extension.h).
//
// pybind11 rather than TORCH_LIBRARY: the post-processing returns lists of tensors and Python bytes
// (RLE strings, PNG files), which pybind11 converts directly; none of these ops needs autograd, the
// dispatcher or torch.compile tracing. Every entry point is declared in ops.h; CUDA ones exist only when
// the build defines MF_WITH_CUDA (a CUDA torch). Python never calls this module directly: it goes through
// mf_kernels._cpp_lib, which loads it, checks `build_info` and reports failures.
#include <torch/extension.h>
#include <torch/version.h>

#include <cstdio>

#include "ops.h"

// Set by mf_kernels/build.py as plain numbers (no quoting games through ninja and the shell):
// MF_SOURCES_HASH = the first 64 bits of the sha256 of csrc/ (hex literal), MF_BUILD_KIND = 1 setup.py, 2 JIT.
#ifndef MF_SOURCES_HASH
#define MF_SOURCES_HASH 0ULL
#endif
#ifndef MF_BUILD_KIND
#define MF_BUILD_KIND 0
#endif

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "FAI-MF C++/CUDA kernels (mask post-processing, FPN); load through mf_kernels._cpp_lib";

  py::dict info;
  char hash[17];
  std::snprintf(hash, sizeof(hash), "%016llx", (unsigned long long)(MF_SOURCES_HASH));
  info["torch_version"] = TORCH_VERSION;  // of the headers this was compiled against
  info["sources_hash"] = std::string(hash);
  info["build_kind"] = MF_BUILD_KIND == 1 ? "setup.py" : (MF_BUILD_KIND == 2 ? "jit" : "unknown");
#ifdef MF_WITH_CUDA
  info["with_cuda"] = true;
#else
  info["with_cuda"] = false;
#endif
  info["with_zlib"] = mf::png_uses_zlib();
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
#ifdef __VERSION__
  info["compiler"] = __VERSION__;
#endif
  m.attr("build_info") = info;

  // ---- mask post-processing, CPU (postprocess.cpp) ----
  m.def("mask_stats", &mf::mask_stats_cpu, "threshold-mode stats/RLE counts/crops of [K, h, w] logits",
        py::arg("logits"), py::arg("H"), py::arg("W"), py::arg("thr"), py::arg("strict"), py::arg("want_rle"),
        py::arg("want_crops"));
  m.def("owner_stats", &mf::owner_stats_cpu, "predict_all_pixels stats of the given queries", py::arg("logits"),
        py::arg("scores"), py::arg("queries"), py::arg("H"), py::arg("W"), py::arg("want_rle"),
        py::arg("want_crops"));
  m.def("semantic_label_map", &mf::semantic_label_map_cpu, "int64 [H, W] semantic argmax", py::arg("logits"),
        py::arg("class_probs"), py::arg("H"), py::arg("W"));
  m.def("rle_counts_from_bits", &mf::rle_counts_from_bits, "RLE counts of bit masks inside their boxes",
        py::arg("bits"), py::arg("boxes"), py::arg("W"));
  m.def("crops_from_bits", &mf::crops_from_bits, "bool bbox crops of bit masks", py::arg("bits"), py::arg("boxes"),
        py::arg("W"));

  // ---- host encoders (encode.cpp) ----
  m.def(
      "rle_string", [](const at::Tensor& counts) { return py::bytes(mf::rle_string(counts)); },
      "COCO compressed RLE string (bytes) of int64 run lengths", py::arg("counts"));
  m.def(
      "rle_strings",
      [](const std::vector<at::Tensor>& counts) {
        py::list out;
        for (const auto& c : counts) out.append(py::bytes(mf::rle_string(c)));
        return out;
      },
      "rle_string of each tensor of a list", py::arg("counts"));
  m.def(
      "png_encode", [](const at::Tensor& mask) { return py::bytes(mf::png_encode(mask)); },
      "8-bit grayscale PNG (bytes) of a bool/uint8 [h, w] mask", py::arg("mask"));
  m.def(
      "png_encode_many",
      [](const std::vector<at::Tensor>& masks) {
        py::list out;
        for (const auto& mask : masks) out.append(py::bytes(mf::png_encode(mask)));
        return out;
      },
      "png_encode of each mask of a list", py::arg("masks"));

  // ---- FPN (fpn.cpp) ----
  m.def("fpn_upsample_add", &mf::fpn_upsample_add_cpu, "lateral + nearest_upsample(coarse) on CPU tensors",
        py::arg("lateral"), py::arg("coarse"), py::arg("out") = py::none());

#ifdef MF_WITH_CUDA
  // ---- CUDA (cuda_bindings.cpp over postprocess.cu / fpn*.cu) ----
  m.def("mask_stats_cuda", &mf::mask_stats_cuda, py::arg("logits"), py::arg("H"), py::arg("W"), py::arg("thr"),
        py::arg("strict"), py::arg("want_bits"));
  m.def("owner_stats_cuda", &mf::owner_stats_cuda, py::arg("logits"), py::arg("scores"), py::arg("queries"),
        py::arg("H"), py::arg("W"), py::arg("want_bits"));
  m.def("semantic_label_map_cuda", &mf::semantic_label_map_cuda, py::arg("logits"), py::arg("class_probs"),
        py::arg("H"), py::arg("W"));
  m.def("fpn_upsample_add_cuda", &mf::fpn_upsample_add_cuda, py::arg("lateral"), py::arg("coarse"),
        py::arg("out") = py::none());
  m.def("fpn_lateral_upsample_add_cuda", &mf::fpn_lateral_upsample_add_cuda, py::arg("x"), py::arg("weight"),
        py::arg("bias"), py::arg("coarse"));
#endif
}
