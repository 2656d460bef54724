// Mask post-processing on CUDA (SPEC §4.3). Plain CUDA: no torch headers, so CI compiles it with nvcc for
// sm_75/80/90 without a CUDA torch; cuda_bindings.cpp calls the extern "C" launchers declared in
// postprocess.h. Nothing here writes a float mask at image size:
//
// - mask_stats_kernel, grid (K, row blocks), 256 threads = 8 warps: a block covers kStatsRows output
//   rows of one query (gridDim.y <= 65535, so H <= 262140: the dispatcher refuses taller images,
//   mf_kernels/postprocess/limits.py); each warp takes 32 consecutive columns at a time, so
//   `__ballot_sync` turns the 32 foreground flags into one word of the bit mask. Threshold mode
//   interpolates the fp32 sigmoid probabilities (mf_pp_sigmoid) with PyTorch's taps (mf_linear_tap);
//   ownership mode reads the owner map. Per-block partials (area, prob sum, box) go to a workspace and
//   finalize_stats_kernel reduces them per query in a fixed order: deterministic, no float atomics.
//   Queries vary fastest in the grid so the K blocks of one row block share its owner-map rows through
//   L2 in ownership mode.
// - owner_kernel: one thread per pixel, argmax over all Q queries of score * prob (ties to the lowest q).
// - semantic_argmax_kernel: one thread per pixel, argmax over C of the bilinear value of the stride-4
//   class maps (computed by a cuBLAS GEMM in cuda_bindings.cpp).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>

#include "postprocess.h"

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kStatsRows = 4;  // output rows per block: 160 blocks per query at 640 rows

struct StatsPartial {
  int area;
  float prob_sum;
  int x1, y1, x2, y2;
};

__device__ __forceinline__ float load_float(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float load_float(const __half* p, int64_t i) { return __half2float(p[i]); }
__device__ __forceinline__ float load_float(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }

template <typename T>
__global__ void sigmoid_kernel(const T* __restrict__ logits, float* __restrict__ probs, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    probs[i] = 1.f / (1.f + expf(-load_float(logits, i)));
  }
}

// PyTorch's order: l0y * (l0x * a + l1x * b) + l1y * (l0x * c + l1x * d).
__device__ __forceinline__ float bilinear(const float* __restrict__ map, int w, const MfLinearTap& ty,
                                          const MfLinearTap& tx) {
  const float* r0 = map + (int64_t)ty.i0 * w;
  const float* r1 = map + (int64_t)ty.i1 * w;
  const float top = __ldg(r0 + tx.i0) * tx.l0 + __ldg(r0 + tx.i1) * tx.l1;
  const float bottom = __ldg(r1 + tx.i0) * tx.l0 + __ldg(r1 + tx.i1) * tx.l1;
  return top * ty.l0 + bottom * ty.l1;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}
__device__ __forceinline__ int warp_min(int v) {
  for (int offset = 16; offset > 0; offset >>= 1) v = min(v, __shfl_down_sync(0xffffffffu, v, offset));
  return v;
}
__device__ __forceinline__ int warp_max(int v) {
  for (int offset = 16; offset > 0; offset >>= 1) v = max(v, __shfl_down_sync(0xffffffffu, v, offset));
  return v;
}

// Lane 0 ends with the warp's total area and prob sum and the union of its boxes.
template <typename Area>
__device__ __forceinline__ void warp_reduce_stats(Area& area, float& sum, int& x1, int& y1, int& x2, int& y2) {
  area = warp_sum(area);
  sum = warp_sum(sum);
  x1 = warp_min(x1);
  y1 = warp_min(y1);
  x2 = warp_max(x2);
  y2 = warp_max(y2);
}

