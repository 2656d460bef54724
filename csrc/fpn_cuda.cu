// FPN top-down step on CUDA (SPEC §4.2). Plain CUDA, no torch headers: the launchers (declared in fpn.h)
// take raw device pointers, strides in elements and the stream as an integer; cuda_bindings.cpp wraps
// them for torch tensors. Builds with `nvcc -arch=sm_75|80|90 -c fpn_cuda.cu`.
//
// 1. `upsample_add_kernel`: out = lateral + nearest_upsample(coarse), one thread per output element,
//    consecutive threads along the contiguous axis (pixels for NCHW, channels for channels_last).
// 2. `lateral_upsample_add_wmma_kernel`: the BN-folded 1x1 lateral conv as a GEMM on tensor cores with the
//    upsample-add in its epilogue, so the lateral map never goes to memory. Why WMMA: on a T4 (sm_75)
//    Triton's tl.dot runs on the FMA units (8.1 TFLOP/s), while WMMA reaches the 65 TFLOP/s fp16 tensor
//    cores; at the model's shapes that turns a compute-bound GEMM into a memory-bound one (see
//    mf_kernels.fpn.t4_decision for the numbers).
//
// GEMM layout, per image b: M = P pixels, N = Cout, K = Cin.
//   A[m][k] = x[b, k, m]   (NCHW: m contiguous -> WMMA matrix_a col_major)
//   B[k][n] = weight[n][k] (row-major [N, K]: k contiguous -> WMMA matrix_b col_major)
// Block: 4 warps (2 x 2), a 64 x 64 output tile, each warp 32 x 32 = 2 x 2 fragments of 16 x 16; K in
// steps of 32 through shared memory, the next K step prefetched into registers while the tensor cores
// work on the current one. Epilogue: fragments -> shared (fp32) -> + bias + coarse gather -> one fp16
// rounding -> global, with threads along the output's contiguous axis.
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include "fpn.h"

namespace {

// ------------------------------------------------------------------------------------------------
// 1. upsample-add

template <typename T>
struct Arith;

template <>
struct Arith<float> {
  static __device__ __forceinline__ float add(float a, float b) { return a + b; }
};

template <>
struct Arith<__half> {
  // fp32 sum, one rounding: PyTorch's fp16 add computes in fp32 too.
  static __device__ __forceinline__ __half add(__half a, __half b) {
    return __float2half_rn(__half2float(a) + __half2float(b));
  }
};

struct UpsampleArgs {
  int32_t C, P, W, h, w;
  float scale_h, scale_w;
  int64_t lb, lc, lp;      // lateral strides (batch, channel, pixel)
  int64_t cb, cc, ch, cw;  // coarse strides (batch, channel, row, column)
  int64_t ob, oc, op;      // out strides (batch, channel, pixel)
  int64_t total;           // B * C * P
  bool channels_inner;     // consecutive threads walk channels (channels_last) instead of pixels
};

template <typename T>
__global__ void upsample_add_kernel(const T* lateral, const T* __restrict__ coarse, T* out, UpsampleArgs a) {
  // `lateral` and `out` may be the same buffer (in place): each element is read, then written, by one thread.
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < a.total; i += (int64_t)gridDim.x * blockDim.x) {
    const int32_t e = (int32_t)i;  // total < 2^31 (checked by the binding): 32-bit division is much cheaper
    int32_t c, p, b;
    if (a.channels_inner) {
      c = e % a.C;
      const int32_t rest = e / a.C;
      p = rest % a.P;
      b = rest / a.P;
    } else {
      p = e % a.P;
      const int32_t rest = e / a.P;
      c = rest % a.C;
      b = rest / a.C;
    }
    const int32_t y = p / a.W, x = p - y * a.W;
    const int64_t sy = mf_nearest_src(y, a.scale_h, a.h), sx = mf_nearest_src(x, a.scale_w, a.w);
    const T lat = lateral[b * a.lb + c * a.lc + p * a.lp];  // not __restrict__: out may be lateral
    const T src = coarse[b * a.cb + c * a.cc + sy * a.ch + sx * a.cw];
    out[b * a.ob + c * a.oc + p * a.op] = Arith<T>::add(lat, src);
  }
}

// ------------------------------------------------------------------------------------------------
// 2. WMMA GEMM + upsample-add epilogue

