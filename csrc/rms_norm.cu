// RMSNorm forward (optionally fused with the residual add) and backward.
//
//   rstd = 1 / sqrt(mean(x^2) + eps),   y = x * rstd * w
//   dx   = rstd * (g - x_hat * mean(g * x_hat)) (+ dresidual),   g = dy * w,   x_hat = x * rstd
//   dw   = sum over rows of dy * x_hat
//
// One block per row in the forward (two passes over the row: sum of squares, then scale; the second
// pass re-reads the row from L1/L2). The backward runs a grid of resident blocks, each looping over
// rows; a block keeps its running dw sum for the columns each thread owns in shared memory (global
// memory past kSmemWeightGradCols columns), writes it as one row of a (blocks, n) partial buffer, and
// a second kernel adds those rows, tiled (column_sum_kernel), in a fixed order: dw is deterministic,
// with no atomics.
//
// Mixed dtypes (the residual-in-fp32 design of fused add-norm): the residual stream may be float32
// while the update x is fp16/bf16. The add is in float32, the stream is stored in float32 and y in x's
// dtype; the backward then reads dy in y's dtype and the stream and its gradient in float32, and
// writes the stream's gradient once more in dy's dtype when asked (dx_narrow: the update's gradient,
// in the same pass instead of a cast after it).
#include "common.cuh"
#include "ops.h"

