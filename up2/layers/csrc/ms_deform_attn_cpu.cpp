// CPU kernel of multi-scale deformable attention (Deformable DETR, Eq. 3), forward and backward.
//
// Shapes (see up2/layers/msda/__init__.py):
//   value              (N, S, M, Dh)     float32 / float64, contiguous
//   spatial_shapes     (L, 2)            int64 (h, w); levels are stored one after the other in S
//   sampling_locations (N, Lq, M, L, P, 2) normalised (x, y); pixel centres at (i + 0.5) / size
//   attention_weights  (N, Lq, M, L, P)
//   output             (N, Lq, M * Dh)
//
// Sampling is bilinear with zero padding, i.e. the same as F.grid_sample(mode="bilinear",
// padding_mode="zeros", align_corners=False) on the grid 2 * loc - 1.
//
// Forward: chunks of (n, q) rows; every sample adds its 4 corner rows of Dh contiguous channels
// into a per-head accumulator (a vectorisable loop; Dh = 32 is unrolled at compile time).
// Backward: one task per (n, m, channel block). grad_value rows of a head / channel block are
// written by exactly one task, so no atomics are needed; the gradients of the locations and
// weights need the dot product over all Dh channels, so each block writes a partial sum that
// is added up after the parallel loop.
//
// Registered as torch.ops.up2_msda.forward / torch.ops.up2_msda.backward (CPU).

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

namespace {

// Bilinear footprint of one sample on an (h, w) map: up to 4 corners (pixel offset in the
// level, interpolation weight) plus the derivatives of each weight wrt the pixel coordinates.
template <typename scalar_t>
struct Footprint {
  int count = 0;
  int64_t pixel[4];
  scalar_t weight[4];
  scalar_t dweight_dx[4];
  scalar_t dweight_dy[4];
};

// Pixel coordinate of normalised location `loc` on an axis of `size` pixels, computed as
// grid_sample does for align_corners=False: ((2 * loc - 1) + 1) * size / 2 - 0.5.
__attribute__((always_inline)) inline double to_pixel(double loc, int64_t size) {
  const double grid = loc * 2.0 - 1.0;
  return (grid + 1.0) * (static_cast<double>(size) / 2.0) - 0.5;
}

// float: ATen's vectorised grid sampler rounds the last multiply-add once (fused); computing it in
// double (the product of a 24-bit and a <= 30-bit number is exact) and rounding to float gives
// the same pixel coordinate, so the fp32 path matches F.grid_sample's to rounding of the sums.
__attribute__((always_inline)) inline float to_pixel(float loc, int64_t size) {
  const float grid = loc * 2.0f - 1.0f;
  return static_cast<float>(static_cast<double>(grid + 1.0f) * (static_cast<double>(size) / 2.0) - 0.5);
}

template <typename scalar_t>
__attribute__((always_inline)) inline Footprint<scalar_t> footprint(scalar_t loc_x, scalar_t loc_y, int64_t h,
                                                                  int64_t w) {
  Footprint<scalar_t> fp;
  const scalar_t px = to_pixel(loc_x, w);
  const scalar_t py = to_pixel(loc_y, h);
  // Entirely outside (all 4 corners in the zero padding), or NaN: nothing to read.
  if (!(px > scalar_t(-1) && px < static_cast<scalar_t>(w) && py > scalar_t(-1) &&
        py < static_cast<scalar_t>(h))) {
    return fp;
  }
  const scalar_t fx0 = std::floor(px);
  const scalar_t fy0 = std::floor(py);
  const int64_t x0 = static_cast<int64_t>(fx0);
  const int64_t y0 = static_cast<int64_t>(fy0);
  const scalar_t tx = px - fx0;  // weight of the right column
  const scalar_t ty = py - fy0;  // weight of the bottom row
  const int64_t xs[2] = {x0, x0 + 1};
  const int64_t ys[2] = {y0, y0 + 1};
  const scalar_t wx[2] = {scalar_t(1) - tx, tx};
  const scalar_t wy[2] = {scalar_t(1) - ty, ty};
  const scalar_t dwx[2] = {scalar_t(-1), scalar_t(1)};
  for (int j = 0; j < 2; ++j) {
    if (ys[j] < 0 || ys[j] >= h) continue;
    for (int i = 0; i < 2; ++i) {
      if (xs[i] < 0 || xs[i] >= w) continue;
      fp.pixel[fp.count] = ys[j] * w + xs[i];
      fp.weight[fp.count] = wx[i] * wy[j];
      fp.dweight_dx[fp.count] = dwx[i] * wy[j];
      fp.dweight_dy[fp.count] = wx[i] * dwx[j];
      ++fp.count;
    }
  }
  return fp;
}

struct Levels {
  std::vector<int64_t> h, w, start;
};

Levels read_levels(const at::Tensor& spatial_shapes, int64_t S) {
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2,
              "up2_msda: spatial_shapes must be (L, 2), got ", spatial_shapes.sizes());
  const at::Tensor shapes = spatial_shapes.to(at::kLong).contiguous();
  const int64_t* data = shapes.data_ptr<int64_t>();
  Levels lv;
  int64_t total = 0;
  for (const auto l : c10::irange(shapes.size(0))) {
    lv.h.push_back(data[2 * l]);
    lv.w.push_back(data[2 * l + 1]);
    lv.start.push_back(total);
    total += data[2 * l] * data[2 * l + 1];
  }
  TORCH_CHECK(total == S, "up2_msda: value has S=", S, " pixels but spatial_shapes sum to ", total);
  return lv;
}

