// FPN upsample-add on the CPU (SPEC §4.2): out = lateral + nearest_upsample(coarse, (H, W)) in one pass.
//
// The nearest source of every output row and column is computed once (`mf_nearest_src`, PyTorch's fp32
// rule) as an element offset into `coarse`; the pass then reads lateral and the gathered coarse value
// and writes out. Loop order follows the layout so the innermost loop walks contiguous memory:
// - pixels inner (NCHW): parallel over (b, c, y) rows, inner loop over x;
// - channels inner (channels_last): parallel over (b, y) rows, loop over x, inner loop over c.
// Parallelism: ATen's parallel_for (torch's OpenMP runtime and thread count).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "fpn.h"
#include "ops.h"

namespace mf {
namespace {

// Output elements per parallel_for chunk: below this, threads cost more than they save.
constexpr int64_t kGrainElements = 32768;

struct Strides4 {
  int64_t b, c, y, x;
  explicit Strides4(const at::Tensor& t) : b(t.stride(0)), c(t.stride(1)), y(t.stride(2)), x(t.stride(3)) {}
};

template <typename scalar_t>
inline scalar_t add_rounded(scalar_t a, scalar_t b) {
  using opmath_t = at::opmath_type<scalar_t>;  // float for half / bfloat16: one rounding, as PyTorch's add
  return static_cast<scalar_t>(static_cast<opmath_t>(a) + static_cast<opmath_t>(b));
}

// Element offsets into coarse of the nearest source of each output index along one axis.
std::vector<int64_t> source_offsets(int64_t out_size, int64_t in_size, int64_t stride) {
  const float scale = mf_nearest_scale(in_size, out_size);
  std::vector<int64_t> offsets(out_size);
  for (int64_t i = 0; i < out_size; ++i) offsets[i] = mf_nearest_src(i, scale, in_size) * stride;
  return offsets;
}

template <typename scalar_t>
void upsample_add_pixels_inner(const scalar_t* lat, const scalar_t* coarse, scalar_t* out, int64_t B, int64_t C,
                               int64_t H, int64_t W, const Strides4& ls, const Strides4& cs, const Strides4& os,
                               const std::vector<int64_t>& src_y, const std::vector<int64_t>& src_x) {
  const int64_t* sx = src_x.data();
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(W, 1));
  at::parallel_for(0, B * C * H, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t y = row % H, bc = row / H, c = bc % C, b = bc / C;
      const scalar_t* l = lat + b * ls.b + c * ls.c + y * ls.y;
      const scalar_t* src = coarse + b * cs.b + c * cs.c + src_y[y];
      scalar_t* o = out + b * os.b + c * os.c + y * os.y;
      if (ls.x == 1 && os.x == 1) {
        for (int64_t x = 0; x < W; ++x) o[x] = add_rounded(l[x], src[sx[x]]);
      } else {
        for (int64_t x = 0; x < W; ++x) o[x * os.x] = add_rounded(l[x * ls.x], src[sx[x]]);
      }
    }
  });
}

template <typename scalar_t>
void upsample_add_channels_inner(const scalar_t* lat, const scalar_t* coarse, scalar_t* out, int64_t B, int64_t C,
                                 int64_t H, int64_t W, const Strides4& ls, const Strides4& cs, const Strides4& os,
                                 const std::vector<int64_t>& src_y, const std::vector<int64_t>& src_x) {
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(W * C, 1));
  at::parallel_for(0, B * H, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t y = row % H, b = row / H;
      for (int64_t x = 0; x < W; ++x) {
        const scalar_t* l = lat + b * ls.b + y * ls.y + x * ls.x;
        const scalar_t* src = coarse + b * cs.b + src_y[y] + src_x[x];
        scalar_t* o = out + b * os.b + y * os.y + x * os.x;
        if (ls.c == 1 && os.c == 1 && cs.c == 1) {
          for (int64_t c = 0; c < C; ++c) o[c] = add_rounded(l[c], src[c]);
        } else {
          for (int64_t c = 0; c < C; ++c) o[c * os.c] = add_rounded(l[c * ls.c], src[c * cs.c]);
        }
      }
    }
  });
}

void check_upsample_inputs(const at::Tensor& lateral, const at::Tensor& coarse, const char* op) {
  TORCH_CHECK(lateral.dim() == 4 && coarse.dim() == 4, op, ": lateral and coarse must be 4-D [B, C, H, W], got ",
              lateral.sizes(), " and ", coarse.sizes());
  TORCH_CHECK(lateral.size(0) == coarse.size(0) && lateral.size(1) == coarse.size(1), op,
              ": batch and channel counts differ: lateral ", lateral.sizes(), ", coarse ", coarse.sizes());
  TORCH_CHECK(lateral.scalar_type() == coarse.scalar_type() && at::isFloatingType(lateral.scalar_type()), op,
              ": lateral and coarse must share one floating dtype, got ", lateral.scalar_type(), " and ",
              coarse.scalar_type());
  TORCH_CHECK(coarse.size(2) > 0 && coarse.size(3) > 0, op, ": coarse map ", coarse.sizes(), " has no pixels");
}

}  // namespace

at::Tensor fpn_upsample_add_cpu(const at::Tensor& lateral, const at::Tensor& coarse,
                                const std::optional<at::Tensor>& out_arg) {
  const char* op = "fpn_upsample_add[cpp]";
  check_upsample_inputs(lateral, coarse, op);
  TORCH_CHECK(lateral.device().is_cpu() && coarse.device().is_cpu(), op, ": CPU tensors only, got ",
              lateral.device(), " and ", coarse.device());
  at::Tensor out;
  if (out_arg.has_value()) {
    out = *out_arg;
    TORCH_CHECK(out.sizes() == lateral.sizes() && out.scalar_type() == lateral.scalar_type() && out.device().is_cpu(),
                op, ": out must be a CPU tensor shaped and typed like lateral ", lateral.sizes());
    // In place on lateral is fine (each element is read before it is written, by the same thread);
    // writing over coarse is not.
    TORCH_CHECK(!out.is_same(coarse), op, ": out must not be coarse");
  } else {
    out = at::empty(lateral.sizes(), lateral.options().memory_format(lateral.suggest_memory_format()));
  }
  const int64_t B = lateral.size(0), C = lateral.size(1), H = lateral.size(2), W = lateral.size(3);
  if (out.numel() == 0) return out;
  const Strides4 ls(lateral), cs(coarse), os(out);
  const std::vector<int64_t> src_y = source_offsets(H, coarse.size(2), cs.y);
  const std::vector<int64_t> src_x = source_offsets(W, coarse.size(3), cs.x);
  const bool channels_inner = C > 1 && ls.c == 1 && os.c == 1 && ls.x != 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lateral.scalar_type(), "fpn_upsample_add_cpu", [&] {
    const scalar_t* l = lateral.const_data_ptr<scalar_t>();
    const scalar_t* c = coarse.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    if (channels_inner) {
      upsample_add_channels_inner(l, c, o, B, C, H, W, ls, cs, os, src_y, src_x);
    } else {
      upsample_add_pixels_inner(l, c, o, B, C, H, W, ls, cs, os, src_y, src_x);
    }
  });
  return out;
}

}  // namespace mf