namespace aimv2 {
namespace {

// Columns of dw partial sums kept in shared memory: 44 KB, under the 48 KB a block gets without an
// opt-in (the reduction scratch needs a little more).
constexpr int kSmemWeightGradCols = 11 * 1024;

// Elements per pack when one loop moves rows of two dtypes: 16 bytes of the narrower one (the wider
// one then moves 32 bytes, two accesses), so the narrow loads stay full width.
template <typename A, typename B>
constexpr int kPack = (kVec<A> > kVec<B>) ? kVec<A> : kVec<B>;

// T: x and y (the update); R: the residual and the stream, T or a wider float (see the top).
template <typename T, typename R, typename W, bool kResidual>
__global__ void rms_norm_fwd_kernel(Rows<const T> x,        // (rows, n)
                                    Rows<const R> residual,  // (rows, n), read when kResidual
                                    const W* __restrict__ weight,  // (n,) or nullptr
                                    T* __restrict__ y,             // (rows, n) contiguous
                                    R* __restrict__ stream,        // (rows, n) contiguous: x + residual, when kResidual
                                    float* __restrict__ rstd,      // (rows,)
                                    int n, float eps, bool vec) {
  constexpr int V = kPack<T, R>;
  __shared__ float scratch[kWarp];
  const int64_t row = blockIdx.x;
  const T* xr = x.row(row);
  T* yr = y + row * n;
  R* sr = kResidual ? stream + row * n : nullptr;

  float sum_sq = 0.f;
  for_each_chunk<V>(n, vec, threadIdx.x, blockDim.x, [&](int c, auto width) {
    constexpr int K = decltype(width)::value;
    float a[K];
    load_floats<K>(xr + c, a);
    if constexpr (kResidual) {
      // The stream is stored in R, and normalized as stored (as the reference does).
      float b[K];
      load_floats<K>(residual.row(row) + c, b);
#pragma unroll
      for (int k = 0; k < K; ++k) a[k] = round_to<R>(a[k] + b[k]);
      store_floats<K>(sr + c, a);
    }
#pragma unroll
    for (int k = 0; k < K; ++k) sum_sq += a[k] * a[k];
  });
  const float r = rsqrtf(block_sum(sum_sq, scratch) / n + eps);
  if (threadIdx.x == 0) rstd[row] = r;

  // Each thread re-reads only columns it wrote itself, so the stream needs no barrier. The row read
  // is the stream (R) after an add, x (T) otherwise: a generic lambda takes either.
  auto scale_row = [&](const auto* src) {
    for_each_chunk<V>(n, vec, threadIdx.x, blockDim.x, [&](int c, auto width) {
      constexpr int K = decltype(width)::value;
      float a[K];
      load_floats<K>(src + c, a);
#pragma unroll
      for (int k = 0; k < K; ++k) a[k] *= r;
      if (weight != nullptr) {
        float w[K];
        load_floats<K>(weight + c, w);
#pragma unroll
        for (int k = 0; k < K; ++k) a[k] *= w[k];
      }
      store_floats<K>(yr + c, a);
    });
  };
  if constexpr (kResidual) {
    scale_row(static_cast<const R*>(sr));
  } else {
    scale_row(xr);
  }
}

// G: dy (y's dtype); T: x, dresidual and dx. G is T, or 16-bit under a float32 stream (see the top).
template <typename G, typename T, typename W>
__global__ void rms_norm_bwd_kernel(Rows<const G> dy,              // (rows, n)
                                    Rows<const T> x,               // (rows, n)
                                    const W* __restrict__ weight,  // (n,) or nullptr
                                    const float* __restrict__ rstd,  // (rows,)
                                    Rows<const T> dresidual,       // (rows, n), or data == nullptr
                                    T* __restrict__ dx,            // (rows, n) contiguous
                                    G* __restrict__ dx_narrow,     // (rows, n) contiguous: dx in G, or nullptr
                                    float* __restrict__ dw_partial,  // (gridDim.x, n) when weight
                                    int64_t rows, int n, bool vec) {
  constexpr int V = kPack<G, T>;
  // (n,) when weight and n <= kSmemWeightGradCols; aligned for packs of 8 floats.
  extern __shared__ __align__(32) float dw_smem[];
  __shared__ float scratch[kWarp];
  const bool has_weight = weight != nullptr;
  // This block's running sum of dy * x_hat; each thread touches only its own columns.
  float* dw_acc = !has_weight                   ? nullptr
                  : n <= kSmemWeightGradCols ? dw_smem
                                             : dw_partial + static_cast<int64_t>(blockIdx.x) * n;
  if (has_weight) {
    for_each_chunk<V>(n, vec, threadIdx.x, blockDim.x, [&](int c, auto width) {
      constexpr int K = decltype(width)::value;
      const float zero[K] = {};
      store_floats<K>(dw_acc + c, zero);
    });
  }

  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const G* dyr = dy.row(row);
    const T* xr = x.row(row);
    const float r = rstd[row];

    // mean(g * x_hat) = r * sum(g * x) / n
    float dot = 0.f;
    for_each_chunk<V>(n, vec, threadIdx.x, blockDim.x, [&](int c, auto width) {
      constexpr int K = decltype(width)::value;
      float g[K], a[K];
      load_floats<K>(dyr + c, g);
      load_floats<K>(xr + c, a);
      if (has_weight) {
        float w[K];
        load_floats<K>(weight + c, w);
#pragma unroll
        for (int k = 0; k < K; ++k) g[k] *= w[k];
      }
#pragma unroll
      for (int k = 0; k < K; ++k) dot += g[k] * a[k];
    });
    const float mean_gx = r * block_sum(dot, scratch) / n;

    for_each_chunk<V>(n, vec, threadIdx.x, blockDim.x, [&](int c, auto width) {
      constexpr int K = decltype(width)::value;
      float d[K], a[K], out[K];
      load_floats<K>(dyr + c, d);
      load_floats<K>(xr + c, a);
      float w[K];
      if (has_weight) {
        load_floats<K>(weight + c, w);
      } else {
#pragma unroll
        for (int k = 0; k < K; ++k) w[k] = 1.f;
      }
#pragma unroll
      for (int k = 0; k < K; ++k) {
        a[k] *= r;  // x_hat
        out[k] = r * (d[k] * w[k] - a[k] * mean_gx);
      }
      if (dresidual.data != nullptr) {
        float res[K];
        load_floats<K>(dresidual.row(row) + c, res);
#pragma unroll
        for (int k = 0; k < K; ++k) out[k] += res[k];
      }
      store_floats<K>(dx + row * n + c, out);
      if (dx_narrow != nullptr) store_floats<K>(dx_narrow + row * n + c, out);
      if (has_weight) {
        float acc[K];
        load_floats<K>(dw_acc + c, acc);
#pragma unroll
        for (int k = 0; k < K; ++k) acc[k] += d[k] * a[k];
        store_floats<K>(dw_acc + c, acc);
      }
    });
  }

