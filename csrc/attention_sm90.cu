// Prefix-causal attention for Hopper (sm_90a): warpgroup MMA (wgmma), TMA loads, mbarrier pipelines,
// warp specialization. Key j is visible to query i of sample b iff (not causal) or j <= i or
// j < prefix_len[b]. The design is FlashAttention-3's, written here with CuTe.
//
// Forward (attention_fwd_sm90_kernel): one CTA per (query tile of 128 rows, head, sample), the last
// query tiles (which see the most keys) launched first. 3 warpgroups:
//   * warpgroup 0, the producer: setmaxnreg down to 24 registers; one thread issues the TMA loads:
//     the Q tile once (its own mbarrier), then K and V tiles of 128 keys into two kStages-deep rings
//     (cutlass::PipelineTmaAsync: a "full" transaction mbarrier per stage that TMA completes, an
//     "empty" mbarrier per stage that the 256 consumer threads arrive on when done with the stage);
//   * warpgroups 1 and 2, the consumers: setmaxnreg up to 240 registers; each owns 64 query rows and
//     runs S = Q K^T (SS wgmma, Q and K from shared memory), masking, online softmax in base 2, and
//     O += P V (RS wgmma: P from registers, V from shared memory as an MN-major operand).
//     Intra-warpgroup pipelining: the Q K^T of key tile n is issued before the P V of tile n + 1, so
//     the softmax of tile n runs while the tensor cores do the P V product. O is rescaled by the
//     softmax correction of tile n + 1 between issuing that Q K^T and that P V (so the rescale runs
//     while Q K^T does), not after the P V completes: the same operations on O in the same order.
//     Inter-warpgroup ping-pong: the two consumers take turns at issuing their GEMMs, so that one's
//     GEMMs run while the other does its softmax. A turn is: the first Q K^T; then Q K^T of tile n +
//     P V of tile n + 1 for each further tile; then the last P V (N + 1 turns over N key tiles, the
//     same N for both: `key_blocks` depends on the CTA's query tile only). Named barriers
//     kSchedulerBarrier + w (256 threads): warpgroup w waits on its own before issuing a turn's GEMMs
//     and arrives on the other's right after issuing them; warpgroup 0 takes its first turn without
//     waiting and warpgroup 1 does not arrive after its last, so each barrier sees as many waits as
//     arrivals and the turns run 0, 1, 0, 1, ... (details and the deadlock argument at the loop).
// Tile classification, computed the same way by the producer and the consumers (`key_blocks`): for
// the query tile [m0, m0 + 128) and the visible prefix P (0 plain causal, S non-causal), key tiles
// below max(m0 + 1, P) are visible to every query (no mask arithmetic), further tiles below
// max(min(m0 + 128, S), P) are boundary tiles (mask (j <= i) | (j < P)), and the rest are never loaded.
// Key tiles are visited from the last to the first, so the boundary tiles come first.
// TMA zero-fills rows past S; rows past S are never stored.
//
// Shared memory (bf16/fp16; the 128-byte-swizzled layouts GMMA reads):
//   D = 64 : Q 16 KiB + 3 stages x (K 16 KiB + V 16 KiB) = 112 KiB (+ barriers)
//   D = 128: Q 32 KiB + 2 stages x (K 32 KiB + V 32 KiB) = 160 KiB (+ barriers)
// The output tile is staged through the Q buffer (each consumer warpgroup reuses its own 64 rows
// once its last Q K^T is done) and written with 16-byte stores, predicated on row < S. (FA3 stores O
// with stmatrix and a TMA store instead; that needs a TMA descriptor of `out` built on the host, which
// the launcher does not make.)
//
// Backward: see the section "backward" below.
//
// Built only for sm_90a (wgmma, setmaxnreg and TMA need the arch-specific target): other targets
// compile an empty kernel that traps, and the host entries refuse to launch unless the device is
// sm_90 and this library carries sm_90a code (`kernels_built_for_sm90a`).
#include "attention.h"
#include "common.cuh"
#include "ops.h"
#include "tma_descriptors.h"

#include <ATen/ops/empty.h>

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/cutlass.h>
#include <cutlass/numeric_conversion.h>
#include <cutlass/numeric_types.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include <array>
#include <atomic>
#include <cmath>

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define AIMV2_SM90A_DEVICE 1
#endif

namespace aimv2 {

// The backward's row statistics, a plain elementwise kernel that the Hopper attention backward runs
// first. Kept out of namespace sm90: scripts/cuda_kernel_table.py requires wgmma (HGMMA) in every
// attention kernel whose name says "sm90", and this one has no matrix product to make.
namespace hopper_attention {

// Per query row of (B, H, S) (varlen: of each sample's rows of (T, H, D)): delta = rowsum(dO * O) and
// lse * log2(e), into fp32 buffers of (B * H, s_pad) rows; rows [S, s_pad) get delta 0 and lse +inf, so that a padded query (a zero row
// of Q and dO) has P = exp2(s - inf) = 0 exactly in the backward's products. One warp per row.
// The 5-GEMM design also passes its float32 dQ accumulator, (B, H, S, D) contiguous (varlen: (H, T, D),
// the sample's row i at start + i, as lse): each lane zeroes its D / 32 values of the row, so the
// backward needs no memset launch. Only rows < S are zeroed: the only ones the atomics add to and
// the conversion reads.
template <class Element, int kHeadDim>
__global__ void __launch_bounds__(256) attention_bwd_rowstats_kernel(
    const Element* __restrict__ out, int64_t o_sb, int64_t o_sh, int64_t o_ss,      // (B, H, S, D)
    const Element* __restrict__ dout, int64_t d_sb, int64_t d_sh, int64_t d_ss,     // (B, H, S, D)
    const float* __restrict__ lse, int64_t l_sb, int64_t l_sh, int64_t l_ss,        // (B, H, S)
    float* __restrict__ lse2, float* __restrict__ delta, int seqlen, int s_pad, int heads,
    const int* __restrict__ cu_seqlens, float* __restrict__ dq_accum, int total_rows) {
  constexpr int kPerLane = kHeadDim / kWarp;
  const int lane = threadIdx.x % kWarp;
  const int row = blockIdx.x * (blockDim.x / kWarp) + threadIdx.x / kWarp;
  const int head = blockIdx.y, batch = blockIdx.z;
  if (row >= s_pad) return;
  const int64_t stat = (static_cast<int64_t>(batch) * heads + head) * s_pad + row;
  // Varlen: sample `batch` is rows [cu[b], cu[b + 1]) of one (T, H, D) batch (lse (H, T)).
  const int start = cu_seqlens == nullptr ? 0 : cu_seqlens[batch];
  if (cu_seqlens != nullptr) seqlen = cu_seqlens[batch + 1] - start;
  const int64_t b = cu_seqlens == nullptr ? batch : 0;
  if (row >= seqlen) {
    if (lane == 0) {
      lse2[stat] = INFINITY;
      delta[stat] = 0.f;
    }
    return;
  }
  float o[kPerLane], g[kPerLane];
  const int64_t r = start + row;
  load_floats<kPerLane>(out + b * o_sb + head * o_sh + r * o_ss + lane * kPerLane, o);
  load_floats<kPerLane>(dout + b * d_sb + head * d_sh + r * d_ss + lane * kPerLane, g);
  float acc = 0.f;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) acc = fmaf(o[i], g[i], acc);
  acc = warp_sum(acc);
  if (lane == 0) {
    delta[stat] = acc;
    lse2[stat] = lse[b * l_sb + head * l_sh + r * l_ss] * 1.4426950408889634f;
  }
  if (dq_accum != nullptr) {
    const float zeros[kPerLane] = {};
    store_floats<kPerLane>(dq_accum + ((b * heads + head) * total_rows + r) * kHeadDim + lane * kPerLane, zeros);
  }
}

// The 5-GEMM design's last step: dq = scale * dq_accum in dq's dtype and strides, rows < S of each
// (sample, head) (varlen: the sample's row i is row start + i of the (1, H, T, D) view, as in the
// row statistics). dq_accum is the (B, H, S, D) (varlen (H, T, D)) float32 sum of the dK/dV kernel's
// atomics. One thread per 8 values (a 16-byte store of dq); blocks of 256 threads cover 256 / (D / 8)
// rows.
template <class Element, int kHeadDim>
__global__ void __launch_bounds__(256) attention_bwd_dq_convert_kernel(
    const float* __restrict__ dq_accum, Element* __restrict__ dq, int64_t q_sb, int64_t q_sh, int64_t q_ss,
    float scale, int seqlen, int heads, int total_rows, const int* __restrict__ cu_seqlens) {
  constexpr int kChunks = kHeadDim / 8;  // threads per row
  const int row = (blockIdx.x * blockDim.x + threadIdx.x) / kChunks;
  const int col = (threadIdx.x % kChunks) * 8;
  const int head = blockIdx.y, batch = blockIdx.z;
  const int start = cu_seqlens == nullptr ? 0 : cu_seqlens[batch];
  if (cu_seqlens != nullptr) seqlen = cu_seqlens[batch + 1] - start;
  if (row >= seqlen) return;
  const int64_t b = cu_seqlens == nullptr ? batch : 0;
  const int64_t r = start + row;
  float v[8];
  load_floats<8>(dq_accum + ((b * heads + head) * total_rows + r) * kHeadDim + col, v);
#pragma unroll
  for (int i = 0; i < 8; ++i) v[i] *= scale;
  store_floats<8>(dq + b * q_sb + head * q_sh + r * q_ss + col, v);
}

}  // namespace hopper_attention

namespace sm90 {

using namespace cute;

// 1 in the device code of an sm_90a build of this file, 0 in any other device code (read by the host
// entries: a JIT build for "9.0" without the "a" would trap on the first launch).
#if defined(AIMV2_SM90A_DEVICE)
__device__ int attention_sm90_device_code_is_sm90a = 1;
#else
__device__ int attention_sm90_device_code_is_sm90a = 0;
#endif

constexpr int kWarpgroup = 128;
constexpr float kLog2e = 1.4426950408889634f;

// ---- layout helpers (warpgroup MMA accumulators) ----------------------------------------------------
//
// A 64 x N fp32 wgmma accumulator holds, per thread, ((2, 2, N/8), 1, 1) values: a pair of adjacent
// columns, the row 8 below, and one such group every 8 columns. Thread t's rows are
// 16 * (t / 32) + (t % 32) / 4 (+ 8), its columns 8 * g + 2 * (t % 4) (+ 1).

// ((2, 2, V), M, N) -> ((2, M), (2, V, N)): the accumulator as (rows, columns) of this thread.
template <class L>
CUTE_HOST_DEVICE constexpr auto rowcol_layout(L l) {
  return make_layout(make_layout(get<0, 1>(l), get<1>(l)), make_layout(get<0, 0>(l), get<0, 2>(l), get<2>(l)));
}

// ((2, 2, V), 1, 1) -> ((2, 2, 2), 1, V / 2): a 64 x N accumulator, converted to 16 bits, read as the
// register A operand of a 64 x _ x N product (k-block kb = column groups 2 kb and 2 kb + 1). The
// same register order as the RS wgmma's A fragment (checked by a static_assert at the use).
template <class L>
CUTE_HOST_DEVICE constexpr auto acc_to_a_layout(L l) {
  auto v = get<0>(l);
  constexpr int V = decltype(size<2>(v))::value;
  static_assert(V % 2 == 0, "the accumulator must span a multiple of 16 columns");
  auto inner = make_layout(get<0>(v), get<1>(v), make_layout(_2{}, stride<2>(v)));
  auto outer = make_layout(Int<V / 2>{}, stride<2>(v) * _2{});
  return make_layout(inner, get<1>(l), outer);
}

// One warpgroup's C (+)= A B over all k-blocks, issued asynchronously; waits until at most `kWait`
// committed batches are in flight (-1: no wait). zero_init starts from C = 0.
template <int kWait, class Mma, class TA, class TB, class TC>
__device__ __forceinline__ void wg_gemm(Mma& mma, TA const& a, TB const& b, TC& c, bool zero_init) {
  constexpr bool kRegisterA = !std::is_same_v<typename TA::engine_type::iterator, GMMA::DescriptorIterator>;
  if constexpr (kRegisterA) warpgroup_fence_operand(const_cast<TA&>(a));
  warpgroup_fence_operand(c);
  warpgroup_arrive();
  mma.accumulate_ = zero_init ? GMMA::ScaleOut::Zero : GMMA::ScaleOut::One;
  CUTE_UNROLL
  for (int k = 0; k < size<2>(a); ++k) {
    cute::gemm(mma, a(_, _, k), b(_, _, k), c);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
  if constexpr (kWait >= 0) warpgroup_wait<kWait>();
  warpgroup_fence_operand(c);
  if constexpr (kRegisterA) warpgroup_fence_operand(const_cast<TA&>(a));
}

// fp32 fragment -> 16-bit fragment of the same layout (pairs: one cvt.rn.{bf16x2,f16x2}.f32 each).
template <class To, class Frag>
__device__ __forceinline__ auto convert_frag(Frag const& f) {
  Tensor out = make_tensor<To>(f.layout());
  static_assert(decltype(size(f))::value % 2 == 0);
  cutlass::NumericArrayConverter<To, float, 2, cutlass::FloatRoundStyle::round_to_nearest> conv;
  CUTE_UNROLL
  for (int i = 0; i < size(f); i += 2) {
    cutlass::Array<float, 2> in;
    in[0] = f(i);
    in[1] = f(i + 1);
    cutlass::Array<To, 2> o = conv(in);
    out(i) = o[0];
    out(i + 1) = o[1];
  }
  return out;
}

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// Synchronize the 128 threads of one warpgroup on named barrier `id` (0 is __syncthreads').
__device__ __forceinline__ void warpgroup_sync(int id) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "n"(kWarpgroup) : "memory");
}

