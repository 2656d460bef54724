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
// for the semantic label map. The host side of the GPU paths (bit masks -> RLE counts, crops) is in
// encode.cpp.
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>

#include "ops.h"
#include "postprocess.h"
#include "runs.h"

namespace mf {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// A column whose two source columns peak below thr / (1 + kSkipMargin) has no pixel >= thr: the bilinear
// value is a convex combination, so it exceeds its inputs' max by a few float ulps at most.
constexpr float kSkipMargin = 1e-5f;
// Relative margin of the candidate pruning of the ownership map and the label map (float rounding).
constexpr float kTieMargin = 2e-5f;

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
  int64_t height() const { return empty() ? 0 : y2 - y1 + 1; }
  int64_t width() const { return empty() ? 0 : x2 - x1 + 1; }
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
      const int64_t ch = o.box.height(), cw = o.box.width();
      at::Tensor c = at::empty({ch, cw}, at::kBool);
      if (ch * cw > 0) std::memcpy(c.data_ptr<bool>(), o.crop.data(), ch * cw);
      crops.push_back(c);
    }
  }
  return {areas, boxes, prob_sums, counts, crops};
}

// Candidate pruning, exact: inside the low-res cell with corners a, b, c, d (n values each: the Q queries
// or the C classes) every bilinear value of entry i lies between the min and max of its 4 corners, times
// scale[i] (the ownership map's scores; nullptr: 1). So i can only win a pixel of the cell if its upper
// bound reaches the best lower bound (less a rounding margin): typically 1-3 of 100 or 150 entries.
// `LineCandidates` keeps them for every cell along one low-res line (a column of cells for the ownership
// map, a row for the label map), rebuilt when the line changes; they are tried in ascending order, so
// ties keep the lowest index.
struct LineCandidates {
  std::vector<float> lower, upper;
  std::vector<int32_t> cand;
  std::vector<int64_t> start;  // cell i's candidates: cand[start[i] .. start[i + 1])
  int64_t line = -1;

  LineCandidates(int64_t n, int64_t cells) : lower(n), upper(n), start(cells + 1) {}

  // corners(i) -> the 4 corner pointers (a, b, c, d) of cell i of the line (`cell_corners`).
  template <typename Corners>
  void build(int64_t new_line, const float* scale, Corners corners) {
    if (new_line == line) return;
    line = new_line;
    cand.clear();
    const int64_t cells = (int64_t)start.size() - 1, n = (int64_t)lower.size();
    for (int64_t i = 0; i < cells; ++i) {
      start[i] = (int64_t)cand.size();
      const std::array<const float*, 4> p = corners(i);
      for (int64_t j = 0; j < n; ++j) {
        const float mn = std::min(std::min(p[0][j], p[1][j]), std::min(p[2][j], p[3][j]));
        const float mx = std::max(std::max(p[0][j], p[1][j]), std::max(p[2][j], p[3][j]));
        lower[j] = scale ? std::min(scale[j] * mn, scale[j] * mx) : mn;  // a negative score flips the bounds
        upper[j] = scale ? std::max(scale[j] * mn, scale[j] * mx) : mx;
      }
      float best_lower = kNegInf;
      for (int64_t j = 0; j < n; ++j) best_lower = std::max(best_lower, lower[j]);
      const float cut = best_lower - std::fabs(best_lower) * kTieMargin;
      for (int64_t j = 0; j < n; ++j)
        if (upper[j] >= cut) cand.push_back((int32_t)j);
    }
    start[cells] = (int64_t)cand.size();
  }
};

// The n values at the 4 corners of low-res cell (iy, ix) of an [h, w, n] map: pixels (iy, ix), (iy, ix + 1),
// (iy + 1, ix), (iy + 1, ix + 1), clamped to the map (a one-pixel edge cell repeats its corner).
std::array<const float*, 4> cell_corners(const float* map, int64_t h, int64_t w, int64_t n, int64_t iy, int64_t ix) {
  const int64_t iy1 = std::min<int64_t>(iy + 1, h - 1), ix1 = std::min<int64_t>(ix + 1, w - 1);
  return {map + (iy * w + ix) * n, map + (iy * w + ix1) * n, map + (iy1 * w + ix) * n, map + (iy1 * w + ix1) * n};
}

// ------------------------------------------------------------------------------------------------
// Threshold mode
// ------------------------------------------------------------------------------------------------

