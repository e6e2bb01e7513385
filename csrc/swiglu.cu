// SwiGLU: out = silu(gate) * up, separate and packed (gate and up as the two halves of one tensor).
//
//   d gate = dout * up * s * (1 + gate * (1 - s)),   d up = dout * gate * s,   s = sigmoid(gate)
//
// Elementwise over (rows, H) views. The packed forms reuse the same kernels on the two column halves
// of x (and of dx), each a (rows, H) view with row stride 2H, so nothing is copied. Each thread takes a
// 16-byte pack when every row of every operand starts on a pack boundary, otherwise single elements
// (e.g. a packed tensor with odd H, whose up half starts mid-pack).
#include "common.cuh"
#include "ops.h"

namespace aimv2 {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float sigmoid(float v) { return 1.f / (1.f + expf(-v)); }

template <typename T, int kWidth>
__global__ void swiglu_fwd_kernel(Rows<const T> gate, Rows<const T> up, Rows<T> out, int64_t rows, int n) {
  for_each_element_chunk<kWidth>(rows, n, [&](int64_t r, int c, auto width) {
    constexpr int K = decltype(width)::value;
    float g[K], u[K];
    load_floats<K>(gate.row(r) + c, g);
    load_floats<K>(up.row(r) + c, u);
#pragma unroll
    for (int k = 0; k < K; ++k) g[k] = g[k] * sigmoid(g[k]) * u[k];
    store_floats<K>(out.row(r) + c, g);
  });
}

template <typename T, int kWidth>
__global__ void swiglu_bwd_kernel(Rows<const T> dout, Rows<const T> gate, Rows<const T> up, Rows<T> dgate, Rows<T> dup,
                                  int64_t rows, int n) {
  for_each_element_chunk<kWidth>(rows, n, [&](int64_t r, int c, auto width) {
    constexpr int K = decltype(width)::value;
    float d[K], g[K], u[K];
    load_floats<K>(dout.row(r) + c, d);
    load_floats<K>(gate.row(r) + c, g);
    load_floats<K>(up.row(r) + c, u);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const float s = sigmoid(g[k]);
      const float silu = g[k] * s;
      g[k] = d[k] * u[k] * s * (1.f + g[k] * (1.f - s));  // d gate
      u[k] = d[k] * silu;                                 // d up
    }
    store_floats<K>(dgate.row(r) + c, g);
    store_floats<K>(dup.row(r) + c, u);
  });
}

// Enough blocks to cover the work once, capped at what fits on the device (the kernels grid-stride).
template <typename Kernel>
int elementwise_blocks(Kernel kernel, int64_t rows, int n, int width) {
  const int64_t chunks = rows * ((n + width - 1) / width);
  const int64_t needed = (chunks + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(needed, resident_blocks(kernel, kThreads, 0))));
}

// Launches wide (packs of V columns) when `vec`, else scalar (single columns): wide<<<>>>(args..., rows, n).
template <int V, typename Wide, typename Scalar, typename... Args>
void launch_elementwise(bool vec, Wide wide, Scalar scalar, int64_t rows, int n, Args... args) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (vec) {
    wide<<<elementwise_blocks(wide, rows, n, V), kThreads, 0, stream>>>(args..., rows, n);
  } else {
    scalar<<<elementwise_blocks(scalar, rows, n, 1), kThreads, 0, stream>>>(args..., rows, n);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// All arguments are (rows, n) views with a unit last stride, same dtype.
void launch_swiglu_fwd(const at::Tensor& gate, const at::Tensor& up, const at::Tensor& out) {
  const int64_t rows = gate.size(0);
  const int n = static_cast<int>(gate.size(1));
  if (rows == 0 || n == 0) return;
  AIMV2_DISPATCH_FLOATS(gate.scalar_type(), "swiglu_fwd", [&] {
    using T = scalar_t;
    constexpr int V = kVec<T>;
    launch_elementwise<V>(packs_aligned(V, {gate, up, out}), swiglu_fwd_kernel<T, V>, swiglu_fwd_kernel<T, 1>, rows,
                          n, rows_of<const T>(gate), rows_of<const T>(up), rows_of<T>(out));
  });
}

void launch_swiglu_bwd(const at::Tensor& dout, const at::Tensor& gate, const at::Tensor& up, const at::Tensor& dgate,
                       const at::Tensor& dup) {
  const int64_t rows = gate.size(0);
  const int n = static_cast<int>(gate.size(1));
  if (rows == 0 || n == 0) return;
  AIMV2_DISPATCH_FLOATS(gate.scalar_type(), "swiglu_bwd", [&] {
    using T = scalar_t;
    constexpr int V = kVec<T>;
    launch_elementwise<V>(packs_aligned(V, {dout, gate, up, dgate, dup}), swiglu_bwd_kernel<T, V>,
                          swiglu_bwd_kernel<T, 1>, rows, n, rows_of<const T>(dout), rows_of<const T>(gate),
                          rows_of<const T>(up), rows_of<T>(dgate), rows_of<T>(dup));
  });
}

void check_pair(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like) {
  check_float_input(op, name, t);
  check_same_device(op, name, t, like);
  check_shape(op, name, t, like.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " must have dtype ", like.scalar_type(), ", got ",
              t.scalar_type());
}

void check_last_dim(const char* op, const at::Tensor& t) {
  TORCH_CHECK(t.dim() >= 1, op, ": inputs must have at least one dim, got a scalar");
  TORCH_CHECK(t.size(-1) <= INT32_MAX, op, ": the last dim must be below 2^31, got ", t.size(-1));
}

// (rows, H) views of the gate and up halves of a (rows, 2H) view.
std::pair<at::Tensor, at::Tensor> halves(const at::Tensor& rows2h) {
  const int64_t h = rows2h.size(1) / 2;
  return {rows2h.narrow(1, 0, h), rows2h.narrow(1, h, h)};
}

}  // namespace