// Named barrier `id` over the 256 threads of two warpgroups (the forward's ping-pong): `consumers_sync`
// waits until 256 threads have reached it (its own 128 and the other warpgroup's 128 arrivals),
// `consumers_arrive` counts this warpgroup's 128 threads and goes on without waiting. Warp-uniform.
__device__ __forceinline__ void consumers_sync(int id) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "n"(2 * kWarpgroup) : "memory");
}

__device__ __forceinline__ void consumers_arrive(int id) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "n"(2 * kWarpgroup) : "memory");
}

// ---- the mask ---------------------------------------------------------------------------------------

// P in [0, S]: keys below P are visible to every query of the sample (S without causality).
__device__ __forceinline__ int visible_prefix(const void* prefix, int64_t prefix_stride, bool prefix_is_64,
                                              int b, int seqlen, bool causal) {
  if (!causal) return seqlen;
  if (prefix == nullptr) return 0;
  const int64_t v = prefix_is_64 ? static_cast<const int64_t*>(prefix)[b * prefix_stride]
                                 : static_cast<const int32_t*>(prefix)[b * prefix_stride];
  return static_cast<int>(v < 0 ? 0 : (v > seqlen ? seqlen : v));
}

// Where sample b's rows are in the TMA view (rows, D, H, batches) of q, k, v, dout: padded, rows
// [0, S) of batch b; varlen (cu_seqlens given: int32 (N + 1,) offsets on the device), rows
// [cu[b], cu[b + 1]) of the single packed batch. Rows of the next sample that a tile reaches past
// `seqlen` are loaded but never stored, and never visible to a stored row: the mask hides keys past the
// prefix and the diagonal, and the backward's padded row statistics give their queries P = 0.
struct SampleRows {
  int start, seqlen, tma_batch;
};

__device__ __forceinline__ SampleRows sample_rows(const int* cu_seqlens, int b, int seqlen) {
  if (cu_seqlens == nullptr) return {0, seqlen, b};
  const int start = cu_seqlens[b];
  return {start, cu_seqlens[b + 1] - start, 0};
}

// The (rows, D) matrix of sample `rows` and head `head` in a TMA copy's view of q, k, v or dout,
// (total_rows, D, H, batches): its row 0 is the sample's first row.
template <int kHeadDim, class Tma, class Params>
__device__ __forceinline__ auto sample_view(Tma const& tma, Params const& p, SampleRows const& rows, int head) {
  const auto shape = make_shape(p.total_rows, kHeadDim, p.heads, p.cu_seqlens == nullptr ? p.batch : 1);
  return domain_offset(make_coord(rows.start, _0{}), tma.get_tma_tensor(shape)(_, _, head, rows.tma_batch));
}

// Key tiles of kBlockN for the query tile [m0, m0 + kBlockM): tiles [0, full) are visible to every
// query of the tile (and lie inside S), tiles [full, end) need the mask, keys from end * kBlockN on
// are hidden from the whole tile. end >= 1 (key 0 is always visible).
struct KeyBlocks {
  int full, end;
};

template <int kBlockM, int kBlockN>
__host__ __device__ __forceinline__ KeyBlocks key_blocks(int m0, int prefix, int seqlen) {
  const int full_keys = min(max(m0 + 1, prefix), seqlen);
  const int hi = max(min(m0 + kBlockM, seqlen), prefix);
  return {full_keys / kBlockN, (hi + kBlockN - 1) / kBlockN};
}

// Query tiles of kBlockM for the key tile [n0, n0 + kBlockN): tiles [begin, full) need the mask,
// tiles [full, end) see every key of the tile, queries below begin * kBlockM see none of it.
struct QueryBlocks {
  int begin, full, end;
};

template <int kBlockM, int kBlockN>
__host__ __device__ __forceinline__ QueryBlocks query_blocks(int n0, int prefix, int seqlen) {
  const int n1 = min(n0 + kBlockN, seqlen);
  const int lo = n0 < prefix ? 0 : n0;
  const int first_full = n1 <= prefix ? 0 : n1 - 1;  // the first query that sees every key of the tile
  const int begin = lo / kBlockM;
  const int full = max((first_full + kBlockM - 1) / kBlockM, begin);
  return {begin, full, (seqlen + kBlockM - 1) / kBlockM};
}

// Writes a 64-row tile held in shared memory (the consumer's rows of a K-major swizzled buffer) to
// rows [row0, row0 + 64) of a (S, D) matrix with row stride `row_stride`, rows >= seqlen skipped.
template <int kHeadDim, class SmemTensor, class Element>
__device__ __forceinline__ void store_rows(SmemTensor const& tile, Element* dst, int64_t row_stride, int row0,
                                           int seqlen, int tid) {
  constexpr int kChunks = kHeadDim / 8;  // 16-byte chunks per row
  CUTE_UNROLL
  for (int i = tid; i < 64 * kChunks; i += kWarpgroup) {
    const int r = i / kChunks, c = (i % kChunks) * 8;
    if (row0 + r < seqlen) {
      *reinterpret_cast<uint4*>(dst + (row0 + r) * row_stride + c) = *reinterpret_cast<uint4 const*>(&tile(r, c));
    }
  }
}

struct GradOut {  // a (B, H, S, D) gradient buffer with a unit last stride
  void* data;
  int64_t sb, sh, ss;
};

// ---- forward ----------------------------------------------------------------------------------------

template <class Element_, int kHeadDim_>
struct FwdTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = 128;  // 2 consumer warpgroups x 64 query rows
  static constexpr int kBlockN = 128;
  static constexpr int kStages = kHeadDim == 64 ? 3 : 2;
  static constexpr int kConsumerWarpgroups = kBlockM / 64;
  static constexpr int kThreads = kWarpgroup * (kConsumerWarpgroups + 1);
  static constexpr int kProducerRegs = 24;
  static constexpr int kConsumerRegs = 240;
  static_assert(kProducerRegs * kWarpgroup + kConsumerRegs * kWarpgroup * kConsumerWarpgroups <= 65536);
  // Ping-pong between the consumers: consumer warpgroup w waits on named barrier kSchedulerBarrier + w
  // for its turn to issue GEMMs and arrives on kSchedulerBarrier + 1 - w once it has issued them
  // (ids 3 and 4, 256 threads each; 0 is __syncthreads', 1 and 2 the epilogue's warpgroup_sync(1 + w);
  // the K / V pipelines use mbarriers only). The protocol is written for exactly two consumers.
  static constexpr int kSchedulerBarrier = 3;
  static_assert(kConsumerWarpgroups == 2, "the ping-pong schedule alternates two consumer warpgroups");

  using D = Int<kHeadDim>;
  using BM = Int<kBlockM>;
  using BN = Int<kBlockN>;
  // One warpgroup's products: S (64 x BN) = Q K^T, O (64 x D) += P V.
  using MmaQK = decltype(make_tiled_mma(GMMA::ss_op_selector<Element, Element, float, Shape<_64, BN, D>>()));
  using MmaPV = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float, Shape<_64, D, BN>, GMMA::Major::K, GMMA::Major::MN>()));

  using SmemLayoutQ = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{}, Shape<BM, D>{}));
  using SmemLayoutK = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{}, Shape<BN, D, Int<kStages>>{}));
  // V stored like K, (keys, D) with D contiguous; read by P V as the (D, keys) MN-major operand.
  using SmemLayoutVt =
      decltype(composition(SmemLayoutK{}, make_ordered_layout(Shape<D, BN, Int<kStages>>{}, Step<_2, _1, _3>{})));

  // Global tensors as TMA sees them: (S, D, H, B) with element strides (row, 1, head, batch).
  using GmemShape = Shape<int, int, int, int>;
  using GmemStride = Stride<int64_t, _1, int64_t, int64_t>;
  using GmemTensor = decltype(make_tensor(make_gmem_ptr(static_cast<Element const*>(nullptr)), GmemShape{},
                                          GmemStride{}));
  using TmaQ = decltype(make_tma_copy(SM90_TMA_LOAD{}, GmemTensor{}, SmemLayoutQ{}, Shape<BM, D>{}, _1{}));
  using TmaKV = decltype(make_tma_copy(SM90_TMA_LOAD{}, GmemTensor{}, take<0, 2>(SmemLayoutK{}), Shape<BN, D>{}, _1{}));

  using Pipeline = cutlass::PipelineTmaAsync<kStages>;
  static constexpr uint32_t kTileBytes = kBlockN * kHeadDim * sizeof(Element);
  static constexpr uint32_t kQBytes = kBlockM * kHeadDim * sizeof(Element);

  struct SharedStorage {
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutQ>, 1024> q;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutK>, 1024> k;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutK>, 1024> v;
    typename Pipeline::SharedStorage pipe_k;
    typename Pipeline::SharedStorage pipe_v;
    alignas(8) uint64_t bar_q;
  };
  static constexpr int kSmemBytes = sizeof(SharedStorage);
  static_assert(kSmemBytes <= 232448, "over the 227 KiB of shared memory a block may use on sm_90");

  struct Params {
    TmaQ tma_q;
    TmaKV tma_k;
    TmaKV tma_v;
    Element* out;  // (B, S, H, D) contiguous; varlen (T, H, D)
    float* lse;    // (B, H, S) contiguous; varlen (H, T)
    const void* prefix;
    int64_t prefix_stride;
    int prefix_is_64;
    int causal;
    int seqlen, heads, batch;  // varlen: max_seqlen (the grid), H, N
    float scale_log2;          // softmax scale * log2(e)
    const int* cu_seqlens;     // varlen: (N + 1,) row offsets; null: padded
    int total_rows;            // rows of the TMA view: S, or T when varlen
  };
};

