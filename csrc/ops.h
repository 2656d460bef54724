// Every C++ entry point of the extension mf_kernels._C, as bindings.cpp (the one registration file)
// binds them. A source that implements one includes this header; CUDA-only entry points are declared
// under MF_WITH_CUDA, which the build defines only for a CUDA torch (cuda_bindings.cpp + *.cu).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace mf {

// (areas int64 [K], boxes int32 [K, 4], prob_sums fp32 [K], rle counts: K int64 tensors or empty,
//  crops: K bool [y2 - y1 + 1, x2 - x1 + 1] tensors (an empty mask gives [0, 0]) or empty)
using MaskStats = std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>>;

// ---- postprocess.cpp (CPU, parallel with ATen's OpenMP parallel_for) ----

// Threshold mode, one pass per query: logits [K, h, w] (fp32/fp16/bf16, any strides) of the kept queries;
// mask_k = bilinear(sigmoid(logits[k]), (H, W)) >= thr (> thr when strict).
MaskStats mask_stats_cpu(const at::Tensor& logits, int64_t H, int64_t W, double thr, bool strict, bool want_rle,
                         bool want_crops);

// Ownership mode (predict_all_pixels): logits [Q, h, w] of ALL queries, scores [Q]; mask_k is the set of
// pixels whose argmax_q scores[q] * p_q is queries[k] (ties to the lowest q). queries: int64 [K].
MaskStats owner_stats_cpu(const at::Tensor& logits, const at::Tensor& scores, const at::Tensor& queries, int64_t H,
                          int64_t W, bool want_rle, bool want_crops);

// Semantic label map int64 [H, W] = argmax_c sum_q class_probs[q, c] * bilinear(sigmoid(logits[q])).
at::Tensor semantic_label_map_cpu(const at::Tensor& logits, const at::Tensor& class_probs, int64_t H, int64_t W);

// ---- encode.cpp (host side: encoders, bit-mask decoding) ----

// Host side of the GPU paths: from bit masks uint8 [K, H, 4 * ceil(W / 32)] (layout in postprocess.h)
// and boxes int32 [K, 4] (CPU tensors) to the RLE counts / inclusive crops of each mask.
std::vector<at::Tensor> rle_counts_from_bits(const at::Tensor& bits, const at::Tensor& boxes, int64_t W);
std::vector<at::Tensor> crops_from_bits(const at::Tensor& bits, const at::Tensor& boxes, int64_t W);

// COCO compressed RLE string of run lengths (int64 [N]), byte-identical to pycocotools' rleToString.
std::string rle_string(const at::Tensor& counts);
// COCO run lengths / compressed RLE string of a dense bool/uint8 [H, W] mask (row- or column-major).
std::vector<int64_t> rle_counts_dense(const at::Tensor& mask);
std::string rle_encode(const at::Tensor& mask);
// 8-bit grayscale PNG (0 / 255) of a bool/uint8 [h, w] mask (nonzero = foreground), h, w >= 1.
std::string png_encode(const at::Tensor& mask);
// Whether png_encode compresses with zlib (else it writes stored deflate blocks).
bool png_uses_zlib();

// ---- fpn.cpp ----

// lateral [B, C, H, W] + nearest_upsample(coarse [B, C, h, w], (H, W)), PyTorch's "nearest" rule, written
// to `out` when given (it may alias lateral), else to a new tensor.
at::Tensor fpn_upsample_add_cpu(const at::Tensor& lateral, const at::Tensor& coarse,
                                const std::optional<at::Tensor>& out);

#ifdef MF_WITH_CUDA
// ---- cuda_bindings.cpp (CUDA tensors; thin wrappers over the launchers of postprocess.h) ----

// Like the CPU versions, for CUDA tensors: (areas, boxes, prob_sums) on the device and, when want_bits,
// the bit masks uint8 [K, H, 4 * ceil(W / 32)] on the device (else an empty tensor).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mask_stats_cuda(const at::Tensor& logits, int64_t H,
                                                                           int64_t W, double thr, bool strict,
                                                                           bool want_bits);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> owner_stats_cuda(const at::Tensor& logits,
                                                                            const at::Tensor& scores,
                                                                            const at::Tensor& queries, int64_t H,
                                                                            int64_t W, bool want_bits);
at::Tensor semantic_label_map_cuda(const at::Tensor& logits, const at::Tensor& class_probs, int64_t H, int64_t W);

// FPN (launchers in fpn*.cu, wrappers in cuda_bindings.cpp).
at::Tensor fpn_upsample_add_cuda(const at::Tensor& lateral, const at::Tensor& coarse,
                                 const std::optional<at::Tensor>& out);
at::Tensor fpn_lateral_upsample_add_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                         const at::Tensor& coarse);
#endif

}  // namespace mf