// What every query of one threshold-mode call shares.
struct ThresholdPlan {
  int64_t h, w, H, W;
  std::vector<MfLinearTap> ty, tx;
  // Output rows that read low-res row iy or a later one / iy or an earlier one (taps are monotone in y).
  std::vector<int64_t> first_row_at_or_after, last_row_at_or_before;
  float thr, skip_below;  // a value whose taps are all below skip_below is below thr
  bool strict, want_rle, want_crops;

  ThresholdPlan(int64_t h_, int64_t w_, int64_t H_, int64_t W_, double thr_d, bool strict_, bool rle, bool crops)
      : h(h_), w(w_), H(H_), W(W_), ty(linear_taps(h_, H_)), tx(linear_taps(w_, W_)),
        first_row_at_or_after(h_, H_), last_row_at_or_before(h_, -1),
        thr((float)thr_d),  // the reference compares fp32 probabilities with an fp32 threshold
        skip_below((float)thr_d / (1.f + kSkipMargin)), strict(strict_), want_rle(rle), want_crops(crops) {
    for (int64_t y = H - 1; y >= 0; --y) first_row_at_or_after[ty[y].i1] = y;
    for (int64_t iy = h - 2; iy >= 0; --iy)
      first_row_at_or_after[iy] = std::min(first_row_at_or_after[iy], first_row_at_or_after[iy + 1]);
    for (int64_t y = 0; y < H; ++y) last_row_at_or_before[ty[y].i0] = y;
    for (int64_t iy = 1; iy < h; ++iy)
      last_row_at_or_before[iy] = std::max(last_row_at_or_before[iy], last_row_at_or_before[iy - 1]);
  }
};

// Per-thread buffers of `threshold_query`.
struct ThresholdScratch {
  std::vector<float> col, colmax;
  std::vector<uint8_t> mask_cm;  // column-major mask of the current query (crops only)
  std::vector<int64_t> lo, hi;   // rows of column x evaluated: [lo, hi]
  explicit ThresholdScratch(const ThresholdPlan& plan)
      : col(plan.h), colmax(plan.w), mask_cm(plan.want_crops ? plan.H * plan.W : 0), lo(plan.W), hi(plan.W) {}
};

// Rows [y_lo, y_hi] of output column x with horizontally interpolated taps `col`: threshold, count the
// runs, accumulate the stats, remember the mask for the crop.
void threshold_column(const ThresholdPlan& plan, const float* col, int64_t x, int64_t y_lo, int64_t y_hi,
                      RunCounter& runs, uint8_t* mcol, QueryOut& o) {
  const int64_t col_start = x * plan.H;
  if (plan.want_rle && y_lo > 0) runs.at(false, col_start);
  int32_t ya = -1, yb = -1;
  int64_t area = 0;
  double sum = 0.0;
  for (int64_t y = y_lo; y <= y_hi; ++y) {
    const MfLinearTap s = plan.ty[y];
    const float v = col[s.i0] * s.l0 + col[s.i1] * s.l1;
    const bool fg = plan.strict ? v > plan.thr : v >= plan.thr;
    if (mcol) mcol[y] = fg;
    if (plan.want_rle) runs.at(fg, col_start + y);
    if (fg) {
      if (ya < 0) ya = (int32_t)y;
      yb = (int32_t)y;
      ++area;
      sum += v;
    }
  }
  if (plan.want_rle && y_hi + 1 < plan.H) runs.at(false, col_start + y_hi + 1);
  if (area) {
    o.area += area;
    o.prob_sum += sum;
    o.box.add_segment((int32_t)x, ya, yb);
  }
}

// The crop of query `o`'s box from the column-major mask, reading only the rows each column evaluated.
void crop_from_columns(const ThresholdPlan& plan, const ThresholdScratch& s, QueryOut& o) {
  const int64_t ch = o.box.height(), cw = o.box.width();
  o.crop.assign(ch * cw, 0);
  for (int64_t c = 0; c < cw; ++c) {
    const int64_t x = o.box.x1 + c;
    const int64_t r_lo = std::max(s.lo[x], (int64_t)o.box.y1), r_hi = std::min(s.hi[x], (int64_t)o.box.y2);
    for (int64_t y = r_lo; y <= r_hi; ++y) o.crop[(y - o.box.y1) * cw + c] = s.mask_cm[x * plan.H + y];
  }
}

