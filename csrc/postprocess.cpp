// Mask post-processing on the CPU (SPEC §4.3): from stride-4 mask logits straight to areas, inclusive
// boxes, prob sums, COCO RLE counts and bbox crops, never writing [Q, H, W] float masks.
//
// Why column-major: COCO RLE reads the mask down each column, and PyTorch's bilinear resize is
// out = l0y * (l0x * a + l1x * b) + l1y * (l0x * c + l1x * d). Computing, per output column x, the
// horizontally interpolated low-res column `col[iy] = l0x * p[iy, x0] + l1x * p[iy, x1]` (h values) and
// then every output row from two of them gives the same expression in the same order as PyTorch, and
// visits pixels in RLE order, so the runs are counted on the fly.
//
// Work skipped, exactly: a bilinear value lies between the min and max of its taps. Threshold mode skips
// output columns, and rows within a column, whose taps are all below the threshold; the ownership map and
// the semantic argmax only interpolate, per low-res cell, the queries / classes whose corner max reaches
// the best corner min (usually 1-3 of 100 or 150). A small relative margin covers float rounding.
//
// Parallelism: ATen's parallel_for (torch's OpenMP runtime and thread count, so torch.set_num_threads
// applies): over queries in threshold mode, over output columns for the ownership map, over output rows
// for the semantic label map.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "ops.h"
#include "postprocess.h"

namespace mf {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// A column whose two source columns peak below thr / (1 + kSkipMargin) has no pixel >= thr: the bilinear
// value is a convex combination, so it exceeds its inputs' max by a few float ulps at most.
constexpr float kSkipMargin = 1e-5f;

std::vector<MfLinearTap> linear_taps(int64_t in_size, int64_t out_size) {
  std::vector<MfLinearTap> taps(out_size);
  for (int64_t i = 0; i < out_size; ++i) taps[i] = mf_linear_tap((int32_t)i, (int32_t)in_size, (int32_t)out_size);
  return taps;
}

void check_logits(const at::Tensor& logits, int64_t H, int64_t W, const char* op) {
  TORCH_CHECK(logits.device().is_cpu(), op, ": mask_logits must be a CPU tensor, got ", logits.device());
  TORCH_CHECK(logits.dim() == 3, op, ": mask_logits must be [Q, h, w], got ", logits.sizes());
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()), op, ": mask_logits must be floating point, got ",
              logits.scalar_type());
  TORCH_CHECK(logits.size(1) >= 1 && logits.size(2) >= 1, op, ": mask_logits has an empty map ", logits.sizes());
  TORCH_CHECK(H >= 1 && W >= 1, op, ": output size must be at least 1x1, got ", H, "x", W);
  TORCH_CHECK(H * W < (int64_t(1) << 31) && logits.size(1) * logits.size(2) < (int64_t(1) << 31), op,
              ": sizes exceed 32-bit indexing");
}

// fp32 sigmoid probabilities [Q, h, w], contiguous: the same ATen sigmoid as the reference.
at::Tensor sigmoid_probs(const at::Tensor& logits) { return logits.to(at::kFloat).sigmoid().contiguous(); }

// COCO run lengths, built while pixels are visited in column-major order.
struct RunCounter {
  std::vector<int64_t> counts;
  int64_t run_start = 0;
  bool value = false;  // the first run is the 0s

  // The pixel at flat (column-major) index `flat` has value `v`; pixels since the last call repeat the
  // current value.
  void at(bool v, int64_t flat) {
    if (v != value) {
      counts.push_back(flat - run_start);
      run_start = flat;
      value = v;
    }
  }
  void finish(int64_t total) { counts.push_back(total - run_start); }
};

struct Box {
  int32_t x1 = std::numeric_limits<int32_t>::max(), y1 = std::numeric_limits<int32_t>::max();
  int32_t x2 = -1, y2 = -1;
  void add_segment(int32_t x, int32_t ya, int32_t yb) {
    x1 = std::min(x1, x);
    x2 = std::max(x2, x);
    y1 = std::min(y1, ya);
    y2 = std::max(y2, yb);
  }
  bool empty() const { return x2 < 0; }
};