at::Tensor swiglu_fwd(const at::Tensor& gate, const at::Tensor& up) {
  check_float_input("swiglu_fwd", "gate", gate);
  check_last_dim("swiglu_fwd", gate);
  check_pair("swiglu_fwd", "up", up, gate);
  const c10::cuda::CUDAGuard guard(gate.device());
  at::Tensor out = at::empty_like(gate, at::MemoryFormat::Contiguous);
  poison_outputs({out});
  if (out.numel() == 0) return out;
  launch_swiglu_fwd(as_rows(gate), as_rows(up), out.view({-1, gate.size(-1)}));
  return out;
}

std::tuple<at::Tensor, at::Tensor> swiglu_bwd(const at::Tensor& dout, const at::Tensor& gate, const at::Tensor& up) {
  check_float_input("swiglu_bwd", "gate", gate);
  check_last_dim("swiglu_bwd", gate);
  check_pair("swiglu_bwd", "up", up, gate);
  check_pair("swiglu_bwd", "dout", dout, gate);
  const c10::cuda::CUDAGuard guard(gate.device());
  at::Tensor dgate = at::empty_like(gate, at::MemoryFormat::Contiguous);
  at::Tensor dup = at::empty_like(up, at::MemoryFormat::Contiguous);
  poison_outputs({dgate, dup});
  if (gate.numel() == 0) return {dgate, dup};
  const int64_t n = gate.size(-1);
  launch_swiglu_bwd(as_rows(dout), as_rows(gate), as_rows(up), dgate.view({-1, n}), dup.view({-1, n}));
  return {dgate, dup};
}

at::Tensor swiglu_packed_fwd(const at::Tensor& x) {
  check_float_input("swiglu_packed_fwd", "x", x);
  check_last_dim("swiglu_packed_fwd", x);
  TORCH_CHECK(x.size(-1) % 2 == 0, "swiglu_packed_fwd: x must have an even last dim (gate and up halves), got shape ",
              x.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  std::vector<int64_t> shape = x.sizes().vec();
  const int64_t h = shape.back() / 2;
  shape.back() = h;
  at::Tensor out = at::empty(shape, x.options());
  poison_outputs({out});
  if (out.numel() == 0) return out;
  const auto [gate, up] = halves(as_rows(x));
  launch_swiglu_fwd(gate, up, out.view({-1, h}));
  return out;
}

at::Tensor swiglu_packed_bwd(const at::Tensor& dout, const at::Tensor& x) {
  const char* op = "swiglu_packed_bwd";
  check_float_input(op, "x", x);
  check_last_dim(op, x);
  TORCH_CHECK(x.size(-1) % 2 == 0, op, ": x must have an even last dim (gate and up halves), got shape ", x.sizes());
  check_float_input(op, "dout", dout);
  check_same_device(op, "dout", dout, x);
  std::vector<int64_t> half_shape = x.sizes().vec();
  half_shape.back() /= 2;
  check_shape(op, "dout", dout, half_shape);
  TORCH_CHECK(dout.scalar_type() == x.scalar_type(), op, ": dout must have dtype ", x.scalar_type(), ", got ",
              dout.scalar_type());
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = at::empty_like(x, at::MemoryFormat::Contiguous);
  poison_outputs({dx});
  if (dx.numel() == 0) return dx;
  const auto [gate, up] = halves(as_rows(x));
  const auto [dgate, dup] = halves(dx.view({-1, x.size(-1)}));
  launch_swiglu_bwd(as_rows(dout), gate, up, dgate, dup);
  return dx;
}

}  // namespace aimv2
