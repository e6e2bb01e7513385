// Norm-pix patch MSE: mean over counted patches of mean_p (pred - t_hat)^2, where
//   t_hat = (t - mean(t)) / sqrt(var(t) + eps)   (unbiased var, per patch; t_hat = t without norm_pix)
// and its gradient d pred = 2 (pred - t_hat) / P * counted / n_counted * dloss.
//
// One warp per patch (P = 588 for 14 x 14 x 3 patches), grid-stride over the B * N patches; the target
// statistics are two passes (mean, then centered squares) so that flat patches keep their precision.
// Masked-out patches are skipped without reading them. The forward writes one (loss, count) pair per
// block and a one-block kernel adds them in a fixed order: deterministic, no atomics. The backward
// reads dloss and the count from device memory, so nothing waits on the host.
#include "common.cuh"
#include "ops.h"

#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>

namespace aimv2 {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kThreads = kWarpsPerBlock * kWarp;
constexpr int kFinalizeThreads = 256;

// Sum of f(value) over the values t[0, p) of one patch, returned to every lane of the warp.
template <int V, typename U, typename F>
__device__ float warp_row_sum(const U* t, int p, bool vec, int lane, F f) {
  float acc = 0.f;
  for_each_chunk<V>(p, vec, lane, kWarp, [&](int c, auto width) {
    constexpr int K = decltype(width)::value;
    float a[K];
    load_floats<K>(t + c, a);
#pragma unroll
    for (int k = 0; k < K; ++k) acc += f(a[k]);
  });
  return warp_sum(acc);
}

// (mean, 1 / sqrt(var + eps)) of one target patch, or (0, 1) without norm_pix; the same in all lanes.
template <int V, typename U>
__device__ float2 target_stats(const U* t, int p, bool vec, bool norm_pix, float eps, int lane) {
  if (!norm_pix) return make_float2(0.f, 1.f);
  const float mean = warp_row_sum<V>(t, p, vec, lane, [](float v) { return v; }) / p;
  const float m2 = warp_row_sum<V>(t, p, vec, lane, [mean](float v) { return (v - mean) * (v - mean); });
  return make_float2(mean, rsqrtf(m2 / (p - 1) + eps));
}

// Calls f(col, width, r) for the columns of one patch this lane owns, r (float[width]) holding
// pred - t_hat at columns col, col + 1, ... (t_hat: the target, normalized per patch with norm_pix).
template <int V, typename T, typename U, typename F>
__device__ __forceinline__ void for_each_residual(const T* pred, const U* target, int p, bool vec, bool norm_pix,
                                                  float eps, int lane, F&& f) {
  const float2 st = target_stats<V>(target, p, vec, norm_pix, eps, lane);
  for_each_chunk<V>(p, vec, lane, kWarp, [&](int c, auto width) {
    constexpr int K = decltype(width)::value;
    float a[K], b[K];
    load_floats<K>(pred + c, a);
    load_floats<K>(target + c, b);
#pragma unroll
    for (int k = 0; k < K; ++k) a[k] -= (b[k] - st.x) * st.y;
    f(c, width, a);
  });
}

template <typename T, typename U>
__global__ void patch_mse_fwd_kernel(Rows<const T> pred,    // (rows, p)
                                     Rows<const U> target,  // (rows, p)
                                     const bool* __restrict__ mask,  // (rows,) or nullptr: all counted
                                     float* __restrict__ partial,    // (gridDim.x, 2): loss sum, count
                                     int64_t rows, int p, bool norm_pix, float eps, bool vec) {
  constexpr int V = kVec<T>;
  __shared__ float warp_loss[kWarpsPerBlock];
  __shared__ float warp_count[kWarpsPerBlock];
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  float loss = 0.f, count = 0.f;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp; row < rows;
       row += static_cast<int64_t>(gridDim.x) * kWarpsPerBlock) {
    if (mask != nullptr && !mask[row]) continue;
    float se = 0.f;
    for_each_residual<V>(pred.row(row), target.row(row), p, vec, norm_pix, eps, lane, [&](int, auto, auto& r) {
      for (const float d : r) se += d * d;
    });
    loss += warp_sum(se) / p;
    count += 1.f;
  }
  if (lane == 0) {
    warp_loss[warp] = loss;
    warp_count[warp] = count;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float block_loss = 0.f, block_count = 0.f;
    for (int w = 0; w < kWarpsPerBlock; ++w) {
      block_loss += warp_loss[w];
      block_count += warp_count[w];
    }
    partial[2 * blockIdx.x] = block_loss;
    partial[2 * blockIdx.x + 1] = block_count;
  }
}