void check_inputs(const at::Tensor& value, const at::Tensor& loc, const at::Tensor& attn, int64_t L) {
  TORCH_CHECK(value.device().is_cpu() && loc.device().is_cpu() && attn.device().is_cpu(),
              "up2_msda: the compiled kernel is CPU only");
  TORCH_CHECK(value.dim() == 4, "up2_msda: value must be (N, S, M, Dh), got ", value.sizes());
  TORCH_CHECK(loc.dim() == 6 && loc.size(0) == value.size(0) && loc.size(2) == value.size(2) &&
                  loc.size(3) == L && loc.size(5) == 2,
              "up2_msda: sampling_locations must be (N, Lq, M, L, P, 2), got ", loc.sizes());
  TORCH_CHECK(attn.dim() == 5 && attn.sizes() == loc.sizes().slice(0, 5),
              "up2_msda: attention_weights must be (N, Lq, M, L, P), got ", attn.sizes());
  TORCH_CHECK(value.scalar_type() == loc.scalar_type() && value.scalar_type() == attn.scalar_type(),
              "up2_msda: value, sampling_locations and attention_weights must share a dtype");
}

// Everything a kernel needs, as raw pointers and sizes.
template <typename scalar_t>
struct Args {
  const scalar_t* value;  // (N, S, M, Dh)
  const scalar_t* loc;    // (N, Lq, M, L, P, 2)
  const scalar_t* attn;   // (N, Lq, M, L, P)
  const scalar_t* grad_out;  // (N, Lq, M * Dh), backward only
  scalar_t* out;          // forward: (N, Lq, M * Dh); backward: grad_value (N, S, M, Dh)
  scalar_t* grad_attn;    // (blocks, N, Lq, M, L, P), backward only
  scalar_t* grad_loc;     // (blocks, N, Lq, M, L, P, 2), backward only
  const Levels* lv;
  int64_t N, S, M, Dh, Lq, L, P, blocks;
};

// Adds the samples of head m of output row `row` into acc[0, Dh) (DH > 0: Dh fixed at compile
// time, so acc can live in registers).
template <typename scalar_t, int DH>
__attribute__((always_inline)) inline void accumulate_head(const Args<scalar_t>& a, int64_t row, int64_t m,
                                                           scalar_t* __restrict__ acc) {
  const int64_t Dh = DH > 0 ? DH : a.Dh;
  const int64_t L = a.L, P = a.P, pix_stride = a.M * Dh;
  const Levels& lv = *a.lv;
  const scalar_t* v_n = a.value + (row / a.Lq) * a.S * pix_stride + m * Dh;
  const int64_t sample0 = (row * a.M + m) * L * P;
  for (int64_t l = 0; l < L; ++l) {
    const scalar_t* v_lm = v_n + lv.start[l] * pix_stride;
    const int64_t h = lv.h[l], w = lv.w[l];
    for (int64_t p = 0; p < P; ++p) {
      const int64_t k = sample0 + l * P + p;
      const auto fp = footprint<scalar_t>(a.loc[2 * k], a.loc[2 * k + 1], h, w);
      const scalar_t aw = a.attn[k];
      if (fp.count == 4) {  // interior sample: the 4 corners in one pass
        const scalar_t w0 = aw * fp.weight[0], w1 = aw * fp.weight[1];
        const scalar_t w2 = aw * fp.weight[2], w3 = aw * fp.weight[3];
        const scalar_t* __restrict__ s0 = v_lm + fp.pixel[0] * pix_stride;
        const scalar_t* __restrict__ s1 = s0 + pix_stride;
        const scalar_t* __restrict__ s2 = v_lm + fp.pixel[2] * pix_stride;
        const scalar_t* __restrict__ s3 = s2 + pix_stride;
#pragma omp simd
        for (int64_t d = 0; d < Dh; ++d) acc[d] += w0 * s0[d] + w1 * s1[d] + w2 * s2[d] + w3 * s3[d];
        continue;
      }
      for (int c = 0; c < fp.count; ++c) {
        const scalar_t wgt = aw * fp.weight[c];
        const scalar_t* __restrict__ src = v_lm + fp.pixel[c] * pix_stride;
#pragma omp simd
        for (int64_t d = 0; d < Dh; ++d) acc[d] += wgt * src[d];
      }
    }
  }
}