template <class Traits>
__global__ void __launch_bounds__(Traits::kThreads, 1)
    attention_fwd_sm90_kernel(CUTE_GRID_CONSTANT typename Traits::Params const p) {
#if defined(AIMV2_SM90A_DEVICE)
  using Element = typename Traits::Element;
  using Pipeline = typename Traits::Pipeline;
  using PipelineState = typename cutlass::PipelineState<Traits::kStages>;
  using TransactionBarrier = cutlass::arch::ClusterTransactionBarrier;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr float kLn2 = 0.6931471805599453f;

  extern __shared__ __align__(1024) unsigned char smem_raw[];
  auto& ss = *reinterpret_cast<typename Traits::SharedStorage*>(smem_raw);

  const int m_block = static_cast<int>(gridDim.x - 1 - blockIdx.x);  // longest rows first
  const int head = blockIdx.y;
  const int batch = blockIdx.z;
  const SampleRows rows = sample_rows(p.cu_seqlens, batch, p.seqlen);
  const int seqlen = rows.seqlen;
  const int m0 = m_block * kBlockM;
  if (m0 >= seqlen) return;  // varlen: a sample shorter than the longest (the whole block leaves)
  const int prefix = visible_prefix(p.prefix, p.prefix_stride, p.prefix_is_64, batch, seqlen, p.causal);
  const KeyBlocks blocks = key_blocks<kBlockM, kBlockN>(m0, prefix, seqlen);
  const int warpgroup = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x) / kWarpgroup, 0);

  // Barriers: Q's (one TMA arrival), and the K and V rings (warp 0 initializes them).
  if (threadIdx.x == 0) TransactionBarrier::init(&ss.bar_q, 1);
  typename Pipeline::Params pipe_params;
  pipe_params.role = warpgroup == 0 ? Pipeline::ThreadCategory::Producer : Pipeline::ThreadCategory::Consumer;
  pipe_params.is_leader = threadIdx.x == 0;
  pipe_params.num_consumers = kWarpgroup * Traits::kConsumerWarpgroups;
  pipe_params.transaction_bytes = Traits::kTileBytes;
  Pipeline pipe_k(ss.pipe_k, pipe_params, Shape<_1, _1, _1>{});
  Pipeline pipe_v(ss.pipe_v, pipe_params, Shape<_1, _1, _1>{});
  __syncthreads();  // barrier initialization (fenced by the pipelines' constructors) seen by all

  Tensor sQ = make_tensor(make_smem_ptr(ss.q.data()), typename Traits::SmemLayoutQ{});    // (BM, D)
  Tensor sK = make_tensor(make_smem_ptr(ss.k.data()), typename Traits::SmemLayoutK{});    // (BN, D, stages)
  Tensor sV = make_tensor(make_smem_ptr(ss.v.data()), typename Traits::SmemLayoutK{});    // (BN, D, stages)
  Tensor sVt = make_tensor(make_smem_ptr(ss.v.data()), typename Traits::SmemLayoutVt{});  // (D, BN, stages)

  if (warpgroup == 0) {
    // ---- producer ----
    cutlass::arch::warpgroup_reg_dealloc<Traits::kProducerRegs>();
    if (threadIdx.x == 0) {
      cute::prefetch_tma_descriptor(p.tma_q.get_tma_descriptor());
      cute::prefetch_tma_descriptor(p.tma_k.get_tma_descriptor());
      cute::prefetch_tma_descriptor(p.tma_v.get_tma_descriptor());
      const auto tile_m = Shape<Int<kBlockM>, Int<kHeadDim>>{};
      const auto tile_n = Shape<Int<kBlockN>, Int<kHeadDim>>{};
      Tensor gQ = local_tile(sample_view<kHeadDim>(p.tma_q, p, rows, head), tile_m, make_coord(m_block, 0));  // (BM, D)
      Tensor gK = local_tile(sample_view<kHeadDim>(p.tma_k, p, rows, head), tile_n, make_coord(_, 0));  // (BN, D, n)
      Tensor gV = local_tile(sample_view<kHeadDim>(p.tma_v, p, rows, head), tile_n, make_coord(_, 0));  // (BN, D, n)
      auto [tQg, tQs] = tma_partition(p.tma_q, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sQ), group_modes<0, 2>(gQ));
      auto [tKg, tKs] = tma_partition(p.tma_k, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sK), group_modes<0, 2>(gK));
      auto [tVg, tVs] = tma_partition(p.tma_v, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sV), group_modes<0, 2>(gV));

      TransactionBarrier::arrive_and_expect_tx(&ss.bar_q, Traits::kQBytes);
      copy(p.tma_q.with(ss.bar_q), tQg, tQs);
      PipelineState write = cutlass::make_producer_start_state<Pipeline>();
      for (int n = blocks.end - 1; n >= 0; --n) {
        pipe_k.producer_acquire(write);
        copy(p.tma_k.with(*pipe_k.producer_get_barrier(write)), tKg(_, n), tKs(_, write.index()));
        pipe_v.producer_acquire(write);
        copy(p.tma_v.with(*pipe_v.producer_get_barrier(write)), tVg(_, n), tVs(_, write.index()));
        ++write;
      }
    }
    return;
  }

  // ---- consumers: warpgroup w owns query rows [m0 + 64 (w - 1), m0 + 64 w) ----
  cutlass::arch::warpgroup_reg_alloc<Traits::kConsumerRegs>();
  const int cwg = warpgroup - 1;
  const int tid = threadIdx.x % kWarpgroup;
  const int row0 = m0 + 64 * cwg;

  typename Traits::MmaQK mma_qk;
  typename Traits::MmaPV mma_pv;
  auto thr_qk = mma_qk.get_thread_slice(tid);
  auto thr_pv = mma_pv.get_thread_slice(tid);
  Tensor sQw = local_tile(sQ, Shape<_64, Int<kHeadDim>>{}, make_coord(cwg, 0));  // (64, D)
  Tensor tSrQ = thr_qk.make_fragment_A(thr_qk.partition_A(sQw));                  // descriptors
  Tensor tSrK = thr_qk.make_fragment_B(thr_qk.partition_B(sK));
  Tensor tOrV = thr_pv.make_fragment_B(thr_pv.partition_B(sVt));
  Tensor tSrS = partition_fragment_C(mma_qk, Shape<_64, Int<kBlockN>>{});  // scores, fp32
  Tensor tOrO = partition_fragment_C(mma_pv, Shape<_64, Int<kHeadDim>>{});  // output, fp32
  static_assert(decltype(size(acc_to_a_layout(tSrS.layout())) ==
                         size(thr_pv.partition_fragment_A(make_tensor((Element*)nullptr,
                                                                      Shape<_64, Int<kBlockN>>{}))))::value);

  // This thread's (row, column) in the 64 x BN score tile, as (2 rows) x (BN / 4 columns).
  Tensor cS = thr_qk.partition_C(make_identity_tensor(Shape<_64, Int<kBlockN>>{}));
  Tensor cRC = make_tensor(cS.data(), rowcol_layout(cS.layout()));
  Tensor sRC = make_tensor(tSrS.data(), rowcol_layout(tSrS.layout()));
  Tensor oRC = make_tensor(tOrO.data(), rowcol_layout(tOrO.layout()));
  constexpr int kRows = decltype(size<0>(sRC))::value;  // 2
  static_assert(kRows == 2);

  const float scale_log2 = p.scale_log2;
  float row_max[kRows], row_sum[kRows];
  int query[kRows];
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r) query[r] = row0 + get<0>(cRC(r, 0));

  // Mask of a boundary tile starting at key n0.
  auto apply_mask = [&](int n0) {
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      CUTE_UNROLL
      for (int c = 0; c < size<1>(sRC); ++c) {
        const int key = n0 + get<1>(cRC(0, c));
        if (!(key <= query[r] || key < prefix)) sRC(r, c) = -INFINITY;
      }
    }
  };
  // Online softmax over the scores in tSrS (replaced by exp2 of the scaled, shifted scores); returns
  // the factor by which earlier partial sums (and O) must be multiplied.
  auto softmax_step = [&](bool first, float (&correction)[kRows]) {
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      float mx = first ? -INFINITY : row_max[r];
      CUTE_UNROLL
      for (int c = 0; c < size<1>(sRC); ++c) mx = fmaxf(mx, sRC(r, c));
      mx = quad_max(mx);
      const float shift = mx == -INFINITY ? 0.f : mx * scale_log2;  // rows with nothing visible yet
      correction[r] = first ? 1.f : exp2f(row_max[r] * scale_log2 - shift);
      row_max[r] = mx;
      float sum = 0.f;
      CUTE_UNROLL
      for (int c = 0; c < size<1>(sRC); ++c) {
        const float e = exp2f(fmaf(sRC(r, c), scale_log2, -shift));
        sRC(r, c) = e;
        sum += e;
      }
      row_sum[r] = first ? sum : fmaf(row_sum[r], correction[r], sum);
    }
  };

  // Multiplies O by the correction of the latest softmax step (O then relative to the new row max).
  auto rescale_o = [&](float const (&correction)[kRows]) {
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      CUTE_UNROLL
      for (int c = 0; c < size<1>(oRC); ++c) oRC(r, c) *= correction[r];
    }
  };

  // Ping-pong schedule. The GEMMs of this warpgroup are issued in N + 1 turns over the N = blocks.end
  // key tiles, visited as t = 0 .. N - 1: turn 0 the Q K^T of tile 0, turn t (1 .. N - 1) the Q K^T of
  // tile t and the P V of tile t - 1, turn N the P V of tile N - 1. Both consumer warpgroups have the
  // same N (`blocks` depends on the CTA's query tile, not on the warpgroup), so both run N + 1 turns;
  // the barrier counts below rely on that.
  //   my_turn    (kSchedulerBarrier + cwg):     waited on (bar.sync, 256) before a turn's GEMMs;
  //   other_turn (kSchedulerBarrier + 1 - cwg): arrived on (bar.arrive, 256) right after issuing them,
  //   before waiting for their results, so the other warpgroup issues its GEMMs as soon as ours are
  //   queued, and our softmax overlaps its GEMMs (and the other way round).
  // Warpgroup 0 (its barrier A = id 3) takes turn 0 without waiting; warpgroup 1 (B = id 4) does not
  // arrive after turn N. So A sees N waits (warpgroup 0, turns 1 .. N) and N arrivals (warpgroup 1,
  // after turns 0 .. N - 1), B sees N + 1 waits (warpgroup 1, turns 0 .. N) and N + 1 arrivals
  // (warpgroup 0, after turns 0 .. N): each bar.sync is completed by one bar.arrive of the other
  // warpgroup and no arrival is left pending at exit. Warpgroup 1's wait for turn k is completed by
  // warpgroup 0's arrival after its turn k, warpgroup 0's wait for turn k by warpgroup 1's arrival after
  // its turn k - 1, so turns are issued in the order 0:0, 1:0, 0:1, 1:1, ..., 0:N, 1:N, and neither
  // warpgroup can arrive on a barrier again before the other has waited on it (no phase of a barrier
  // gets its 256 arrivals from one warpgroup alone).
  // No deadlock: (i) both warpgroups cannot be stuck at their bar.sync together: warpgroup 1 waiting at
  // turn b means warpgroup 0 has not issued turn b (it is at a turn a <= b), warpgroup 0 waiting at turn
  // a means warpgroup 1 has not issued turn a - 1 (b <= a - 1). (ii) The only other waits are on the
  // warpgroup's own wgmma (always retire) and on the K / V tiles of a turn (K of tile t, V of tile t - 1
  // for turn t), done before the turn's bar.sync so that a warpgroup waiting for data does not hold its
  // turn. The producer loads K_0, V_0, K_1, V_1, ... in order, and loading K_t or V_{t-1} only needs
  // stages released in turns <= t - 1 (a K stage is released in the turn that reads it, a V stage in
  // the next one; kStages >= 1 suffices). A warpgroup waiting for turn t's data has finished turn t - 1;
  // the other has issued turn t - 2 (or t - 1) and finishes turn t - 1 without anything from the
  // waiting one (its data needs releases of turns <= t - 2, its turn the arrival already made), so the
  // data arrives.
  const int my_turn = Traits::kSchedulerBarrier + cwg;
  const int other_turn = Traits::kSchedulerBarrier + 1 - cwg;

  TransactionBarrier::wait(&ss.bar_q, 0);
  PipelineState read_k, read_v;  // both start at stage 0, phase 0

  // Turn 0, the first (highest) key tile: S = Q K^T, softmax.
  int n = blocks.end - 1;
  pipe_k.consumer_wait(read_k);
  if (cwg == 1) consumers_sync(my_turn);  // warpgroup 0 goes first
  wg_gemm<-1>(mma_qk, tSrQ, tSrK(_, _, _, read_k.index()), tSrS, true);
  consumers_arrive(other_turn);
  warpgroup_wait<0>();
  warpgroup_fence_operand(tSrS);
  pipe_k.consumer_release(read_k);
  ++read_k;
  if (n >= blocks.full) apply_mask(n * kBlockN);
  float correction[kRows];
  softmax_step(true, correction);  // correction = 1
  Tensor rP = convert_frag<Element>(tSrS);
  Tensor tOrP = make_tensor(rP.data(), acc_to_a_layout(rP.layout()));
  clear(tOrO);

  // Turns 1 .. N - 1: issue S_n = Q K_n^T and O = O * correction_{n+1} + P_{n+1} V_{n+1}; softmax of
  // S_n while P V runs (and while the other warpgroup's turn runs). O's rescale sits between the two
  // products: it needs the previous P V retired (the previous iteration's wait<0>) and must precede
  // the P V that accumulates into O, and there it overlaps the Q K^T. O goes through the same
  // operations in the same order as when it was rescaled after each P V (the first rescale multiplies
  // O = 0 by 1), so the result is unchanged.
  for (--n; n >= 0; --n) {
    pipe_k.consumer_wait(read_k);
    pipe_v.consumer_wait(read_v);
    consumers_sync(my_turn);
    wg_gemm<-1>(mma_qk, tSrQ, tSrK(_, _, _, read_k.index()), tSrS, true);
    warpgroup_fence_operand(tOrO);  // keeps the rescale after the Q K^T issue
    rescale_o(correction);
    wg_gemm<-1>(mma_pv, tOrP, tOrV(_, _, _, read_v.index()), tOrO, false);
    consumers_arrive(other_turn);
    warpgroup_wait<1>();  // Q K^T done
    warpgroup_fence_operand(tSrS);
    pipe_k.consumer_release(read_k);
    ++read_k;
    if (n >= blocks.full) apply_mask(n * kBlockN);
    softmax_step(false, correction);
    warpgroup_wait<0>();  // P V done: its P registers may be overwritten, O read
    warpgroup_fence_operand(tOrO);
    pipe_v.consumer_release(read_v);
    ++read_v;
    Tensor rPn = convert_frag<Element>(tSrS);
    CUTE_UNROLL
    for (int i = 0; i < size(rP); ++i) rP(i) = rPn(i);
  }
  // Turn N, the last P V (O rescaled before the turn: no Q K^T left to overlap with). Warpgroup 1 has
  // no later turn to hand over to; warpgroup 0's arrival completes warpgroup 1's wait for turn N.
  rescale_o(correction);
  pipe_v.consumer_wait(read_v);
  consumers_sync(my_turn);
  wg_gemm<-1>(mma_pv, tOrP, tOrV(_, _, _, read_v.index()), tOrO, false);
  if (cwg == 0) consumers_arrive(other_turn);
  warpgroup_wait<0>();
  warpgroup_fence_operand(tOrO);
  pipe_v.consumer_release(read_v);

  // ---- epilogue: O / rowsum, lse = max * scale + log(rowsum) (natural log) ----
  float lse[kRows];
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r) {
    const float sum = quad_sum(row_sum[r]);
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    lse[r] = sum > 0.f ? row_max[r] * scale_log2 * kLn2 + logf(sum) : -INFINITY;
    CUTE_UNROLL
    for (int c = 0; c < size<1>(oRC); ++c) oRC(r, c) *= inv;
  }
  if (tid % 4 == 0) {
    // lse (B, H, S), or (H, T) when varlen: row `query` of this sample at start + query.
    float* lse_row = p.lse + (static_cast<int64_t>(rows.tma_batch) * p.heads + head) * p.total_rows + rows.start;
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      if (query[r] < seqlen) lse_row[query[r]] = lse[r];
    }
  }
  // O through this warpgroup's rows of the Q buffer (its last Q K^T has completed), then 16-byte
  // stores of whole rows.
  Tensor rO = convert_frag<Element>(tOrO);
  Tensor tOsO = thr_pv.partition_C(sQw);
  copy(rO, tOsO);
  warpgroup_sync(1 + cwg);
  // out (B, S, H, D), or (T, H, D) when varlen: this sample's rows from row start of its batch.
  Element* out =
      p.out + ((static_cast<int64_t>(rows.tma_batch) * p.total_rows + rows.start) * p.heads + head) * kHeadDim;
  store_rows<kHeadDim>(sQw, out, static_cast<int64_t>(p.heads) * kHeadDim, row0, seqlen, tid);
#else
  __trap();  // built without sm_90a device code; the host entries never launch this
#endif
}