// One query, column by column in RLE order: p [h, w] fp32 probabilities.
void threshold_query(const ThresholdPlan& plan, const float* p, ThresholdScratch& s, QueryOut& o) {
  const int64_t h = plan.h, w = plan.w;
  for (int64_t ix = 0; ix < w; ++ix) s.colmax[ix] = kNegInf;
  for (int64_t iy = 0; iy < h; ++iy)
    for (int64_t ix = 0; ix < w; ++ix) s.colmax[ix] = std::max(s.colmax[ix], p[iy * w + ix]);  // NaN ignored
  RunCounter runs;
  for (int64_t x = 0; x < plan.W; ++x) {
    const MfLinearTap t = plan.tx[x];
    const int64_t col_start = x * plan.H;
    s.lo[x] = 0;
    s.hi[x] = -1;
    if (std::max(s.colmax[t.i0], s.colmax[t.i1]) < plan.skip_below) {  // no foreground in this column
      if (plan.want_rle) runs.at(false, col_start);
      continue;
    }
    int64_t iy_lo = h, iy_hi = -1;
    for (int64_t iy = 0; iy < h; ++iy) {
      s.col[iy] = p[iy * w + t.i0] * t.l0 + p[iy * w + t.i1] * t.l1;
      if (s.col[iy] >= plan.skip_below) {
        iy_lo = std::min(iy_lo, iy);
        iy_hi = iy;
      }
    }
    if (iy_hi < 0) {
      if (plan.want_rle) runs.at(false, col_start);
      continue;
    }
    // Only rows with a tap in [iy_lo, iy_hi] can reach thr; the rest of the column is 0.
    s.lo[x] = plan.first_row_at_or_after[iy_lo];
    s.hi[x] = plan.last_row_at_or_before[iy_hi];
    threshold_column(plan, s.col.data(), x, s.lo[x], s.hi[x], runs,
                     plan.want_crops ? s.mask_cm.data() + col_start : nullptr, o);
  }
  if (plan.want_rle) {
    runs.finish(plan.H * plan.W);
    o.counts = std::move(runs.counts);
  }
  if (plan.want_crops && !o.box.empty()) crop_from_columns(plan, s, o);
}

// ------------------------------------------------------------------------------------------------
// Ownership mode
// ------------------------------------------------------------------------------------------------

// query -> output row (index Q: "no owner" -> -1), checking that `queries` index [0, Q) without repeats.
std::vector<int64_t> query_slots(const int64_t* qidx, int64_t K, int64_t Q) {
  std::vector<int64_t> slot(Q + 1, -1);
  for (int64_t k = 0; k < K; ++k) {
    TORCH_CHECK(qidx[k] >= 0 && qidx[k] < Q, "mask_postprocess[cpp]: query index ", qidx[k], " out of [0, ", Q, ")");
    TORCH_CHECK(slot[qidx[k]] < 0, "mask_postprocess[cpp]: query index ", qidx[k], " repeated");
    slot[qidx[k]] = k;
  }
  return slot;
}

