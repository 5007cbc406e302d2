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
// Registered as torch.ops.up2_masks.paste_positive (CPU), in its own library (built by
// python -m up2.layers.build_kernels paste_masks; see up2/layers/paste_masks_library.py).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

// Compiled for x86-64-v3 (AVX2 gathers, FMA) and the baseline ISA, as the MSDA kernel is; the
// loader picks the clone for the running CPU.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && !defined(UP2_MSDA_NO_CLONES)
#define UP2_MASKS_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define UP2_MASKS_CLONES
#endif

// One output row: blend the R input rows into `row` (Wm floats), then threshold every output
// pixel's C column taps.
template <int C>
__attribute__((always_inline)) inline void paste_row(const float* mask, int64_t Wm, const int64_t* ri,
                                                     const float* rw, int64_t R, const int32_t* ci, const float* cw,
                                                     int64_t out_w, float* __restrict__ row, bool* __restrict__ out,
                                                     int64_t C_any) {
  std::fill(row, row + Wm, 0.f);
  for (int64_t r = 0; r < R; ++r) {
    const float w = rw[r];
    if (w == 0.f) continue;
    const float* __restrict__ src = mask + ri[r] * Wm;
#pragma omp simd
    for (int64_t x = 0; x < Wm; ++x) row[x] += w * src[x];
  }
  const int64_t taps = C > 0 ? C : C_any;
#pragma omp simd
  for (int64_t j = 0; j < out_w; ++j) {
    float v = 0.f;
    for (int64_t c = 0; c < taps; ++c) v += cw[j * taps + c] * row[ci[j * taps + c]];
    out[j] = v > 0.f;
  }
}

UP2_MASKS_CLONES void paste_rows(const float* lg, int64_t Hm, int64_t Wm, int64_t out_h, const int64_t* ri,
                                 const float* rw, int64_t R, const int32_t* ci, const float* cw, int64_t out_w,
                                 int64_t C, bool* op, int64_t begin, int64_t end) {
  std::vector<float> row(Wm);
  for (int64_t t = begin; t < end; ++t) {
    const int64_t k = t / out_h, i = t % out_h;
    const float* mask = lg + k * Hm * Wm;
    bool* o = op + t * out_w;
    if (C == 2) {
      paste_row<2>(mask, Wm, ri + i * R, rw + i * R, R, ci, cw, out_w, row.data(), o, C);
    } else if (C == 4) {
      paste_row<4>(mask, Wm, ri + i * R, rw + i * R, R, ci, cw, out_w, row.data(), o, C);
    } else {
      paste_row<0>(mask, Wm, ri + i * R, rw + i * R, R, ci, cw, out_w, row.data(), o, C);
    }
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
  const at::Tensor ci32 = ci.to(at::kInt);  // 32-bit column indices (< Wm): AVX2 gathers
  const int32_t* cip = ci32.data_ptr<int32_t>();
  const float* cwp = cw.data_ptr<float>();
  bool* op = out.data_ptr<bool>();
  at::parallel_for(0, K * out_h, 8, [&](int64_t begin, int64_t end) {
    paste_rows(lg, Hm, Wm, out_h, rip, rwp, R, cip, cwp, out_w, C, op, begin, end);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(up2_masks, m) {
  m.def("paste_positive(Tensor logits, Tensor row_index, Tensor row_weight, Tensor col_index, Tensor col_weight) "
        "-> Tensor");
}

TORCH_LIBRARY_IMPL(up2_masks, CPU, m) { m.impl("paste_positive", &paste_positive); }