// Output rows [begin, end) of (n, q); every output element is written.
template <typename scalar_t, int DH>
__attribute__((always_inline)) inline void forward_rows(const Args<scalar_t>& a, int64_t begin, int64_t end) {
  for (int64_t row = begin; row < end; ++row) {
    for (int64_t m = 0; m < a.M; ++m) {
      scalar_t* __restrict__ dst = a.out + (row * a.M + m) * a.Dh;
      if (DH > 0) {
        scalar_t acc[DH > 0 ? DH : 1] = {};
        accumulate_head<scalar_t, DH>(a, row, m, acc);
        for (int d = 0; d < DH; ++d) dst[d] = acc[d];
      } else {
        for (int64_t d = 0; d < a.Dh; ++d) dst[d] = scalar_t(0);
        accumulate_head<scalar_t, DH>(a, row, m, dst);
      }
    }
  }
}

// Backward tasks [begin, end) of (n, m, channel block). LEN > 0 fixes the block length.
template <typename scalar_t, int LEN>
__attribute__((always_inline)) inline void backward_tasks(const Args<scalar_t>& a, int64_t begin, int64_t end) {
  const int64_t M = a.M, L = a.L, P = a.P, Dh = a.Dh, blocks = a.blocks, pix_stride = a.M * a.Dh;
  const int64_t block_len = (Dh + blocks - 1) / blocks;
  const int64_t samples = a.N * a.Lq * M * L * P;
  const Levels& lv = *a.lv;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task % blocks;
    const int64_t m = (task / blocks) % M;
    const int64_t n = task / (blocks * M);
    const int64_t d0 = b * block_len;
    const int64_t len = LEN > 0 ? LEN : std::min(Dh, d0 + block_len) - d0;
    if (len <= 0) continue;
    scalar_t* ga = a.grad_attn + b * samples;
    scalar_t* gl = a.grad_loc + b * samples * 2;
    const int64_t value_off = n * a.S * pix_stride + m * Dh + d0;
    for (int64_t q = 0; q < a.Lq; ++q) {
      const int64_t row = n * a.Lq + q;
      const scalar_t* __restrict__ g = a.grad_out + (row * M + m) * Dh + d0;
      const int64_t sample0 = (row * M + m) * L * P;
      for (int64_t l = 0; l < L; ++l) {
        const int64_t level_off = value_off + lv.start[l] * pix_stride;
        for (int64_t p = 0; p < P; ++p) {
          const int64_t k = sample0 + l * P + p;
          const auto fp = footprint<scalar_t>(a.loc[2 * k], a.loc[2 * k + 1], lv.h[l], lv.w[l]);
          if (fp.count == 0) continue;
          const scalar_t w = a.attn[k];
          scalar_t dots[4];  // <grad_out, value row of corner c> over the block's channels
          if (fp.count == 4) {  // interior sample: the 4 corners in one pass
            const int64_t off0 = level_off + fp.pixel[0] * pix_stride;
            const int64_t off2 = level_off + fp.pixel[2] * pix_stride;
            const scalar_t* __restrict__ s0 = a.value + off0;
            const scalar_t* __restrict__ s1 = s0 + pix_stride;
            const scalar_t* __restrict__ s2 = a.value + off2;
            const scalar_t* __restrict__ s3 = s2 + pix_stride;
            scalar_t* __restrict__ t0 = a.out + off0;
            scalar_t* __restrict__ t1 = t0 + pix_stride;
            scalar_t* __restrict__ t2 = a.out + off2;
            scalar_t* __restrict__ t3 = t2 + pix_stride;
            const scalar_t w0 = w * fp.weight[0], w1 = w * fp.weight[1];
            const scalar_t w2 = w * fp.weight[2], w3 = w * fp.weight[3];
            scalar_t e0 = 0, e1 = 0, e2 = 0, e3 = 0;
#pragma omp simd reduction(+ : e0, e1, e2, e3)
            for (int64_t d = 0; d < len; ++d) {
              const scalar_t gd = g[d];
              t0[d] += w0 * gd;
              t1[d] += w1 * gd;
              t2[d] += w2 * gd;
              t3[d] += w3 * gd;
              e0 += gd * s0[d];
              e1 += gd * s1[d];
              e2 += gd * s2[d];
              e3 += gd * s3[d];
            }
            dots[0] = e0;
            dots[1] = e1;
            dots[2] = e2;
            dots[3] = e3;
          } else {
            for (int c = 0; c < fp.count; ++c) {
              const int64_t off = level_off + fp.pixel[c] * pix_stride;
              const scalar_t* __restrict__ src = a.value + off;
              scalar_t* __restrict__ dst = a.out + off;
              const scalar_t wgt = w * fp.weight[c];
              scalar_t dot = 0;
#pragma omp simd reduction(+ : dot)
              for (int64_t d = 0; d < len; ++d) {
                dst[d] += wgt * g[d];
                dot += g[d] * src[d];
              }
              dots[c] = dot;
            }
          }
          scalar_t grad_a = 0, grad_px = 0, grad_py = 0;
          for (int c = 0; c < fp.count; ++c) {
            grad_a += fp.weight[c] * dots[c];
            grad_px += fp.dweight_dx[c] * dots[c];
            grad_py += fp.dweight_dy[c] * dots[c];
          }
          ga[k] = grad_a;
          // d(pixel x)/d(loc x) = w, d(pixel y)/d(loc y) = h.
          gl[2 * k] = w * grad_px * static_cast<scalar_t>(lv.w[l]);
          gl[2 * k + 1] = w * grad_py * static_cast<scalar_t>(lv.h[l]);
        }
      }
    }
  }
}