// probs: [K, h, w] (threshold mode) | owner, owner_prob: [H, W], queries: [K] (ownership mode).
// bits: [K, H, words] or null. partials: [K, n_blocks].
__global__ void mask_stats_kernel(const float* __restrict__ probs, int h, int w, int H, int W, float thr, int strict,
                                  const int32_t* __restrict__ owner, const float* __restrict__ owner_prob,
                                  const int64_t* __restrict__ queries, uint32_t* __restrict__ bits,
                                  StatsPartial* __restrict__ partials, int n_blocks) {
  const int k = blockIdx.x, block = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int words = mf_bit_words(W);
  const float* map = probs ? probs + (int64_t)k * h * w : nullptr;
  const int32_t query = owner ? (int32_t)queries[k] : 0;
  int area = 0, x1 = INT_MAX, y1 = INT_MAX, x2 = -1, y2 = -1;
  float sum = 0.f;
  for (int r = 0; r < kStatsRows; ++r) {
    const int y = block * kStatsRows + r;
    if (y >= H) break;  // uniform over the block
    const MfLinearTap ty = owner ? MfLinearTap{0, 0, 1.f, 0.f} : mf_linear_tap(y, h, H);
    for (int j = warp; j < words; j += kWarps) {  // uniform over the warp: the ballot sees all 32 lanes
      const int x = 32 * j + lane;
      bool fg = false;
      float v = 0.f;
      if (x < W) {
        if (owner) {
          const int64_t pixel = (int64_t)y * W + x;
          fg = owner[pixel] == query;
          if (fg) v = owner_prob[pixel];
        } else {
          v = bilinear(map, w, ty, mf_linear_tap(x, w, W));
          fg = strict ? v > thr : v >= thr;
        }
      }
      const unsigned word = __ballot_sync(0xffffffffu, fg);
      if (bits && lane == 0) bits[((int64_t)k * H + y) * words + j] = word;
      if (fg) {
        ++area;
        sum += v;
        x1 = min(x1, x);
        x2 = max(x2, x);
        y1 = min(y1, y);
        y2 = max(y2, y);
      }
    }
  }
  warp_reduce_stats(area, sum, x1, y1, x2, y2);
  __shared__ StatsPartial per_warp[kWarps];
  if (lane == 0) per_warp[warp] = StatsPartial{area, sum, x1, y1, x2, y2};
  __syncthreads();
  if (threadIdx.x == 0) {
    StatsPartial total = per_warp[0];
    for (int i = 1; i < kWarps; ++i) {  // fixed order: deterministic
      total.area += per_warp[i].area;
      total.prob_sum += per_warp[i].prob_sum;
      total.x1 = min(total.x1, per_warp[i].x1);
      total.y1 = min(total.y1, per_warp[i].y1);
      total.x2 = max(total.x2, per_warp[i].x2);
      total.y2 = max(total.y2, per_warp[i].y2);
    }
    partials[(int64_t)k * n_blocks + block] = total;
  }
}

// One block per query: reduce its n_blocks partials in a fixed order.
__global__ void finalize_stats_kernel(const StatsPartial* __restrict__ partials, int n_blocks,
                                      int64_t* __restrict__ areas, int32_t* __restrict__ boxes,
                                      float* __restrict__ prob_sums) {
  const int k = blockIdx.x;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  long long area = 0;
  float sum = 0.f;
  int x1 = INT_MAX, y1 = INT_MAX, x2 = -1, y2 = -1;
  for (int i = threadIdx.x; i < n_blocks; i += blockDim.x) {
    const StatsPartial p = partials[(int64_t)k * n_blocks + i];
    area += p.area;
    sum += p.prob_sum;
    x1 = min(x1, p.x1);
    y1 = min(y1, p.y1);
    x2 = max(x2, p.x2);
    y2 = max(y2, p.y2);
  }
  warp_reduce_stats(area, sum, x1, y1, x2, y2);
  __shared__ long long s_area[kWarps];
  __shared__ float s_sum[kWarps];
  __shared__ int s_box[kWarps][4];
  if (lane == 0) {
    s_area[warp] = area;
    s_sum[warp] = sum;
    s_box[warp][0] = x1;
    s_box[warp][1] = y1;
    s_box[warp][2] = x2;
    s_box[warp][3] = y2;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int i = 1; i < kWarps; ++i) {
      area += s_area[i];
      sum += s_sum[i];
      x1 = min(x1, s_box[i][0]);
      y1 = min(y1, s_box[i][1]);
      x2 = max(x2, s_box[i][2]);
      y2 = max(y2, s_box[i][3]);
    }
    const bool empty = area == 0;
    areas[k] = area;
    prob_sums[k] = sum;
    boxes[4 * k + 0] = empty ? -1 : x1;
    boxes[4 * k + 1] = empty ? -1 : y1;
    boxes[4 * k + 2] = empty ? -1 : x2;
    boxes[4 * k + 3] = empty ? -1 : y2;
  }
}

__global__ void owner_kernel(const float* __restrict__ probs, const float* __restrict__ scores, int Q, int h, int w,
                             int H, int W, int32_t* __restrict__ owner, float* __restrict__ owner_prob) {
  const int64_t pixel = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (pixel >= (int64_t)H * W) return;
  const int y = (int)(pixel / W), x = (int)(pixel % W);
  const MfLinearTap ty = mf_linear_tap(y, h, H), tx = mf_linear_tap(x, w, W);
  float best = -INFINITY, best_p = 0.f;
  int best_q = Q;
  for (int q = 0; q < Q; ++q) {
    const float p = bilinear(probs + (int64_t)q * h * w, w, ty, tx);
    const float v = __ldg(scores + q) * p;
    if (v > best) {  // strict: ties keep the lowest q; NaN never wins
      best = v;
      best_q = q;
      best_p = p;
    }
  }
  owner[pixel] = best_q;
  owner_prob[pixel] = best_p;
}