// ---- backward -------------------------------------------------------------------------------------
//
// Two designs, three launches each on the stream; `deterministic` (the ops' last argument) picks one.
//
// Deterministic (no atomics; 7 GEMMs per (query tile, key tile) pair: S and dP are computed twice):
//   1. hopper_attention::attention_bwd_rowstats_kernel: delta = rowsum(dO * O) and lse * log2(e) per
//      query row, padded per (sample, head) to a multiple of 128 rows (pad: delta 0, lse +inf).
//   2. attention_bwd_dq_sm90_kernel: one CTA per query tile of 128 rows (2 consumer warpgroups x 64
//      rows), over the key tiles the forward visits for that tile (`key_blocks`, the same skipped /
//      unmasked / boundary classification), last tile first:
//        S = Q K^T, dP = dO V^T (SS wgmma), P = exp2(S scale log2(e) - lse2) (masked in boundary
//        tiles), dS = P (dP - delta), dQ += dS K (RS wgmma, K read as the MN-major operand).
//      Q and dO come once by TMA; K and V through two kStages rings (V is released after dP, K after
//      the dQ product). P is computed while the dP product runs.
//   3. attention_bwd_dkdv_sm90_kernel<BwdDkvTraits<..., false>>: one CTA per key tile of 128 keys (2
//      consumer warpgroups x 64 keys), over the query tiles of 64 that see it (`query_blocks`: queries
//      below the tile see none of it unless it lies in the prefix; tiles from the first query that
//      sees all of it on need no mask):
//        S^T = K Q^T, dP^T = V dO^T (SS), P^T, dS^T as above, dV += P^T dO, dK += dS^T Q (RS, dO and
//        Q read as MN-major operands); dK *= scale at the end.
//      K and V come once by TMA; Q, dO (TMA) and the 64 lse2 and delta values of the tile (bulk
//      copies) through one kStages ring whose stages are released once dV and dK of the tile are done.
//      P^T is computed while the dP^T product runs, dS^T while the dV product runs.
//
// 5-GEMM (FlashAttention-2/3's; the default unless deterministic algorithms are asked for): dQ is
// summed with float32 atomics, whose order varies, so dQ may differ in its last bits from run to run
// (dK and dV do not).
//   1. the row statistics, which also zero a float32 dQ accumulator laid out like lse with D values
//      per row: (B, H, S, D), varlen (H, T, D) (no memset launch);
//   2. attention_bwd_dkdv_sm90_kernel<BwdDkvTraits<..., true>>: as above, and per query tile each
//      consumer warpgroup stores its dS^T (64 keys x 64 queries, 16-bit) into its own 8 KiB shared
//      buffer, then computes dQ_w (64 queries x D) = dS (64 queries x its 64 keys) K_w (its 64 K rows)
//      with an SS wgmma (dS read MN-major from the stored dS^T, K_w as (D, keys) MN-major), in
//      products of 64 columns of D, and adds each into the accumulator with float32 atomics
//      (RED.F32x2: two adjacent columns per instruction; queries past S skipped). Each warpgroup adds
//      its own 64-key share (2 x 64 x D atomics per query tile and CTA); dK += dS^T Q reads dS^T from
//      the same buffer (SS), so no dS registers are held while dK and dQ run, and runs during the
//      first chunk's atomics. Buffer protocol, per warpgroup w on named barrier 3 + w (128 threads):
//      bar.sync (every warp has retired the previous tile's dQ and dK products, which read the
//      buffer), store dS^T, fence.proxy.async (the stores visible to wgmma's async proxy), bar.sync
//      (every thread's stores fenced), issue the products; they retire within the iteration. One more
//      bar.sync before the epilogue overwrites K_w with dK, since the last dQ product read it.
//   3. hopper_attention::attention_bwd_dq_convert_kernel: dq = scale * accumulator in dq's dtype and
//      strides, rows < S (varlen: the sample's rows from its start).
// Each iteration retires its own dQ / dK products (a wgmma left in flight across the loop's back
// edge makes ptxas serialize every wgmma of the kernel, C7515).
// Both GMMA kernels: producer warpgroup at 24 registers issuing TMA from one thread, consumer
// warpgroups at 240; results staged through the consumer's own rows of an operand buffer it no
// longer reads, then stored 16 bytes at a time, rows past S skipped.
//
// Shared memory:
//   dQ   D = 64 : Q 16 + dO 16 + 2 stages x (K 16 + V 16) = 96 KiB;  key tiles of 128
//        D = 128: Q 32 + dO 32 + 2 stages x (K 16 + V 16) = 128 KiB; key tiles of 64
//   dKdV D = 64 : K 16 + V 16 + 3 stages x (Q 8 + dO 8 + 0.5) = 81.5 KiB;  query tiles of 64
//        D = 128: K 32 + V 32 + 3 stages x (Q 16 + dO 16 + 0.5) = 161.5 KiB; query tiles of 64
//        5-GEMM: + dS^T 2 warpgroups x 8 = 16 KiB: 97.5 / 177.5 KiB

template <class Element_, int kHeadDim_>
struct BwdDqTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = 128;  // 2 consumer warpgroups x 64 query rows
  static constexpr int kBlockN = kHeadDim == 64 ? 128 : 64;
  static constexpr int kStages = 2;
  static constexpr int kConsumerWarpgroups = 2;
  static constexpr int kThreads = kWarpgroup * (kConsumerWarpgroups + 1);
  static constexpr int kProducerRegs = 24;
  static constexpr int kConsumerRegs = 240;

  using D = Int<kHeadDim>;
  using BM = Int<kBlockM>;
  using BN = Int<kBlockN>;
  using MmaSdP = decltype(make_tiled_mma(GMMA::ss_op_selector<Element, Element, float, Shape<_64, BN, D>>()));
  using MmaDq = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float, Shape<_64, D, BN>, GMMA::Major::K, GMMA::Major::MN>()));
  using SmemLayoutQ = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{}, Shape<BM, D>{}));
  using SmemLayoutK = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{}, Shape<BN, D, Int<kStages>>{}));
  using SmemLayoutKt =
      decltype(composition(SmemLayoutK{}, make_ordered_layout(Shape<D, BN, Int<kStages>>{}, Step<_2, _1, _3>{})));
  using GmemTensor = typename FwdTraits<Element, kHeadDim>::GmemTensor;
  using TmaQ = decltype(make_tma_copy(SM90_TMA_LOAD{}, GmemTensor{}, SmemLayoutQ{}, Shape<BM, D>{}, _1{}));
  using TmaKV = decltype(make_tma_copy(SM90_TMA_LOAD{}, GmemTensor{}, take<0, 2>(SmemLayoutK{}), Shape<BN, D>{}, _1{}));
  using Pipeline = cutlass::PipelineTmaAsync<kStages>;
  static constexpr uint32_t kTileBytes = kBlockN * kHeadDim * sizeof(Element);
  static constexpr uint32_t kQBytes = kBlockM * kHeadDim * sizeof(Element);

  struct SharedStorage {
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutQ>, 1024> q;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutQ>, 1024> dout;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutK>, 1024> k;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutK>, 1024> v;
    typename Pipeline::SharedStorage pipe_k;
    typename Pipeline::SharedStorage pipe_v;
    alignas(8) uint64_t bar_q;
  };
  static constexpr int kSmemBytes = sizeof(SharedStorage);
  static_assert(kSmemBytes <= 232448, "over the 227 KiB of shared memory a block may use on sm_90");

  struct Params {
    TmaQ tma_q;
    TmaQ tma_do;
    TmaKV tma_k;
    TmaKV tma_v;
    GradOut dq;
    const float* lse2;   // (B * H, s_pad): lse * log2(e)
    const float* delta;  // (B * H, s_pad)
    int s_pad;
    const void* prefix;
    int64_t prefix_stride;
    int prefix_is_64;
    int causal;
    int seqlen, heads, batch;  // varlen: max_seqlen (the grid), H, N
    float scale_log2, scale;
    const int* cu_seqlens;  // varlen: (N + 1,) row offsets; null: padded (B, H, S, D)
    int total_rows;         // rows of the TMA view: S, or T when varlen
  };
};

template <class Traits>
__global__ void __launch_bounds__(Traits::kThreads, 1)
    attention_bwd_dq_sm90_kernel(CUTE_GRID_CONSTANT typename Traits::Params const p) {
#if defined(AIMV2_SM90A_DEVICE)
  using Element = typename Traits::Element;
  using Pipeline = typename Traits::Pipeline;
  using PipelineState = typename cutlass::PipelineState<Traits::kStages>;
  using TransactionBarrier = cutlass::arch::ClusterTransactionBarrier;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;

  extern __shared__ __align__(1024) unsigned char smem_raw[];
  auto& ss = *reinterpret_cast<typename Traits::SharedStorage*>(smem_raw);

  const int m_block = static_cast<int>(gridDim.x - 1 - blockIdx.x);  // longest rows first
  const int head = blockIdx.y;
  const int batch = blockIdx.z;
  const SampleRows rows = sample_rows(p.cu_seqlens, batch, p.seqlen);
  const int seqlen = rows.seqlen;
  const int m0 = m_block * kBlockM;
  if (m0 >= seqlen) return;  // varlen: a sample shorter than the longest (the whole block leaves)
  const int prefix = visible_prefix(p.prefix, p.prefix_stride, p.prefix_is_64, batch, seqlen, p.causal);
  const KeyBlocks blocks = key_blocks<kBlockM, kBlockN>(m0, prefix, seqlen);
  const int warpgroup = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x) / kWarpgroup, 0);

  if (threadIdx.x == 0) TransactionBarrier::init(&ss.bar_q, 1);
  typename Pipeline::Params pipe_params;
  pipe_params.role = warpgroup == 0 ? Pipeline::ThreadCategory::Producer : Pipeline::ThreadCategory::Consumer;
  pipe_params.is_leader = threadIdx.x == 0;
  pipe_params.num_consumers = kWarpgroup * Traits::kConsumerWarpgroups;
  pipe_params.transaction_bytes = Traits::kTileBytes;
  Pipeline pipe_k(ss.pipe_k, pipe_params, Shape<_1, _1, _1>{});
  Pipeline pipe_v(ss.pipe_v, pipe_params, Shape<_1, _1, _1>{});
  __syncthreads();

  Tensor sQ = make_tensor(make_smem_ptr(ss.q.data()), typename Traits::SmemLayoutQ{});      // (BM, D)
  Tensor sdO = make_tensor(make_smem_ptr(ss.dout.data()), typename Traits::SmemLayoutQ{});  // (BM, D)
  Tensor sK = make_tensor(make_smem_ptr(ss.k.data()), typename Traits::SmemLayoutK{});      // (BN, D, stages)
  Tensor sV = make_tensor(make_smem_ptr(ss.v.data()), typename Traits::SmemLayoutK{});
  Tensor sKt = make_tensor(make_smem_ptr(ss.k.data()), typename Traits::SmemLayoutKt{});    // (D, BN, stages)

  if (warpgroup == 0) {
    cutlass::arch::warpgroup_reg_dealloc<Traits::kProducerRegs>();
    if (threadIdx.x == 0) {
      cute::prefetch_tma_descriptor(p.tma_q.get_tma_descriptor());
      cute::prefetch_tma_descriptor(p.tma_do.get_tma_descriptor());
      cute::prefetch_tma_descriptor(p.tma_k.get_tma_descriptor());
      cute::prefetch_tma_descriptor(p.tma_v.get_tma_descriptor());
      const auto tile_m = Shape<Int<kBlockM>, Int<kHeadDim>>{};
      const auto tile_n = Shape<Int<kBlockN>, Int<kHeadDim>>{};
      Tensor gQ = local_tile(sample_view<kHeadDim>(p.tma_q, p, rows, head), tile_m, make_coord(m_block, 0));
      Tensor gdO = local_tile(sample_view<kHeadDim>(p.tma_do, p, rows, head), tile_m, make_coord(m_block, 0));
      Tensor gK = local_tile(sample_view<kHeadDim>(p.tma_k, p, rows, head), tile_n, make_coord(_, 0));
      Tensor gV = local_tile(sample_view<kHeadDim>(p.tma_v, p, rows, head), tile_n, make_coord(_, 0));
      auto [tQg, tQs] = tma_partition(p.tma_q, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sQ), group_modes<0, 2>(gQ));
      auto [tdOg, tdOs] =
          tma_partition(p.tma_do, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sdO), group_modes<0, 2>(gdO));
      auto [tKg, tKs] = tma_partition(p.tma_k, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sK), group_modes<0, 2>(gK));
      auto [tVg, tVs] = tma_partition(p.tma_v, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sV), group_modes<0, 2>(gV));

      TransactionBarrier::arrive_and_expect_tx(&ss.bar_q, 2 * Traits::kQBytes);
      copy(p.tma_q.with(ss.bar_q), tQg, tQs);
      copy(p.tma_do.with(ss.bar_q), tdOg, tdOs);
      PipelineState write = cutlass::make_producer_start_state<Pipeline>();
      for (int n = blocks.end - 1; n >= 0; --n) {
        pipe_k.producer_acquire(write);
        copy(p.tma_k.with(*pipe_k.producer_get_barrier(write)), tKg(_, n), tKs(_, write.index()));
        pipe_v.producer_acquire(write);
        copy(p.tma_v.with(*pipe_v.producer_get_barrier(write)), tVg(_, n), tVs(_, write.index()));
        ++write;
      }
    }
    return;
  }

  cutlass::arch::warpgroup_reg_alloc<Traits::kConsumerRegs>();
  const int cwg = warpgroup - 1;
  const int tid = threadIdx.x % kWarpgroup;
  const int row0 = m0 + 64 * cwg;

  typename Traits::MmaSdP mma_sdp;
  typename Traits::MmaDq mma_dq;
  auto thr_sdp = mma_sdp.get_thread_slice(tid);
  auto thr_dq = mma_dq.get_thread_slice(tid);
  Tensor sQw = local_tile(sQ, Shape<_64, Int<kHeadDim>>{}, make_coord(cwg, 0));
  Tensor sdOw = local_tile(sdO, Shape<_64, Int<kHeadDim>>{}, make_coord(cwg, 0));
  Tensor tSrQ = thr_sdp.make_fragment_A(thr_sdp.partition_A(sQw));
  Tensor tSrK = thr_sdp.make_fragment_B(thr_sdp.partition_B(sK));
  Tensor tdPrdO = thr_sdp.make_fragment_A(thr_sdp.partition_A(sdOw));
  Tensor tdPrV = thr_sdp.make_fragment_B(thr_sdp.partition_B(sV));
  Tensor tdQrK = thr_dq.make_fragment_B(thr_dq.partition_B(sKt));
  Tensor tSrS = partition_fragment_C(mma_sdp, Shape<_64, Int<kBlockN>>{});
  Tensor tdPrdP = partition_fragment_C(mma_sdp, Shape<_64, Int<kBlockN>>{});
  Tensor tdQrdQ = partition_fragment_C(mma_dq, Shape<_64, Int<kHeadDim>>{});
  Tensor rdS = make_tensor<Element>(tdPrdP.layout());
  Tensor tdQrdS = make_tensor(rdS.data(), acc_to_a_layout(rdS.layout()));

  Tensor cS = thr_sdp.partition_C(make_identity_tensor(Shape<_64, Int<kBlockN>>{}));
  Tensor cRC = make_tensor(cS.data(), rowcol_layout(cS.layout()));
  Tensor sRC = make_tensor(tSrS.data(), rowcol_layout(tSrS.layout()));
  Tensor dpRC = make_tensor(tdPrdP.data(), rowcol_layout(tdPrdP.layout()));
  constexpr int kRows = decltype(size<0>(sRC))::value;
  static_assert(kRows == 2);

  const float scale_log2 = p.scale_log2;
  const int64_t stat_base = (static_cast<int64_t>(batch) * p.heads + head) * p.s_pad;
  int query[kRows];
  float lse2[kRows], delta[kRows];
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r) {
    query[r] = row0 + get<0>(cRC(r, 0));  // < s_pad
    lse2[r] = p.lse2[stat_base + query[r]];
    delta[r] = p.delta[stat_base + query[r]];
  }

  clear(tdQrdQ);
  TransactionBarrier::wait(&ss.bar_q, 0);
  PipelineState read_k, read_v;
  for (int n = blocks.end - 1; n >= 0; --n) {
    pipe_k.consumer_wait(read_k);
    wg_gemm<-1>(mma_sdp, tSrQ, tSrK(_, _, _, read_k.index()), tSrS, true);
    pipe_v.consumer_wait(read_v);
    wg_gemm<-1>(mma_sdp, tdPrdO, tdPrV(_, _, _, read_v.index()), tdPrdP, true);
    warpgroup_wait<1>();  // S done; P is computed while dP runs
    warpgroup_fence_operand(tSrS);
    const bool masked = n >= blocks.full;
    const int n0 = n * kBlockN;
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      CUTE_UNROLL
      for (int c = 0; c < size<1>(sRC); ++c) {
        float prob = exp2f(fmaf(sRC(r, c), scale_log2, -lse2[r]));
        if (masked) {
          const int key = n0 + get<1>(cRC(0, c));
          if (!(key <= query[r] || key < prefix)) prob = 0.f;
        }
        sRC(r, c) = prob;
      }
    }
    warpgroup_wait<0>();  // dP done
    warpgroup_fence_operand(tdPrdP);
    pipe_v.consumer_release(read_v);
    ++read_v;
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      CUTE_UNROLL
      for (int c = 0; c < size<1>(dpRC); ++c) dpRC(r, c) = sRC(r, c) * (dpRC(r, c) - delta[r]);
    }
    Tensor dS = convert_frag<Element>(tdPrdP);
    CUTE_UNROLL
    for (int i = 0; i < size(rdS); ++i) rdS(i) = dS(i);
    // Retired within the iteration: a wgmma left in flight across the loop's back edge makes ptxas
    // serialize every wgmma of the kernel.
    wg_gemm<0>(mma_dq, tdQrdS, tdQrK(_, _, _, read_k.index()), tdQrdQ, false);
    pipe_k.consumer_release(read_k);
    ++read_k;
  }

  CUTE_UNROLL
  for (int i = 0; i < size(tdQrdQ); ++i) tdQrdQ(i) *= p.scale;
  Tensor rdQ = convert_frag<Element>(tdQrdQ);
  Tensor tdQsdQ = thr_dq.partition_C(sQw);  // this warpgroup's Q rows: its last S = Q K^T is done
  copy(rdQ, tdQsdQ);
  warpgroup_sync(1 + cwg);
  Element* dq = static_cast<Element*>(p.dq.data) + rows.tma_batch * p.dq.sb + head * p.dq.sh + rows.start * p.dq.ss;
  store_rows<kHeadDim>(sQw, dq, p.dq.ss, row0, seqlen, tid);
