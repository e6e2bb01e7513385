// Cross-entropy rows: the per-token part of the chunked linear cross-entropy
// (aimv2_kernels/linear_ce_chunks.py, whose `ce_rows_torch` is the contract). For one chunk of
// float32 logits x (c, V), optional bias b (V,), labels y (c,) and scale = 1 / max(n_counted, 1):
//
//   lse_i     = log sum_j exp(x_ij + b_j)                   online: one pass over the row
//   loss_i    = lse_i - (x_iy + b_y)                        0 where y_i == ignore_index
//   dlogits_i = (exp(x_i + b - lse_i) - onehot(y_i)) * scale   0 rows where ignored
//
// Pass 1 reads the row once, each thread keeping a running max m and sum s of exp(x - m) over the
// columns it owns (rescaling s when m grows), then the (m, s) pairs are merged across the row. The
// owner of the label's column keeps its logit from that pass, so the label is never used as an address.
// Pass 2 re-reads the row (from L1/L2 by then) and writes dlogits in the GEMM dtype; each thread reads
// and writes only its own columns, so dlogits may be the logits themselves (in place, float32).
// Ignored rows are not read at all: loss 0 and a row of zeros. Reductions are shuffle trees and a fixed
// order over warps, with no atomics: the results are bitwise the same on every run.
//
// A label that is neither ignore_index nor in [0, V) fails a device-side assert (the public op checks
// labels beforehand). The Triton rows kernel instead reads the logit at that label's address, out of
// bounds; this kernel has no such read, whatever the label.
#include "common.cuh"
#include "ops.h"

#include <utility>

namespace aimv2 {
namespace {

// Why two shapes of the same kernel: a row of V <= kWarpRowMaxVocab float32 logits is at most 4 KiB,
// eight 16-byte loads per lane of one warp; a block per row would leave most of its threads idle
// there (V = 7: 7 of 32 or more) and pay block barriers for a few values. So small vocabularies get a
// warp per row (kWarpRowsPerBlock rows per block, reductions by shuffles alone), and larger ones a
// block of up to 512 threads per row (V = 32000: 16 packs of 4 per thread), with warp partial results
// merged through shared memory.
constexpr int kWarpRowMaxVocab = 1024;
constexpr int kWarpRowsPerBlock = 8;
constexpr int kMaxThreads = 512;  // threads_for_row's cap
// Resident blocks asked of the warp-per-row shape (a 64-register budget): with only its block size to
// go on, ptxas squeezed some instantiations into 32 registers for full occupancy by spilling a pointer.
constexpr int kWarpRowMinBlocks = 4;

// Columns per pack: 16 bytes of the output dtype (8 for fp16/bf16, so their stores are full width,
// the float32 logits then moving 32 bytes in two accesses), 4 for float32.
template <typename Out>
constexpr int kRowPack = kVec<Out> > kVec<float> ? kVec<Out> : kVec<float>;

// (m, s) <- the log-sum-exp state of the union of (m, s) and (m2, s2). Symmetric in its two operands
// (max and + commute), so the two lanes of a butterfly shuffle get the same bits. m = -inf holds
// nothing yet (s = 0), or only -inf logits; a NaN in s propagates.
__device__ __forceinline__ void lse_merge(float& m, float& s, float m2, float s2) {
  const float hi = fmaxf(m, m2);
  if (hi == -INFINITY) {
    s += s2;
  } else {
    s = s * __expf(m - hi) + s2 * __expf(m2 - hi);
  }
  m = hi;
}

// Merges (m, s) and sums t over a warp; every lane gets the result.
__device__ __forceinline__ void warp_lse(float& m, float& s, float& t) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, offset);
    const float s2 = __shfl_xor_sync(0xffffffffu, s, offset);
    t += __shfl_xor_sync(0xffffffffu, t, offset);
    lse_merge(m, s, m2, s2);
  }
}

// a[k] += bias[c + k] for a pack (contiguous bias: `vec` requires a unit stride) or one column.
template <int K, typename B>
__device__ __forceinline__ void add_bias(const B* __restrict__ bias, int64_t stride, int c, float (&a)[K]) {
  if (bias == nullptr) return;
  if constexpr (K == 1) {
    a[0] += static_cast<float>(bias[static_cast<int64_t>(c) * stride]);
  } else {
    float b[K];
    load_floats<K>(bias + c, b);
#pragma unroll
    for (int k = 0; k < K; ++k) a[k] += b[k];
  }
}