__global__ void semantic_argmax_kernel(const float* __restrict__ maps, int C, int h, int w, int H, int W,
                                       int64_t* __restrict__ labels) {
  const int64_t pixel = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (pixel >= (int64_t)H * W) return;
  const int y = (int)(pixel / W), x = (int)(pixel % W);
  const MfLinearTap ty = mf_linear_tap(y, h, H), tx = mf_linear_tap(x, w, W);
  float best = bilinear(maps, w, ty, tx);
  int best_c = 0;
  for (int c = 1; c < C; ++c) {
    const float v = bilinear(maps + (int64_t)c * h * w, w, ty, tx);
    if (v > best) {  // ties keep the lowest class, as torch.argmax
      best = v;
      best_c = c;
    }
  }
  labels[pixel] = best_c;
}

int blocks_for(int64_t n) { return (int)((n + kThreads - 1) / kThreads); }

}  // namespace

extern "C" int mf_pp_sigmoid(const void* logits, int logits_dtype, float* probs, int64_t n, intptr_t stream) {
  if (n <= 0) return (int)cudaSuccess;
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const int grid = (int)(blocks_for(n) < 65535 ? blocks_for(n) : 65535);
  switch (logits_dtype) {
    case MF_F32:
      sigmoid_kernel<<<grid, kThreads, 0, s>>>(static_cast<const float*>(logits), probs, n);
      break;
    case MF_F16:
      sigmoid_kernel<<<grid, kThreads, 0, s>>>(static_cast<const __half*>(logits), probs, n);
      break;
    case MF_BF16:
      sigmoid_kernel<<<grid, kThreads, 0, s>>>(static_cast<const __nv_bfloat16*>(logits), probs, n);
      break;
    default:
      return (int)cudaErrorInvalidValue;
  }
  return (int)cudaGetLastError();
}

extern "C" size_t mf_pp_mask_stats_workspace_bytes(int32_t K, int32_t H) {
  const int n_blocks = (H + kStatsRows - 1) / kStatsRows;
  return (size_t)K * n_blocks * sizeof(StatsPartial);
}

extern "C" int mf_pp_mask_stats(const float* probs, int32_t K, int32_t h, int32_t w, int32_t H, int32_t W, float thr,
                                int strict, const int32_t* owner, const float* owner_prob, const int64_t* queries,
                                int64_t* areas, int32_t* boxes, float* prob_sums, uint32_t* bits, void* workspace,
                                intptr_t stream) {
  if (K <= 0) return (int)cudaSuccess;
  if (H <= 0 || W <= 0 || (!owner && (!probs || h <= 0 || w <= 0)) || (owner && (!owner_prob || !queries)))
    return (int)cudaErrorInvalidValue;
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const int n_blocks = (H + kStatsRows - 1) / kStatsRows;
  auto* partials = static_cast<StatsPartial*>(workspace);
  if (n_blocks > 65535) return (int)cudaErrorInvalidValue;  // gridDim.y limit: H < 262144
  mask_stats_kernel<<<dim3(K, n_blocks), kThreads, 0, s>>>(owner ? nullptr : probs, h, w, H, W, thr, strict, owner,
                                                            owner_prob, queries, bits, partials, n_blocks);
  finalize_stats_kernel<<<K, kThreads, 0, s>>>(partials, n_blocks, areas, boxes, prob_sums);
  return (int)cudaGetLastError();
}

extern "C" int mf_pp_owner(const float* probs, const float* scores, int32_t Q, int32_t h, int32_t w, int32_t H,
                           int32_t W, int32_t* owner, float* owner_prob, intptr_t stream) {
  if (H <= 0 || W <= 0 || Q <= 0 || h <= 0 || w <= 0) return (int)cudaErrorInvalidValue;
  owner_kernel<<<blocks_for((int64_t)H * W), kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      probs, scores, Q, h, w, H, W, owner, owner_prob);
  return (int)cudaGetLastError();
}

extern "C" int mf_pp_semantic_argmax(const float* class_maps, int32_t C, int32_t h, int32_t w, int32_t H, int32_t W,
                                     int64_t* labels, intptr_t stream) {
  if (H <= 0 || W <= 0 || C <= 0 || h <= 0 || w <= 0) return (int)cudaErrorInvalidValue;
  semantic_argmax_kernel<<<blocks_for((int64_t)H * W), kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      class_maps, C, h, w, H, W, labels);
  return (int)cudaGetLastError();
}