  if (has_weight && n <= kSmemWeightGradCols) {
    float* out = dw_partial + static_cast<int64_t>(blockIdx.x) * n;
    for_each_chunk<V>(n, vec, threadIdx.x, blockDim.x, [&](int c, auto width) {
      constexpr int K = decltype(width)::value;
      float acc[K];
      load_floats<K>(dw_acc + c, acc);
      store_floats<K>(out + c, acc);
    });
  }
}

// dw[c] = sum over p of partial[p, c] (parts: one per backward block, about 2000 on a large GPU).
// Tiled: a block of kColSumCols x kColSumLanes threads owns kColSumCols adjacent columns; lane l
// (threadIdx.y) sums parts l, l + kColSumLanes, ... of its column, so a warp reads kColSumCols
// adjacent floats of one part (128 bytes, coalesced) and each thread walks parts / kColSumLanes of
// them, not all; the lanes' sums are then added by a fixed tree in shared memory. Every column's
// order of additions is fixed: dw stays deterministic.
constexpr int kColSumCols = kWarp;
constexpr int kColSumLanes = 16;

template <typename W>
__global__ void column_sum_kernel(const float* __restrict__ partial, int parts, int n, W* __restrict__ dw) {
  __shared__ float sums[kColSumLanes][kColSumCols + 1];  // +1: no bank conflicts on the column reads
  const int col = blockIdx.x * kColSumCols + threadIdx.x;
  const int lane = threadIdx.y;
  float sum = 0.f;
  if (col < n) {
#pragma unroll 4
    for (int p = lane; p < parts; p += kColSumLanes) sum += partial[static_cast<int64_t>(p) * n + col];
  }
  sums[lane][threadIdx.x] = sum;
  __syncthreads();
#pragma unroll
  for (int half = kColSumLanes / 2; half > 0; half /= 2) {
    if (lane < half) sums[lane][threadIdx.x] += sums[lane + half][threadIdx.x];
    __syncthreads();
  }
  if (lane == 0 && col < n) dw[col] = static_cast<W>(sums[0][threadIdx.x]);
}

// One forward launch at T (x, y), R (residual, stream) and W (weight); r2 and stream are read only
// when kResidual.
template <typename T, typename R, typename W, bool kResidual>
void launch_fwd_kernel(const at::Tensor& x2, const at::Tensor& r2, const at::Tensor& w, const at::Tensor& y,
                       const at::Tensor& stream, const at::Tensor& rstd, double eps, cudaStream_t cuda_stream) {
  const int64_t rows = x2.size(0);
  const int n = static_cast<int>(x2.size(1));
  constexpr int V = kPack<T, R>;
  bool vec = packs_aligned(V, {x2, y});
  if (kResidual) vec = vec && packs_aligned(V, {r2, stream});
  if (w.defined()) vec = vec && packs_aligned(V, {w});
  const int threads = threads_for_row(vec ? (n + V - 1) / V : n);
  rms_norm_fwd_kernel<T, R, W, kResidual><<<static_cast<unsigned>(rows), threads, 0, cuda_stream>>>(
      rows_of<const T>(x2), kResidual ? rows_of<const R>(r2) : Rows<const R>{nullptr, 0},
      w.defined() ? w.data_ptr<W>() : nullptr, y.data_ptr<T>(), kResidual ? stream.data_ptr<R>() : nullptr,
      rstd.data_ptr<float>(), n, static_cast<float>(eps), vec);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Shared by the plain and the fused-residual forward. A residual of another dtype than x is a
// float32 stream under a 16-bit x (checked by the caller).
void launch_rms_norm_fwd(const at::Tensor& x2, const std::optional<at::Tensor>& residual2,
                         const std::optional<at::Tensor>& weight, const at::Tensor& y, const at::Tensor& stream,
                         const at::Tensor& rstd, double eps) {
  const int64_t rows = x2.size(0);
  if (rows == 0) return;
  TORCH_CHECK(rows <= INT32_MAX, "rms_norm: at most 2^31 - 1 rows, got ", rows);
  const at::Tensor w = weight.has_value() ? weight->contiguous() : at::Tensor();
  const at::Tensor r2 = residual2.has_value() ? *residual2 : at::Tensor();
  const cudaStream_t cuda_stream = at::cuda::getCurrentCUDAStream();
  AIMV2_DISPATCH_FLOATS(x2.scalar_type(), "rms_norm_fwd", [&] {
    using T = scalar_t;
    AIMV2_DISPATCH_FLOATS(w.defined() ? w.scalar_type() : x2.scalar_type(), "rms_norm_fwd", [&] {
      using W = scalar_t;
      if (!r2.defined()) {
        launch_fwd_kernel<T, T, W, false>(x2, r2, w, y, stream, rstd, eps, cuda_stream);
      } else if (r2.scalar_type() == x2.scalar_type()) {
        launch_fwd_kernel<T, T, W, true>(x2, r2, w, y, stream, rstd, eps, cuda_stream);
      } else {
        launch_fwd_kernel<T, float, W, true>(x2, r2, w, y, stream, rstd, eps, cuda_stream);
      }
    });
  });
}

// One backward launch at G (dy, dx_narrow), T (x, dresidual, dx) and W (weight): the row kernel,
// then the fixed-order column sum of its dw partials. dx_narrow2: undefined, or (rows, n) in G.
template <typename G, typename T, typename W>
void launch_bwd_kernels(const at::Tensor& dy2, const at::Tensor& x2, const at::Tensor& w, const at::Tensor& rstd1,
                        const at::Tensor& dres2, const at::Tensor& dx2, const at::Tensor& dx_narrow2,
                        const at::Tensor& dw, int64_t rows, int n, cudaStream_t cuda_stream) {
  constexpr int V = kPack<G, T>;
  bool vec = packs_aligned(V, {dy2, x2, dx2});
  if (dx_narrow2.defined()) vec = vec && packs_aligned(V, {dx_narrow2});
  if (w.defined()) vec = vec && packs_aligned(V, {w});
  if (dres2.defined()) vec = vec && packs_aligned(V, {dres2});
  const int threads = threads_for_row(vec ? (n + V - 1) / V : n);
  const size_t smem = w.defined() && n <= kSmemWeightGradCols ? n * sizeof(float) : 0;
  auto kernel = rms_norm_bwd_kernel<G, T, W>;
  const int grid = static_cast<int>(std::min<int64_t>(rows, resident_blocks(kernel, threads, smem)));
  at::Tensor partial = w.defined() ? at::empty({grid, n}, x2.options().dtype(at::kFloat)) : at::Tensor();
  poison_outputs({partial});
  kernel<<<grid, threads, smem, cuda_stream>>>(
      rows_of<const G>(dy2), rows_of<const T>(x2), w.defined() ? w.data_ptr<W>() : nullptr, rstd1.data_ptr<float>(),
      dres2.defined() ? rows_of<const T>(dres2) : Rows<const T>{nullptr, 0}, dx2.data_ptr<T>(),
      dx_narrow2.defined() ? dx_narrow2.data_ptr<G>() : nullptr, w.defined() ? partial.data_ptr<float>() : nullptr,
      rows, n, vec);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (w.defined()) {
    column_sum_kernel<W><<<(n + kColSumCols - 1) / kColSumCols, dim3(kColSumCols, kColSumLanes), 0, cuda_stream>>>(
        partial.data_ptr<float>(), grid, n, dw.data_ptr<W>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// A float32 stream (or its gradient, or the norm input) beside 16-bit values of `other`.
bool is_wider_stream(const at::Tensor& stream, const at::Tensor& other) {
  return stream.scalar_type() == at::kFloat &&
         (other.scalar_type() == at::kHalf || other.scalar_type() == at::kBFloat16);
}

void check_norm_inputs(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& weight) {
  check_float_input(op, "x", x);
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dim, got a scalar");
  TORCH_CHECK(x.size(-1) > 0, op, ": x must have a non-empty last dim, got shape ", x.sizes());
  TORCH_CHECK(x.size(-1) <= INT32_MAX, op, ": the last dim of x must be below 2^31, got ", x.size(-1));
  if (weight.has_value()) {
    check_float_input(op, "weight", *weight);
    check_same_device(op, "weight", *weight, x);
    check_shape(op, "weight", *weight, {x.size(-1)});
  }
}

at::Tensor rstd_like(const at::Tensor& x) {
  return at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kFloat));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                                double eps) {
  check_norm_inputs("rms_norm_fwd", x, weight);
  TORCH_CHECK(eps > 0, "rms_norm_fwd: eps must be positive, got ", eps);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor rstd = rstd_like(x);
  poison_outputs({y, rstd});
  if (x.numel() == 0) return {y, rstd};
  const int64_t n = x.size(-1);
  launch_rms_norm_fwd(as_rows(x), std::nullopt, weight, y.view({-1, n}), at::Tensor(), rstd, eps);
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_residual_fwd(const at::Tensor& x, const at::Tensor& residual,
                                                                     const std::optional<at::Tensor>& weight,
                                                                     double eps) {
  const char* op = "rms_norm_residual_fwd";
  check_norm_inputs(op, x, weight);
  TORCH_CHECK(eps > 0, op, ": eps must be positive, got ", eps);
  check_float_input(op, "residual", residual);
  check_same_device(op, "residual", residual, x);
  check_shape(op, "residual", residual, x.sizes());
  TORCH_CHECK(residual.scalar_type() == x.scalar_type() || is_wider_stream(residual, x), op,
              ": residual must have x's dtype ", x.scalar_type(),
              " or be float32 (a wider stream) when x is float16 or bfloat16, got ", residual.scalar_type());
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor stream = at::empty(x.sizes(), residual.options());  // contiguous, in the residual's dtype
  at::Tensor rstd = rstd_like(x);
  poison_outputs({y, stream, rstd});
  if (x.numel() == 0) return {y, stream, rstd};
  const int64_t n = x.size(-1);
  launch_rms_norm_fwd(as_rows(x), as_rows(residual), weight, y.view({-1, n}), stream.view({-1, n}), rstd, eps);
  return {y, stream, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& dy, const at::Tensor& x,
                                                            const std::optional<at::Tensor>& weight,
                                                            const at::Tensor& rstd,
                                                            const std::optional<at::Tensor>& dresidual,
                                                            std::optional<at::ScalarType> narrow_dtype) {
  const char* op = "rms_norm_bwd";
  check_norm_inputs(op, x, weight);
  check_float_input(op, "dy", dy);
  check_same_device(op, "dy", dy, x);
  check_shape(op, "dy", dy, x.sizes());
  TORCH_CHECK(dy.scalar_type() == x.scalar_type() || is_wider_stream(x, dy), op, ": dy must have x's dtype ",
              x.scalar_type(), " or be float16/bfloat16 when x is a float32 stream, got ", dy.scalar_type());
  TORCH_CHECK(rstd.scalar_type() == at::kFloat, op, ": rstd must be float32, got ", rstd.scalar_type());
  check_same_device(op, "rstd", rstd, x);
  check_shape(op, "rstd", rstd, x.sizes().slice(0, x.dim() - 1));
  if (dresidual.has_value()) {
    check_same_device(op, "dresidual", *dresidual, x);
    check_shape(op, "dresidual", *dresidual, x.sizes());
    TORCH_CHECK(dresidual->scalar_type() == x.scalar_type(), op, ": dresidual must have x's dtype ",
                x.scalar_type(), ", got ", dresidual->scalar_type());
  }
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor dw = weight.has_value() ? at::empty_like(*weight, at::MemoryFormat::Contiguous) : x.new_empty({0});
  // dx once more in narrow_dtype: written by the row kernel when that is dy's dtype (the update's
  // gradient under a float32 stream), else cast after it
  const bool narrow_in_kernel = narrow_dtype.has_value() && *narrow_dtype == dy.scalar_type();
  at::Tensor dx_narrow = narrow_in_kernel ? at::empty(x.sizes(), dy.options()) : x.new_empty({0});
  poison_outputs({dx, dw, dx_narrow});
  const int64_t n64 = x.size(-1);
  const int64_t rows = n64 > 0 ? x.numel() / n64 : 0;
  if (rows == 0) {
    if (weight.has_value()) dw.zero_();
    return {dx, dw, narrow_dtype.has_value() ? dx.to(*narrow_dtype) : dx_narrow};
  }
  const int n = static_cast<int>(n64);
  const at::Tensor dy2 = as_rows(dy);
  const at::Tensor x2 = as_rows(x);
  const at::Tensor dres2 = dresidual.has_value() ? as_rows(*dresidual) : at::Tensor();
  const at::Tensor rstd1 = rstd.contiguous();
  const at::Tensor w = weight.has_value() ? weight->contiguous() : at::Tensor();
  const cudaStream_t cuda_stream = at::cuda::getCurrentCUDAStream();

  AIMV2_DISPATCH_FLOATS(dy.scalar_type(), "rms_norm_bwd", [&] {
    using G = scalar_t;
    AIMV2_DISPATCH_FLOATS(w.defined() ? w.scalar_type() : x.scalar_type(), "rms_norm_bwd", [&] {
      using W = scalar_t;
      const at::Tensor dx2 = dx.view({-1, n});
      const at::Tensor dx_narrow2 = narrow_in_kernel ? dx_narrow.view({-1, n}) : at::Tensor();
      if (x.scalar_type() == dy.scalar_type()) {
        launch_bwd_kernels<G, G, W>(dy2, x2, w, rstd1, dres2, dx2, dx_narrow2, dw, rows, n, cuda_stream);
      } else {  // checked above: a float32 stream under a 16-bit y
        launch_bwd_kernels<G, float, W>(dy2, x2, w, rstd1, dres2, dx2, dx_narrow2, dw, rows, n, cuda_stream);
      }
    });
  });
  if (narrow_dtype.has_value() && !narrow_in_kernel) dx_narrow = dx.to(*narrow_dtype);
  return {dx, dw, dx_narrow};
}

}  // namespace aimv2
