// Torch-facing wrappers of the CUDA launchers (postprocess.h / postprocess_cuda.cu, fpn.h / fpn_cuda.cu). Compiled
// only for a CUDA torch (mf_kernels/build.py adds it with -DMF_WITH_CUDA); bindings.cpp registers these
// functions. Each wrapper checks its tensors, allocates the outputs, passes raw pointers and the current
// stream (as an integer) to a launcher and turns its cudaError_t into a Python exception. No sync.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

#include "fpn.h"
#include "ops.h"
#include "postprocess.h"

namespace mf {
namespace {

intptr_t current_stream() { return reinterpret_cast<intptr_t>(c10::cuda::getCurrentCUDAStream().stream()); }

void check_launch(int err, const char* what) {
  TORCH_CHECK(err == 0, what, " failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

void check_logits(const at::Tensor& logits, int64_t H, int64_t W, const char* op) {
  TORCH_CHECK(logits.is_cuda(), op, ": mask_logits must be a CUDA tensor, got ", logits.device());
  TORCH_CHECK(logits.dim() == 3 && logits.size(1) >= 1 && logits.size(2) >= 1, op,
              ": mask_logits must be [Q, h, w] with h, w >= 1, got ", logits.sizes());
  TORCH_CHECK(H >= 1 && W >= 1 && H * W < (int64_t(1) << 31), op, ": bad output size ", H, "x", W);
}

int dtype_code(const at::Tensor& logits, const char* op) {
  switch (logits.scalar_type()) {
    case at::kFloat:
      return MF_F32;
    case at::kHalf:
      return MF_F16;
    case at::kBFloat16:
      return MF_BF16;
    default:
      TORCH_CHECK(false, op, ": mask_logits must be float32, float16 or bfloat16, got ", logits.scalar_type());
  }
  return -1;
}

// fp32 sigmoid probabilities [Q, h, w], contiguous.
at::Tensor sigmoid_probs(const at::Tensor& logits, const char* op) {
  const at::Tensor in = logits.contiguous();
  at::Tensor probs = at::empty(in.sizes(), in.options().dtype(at::kFloat));
  check_launch(mf_pp_sigmoid(in.data_ptr(), dtype_code(in, op), probs.data_ptr<float>(), in.numel(), current_stream()),
               "mf_pp_sigmoid");
  return probs;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> run_stats(const at::Tensor& probs, int64_t K, int64_t H,
                                                                     int64_t W, double thr, bool strict,
                                                                     const at::Tensor* owner,
                                                                     const at::Tensor* owner_prob,
                                                                     const at::Tensor* queries, bool want_bits,
                                                                     const at::TensorOptions& opts) {
  at::Tensor areas = at::empty({K}, opts.dtype(at::kLong));
  at::Tensor boxes = at::empty({K, 4}, opts.dtype(at::kInt));
  at::Tensor prob_sums = at::empty({K}, opts.dtype(at::kFloat));
  const int64_t row_bytes = 4 * mf_bit_words((int32_t)W);
  at::Tensor bits = want_bits ? at::empty({K, H, row_bytes}, opts.dtype(at::kByte)) : at::empty({0}, opts.dtype(at::kByte));
  at::Tensor workspace =
      at::empty({(int64_t)mf_pp_mask_stats_workspace_bytes((int32_t)K, (int32_t)H)}, opts.dtype(at::kByte));
  const bool own = owner != nullptr;
  check_launch(mf_pp_mask_stats(own ? nullptr : probs.data_ptr<float>(), (int32_t)K, own ? 0 : (int32_t)probs.size(1),
                                own ? 0 : (int32_t)probs.size(2), (int32_t)H, (int32_t)W, (float)thr, strict ? 1 : 0,
                                own ? owner->data_ptr<int32_t>() : nullptr,
                                own ? owner_prob->data_ptr<float>() : nullptr,
                                own ? queries->data_ptr<int64_t>() : nullptr, areas.data_ptr<int64_t>(),
                                boxes.data_ptr<int32_t>(), prob_sums.data_ptr<float>(),
                                want_bits ? reinterpret_cast<uint32_t*>(bits.data_ptr<uint8_t>()) : nullptr,
                                workspace.data_ptr(), current_stream()),
               "mf_pp_mask_stats");
  return {areas, boxes, prob_sums, bits};
}

// fpn.h addresses a 4-D map as [B, C, P] with one pixel stride, p = y * W + x: the column stride, or the
// row stride when W == 1 (then the rows are the pixels; torch ignores the stride of a size-1 dim, so a map
// it calls contiguous may carry any stride(3) there).
int64_t pixel_stride(const at::Tensor& t) { return t.size(3) == 1 ? t.stride(2) : t.stride(3); }

// Whether pixel_stride reaches every pixel: one row, one column, or dense rows (stride_h == W * stride_w).
bool dense_rows(const at::Tensor& t) {
  return t.size(2) <= 1 || t.size(3) <= 1 || t.stride(2) == t.size(3) * t.stride(3);
}

int fpn_dtype(const at::Tensor& t, const char* op) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf, op, ": float32 or float16 only, got ",
              t.scalar_type());
  return t.scalar_type() == at::kFloat ? MF_FPN_F32 : MF_FPN_F16;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mask_stats_cuda(const at::Tensor& logits, int64_t H,
                                                                           int64_t W, double thr, bool strict,
                                                                           bool want_bits) {
  const char* op = "mask_postprocess[cuda]";
  check_logits(logits, H, W, op);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor probs = sigmoid_probs(logits, op);
  return run_stats(probs, logits.size(0), H, W, thr, strict, nullptr, nullptr, nullptr, want_bits, logits.options());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> owner_stats_cuda(const at::Tensor& logits,
                                                                            const at::Tensor& scores,
                                                                            const at::Tensor& queries, int64_t H,
                                                                            int64_t W, bool want_bits) {
  const char* op = "mask_postprocess[cuda]";
  check_logits(logits, H, W, op);
  const int64_t Q = logits.size(0);
  TORCH_CHECK(scores.is_cuda() && scores.dim() == 1 && scores.size(0) == Q, op, ": scores must be a CUDA tensor [Q=", Q,
              "], got ", scores.sizes());
  TORCH_CHECK(queries.is_cuda() && queries.dim() == 1 && queries.scalar_type() == at::kLong, op,
              ": queries must be a CUDA int64 tensor [K], got ", queries.sizes(), " ", queries.scalar_type());
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor probs = sigmoid_probs(logits, op);
  const at::Tensor s = scores.to(at::kFloat).contiguous();
  const at::Tensor q = queries.contiguous();
  at::Tensor owner = at::empty({H, W}, logits.options().dtype(at::kInt));
  at::Tensor owner_prob = at::empty({H, W}, logits.options().dtype(at::kFloat));
  check_launch(mf_pp_owner(probs.data_ptr<float>(), s.data_ptr<float>(), (int32_t)Q, (int32_t)logits.size(1),
                           (int32_t)logits.size(2), (int32_t)H, (int32_t)W, owner.data_ptr<int32_t>(),
                           owner_prob.data_ptr<float>(), current_stream()),
               "mf_pp_owner");
  return run_stats(probs, q.size(0), H, W, 0.0, false, &owner, &owner_prob, &q, want_bits, logits.options());
}

at::Tensor semantic_label_map_cuda(const at::Tensor& logits, const at::Tensor& class_probs, int64_t H, int64_t W) {
  const char* op = "semantic_label_map[cuda]";
  check_logits(logits, H, W, op);
  const int64_t Q = logits.size(0), h = logits.size(1), w = logits.size(2);
  TORCH_CHECK(class_probs.is_cuda() && class_probs.dim() == 2 && class_probs.size(0) == Q && class_probs.size(1) >= 1,
              op, ": class_probs must be a CUDA tensor [Q=", Q, ", C>=1], got ", class_probs.sizes());
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor probs = sigmoid_probs(logits, op).view({Q, h * w});
  const at::Tensor maps = at::mm(class_probs.to(at::kFloat).t(), probs).contiguous();  // [C, h * w], cuBLAS
  at::Tensor labels = at::empty({H, W}, logits.options().dtype(at::kLong));
  check_launch(mf_pp_semantic_argmax(maps.data_ptr<float>(), (int32_t)class_probs.size(1), (int32_t)h, (int32_t)w,
                                     (int32_t)H, (int32_t)W, labels.data_ptr<int64_t>(), current_stream()),
               "mf_pp_semantic_argmax");
  return labels;
}

at::Tensor fpn_upsample_add_cuda(const at::Tensor& lateral_in, const at::Tensor& coarse,
                                 const std::optional<at::Tensor>& out_arg) {
  const char* op = "fpn_upsample_add[cuda]";
  TORCH_CHECK(lateral_in.is_cuda() && coarse.is_cuda() && lateral_in.dim() == 4 && coarse.dim() == 4, op,
              ": lateral and coarse must be 4-D CUDA tensors, got ", lateral_in.sizes(), " and ", coarse.sizes());
  TORCH_CHECK(lateral_in.scalar_type() == coarse.scalar_type(), op, ": dtypes differ");
  const int dtype = fpn_dtype(lateral_in, op);
  const c10::cuda::CUDAGuard guard(lateral_in.device());
  const at::Tensor lateral = dense_rows(lateral_in) ? lateral_in : lateral_in.contiguous();
  at::Tensor out;
  if (out_arg.has_value()) {
    out = *out_arg;
    TORCH_CHECK(out.is_cuda() && out.sizes() == lateral.sizes() && out.scalar_type() == lateral.scalar_type() &&
                    dense_rows(out),
                op, ": out must be a CUDA tensor like lateral with dense rows");
  } else {
    out = at::empty(lateral.sizes(), lateral.options().memory_format(lateral.suggest_memory_format()));
  }
  const int64_t B = lateral.size(0), C = lateral.size(1), H = lateral.size(2), W = lateral.size(3);
  check_launch(mf_fpn_upsample_add(dtype, lateral.data_ptr(), coarse.data_ptr(), out.data_ptr(), B, C, H, W,
                                   coarse.size(2), coarse.size(3), lateral.stride(0), lateral.stride(1),
                                   pixel_stride(lateral), coarse.stride(0), coarse.stride(1), coarse.stride(2),
                                   coarse.stride(3), out.stride(0), out.stride(1), pixel_stride(out), current_stream()),
               "mf_fpn_upsample_add");
  return out;
}

at::Tensor fpn_lateral_upsample_add_cuda(const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& bias,
                                         const at::Tensor& coarse) {
  const char* op = "fpn_lateral_upsample_add[cuda]";
  TORCH_CHECK(x_in.is_cuda() && x_in.dim() == 4 && x_in.scalar_type() == at::kHalf, op,
              ": x must be a 4-D float16 CUDA tensor, got ", x_in.sizes(), " ", x_in.scalar_type());
  TORCH_CHECK(weight.is_cuda() && weight.dim() == 2 && weight.scalar_type() == at::kHalf && weight.is_contiguous() &&
                  weight.size(1) == x_in.size(1),
              op, ": weight must be a contiguous float16 CUDA tensor [Cout, Cin=", x_in.size(1), "], got ",
              weight.sizes());
  TORCH_CHECK(bias.is_cuda() && bias.scalar_type() == at::kFloat && bias.is_contiguous() && bias.dim() == 1 &&
                  bias.size(0) == weight.size(0),
              op, ": bias must be a contiguous float32 CUDA tensor [Cout]");
  TORCH_CHECK(coarse.is_cuda() && coarse.dim() == 4 && coarse.scalar_type() == at::kHalf &&
                  coarse.size(0) == x_in.size(0) && coarse.size(1) == weight.size(0),
              op, ": coarse must be a float16 CUDA tensor [B, Cout, h, w], got ", coarse.sizes());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = dense_rows(x_in) ? x_in : x_in.contiguous();
  const int64_t B = x.size(0), K = x.size(1), N = weight.size(0), H = x.size(2), W = x.size(3);
  at::Tensor out = at::empty({B, N, H, W}, x.options().memory_format(x.suggest_memory_format()));
  check_launch(mf_fpn_lateral_upsample_add_f16(x.data_ptr(), weight.data_ptr(), bias.data_ptr<float>(),
                                               coarse.data_ptr(), out.data_ptr(), B, K, N, H, W, coarse.size(2),
                                               coarse.size(3), x.stride(0), x.stride(1), pixel_stride(x),
                                               coarse.stride(0), coarse.stride(1), coarse.stride(2), coarse.stride(3),
                                               out.stride(0), out.stride(1), pixel_stride(out), current_stream()),
               "mf_fpn_lateral_upsample_add_f16");
  return out;
}

}  // namespace mf