#else
  __trap();
#endif
}

// kAtomicDq_: the 5-GEMM design, which also computes dQ (see the section's comment); false: dK and dV
// only, dQ by attention_bwd_dq_sm90_kernel.
template <class Element_, int kHeadDim_, bool kAtomicDq_>
struct BwdDkvTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr bool kAtomicDq = kAtomicDq_;
  static constexpr int kBlockN = 128;  // keys: 2 consumer warpgroups x 64
  static constexpr int kBlockM = 64;   // queries per step
  static constexpr int kStages = 3;
  static constexpr int kConsumerWarpgroups = 2;
  static constexpr int kThreads = kWarpgroup * (kConsumerWarpgroups + 1);
  static constexpr int kProducerRegs = 24;
  static constexpr int kConsumerRegs = 240;
  // Named barrier of consumer warpgroup w around its dS buffer: kDsBarrier + w (ids 3 and 4; 0 is
  // __syncthreads', 1 and 2 the epilogues' warpgroup_sync(1 + w)).
  static constexpr int kDsBarrier = 3;

  using D = Int<kHeadDim>;
  using BM = Int<kBlockM>;
  using BN = Int<kBlockN>;
  using WG = Int<kConsumerWarpgroups>;
  // Per warpgroup: S^T, dP^T (64 keys x BM queries); dV, dK (64 keys x D).
  using MmaSdP = decltype(make_tiled_mma(GMMA::ss_op_selector<Element, Element, float, Shape<_64, BM, D>>()));
  using MmaDkv = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float, Shape<_64, D, BM>, GMMA::Major::K, GMMA::Major::MN>()));
  // Per warpgroup, 5-GEMM design: dQ (BM queries x D) = dS (BM x its 64 keys) K_w (64 keys x D), both
  // operands in shared memory as MN-major operands, in products of 64 columns of D each (a 64 x 128
  // fp32 accumulator in flight beside dK's would not fit the registers: ptxas serialized the wgmmas).
  static constexpr int kDqChunks = kHeadDim / 64;
  using MmaDq = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<BM, _64, _64>, GMMA::Major::MN, GMMA::Major::MN>()));
  // The 5-GEMM design's dK += dS^T Q reads dS^T from the same buffer (SS, K-major A) rather than
  // registers, so that no dS^T registers are held while dK and dQ are in flight.
  using MmaDkSS = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<_64, D, BM>, GMMA::Major::K, GMMA::Major::MN>()));
  using SmemLayoutKV = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{}, Shape<BN, D>{}));
  using SmemLayoutQ = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{}, Shape<BM, D, Int<kStages>>{}));
  using SmemLayoutQt =
      decltype(composition(SmemLayoutQ{}, make_ordered_layout(Shape<D, BM, Int<kStages>>{}, Step<_2, _1, _3>{})));
  // K read as (D, BN keys), D contiguous: the B operand of dS K.
  using SmemLayoutKt = decltype(composition(SmemLayoutKV{}, make_ordered_layout(Shape<D, BN>{}, Step<_2, _1>{})));
  // dS of each consumer warpgroup, (BM queries, 64 keys, warpgroup) with the queries contiguous (the
  // MN-major A operand of dS K), and the same memory as dS^T (64 keys, BM queries, warpgroup): the
  // view the threads store their dS^T accumulator values through.
  using SmemLayoutdS = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<Element>{}, Shape<BM, _64, WG>{}));
  using SmemLayoutdSt =
      decltype(composition(SmemLayoutdS{}, make_ordered_layout(Shape<_64, BM, WG>{}, Step<_2, _1, _3>{})));
  using GmemTensor = typename FwdTraits<Element, kHeadDim>::GmemTensor;
  using TmaKV = decltype(make_tma_copy(SM90_TMA_LOAD{}, GmemTensor{}, SmemLayoutKV{}, Shape<BN, D>{}, _1{}));
  using TmaQ = decltype(make_tma_copy(SM90_TMA_LOAD{}, GmemTensor{}, take<0, 2>(SmemLayoutQ{}), Shape<BM, D>{}, _1{}));
  using Pipeline = cutlass::PipelineTmaAsync<kStages>;
  static constexpr uint32_t kStageBytes = 2 * kBlockM * kHeadDim * sizeof(Element) + 2 * kBlockM * sizeof(float);
  static constexpr uint32_t kKVBytes = kBlockN * kHeadDim * sizeof(Element);

  // The dS buffers exist only in the 5-GEMM design (an empty base class takes no space).
  struct NoDsBuffer {};
  struct DsBuffer {
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutdS>, 1024> ds;
  };
  struct SharedStorage : std::conditional_t<kAtomicDq, DsBuffer, NoDsBuffer> {
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutKV>, 1024> k;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutKV>, 1024> v;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutQ>, 1024> q;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutQ>, 1024> dout;
    alignas(128) float lse2[kStages][kBlockM];
    alignas(128) float delta[kStages][kBlockM];
    typename Pipeline::SharedStorage pipe;
    alignas(8) uint64_t bar_kv;
  };
  static constexpr int kSmemBytes = sizeof(SharedStorage);
  static_assert(kSmemBytes <= 232448, "over the 227 KiB of shared memory a block may use on sm_90");

  struct Params {
    TmaKV tma_k;
    TmaKV tma_v;
    TmaQ tma_q;
    TmaQ tma_do;
    GradOut dk, dv;
    const float* lse2;   // (B * H, s_pad), 16-byte aligned rows
    const float* delta;  // (B * H, s_pad)
    int s_pad;
    const void* prefix;
    int64_t prefix_stride;
    int prefix_is_64;
    int causal;
    int seqlen, heads, batch;  // varlen: max_seqlen (the grid), H, N
    float scale_log2, scale;
    const int* cu_seqlens;  // varlen: (N + 1,) row offsets; null: padded (B, H, S, D)
    int total_rows;         // rows of the TMA view: S, or T when varlen
    float* dq_accum;        // 5-GEMM design: (B, H, S, D) float32, varlen (H, T, D), zeroed; else null
  };
};