namespace wmma = nvcuda::wmma;

constexpr int kThreads = 128;  // 4 warps
constexpr int kBlockM = 64;    // pixels per block
constexpr int kBlockN = 64;    // output channels per block
constexpr int kBlockK = 32;    // input channels per shared-memory step
constexpr int kFrag = 16;      // WMMA m = n = k = 16
// Padded leading dimensions (multiples of 8 halves / 4 floats as WMMA requires; the padding staggers banks).
constexpr int kLdA = kBlockM + 8;  // As[k][m]
constexpr int kLdB = kBlockK + 8;  // Bs[n][k]
constexpr int kLdC = kBlockM + 4;  // Cs[n][m] (fp32)
constexpr int kLoadsA = kBlockK * kBlockM / kThreads;  // 16 elements per thread per K step
constexpr int kLoadsB = kBlockN * kBlockK / kThreads;  // 16
constexpr int kStoresC = kBlockM * kBlockN / kThreads;  // 32

struct GemmArgs {
  int32_t K, N, P, W, h, w;
  float scale_h, scale_w;
  int64_t xb, xk, xp;      // x strides (batch, in-channel, pixel)
  int64_t cb, cn, ch, cw;  // coarse strides (batch, channel, row, column)
  int64_t ob, on, op;      // out strides (batch, channel, pixel)
  bool x_pixels_inner;     // x's pixel stride is 1 (NCHW): threads load along pixels, else along channels
  bool out_pixels_inner;   // out's pixel stride is 1 (NCHW): threads store along pixels, else along channels
};

struct __align__(32) GemmShared {
  union {
    struct {
      __half a[kBlockK * kLdA];  // A tile, element (m, k) at k * kLdA + m
      __half b[kBlockN * kLdB];  // B tile, element (k, n) at n * kLdB + k
    } ab;
    float c[kBlockN * kLdC];  // output tile, element (m, n) at n * kLdC + m
  };
};

// How one thread walks a [rows x cols] tile with kThreads threads: element i of the thread is at
// (r0 + i * dr, c0 + i * dc). Consecutive threads take consecutive `cols` when `cols_inner` (rows must
// then be a multiple of kThreads / cols), else consecutive `rows`. Fixed per thread, so the address of
// element i is one multiply-add away from the first one.
struct Walk {
  int r0, c0, dr, dc;
  __device__ __forceinline__ Walk(int rows, int cols, bool cols_inner) {
    const int t = threadIdx.x;
    if (cols_inner) {  // e = i * kThreads + t -> (e / cols, e % cols), cols divides kThreads
      r0 = t / cols, c0 = t % cols, dr = kThreads / cols, dc = 0;
    } else {  // (e % rows, e / rows), rows divides kThreads
      r0 = t % rows, c0 = t / rows, dr = 0, dc = kThreads / rows;
    }
  }
};

// A tile: rows = k (kBlockK), cols = m (kBlockM). x points at this image.
__device__ __forceinline__ void load_a(const __half* __restrict__ x, const GemmArgs& a, const Walk& wk, int m0, int k0,
                                       __half (&regs)[kLoadsA]) {
  const __half zero = __float2half_rn(0.f);
  const int k = k0 + wk.r0, m = m0 + wk.c0;
  const __half* p = x + (int64_t)k * a.xk + (int64_t)m * a.xp;
  const int64_t step = (int64_t)wk.dr * a.xk + (int64_t)wk.dc * a.xp;
#pragma unroll
  for (int i = 0; i < kLoadsA; ++i) {
    const bool inside = k + i * wk.dr < a.K && m + i * wk.dc < a.P;
    regs[i] = inside ? p[i * step] : zero;
  }
}

__device__ __forceinline__ void store_a(GemmShared& s, const Walk& wk, const __half (&regs)[kLoadsA]) {
#pragma unroll
  for (int i = 0; i < kLoadsA; ++i) s.ab.a[(wk.r0 + i * wk.dr) * kLdA + wk.c0 + i * wk.dc] = regs[i];
}

