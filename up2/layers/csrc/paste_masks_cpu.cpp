// CPU kernel for pasting low-resolution mask logits at image size as binary masks.
//
// A bilinear resize (or two in a row) is a separable linear map: output row i is a weighted
// sum of a few input rows, output column j of a few input columns. Given those taps,
//
//   out[k, i, j] = ( sum_r sum_c row_weight[i, r] * col_weight[j, c]
//                      * logits[k, row_index[i, r], col_index[j, c]] ) > 0
//
// Shapes:
//   logits                  (K, Hm, Wm)  float32
//   row_index, row_weight   (out_h, R)   int64 / float32, R taps per output row
//   col_index, col_weight   (out_w, C)   int64 / float32, C taps per output column
//   output                  (K, out_h, out_w) bool
//
// One task per (k, i) output row: the R input rows are blended into one Wm-long row, then
// every output pixel reads its C taps from it and is compared with 0. No float image of the
// output size is ever written. The taps come from Python (up2/layers/paste_masks.py), which
// reads them off F.interpolate itself.
//
// Registered as torch.ops.up2_masks.paste_positive (CPU), in the same library as the
// deformable-attention kernel (built by up2/layers/build_msda.py).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

template <int C>
inline void threshold_row(const float* row, const int64_t* ci, const float* cw, int64_t out_w, bool* out) {
  for (int64_t j = 0; j < out_w; ++j) {
    float v = 0.f;
    for (int c = 0; c < C; ++c) v += cw[j * C + c] * row[ci[j * C + c]];
    out[j] = v > 0.f;
  }
}

inline void threshold_row_any(const float* row, const int64_t* ci, const float* cw, int64_t out_w, int64_t C,
                              bool* out) {
  for (int64_t j = 0; j < out_w; ++j) {
    float v = 0.f;
    for (int64_t c = 0; c < C; ++c) v += cw[j * C + c] * row[ci[j * C + c]];
    out[j] = v > 0.f;
  }
}

void check_taps(const at::Tensor& index, const at::Tensor& weight, int64_t size, const char* name) {
  TORCH_CHECK(index.dim() == 2 && index.scalar_type() == at::kLong, "up2_masks: ", name,
              "_index must be (out, taps) int64, got ", index.sizes(), " ", index.scalar_type());
  TORCH_CHECK(weight.sizes() == index.sizes() && weight.scalar_type() == at::kFloat, "up2_masks: ", name,
              "_weight must be float32 of the index's shape ", index.sizes(), ", got ", weight.sizes(), " ",
              weight.scalar_type());
  TORCH_CHECK(index.size(1) >= 1, "up2_masks: ", name, "_index needs at least one tap per output");
  if (index.numel() > 0) {
    const int64_t lo = index.min().item<int64_t>(), hi = index.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < size, "up2_masks: ", name, "_index values must be in [0, ", size, "), got [", lo,
                ", ", hi, "]");
  }
}

at::Tensor paste_positive(const at::Tensor& logits_in, const at::Tensor& row_index_in,
                          const at::Tensor& row_weight_in, const at::Tensor& col_index_in,
                          const at::Tensor& col_weight_in) {
  TORCH_CHECK(logits_in.dim() == 3 && logits_in.scalar_type() == at::kFloat,
              "up2_masks: logits must be (K, Hm, Wm) float32, got ", logits_in.sizes(), " ", logits_in.scalar_type());
  const int64_t K = logits_in.size(0), Hm = logits_in.size(1), Wm = logits_in.size(2);
  check_taps(row_index_in, row_weight_in, Hm, "row");
  check_taps(col_index_in, col_weight_in, Wm, "col");
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor ri = row_index_in.contiguous(), rw = row_weight_in.contiguous();
  const at::Tensor ci = col_index_in.contiguous(), cw = col_weight_in.contiguous();
  const int64_t out_h = ri.size(0), R = ri.size(1), out_w = ci.size(0), C = ci.size(1);
  at::Tensor out = at::empty({K, out_h, out_w}, logits.options().dtype(at::kBool));
  if (out.numel() == 0) return out;

  const float* lg = logits.data_ptr<float>();
  const int64_t* rip = ri.data_ptr<int64_t>();
  const float* rwp = rw.data_ptr<float>();
  const int64_t* cip = ci.data_ptr<int64_t>();
  const float* cwp = cw.data_ptr<float>();
  bool* op = out.data_ptr<bool>();
  at::parallel_for(0, K * out_h, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> row(Wm);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t k = t / out_h, i = t % out_h;
      const float* mask = lg + k * Hm * Wm;
      std::fill(row.begin(), row.end(), 0.f);
      for (int64_t r = 0; r < R; ++r) {
        const float w = rwp[i * R + r];
        if (w == 0.f) continue;
        const float* src = mask + rip[i * R + r] * Wm;
        float* dst = row.data();
#pragma omp simd
        for (int64_t x = 0; x < Wm; ++x) dst[x] += w * src[x];
      }
      bool* o = op + t * out_w;
      if (C == 2) {
        threshold_row<2>(row.data(), cip, cwp, out_w, o);
      } else if (C == 4) {
        threshold_row<4>(row.data(), cip, cwp, out_w, o);
      } else {
        threshold_row_any(row.data(), cip, cwp, out_w, C, o);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(up2_masks, m) {
  m.def("paste_positive(Tensor logits, Tensor row_index, Tensor row_weight, Tensor col_index, Tensor col_weight) "
        "-> Tensor");
}

TORCH_LIBRARY_IMPL(up2_masks, CPU, m) { m.impl("paste_positive", &paste_positive); }