struct QueryOut {
  int64_t area = 0;
  double prob_sum = 0.0;
  Box box;
  std::vector<int64_t> counts;
  std::vector<uint8_t> crop;  // row-major [y2 - y1 + 1, x2 - x1 + 1]
};

MaskStats pack_outputs(std::vector<QueryOut>& outs, bool want_rle, bool want_crops) {
  const int64_t K = (int64_t)outs.size();
  at::Tensor areas = at::empty({K}, at::kLong);
  at::Tensor boxes = at::empty({K, 4}, at::kInt);
  at::Tensor prob_sums = at::empty({K}, at::kFloat);
  auto* pa = areas.data_ptr<int64_t>();
  auto* pb = boxes.data_ptr<int32_t>();
  auto* ps = prob_sums.data_ptr<float>();
  std::vector<at::Tensor> counts, crops;
  for (int64_t k = 0; k < K; ++k) {
    QueryOut& o = outs[k];
    pa[k] = o.area;
    ps[k] = (float)o.prob_sum;
    const bool empty = o.box.empty();
    pb[4 * k + 0] = empty ? -1 : o.box.x1;
    pb[4 * k + 1] = empty ? -1 : o.box.y1;
    pb[4 * k + 2] = empty ? -1 : o.box.x2;
    pb[4 * k + 3] = empty ? -1 : o.box.y2;
    if (want_rle) {
      at::Tensor c = at::empty({(int64_t)o.counts.size()}, at::kLong);
      std::memcpy(c.data_ptr<int64_t>(), o.counts.data(), o.counts.size() * sizeof(int64_t));
      counts.push_back(c);
    }
    if (want_crops) {
      const int64_t ch = empty ? 0 : o.box.y2 - o.box.y1 + 1, cw = empty ? 0 : o.box.x2 - o.box.x1 + 1;
      at::Tensor c = at::empty({ch, cw}, at::kBool);
      if (ch * cw > 0) std::memcpy(c.data_ptr<bool>(), o.crop.data(), ch * cw);
      crops.push_back(c);
    }
  }
  return {areas, boxes, prob_sums, counts, crops};
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// Threshold mode: one pass per query, parallel over queries.
// ------------------------------------------------------------------------------------------------
MaskStats mask_stats_cpu(const at::Tensor& logits, int64_t H, int64_t W, double thr_d, bool strict, bool want_rle,
                         bool want_crops) {
  check_logits(logits, H, W, "mask_postprocess[cpp]");
  const int64_t K = logits.size(0), h = logits.size(1), w = logits.size(2);
  const at::Tensor probs = sigmoid_probs(logits);
  const float* P = probs.data_ptr<float>();
  const std::vector<MfLinearTap> ty = linear_taps(h, H), tx = linear_taps(w, W);
  const float thr = (float)thr_d;  // the reference compares fp32 probabilities with an fp32 threshold
  const float skip_below = thr / (1.f + kSkipMargin);  // a value whose taps are all below this is below thr
  // Output rows that read low-res row iy or a later one / iy or an earlier one (taps are monotone in y).
  std::vector<int64_t> first_row_at_or_after(h, H), last_row_at_or_before(h, -1);
  for (int64_t y = H - 1; y >= 0; --y) first_row_at_or_after[ty[y].i1] = y;
  for (int64_t iy = h - 2; iy >= 0; --iy)
    first_row_at_or_after[iy] = std::min(first_row_at_or_after[iy], first_row_at_or_after[iy + 1]);
  for (int64_t y = 0; y < H; ++y) last_row_at_or_before[ty[y].i0] = y;
  for (int64_t iy = 1; iy < h; ++iy)
    last_row_at_or_before[iy] = std::max(last_row_at_or_before[iy], last_row_at_or_before[iy - 1]);
  std::vector<QueryOut> outs(K);

  at::parallel_for(0, K, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> col(h), colmax(w);
    std::vector<uint8_t> mask_cm(want_crops ? H * W : 0);  // column-major mask of the current query
    std::vector<int64_t> lo(W), hi(W);                     // rows of column x evaluated: [lo, hi]
    for (int64_t k = begin; k < end; ++k) {
      const float* p = P + k * h * w;
      for (int64_t ix = 0; ix < w; ++ix) colmax[ix] = kNegInf;
      for (int64_t iy = 0; iy < h; ++iy)
        for (int64_t ix = 0; ix < w; ++ix) colmax[ix] = std::max(colmax[ix], p[iy * w + ix]);  // NaN ignored
      QueryOut& o = outs[k];
      RunCounter runs;
      for (int64_t x = 0; x < W; ++x) {
        const MfLinearTap t = tx[x];
        const int64_t col_start = x * H;
        lo[x] = 0;
        hi[x] = -1;
        if (std::max(colmax[t.i0], colmax[t.i1]) < skip_below) {  // no foreground in this column
          if (want_rle) runs.at(false, col_start);
          continue;
        }
        int64_t iy_lo = h, iy_hi = -1;
        for (int64_t iy = 0; iy < h; ++iy) {
          col[iy] = p[iy * w + t.i0] * t.l0 + p[iy * w + t.i1] * t.l1;
          if (col[iy] >= skip_below) {
            iy_lo = std::min(iy_lo, iy);
            iy_hi = iy;
          }
        }
        if (iy_hi < 0) {
          if (want_rle) runs.at(false, col_start);
          continue;
        }
        // Only rows with a tap in [iy_lo, iy_hi] can reach thr; the rest of the column is 0.
        const int64_t y_lo = first_row_at_or_after[iy_lo], y_hi = last_row_at_or_before[iy_hi];
        lo[x] = y_lo;
        hi[x] = y_hi;
        if (want_rle && y_lo > 0) runs.at(false, col_start);
        int32_t ya = -1, yb = -1;
        int64_t area = 0;
        double sum = 0.0;
        uint8_t* mcol = want_crops ? mask_cm.data() + col_start : nullptr;
        for (int64_t y = y_lo; y <= y_hi; ++y) {
          const MfLinearTap s = ty[y];
          const float v = col[s.i0] * s.l0 + col[s.i1] * s.l1;
          const bool fg = strict ? v > thr : v >= thr;
          if (mcol) mcol[y] = fg;
          if (want_rle) runs.at(fg, col_start + y);
          if (fg) {
            if (ya < 0) ya = (int32_t)y;
            yb = (int32_t)y;
            ++area;
            sum += v;
          }
        }
        if (want_rle && y_hi + 1 < H) runs.at(false, col_start + y_hi + 1);
        if (area) {
          o.area += area;
          o.prob_sum += sum;
          o.box.add_segment((int32_t)x, ya, yb);
        }
      }
      if (want_rle) {
        runs.finish(H * W);
        o.counts = std::move(runs.counts);
      }
      if (want_crops && !o.box.empty()) {
        const int64_t ch = o.box.y2 - o.box.y1 + 1, cw = o.box.x2 - o.box.x1 + 1;
        o.crop.assign(ch * cw, 0);
        for (int64_t c = 0; c < cw; ++c) {
          const int64_t x = o.box.x1 + c;
          const int64_t r_lo = std::max(lo[x], (int64_t)o.box.y1), r_hi = std::min(hi[x], (int64_t)o.box.y2);
          for (int64_t y = r_lo; y <= r_hi; ++y) o.crop[(y - o.box.y1) * cw + c] = mask_cm[x * H + y];
        }
      }
    }
  });
  return pack_outputs(outs, want_rle, want_crops);
}