// B tile: rows = n (kBlockN), cols = k (kBlockK); weight is row-major [N, K], so k is always inner.
__device__ __forceinline__ void load_b(const __half* __restrict__ weight, const GemmArgs& a, const Walk& wk, int n0,
                                       int k0, __half (&regs)[kLoadsB]) {
  const __half zero = __float2half_rn(0.f);
  const int n = n0 + wk.r0, k = k0 + wk.c0;
  const __half* p = weight + (int64_t)n * a.K + k;
#pragma unroll
  for (int i = 0; i < kLoadsB; ++i) {
    const bool inside = n + i * wk.dr < a.N && k < a.K;
    regs[i] = inside ? p[(int64_t)i * wk.dr * a.K] : zero;
  }
}

__device__ __forceinline__ void store_b(GemmShared& s, const Walk& wk, const __half (&regs)[kLoadsB]) {
#pragma unroll
  for (int i = 0; i < kLoadsB; ++i) s.ab.b[(wk.r0 + i * wk.dr) * kLdB + wk.c0] = regs[i];
}

// Grid (ceil(P / 64), ceil(N / 64), B). One block = one image's 64 pixels x 64 output channels.
__global__ void __launch_bounds__(kThreads) lateral_upsample_add_wmma_kernel(
    const __half* __restrict__ x, const __half* __restrict__ weight, const float* __restrict__ bias,
    const __half* __restrict__ coarse, __half* __restrict__ out, GemmArgs a) {
  __shared__ GemmShared s;
  const int m0 = blockIdx.x * kBlockM, n0 = blockIdx.y * kBlockN, b = blockIdx.z;
  const int warp = threadIdx.x / 32;
  const int warp_m = (warp % 2) * 32, warp_n = (warp / 2) * 32;  // the warp's 32 x 32 corner in the tile
  x += b * a.xb;
  const Walk walk_a(kBlockK, kBlockM, a.x_pixels_inner);
  const Walk walk_b(kBlockN, kBlockK, true);

  wmma::fragment<wmma::accumulator, kFrag, kFrag, kFrag, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);

  __half regs_a[kLoadsA], regs_b[kLoadsB];
  load_a(x, a, walk_a, m0, 0, regs_a);
  load_b(weight, a, walk_b, n0, 0, regs_b);
  for (int k0 = 0; k0 < a.K; k0 += kBlockK) {
    store_a(s, walk_a, regs_a);
    store_b(s, walk_b, regs_b);
    __syncthreads();
    if (k0 + kBlockK < a.K) {  // prefetch the next K step; its latency hides behind the MMAs below
      load_a(x, a, walk_a, m0, k0 + kBlockK, regs_a);
      load_b(weight, a, walk_b, n0, k0 + kBlockK, regs_b);
    }
#pragma unroll
    for (int kk = 0; kk < kBlockK; kk += kFrag) {
      wmma::fragment<wmma::matrix_a, kFrag, kFrag, kFrag, __half, wmma::col_major> fa[2];
      wmma::fragment<wmma::matrix_b, kFrag, kFrag, kFrag, __half, wmma::col_major> fb[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], s.ab.a + kk * kLdA + warp_m + i * kFrag, kLdA);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], s.ab.b + (warp_n + j * kFrag) * kLdB + kk, kLdB);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
    __syncthreads();  // the tiles are overwritten next step (and by the epilogue's fp32 tile)
  }

  // Epilogue: accumulators -> shared Cs[n][m] -> + bias + nearest coarse -> fp16 -> out.
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(s.c + (warp_n + j * kFrag) * kLdC + warp_m + i * kFrag, acc[i][j], kLdC,
                              wmma::mem_col_major);
  __syncthreads();
  coarse += b * a.cb;
  out += b * a.ob;
  const Walk walk_c(kBlockN, kBlockM, a.out_pixels_inner);  // rows = n, cols = m
  for (int i = 0; i < kStoresC; ++i) {
    const int n = walk_c.r0 + i * walk_c.dr, m = walk_c.c0 + i * walk_c.dc;
    const int gm = m0 + m, gn = n0 + n;
    if (gm >= a.P || gn >= a.N) continue;
    const int y = gm / a.W, xc = gm - y * a.W;
    const int64_t src = mf_nearest_src(y, a.scale_h, a.h) * a.ch + mf_nearest_src(xc, a.scale_w, a.w) * a.cw;
    const float v = s.c[n * kLdC + m] + bias[gn] + __half2float(coarse[gn * a.cn + src]);
    out[gn * a.on + gm * a.op] = __float2half_rn(v);
  }
}