// Entry points of the kernels, compiled twice on x86-64 with GCC >= 12: for x86-64-v3 (AVX2, FMA) and
// the baseline ISA; the loader picks the clone for the running CPU (target_clones / ifunc).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && !defined(UP2_MSDA_NO_CLONES)
#define UP2_MSDA_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define UP2_MSDA_CLONES
#endif

UP2_MSDA_CLONES void run_forward_rows(const Args<float>& a, int64_t begin, int64_t end) {
  if (a.Dh == 32) {
    forward_rows<float, 32>(a, begin, end);
  } else {
    forward_rows<float, 0>(a, begin, end);
  }
}

UP2_MSDA_CLONES void run_forward_rows(const Args<double>& a, int64_t begin, int64_t end) {
  forward_rows<double, 0>(a, begin, end);
}

UP2_MSDA_CLONES void run_backward_tasks(const Args<float>& a, int64_t begin, int64_t end) {
  if (a.Dh == 32 && a.blocks == 1) {
    backward_tasks<float, 32>(a, begin, end);
  } else {
    backward_tasks<float, 0>(a, begin, end);
  }
}

UP2_MSDA_CLONES void run_backward_tasks(const Args<double>& a, int64_t begin, int64_t end) {
  backward_tasks<double, 0>(a, begin, end);
}

// at::parallel_for with dynamic scheduling: one worker per thread, each taking the next chunk of
// `chunk` items until none is left, so a thread slowed down by other processes on shared cores
// does not hold the others up (parallel_for alone splits the range in equal static parts).
template <typename F>
void parallel_chunks(int64_t items, int64_t chunk, const F& f) {
  const int64_t chunks = (items + chunk - 1) / chunk;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), chunks));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t c = next++; c < chunks; c = next++) f(c * chunk, std::min(items, (c + 1) * chunk));
  });
}

template <typename scalar_t>
void forward_kernel(const Args<scalar_t>& a) {
  parallel_chunks(a.N * a.Lq, 64, [&](int64_t begin, int64_t end) { run_forward_rows(a, begin, end); });
}