// Out: dlogits' dtype; B: the bias's (float when there is none); L: int32_t or int64_t labels.
template <typename Out, typename B, typename L, bool kWarpPerRow>
__global__ void __launch_bounds__(kWarpPerRow ? kWarpRowsPerBlock * kWarp : kMaxThreads,
                                  kWarpPerRow ? kWarpRowMinBlocks : 1)
    ce_rows_kernel(Rows<float> logits,                // (rows, vocab); not const: dlogits may be it
                   const B* __restrict__ bias,        // (vocab,) or nullptr
                   int64_t bias_stride,
                   const L* __restrict__ labels,      // (rows,)
                   int64_t labels_stride,
                   const float* __restrict__ scale,   // () 1 / max(n_counted, 1), read when dlogits
                   float* __restrict__ loss,          // (rows,)
                   int64_t loss_stride,
                   Rows<Out> dlogits,                 // (rows, vocab), or data == nullptr: loss only
                   int64_t rows, int vocab, int64_t ignore_index, bool vec) {
  constexpr int W = kRowPack<Out>;
  int64_t row;
  int tid, nthreads;
  if constexpr (kWarpPerRow) {
    row = static_cast<int64_t>(blockIdx.x) * kWarpRowsPerBlock + threadIdx.x / kWarp;
    if (row >= rows) return;  // whole warps; no block barrier below in this shape
    tid = threadIdx.x % kWarp;
    nthreads = kWarp;
  } else {
    row = blockIdx.x;
    tid = threadIdx.x;
    nthreads = blockDim.x;
  }
  float* x = logits.row(row);
  const int64_t label = static_cast<int64_t>(labels[row * labels_stride]);
  const bool counted = label != ignore_index;  // uniform over the row's threads, as is all below
  if (counted && (label < 0 || label >= vocab)) {
    CUDA_KERNEL_ASSERT(label >= 0 && label < vocab);  // traps: nothing after it runs
    return;
  }
  const int target = static_cast<int>(label);

  // Pass 1: running max m and sum s of exp(x - m) over this thread's columns; t: the label's logit,
  // kept by the one thread that owns its column (0 elsewhere, so the row's sum of t is that logit).
  // An ignored row is not read: its loss is 0 and its gradient a row of zeros.
  float row_loss = 0.f, lse = 0.f;
  if (counted) {
    float m = -INFINITY, s = 0.f, t = 0.f;
    for_each_chunk<W>(vocab, vec, tid, nthreads, [&](int c, auto width) {
      constexpr int K = decltype(width)::value;
      float a[K];
      load_floats<K>(x + c, a);
      add_bias<K>(bias, bias_stride, c, a);
      float hi = a[0];
#pragma unroll
      for (int k = 1; k < K; ++k) hi = fmaxf(hi, a[k]);
      if (hi > m) {  // m = -inf at first: exp(-inf) = 0 clears s (= 0)
        s *= __expf(m - hi);
        m = hi;
      }
#pragma unroll
      for (int k = 0; k < K; ++k) {
        s += __expf(a[k] - m);
        if (c + k == target) t = a[k];
      }
    });

    warp_lse(m, s, t);
    if constexpr (!kWarpPerRow) {
      // Every thread merges the warps' results in warp order: the same bits everywhere, and the
      // scratch is written once per block, so one barrier suffices. It also orders pass 1's reads
      // of the row before pass 2's writes, though each thread only rewrites columns it read itself.
      __shared__ float part_m[kMaxThreads / kWarp], part_s[kMaxThreads / kWarp], part_t[kMaxThreads / kWarp];
      const int warp = threadIdx.x / kWarp;
      if (threadIdx.x % kWarp == 0) {
        part_m[warp] = m;
        part_s[warp] = s;
        part_t[warp] = t;
      }
      __syncthreads();
      m = part_m[0];
      s = part_s[0];
      t = part_t[0];
      const int warps = static_cast<int>(blockDim.x / kWarp);
      for (int w = 1; w < warps; ++w) {
        lse_merge(m, s, part_m[w], part_s[w]);
        t += part_t[w];
      }
    }
    lse = m + __logf(s);
    row_loss = lse - t;
  }
  if (tid == 0) loss[row * loss_stride] = row_loss;
  if (dlogits.data == nullptr) return;

  // Pass 2: dlogits = (softmax - onehot) * scale over the same columns per thread as pass 1; the
  // weight is 0 on an ignored row, whose logits are not read.
  const float w = counted ? *scale : 0.f;
  Out* d = dlogits.row(row);
  for_each_chunk<W>(vocab, vec, tid, nthreads, [&](int c, auto width) {
    constexpr int K = decltype(width)::value;
    float a[K] = {};
    if (counted) {
      load_floats<K>(x + c, a);
      add_bias<K>(bias, bias_stride, c, a);
#pragma unroll
      for (int k = 0; k < K; ++k) {
        float p = __expf(a[k] - lse);
        if (c + k == target) p -= 1.f;
        a[k] = p * w;
      }
    }
    store_floats<K>(d + c, a);
  });
}

