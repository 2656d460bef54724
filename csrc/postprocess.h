// Mask post-processing (SPEC §4.3): what the CPU (postprocess.cpp) and CUDA (postprocess_cuda.cu) kernels
// share. This header is torch-free on purpose: postprocess_cuda.cu includes it and is compiled by plain nvcc
// (CI builds it for sm_75/80/90 with no torch), and the CUDA launchers below take raw pointers and the
// stream as an integer so that a thin C++ file (cuda_bindings.cpp) can call them from a CUDA torch.
//
// Conventions of every kernel here:
// - mask logits / probabilities are [Q, h, w] row-major at stride 4; the output is (H, W).
// - the bilinear resize is PyTorch's F.interpolate(mode="bilinear", align_corners=False, size=(H, W)):
//   source index = max(scale * (dst + 0.5) - 0.5, 0) with scale = in / out (float), i0 = floor, clamped to
//   in - 1, i1 = i0 + (i0 < in - 1), weights (1 - l, l). `mf_linear_tap` computes exactly that, so the CPU
//   and CUDA paths use the same taps as PyTorch and differ from it only by float rounding.
// - boxes are inclusive [x1, y1, x2, y2] int32; an empty mask has [-1, -1, -1, -1].
// - bit masks are row-major [K, H, words] of uint32 (little-endian: bit b of word j is column 32 j + b),
//   `words = ceil(W / 32)`; as bytes that is numpy's packbits(bitorder="little") with rows padded to 4 bytes.
#pragma once

#include <stddef.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define MF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MF_HOST_DEVICE inline
#endif

// One output index's two source taps and weights along one axis.
struct MfLinearTap {
  int32_t i0, i1;
  float l0, l1;
};

// PyTorch's `area_pixel_compute_source_index` + `guard_index_and_lambda` for align_corners=False with
// an explicit output size (scale = in / out in float).
MF_HOST_DEVICE MfLinearTap mf_linear_tap(int32_t dst, int32_t in_size, int32_t out_size) {
  MfLinearTap tap;
  if (in_size == out_size) {  // PyTorch copies at scale 1 (one tap, weight 1)
    tap.i0 = tap.i1 = dst;
    tap.l0 = 1.f;
    tap.l1 = 0.f;
    return tap;
  }
  const float scale = (float)in_size / (float)out_size;
  float src = scale * ((float)dst + 0.5f) - 0.5f;
  if (src < 0.f) src = 0.f;
  int32_t i0 = (int32_t)src;  // src >= 0: truncation is floor
  if (i0 > in_size - 1) i0 = in_size - 1;
  float l1 = src - (float)i0;
  l1 = l1 < 0.f ? 0.f : (l1 > 1.f ? 1.f : l1);
  tap.i0 = i0;
  tap.i1 = i0 + (i0 < in_size - 1 ? 1 : 0);
  tap.l1 = l1;
  tap.l0 = 1.f - l1;
  return tap;
}

// Words of 32 columns per row of a bit mask.
MF_HOST_DEVICE int32_t mf_bit_words(int32_t width) { return (width + 31) / 32; }

// ------------------------------------------------------------------------------------------------
// CUDA launchers (postprocess_cuda.cu). Every pointer is a device pointer to a contiguous row-major buffer;
// `stream` is a cudaStream_t cast to intptr_t (0 = the legacy default stream). Each returns the
// cudaError_t of its launches as an int (0 = cudaSuccess). Nothing here synchronises.
// ------------------------------------------------------------------------------------------------
#ifdef __cplusplus
extern "C" {
#endif

enum MfLogitsDtype { MF_F32 = 0, MF_F16 = 1, MF_BF16 = 2 };

// probs[i] = sigmoid(logits[i]) in fp32, i < n. logits_dtype: MfLogitsDtype.
int mf_pp_sigmoid(const void* logits, int logits_dtype, float* probs, int64_t n, intptr_t stream);

// Bytes of scratch `mf_pp_mask_stats` needs for K queries and H rows.
size_t mf_pp_mask_stats_workspace_bytes(int32_t K, int32_t H);

// Per-query statistics of K full-size binary masks, never writing a float mask.
// Threshold mode (owner == NULL): query k's mask is bilinear(probs[k]) >= thr (> thr when strict);
//   probs: [K, h, w] fp32 sigmoid probabilities (see mf_pp_sigmoid).
// Ownership mode (owner != NULL): query k's mask is owner == queries[k]; owner: [H, W] int32 and
//   owner_prob: [H, W] fp32 (the owner's prob) from mf_pp_owner; probs, h, w, thr, strict are unused.
// Outputs: areas [K] int64, boxes [K, 4] int32, prob_sums [K] fp32 (sum of the prob inside the mask),
//   bits [K, H, mf_bit_words(W)] uint32 or NULL to skip writing the bit masks.
// workspace: mf_pp_mask_stats_workspace_bytes(K, H) bytes of device memory (reductions are two-stage,
// in a fixed order, so results are deterministic).
int mf_pp_mask_stats(const float* probs, int32_t K, int32_t h, int32_t w, int32_t H, int32_t W, float thr,
                     int strict, const int32_t* owner, const float* owner_prob, const int64_t* queries,
                     int64_t* areas, int32_t* boxes, float* prob_sums, uint32_t* bits, void* workspace,
                     intptr_t stream);

// predict_all_pixels ownership over ALL Q queries: owner[y, x] = argmax_q scores[q] * p_q(y, x) (ties to
// the lowest q; Q when every product is NaN) and owner_prob[y, x] = p_owner(y, x).
// probs: [Q, h, w] fp32; scores: [Q] fp32; owner: [H, W] int32; owner_prob: [H, W] fp32.
int mf_pp_owner(const float* probs, const float* scores, int32_t Q, int32_t h, int32_t w, int32_t H, int32_t W,
                int32_t* owner, float* owner_prob, intptr_t stream);

// Semantic label map: labels[y, x] = argmax_c bilinear(class_maps[c])(y, x), ties to the lowest c.
// class_maps: [C, h, w] fp32, the stride-4 class score maps sum_q class_probs[q, c] * sigmoid(logits[q]).
// labels: [H, W] int64.
int mf_pp_semantic_argmax(const float* class_maps, int32_t C, int32_t h, int32_t w, int32_t H, int32_t W,
                          int64_t* labels, intptr_t stream);

#ifdef __cplusplus
}
#endif