// ------------------------------------------------------------------------------------------------
// Ownership mode (predict_all_pixels): owner map over all Q queries, parallel over output columns,
// then one sequential pass over its vertical runs for the requested queries.
// ------------------------------------------------------------------------------------------------
MaskStats owner_stats_cpu(const at::Tensor& logits, const at::Tensor& scores, const at::Tensor& queries, int64_t H,
                          int64_t W, bool want_rle, bool want_crops) {
  check_logits(logits, H, W, "mask_postprocess[cpp]");
  const int64_t Q = logits.size(0), h = logits.size(1), w = logits.size(2);
  TORCH_CHECK(scores.dim() == 1 && scores.size(0) == Q && scores.device().is_cpu(),
              "mask_postprocess[cpp]: scores must be a CPU tensor [Q=", Q, "], got ", scores.sizes());
  TORCH_CHECK(queries.dim() == 1 && queries.device().is_cpu() && queries.scalar_type() == at::kLong,
              "mask_postprocess[cpp]: queries must be a CPU int64 tensor [K], got ", queries.sizes(), " ",
              queries.scalar_type());
  const at::Tensor queries_c = queries.contiguous();
  const int64_t K = queries_c.size(0);
  const int64_t* qidx = queries_c.data_ptr<int64_t>();
  std::vector<int64_t> slot(Q + 1, -1);  // query -> output row; index Q = "no owner"
  for (int64_t k = 0; k < K; ++k) {
    TORCH_CHECK(qidx[k] >= 0 && qidx[k] < Q, "mask_postprocess[cpp]: query index ", qidx[k], " out of [0, ", Q, ")");
    TORCH_CHECK(slot[qidx[k]] < 0, "mask_postprocess[cpp]: query index ", qidx[k], " repeated");
    slot[qidx[k]] = k;
  }

  // probs laid out [h, w, Q] so that the per-pixel loop over queries is contiguous.
  const at::Tensor probs = sigmoid_probs(logits).permute({1, 2, 0}).contiguous();
  const at::Tensor s_c = scores.to(at::kFloat).contiguous();
  const float* P = probs.data_ptr<float>();
  const float* S = s_c.data_ptr<float>();
  const std::vector<MfLinearTap> ty = linear_taps(h, H), tx = linear_taps(w, W);
  std::vector<int32_t> owner(H * W);  // column-major
  std::vector<float> owner_prob(H * W);

  // Pruning, exact: inside the low-res cell between taps (iy, iy + 1) x (ix, ix + 1) every bilinear value
  // of query q lies between the min and max of its 4 corners, so q can only win a pixel of the cell if
  // scores[q] * max4 reaches L = max_r scores[r] * min4_r (less a rounding margin). Typically 1-3 of the
  // Q queries are candidates; only they are interpolated, in ascending q (ties keep the lowest q).
  const float tie_margin = 2e-5f;
  at::parallel_for(0, W, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> lower(Q), upper(Q);
    std::vector<int32_t> cand;           // candidates of the cells of low-res column `cached`, by row
    std::vector<int64_t> cand_start(h + 1);
    int64_t cached = -1;
    for (int64_t x = begin; x < end; ++x) {
      const MfLinearTap t = tx[x];
      if (t.i0 != cached) {
        cached = t.i0;
        cand.clear();
        const int64_t ix1 = std::min<int64_t>(t.i0 + 1, w - 1);
        for (int64_t iy = 0; iy < h; ++iy) {
          const int64_t iy1 = std::min<int64_t>(iy + 1, h - 1);
          const float* a = P + (iy * w + t.i0) * Q;
          const float* b = P + (iy * w + ix1) * Q;
          const float* c = P + (iy1 * w + t.i0) * Q;
          const float* d = P + (iy1 * w + ix1) * Q;
          for (int64_t q = 0; q < Q; ++q) {
            const float mn = std::min(std::min(a[q], b[q]), std::min(c[q], d[q]));
            const float mx = std::max(std::max(a[q], b[q]), std::max(c[q], d[q]));
            lower[q] = std::min(S[q] * mn, S[q] * mx);  // a negative score flips the bounds
            upper[q] = std::max(S[q] * mn, S[q] * mx);
          }
          float best_lower = kNegInf;
          for (int64_t q = 0; q < Q; ++q) best_lower = std::max(best_lower, lower[q]);
          const float cut = best_lower - std::fabs(best_lower) * tie_margin;
          cand_start[iy] = (int64_t)cand.size();
          for (int64_t q = 0; q < Q; ++q)
            if (upper[q] >= cut) cand.push_back((int32_t)q);
        }
        cand_start[h] = (int64_t)cand.size();
      }
      for (int64_t y = 0; y < H; ++y) {
        const MfLinearTap s = ty[y];
        const float* r0 = P + s.i0 * w * Q;
        const float* r1 = P + s.i1 * w * Q;
        float best = kNegInf, best_p = 0.f;
        int32_t best_q = (int32_t)Q;
        for (int64_t i = cand_start[s.i0]; i < cand_start[s.i0 + 1]; ++i) {
          const int64_t q = cand[i];
          // PyTorch's order: l0y * (l0x * a + l1x * b) + l1y * (l0x * c + l1x * d)
          const float top = r0[t.i0 * Q + q] * t.l0 + r0[t.i1 * Q + q] * t.l1;
          const float bottom = r1[t.i0 * Q + q] * t.l0 + r1[t.i1 * Q + q] * t.l1;
          const float pq = top * s.l0 + bottom * s.l1;
          const float v = S[q] * pq;
          if (v > best) {  // strict: ties keep the lowest q; NaN never wins
            best = v;
            best_q = (int32_t)q;
            best_p = pq;
          }
        }
        owner[x * H + y] = best_q;
        owner_prob[x * H + y] = best_p;
      }
    }
  });

  std::vector<QueryOut> outs(K);
  std::vector<int64_t> run_end(K, 0);  // flat index after query k's last pixel so far
  for (int64_t x = 0; x < W; ++x) {
    int64_t y = 0;
    while (y < H) {
      const int64_t flat = x * H + y;
      const int32_t o = owner[flat];
      int64_t e = y + 1;
      while (e < H && owner[x * H + e] == o) ++e;
      const int64_t k = slot[o];
      if (k >= 0) {
        QueryOut& out = outs[k];
        const int64_t len = e - y;
        double sum = 0.0;
        for (int64_t i = 0; i < len; ++i) sum += owner_prob[flat + i];
        out.area += len;
        out.prob_sum += sum;
        out.box.add_segment((int32_t)x, (int32_t)y, (int32_t)(e - 1));
        if (want_rle) {
          if (!out.counts.empty() && run_end[k] == flat) {
            out.counts.back() += len;  // the run continues from the previous column
          } else {
            out.counts.push_back(flat - run_end[k]);  // zeros before (may be 0 at the very start)
            out.counts.push_back(len);
          }
          run_end[k] = flat + len;
        }
      }
      y = e;
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    QueryOut& out = outs[k];
    if (want_rle && run_end[k] < H * W) out.counts.push_back(H * W - run_end[k]);
    if (want_crops && !out.box.empty()) {
      const int64_t ch = out.box.y2 - out.box.y1 + 1, cw = out.box.x2 - out.box.x1 + 1;
      out.crop.assign(ch * cw, 0);
      const int32_t q = (int32_t)qidx[k];
      for (int64_t c = 0; c < cw; ++c) {
        const int32_t* ocol = owner.data() + (out.box.x1 + c) * H + out.box.y1;
        for (int64_t r = 0; r < ch; ++r) out.crop[r * cw + c] = ocol[r] == q;
      }
    }
  }
  return pack_outputs(outs, want_rle, want_crops);
}