// out = sum(loss) / max(sum(count), 1) over the (parts, 2) partial sums; one block.
__global__ void patch_mse_finalize_kernel(const float* __restrict__ partial, int parts, float* __restrict__ out) {
  __shared__ float scratch[kWarp];
  float loss = 0.f, count = 0.f;
  for (int i = threadIdx.x; i < parts; i += blockDim.x) {
    loss += partial[2 * i];
    count += partial[2 * i + 1];
  }
  loss = block_sum(loss, scratch);
  count = block_sum(count, scratch);
  if (threadIdx.x == 0) *out = loss / fmaxf(count, 1.f);
}

template <typename T, typename U>
__global__ void patch_mse_bwd_kernel(const float* __restrict__ dloss,  // scalar
                                     const float* __restrict__ n_counted,  // scalar, or nullptr: all rows
                                     Rows<const T> pred, Rows<const U> target, const bool* __restrict__ mask,
                                     T* __restrict__ dpred,  // (rows, p) contiguous
                                     int64_t rows, int p, bool norm_pix, float eps, bool vec) {
  constexpr int V = kVec<T>;
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const float counted = n_counted != nullptr ? *n_counted : static_cast<float>(rows);
  const float scale = 2.f / p * *dloss / fmaxf(counted, 1.f);
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp; row < rows;
       row += static_cast<int64_t>(gridDim.x) * kWarpsPerBlock) {
    T* out = dpred + row * p;
    if (mask != nullptr && !mask[row]) {
      for_each_chunk<V>(p, vec, lane, kWarp, [&](int c, auto width) {
        constexpr int K = decltype(width)::value;
        const float zero[K] = {};
        store_floats<K>(out + c, zero);
      });
      continue;
    }
    for_each_residual<V>(pred.row(row), target.row(row), p, vec, norm_pix, eps, lane, [&](int c, auto width, auto& r) {
      for (float& d : r) d *= scale;
      store_floats<decltype(width)::value>(out + c, r);
    });
  }
}

struct PatchInputs {
  at::Tensor pred2, target2, mask1;  // (rows, p), (rows, p), (rows,) bool or undefined
  int64_t rows;
  int p;
};

PatchInputs check_patch_inputs(const char* op, const at::Tensor& pred, const at::Tensor& target,
                               const std::optional<at::Tensor>& mask, double eps) {
  check_float_input(op, "pred", pred);
  check_float_input(op, "target", target);
  TORCH_CHECK(pred.dim() == 3, op, ": pred must have shape (B, N, P), got ", pred.sizes());
  check_same_device(op, "target", target, pred);
  check_shape(op, "target", target, pred.sizes());
  TORCH_CHECK(pred.size(2) >= 2, op, ": patches need at least 2 values (unbiased variance), got P = ", pred.size(2));
  TORCH_CHECK(pred.size(2) <= INT32_MAX, op, ": P must be below 2^31, got ", pred.size(2));
  TORCH_CHECK(eps > 0, op, ": eps must be positive, got ", eps);
  PatchInputs in;
  in.rows = pred.size(0) * pred.size(1);
  in.p = static_cast<int>(pred.size(2));
  if (mask.has_value()) {
    check_same_device(op, "mask", *mask, pred);
    TORCH_CHECK(mask->scalar_type() == at::kBool, op, ": mask must be bool, got ", mask->scalar_type());
    check_shape(op, "mask", *mask, pred.sizes().slice(0, 2));
    in.mask1 = mask->reshape({-1}).contiguous();
  }
  if (in.rows > 0) {
    in.pred2 = as_rows(pred);
    in.target2 = as_rows(target);
  }
  return in;
}