template <typename scalar_t>
void backward_kernel(const Args<scalar_t>& a) {
  parallel_chunks(a.N * a.M * a.blocks, 1, [&](int64_t begin, int64_t end) { run_backward_tasks(a, begin, end); });
}

at::Tensor msda_forward(const at::Tensor& value_in, const at::Tensor& spatial_shapes,
                        const at::Tensor& loc_in, const at::Tensor& attn_in) {
  const int64_t L = spatial_shapes.size(0);
  check_inputs(value_in, loc_in, attn_in, L);
  const at::Tensor value = value_in.contiguous();
  const at::Tensor loc = loc_in.contiguous();
  const at::Tensor attn = attn_in.contiguous();
  const int64_t N = value.size(0), S = value.size(1), M = value.size(2), Dh = value.size(3);
  const int64_t Lq = loc.size(1), P = loc.size(4);
  const Levels lv = read_levels(spatial_shapes, S);
  at::Tensor out = at::empty({N, Lq, M * Dh}, value.options());

  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "up2_msda_forward", [&] {
    Args<scalar_t> a{value.data_ptr<scalar_t>(), loc.data_ptr<scalar_t>(), attn.data_ptr<scalar_t>(), nullptr,
                     out.data_ptr<scalar_t>(), nullptr, nullptr, &lv, N, S, M, Dh, Lq, L, P, 1};
    forward_kernel<scalar_t>(a);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> msda_backward(
    const at::Tensor& grad_out_in, const at::Tensor& value_in, const at::Tensor& spatial_shapes,
    const at::Tensor& loc_in, const at::Tensor& attn_in) {
  const int64_t L = spatial_shapes.size(0);
  check_inputs(value_in, loc_in, attn_in, L);
  const at::Tensor value = value_in.contiguous();
  const at::Tensor loc = loc_in.contiguous();
  const at::Tensor attn = attn_in.contiguous();
  const int64_t N = value.size(0), S = value.size(1), M = value.size(2), Dh = value.size(3);
  const int64_t Lq = loc.size(1), P = loc.size(4);
  TORCH_CHECK(grad_out_in.dim() == 3 && grad_out_in.size(0) == N && grad_out_in.size(1) == Lq &&
                  grad_out_in.size(2) == M * Dh,
              "up2_msda: grad_output must be (N, Lq, M * Dh), got ", grad_out_in.sizes());
  const at::Tensor grad_out = grad_out_in.to(value.scalar_type()).contiguous();
  const Levels lv = read_levels(spatial_shapes, S);

  // Channel blocks: enough (n, m, block) tasks to keep every thread busy, blocks of >= 8 channels.
  const int64_t threads = at::get_num_threads();
  int64_t blocks = 1;
  while (N * M * blocks < threads && Dh / (blocks * 2) >= 8) blocks *= 2;

  at::Tensor grad_value = at::zeros_like(value);
  at::Tensor grad_attn_part = at::zeros({blocks, N, Lq, M, L, P}, value.options());
  at::Tensor grad_loc_part = at::zeros({blocks, N, Lq, M, L, P, 2}, value.options());

  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "up2_msda_backward", [&] {
    Args<scalar_t> a{value.data_ptr<scalar_t>(), loc.data_ptr<scalar_t>(), attn.data_ptr<scalar_t>(),
                     grad_out.data_ptr<scalar_t>(), grad_value.data_ptr<scalar_t>(),
                     grad_attn_part.data_ptr<scalar_t>(), grad_loc_part.data_ptr<scalar_t>(), &lv,
                     N, S, M, Dh, Lq, L, P, blocks};
    backward_kernel<scalar_t>(a);
  });
  at::Tensor grad_attn = blocks == 1 ? grad_attn_part[0] : grad_attn_part.sum(0);
  at::Tensor grad_loc = blocks == 1 ? grad_loc_part[0] : grad_loc_part.sum(0);
  return std::make_tuple(grad_value, grad_loc, grad_attn);
}

}  // namespace

TORCH_LIBRARY(up2_msda, m) {
  m.def("forward(Tensor value, Tensor spatial_shapes, Tensor sampling_locations, Tensor attention_weights) -> Tensor");
  m.def("backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, Tensor sampling_locations, "
        "Tensor attention_weights) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(up2_msda, CPU, m) {
  m.impl("forward", &msda_forward);
  m.impl("backward", &msda_backward);
}