// ------------------------------------------------------------------------------------------------
// Semantic label map: class score maps at stride 4 (one GEMM), then C values interpolated per pixel.
// Bilinear interpolation is linear, so argmax_c sum_q w_qc bilinear(p_q) = argmax_c bilinear(sum_q w_qc p_q)
// up to float rounding, at 1/Q of the work.
// ------------------------------------------------------------------------------------------------
at::Tensor semantic_label_map_cpu(const at::Tensor& logits, const at::Tensor& class_probs, int64_t H, int64_t W) {
  check_logits(logits, H, W, "semantic_label_map[cpp]");
  const int64_t Q = logits.size(0), h = logits.size(1), w = logits.size(2);
  TORCH_CHECK(class_probs.dim() == 2 && class_probs.size(0) == Q && class_probs.device().is_cpu() &&
                  class_probs.size(1) >= 1,
              "semantic_label_map[cpp]: class_probs must be a CPU tensor [Q=", Q, ", C>=1], got ", class_probs.sizes());
  const int64_t C = class_probs.size(1);
  const at::Tensor probs = sigmoid_probs(logits).view({Q, h * w});
  // [h * w, C]: the C class scores of one low-res pixel are contiguous.
  const at::Tensor maps = at::mm(probs.t(), class_probs.to(at::kFloat)).contiguous();
  const float* M = maps.data_ptr<float>();
  const std::vector<MfLinearTap> ty = linear_taps(h, H), tx = linear_taps(w, W);
  at::Tensor labels = at::empty({H, W}, at::kLong);
  int64_t* L = labels.data_ptr<int64_t>();

  // Same exact pruning as the ownership map: in the low-res cell between taps (iy, iy + 1) x (ix, ix + 1)
  // the interpolated score of class c lies between the min and max of its 4 corners, so only classes whose
  // max reaches the best min (less a rounding margin) can win there; they are tried in ascending c.
  const float tie_margin = 2e-5f;
  at::parallel_for(0, H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> lower(C), upper(C);
    std::vector<int32_t> cand;  // candidates of the cells of low-res row `cached`, by column
    std::vector<int64_t> cand_start(w + 1);
    int64_t cached = -1;
    for (int64_t y = begin; y < end; ++y) {
      const MfLinearTap s = ty[y];
      if (s.i0 != cached) {
        cached = s.i0;
        cand.clear();
        const int64_t iy1 = std::min<int64_t>(s.i0 + 1, h - 1);
        for (int64_t ix = 0; ix < w; ++ix) {
          const int64_t ix1 = std::min<int64_t>(ix + 1, w - 1);
          const float* a = M + (s.i0 * w + ix) * C;
          const float* b = M + (s.i0 * w + ix1) * C;
          const float* c = M + (iy1 * w + ix) * C;
          const float* d = M + (iy1 * w + ix1) * C;
          for (int64_t k = 0; k < C; ++k) {
            lower[k] = std::min(std::min(a[k], b[k]), std::min(c[k], d[k]));
            upper[k] = std::max(std::max(a[k], b[k]), std::max(c[k], d[k]));
          }
          float best_lower = kNegInf;
          for (int64_t k = 0; k < C; ++k) best_lower = std::max(best_lower, lower[k]);
          const float cut = best_lower - std::fabs(best_lower) * tie_margin;
          cand_start[ix] = (int64_t)cand.size();
          for (int64_t k = 0; k < C; ++k)
            if (upper[k] >= cut) cand.push_back((int32_t)k);
        }
        cand_start[w] = (int64_t)cand.size();
      }
      const float* r0 = M + s.i0 * w * C;
      const float* r1 = M + s.i1 * w * C;
      for (int64_t x = 0; x < W; ++x) {
        const MfLinearTap t = tx[x];
        int64_t best_c = 0;
        float best = kNegInf;
        for (int64_t i = cand_start[t.i0]; i < cand_start[t.i0 + 1]; ++i) {
          const int64_t k = cand[i];
          const float top = r0[t.i0 * C + k] * t.l0 + r0[t.i1 * C + k] * t.l1;
          const float bottom = r1[t.i0 * C + k] * t.l0 + r1[t.i1 * C + k] * t.l1;
          const float v = top * s.l0 + bottom * s.l1;
          if (v > best) {  // ties keep the lowest class, as torch.argmax
            best = v;
            best_c = k;
          }
        }
        L[y * W + x] = best_c;
      }
    }
  });
  return labels;
}

