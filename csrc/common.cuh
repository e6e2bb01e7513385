// Pieces shared by the csrc/ kernels: dtype dispatch, 16-byte packs, row iteration, reductions and
// the host-side checks and launch helpers.
//
// Conventions of every kernel here:
//   * activations are float, at::Half or at::BFloat16 (template parameter T); math is in float;
//   * a tensor is seen as rows (rows, n) with a unit last stride and a row stride (`Rows`), so views
//     such as the halves of a packed (rows, 2H) tensor need no copy;
//   * a thread moves kVec<T> consecutive elements (16 bytes of T) at a time when every row it touches
//     starts on a pack boundary (checked on the host), and single elements otherwise and in the tail.
#pragma once

// c10/cuda headers rather than ATen/cuda/CUDAContext.h: the latter pulls in cuBLAS, cuSPARSE and
// cuSOLVER headers that none of these kernels use (and that a compiler-only toolkit lacks).
// at::cuda::getCurrentCUDAStream resolves to c10::cuda's through torch's namespace aliases.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <type_traits>

// Dispatch over the three activation dtypes the kernels support (float64 is left to the reference).
#define AIMV2_DISPATCH_FLOATS(TYPE, NAME, ...)                          \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                        \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

namespace aimv2 {

constexpr int kWarp = 32;

// Test hook: with AIMV2_KERNELS_POISON_OUTPUTS=1 in the environment, every buffer a launcher
// allocates for a kernel to fill is set to 0xFF bytes (NaN in float32, float16 and bfloat16) on the
// current stream first, so an element a kernel forgets to write reads back as NaN, whatever the
// caching allocator hands out. Off by default: one getenv per launch.
inline void poison_outputs(std::initializer_list<at::Tensor> outputs) {
  const char* flag = std::getenv("AIMV2_KERNELS_POISON_OUTPUTS");
  if (flag == nullptr || flag[0] != '1') return;
  for (const at::Tensor& t : outputs) {
    if (t.defined() && t.numel() > 0) {
      C10_CUDA_CHECK(cudaMemsetAsync(t.data_ptr(), 0xFF, t.nbytes(), c10::cuda::getCurrentCUDAStream()));
    }
  }
}

// Elements of T in one 16-byte access.
template <typename T>
constexpr int kVec = 16 / static_cast<int>(sizeof(T));

// A (rows, n) view: row r starts at data + r * stride; the last dim is contiguous.
template <typename T>
struct Rows {
  T* data;
  int64_t stride;
  __device__ __forceinline__ T* row(int64_t r) const { return data + r * stride; }
};

// N elements loaded or stored as one access of N * sizeof(T) bytes (two for 32 bytes).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <int N, typename T>
__device__ __forceinline__ void load_floats(const T* p, float (&out)[N]) {
  const Pack<T, N> pack = *reinterpret_cast<const Pack<T, N>*>(p);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = static_cast<float>(pack.v[i]);
}

template <int N, typename T>
__device__ __forceinline__ void store_floats(T* p, const float (&in)[N]) {
  Pack<T, N> pack;
#pragma unroll
  for (int i = 0; i < N; ++i) pack.v[i] = static_cast<T>(in[i]);
  *reinterpret_cast<Pack<T, N>*>(p) = pack;
}

// The float that T stores for v (what a round trip through memory gives).
template <typename T>
__device__ __forceinline__ float round_to(float v) {
  return static_cast<float>(static_cast<T>(v));
}

// Calls f(col, width) over the columns [0, n) of one row that thread `tid` of `nthreads` owns:
// packs of V columns while `vec` (width is std::integral_constant<int, V>), then single columns for
// the tail (width 1). The same thread owns the same columns in every call with the same arguments.
template <int V, typename F>
__device__ __forceinline__ void for_each_chunk(int n, bool vec, int tid, int nthreads, F&& f) {
  const int packs = vec ? n / V : 0;
  for (int i = tid; i < packs; i += nthreads) f(i * V, std::integral_constant<int, V>{});
  for (int c = packs * V + tid; c < n; c += nthreads) f(c, std::integral_constant<int, 1>{});
}

// Calls f(row, col, width) for chunks of kWidth columns over all (rows, n) elements, grid-stride;
// a row's last chunk falls back to single columns when n is not a multiple of kWidth.
template <int kWidth, typename F>
__device__ __forceinline__ void for_each_element_chunk(int64_t rows, int n, F&& f) {
  const int chunks = (n + kWidth - 1) / kWidth;
  const int64_t total = rows * chunks;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += step) {
    const int64_t row = i / chunks;
    const int col = static_cast<int>(i - row * chunks) * kWidth;
    if (col + kWidth <= n) {
      f(row, col, std::integral_constant<int, kWidth>{});
    } else {
      for (int c = col; c < n; ++c) f(row, c, std::integral_constant<int, 1>{});
    }
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum of v over the block (blockDim.x a multiple of 32), returned to every thread, in a fixed order
// (so results are run-to-run deterministic). scratch: 32 floats of shared memory, reusable on return.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < static_cast<int>(blockDim.x / kWarp) ? scratch[lane] : 0.f;
    v = warp_sum(v);
    if (lane == 0) scratch[0] = v;
  }
  __syncthreads();
  const float total = scratch[0];
  __syncthreads();
  return total;
}

