// FPN top-down step (SPEC §4.2): what the CPU (fpn.cpp) and CUDA (fpn_cuda.cu) kernels share. Torch-free on
// purpose: fpn_cuda.cu includes it and is compiled by plain nvcc (CI builds it for sm_75/80/90 with no torch);
// the CUDA launchers take raw pointers and the stream as an integer so that cuda_bindings.cpp can call
// them from a CUDA torch.
//
// Conventions:
// - every 4-D map is addressed as [B, C, P] pixels p = y * W + x with (batch, channel, pixel) strides in
//   elements; that holds for NCHW (pixel stride 1) and channels_last (channel stride 1) whenever the rows
//   are dense (stride_h == W * stride_w). The bindings copy other views first. `coarse` is only gathered,
//   so it keeps full (batch, channel, row, column) strides.
// - nearest index rule of PyTorch's F.interpolate(mode="nearest", size=(H, W)):
//   scale = (float)in / (float)out, src = min(floor(dst * scale), in - 1), the product in fp32.
//   The host computes the scale (`mf_nearest_scale`), kernels call `mf_nearest_src`.
// - sums are computed in fp32 and rounded once to the tensor dtype, as PyTorch's fp16 add does.
#pragma once

#include <stddef.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define MF_FPN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#include <math.h>
#define MF_FPN_HOST_DEVICE inline
#endif

MF_FPN_HOST_DEVICE float mf_nearest_scale(int64_t in_size, int64_t out_size) {
  return (float)in_size / (float)out_size;
}

MF_FPN_HOST_DEVICE int64_t mf_nearest_src(int64_t dst, float scale, int64_t in_size) {
  const int64_t src = (int64_t)floorf((float)dst * scale);
  return src < in_size - 1 ? src : in_size - 1;
}

// ------------------------------------------------------------------------------------------------
// CUDA launchers (fpn_cuda.cu). Device pointers; strides in elements; `stream` is a cudaStream_t cast to
// intptr_t (0 = the legacy default stream). Each returns the cudaError_t of its launch as an int
// (0 = cudaSuccess) and does not synchronise. Sizes must keep B * C * H * W below 2^31.
// ------------------------------------------------------------------------------------------------
#ifdef __cplusplus
extern "C" {
#endif

enum MfFpnDtype { MF_FPN_F32 = 0, MF_FPN_F16 = 1 };

// out [B, C, P] = lateral [B, C, P] + nearest_upsample(coarse [B, C, h, w]) with P = H * W.
// `out` may equal `lateral` (in place); it must not overlap `coarse`.
int mf_fpn_upsample_add(int dtype, const void* lateral, const void* coarse, void* out, int64_t B, int64_t C,
                        int64_t H, int64_t W, int64_t h, int64_t w, int64_t lateral_sb, int64_t lateral_sc,
                        int64_t lateral_sp, int64_t coarse_sb, int64_t coarse_sc, int64_t coarse_sh,
                        int64_t coarse_sw, int64_t out_sb, int64_t out_sc, int64_t out_sp, intptr_t stream);

// fp16 tensor-core GEMM (WMMA 16x16x16, fp32 accumulate) with the upsample-add in its epilogue:
// out [B, N, P] = x [B, K, P]^T-per-pixel · weight [N, K]^T + bias [N] + nearest_upsample(coarse [B, N, h, w]).
// weight: contiguous row-major [N, K] fp16; bias: contiguous fp32 [N]; x, coarse, out: fp16 with strides.
int mf_fpn_lateral_upsample_add_f16(const void* x, const void* weight, const float* bias, const void* coarse,
                                    void* out, int64_t B, int64_t K, int64_t N, int64_t H, int64_t W, int64_t h,
                                    int64_t w, int64_t x_sb, int64_t x_sk, int64_t x_sp, int64_t coarse_sb,
                                    int64_t coarse_sn, int64_t coarse_sh, int64_t coarse_sw, int64_t out_sb,
                                    int64_t out_sn, int64_t out_sp, intptr_t stream);

#ifdef __cplusplus
}
#endif