template <class Traits>
__global__ void __launch_bounds__(Traits::kThreads, 1)
    attention_bwd_dkdv_sm90_kernel(CUTE_GRID_CONSTANT typename Traits::Params const p) {
#if defined(AIMV2_SM90A_DEVICE)
  using Element = typename Traits::Element;
  using Pipeline = typename Traits::Pipeline;
  using PipelineState = typename cutlass::PipelineState<Traits::kStages>;
  using TransactionBarrier = cutlass::arch::ClusterTransactionBarrier;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;

  extern __shared__ __align__(1024) unsigned char smem_raw[];
  auto& ss = *reinterpret_cast<typename Traits::SharedStorage*>(smem_raw);

  const int n_block = blockIdx.x;  // the first key tiles are seen by the most queries: launched first
  const int head = blockIdx.y;
  const int batch = blockIdx.z;
  const SampleRows rows = sample_rows(p.cu_seqlens, batch, p.seqlen);
  const int seqlen = rows.seqlen;
  const int n0 = n_block * kBlockN;
  if (n0 >= seqlen) return;  // varlen: a sample shorter than the longest (the whole block leaves)
  const int prefix = visible_prefix(p.prefix, p.prefix_stride, p.prefix_is_64, batch, seqlen, p.causal);
  const QueryBlocks blocks = query_blocks<kBlockM, kBlockN>(n0, prefix, seqlen);
  const int warpgroup = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x) / kWarpgroup, 0);
  const int64_t stat_base = (static_cast<int64_t>(batch) * p.heads + head) * p.s_pad;

  if (threadIdx.x == 0) TransactionBarrier::init(&ss.bar_kv, 1);
  typename Pipeline::Params pipe_params;
  pipe_params.role = warpgroup == 0 ? Pipeline::ThreadCategory::Producer : Pipeline::ThreadCategory::Consumer;
  pipe_params.is_leader = threadIdx.x == 0;
  pipe_params.num_consumers = kWarpgroup * Traits::kConsumerWarpgroups;
  pipe_params.transaction_bytes = Traits::kStageBytes;
  Pipeline pipe(ss.pipe, pipe_params, Shape<_1, _1, _1>{});
  __syncthreads();

  Tensor sK = make_tensor(make_smem_ptr(ss.k.data()), typename Traits::SmemLayoutKV{});       // (BN, D)
  Tensor sV = make_tensor(make_smem_ptr(ss.v.data()), typename Traits::SmemLayoutKV{});       // (BN, D)
  Tensor sQ = make_tensor(make_smem_ptr(ss.q.data()), typename Traits::SmemLayoutQ{});        // (BM, D, stages)
  Tensor sdO = make_tensor(make_smem_ptr(ss.dout.data()), typename Traits::SmemLayoutQ{});
  Tensor sQt = make_tensor(make_smem_ptr(ss.q.data()), typename Traits::SmemLayoutQt{});      // (D, BM, stages)
  Tensor sdOt = make_tensor(make_smem_ptr(ss.dout.data()), typename Traits::SmemLayoutQt{});

  if (warpgroup == 0) {
    cutlass::arch::warpgroup_reg_dealloc<Traits::kProducerRegs>();
    if (threadIdx.x == 0) {
      cute::prefetch_tma_descriptor(p.tma_k.get_tma_descriptor());
      cute::prefetch_tma_descriptor(p.tma_v.get_tma_descriptor());
      cute::prefetch_tma_descriptor(p.tma_q.get_tma_descriptor());
      cute::prefetch_tma_descriptor(p.tma_do.get_tma_descriptor());
      const auto tile_m = Shape<Int<kBlockM>, Int<kHeadDim>>{};
      const auto tile_n = Shape<Int<kBlockN>, Int<kHeadDim>>{};
      Tensor gK = local_tile(sample_view<kHeadDim>(p.tma_k, p, rows, head), tile_n, make_coord(n_block, 0));
      Tensor gV = local_tile(sample_view<kHeadDim>(p.tma_v, p, rows, head), tile_n, make_coord(n_block, 0));
      Tensor gQ = local_tile(sample_view<kHeadDim>(p.tma_q, p, rows, head), tile_m, make_coord(_, 0));
      Tensor gdO = local_tile(sample_view<kHeadDim>(p.tma_do, p, rows, head), tile_m, make_coord(_, 0));
      auto [tKg, tKs] = tma_partition(p.tma_k, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sK), group_modes<0, 2>(gK));
      auto [tVg, tVs] = tma_partition(p.tma_v, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sV), group_modes<0, 2>(gV));
      auto [tQg, tQs] = tma_partition(p.tma_q, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sQ), group_modes<0, 2>(gQ));
      auto [tdOg, tdOs] =
          tma_partition(p.tma_do, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sdO), group_modes<0, 2>(gdO));

      TransactionBarrier::arrive_and_expect_tx(&ss.bar_kv, 2 * Traits::kKVBytes);
      copy(p.tma_k.with(ss.bar_kv), tKg, tKs);
      copy(p.tma_v.with(ss.bar_kv), tVg, tVs);
      PipelineState write = cutlass::make_producer_start_state<Pipeline>();
      for (int m = blocks.begin; m < blocks.end; ++m) {
        pipe.producer_acquire(write);
        const int stage = write.index();
        uint64_t* bar = pipe.producer_get_barrier(write);
        copy(p.tma_q.with(*bar), tQg(_, m), tQs(_, stage));
        copy(p.tma_do.with(*bar), tdOg(_, m), tdOs(_, stage));
        SM90_BULK_COPY_G2S::copy(p.lse2 + stat_base + m * kBlockM, bar, &ss.lse2[stage][0],
                                 kBlockM * static_cast<int>(sizeof(float)));
        SM90_BULK_COPY_G2S::copy(p.delta + stat_base + m * kBlockM, bar, &ss.delta[stage][0],
                                 kBlockM * static_cast<int>(sizeof(float)));
        ++write;
      }
    }
    return;
  }

  cutlass::arch::warpgroup_reg_alloc<Traits::kConsumerRegs>();
  const int cwg = warpgroup - 1;
  const int tid = threadIdx.x % kWarpgroup;
  const int key0 = n0 + 64 * cwg;

  typename Traits::MmaSdP mma_sdp;
  typename Traits::MmaDkv mma_dkv;
  auto thr_sdp = mma_sdp.get_thread_slice(tid);
  auto thr_dkv = mma_dkv.get_thread_slice(tid);
  Tensor sKw = local_tile(sK, Shape<_64, Int<kHeadDim>>{}, make_coord(cwg, 0));
  Tensor sVw = local_tile(sV, Shape<_64, Int<kHeadDim>>{}, make_coord(cwg, 0));
  Tensor tSrK = thr_sdp.make_fragment_A(thr_sdp.partition_A(sKw));
  Tensor tSrQ = thr_sdp.make_fragment_B(thr_sdp.partition_B(sQ));
  Tensor tdPrV = thr_sdp.make_fragment_A(thr_sdp.partition_A(sVw));
  Tensor tdPrdO = thr_sdp.make_fragment_B(thr_sdp.partition_B(sdO));
  Tensor tdVrdO = thr_dkv.make_fragment_B(thr_dkv.partition_B(sdOt));
  Tensor tdKrQ = thr_dkv.make_fragment_B(thr_dkv.partition_B(sQt));
  Tensor tSrS = partition_fragment_C(mma_sdp, Shape<_64, Int<kBlockM>>{});    // S^T: keys x queries
  Tensor tdPrdP = partition_fragment_C(mma_sdp, Shape<_64, Int<kBlockM>>{});  // dP^T
  Tensor tdVrdV = partition_fragment_C(mma_dkv, Shape<_64, Int<kHeadDim>>{});
  Tensor tdKrdK = partition_fragment_C(mma_dkv, Shape<_64, Int<kHeadDim>>{});
  Tensor rP = make_tensor<Element>(tSrS.layout());
  Tensor tdVrP = make_tensor(rP.data(), acc_to_a_layout(rP.layout()));
  Tensor rdS = make_tensor<Element>(tdPrdP.layout());
  Tensor tdKrdS = make_tensor(rdS.data(), acc_to_a_layout(rdS.layout()));

  Tensor cS = thr_sdp.partition_C(make_identity_tensor(Shape<_64, Int<kBlockM>>{}));
  Tensor cRC = make_tensor(cS.data(), rowcol_layout(cS.layout()));
  Tensor sRC = make_tensor(tSrS.data(), rowcol_layout(tSrS.layout()));
  Tensor dpRC = make_tensor(tdPrdP.data(), rowcol_layout(tdPrdP.layout()));
  constexpr int kRows = decltype(size<0>(sRC))::value;
  static_assert(kRows == 2);

  // 5-GEMM design: dQ (BM queries x D) = dS K_w, dS from this warpgroup's buffer (written as dS^T from
  // the dP^T accumulator's registers), K_w its own 64 K rows read as (D, 64 keys). Unused, and
  // compiled out, in the deterministic design, which has no dS buffer.
  Element* ds_smem = nullptr;
  if constexpr (Traits::kAtomicDq) ds_smem = ss.ds.data();
  typename Traits::MmaDq mma_dq;
  auto thr_dq = mma_dq.get_thread_slice(tid);
  Tensor sdS = make_tensor(make_smem_ptr(ds_smem), typename Traits::SmemLayoutdS{});    // (BM, 64, warpgroups)
  Tensor sdSt = make_tensor(make_smem_ptr(ds_smem), typename Traits::SmemLayoutdSt{});  // (64, BM, warpgroups)
  Tensor sKt = make_tensor(make_smem_ptr(ss.k.data()), typename Traits::SmemLayoutKt{});  // (D, BN)
  Tensor sKtw = local_tile(sKt, Shape<_64, _64>{}, make_coord(_, cwg));  // (64 of D, 64 keys, chunks)
  Tensor tdSsdS = thr_sdp.partition_C(sdSt)(_, _, _, cwg);                    // this thread's dS^T slots
  Tensor tdQrdS = thr_dq.make_fragment_A(thr_dq.partition_A(sdS))(_, _, _, cwg);  // descriptors
  Tensor tdQrK = thr_dq.make_fragment_B(thr_dq.partition_B(sKtw));               // (..., chunks)
  Tensor tdQrdQ = partition_fragment_C(mma_dq, Shape<Int<kBlockM>, _64>{});      // one chunk, fp32
  typename Traits::MmaDkSS mma_dk_ss;
  auto thr_dk_ss = mma_dk_ss.get_thread_slice(tid);
  Tensor tdKsdS = thr_dk_ss.make_fragment_A(thr_dk_ss.partition_A(sdSt))(_, _, _, cwg);  // descriptors
  Tensor tdKsQ = thr_dk_ss.make_fragment_B(thr_dk_ss.partition_B(sQt));
  Tensor cdQ = thr_dq.partition_C(make_identity_tensor(Shape<Int<kBlockM>, _64>{}));
  Tensor cdqRC = make_tensor(cdQ.data(), rowcol_layout(cdQ.layout()));
  Tensor dqRC = make_tensor(tdQrdQ.data(), rowcol_layout(tdQrdQ.layout()));
  static_assert(decltype(size<0>(dqRC))::value == kRows);
  // Offset in dq_accum of this sample's query 0 for this head ((B, H, S, D), varlen (H, T, D)).
  const int64_t dq_row0 =
      ((static_cast<int64_t>(rows.tma_batch) * p.heads + head) * p.total_rows + rows.start) * kHeadDim;

  const float scale_log2 = p.scale_log2;
  int key[kRows];
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r) key[r] = key0 + get<0>(cRC(r, 0));

  clear(tdVrdV);
  clear(tdKrdK);
  TransactionBarrier::wait(&ss.bar_kv, 0);
  PipelineState read;
  for (int m = blocks.begin; m < blocks.end; ++m) {
    pipe.consumer_wait(read);
    const int stage = read.index();
    wg_gemm<-1>(mma_sdp, tSrK, tSrQ(_, _, _, stage), tSrS, true);
    wg_gemm<-1>(mma_sdp, tdPrV, tdPrdO(_, _, _, stage), tdPrdP, true);
    warpgroup_wait<1>();  // S^T done; P^T is computed while dP^T runs
    warpgroup_fence_operand(tSrS);
    const bool masked = m < blocks.full;
    const int q0 = m * kBlockM;
    const float* lse2 = ss.lse2[stage];
    CUTE_UNROLL
    for (int c = 0; c < size<1>(sRC); ++c) {
      const int qc = get<1>(cRC(0, c));
      const float l = lse2[qc];
      CUTE_UNROLL
      for (int r = 0; r < kRows; ++r) {
        float prob = exp2f(fmaf(sRC(r, c), scale_log2, -l));
        if (masked && !(key[r] <= q0 + qc || key[r] < prefix)) prob = 0.f;
        sRC(r, c) = prob;
      }
    }
    {
      Tensor pt = convert_frag<Element>(tSrS);
      CUTE_UNROLL
      for (int i = 0; i < size(rP); ++i) rP(i) = pt(i);
    }
    wg_gemm<-1>(mma_dkv, tdVrP, tdVrdO(_, _, _, stage), tdVrdV, false);
    warpgroup_wait<1>();  // dP^T done; dS^T is computed while dV runs
    warpgroup_fence_operand(tdPrdP);
    const float* delta = ss.delta[stage];
    CUTE_UNROLL
    for (int c = 0; c < size<1>(dpRC); ++c) {
      const float dl = delta[get<1>(cRC(0, c))];
      CUTE_UNROLL
      for (int r = 0; r < kRows; ++r) dpRC(r, c) = sRC(r, c) * (dpRC(r, c) - dl);
    }
    {
      Tensor dst = convert_frag<Element>(tdPrdP);
      CUTE_UNROLL
      for (int i = 0; i < size(rdS); ++i) rdS(i) = dst(i);
    }
    if constexpr (Traits::kAtomicDq) {
      // dS^T into this warpgroup's buffer. The first barrier: every warp has retired the previous
      // tile's dQ and dK products, which read the whole buffer (wgmma.wait_group is per warp, and
      // each warp's rows of those products read values that all four warps stored). The fence makes
      // this thread's stores visible to the async proxy that wgmma reads shared memory through; the
      // second barrier: all 128 threads' stores are fenced before any warp issues a product.
      warpgroup_sync(Traits::kDsBarrier + cwg);
      copy(rdS, tdSsdS);
      cutlass::arch::fence_view_async_shared();
      warpgroup_sync(Traits::kDsBarrier + cwg);
      // dV retires first: with it, P^T and the products below in flight at once, the registers they
      // hold would not fit (ptxas would serialize every wgmma, C7512).
      warpgroup_wait<0>();
      warpgroup_fence_operand(tdVrdV);
      // Per 64 columns of D: dQ_j = dS K_w[:, j], retired before its atomics; dK += dS^T Q is issued
      // after the first chunk's product and runs during its atomics.
      CUTE_UNROLL
      for (int j = 0; j < Traits::kDqChunks; ++j) {
        wg_gemm<-1>(mma_dq, tdQrdS, tdQrK(_, _, _, j), tdQrdQ, true);
        if (j == 0) {
          wg_gemm<1>(mma_dk_ss, tdKsdS, tdKsQ(_, _, _, stage), tdKrdK, false);
        } else {
          warpgroup_wait<0>();
        }
        warpgroup_fence_operand(tdQrdQ);
        // dq_accum[query] += this warpgroup's 64-key share, two adjacent columns per atomic (one
        // RED.F32x2); queries past the sample's end are skipped (their rows belong to no query).
        CUTE_UNROLL
        for (int r = 0; r < kRows; ++r) {
          const int query = m * kBlockM + get<0>(cdqRC(r, 0));
          if (query < seqlen) {
            float* row = p.dq_accum + dq_row0 + static_cast<int64_t>(query) * kHeadDim + 64 * j;
            CUTE_UNROLL
            for (int c = 0; c < size<1>(dqRC); c += 2) {
              atomicAdd(reinterpret_cast<float2*>(row + get<1>(cdqRC(r, c))), make_float2(dqRC(r, c), dqRC(r, c + 1)));
            }
          }
        }
      }
      warpgroup_wait<0>();
      warpgroup_fence_operand(tdKrdK);
    } else {
      wg_gemm<0>(mma_dkv, tdKrdS, tdKrQ(_, _, _, stage), tdKrdK, false);
    }
    // Every product of the tile has retired (see the dQ kernel); the stage goes back to the producer.
    warpgroup_fence_operand(tdVrdV);
    pipe.consumer_release(read);
    ++read;
  }

  // dV through this warpgroup's V rows, dK (times scale) through its K rows: both last read by the
  // S^T and dP^T products, which are done, and in the 5-GEMM design K_w by the last dQ product: the
  // barrier makes sure every warp has retired it before any overwrites K_w.
  if constexpr (Traits::kAtomicDq) warpgroup_sync(Traits::kDsBarrier + cwg);
  CUTE_UNROLL
  for (int i = 0; i < size(tdKrdK); ++i) tdKrdK(i) *= p.scale;
  {
    Tensor rdV = convert_frag<Element>(tdVrdV);
    Tensor tdVsdV = thr_dkv.partition_C(sVw);
    copy(rdV, tdVsdV);
    Tensor rdK = convert_frag<Element>(tdKrdK);
    Tensor tdKsdK = thr_dkv.partition_C(sKw);
    copy(rdK, tdKsdK);
  }
  warpgroup_sync(1 + cwg);
  Element* dv = static_cast<Element*>(p.dv.data) + rows.tma_batch * p.dv.sb + head * p.dv.sh + rows.start * p.dv.ss;
  Element* dk = static_cast<Element*>(p.dk.data) + rows.tma_batch * p.dk.sb + head * p.dk.sh + rows.start * p.dk.ss;
  store_rows<kHeadDim>(sVw, dv, p.dv.ss, key0, seqlen, tid);
  store_rows<kHeadDim>(sKw, dk, p.dk.ss, key0, seqlen, tid);