// Enough blocks of kWarpsPerBlock warps to give every warp a patch, capped at what fits at once.
template <typename Kernel>
int patch_blocks(Kernel kernel, int64_t rows) {
  const int64_t needed = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(needed, resident_blocks(kernel, kThreads, 0))));
}

}  // namespace

at::Tensor patch_mse_fwd(const at::Tensor& pred, const at::Tensor& target, const std::optional<at::Tensor>& mask,
                         bool norm_pix, double eps) {
  const PatchInputs in = check_patch_inputs("patch_mse_fwd", pred, target, mask, eps);
  const c10::cuda::CUDAGuard guard(pred.device());
  if (in.rows == 0) return at::zeros({}, pred.options().dtype(at::kFloat));
  at::Tensor out = at::empty({}, pred.options().dtype(at::kFloat));
  poison_outputs({out});
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AIMV2_DISPATCH_FLOATS(pred.scalar_type(), "patch_mse_fwd", [&] {
    using T = scalar_t;
    AIMV2_DISPATCH_FLOATS(target.scalar_type(), "patch_mse_fwd", [&] {
      using U = scalar_t;
      auto kernel = patch_mse_fwd_kernel<T, U>;
      const int grid = patch_blocks(kernel, in.rows);
      at::Tensor partial = at::empty({grid, 2}, pred.options().dtype(at::kFloat));
      poison_outputs({partial});
      const bool vec = packs_aligned(kVec<T>, {in.pred2, in.target2});
      kernel<<<grid, kThreads, 0, stream>>>(rows_of<const T>(in.pred2), rows_of<const U>(in.target2),
                                            in.mask1.defined() ? in.mask1.data_ptr<bool>() : nullptr,
                                            partial.data_ptr<float>(), in.rows, in.p, norm_pix,
                                            static_cast<float>(eps), vec);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      patch_mse_finalize_kernel<<<1, kFinalizeThreads, 0, stream>>>(partial.data_ptr<float>(), grid,
                                                                    out.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

at::Tensor patch_mse_bwd(const at::Tensor& dloss, const at::Tensor& pred, const at::Tensor& target,
                         const std::optional<at::Tensor>& mask, bool norm_pix, double eps) {
  const PatchInputs in = check_patch_inputs("patch_mse_bwd", pred, target, mask, eps);
  TORCH_CHECK(dloss.numel() == 1, "patch_mse_bwd: dloss must be a scalar, got shape ", dloss.sizes());
  check_same_device("patch_mse_bwd", "dloss", dloss, pred);
  const c10::cuda::CUDAGuard guard(pred.device());
  at::Tensor dpred = at::empty_like(pred, at::MemoryFormat::Contiguous);
  poison_outputs({dpred});
  if (in.rows == 0) return dpred;
  const at::Tensor dloss1 = dloss.to(at::kFloat).reshape({}).contiguous();
  const at::Tensor counted = in.mask1.defined() ? at::sum(in.mask1, at::kFloat) : at::Tensor();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AIMV2_DISPATCH_FLOATS(pred.scalar_type(), "patch_mse_bwd", [&] {
    using T = scalar_t;
    AIMV2_DISPATCH_FLOATS(target.scalar_type(), "patch_mse_bwd", [&] {
      using U = scalar_t;
      auto kernel = patch_mse_bwd_kernel<T, U>;
      at::Tensor dpred2 = dpred.view({-1, in.p});
      const bool vec = packs_aligned(kVec<T>, {in.pred2, in.target2, dpred2});
      kernel<<<patch_blocks(kernel, in.rows), kThreads, 0, stream>>>(
          dloss1.data_ptr<float>(), counted.defined() ? counted.data_ptr<float>() : nullptr,
          rows_of<const T>(in.pred2), rows_of<const U>(in.target2),
          in.mask1.defined() ? in.mask1.data_ptr<bool>() : nullptr, dpred2.data_ptr<T>(), in.rows, in.p, norm_pix,
          static_cast<float>(eps), vec);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return dpred;
}

}  // namespace aimv2