// [first, last) bytes that a strided tensor's elements span (empty for an empty tensor).
std::pair<uintptr_t, uintptr_t> byte_span(const at::Tensor& t) {
  if (t.numel() == 0) return {0, 0};
  int64_t lo = 0, hi = 0;
  for (int64_t i = 0; i < t.dim(); ++i) {
    const int64_t extent = (t.size(i) - 1) * t.stride(i);
    (extent < 0 ? lo : hi) += extent;
  }
  const auto base = reinterpret_cast<uintptr_t>(t.data_ptr());
  const int64_t size = t.element_size();
  return {base + lo * size, base + (hi + 1) * size};
}

bool overlap(const at::Tensor& a, const at::Tensor& b) {
  const auto sa = byte_span(a), sb = byte_span(b);
  return sa.first < sb.second && sb.first < sa.second;
}

// A (rows, vocab) operand: the columns contiguous, rows at a stride of at least vocab apart.
void check_row_layout(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, op, ": ", name,
              " must have contiguous rows (unit last stride), got strides ", t.strides());
  TORCH_CHECK(t.size(0) <= 1 || t.stride(0) >= t.size(1), op, ": ", name,
              " must have a row stride of at least V (rows that do not overlap), got strides ", t.strides(),
              " for shape ", t.sizes());
}