// ------------------------------------------------------------------------------------------------
// Host side of the GPU paths: bit masks -> RLE counts / crops, reading only the bbox.
// ------------------------------------------------------------------------------------------------
namespace {

void check_bits(const at::Tensor& bits, const at::Tensor& boxes, int64_t W) {
  TORCH_CHECK(bits.device().is_cpu() && bits.scalar_type() == at::kByte && bits.dim() == 3 && bits.is_contiguous(),
              "bit masks must be a contiguous CPU uint8 tensor [K, H, row_bytes], got ", bits.sizes(), " ",
              bits.scalar_type());
  TORCH_CHECK(W >= 1 && bits.size(2) == 4 * mf_bit_words((int32_t)W), "bit masks of width ", W, " need ",
              4 * mf_bit_words((int32_t)W), " bytes per row, got ", bits.size(2));
  TORCH_CHECK(boxes.device().is_cpu() && boxes.scalar_type() == at::kInt && boxes.dim() == 2 &&
                  boxes.size(0) == bits.size(0) && boxes.size(1) == 4,
              "boxes must be a CPU int32 tensor [K, 4], got ", boxes.sizes(), " ", boxes.scalar_type());
}

inline bool bit_at(const uint8_t* mask, int64_t row_bytes, int64_t y, int64_t x) {
  return (mask[y * row_bytes + (x >> 3)] >> (x & 7)) & 1;
}

}  // namespace