#else
  __trap();
#endif
}

// ---- host side ----------------------------------------------------------------------------------------

// True when the current device is sm_90 and this library's device code for it is sm_90a.
bool kernels_built_for_sm90a(int device) {
  static std::array<std::atomic<int>, 64> cache{};  // 0 unknown, 1 yes, 2 no
  if (device < 0 || device >= static_cast<int>(cache.size())) return false;
  int state = cache[device].load();
  if (state == 0) {
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(), &capture));
    TORCH_CHECK(capture == cudaStreamCaptureStatusNone,
                "the first sm_90 attention call on a device must run outside CUDA graph capture (it checks "
                "once, synchronously, that the library carries sm_90a code)");
    int flag = 0;
    const cudaError_t err = cudaMemcpyFromSymbol(&flag, attention_sm90_device_code_is_sm90a, sizeof(int));
    if (err != cudaSuccess) {
      (void)cudaGetLastError();  // no image for this device: not an error of later calls
      flag = 0;
    }
    state = flag == 1 ? 1 : 2;
    cache[device].store(state);
  }
  return state == 1;
}

}  // namespace sm90

bool attention_sm90_supported(int device) {
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return major == 9 && minor == 0 && sm90::kernels_built_for_sm90a(device);
}

namespace sm90 {

void check_sm90_device(const char* op, const at::Tensor& q) {
  const int device = q.get_device();
  int major = 0, minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  TORCH_CHECK(major == 9 && minor == 0, op, ": needs an sm_90 (Hopper) GPU, got compute capability ", major, ".",
              minor, " on ", q.device(), "; use the sm_80 kernels there");
  TORCH_CHECK(kernels_built_for_sm90a(device), op,
              ": this build of the extension has no sm_90a device code (wgmma/TMA need the arch-specific "
              "target): build with TORCH_CUDA_ARCH_LIST including \"9.0a\"");
}

// A (B, H, S, D) tensor as TMA's (S, D, H, B) view, strides in elements. Dims of size 1 get a stride
// that TMA accepts (any multiple of 16 bytes; the index there is always 0).
struct Bhsd {
  int64_t stride_s, stride_h, stride_b;
};

Bhsd tma_strides(const char* op, const char* name, const at::Tensor& t) {
  const int64_t esize = t.element_size();
  const int64_t D = t.size(3);
  Bhsd s{t.stride(2), t.stride(1), t.stride(0)};
  if (t.size(2) == 1) s.stride_s = D;
  if (t.size(1) == 1) s.stride_h = s.stride_s * t.size(2);
  if (t.size(0) == 1) s.stride_b = s.stride_h * t.size(1);
  const auto ok = [&](int64_t stride) {
    return stride > 0 && (stride * esize) % 16 == 0 && stride * esize < (int64_t{1} << 40);
  };
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && ok(s.stride_s) && ok(s.stride_h) &&
                  ok(s.stride_b),
              op, ": ", name,
              " must have a 16-byte aligned data pointer and positive strides that are multiples of 16 bytes "
              "(TMA), got strides ",
              t.strides(), " at address ", t.data_ptr(), " (use another attention kernel for this layout)");
  return s;
}

template <class Traits>
typename Traits::GmemTensor tma_view(const at::Tensor& t, const Bhsd& s) {
  using Element = typename Traits::Element;
  return make_tensor(
      make_gmem_ptr(static_cast<Element const*>(t.data_ptr())),
      make_shape(static_cast<int>(t.size(2)), static_cast<int>(t.size(3)), static_cast<int>(t.size(1)),
                 static_cast<int>(t.size(0))),
      make_stride(s.stride_s, _1{}, s.stride_h, s.stride_b));
}

// The TMA copy `make()` returns for tensor `name`, from the cache of copies of its kind (its C++ type)
// when the same tensor layout was seen before (csrc/tma_descriptors.h). A descriptor the driver
// refused to encode is an error that names the tensor, never a launch.
template <class Tma, class Make>
Tma cached_tma(const char* op, const char* name, const at::Tensor& t, const Bhsd& s, Make&& make) {
  static TmaCache<Tma> cache;  // one per kind of copy: each template instance has its own
  const TmaKey key{t.data_ptr(), t.get_device(), static_cast<int>(t.scalar_type()),
                   {t.size(0), t.size(1), t.size(2), t.size(3)}, {s.stride_b, s.stride_h, s.stride_s, 1}};
  bool built = false;
  Tma tma = cache.get(key, std::forward<Make>(make), built);
  TORCH_CHECK(built, op, ": the driver could not encode the TMA descriptor of ", name, " (shape ", t.sizes(),
              ", strides ", t.strides(), ", address ", t.data_ptr(),
              "; the arguments it refused are printed above); use another attention kernel for this layout");
  return tma;
}

// The TMA load of tensor `t` (checked by tma_strides) into tiles of `box` rows x D with the shared
// memory layout `smem` of one stage, cached.
template <class Traits, class SmemLayout, class Box>
auto tma_load(const char* op, const char* name, const at::Tensor& t, SmemLayout smem, Box box) {
  const Bhsd s = tma_strides(op, name, t);
  using Tma = decltype(make_tma_copy(SM90_TMA_LOAD{}, std::declval<typename Traits::GmemTensor>(), smem, box, _1{}));
  return cached_tma<Tma>(op, name, t, s, [&] { return make_tma_copy(SM90_TMA_LOAD{}, tma_view<Traits>(t, s), smem, box, _1{}); });
}

struct AttentionArgs {
  int B, H, S, D;  // varlen: N sequences, H, max_seqlen, D
  const void* prefix;
  int64_t prefix_stride;
  bool prefix_is_64;
  const int* cu_seqlens = nullptr;  // varlen only: (N + 1,) row offsets
  int total_rows = 0;               // rows of the TMA view: S, or T when varlen
};

// A (T, H, D) tensor of packed sequences as the (1, H, T, D) batch the kernels read (a view).
at::Tensor as_one_batch(const at::Tensor& t) { return t.transpose(0, 1).unsqueeze(0); }

// The per-sample prefix (n,) int32 or int64 on q's device, or none (plain causal).
void set_prefix(const char* op, AttentionArgs& a, const std::optional<at::Tensor>& prefix_len, int64_t n,
                const char* n_name, const at::Tensor& q) {
  if (!prefix_len.has_value()) return;
  const at::Tensor& pl = *prefix_len;
  check_same_device(op, "prefix_len", pl, q);
  TORCH_CHECK(pl.scalar_type() == at::kInt || pl.scalar_type() == at::kLong, op,
              ": prefix_len must be int32 or int64, got ", pl.scalar_type());
  TORCH_CHECK(pl.dim() == 1 && pl.size(0) == n, op, ": prefix_len must have shape (", n_name, ",) = (", n,
              ",), got ", pl.sizes());
  a.prefix = pl.data_ptr();
  a.prefix_stride = pl.stride(0);
  a.prefix_is_64 = pl.scalar_type() == at::kLong;
}

AttentionArgs check_attention_inputs(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const std::optional<at::Tensor>& prefix_len) {
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"q", q}, {"k", k}, {"v", v}}) {
    TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
    TORCH_CHECK(t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf, op, ": ", name,
                " must be bfloat16 or float16, got ", t.scalar_type());
    TORCH_CHECK(t.dim() == 4, op, ": ", name, " must have shape (B, H, S, D), got ", t.sizes());
    TORCH_CHECK(t.size(3) <= 1 || t.stride(3) == 1, op, ": ", name, " must have a contiguous last dim, got strides ",
                t.strides());
  }
  check_same_device(op, "k", k, q);
  check_same_device(op, "v", v, q);
  check_shape(op, "k", k, q.sizes());
  check_shape(op, "v", v, q.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": q, k and v must have the same dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type());
  AttentionArgs a{};
  a.B = static_cast<int>(q.size(0));
  a.H = static_cast<int>(q.size(1));
  a.S = static_cast<int>(q.size(2));
  a.total_rows = a.S;
  a.D = static_cast<int>(q.size(3));
  TORCH_CHECK(a.D == 64 || a.D == 128, op, ": head dim must be 64 or 128, got ", q.size(3));
  TORCH_CHECK(q.size(0) <= 65535 && q.size(1) <= 65535, op, ": B and H must be at most 65535, got ", q.sizes());
  TORCH_CHECK(q.size(2) < (int64_t{1} << 30), op, ": S must be below 2^30, got ", q.size(2));
  set_prefix(op, a, prefix_len, q.size(0), "B", q);
  return a;
}

// q, k, v of packed sequences (T, H, D), checked, and the launch arguments: N = cu_seqlens.size(0) - 1
// samples of at most max_seqlen rows. The kernels read the tensors as one (1, H, T, D) batch.
AttentionArgs check_varlen_inputs(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& cu_seqlens, int64_t max_seqlen,
                                  const std::optional<at::Tensor>& prefix_len) {
  TORCH_CHECK(q.dim() == 3, op, ": q must have shape (T, H, D), got ", q.sizes());
  check_shape(op, "k", k, q.sizes());
  check_shape(op, "v", v, q.sizes());
  AttentionArgs a = check_attention_inputs(op, as_one_batch(q), as_one_batch(k), as_one_batch(v), std::nullopt);
  TORCH_CHECK(cu_seqlens.is_cuda(), op, ": cu_seqlens must be a CUDA tensor, got one on ", cu_seqlens.device());
  check_same_device(op, "cu_seqlens", cu_seqlens, q);
  TORCH_CHECK(cu_seqlens.scalar_type() == at::kInt, op, ": cu_seqlens must be int32, got ", cu_seqlens.scalar_type());
  TORCH_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.size(0) >= 1 && cu_seqlens.stride(0) == 1, op,
              ": cu_seqlens must be a contiguous (N + 1,) tensor, got sizes ", cu_seqlens.sizes(), " strides ",
              cu_seqlens.strides());
  const int64_t n = cu_seqlens.size(0) - 1;
  TORCH_CHECK(n <= 65535, op, ": at most 65535 sequences per call, got ", n);
  TORCH_CHECK(max_seqlen >= 0 && max_seqlen < (int64_t{1} << 30), op, ": max_seqlen must be in [0, 2^30), got ",
              max_seqlen);
  a.B = static_cast<int>(n);
  a.S = static_cast<int>(max_seqlen);
  a.total_rows = static_cast<int>(q.size(0));
  a.cu_seqlens = cu_seqlens.data_ptr<int>();
  set_prefix(op, a, prefix_len, n, "N", q);
  return a;
}

template <class Traits>
void launch_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const AttentionArgs& a, bool causal,
                double scale, at::Tensor& out, at::Tensor& lse, cudaStream_t stream) {
  using Element = typename Traits::Element;
  const char* op = "cuda_attention_fwd_sm90";
  using BM = Int<Traits::kBlockM>;
  using BN = Int<Traits::kBlockN>;
  using D = Int<Traits::kHeadDim>;
  const auto kv_stage = take<0, 2>(typename Traits::SmemLayoutK{});
  typename Traits::Params p{
      tma_load<Traits>(op, "q", q, typename Traits::SmemLayoutQ{}, Shape<BM, D>{}),
      tma_load<Traits>(op, "k", k, kv_stage, Shape<BN, D>{}),
      tma_load<Traits>(op, "v", v, kv_stage, Shape<BN, D>{}),
      static_cast<Element*>(out.data_ptr()),
      lse.data_ptr<float>(),
      a.prefix,
      a.prefix_stride,
      a.prefix_is_64,
      causal,
      a.S,
      a.H,
      a.B,
      static_cast<float>(scale * kLog2e),
      a.cu_seqlens,
      a.total_rows,
  };
  auto kernel = attention_fwd_sm90_kernel<Traits>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Traits::kSmemBytes));
  const dim3 grid((a.S + Traits::kBlockM - 1) / Traits::kBlockM, a.H, a.B);
  kernel<<<grid, Traits::kThreads, Traits::kSmemBytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// A gradient buffer written with 16-byte stores: like q, unit last stride, rows on 16-byte boundaries.
GradOut grad_out(const char* op, const char* name, const at::Tensor& t, const at::Tensor& q) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
  check_same_device(op, name, t, q);
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), op, ": ", name, " must have q's dtype ", q.scalar_type(), ", got ",
              t.scalar_type());
  check_shape(op, name, t, q.sizes());
  TORCH_CHECK(t.stride(3) == 1, op, ": ", name, " must have a contiguous last dim, got strides ", t.strides());
  bool aligned = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int d = 0; d < 3; ++d) aligned = aligned && (t.size(d) == 1 || (t.stride(d) * t.element_size()) % 16 == 0);
  TORCH_CHECK(aligned, op, ": ", name, " must have rows on 16-byte boundaries (strides that are multiples of 16 bytes), got strides ",
              t.strides());
  return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)};
}