// Launches the kernel for the dtypes of this call (Out, B, L fixed), in the shape chosen by vocab.
template <typename Out, typename B, typename L>
void launch_ce_rows(const at::Tensor& logits, const at::Tensor& bias, const at::Tensor& labels,
                    int64_t ignore_index, const at::Tensor& scale, const at::Tensor& loss_out,
                    const at::Tensor& dlogits, cudaStream_t stream) {
  const int64_t rows = logits.size(0);
  const int vocab = static_cast<int>(logits.size(1));
  constexpr int W = kRowPack<Out>;
  // Packs only when every row of every operand starts on a pack boundary, and the bias (read as
  // packs at the same columns) is contiguous.
  bool vec = packs_aligned(W, {logits});
  if (dlogits.defined()) vec = vec && packs_aligned(W, {dlogits});
  if (bias.defined()) vec = vec && bias.stride(0) == 1 && packs_aligned(W, {bias});
  const B* bias_ptr = bias.defined() ? static_cast<const B*>(bias.data_ptr()) : nullptr;
  const int64_t bias_stride = bias.defined() ? bias.stride(0) : 0;
  const Rows<float> x{static_cast<float*>(logits.data_ptr()), logits.stride(0)};
  const Rows<Out> d = dlogits.defined() ? Rows<Out>{static_cast<Out*>(dlogits.data_ptr()), dlogits.stride(0)}
                                        : Rows<Out>{nullptr, 0};
  const float* scale_ptr = scale.data_ptr<float>();
  const L* labels_ptr = static_cast<const L*>(labels.data_ptr());
  float* loss_ptr = loss_out.data_ptr<float>();
  if (vocab <= kWarpRowMaxVocab) {
    const int64_t blocks = (rows + kWarpRowsPerBlock - 1) / kWarpRowsPerBlock;
    ce_rows_kernel<Out, B, L, true><<<static_cast<unsigned>(blocks), kWarpRowsPerBlock * kWarp, 0, stream>>>(
        x, bias_ptr, bias_stride, labels_ptr, labels.stride(0), scale_ptr, loss_ptr, loss_out.stride(0), d, rows, vocab,
        ignore_index, vec);
  } else {
    const int threads = threads_for_row(vec ? (vocab + W - 1) / W : vocab);
    ce_rows_kernel<Out, B, L, false><<<static_cast<unsigned>(rows), threads, 0, stream>>>(
        x, bias_ptr, bias_stride, labels_ptr, labels.stride(0), scale_ptr, loss_ptr, loss_out.stride(0), d, rows, vocab,
        ignore_index, vec);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void ce_rows(const at::Tensor& logits, const std::optional<at::Tensor>& bias, const at::Tensor& labels,
             int64_t ignore_index, const at::Tensor& scale, const at::Tensor& loss_out,
             const std::optional<at::Tensor>& dlogits_out) {
  const char* op = "ce_rows";
  TORCH_CHECK(logits.is_cuda(), op, ": logits must be a CUDA tensor, got one on ", logits.device());
  TORCH_CHECK(logits.scalar_type() == at::kFloat, op,
              ": logits must be float32 (the chunk driver's compute dtype; float64 runs the reference rows), got ",
              logits.scalar_type());
  TORCH_CHECK(logits.dim() == 2, op, ": logits must have shape (c, V), got ", logits.sizes());
  check_row_layout(op, "logits", logits);
  const int64_t rows = logits.size(0);
  const int64_t vocab = logits.size(1);
  TORCH_CHECK(vocab <= INT32_MAX, op, ": V must be below 2^31, got ", vocab);
  TORCH_CHECK(rows <= INT32_MAX, op, ": at most 2^31 - 1 rows per call, got ", rows);

  at::Tensor bias_t;
  if (bias.has_value()) {
    bias_t = *bias;
    check_float_input(op, "bias", bias_t);
    check_same_device(op, "bias", bias_t, logits);
    check_shape(op, "bias", bias_t, {vocab});
  }
  check_same_device(op, "labels", labels, logits);
  TORCH_CHECK(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt, op,
              ": labels must be int64 or int32, got ", labels.scalar_type());
  check_shape(op, "labels", labels, {rows});
  check_same_device(op, "scale", scale, logits);
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == 1, op,
              ": scale must be a float32 scalar tensor, got ", scale.scalar_type(), " of shape ", scale.sizes());
  check_same_device(op, "loss_out", loss_out, logits);
  TORCH_CHECK(loss_out.scalar_type() == at::kFloat, op, ": loss_out must be float32, got ", loss_out.scalar_type());
  check_shape(op, "loss_out", loss_out, {rows});
  TORCH_CHECK(rows <= 1 || loss_out.stride(0) != 0, op, ": loss_out must not repeat elements (stride 0)");
  TORCH_CHECK(!overlap(loss_out, logits), op, ": loss_out must not overlap logits");

  at::Tensor dlogits;
  bool in_place = false;
  if (dlogits_out.has_value()) {
    dlogits = *dlogits_out;
    check_float_input(op, "dlogits_out", dlogits);
    check_same_device(op, "dlogits_out", dlogits, logits);
    check_shape(op, "dlogits_out", dlogits, logits.sizes());
    check_row_layout(op, "dlogits_out", dlogits);
    in_place = dlogits.data_ptr() == logits.data_ptr() && dlogits.scalar_type() == logits.scalar_type() &&
               (rows <= 1 || dlogits.stride(0) == logits.stride(0));
    TORCH_CHECK(in_place || !overlap(dlogits, logits), op,
                ": dlogits_out must be logits itself (in place) or not overlap it");
    TORCH_CHECK(!overlap(loss_out, dlogits), op, ": loss_out must not overlap dlogits_out");
  }

  const c10::cuda::CUDAGuard guard(logits.device());
  if (rows == 0) return;
  // The outputs the kernel must write in full (not the logits when dlogits_out is them); only
  // contiguous ones, as the hook fills the bytes from data_ptr on.
  const bool poison_loss = loss_out.is_contiguous();
  const bool poison_dlogits = dlogits.defined() && !in_place && dlogits.is_contiguous();
  poison_outputs({poison_loss ? loss_out : at::Tensor(), poison_dlogits ? dlogits : at::Tensor()});

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::ScalarType out_type = dlogits.defined() ? dlogits.scalar_type() : at::kFloat;
  const at::ScalarType bias_type = bias_t.defined() ? bias_t.scalar_type() : at::kFloat;
  AIMV2_DISPATCH_FLOATS(out_type, "ce_rows", [&] {
    using Out = scalar_t;
    AIMV2_DISPATCH_FLOATS(bias_type, "ce_rows", [&] {
      using B = scalar_t;
      if (labels.scalar_type() == at::kLong) {
        launch_ce_rows<Out, B, int64_t>(logits, bias_t, labels, ignore_index, scale, loss_out, dlogits, stream);
      } else {
        launch_ce_rows<Out, B, int32_t>(logits, bias_t, labels, ignore_index, scale, loss_out, dlogits, stream);
      }
    });
  });
}

}  // namespace aimv2