std::vector<at::Tensor> rle_counts_from_bits(const at::Tensor& bits, const at::Tensor& boxes, int64_t W) {
  check_bits(bits, boxes, W);
  const int64_t K = bits.size(0), H = bits.size(1), row_bytes = bits.size(2);
  const at::Tensor boxes_c = boxes.contiguous();
  const int32_t* B = boxes_c.data_ptr<int32_t>();
  std::vector<std::vector<int64_t>> all(K);
  at::parallel_for(0, K, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const uint8_t* mask = bits.data_ptr<uint8_t>() + k * H * row_bytes;
      const int64_t x1 = B[4 * k], y1 = B[4 * k + 1], x2 = B[4 * k + 2], y2 = B[4 * k + 3];
      RunCounter runs;
      if (x2 >= 0) {  // pixels outside the box are 0
        for (int64_t x = x1; x <= x2; ++x) {
          for (int64_t y = y1; y <= y2; ++y) runs.at(bit_at(mask, row_bytes, y, x), x * H + y);
          const int64_t next = x * H + y2 + 1;  // the pixel after this column's part of the box is 0 ...
          const bool next_in_box = y2 == H - 1 && y1 == 0 && x < x2;  // ... unless the next column takes over
          if (!next_in_box && next < H * W) runs.at(false, next);
        }
      }
      runs.finish(H * W);
      all[k] = std::move(runs.counts);
    }
  });
  std::vector<at::Tensor> out;
  for (auto& c : all) {
    at::Tensor t = at::empty({(int64_t)c.size()}, at::kLong);
    std::memcpy(t.data_ptr<int64_t>(), c.data(), c.size() * sizeof(int64_t));
    out.push_back(t);
  }
  return out;
}

std::vector<at::Tensor> crops_from_bits(const at::Tensor& bits, const at::Tensor& boxes, int64_t W) {
  check_bits(bits, boxes, W);
  const int64_t K = bits.size(0), H = bits.size(1), row_bytes = bits.size(2);
  const at::Tensor boxes_c = boxes.contiguous();
  const int32_t* B = boxes_c.data_ptr<int32_t>();
  std::vector<at::Tensor> out;
  for (int64_t k = 0; k < K; ++k) {
    const int64_t x1 = B[4 * k], y1 = B[4 * k + 1], x2 = B[4 * k + 2], y2 = B[4 * k + 3];
    if (x2 < 0) {
      out.push_back(at::empty({0, 0}, at::kBool));
      continue;
    }
    at::Tensor crop = at::empty({y2 - y1 + 1, x2 - x1 + 1}, at::kBool);
    bool* c = crop.data_ptr<bool>();
    const uint8_t* mask = bits.data_ptr<uint8_t>() + k * H * row_bytes;
    for (int64_t y = y1; y <= y2; ++y)
      for (int64_t x = x1; x <= x2; ++x) *c++ = bit_at(mask, row_bytes, y, x);
    out.push_back(crop);
  }
  return out;
}

}  // namespace mf