// owner / owner_prob [H, W] column-major of P [h, w, Q] probabilities and S [Q] scores, parallel over output
// columns; only the candidates of each low-res cell (`LineCandidates`) are interpolated.
void owner_map(const float* P, const float* S, int64_t Q, int64_t h, int64_t w, int64_t H, int64_t W,
               std::vector<int32_t>& owner, std::vector<float>& owner_prob) {
  const std::vector<MfLinearTap> ty = linear_taps(h, H), tx = linear_taps(w, W);
  at::parallel_for(0, W, 1, [&](int64_t begin, int64_t end) {
    LineCandidates lines(Q, h);  // the cells between low-res columns i0 and i0 + 1, by row
    for (int64_t x = begin; x < end; ++x) {
      const MfLinearTap t = tx[x];
      lines.build(t.i0, S, [&](int64_t iy) { return cell_corners(P, h, w, Q, iy, t.i0); });
      for (int64_t y = 0; y < H; ++y) {
        const MfLinearTap s = ty[y];
        const float* r0 = P + s.i0 * w * Q;
        const float* r1 = P + s.i1 * w * Q;
        float best = kNegInf, best_p = 0.f;
        int32_t best_q = (int32_t)Q;
        for (int64_t i = lines.start[s.i0]; i < lines.start[s.i0 + 1]; ++i) {
          const int64_t q = lines.cand[i];
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
}

// One sequential pass over the vertical runs of the owner map: stats and RLE counts of the K queries.
std::vector<QueryOut> owner_outputs(const std::vector<int32_t>& owner, const std::vector<float>& owner_prob,
                                    const std::vector<int64_t>& slot, int64_t K, int64_t H, int64_t W,
                                    bool want_rle) {
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
  for (int64_t k = 0; k < K; ++k)
    if (want_rle && run_end[k] < H * W) outs[k].counts.push_back(H * W - run_end[k]);
  return outs;
}

// The crop of query q's box from the column-major owner map.
void crop_from_owner(const std::vector<int32_t>& owner, int64_t H, int32_t q, QueryOut& out) {
  const int64_t ch = out.box.height(), cw = out.box.width();
  out.crop.assign(ch * cw, 0);
  for (int64_t c = 0; c < cw; ++c) {
    const int32_t* ocol = owner.data() + (out.box.x1 + c) * H + out.box.y1;
    for (int64_t r = 0; r < ch; ++r) out.crop[r * cw + c] = ocol[r] == q;
  }
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// Threshold mode: one pass per query, parallel over queries.
// ------------------------------------------------------------------------------------------------
MaskStats mask_stats_cpu(const at::Tensor& logits, int64_t H, int64_t W, double thr, bool strict, bool want_rle,
                         bool want_crops) {
  check_logits(logits, H, W, "mask_postprocess[cpp]");
  const int64_t K = logits.size(0), h = logits.size(1), w = logits.size(2);
  const at::Tensor probs = sigmoid_probs(logits);
  const float* P = probs.data_ptr<float>();
  const ThresholdPlan plan(h, w, H, W, thr, strict, want_rle, want_crops);
  std::vector<QueryOut> outs(K);
  at::parallel_for(0, K, 1, [&](int64_t begin, int64_t end) {
    ThresholdScratch scratch(plan);
    for (int64_t k = begin; k < end; ++k) threshold_query(plan, P + k * h * w, scratch, outs[k]);
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
  const std::vector<int64_t> slot = query_slots(qidx, K, Q);

  // probs laid out [h, w, Q] so that the per-pixel loop over queries is contiguous.
  const at::Tensor probs = sigmoid_probs(logits).permute({1, 2, 0}).contiguous();
  const at::Tensor s_c = scores.to(at::kFloat).contiguous();
  std::vector<int32_t> owner(H * W);  // column-major
  std::vector<float> owner_prob(H * W);
  owner_map(probs.data_ptr<float>(), s_c.data_ptr<float>(), Q, h, w, H, W, owner, owner_prob);

  std::vector<QueryOut> outs = owner_outputs(owner, owner_prob, slot, K, H, W, want_rle);
  if (want_crops)
    for (int64_t k = 0; k < K; ++k)
      if (!outs[k].box.empty()) crop_from_owner(owner, H, (int32_t)qidx[k], outs[k]);
  return pack_outputs(outs, want_rle, want_crops);
}

// ------------------------------------------------------------------------------------------------
// Semantic label map: class score maps at stride 4 (one GEMM), then C values interpolated per pixel.
// Bilinear interpolation is linear, so argmax_c sum_q w_qc bilinear(p_q) = argmax_c bilinear(sum_q w_qc p_q)
// up to float rounding, at 1/Q of the work. Parallel over output rows; only the candidates of each
// low-res cell (`LineCandidates`) are interpolated.
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

  at::parallel_for(0, H, 1, [&](int64_t begin, int64_t end) {
    LineCandidates lines(C, w);  // the cells between low-res rows i0 and i0 + 1, by column
    for (int64_t y = begin; y < end; ++y) {
      const MfLinearTap s = ty[y];
      lines.build(s.i0, nullptr, [&](int64_t ix) { return cell_corners(M, h, w, C, s.i0, ix); });
      const float* r0 = M + s.i0 * w * C;
      const float* r1 = M + s.i1 * w * C;
      for (int64_t x = 0; x < W; ++x) {
        const MfLinearTap t = tx[x];
        int64_t best_c = 0;
        float best = kNegInf;
        for (int64_t i = lines.start[t.i0]; i < lines.start[t.i0 + 1]; ++i) {
          const int64_t k = lines.cand[i];
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

}  // namespace mf