// ---- host side -----------------------------------------------------------------------------------

inline bool is_supported_float(at::ScalarType t) {
  return t == at::ScalarType::Float || t == at::ScalarType::Half || t == at::ScalarType::BFloat16;
}

// A CUDA tensor of a supported float dtype, else a clear error naming the op and the argument.
inline void check_float_input(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(is_supported_float(t.scalar_type()), op, ": ", name,
              " must be float32, float16 or bfloat16 (the cuda backend leaves other dtypes to the reference), got ",
              t.scalar_type());
}

inline void check_same_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like) {
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " must be on ", like.device(), ", got ", t.device());
}

inline void check_shape(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef shape) {
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
}

// t as (rows, t.size(-1)) with a unit last stride: a view when the leading dims collapse to one
// stride (contiguous tensors, slices of rows, halves of a packed tensor), otherwise a copy.
inline at::Tensor as_rows(const at::Tensor& t) {
  at::Tensor rows = t.reshape({-1, t.size(-1)});
  if (rows.size(1) > 1 && rows.stride(1) != 1) rows = rows.contiguous();
  return rows;
}

template <typename T>
Rows<T> rows_of(const at::Tensor& rows) {
  return Rows<T>{static_cast<T*>(rows.data_ptr()), rows.stride(0)};
}

// True when packs of `width` elements load as single aligned accesses from every row of every
// tensor given (2-D row views, or 1-D vectors such as a weight).
inline bool packs_aligned(int width, std::initializer_list<at::Tensor> tensors) {
  for (const at::Tensor& t : tensors) {
    const int64_t bytes = width * static_cast<int64_t>(t.element_size());
    const int64_t row_stride = t.dim() == 2 ? t.stride(0) : 0;
    if (reinterpret_cast<uintptr_t>(t.data_ptr()) % bytes != 0 || (row_stride * t.element_size()) % bytes != 0) {
      return false;
    }
  }
  return true;
}

// Threads for a kernel that gives one row of `items` work items to one block: a multiple of 32,
// at most 512 so that several blocks fit on a multiprocessor.
inline int threads_for_row(int64_t items) {
  const int64_t warps = (items + kWarp - 1) / kWarp;
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(warps, 1), 16) * kWarp);
}

// Blocks that fit on the device at once (a grid-stride kernel needs no more), at least 1.
template <typename Kernel>
int resident_blocks(Kernel kernel, int threads, size_t dynamic_smem) {
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, dynamic_smem));
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  return std::max(per_sm, 1) * sms;
}

}  // namespace aimv2