// The backward's dout and out (B, H, S, D) like q, rows on 16-byte boundaries; lse (B, H, S) float32.
void check_bwd_inputs(const char* op, const at::Tensor& dout, const at::Tensor& out, const at::Tensor& lse,
                      const at::Tensor& q) {
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"dout", dout}, {"out", out}}) {
    TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
    check_same_device(op, name, t, q);
    TORCH_CHECK(t.scalar_type() == q.scalar_type(), op, ": ", name, " must have q's dtype ", q.scalar_type(),
                ", got ", t.scalar_type());
    check_shape(op, name, t, q.sizes());
    TORCH_CHECK(t.stride(3) == 1, op, ": ", name, " must have a contiguous last dim, got strides ", t.strides());
  }
  TORCH_CHECK(reinterpret_cast<uintptr_t>(out.data_ptr()) % 16 == 0 &&
                  (out.size(2) == 1 || (out.stride(2) * out.element_size()) % 16 == 0) &&
                  (out.size(1) == 1 || (out.stride(1) * out.element_size()) % 16 == 0) &&
                  (out.size(0) == 1 || (out.stride(0) * out.element_size()) % 16 == 0),
              op, ": out must have rows on 16-byte boundaries, got strides ", out.strides());
  TORCH_CHECK(lse.is_cuda() && lse.scalar_type() == at::kFloat, op, ": lse must be a float32 CUDA tensor, got ",
              lse.scalar_type(), " on ", lse.device());
  check_same_device(op, "lse", lse, q);
  check_shape(op, "lse", lse, q.sizes().slice(0, 3));
}

template <class Element, int kHeadDim>
void launch_bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                const at::Tensor& out, const at::Tensor& lse, const AttentionArgs& a, bool causal, double scale,
                const GradOut& dq, const GradOut& dk, const GradOut& dv, bool deterministic, cudaStream_t stream) {
  const char* op = "cuda_attention_bwd_sm90";
  using DqT = BwdDqTraits<Element, kHeadDim>;
  using D = Int<kHeadDim>;

  // Row statistics, padded per (sample, head) to whole 128-row tiles; the 5-GEMM design's float32 dQ
  // accumulator, laid out like lse with D values per row ((B, H, S, D), varlen (H, T, D)), zeroed by
  // the same launch.
  const int s_pad = (a.S + 127) / 128 * 128;
  at::Tensor lse2 = at::empty({static_cast<int64_t>(a.B) * a.H * s_pad}, q.options().dtype(at::kFloat));
  at::Tensor delta = at::empty_like(lse2);
  const int64_t tma_batches = a.cu_seqlens == nullptr ? a.B : 1;
  at::Tensor dq_accum;
  if (!deterministic) {
    dq_accum = at::empty({tma_batches * a.H * a.total_rows * kHeadDim}, q.options().dtype(at::kFloat));
  }
  float* dq_accum_ptr = deterministic ? nullptr : dq_accum.data_ptr<float>();
  poison_outputs({lse2, delta, dq_accum});
  {
    constexpr int kRowsPerBlock = 8;
    const dim3 grid(s_pad / kRowsPerBlock, a.H, a.B);
    hopper_attention::attention_bwd_rowstats_kernel<Element, kHeadDim><<<grid, kRowsPerBlock * kWarp, 0, stream>>>(
        static_cast<const Element*>(out.data_ptr()), out.stride(0), out.stride(1), out.stride(2),
        static_cast<const Element*>(dout.data_ptr()), dout.stride(0), dout.stride(1), dout.stride(2),
        lse.data_ptr<float>(), lse.stride(0), lse.stride(1), lse.stride(2), lse2.data_ptr<float>(),
        delta.data_ptr<float>(), a.S, s_pad, a.H, a.cu_seqlens, dq_accum_ptr, a.total_rows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const float scale_log2 = static_cast<float>(scale * kLog2e);
  if (deterministic) {
    using BM = Int<DqT::kBlockM>;
    using BN = Int<DqT::kBlockN>;
    const auto kv_stage = take<0, 2>(typename DqT::SmemLayoutK{});
    typename DqT::Params p{
        tma_load<DqT>(op, "q", q, typename DqT::SmemLayoutQ{}, Shape<BM, D>{}),
        tma_load<DqT>(op, "dout", dout, typename DqT::SmemLayoutQ{}, Shape<BM, D>{}),
        tma_load<DqT>(op, "k", k, kv_stage, Shape<BN, D>{}),
        tma_load<DqT>(op, "v", v, kv_stage, Shape<BN, D>{}),
        dq,
        lse2.data_ptr<float>(),
        delta.data_ptr<float>(),
        s_pad,
        a.prefix,
        a.prefix_stride,
        a.prefix_is_64,
        causal,
        a.S,
        a.H,
        a.B,
        scale_log2,
        static_cast<float>(scale),
        a.cu_seqlens,
        a.total_rows,
    };
    auto kernel = attention_bwd_dq_sm90_kernel<DqT>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, DqT::kSmemBytes));
    const dim3 grid((a.S + DqT::kBlockM - 1) / DqT::kBlockM, a.H, a.B);
    kernel<<<grid, DqT::kThreads, DqT::kSmemBytes, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  // dK and dV, and in the 5-GEMM design dQ's sum in dq_accum (kAtomic: std::bool_constant).
  const auto launch_dkdv = [&](auto kAtomic) {
    using DkvT = BwdDkvTraits<Element, kHeadDim, decltype(kAtomic)::value>;
    using BM = Int<DkvT::kBlockM>;
    using BN = Int<DkvT::kBlockN>;
    const auto q_stage = take<0, 2>(typename DkvT::SmemLayoutQ{});
    typename DkvT::Params p{
        tma_load<DkvT>(op, "k", k, typename DkvT::SmemLayoutKV{}, Shape<BN, D>{}),
        tma_load<DkvT>(op, "v", v, typename DkvT::SmemLayoutKV{}, Shape<BN, D>{}),
        tma_load<DkvT>(op, "q", q, q_stage, Shape<BM, D>{}),
        tma_load<DkvT>(op, "dout", dout, q_stage, Shape<BM, D>{}),
        dk,
        dv,
        lse2.data_ptr<float>(),
        delta.data_ptr<float>(),
        s_pad,
        a.prefix,
        a.prefix_stride,
        a.prefix_is_64,
        causal,
        a.S,
        a.H,
        a.B,
        scale_log2,
        static_cast<float>(scale),
        a.cu_seqlens,
        a.total_rows,
        dq_accum_ptr,
    };
    auto kernel = attention_bwd_dkdv_sm90_kernel<DkvT>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, DkvT::kSmemBytes));
    const dim3 grid((a.S + DkvT::kBlockN - 1) / DkvT::kBlockN, a.H, a.B);
    kernel<<<grid, DkvT::kThreads, DkvT::kSmemBytes, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (deterministic) {
    launch_dkdv(std::false_type{});
    return;
  }
  launch_dkdv(std::true_type{});
  {
    constexpr int kThreads = 256;
    constexpr int kRowsPerBlock = kThreads / (kHeadDim / 8);
    const dim3 grid((a.S + kRowsPerBlock - 1) / kRowsPerBlock, a.H, a.B);
    hopper_attention::attention_bwd_dq_convert_kernel<Element, kHeadDim><<<grid, kThreads, 0, stream>>>(
        dq_accum_ptr, static_cast<Element*>(dq.data), dq.sb, dq.sh, dq.ss, static_cast<float>(scale), a.S, a.H,
        a.total_rows, a.cu_seqlens);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// Runs Launch<Traits<Element, D>>::run(args...) for the dtype of q and head dim D (64 or 128).
template <template <class, int> class Traits, template <class> class Launch, class... Args>
void dispatch_sm90(const at::Tensor& q, int D, Args&&... args) {
  if (q.scalar_type() == at::kBFloat16) {
    if (D == 64) {
      Launch<Traits<cutlass::bfloat16_t, 64>>::run(args...);
    } else {
      Launch<Traits<cutlass::bfloat16_t, 128>>::run(args...);
    }
  } else {
    if (D == 64) {
      Launch<Traits<cutlass::half_t, 64>>::run(args...);
    } else {
      Launch<Traits<cutlass::half_t, 128>>::run(args...);
    }
  }
}

template <class Traits>
struct FwdLaunch {
  static void run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const AttentionArgs& a,
                  bool causal, double scale, at::Tensor& out, at::Tensor& lse, cudaStream_t stream) {
    launch_fwd<Traits>(q, k, v, a, causal, scale, out, lse, stream);
  }
};

template <class Traits>
struct BwdLaunch {
  template <class... Args>
  static void run(Args&&... args) {
    launch_bwd<typename Traits::Element, Traits::kHeadDim>(args...);
  }
};

}  // namespace sm90

std::tuple<at::Tensor, at::Tensor> attention_fwd_sm90(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      const std::optional<at::Tensor>& prefix_len, bool causal,
                                                      double scale) {
  const char* op = "cuda_attention_fwd_sm90";
  const sm90::AttentionArgs a = sm90::check_attention_inputs(op, q, k, v, prefix_len);
  const c10::cuda::CUDAGuard guard(q.device());
  // (B, S, H, D) memory seen as (B, H, S, D); lse (B, H, S) float32.
  at::Tensor out = at::empty({a.B, a.S, a.H, a.D}, q.options()).transpose(1, 2);
  at::Tensor lse = at::empty({a.B, a.H, a.S}, q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {out, lse};
  sm90::check_sm90_device(op, q);
  poison_outputs({out, lse});
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  sm90::dispatch_sm90<sm90::FwdTraits, sm90::FwdLaunch>(q, a.D, q, k, v, a, causal, scale, out, lse, stream);
  return {out, lse};
}

void attention_bwd_sm90(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& prefix_len,
                        bool causal, double scale, const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv,
                        bool deterministic) {
  const char* op = "cuda_attention_bwd_sm90";
  const sm90::AttentionArgs a = sm90::check_attention_inputs(op, q, k, v, prefix_len);
  const sm90::GradOut gdq = sm90::grad_out(op, "dq", dq, q);
  const sm90::GradOut gdk = sm90::grad_out(op, "dk", dk, q);
  const sm90::GradOut gdv = sm90::grad_out(op, "dv", dv, q);
  sm90::check_bwd_inputs(op, dout, out, lse, q);
  if (q.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(q.device());
  sm90::check_sm90_device(op, q);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  sm90::dispatch_sm90<sm90::FwdTraits, sm90::BwdLaunch>(q, a.D, dout, q, k, v, out, lse, a, causal, scale, gdq, gdk,
                                                         gdv, deterministic, stream);
}

std::tuple<at::Tensor, at::Tensor> attention_varlen_fwd_sm90(const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v, const at::Tensor& cu_seqlens,
                                                             int64_t max_seqlen,
                                                             const std::optional<at::Tensor>& prefix_len, bool causal,
                                                             double scale) {
  const char* op = "cuda_attention_varlen_fwd_sm90";
  const sm90::AttentionArgs a = sm90::check_varlen_inputs(op, q, k, v, cu_seqlens, max_seqlen, prefix_len);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty({q.size(0), a.H, a.D}, q.options());          // (T, H, D)
  at::Tensor lse = at::empty({a.H, q.size(0)}, q.options().dtype(at::kFloat));  // (H, T)
  if (q.numel() == 0 || a.B == 0 || a.S == 0) return {out, lse};
  sm90::check_sm90_device(op, q);
  poison_outputs({out, lse});
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  sm90::dispatch_sm90<sm90::FwdTraits, sm90::FwdLaunch>(q, a.D, sm90::as_one_batch(q), sm90::as_one_batch(k),
                                                        sm90::as_one_batch(v), a, causal, scale, out, lse, stream);
  return {out, lse};
}

void attention_varlen_bwd_sm90(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_seqlens,
                               int64_t max_seqlen, const std::optional<at::Tensor>& prefix_len, bool causal,
                               double scale, const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv,
                               bool deterministic) {
  const char* op = "cuda_attention_varlen_bwd_sm90";
  const sm90::AttentionArgs a = sm90::check_varlen_inputs(op, q, k, v, cu_seqlens, max_seqlen, prefix_len);
  // Everything below in the (1, H, T, D) batch view; lse (H, T) as (1, H, T).
  const at::Tensor q1 = sm90::as_one_batch(q);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"dq", dq}, {"dk", dk}, {"dv", dv},
                                {"dout", dout}, {"out", out}}) {
    check_shape(op, name, t, q.sizes());
  }
  TORCH_CHECK(lse.dim() == 2, op, ": lse must have shape (H, T) = (", a.H, ", ", q.size(0), "), got ", lse.sizes());
  const sm90::GradOut gdq = sm90::grad_out(op, "dq", sm90::as_one_batch(dq), q1);
  const sm90::GradOut gdk = sm90::grad_out(op, "dk", sm90::as_one_batch(dk), q1);
  const sm90::GradOut gdv = sm90::grad_out(op, "dv", sm90::as_one_batch(dv), q1);
  const at::Tensor dout1 = sm90::as_one_batch(dout), out1 = sm90::as_one_batch(out), lse1 = lse.unsqueeze(0);
  sm90::check_bwd_inputs(op, dout1, out1, lse1, q1);
  if (q.numel() == 0 || a.B == 0 || a.S == 0) return;
  const c10::cuda::CUDAGuard guard(q.device());
  sm90::check_sm90_device(op, q);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  sm90::dispatch_sm90<sm90::FwdTraits, sm90::BwdLaunch>(q, a.D, dout1, q1, sm90::as_one_batch(k),
                                                         sm90::as_one_batch(v), out1, lse1, a, causal, scale, gdq,
                                                         gdk, gdv, deterministic, stream);
}

}  // namespace aimv2