int blocks_for(int64_t total, int threads) {
  const int64_t blocks = (total + threads - 1) / threads;
  return (int)(blocks < 65535 * 8 ? blocks : 65535 * 8);  // grid-stride loop covers the rest
}

}  // namespace

extern "C" int mf_fpn_upsample_add(int dtype, const void* lateral, const void* coarse, void* out, int64_t B, int64_t C,
                                   int64_t H, int64_t W, int64_t h, int64_t w, int64_t lateral_sb, int64_t lateral_sc,
                                   int64_t lateral_sp, int64_t coarse_sb, int64_t coarse_sc, int64_t coarse_sh,
                                   int64_t coarse_sw, int64_t out_sb, int64_t out_sc, int64_t out_sp,
                                   intptr_t stream) {
  UpsampleArgs a;
  a.C = (int32_t)C;
  a.P = (int32_t)(H * W);
  a.W = (int32_t)W;
  a.h = (int32_t)h;
  a.w = (int32_t)w;
  a.scale_h = mf_nearest_scale(h, H);
  a.scale_w = mf_nearest_scale(w, W);
  a.lb = lateral_sb, a.lc = lateral_sc, a.lp = lateral_sp;
  a.cb = coarse_sb, a.cc = coarse_sc, a.ch = coarse_sh, a.cw = coarse_sw;
  a.ob = out_sb, a.oc = out_sc, a.op = out_sp;
  a.total = B * C * H * W;
  a.channels_inner = C > 1 && lateral_sc == 1 && lateral_sp != 1;
  if (a.total == 0) return (int)cudaSuccess;
  const int threads = 256;
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  if (dtype == MF_FPN_F32) {
    upsample_add_kernel<float><<<blocks_for(a.total, threads), threads, 0, s>>>(
        static_cast<const float*>(lateral), static_cast<const float*>(coarse), static_cast<float*>(out), a);
  } else if (dtype == MF_FPN_F16) {
    upsample_add_kernel<__half><<<blocks_for(a.total, threads), threads, 0, s>>>(
        static_cast<const __half*>(lateral), static_cast<const __half*>(coarse), static_cast<__half*>(out), a);
  } else {
    return (int)cudaErrorInvalidValue;
  }
  return (int)cudaGetLastError();
}

extern "C" int mf_fpn_lateral_upsample_add_f16(const void* x, const void* weight, const float* bias, const void* coarse,
                                               void* out, int64_t B, int64_t K, int64_t N, int64_t H, int64_t W,
                                               int64_t h, int64_t w, int64_t x_sb, int64_t x_sk, int64_t x_sp,
                                               int64_t coarse_sb, int64_t coarse_sn, int64_t coarse_sh,
                                               int64_t coarse_sw, int64_t out_sb, int64_t out_sn, int64_t out_sp,
                                               intptr_t stream) {
  GemmArgs a;
  a.K = (int32_t)K;
  a.N = (int32_t)N;
  a.P = (int32_t)(H * W);
  a.W = (int32_t)W;
  a.h = (int32_t)h;
  a.w = (int32_t)w;
  a.scale_h = mf_nearest_scale(h, H);
  a.scale_w = mf_nearest_scale(w, W);
  a.xb = x_sb, a.xk = x_sk, a.xp = x_sp;
  a.cb = coarse_sb, a.cn = coarse_sn, a.ch = coarse_sh, a.cw = coarse_sw;
  a.ob = out_sb, a.on = out_sn, a.op = out_sp;
  a.x_pixels_inner = x_sp == 1;
  a.out_pixels_inner = out_sp == 1;
  if (B == 0 || N == 0 || a.P == 0) return (int)cudaSuccess;
  if (K <= 0 || B > 65535 || (N + kBlockN - 1) / kBlockN > 65535) return (int)cudaErrorInvalidValue;
  const dim3 grid((unsigned)((a.P + kBlockM - 1) / kBlockM), (unsigned)((N + kBlockN - 1) / kBlockN), (unsigned)B);
  lateral_upsample_add_wmma_kernel<<<grid, kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      static_cast<const __half*>(x), static_cast<const __half*>(weight), bias, static_cast<const __half*>(coarse),
      static_cast<__half*>(out), a);
  return (int)cudaGetLastError();
}
