// Prefix-causal flash attention for sm_80 (A100; the same code runs on sm_86/89 and on Hopper):
// forward and a deterministic backward, written with CuTe on Ampere's tensor-core instructions.
//
// Key j is visible to query i of sample b iff (not causal) or j <= i or j < prefix_len[b]. As in the
// Triton kernels (aimv2_kernels/triton_backend/attention.py) everything reduces to one number per
// sample, the visible prefix P in [0, S] (non-causal: P = S; plain causal: P = 0), and the S x S mask
// is never built: each (query tile, key tile) pair is classified as
//   skipped   no visible pair: never loaded, never computed;
//   unmasked  every pair visible (and the tile inside S): no mask arithmetic;
//   boundary  the mask (j <= i) | (j < P) is applied to the tile's scores.
// Query tile [m0, m0 + BM): key tiles below full_end = floor(min(max(m0 + 1, P), S) / BN) * BN are
// unmasked, tiles up to hi = max(min(m0 + BM, S), P) are boundary, the rest skipped. Key tile
// [n0, n1): query tiles from lo (0 if n0 < P, else n0 rounded down to BM) to full_start (the first
// tile whose queries are all >= n1 - 1, or 0 if n1 <= P) are boundary, later ones unmasked, earlier
// ones skipped.
//
// Instructions: mma.sync m16n8k16 with fp32 accumulation (SM80_16x8x16_F32BF16BF16F32_TN or the F16
// atom), cp.async.cg 16-byte global->shared copies (SM80_CP_ASYNC_CACHEGLOBAL; 4-byte cp.async.ca
// with zero-fill for the backward's per-row statistics), ldmatrix (SM75_U32x4_LDSM_N) and
// ldmatrix.trans (SM75_U16x8_LDSM_T) shared->register copies. Shared tiles are rows of 64 elements
// (128 bytes) whose 16-byte chunks are XOR-swizzled by the row (Swizzle<3,3,3>), so that the 8 rows of
// an ldmatrix 8x8 matrix and the 8 chunks of a row hit different banks.
//
// Kernels (all kernel names contain "attention"; the three with tensor-core math also "sm80"):
//
//   attention_fwd_sm80_kernel    one CTA per (query tile, batch * head), last tiles (most keys) first.
//     BM = 128 queries, 4 warps (each owns two 16-row slices: rows w*16 + 64*i); BN = 32 keys at
//     D = 128, 64 at D = 64. The Q tile stays in shared memory (read by ldmatrix each key tile); K is
//     double buffered, V single: at the top of key tile j (after K_j has landed) the CTA issues V_j
//     and K_{j+1}, computes S = Q K_j^T while they fly, the online softmax (fp32, base 2 with the
//     scale folded in, running max per row), waits for V_j only, and accumulates O += P V_j with P
//     taken straight from the score accumulators (no shared-memory round trip). The row sums l are
//     accumulated on the tensor cores as P times a block of ones (add_row_sums), rescaled with O.
//     Epilogue: O / l through shared memory to 16-byte stores of the (B, S, H, D) output;
//     lse = m * scale + ln(l).
//     Shared memory: Q + 2 K + V = (BM + 3 BN) * D * 2 bytes = 56 KiB at D = 128, 40 KiB at D = 64
//     (two CTAs per SM by registers). Registers per thread: O 128 (D = 128) / 64 (D = 64) fp32, S 32
//     / 64, P * ones 8. 128 x 64 tiles at D = 128 (and 128 x 128 at D = 64) spill; so does keeping
//     the epilogue's and the mask's thread coordinates through the loop, which is why those are
//     derived anew from %tid / %ctaid where they are needed (fresh_thread_index).
//
//   attention_bwd_dkdv_sm80_kernel   one CTA per (key tile, batch * head), 8 warps (4 along keys x 2),
//     BN = 64 keys resident in shared memory (K, V), looping over BM = 64-query tiles that can see
//     them (boundary tiles first, then unmasked ones). Q, dO and the tile's lse and delta are double
//     buffered: tile i + 1 is issued at the top of tile i. Per tile, in key-major orientation so the
//     accumulators need no transpose: S^T = K Q^T and dP^T = V dO^T (fp32), P^T = exp2(S^T * scale *
//     log2 e - lse * log2 e) (masked on boundary tiles), dS^T = P^T * (dP^T - delta); P^T and dS^T go
//     to shared memory (16-bit) and dV += P^T dO, dK += dS^T Q read them back with ldmatrix and dO, Q
//     through ldmatrix.trans. dK is scaled by the softmax scale at the end; both are written once,
//     through shared memory (K's and V's space).
//     Shared memory: K, V (BN x D), 2 x (Q, dO) (BM x D), P^T, dS^T (BN x BM), 2 x (lse, delta) (BM
//     fp32): 113 KiB at D = 128, 65 KiB at D = 64. Cards whose per-block opt-in limit is below that
//     (sm_86/sm_89: 99 KiB) get the single-buffered variant at D = 128 (81 KiB), whose loads do not
//     overlap the math. Accumulators per thread: dK, dV 32 + 32 (D = 128), S^T, dP^T 16 + 16.
//
//   attention_bwd_dq_sm80_kernel   one CTA per (query tile, batch * head), BM = 64 queries, 4 warps
//     (16 rows each), BN = 64 keys; the key loop of the forward (the same classification and K double
//     buffering, V single): S = Q K^T, P = exp2(S * scale * log2 e - lse * log2 e), dP = dO V^T,
//     dS = P * (dP - delta), dQ += dS K with dS straight from the accumulators and K through
//     ldmatrix.trans; dQ scaled at the end. Shared memory: Q, dO (BM x D), 2 K, V (BN x D): 80 KiB at
//     D = 128, 40 KiB at D = 64. Accumulators per thread: dQ 64 (D = 128), S and dP 32 + 32. The
//     Q tile of 64 rows (one m16 atom per warp) reads K and V fragments twice as often per product
//     as the forward's, but dQ is the smaller half of the backward.
//
//   attention_bwd_preprocess_kernel   delta = rowsum(dO * O) in fp32, D / 8 threads per row with
//     16-byte loads. (No "sm80" in its name: it has no matrix math to check for.)
//
// No floating-point atomics anywhere: dK/dV and dQ are separate kernels (dQ recomputes P and dP), so
// results are bitwise run-to-run deterministic. Rows past S are never read (zero-filled in shared
// memory; identity-tensor predication) and never written; zero rows of Q and dO give zero
// contributions, and padded keys are hidden from every real query by the mask.
//
// Varlen mode (params.cu_seqlens set; ops cuda_attention_varlen_{fwd,bwd}_sm80): packed sequences
// (T, H, D), one launch of each kernel for all N sequences over the tiles of the longest one. Each
// block reads its sequence's start and length from cu_seqlens (sample_rows), leaves at once when its
// tile starts at or past the length, and otherwise runs the code above with S = the length and base
// addresses moved to the sequence's first token: rows past the sequence's end, which belong to the
// next sequence, are never read or written, exactly as rows past S. lse and delta are (H, T).
#include "attention.h"
#include "common.cuh"
#include "ops.h"

#include <cute/tensor.hpp>
#include <cutlass/array.h>
#include <cutlass/numeric_conversion.h>
#include <cutlass/numeric_types.h>

#include <climits>
#include <cmath>
#include <cstdlib>
#include <limits>

namespace aimv2 {
namespace ampere_attention {

using namespace cute;

constexpr float kLog2e = 1.4426950408889634f;

template <typename Element>
struct MmaOpFor;
template <>
struct MmaOpFor<cutlass::bfloat16_t> {
  using type = SM80_16x8x16_F32BF16BF16F32_TN;
};
template <>
struct MmaOpFor<cutlass::half_t> {
  using type = SM80_16x8x16_F32F16F16F32_TN;
};
template <typename Element>
using MmaAtom = MMA_Atom<typename MmaOpFor<Element>::type>;

// 8 rows x 64 columns of 16-bit elements (128-byte rows), 16-byte chunks XOR-swizzled by the row.
using SmemAtom = decltype(composition(Swizzle<3, 3, 3>{}, Layout<Shape<_8, _64>, Stride<_64, _1>>{}));

// A (rows, cols) tile of shared memory, cols a multiple of 64.
template <int kRows, int kCols>
using SmemTile = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kRows>, Int<kCols>>{}));

// The (cols, rows) transposed view of SmemTile<kRows, kCols> (the B operand of a product over rows,
// read with ldmatrix.trans).
template <int kRows, int kCols>
using SmemTileT =
    decltype(composition(SmemTile<kRows, kCols>{}, make_layout(Shape<Int<kCols>, Int<kRows>>{}, GenRowMajor{})));

// Global <-> shared copies of (rows, D) tiles: 8 threads per 64-element row slice, 16 bytes each.
template <typename Element, int kThreads>
using GmemLoad = decltype(make_tiled_copy(Copy_Atom<SM80_CP_ASYNC_CACHEGLOBAL<cute::uint128_t>, Element>{},
                                          Layout<Shape<Int<kThreads / 8>, _8>, Stride<_8, _1>>{},
                                          Layout<Shape<_1, _8>>{}));
template <typename Element, int kThreads>
using GmemStore = decltype(make_tiled_copy(Copy_Atom<UniversalCopy<cute::uint128_t>, Element>{},
                                           Layout<Shape<Int<kThreads / 8>, _8>, Stride<_8, _1>>{},
                                           Layout<Shape<_1, _8>>{}));

using LdsmN = SM75_U32x4_LDSM_N;
using LdsmT = SM75_U16x8_LDSM_T;
// Accumulator fragment -> shared memory: the two adjacent columns a thread holds, as one 32-bit store.
using StoreC = UniversalCopy<uint32_t>;

// ---- device helpers ------------------------------------------------------------------------------

// Where sample b's rows are. `batch` is the batch index that HeadRows and stats_offset take: b when
// padded; in varlen mode the sequence's first token (its operands' batch strides are their row
// strides, the statistics' batch stride is 1). `seqlen` is the sample's S: the sequence's length when
// varlen, so every bound below stops at its end and no key of the next sequence is ever read.
struct SampleRows {
  int batch, seqlen;
};
__device__ __forceinline__ SampleRows sample_rows(const AttentionSm80Params& p, int b) {
  if (p.cu_seqlens == nullptr) return SampleRows{b, p.seqlen};
  const int start = p.cu_seqlens[b];
  return SampleRows{start, p.cu_seqlens[b + 1] - start};
}

// Where the lse / delta rows of (batch index, head h) start.
__device__ __forceinline__ int64_t stats_offset(const AttentionSm80Params& p, int batch, int h) {
  return batch * p.stats_batch_stride + h * p.stats_head_stride;
}

// P in [0, S] for sample b of S rows: keys below it are visible to every query.
__device__ __forceinline__ int visible_prefix(const AttentionSm80Params& p, int b, int seqlen) {
  if (!p.causal) return seqlen;
  if (p.prefix == nullptr) return 0;
  const int64_t v = p.prefix_int64 ? static_cast<const int64_t*>(p.prefix)[b]
                                   : static_cast<int64_t>(static_cast<const int32_t*>(p.prefix)[b]);
  return static_cast<int>(v < 0 ? 0 : (v > seqlen ? seqlen : v));
}

// One head's rows of operand t (batch index from sample_rows): a 64-bit base and a 32-bit row stride
// (the host entries make sure that 256 rows of it span less than 2^31 elements), so that tile
// addresses need one 64-bit add per tile and 32-bit arithmetic per row (64-bit row offsets cost
// registers the forward does not have).
template <typename Element, int kHeadDim>
struct HeadRows {
  Element* base;
  int stride;
  __device__ __forceinline__ HeadRows(const AttentionSm80Operand& t, int batch, int h)
      : base(static_cast<Element*>(t.data) + batch * t.batch_stride + h * t.head_stride),
        stride(static_cast<int>(t.row_stride)) {}
  // The (kRows, D) tile of rows [row0, row0 + kRows) (rows past S are addressed, never accessed).
  template <int kRows>
  __device__ __forceinline__ auto tile(int row0) const {
    return make_tensor(make_gmem_ptr(base + static_cast<int64_t>(row0) * stride),
                       Shape<Int<kRows>, Int<kHeadDim>>{}, make_stride(stride, _1{}));
  }
};

// The same tensor view with its data pointer moved by `offset` elements (the other stage of a
// double-buffered shared tile: offsets are multiples of 4096 elements, above the 9 swizzled bits).
template <class T>
__device__ __forceinline__ auto shifted(T const& t, int offset) {
  return make_tensor(t.data() + offset, t.layout());
}

// Global -> shared copy of one tile partitioned by a GmemLoad (CPY, CPY_ROWS, CPY_COLS); with
// kCheckRows, rows at or past `rows_left` (tile coordinates from the identity partition `coord`) are
// zero-filled instead of read.
template <bool kCheckRows, class TiledCopy, class Src, class Dst, class Coord>
__device__ __forceinline__ void load_tile(TiledCopy const& tiled_copy, Src const& src, Dst&& dst, Coord const& coord,
                                          int rows_left) {
  CUTE_UNROLL
  for (int m = 0; m < size<1>(src); ++m) {
    if (!kCheckRows || get<0>(coord(0, m, 0)) < rows_left) {
      CUTE_UNROLL
      for (int k = 0; k < size<2>(src); ++k) copy(tiled_copy, src(_, m, k), dst(_, m, k));
    } else {
      clear(dst(_, m, _));
    }
  }
}

// load_tile choosing the bounds check at run time: only tiles reaching past S need it.
template <class TiledCopy, class Src, class Dst, class Coord>
__device__ __forceinline__ void load_rows(TiledCopy const& tiled_copy, Src const& src, Dst&& dst, Coord const& coord,
                                          int rows_left, int tile_rows) {
  if (rows_left >= tile_rows) {
    load_tile<false>(tiled_copy, src, dst, coord, rows_left);
  } else {
    load_tile<true>(tiled_copy, src, dst, coord, rows_left);
  }
}

// Shared -> global copy of one tile (partitioned by a GmemStore) through registers, rows at or past
// `rows_left` skipped.
template <class TiledCopy, class Src, class Dst, class Coord>
__device__ __forceinline__ void store_tile(TiledCopy const& tiled_copy, Src const& src, Dst&& dst, Coord const& coord,
                                           int rows_left) {
  auto staged = make_fragment_like(src);
  copy(tiled_copy, src, staged);
  CUTE_UNROLL
  for (int m = 0; m < size<1>(src); ++m) {
    if (get<0>(coord(0, m, 0)) < rows_left) {
      CUTE_UNROLL
      for (int k = 0; k < size<2>(src); ++k) copy(tiled_copy, staged(_, m, k), dst(_, m, k));
    }
  }
}

// acc += A B over the K mode, both operands read from shared memory with ldmatrix slice by slice
// (ptxas hoists the loads ahead of the multiplies as far as registers allow).
template <class Mma, class Acc, class FragA, class FragB, class SmemA, class SmemB, class CopyA, class ThrA,
          class CopyB, class ThrB>
__device__ __forceinline__ void gemm_ss(Mma const& mma, Acc& acc, FragA& ra, FragB& rb, SmemA const& sa,
                                        SmemB const& sb, CopyA const& copy_a, ThrA const& thr_a, CopyB const& copy_b,
                                        ThrB const& thr_b) {
  auto ra_view = thr_a.retile_D(ra);
  auto rb_view = thr_b.retile_D(rb);
  CUTE_UNROLL
  for (int k = 0; k < size<2>(ra); ++k) {
    copy(copy_a, sa(_, _, k), ra_view(_, _, k));
    copy(copy_b, sb(_, _, k), rb_view(_, _, k));
    gemm(mma, ra(_, _, k), rb(_, _, k), acc);
  }
}

// acc += A B with A already in registers (a converted accumulator), B from shared memory.
template <class Mma, class Acc, class FragA, class FragB, class SmemB, class CopyB, class ThrB>
__device__ __forceinline__ void gemm_rs(Mma const& mma, Acc& acc, FragA const& ra, FragB& rb, SmemB const& sb,
                                        CopyB const& copy_b, ThrB const& thr_b) {
  auto rb_view = thr_b.retile_D(rb);
  CUTE_UNROLL
  for (int k = 0; k < size<2>(ra); ++k) {
    copy(copy_b, sb(_, _, k), rb_view(_, _, k));
    gemm(mma, ra(_, _, k), rb(_, _, k), acc);
  }
}

// An m16n8 accumulator fragment ((2, 2), MMA_M, MMA_N) -- value (c, r) holds column c and row half r
// of its 16 x 8 atom -- as (rows (2, MMA_M), cols (2, MMA_N)).
template <class Layout>
__device__ __forceinline__ constexpr auto rowcol(Layout const& layout) {
  auto l = logical_divide(layout, Shape<_2>{});
  return make_layout(make_layout(get<0, 1>(l), get<1>(l)), make_layout(get<0, 0>(l), get<2>(l)));
}

// An accumulator fragment of a (M, N) product as the A operand fragment of a product over N: two
// n8 atoms make one k16 slice ((2, 2, 2), MMA_M, MMA_N / 2), register order unchanged.
template <class Layout>
__device__ __forceinline__ constexpr auto acc_as_a(Layout const& layout) {
  auto l = logical_divide(layout, Shape<Underscore, Underscore, _2>{});
  return make_layout(make_layout(get<0>(l), get<2, 0>(l)), get<1>(l), get<2, 1>(l));
}

// The fp32 accumulator `acc` of a (M, N) product, rounded to Element, as a compact A operand fragment
// of a product over N: each (m, k) slice is 8 consecutive elements (the 4 registers mma.sync takes),
// so no register moves are needed between the conversion and the next product.
template <typename Element, class Acc>
__device__ __forceinline__ auto acc_to_a(Acc const& acc) {
  auto view = make_tensor(acc.data(), acc_as_a(acc.layout()));
  auto out = make_tensor<Element>(make_layout(shape(view)));
  cutlass::NumericArrayConverter<Element, float, 2> convert;
  CUTE_UNROLL
  for (int i = 0; i < size(view); i += 2) {  // (i, i + 1): adjacent columns of one row
    cutlass::Array<float, 2> pair;
    pair[0] = view(i);
    pair[1] = view(i + 1);
    *reinterpret_cast<cutlass::Array<Element, 2>*>(&out(i)) = convert(pair);
  }
  return out;
}

// dst (16-bit registers) = src (fp32 registers), round to nearest, two at a time.
template <class Src, class Dst>
__device__ __forceinline__ void convert_fragment(Src const& src, Dst& dst) {
  using To = typename Dst::value_type;
  constexpr int N = decltype(size(src))::value;
  static_assert(N % 2 == 0, "fragments convert in pairs");
  cutlass::NumericArrayConverter<To, float, N> convert;
  *reinterpret_cast<cutlass::Array<To, N>*>(dst.data()) =
      convert(*reinterpret_cast<const cutlass::Array<float, N>*>(src.data()));
}

// acc[m][0..3] += P(m) * ones for every k-slice of the A fragment `p` ((2, 2, 2), MMA_M, MMA_K) of
// 16-bit P: the row sums of P on the tensor cores. Each result column holds the whole row sum (the
// product sums over all of a row's columns, whichever threads hold them): acc[m][0] and [1] for row
// lane / 4 of atom m, [2] and [3] for row lane / 4 + 8. No fp32 copy of P stays live for a sum.
template <typename Element, class FragA, int kM>
__device__ __forceinline__ void add_row_sums(FragA const& p, float (&acc)[kM][4]) {
  using Op = typename MmaOpFor<Element>::type;
  // 1.0 twice per 32-bit register: bf16 0x3f80, fp16 0x3c00.
  constexpr uint32_t kOnes = std::is_same_v<Element, cutlass::bfloat16_t> ? 0x3f803f80u : 0x3c003c00u;
  static_assert(decltype(size<1>(p))::value == kM, "one accumulator per m atom");
  CUTE_UNROLL
  for (int k = 0; k < size<2>(p); ++k) {
    CUTE_UNROLL
    for (int m = 0; m < kM; ++m) {
      const uint32_t* a = reinterpret_cast<const uint32_t*>(&p(0, m, k));
      Op::fma(acc[m][0], acc[m][1], acc[m][2], acc[m][3], a[0], a[1], a[2], a[3], kOnes, kOnes, acc[m][0], acc[m][1],
              acc[m][2], acc[m][3]);
    }
  }
}

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

// threadIdx.x and blockIdx.x read anew: the compiler cannot reuse (or hoist) an opaque read, so values
// an epilogue derives from these are computed after the main loop instead of occupying registers
// through it (the forward at D = 128 has none to spare).
__device__ __forceinline__ int fresh_thread_index() {
  int v;
  asm volatile("mov.u32 %0, %%tid.x;" : "=r"(v));
  return v;
}
__device__ __forceinline__ int fresh_block_index() {
  int v;
  asm volatile("mov.u32 %0, %%ctaid.x;" : "=r"(v));
  return v;
}

// Where block `block` of a 1-D grid over (batch * head, tile) works: tiles of one head are adjacent
// (they share K/V or Q/dO in L2); last_first numbers the tiles from the end (the query tiles that see
// the most keys start first, shortening the tail). In varlen mode `tiles` covers the longest sequence
// (p.seqlen) and blocks whose tile starts past their own sequence's end return at once.
struct BlockCoords {
  int b, h, tile;
};
__device__ __forceinline__ BlockCoords block_coords(int block, int tiles, int heads, bool last_first) {
  const int bh = block / tiles;
  const int t = block % tiles;
  return BlockCoords{bh / heads, bh % heads, last_first ? tiles - 1 - t : t};
}

// Key tiles of BN that query tile [m0, m0 + BM) visits: [0, n_full) unmasked, then boundary tiles up
// to key_end (hi in the file comment; at most S). Keys at or past key_end are hidden from every query
// of the tile, so the key loop loads rows below key_end only (zero-filling the rest of its last tile)
// and needs no S: in varlen mode S is a per-sequence value that would take a register through the
// loop, and the forward at D = 128 has none to spare.
template <int BM, int BN>
struct KeyRange {
  int n_full, key_end;
  __device__ __forceinline__ KeyRange(int m0, int prefix, int seqlen) {
    const int full_end = min(max(m0 + 1, prefix), seqlen) / BN * BN;
    n_full = full_end / BN;
    key_end = max(min(m0 + BM, seqlen), prefix);
  }
};

// ---- forward ---------------------------------------------------------------------------------------

template <typename Element, int kHeadDim>
struct FwdTile {
  static constexpr int kBlockM = 128;
  // 128 x 64 tiles at D = 128 spill on sm_80: the O accumulator (128 fp32 per thread) plus S (64)
  // plus the operand fragments ptxas loads ahead exceed 255 registers. 128 x 32 fits, and still reads
  // Q, K, V from shared memory at 3/4 of the tensor-core time per tile (4 warps, 2 m16 atoms each).
  static constexpr int kBlockN = kHeadDim == 128 ? 32 : 64;
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  // Warps stacked along the queries; each 16 x 16 step of N is one ldmatrix.x4 of B.
  using Mma = TiledMMA<MmaAtom<Element>, Layout<Shape<Int<kWarps>, _1, _1>>, Tile<Int<16 * kWarps>, _16, _16>>;
  static constexpr int kQElems = kBlockM * kHeadDim;
  static constexpr int kKVElems = kBlockN * kHeadDim;
  // Q, K (2 stages), V: (128 + 3 * 32) * 128 * 2 B = 56 KiB at D = 128, (128 + 3 * 64) * 64 * 2 B =
  // 40 KiB at D = 64 (128 x 128 tiles spill there, as 128 x 64 do at D = 128).
  static constexpr int kSmemBytes = (kQElems + 3 * kKVElems) * static_cast<int>(sizeof(Element));
};

template <typename Element, int kHeadDim>
__global__ void __launch_bounds__(FwdTile<Element, kHeadDim>::kThreads)
    attention_fwd_sm80_kernel(const AttentionSm80Params p) {
  using Cfg = FwdTile<Element, kHeadDim>;
  constexpr int BM = Cfg::kBlockM;
  constexpr int BN = Cfg::kBlockN;
  constexpr int D = kHeadDim;
  extern __shared__ __align__(128) unsigned char smem_buf[];

  const int m_tiles = (p.seqlen + BM - 1) / BM;
  const BlockCoords coords = block_coords(blockIdx.x, m_tiles, p.heads, true);  // last tiles (most keys) first
  const SampleRows rows = sample_rows(p, coords.b);
  const int S = rows.seqlen;
  const int h = coords.h;
  const int m0 = coords.tile * BM;
  if (m0 >= S) return;  // varlen: past this sequence's end (the whole block leaves, before any barrier)
  const int prefix = visible_prefix(p, coords.b, S);
  const KeyRange<BM, BN> range(m0, prefix, S);
  const int tid = threadIdx.x;
  const HeadRows<const Element, D> k_rows(p.k, rows.batch, h);
  const HeadRows<const Element, D> v_rows(p.v, rows.batch, h);

  Element* smem = reinterpret_cast<Element*>(smem_buf);
  auto sQ = make_tensor(make_smem_ptr(smem), SmemTile<BM, D>{});
  auto sK = make_tensor(make_smem_ptr(smem + Cfg::kQElems), SmemTile<BN, D>{});  // stage 1 follows
  auto sV = make_tensor(make_smem_ptr(smem + Cfg::kQElems + 2 * Cfg::kKVElems), SmemTile<BN, D>{});
  auto sVt = make_tensor(sV.data(), SmemTileT<BN, D>{});
  auto sO = make_tensor(sQ.data(), SmemTile<BM, D>{});  // the epilogue reuses Q's space

  GmemLoad<Element, Cfg::kThreads> gmem_load;
  auto load_thr = gmem_load.get_thread_slice(tid);
  auto tQsQ = load_thr.partition_D(sQ);
  auto tKsK = load_thr.partition_D(sK);
  auto tVsV = load_thr.partition_D(sV);
  auto cQ = make_identity_tensor(Shape<Int<BM>, Int<D>>{});
  auto cKV = make_identity_tensor(Shape<Int<BN>, Int<D>>{});
  auto tQcQ = load_thr.partition_S(cQ);
  auto tKcK = load_thr.partition_S(cKV);

  typename Cfg::Mma mma;
  auto thr_mma = mma.get_thread_slice(tid);
  auto tSrQ = thr_mma.partition_fragment_A(sQ);
  auto tSrK = thr_mma.partition_fragment_B(sK);
  auto tOrVt = thr_mma.partition_fragment_B(sVt);
  auto acc_o = partition_fragment_C(mma, Shape<Int<BM>, Int<D>>{});
  clear(acc_o);

  auto ldsm_a = make_tiled_copy_A(Copy_Atom<LdsmN, Element>{}, mma);
  auto ldsm_a_thr = ldsm_a.get_thread_slice(tid);
  auto tSsQ = ldsm_a_thr.partition_S(sQ);
  auto ldsm_b = make_tiled_copy_B(Copy_Atom<LdsmN, Element>{}, mma);
  auto ldsm_b_thr = ldsm_b.get_thread_slice(tid);
  auto tSsK = ldsm_b_thr.partition_S(sK);
  auto ldsm_bt = make_tiled_copy_B(Copy_Atom<LdsmT, Element>{}, mma);
  auto ldsm_bt_thr = ldsm_bt.get_thread_slice(tid);
  auto tOsVt = ldsm_bt_thr.partition_S(sVt);

  auto cS = make_identity_tensor(Shape<Int<BM>, Int<BN>>{});
  constexpr int kRows = decltype(size<0>(rowcol(acc_o.layout())))::value;  // rows held: (half, m atom)
  constexpr int kM = kRows / 2;
  float row_max[kRows];  // running max of the raw scores (before the scale)
  float row_sum[kM][4];  // running sum of P, on the tensor cores (add_row_sums): row (h, m) is [m][2 h]
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r) row_max[r] = -INFINITY;
  CUTE_UNROLL
  for (int m = 0; m < kM; ++m) {
    CUTE_UNROLL
    for (int i = 0; i < 4; ++i) row_sum[m][i] = 0.f;
  }
  const float scale_log2 = p.scale * kLog2e;

  // Prologue: Q and the first K tile.
  {
    const HeadRows<const Element, D> q_rows(p.q, rows.batch, h);
    load_tile<true>(gmem_load, load_thr.partition_S(q_rows.template tile<BM>(m0)), tQsQ, tQcQ, S - m0);
  }
  load_rows(gmem_load, load_thr.partition_S(k_rows.template tile<BN>(0)), tKsK, tKcK, range.key_end, BN);
  cp_async_fence();

  // Key tiles [0, n_full) are unmasked, the rest up to key_end boundary tiles. (One loop: separate
  // loops for the two kinds spill, ptxas keeping the carried state in different registers in each.)
  for (int j = 0; j * BN < range.key_end; ++j) {
    const int stage = j & 1;
    const int n0 = j * BN;
    cp_async_wait<0>();
    __syncthreads();  // K_j landed for every thread; V and K stage 1 - stage are free
    load_rows(gmem_load, load_thr.partition_S(v_rows.template tile<BN>(n0)), tVsV, tKcK, range.key_end - n0, BN);
    cp_async_fence();
    if (n0 + BN < range.key_end) {
      load_rows(gmem_load, load_thr.partition_S(k_rows.template tile<BN>(n0 + BN)),
                shifted(tKsK, (1 - stage) * Cfg::kKVElems), tKcK, range.key_end - n0 - BN, BN);
    }
    cp_async_fence();

    auto acc_s = partition_fragment_C(mma, Shape<Int<BM>, Int<BN>>{});
    clear(acc_s);
    gemm_ss(mma, acc_s, tSrQ, tSrK, tSsQ, shifted(tSsK, stage * Cfg::kKVElems), ldsm_a, ldsm_a_thr, ldsm_b,
            ldsm_b_thr);

    auto s = make_tensor(acc_s.data(), rowcol(acc_s.layout()));  // (rows, cols) view
    if (j >= range.n_full) {  // boundary tile: row i sees the keys below max(i + 1, P)
      // The thread's coordinates are derived anew here (fresh_thread_index) rather than kept in
      // registers through the loop for the few boundary tiles; columns are compared as
      // (compile-time offset) against (limit - this thread's first column).
      auto tScS = mma.get_thread_slice(fresh_thread_index()).partition_C(cS);
      auto tScS_rc = make_tensor(tScS.data(), rowcol(tScS.layout()));
      const int col0 = get<1>(tScS_rc(0, 0));
      CUTE_UNROLL
      for (int r = 0; r < size<0>(s); ++r) {
        const int limit = max(m0 + get<0>(tScS_rc(r, 0)) + 1, prefix) - n0 - col0;
        CUTE_UNROLL
        for (int c = 0; c < size<1>(s); ++c) {
          if (get<1>(tScS_rc(r, c)) - col0 >= limit) s(r, c) = -INFINITY;
        }
      }
    }

    // Online softmax, base 2 with the scale folded in. Key 0 is visible to every row and lies in
    // tile 0, so the running max is finite from the first tile on; the -inf guard only keeps a row
    // with nothing visible (impossible) NaN-free.
    auto o = make_tensor(acc_o.data(), rowcol(acc_o.layout()));
    CUTE_UNROLL
    for (int r = 0; r < size<0>(s); ++r) {
      float m = row_max[r];
      CUTE_UNROLL
      for (int c = 0; c < size<1>(s); ++c) m = fmaxf(m, s(r, c));
      m = quad_max(m);
      const float m_scaled = m == -INFINITY ? 0.f : m * scale_log2;
      const float alpha = exp2f(row_max[r] * scale_log2 - m_scaled);
      row_max[r] = m;
      CUTE_UNROLL
      for (int c = 0; c < size<1>(s); ++c) s(r, c) = exp2f(fmaf(s(r, c), scale_log2, -m_scaled));
      CUTE_UNROLL
      for (int i = 0; i < 2; ++i) row_sum[r / 2][2 * (r % 2) + i] *= alpha;
      CUTE_UNROLL
      for (int c = 0; c < size<1>(o); ++c) o(r, c) *= alpha;
    }
    auto tOrP = acc_to_a<Element>(acc_s);
    add_row_sums<Element>(tOrP, row_sum);

    cp_async_wait<1>();  // V_j (K_{j+1} may still be in flight)
    __syncthreads();
    gemm_rs(mma, acc_o, tOrP, tOrVt, tOsVt, ldsm_bt, ldsm_bt_thr);
  }

  // Epilogue: O / l and the lse. The thread's and block's coordinates are derived anew
  // (fresh_thread_index): kept from the prologue they would occupy registers through the loop.
  const int tid_e = fresh_thread_index();
  const BlockCoords ce = block_coords(fresh_block_index(), m_tiles, p.heads, true);
  const SampleRows re = sample_rows(p, ce.b);
  const int m0e = ce.tile * BM;
  auto tOcO = mma.get_thread_slice(tid_e).partition_C(cQ);
  auto tOcO_rc = make_tensor(tOcO.data(), rowcol(tOcO.layout()));
  auto o = make_tensor(acc_o.data(), rowcol(acc_o.layout()));
  const int64_t stats_row = stats_offset(p, re.batch, ce.h);
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r) {
    const float sum = row_sum[r / 2][2 * (r % 2)];
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    CUTE_UNROLL
    for (int c = 0; c < size<1>(o); ++c) o(r, c) *= inv;
    const int row = m0e + get<0>(tOcO_rc(r, 0));
    if (get<1>(tOcO_rc(r, 0)) == 0 && row < re.seqlen) {
      p.lse[stats_row + row] = sum > 0.f ? row_max[r] * p.scale + logf(sum) : INFINITY;
    }
  }
  auto rO = make_tensor<Element>(acc_o.layout());
  convert_fragment(acc_o, rO);
  cp_async_wait<0>();
  __syncthreads();  // every warp is done reading Q
  auto st = make_tiled_copy_C(Copy_Atom<StoreC, Element>{}, mma);
  auto st_thr = st.get_thread_slice(tid_e);
  copy(st, st_thr.retile_S(rO), st_thr.partition_D(sO));
  __syncthreads();
  GmemStore<Element, Cfg::kThreads> gmem_store;
  auto store_thr = gmem_store.get_thread_slice(tid_e);
  const HeadRows<Element, D> o_rows(p.out, re.batch, ce.h);
  store_tile(gmem_store, store_thr.partition_S(sO), store_thr.partition_D(o_rows.template tile<BM>(m0e)),
             store_thr.partition_S(cQ), re.seqlen - m0e);
}

// ---- backward: delta -------------------------------------------------------------------------------

constexpr int kPreprocessThreads = 128;

// delta[row] = sum_d dout[row, d] * out[row, d] over the B * H * S rows, D / 8 threads per row (varlen:
// launched on the packed tokens as one (1, H, T) sample, which is delta's (H, T) layout).
template <typename Element, int kHeadDim>
__global__ void __launch_bounds__(kPreprocessThreads) attention_bwd_preprocess_kernel(const AttentionSm80Params p) {
  constexpr int kPerRow = kHeadDim / 8;
  constexpr int kRowsPerBlock = kPreprocessThreads / kPerRow;
  const int64_t rows = static_cast<int64_t>(p.batch) * p.heads * p.seqlen;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kPerRow;
  const int col = (threadIdx.x % kPerRow) * 8;
  float acc = 0.f;
  if (row < rows) {
    const int64_t bh = row / p.seqlen;
    const int64_t s = row - bh * p.seqlen;
    const int64_t b = bh / p.heads;
    const int64_t h = bh - b * p.heads;
    const Element* o = static_cast<const Element*>(p.out.data) + b * p.out.batch_stride + h * p.out.head_stride +
                       s * p.out.row_stride + col;
    const Element* d = static_cast<const Element*>(p.dout.data) + b * p.dout.batch_stride +
                       h * p.dout.head_stride + s * p.dout.row_stride + col;
    const cutlass::AlignedArray<Element, 8> ov = *reinterpret_cast<const cutlass::AlignedArray<Element, 8>*>(o);
    const cutlass::AlignedArray<Element, 8> dv = *reinterpret_cast<const cutlass::AlignedArray<Element, 8>*>(d);
    CUTE_UNROLL
    for (int i = 0; i < 8; ++i) acc = fmaf(static_cast<float>(ov[i]), static_cast<float>(dv[i]), acc);
  }
  CUTE_UNROLL
  for (int offset = kPerRow / 2; offset > 0; offset >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
  if (row < rows && threadIdx.x % kPerRow == 0) p.delta[row] = acc;
}

// ---- backward: dK, dV ------------------------------------------------------------------------------

template <typename Element, int kHeadDim, int kStages>
struct DkdvTile {
  static constexpr int kBlockN = 64;  // keys per CTA, resident
  static constexpr int kBlockM = 64;  // queries per step
  static constexpr int kWarps = 8;
  static constexpr int kThreads = kWarps * 32;
  // 4 warps along the keys x 2 along the second dim, for all four products (S^T, dP^T: keys x
  // queries; dV, dK: keys x D).
  using Mma = TiledMMA<MmaAtom<Element>, Layout<Shape<_4, _2, _1>>, Tile<_64, _32, _16>>;
  static constexpr int kKVElems = kBlockN * kHeadDim;
  static constexpr int kQElems = kBlockM * kHeadDim;
  static constexpr int kPElems = kBlockN * kBlockM;
  static constexpr int kOffV = kKVElems;
  static constexpr int kOffQ = 2 * kKVElems;
  static constexpr int kOffDo = kOffQ + kStages * kQElems;
  static constexpr int kOffP = kOffDo + kStages * kQElems;
  static constexpr int kOffDs = kOffP + kPElems;
  static constexpr int kElems = kOffDs + kPElems;
  // K, V, kStages x (Q, dO), P^T, dS^T, then kStages x (lse, delta) fp32:
  // D = 128: 113 KiB (2 stages) / 81 KiB (1 stage); D = 64: 65 KiB (2 stages).
  static constexpr int kSmemBytes =
      kElems * static_cast<int>(sizeof(Element)) + kStages * 2 * kBlockM * static_cast<int>(sizeof(float));
};

template <typename Element, int kHeadDim, int kStages>
__global__ void __launch_bounds__(DkdvTile<Element, kHeadDim, kStages>::kThreads)
    attention_bwd_dkdv_sm80_kernel(const AttentionSm80Params p) {
  using Cfg = DkdvTile<Element, kHeadDim, kStages>;
  constexpr int BM = Cfg::kBlockM;
  constexpr int BN = Cfg::kBlockN;
  constexpr int D = kHeadDim;
  extern __shared__ __align__(128) unsigned char smem_buf[];

  const int n_tiles = (p.seqlen + BN - 1) / BN;
  // The early key tiles, seen by the most queries, first.
  const BlockCoords coords = block_coords(blockIdx.x, n_tiles, p.heads, false);
  const SampleRows rows = sample_rows(p, coords.b);
  const int S = rows.seqlen;
  const int h = coords.h;
  const int n0 = coords.tile * BN;
  if (n0 >= S) return;  // varlen: past this sequence's end (the whole block leaves, before any barrier)
  const int prefix = visible_prefix(p, coords.b, S);
  // Query tiles that see this key tile: boundary ones from lo, unmasked ones from full_start.
  const int n1 = min(n0 + BN, S);
  const int lo = (n0 < prefix ? 0 : n0) / BM * BM;
  const int first_full = n1 <= prefix ? 0 : n1 - 1;
  const int full_start = max((first_full + BM - 1) / BM * BM, lo);
  const int m_steps = (S - lo + BM - 1) / BM;
  const int tid = threadIdx.x;

  const HeadRows<const Element, D> q_rows(p.q, rows.batch, h);
  const HeadRows<const Element, D> do_rows(p.dout, rows.batch, h);
  const int64_t stats_row = stats_offset(p, rows.batch, h);
  const float* lse = p.lse + stats_row;
  const float* delta = p.delta + stats_row;

  Element* smem = reinterpret_cast<Element*>(smem_buf);
  auto sK = make_tensor(make_smem_ptr(smem), SmemTile<BN, D>{});
  auto sV = make_tensor(make_smem_ptr(smem + Cfg::kOffV), SmemTile<BN, D>{});
  auto sQ = make_tensor(make_smem_ptr(smem + Cfg::kOffQ), SmemTile<BM, D>{});  // stage 0 (stage 1 follows)
  auto sdO = make_tensor(make_smem_ptr(smem + Cfg::kOffDo), SmemTile<BM, D>{});
  auto sQt = make_tensor(sQ.data(), SmemTileT<BM, D>{});
  auto sdOt = make_tensor(sdO.data(), SmemTileT<BM, D>{});
  auto sPt = make_tensor(make_smem_ptr(smem + Cfg::kOffP), SmemTile<BN, BM>{});
  auto sdSt = make_tensor(make_smem_ptr(smem + Cfg::kOffDs), SmemTile<BN, BM>{});
  float* s_lse = reinterpret_cast<float*>(smem + Cfg::kElems);  // [stage][BM]
  float* s_delta = s_lse + kStages * BM;

  GmemLoad<Element, Cfg::kThreads> gmem_load;
  auto load_thr = gmem_load.get_thread_slice(tid);
  auto tQsQ = load_thr.partition_D(sQ);
  auto tdOsdO = load_thr.partition_D(sdO);
  auto tKsK = load_thr.partition_D(sK);
  auto tVsV = load_thr.partition_D(sV);
  auto cQ = make_identity_tensor(Shape<Int<BM>, Int<D>>{});
  auto cKV = make_identity_tensor(Shape<Int<BN>, Int<D>>{});
  auto tQcQ = load_thr.partition_S(cQ);
  auto tKcK = load_thr.partition_S(cKV);

  // Q, dO, lse and delta of query step i into `stage`; lse and delta rows past S read as 0.
  auto load_step = [&](int i, int stage) {
    const int m0 = lo + i * BM;
    load_rows(gmem_load, load_thr.partition_S(q_rows.template tile<BM>(m0)), shifted(tQsQ, stage * Cfg::kQElems),
              tQcQ, S - m0, BM);
    load_rows(gmem_load, load_thr.partition_S(do_rows.template tile<BM>(m0)), shifted(tdOsdO, stage * Cfg::kQElems),
              tQcQ, S - m0, BM);
    if (tid < 2 * BM) {
      const int r = tid % BM;
      const bool in_bounds = m0 + r < S;
      const float* src = (tid < BM ? lse : delta) + (in_bounds ? m0 + r : 0);
      float* dst = (tid < BM ? s_lse : s_delta) + stage * BM + r;
      SM80_CP_ASYNC_CACHEALWAYS_ZFILL<uint32_t>::copy(*reinterpret_cast<const uint32_t*>(src),
                                                      *reinterpret_cast<uint32_t*>(dst), in_bounds);
    }
  };

  typename Cfg::Mma mma;
  auto thr_mma = mma.get_thread_slice(tid);
  auto tSrK = thr_mma.partition_fragment_A(sK);
  auto tSrQ = thr_mma.partition_fragment_B(sQ);
  auto tPrV = thr_mma.partition_fragment_A(sV);
  auto tPrdO = thr_mma.partition_fragment_B(sdO);
  auto tVrPt = thr_mma.partition_fragment_A(sPt);
  auto tVrdOt = thr_mma.partition_fragment_B(sdOt);
  auto tKrdSt = thr_mma.partition_fragment_A(sdSt);
  auto tKrQt = thr_mma.partition_fragment_B(sQt);
  auto acc_dk = partition_fragment_C(mma, Shape<Int<BN>, Int<D>>{});
  auto acc_dv = partition_fragment_C(mma, Shape<Int<BN>, Int<D>>{});
  clear(acc_dk);
  clear(acc_dv);

  auto ldsm_a = make_tiled_copy_A(Copy_Atom<LdsmN, Element>{}, mma);
  auto ldsm_a_thr = ldsm_a.get_thread_slice(tid);
  auto tSsK = ldsm_a_thr.partition_S(sK);
  auto tPsV = ldsm_a_thr.partition_S(sV);
  auto tVsPt = ldsm_a_thr.partition_S(sPt);
  auto tKsdSt = ldsm_a_thr.partition_S(sdSt);
  auto ldsm_b = make_tiled_copy_B(Copy_Atom<LdsmN, Element>{}, mma);
  auto ldsm_b_thr = ldsm_b.get_thread_slice(tid);
  auto tSsQ = ldsm_b_thr.partition_S(sQ);
  auto tPsdO = ldsm_b_thr.partition_S(sdO);
  auto ldsm_bt = make_tiled_copy_B(Copy_Atom<LdsmT, Element>{}, mma);
  auto ldsm_bt_thr = ldsm_bt.get_thread_slice(tid);
  auto tVsdOt = ldsm_bt_thr.partition_S(sdOt);
  auto tKsQt = ldsm_bt_thr.partition_S(sQt);
  auto st = make_tiled_copy_C(Copy_Atom<StoreC, Element>{}, mma);
  auto st_thr = st.get_thread_slice(tid);
  auto tPsPt = st_thr.partition_D(sPt);
  auto tPsdSt = st_thr.partition_D(sdSt);

  auto cS = make_identity_tensor(Shape<Int<BN>, Int<BM>>{});  // (key, query) within the tiles
  auto tScS = thr_mma.partition_C(cS);
  auto tScS_rc = make_tensor(tScS.data(), rowcol(tScS.layout()));
  const float scale_log2 = p.scale * kLog2e;

  // Prologue: K, V and query step 0.
  {
    const HeadRows<const Element, D> k_rows(p.k, rows.batch, h);
    const HeadRows<const Element, D> v_rows(p.v, rows.batch, h);
    load_rows(gmem_load, load_thr.partition_S(k_rows.template tile<BN>(n0)), tKsK, tKcK, S - n0, BN);
    load_rows(gmem_load, load_thr.partition_S(v_rows.template tile<BN>(n0)), tVsV, tKcK, S - n0, BN);
  }
  if (m_steps > 0) load_step(0, 0);
  cp_async_fence();

  for (int i = 0; i < m_steps; ++i) {
    const int stage = kStages == 2 ? (i & 1) : 0;
    const int m0 = lo + i * BM;
    if constexpr (kStages == 1) {
      if (i > 0) {
        __syncthreads();  // every warp is done with step i - 1's Q and dO
        load_step(i, 0);
        cp_async_fence();
      }
    }
    cp_async_wait<0>();
    __syncthreads();  // step i landed; stage 1 - stage, P^T and dS^T are free
    if constexpr (kStages == 2) {
      if (i + 1 < m_steps) load_step(i + 1, 1 - stage);
      cp_async_fence();
    }

    auto acc_s = partition_fragment_C(mma, Shape<Int<BN>, Int<BM>>{});  // S^T
    clear(acc_s);
    gemm_ss(mma, acc_s, tSrK, tSrQ, tSsK, shifted(tSsQ, stage * Cfg::kQElems), ldsm_a, ldsm_a_thr, ldsm_b,
            ldsm_b_thr);
    auto acc_dp = partition_fragment_C(mma, Shape<Int<BN>, Int<BM>>{});  // dP^T
    clear(acc_dp);
    gemm_ss(mma, acc_dp, tPrV, tPrdO, tPsV, shifted(tPsdO, stage * Cfg::kQElems), ldsm_a, ldsm_a_thr, ldsm_b,
            ldsm_b_thr);

    // P^T = exp2(S^T * scale * log2 e - lse * log2 e), hidden pairs 0 on boundary tiles;
    // dS^T = P^T * (dP^T - delta). Query rows past S have q = dO = lse = delta = 0: P^T = 1 there,
    // dS^T = 0, and their dO row is 0, so they add nothing.
    auto s = make_tensor(acc_s.data(), rowcol(acc_s.layout()));
    auto dp = make_tensor(acc_dp.data(), rowcol(acc_dp.layout()));
    const bool masked = m0 < full_start;
    // Key row r is seen by the queries from m0 + first[r] on (all of them when the key is below P).
    int first[decltype(size<0>(s))::value];
    CUTE_UNROLL
    for (int r = 0; r < size<0>(s); ++r) {
      const int key = n0 + get<0>(tScS_rc(r, 0));
      first[r] = key < prefix ? INT_MIN : key - m0;
    }
    const float* stage_lse = s_lse + stage * BM;
    const float* stage_delta = s_delta + stage * BM;
    CUTE_UNROLL
    for (int c = 0; c < size<1>(s); ++c) {
      const int qcol = get<1>(tScS_rc(0, c));
      const float lse2 = stage_lse[qcol] * kLog2e;
      const float dlt = stage_delta[qcol];
      CUTE_UNROLL
      for (int r = 0; r < size<0>(s); ++r) {
        float pr = exp2f(fmaf(s(r, c), scale_log2, -lse2));
        if (masked && qcol < first[r]) pr = 0.f;
        s(r, c) = pr;
        dp(r, c) = pr * (dp(r, c) - dlt);
      }
    }
    auto rPt = make_tensor<Element>(acc_s.layout());
    convert_fragment(acc_s, rPt);
    auto rdSt = make_tensor<Element>(acc_dp.layout());
    convert_fragment(acc_dp, rdSt);
    copy(st, st_thr.retile_S(rPt), tPsPt);
    copy(st, st_thr.retile_S(rdSt), tPsdSt);
    __syncthreads();  // P^T and dS^T complete

    gemm_ss(mma, acc_dv, tVrPt, tVrdOt, tVsPt, shifted(tVsdOt, stage * Cfg::kQElems), ldsm_a, ldsm_a_thr, ldsm_bt,
            ldsm_bt_thr);
    gemm_ss(mma, acc_dk, tKrdSt, tKrQt, tKsdSt, shifted(tKsQt, stage * Cfg::kQElems), ldsm_a, ldsm_a_thr, ldsm_bt,
            ldsm_bt_thr);
  }

  // Epilogue: dK * scale and dV through shared memory (K's and V's space) to the outputs.
  CUTE_UNROLL
  for (int i = 0; i < size(acc_dk); ++i) acc_dk(i) *= p.scale;
  auto rdK = make_tensor<Element>(acc_dk.layout());
  convert_fragment(acc_dk, rdK);
  auto rdV = make_tensor<Element>(acc_dv.layout());
  convert_fragment(acc_dv, rdV);
  cp_async_wait<0>();
  __syncthreads();  // every warp is done reading K and V
  copy(st, st_thr.retile_S(rdK), st_thr.partition_D(sK));
  copy(st, st_thr.retile_S(rdV), st_thr.partition_D(sV));
  __syncthreads();
  GmemStore<Element, Cfg::kThreads> gmem_store;
  auto store_thr = gmem_store.get_thread_slice(tid);
  const HeadRows<Element, D> dk_rows(p.dk, rows.batch, h);
  const HeadRows<Element, D> dv_rows(p.dv, rows.batch, h);
  store_tile(gmem_store, store_thr.partition_S(sK), store_thr.partition_D(dk_rows.template tile<BN>(n0)), tKcK,
             S - n0);
  store_tile(gmem_store, store_thr.partition_S(sV), store_thr.partition_D(dv_rows.template tile<BN>(n0)), tKcK,
             S - n0);
}

// ---- backward: dQ ----------------------------------------------------------------------------------

template <typename Element, int kHeadDim>
struct DqTile {
  static constexpr int kBlockM = 64;
  static constexpr int kBlockN = 64;
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  using Mma = TiledMMA<MmaAtom<Element>, Layout<Shape<Int<kWarps>, _1, _1>>, Tile<Int<16 * kWarps>, _16, _16>>;
  static constexpr int kQElems = kBlockM * kHeadDim;
  static constexpr int kKVElems = kBlockN * kHeadDim;
  static constexpr int kOffDo = kQElems;
  static constexpr int kOffK = 2 * kQElems;
  static constexpr int kOffV = kOffK + 2 * kKVElems;
  // Q, dO, K (2 stages), V: 80 KiB at D = 128, 40 KiB at D = 64.
  static constexpr int kSmemBytes = (kOffV + kKVElems) * static_cast<int>(sizeof(Element));
};

template <typename Element, int kHeadDim>
__global__ void __launch_bounds__(DqTile<Element, kHeadDim>::kThreads)
    attention_bwd_dq_sm80_kernel(const AttentionSm80Params p) {
  using Cfg = DqTile<Element, kHeadDim>;
  constexpr int BM = Cfg::kBlockM;
  constexpr int BN = Cfg::kBlockN;
  constexpr int D = kHeadDim;
  extern __shared__ __align__(128) unsigned char smem_buf[];

  const int m_tiles = (p.seqlen + BM - 1) / BM;
  const BlockCoords coords = block_coords(blockIdx.x, m_tiles, p.heads, true);  // last tiles (most keys) first
  const SampleRows rows = sample_rows(p, coords.b);
  const int S = rows.seqlen;
  const int h = coords.h;
  const int m0 = coords.tile * BM;
  if (m0 >= S) return;  // varlen: past this sequence's end (the whole block leaves, before any barrier)
  const int prefix = visible_prefix(p, coords.b, S);
  const KeyRange<BM, BN> range(m0, prefix, S);
  const int tid = threadIdx.x;

  const HeadRows<const Element, D> k_rows(p.k, rows.batch, h);
  const HeadRows<const Element, D> v_rows(p.v, rows.batch, h);
  const int64_t stats_row = stats_offset(p, rows.batch, h);

  Element* smem = reinterpret_cast<Element*>(smem_buf);
  auto sQ = make_tensor(make_smem_ptr(smem), SmemTile<BM, D>{});
  auto sdO = make_tensor(make_smem_ptr(smem + Cfg::kOffDo), SmemTile<BM, D>{});
  auto sK = make_tensor(make_smem_ptr(smem + Cfg::kOffK), SmemTile<BN, D>{});  // stage 1 follows
  auto sKt = make_tensor(sK.data(), SmemTileT<BN, D>{});
  auto sV = make_tensor(make_smem_ptr(smem + Cfg::kOffV), SmemTile<BN, D>{});
  auto sdQ = make_tensor(sQ.data(), SmemTile<BM, D>{});  // the epilogue reuses Q's space

  GmemLoad<Element, Cfg::kThreads> gmem_load;
  auto load_thr = gmem_load.get_thread_slice(tid);
  auto tQsQ = load_thr.partition_D(sQ);
  auto tdOsdO = load_thr.partition_D(sdO);
  auto tKsK = load_thr.partition_D(sK);
  auto tVsV = load_thr.partition_D(sV);
  auto cQ = make_identity_tensor(Shape<Int<BM>, Int<D>>{});
  auto cKV = make_identity_tensor(Shape<Int<BN>, Int<D>>{});
  auto tQcQ = load_thr.partition_S(cQ);
  auto tKcK = load_thr.partition_S(cKV);

  typename Cfg::Mma mma;
  auto thr_mma = mma.get_thread_slice(tid);
  auto tSrQ = thr_mma.partition_fragment_A(sQ);
  auto tSrK = thr_mma.partition_fragment_B(sK);
  auto tPrdO = thr_mma.partition_fragment_A(sdO);
  auto tPrV = thr_mma.partition_fragment_B(sV);
  auto tQrKt = thr_mma.partition_fragment_B(sKt);
  auto acc_dq = partition_fragment_C(mma, Shape<Int<BM>, Int<D>>{});
  clear(acc_dq);

  auto ldsm_a = make_tiled_copy_A(Copy_Atom<LdsmN, Element>{}, mma);
  auto ldsm_a_thr = ldsm_a.get_thread_slice(tid);
  auto tSsQ = ldsm_a_thr.partition_S(sQ);
  auto tPsdO = ldsm_a_thr.partition_S(sdO);
  auto ldsm_b = make_tiled_copy_B(Copy_Atom<LdsmN, Element>{}, mma);
  auto ldsm_b_thr = ldsm_b.get_thread_slice(tid);
  auto tSsK = ldsm_b_thr.partition_S(sK);
  auto tPsV = ldsm_b_thr.partition_S(sV);
  auto ldsm_bt = make_tiled_copy_B(Copy_Atom<LdsmT, Element>{}, mma);
  auto ldsm_bt_thr = ldsm_bt.get_thread_slice(tid);
  auto tQsKt = ldsm_bt_thr.partition_S(sKt);

  auto cS = make_identity_tensor(Shape<Int<BM>, Int<BN>>{});
  auto tScS = thr_mma.partition_C(cS);
  auto tScS_rc = make_tensor(tScS.data(), rowcol(tScS.layout()));
  constexpr int kRows = decltype(size<0>(tScS_rc))::value;
  // This thread's rows: lse in log2 units and delta (0 past S, where q = dO = 0 too).
  float lse2[kRows];
  float dlt[kRows];
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r) {
    const int row = m0 + get<0>(tScS_rc(r, 0));
    lse2[r] = row < S ? p.lse[stats_row + row] * kLog2e : 0.f;
    dlt[r] = row < S ? p.delta[stats_row + row] : 0.f;
  }
  const float scale_log2 = p.scale * kLog2e;

  // Prologue: Q, dO and the first K tile.
  {
    const HeadRows<const Element, D> q_rows(p.q, rows.batch, h);
    const HeadRows<const Element, D> do_rows(p.dout, rows.batch, h);
    load_tile<true>(gmem_load, load_thr.partition_S(q_rows.template tile<BM>(m0)), tQsQ, tQcQ, S - m0);
    load_tile<true>(gmem_load, load_thr.partition_S(do_rows.template tile<BM>(m0)), tdOsdO, tQcQ, S - m0);
  }
  load_rows(gmem_load, load_thr.partition_S(k_rows.template tile<BN>(0)), tKsK, tKcK, range.key_end, BN);
  cp_async_fence();

  for (int j = 0; j * BN < range.key_end; ++j) {
    const int stage = j & 1;
    const int n0 = j * BN;
    cp_async_wait<0>();
    __syncthreads();  // K_j landed; V and K stage 1 - stage are free
    load_rows(gmem_load, load_thr.partition_S(v_rows.template tile<BN>(n0)), tVsV, tKcK, range.key_end - n0, BN);
    cp_async_fence();
    if (n0 + BN < range.key_end) {
      load_rows(gmem_load, load_thr.partition_S(k_rows.template tile<BN>(n0 + BN)),
                shifted(tKsK, (1 - stage) * Cfg::kKVElems), tKcK, range.key_end - n0 - BN, BN);
    }
    cp_async_fence();

    auto acc_s = partition_fragment_C(mma, Shape<Int<BM>, Int<BN>>{});
    clear(acc_s);
    gemm_ss(mma, acc_s, tSrQ, tSrK, tSsQ, shifted(tSsK, stage * Cfg::kKVElems), ldsm_a, ldsm_a_thr, ldsm_b,
            ldsm_b_thr);
    // P = exp2(S * scale * log2 e - lse * log2 e); on boundary tiles hidden pairs are 0 (row i sees
    // the keys below max(i + 1, P); coordinates derived anew as in the forward).
    auto s = make_tensor(acc_s.data(), rowcol(acc_s.layout()));
    CUTE_UNROLL
    for (int r = 0; r < size<0>(s); ++r) {
      CUTE_UNROLL
      for (int c = 0; c < size<1>(s); ++c) s(r, c) = exp2f(fmaf(s(r, c), scale_log2, -lse2[r]));
    }
    if (j >= range.n_full) {
      auto tScS_m = mma.get_thread_slice(fresh_thread_index()).partition_C(cS);
      auto tScS_mrc = make_tensor(tScS_m.data(), rowcol(tScS_m.layout()));
      const int col0 = get<1>(tScS_mrc(0, 0));
      CUTE_UNROLL
      for (int r = 0; r < size<0>(s); ++r) {
        const int limit = max(m0 + get<0>(tScS_mrc(r, 0)) + 1, prefix) - n0 - col0;
        CUTE_UNROLL
        for (int c = 0; c < size<1>(s); ++c) {
          if (get<1>(tScS_mrc(r, c)) - col0 >= limit) s(r, c) = 0.f;
        }
      }
    }

    cp_async_wait<1>();  // V_j (K_{j+1} may still be in flight)
    __syncthreads();
    auto acc_dp = partition_fragment_C(mma, Shape<Int<BM>, Int<BN>>{});
    clear(acc_dp);
    gemm_ss(mma, acc_dp, tPrdO, tPrV, tPsdO, tPsV, ldsm_a, ldsm_a_thr, ldsm_b, ldsm_b_thr);
    auto dp = make_tensor(acc_dp.data(), rowcol(acc_dp.layout()));
    CUTE_UNROLL
    for (int r = 0; r < size<0>(dp); ++r) {
      CUTE_UNROLL
      for (int c = 0; c < size<1>(dp); ++c) dp(r, c) = s(r, c) * (dp(r, c) - dlt[r]);
    }
    auto tQrdS = acc_to_a<Element>(acc_dp);
    gemm_rs(mma, acc_dq, tQrdS, tQrKt, shifted(tQsKt, stage * Cfg::kKVElems), ldsm_bt, ldsm_bt_thr);
  }

  // Epilogue: dQ * scale through shared memory (Q's space) to the output, coordinates derived anew.
  CUTE_UNROLL
  for (int i = 0; i < size(acc_dq); ++i) acc_dq(i) *= p.scale;
  auto rdQ = make_tensor<Element>(acc_dq.layout());
  convert_fragment(acc_dq, rdQ);
  const int tid_e = fresh_thread_index();
  const BlockCoords ce = block_coords(fresh_block_index(), m_tiles, p.heads, true);
  const SampleRows re = sample_rows(p, ce.b);
  const int m0e = ce.tile * BM;
  cp_async_wait<0>();
  __syncthreads();  // every warp is done reading Q
  auto st = make_tiled_copy_C(Copy_Atom<StoreC, Element>{}, mma);
  auto st_thr = st.get_thread_slice(tid_e);
  copy(st, st_thr.retile_S(rdQ), st_thr.partition_D(sdQ));
  __syncthreads();
  GmemStore<Element, Cfg::kThreads> gmem_store;
  auto store_thr = gmem_store.get_thread_slice(tid_e);
  const HeadRows<Element, D> dq_rows(p.dq, re.batch, ce.h);
  store_tile(gmem_store, store_thr.partition_S(sdQ), store_thr.partition_D(dq_rows.template tile<BM>(m0e)),
             store_thr.partition_S(cQ), re.seqlen - m0e);
}

// ---- launchers -------------------------------------------------------------------------------------

int div_up(int a, int b) { return (a + b - 1) / b; }

int grid_size(const char* op, const AttentionSm80Params& p, int tile) {
  const int64_t blocks = static_cast<int64_t>(p.batch) * p.heads * div_up(p.seqlen, tile);
  TORCH_CHECK(blocks <= INT_MAX, op, ": B * H * ceil(S / ", tile, ") = ", blocks, " thread blocks is too many");
  return static_cast<int>(blocks);
}

// The most dynamic shared memory one block may opt into on the current device.
int max_shared_optin() {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return optin;
}

// Allows `kernel` the dynamic shared memory it needs (above the 48 KiB default) and fails clearly when
// this device cannot give that much to one block.
template <typename Kernel>
void allow_shared(const char* op, Kernel kernel, int bytes) {
  const int optin = max_shared_optin();
  TORCH_CHECK(bytes <= optin, op, ": needs ", bytes, " bytes of shared memory per block, this device allows ", optin);
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  }
}

template <typename Element, int kHeadDim>
void launch_fwd(const AttentionSm80Params& p, cudaStream_t stream) {
  using Cfg = FwdTile<Element, kHeadDim>;
  auto kernel = attention_fwd_sm80_kernel<Element, kHeadDim>;
  allow_shared("attention_fwd_sm80", kernel, Cfg::kSmemBytes);
  kernel<<<grid_size("attention_fwd_sm80", p, Cfg::kBlockM), Cfg::kThreads, Cfg::kSmemBytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Element, int kHeadDim, int kStages>
void launch_dkdv(const AttentionSm80Params& p, cudaStream_t stream) {
  using Cfg = DkdvTile<Element, kHeadDim, kStages>;
  auto kernel = attention_bwd_dkdv_sm80_kernel<Element, kHeadDim, kStages>;
  allow_shared("attention_bwd_sm80", kernel, Cfg::kSmemBytes);
  kernel<<<grid_size("attention_bwd_sm80", p, Cfg::kBlockN), Cfg::kThreads, Cfg::kSmemBytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Element, int kHeadDim>
void launch_bwd(const AttentionSm80Params& p, cudaStream_t stream) {
  {
    // Row-wise: packed sequences are one (1, H, T) sample to it (delta's (H, T) layout).
    AttentionSm80Params rows_params = p;
    if (p.cu_seqlens != nullptr) {
      rows_params.batch = 1;
      rows_params.seqlen = p.total_rows;
    }
    constexpr int kRowsPerBlock = kPreprocessThreads / (kHeadDim / 8);
    const int64_t rows = static_cast<int64_t>(rows_params.batch) * rows_params.heads * rows_params.seqlen;
    const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
    TORCH_CHECK(blocks <= INT_MAX, "attention_bwd_sm80: B * H * S = ", rows, " rows is too many");
    attention_bwd_preprocess_kernel<Element, kHeadDim>
        <<<static_cast<int>(blocks), kPreprocessThreads, 0, stream>>>(rows_params);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  // dK/dV double-buffers its query tiles where the device gives a block enough shared memory (A100
  // 163 KiB, H100 227 KiB); sm_86/sm_89 (99 KiB) take the single-buffered kernel at D = 128.
  constexpr int kSmallestOptin = 99 * 1024;  // per-block opt-in shared memory of sm_86/sm_89
  if constexpr (DkdvTile<Element, kHeadDim, 2>::kSmemBytes <= kSmallestOptin) {
    launch_dkdv<Element, kHeadDim, 2>(p, stream);
  } else if (DkdvTile<Element, kHeadDim, 2>::kSmemBytes <= max_shared_optin()) {
    launch_dkdv<Element, kHeadDim, 2>(p, stream);
  } else {
    launch_dkdv<Element, kHeadDim, 1>(p, stream);
  }
  using Cfg = DqTile<Element, kHeadDim>;
  auto kernel = attention_bwd_dq_sm80_kernel<Element, kHeadDim>;
  allow_shared("attention_bwd_sm80", kernel, Cfg::kSmemBytes);
  kernel<<<grid_size("attention_bwd_sm80", p, Cfg::kBlockM), Cfg::kThreads, Cfg::kSmemBytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace ampere_attention

// Compile-time switch for working on one instantiation (nvcc -DAIMV2_ATTENTION_SM80_ONLY_BF16_D=128
// builds only the bf16 kernels of that head dim and refuses other calls): CuTe kernels are slow to
// compile. The builds never set it.
#ifdef AIMV2_ATTENTION_SM80_ONLY_BF16_D
#define AIMV2_ATTENTION_SM80_DISPATCH(LAUNCH, params, head_dim, bf16, stream)                          \
  do {                                                                                                  \
    TORCH_CHECK((bf16) && (head_dim) == AIMV2_ATTENTION_SM80_ONLY_BF16_D,                               \
                "attention_sm80: this build has only the bf16 kernels of one head dim");                \
    ampere_attention::LAUNCH<cutlass::bfloat16_t, AIMV2_ATTENTION_SM80_ONLY_BF16_D>(params, stream);   \
  } while (0)
#else
#define AIMV2_ATTENTION_SM80_DISPATCH(LAUNCH, params, head_dim, bf16, stream)                          \
  do {                                                                                                  \
    if (bf16) {                                                                                         \
      if ((head_dim) == 128) ampere_attention::LAUNCH<cutlass::bfloat16_t, 128>(params, stream);        \
      else ampere_attention::LAUNCH<cutlass::bfloat16_t, 64>(params, stream);                           \
    } else {                                                                                            \
      if ((head_dim) == 128) ampere_attention::LAUNCH<cutlass::half_t, 128>(params, stream);            \
      else ampere_attention::LAUNCH<cutlass::half_t, 64>(params, stream);                               \
    }                                                                                                   \
  } while (0)
#endif

void attention_sm80_fwd_launch(const AttentionSm80Params& params, int head_dim, bool bf16, cudaStream_t stream) {
  TORCH_CHECK(head_dim == 64 || head_dim == 128, "attention_fwd_sm80: head dim must be 64 or 128, got ", head_dim);
  AIMV2_ATTENTION_SM80_DISPATCH(launch_fwd, params, head_dim, bf16, stream);
}

void attention_sm80_bwd_launch(const AttentionSm80Params& params, int head_dim, bool bf16, cudaStream_t stream) {
  TORCH_CHECK(head_dim == 64 || head_dim == 128, "attention_bwd_sm80: head dim must be 64 or 128, got ", head_dim);
  AIMV2_ATTENTION_SM80_DISPATCH(launch_bwd, params, head_dim, bf16, stream);
}

// True when this library carries device code that runs on `device`. cudaFuncGetAttributes fails
// (cudaErrorInvalidDeviceFunction) when no image fits the card, e.g. a Blackwell GPU under the default
// "8.0;9.0a" build, where a launch would fail. It neither launches nor synchronizes: safe during
// CUDA-graph capture.
bool attention_sm80_has_code(int64_t device) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  cudaFuncAttributes attributes;
  const cudaError_t err =
      cudaFuncGetAttributes(&attributes, ampere_attention::attention_bwd_preprocess_kernel<cutlass::bfloat16_t, 64>);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // the answer, not an error of the next call
    return false;
  }
  return true;
}

// ---- host entries ----------------------------------------------------------------------------------

namespace {

constexpr const char* kFwdOp = "attention_fwd_sm80";
constexpr const char* kBwdOp = "attention_bwd_sm80";
constexpr const char* kVarlenFwdOp = "attention_varlen_fwd_sm80";
constexpr const char* kVarlenBwdOp = "attention_varlen_bwd_sm80";
// Dims of q, k, v: (B, H, S, D) padded, (T, H, D) varlen.
constexpr int64_t kPaddedDims = 4;
constexpr int64_t kVarlenDims = 3;

// The row stride of a (B, H, S, D) operand, or of a varlen (T, H, D) one (any value when there is one
// row: only row 0 is addressed).
int64_t row_stride(const at::Tensor& t) {
  const int64_t row_dim = t.dim() == kPaddedDims ? 2 : 0;
  return t.size(row_dim) > 1 ? t.stride(row_dim) : t.size(-1);
}

// The kernels can address t in place: every row starts on a 16-byte boundary (what cp.async and the
// 16-byte stores need) and 256 rows span less than 2^31 elements (32-bit row offsets in a tile).
bool rows_ok(const at::Tensor& t) {
  const int64_t element = t.element_size();
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    if (t.size(d) > 1 && (t.stride(d) * element) % 16 != 0) return false;
  }
  return row_stride(t) <= INT_MAX / 256;
}

// t itself when the kernels can read it in place, else a contiguous copy (fresh allocations are
// aligned; contiguous rows are D apart).
at::Tensor readable(const at::Tensor& t) { return rows_ok(t) ? t : t.clone(at::MemoryFormat::Contiguous); }

// A varlen (T, H, D) operand's rows of a sequence start at its first token (the "batch index" of the
// kernels), so its batch stride is its row stride.
AttentionSm80Operand operand(const at::Tensor& t) {
  const int64_t rs = row_stride(t);
  return AttentionSm80Operand{t.data_ptr(), t.dim() == kPaddedDims ? t.stride(0) : rs, t.stride(1), rs};
}

// A tensor like q: CUDA, q's device, dtype and shape, contiguous last dim.
void check_like_q(const char* op, const char* name, const at::Tensor& t, const at::Tensor& q) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
  check_same_device(op, name, t, q);
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), op, ": ", name, " must have q's dtype ", q.scalar_type(), ", got ",
              t.scalar_type());
  check_shape(op, name, t, q.sizes());
  TORCH_CHECK(t.stride(-1) == 1, op, ": ", name, " must have a contiguous last dim, got strides ", t.strides());
}

// q, k, v with `dims` dims (kPaddedDims or kVarlenDims), and the scale.
void check_qkv(const char* op, int64_t dims, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
               double scale) {
  const char* layout = dims == kPaddedDims ? "(B, H, S, D)" : "(T, H, D)";
  TORCH_CHECK(q.is_cuda(), op, ": q must be a CUDA tensor, got one on ", q.device());
  TORCH_CHECK(q.dim() == dims, op, ": q must be ", layout, ", got shape ", q.sizes());
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, op,
              ": q must be float16 or bfloat16 (other dtypes are left to the Triton and reference backends), got ",
              q.scalar_type());
  TORCH_CHECK(q.size(-1) == 64 || q.size(-1) == 128, op, ": the head dim (last dim of q) must be 64 or 128, got ",
              q.size(-1));
  TORCH_CHECK(q.stride(-1) == 1, op, ": q must have a contiguous last dim, got strides ", q.strides());
  check_like_q(op, "k", k, q);
  check_like_q(op, "v", v, q);
  for (int64_t d = 0; d + 1 < dims; ++d) {
    TORCH_CHECK(q.size(d) <= INT_MAX, op, ": every dim of q ", layout, " but D must fit in 32 bits, got shape ",
                q.sizes());
  }
  TORCH_CHECK(std::isfinite(scale) && scale > 0, op, ": scale must be a positive finite number, got ", scale);
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, q.get_device()));
  TORCH_CHECK(major >= 8, op, ": needs a GPU of compute capability 8.0 or newer (mma.sync bf16, cp.async), got ",
              major, ".x");
}

// The prefix lengths as a contiguous int32/int64 (n,) tensor on q's device (n samples, called n_name
// in messages), or an undefined tensor.
at::Tensor check_prefix(const char* op, const std::optional<at::Tensor>& prefix_len, int64_t n, const char* n_name,
                        const at::Tensor& q) {
  if (!prefix_len.has_value() || !prefix_len->defined()) return at::Tensor();
  const at::Tensor& t = *prefix_len;
  TORCH_CHECK(t.is_cuda(), op, ": prefix_len must be a CUDA tensor (it is read on the device), got one on ",
              t.device());
  check_same_device(op, "prefix_len", t, q);
  TORCH_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, op,
              ": prefix_len must be int32 or int64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, op, ": prefix_len must have shape (", n_name, ",) = (", n, ",), got ",
              t.sizes());
  return t.contiguous();
}

// cu_seqlens as a contiguous int32 (N + 1,) tensor on q's device (the kernels read cu_seqlens[b] by
// element index), with max_seqlen checked. Its values are the caller's to check (the public op does).
at::Tensor check_cu_seqlens(const char* op, const at::Tensor& cu_seqlens, int64_t max_seqlen, const at::Tensor& q) {
  TORCH_CHECK(cu_seqlens.is_cuda(), op, ": cu_seqlens must be a CUDA tensor (it is read on the device), got one on ",
              cu_seqlens.device());
  check_same_device(op, "cu_seqlens", cu_seqlens, q);
  TORCH_CHECK(cu_seqlens.scalar_type() == at::kInt, op, ": cu_seqlens must be int32, got ", cu_seqlens.scalar_type());
  TORCH_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.size(0) >= 1, op, ": cu_seqlens must have shape (N + 1,), got ",
              cu_seqlens.sizes());
  TORCH_CHECK(cu_seqlens.size(0) - 1 <= INT_MAX, op, ": N (sequences) must fit in 32 bits, got ",
              cu_seqlens.size(0) - 1);
  TORCH_CHECK(max_seqlen >= 0 && max_seqlen <= INT_MAX, op, ": max_seqlen must be in [0, 2^31), got ", max_seqlen);
  return cu_seqlens.contiguous();
}

// dout, out like q; lse float32 of shape lse_shape; dq, dk, dv like q (any strides with a unit last one).
void check_bwd_args(const char* op, const at::Tensor& dout, const at::Tensor& out, const at::Tensor& lse,
                    at::IntArrayRef lse_shape, const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv,
                    const at::Tensor& q) {
  check_like_q(op, "dout", dout, q);
  check_like_q(op, "out", out, q);
  check_like_q(op, "dq", dq, q);
  check_like_q(op, "dk", dk, q);
  check_like_q(op, "dv", dv, q);
  TORCH_CHECK(lse.is_cuda(), op, ": lse must be a CUDA tensor, got one on ", lse.device());
  check_same_device(op, "lse", lse, q);
  TORCH_CHECK(lse.scalar_type() == at::kFloat, op, ": lse must be float32, got ", lse.scalar_type());
  check_shape(op, "lse", lse, lse_shape);
}

// What both layouts share: operands q, k, v (already readable), prefix, mask, heads (dim 1 of both)
// and scale.
AttentionSm80Params base_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& prefix, bool causal, double scale) {
  AttentionSm80Params p;
  p.q = operand(q);
  p.k = operand(k);
  p.v = operand(v);
  p.prefix = prefix.defined() ? prefix.data_ptr() : nullptr;
  p.prefix_int64 = prefix.defined() && prefix.scalar_type() == at::kLong;
  p.causal = causal;
  p.heads = static_cast<int>(q.size(1));
  p.scale = static_cast<float>(scale);
  return p;
}

// q, k, v (B, H, S, D); lse and delta (B, H, S).
AttentionSm80Params padded_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& prefix, bool causal, double scale) {
  AttentionSm80Params p = base_params(q, k, v, prefix, causal, scale);
  p.batch = static_cast<int>(q.size(0));
  p.seqlen = static_cast<int>(q.size(2));
  p.stats_batch_stride = q.size(1) * q.size(2);
  p.stats_head_stride = q.size(2);
  return p;
}

// q, k, v (T, H, D) of the sequences cu_seqlens (N + 1,) delimits; lse and delta (H, T).
AttentionSm80Params varlen_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& cu_seqlens, int64_t max_seqlen, const at::Tensor& prefix,
                                  bool causal, double scale) {
  AttentionSm80Params p = base_params(q, k, v, prefix, causal, scale);
  p.batch = static_cast<int>(cu_seqlens.size(0) - 1);
  p.seqlen = static_cast<int>(max_seqlen);
  p.cu_seqlens = cu_seqlens.data_ptr<int>();
  p.total_rows = static_cast<int>(q.size(0));
  p.stats_batch_stride = 1;
  p.stats_head_stride = q.size(0);
  return p;
}

// The poison hook (common.cuh) for gradient buffers the caller passes: they may be strided views into
// a larger buffer, so they are filled element by element (NaN) rather than memset as a byte range.
void poison_views(std::initializer_list<at::Tensor> views) {
  const char* flag = std::getenv("AIMV2_KERNELS_POISON_OUTPUTS");
  if (flag == nullptr || flag[0] != '1') return;
  for (const at::Tensor& t : views) {
    if (t.numel() > 0) t.fill_(std::numeric_limits<double>::quiet_NaN());
  }
}

// The forward into out (a view of memory the kernels can address) and lse (contiguous float32).
void run_forward(AttentionSm80Params p, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& q) {
  p.out = operand(out);
  p.lse = lse.data_ptr<float>();
  attention_sm80_fwd_launch(p, static_cast<int>(q.size(-1)), q.scalar_type() == at::kBFloat16,
                            at::cuda::getCurrentCUDAStream());
}

// The backward of both layouts: p holds q, k, v, the prefix and the shape. delta is allocated like lse;
// gradient buffers the kernels cannot address in place (see rows_ok) are computed into contiguous ones
// and copied.
void run_backward(AttentionSm80Params p, const at::Tensor& dout, const at::Tensor& out, const at::Tensor& lse,
                  const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv) {
  const at::Tensor delta = at::empty(lse.sizes(), lse.options());
  poison_outputs({delta});
  const at::Tensor dq_out = rows_ok(dq) ? dq : at::empty_like(dq, at::MemoryFormat::Contiguous);
  const at::Tensor dk_out = rows_ok(dk) ? dk : at::empty_like(dk, at::MemoryFormat::Contiguous);
  const at::Tensor dv_out = rows_ok(dv) ? dv : at::empty_like(dv, at::MemoryFormat::Contiguous);
  const at::Tensor douta = readable(dout), outa = readable(out);
  const at::Tensor lse_c = lse.contiguous();
  p.out = operand(outa);
  p.dout = operand(douta);
  p.dq = operand(dq_out);
  p.dk = operand(dk_out);
  p.dv = operand(dv_out);
  p.lse = lse_c.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  attention_sm80_bwd_launch(p, static_cast<int>(dq.size(-1)), dq.scalar_type() == at::kBFloat16,
                            at::cuda::getCurrentCUDAStream());
  if (!dq_out.is_same(dq)) dq.copy_(dq_out);
  if (!dk_out.is_same(dk)) dk.copy_(dk_out);
  if (!dv_out.is_same(dv)) dv.copy_(dv_out);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_fwd_sm80(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      const std::optional<at::Tensor>& prefix_len, bool causal,
                                                      double scale) {
  check_qkv(kFwdOp, kPaddedDims, q, k, v, scale);
  const at::Tensor prefix = check_prefix(kFwdOp, prefix_len, q.size(0), "B", q);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), H = q.size(1), S = q.size(2), D = q.size(3);
  // (B, H, S, D) view of (B, S, H, D) memory, as the reference backend returns it.
  at::Tensor out = at::empty({B, S, H, D}, q.options()).transpose(1, 2);
  at::Tensor lse = at::empty({B, H, S}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  poison_outputs({out, lse});  // out covers its whole allocation
  const at::Tensor qa = readable(q), ka = readable(k), va = readable(v);
  run_forward(padded_params(qa, ka, va, prefix, causal, scale), out, lse, q);
  return {out, lse};
}

void attention_bwd_sm80(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& prefix_len,
                        bool causal, double scale, const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv) {
  check_qkv(kBwdOp, kPaddedDims, q, k, v, scale);
  check_bwd_args(kBwdOp, dout, out, lse, {q.size(0), q.size(1), q.size(2)}, dq, dk, dv, q);
  const at::Tensor prefix = check_prefix(kBwdOp, prefix_len, q.size(0), "B", q);
  const c10::cuda::CUDAGuard guard(q.device());
  if (q.numel() == 0) return;
  poison_views({dq, dk, dv});
  const at::Tensor qa = readable(q), ka = readable(k), va = readable(v);
  run_backward(padded_params(qa, ka, va, prefix, causal, scale), dout, out, lse, dq, dk, dv);
}

std::tuple<at::Tensor, at::Tensor> attention_varlen_fwd_sm80(const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v, const at::Tensor& cu_seqlens,
                                                             int64_t max_seqlen,
                                                             const std::optional<at::Tensor>& prefix_len, bool causal,
                                                             double scale) {
  check_qkv(kVarlenFwdOp, kVarlenDims, q, k, v, scale);
  const at::Tensor cu = check_cu_seqlens(kVarlenFwdOp, cu_seqlens, max_seqlen, q);
  const at::Tensor prefix = check_prefix(kVarlenFwdOp, prefix_len, cu.size(0) - 1, "N", q);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2);
  at::Tensor out = at::empty({T, H, D}, q.options());
  at::Tensor lse = at::empty({H, T}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  poison_outputs({out, lse});
  if (cu.size(0) == 1 || max_seqlen == 0) return {out, lse};  // no sequence, or none with a row: no tile
  const at::Tensor qa = readable(q), ka = readable(k), va = readable(v);
  run_forward(varlen_params(qa, ka, va, cu, max_seqlen, prefix, causal, scale), out, lse, q);
  return {out, lse};
}

void attention_varlen_bwd_sm80(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_seqlens,
                               int64_t max_seqlen, const std::optional<at::Tensor>& prefix_len, bool causal,
                               double scale, const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv) {
  check_qkv(kVarlenBwdOp, kVarlenDims, q, k, v, scale);
  check_bwd_args(kVarlenBwdOp, dout, out, lse, {q.size(1), q.size(0)}, dq, dk, dv, q);
  const at::Tensor cu = check_cu_seqlens(kVarlenBwdOp, cu_seqlens, max_seqlen, q);
  const at::Tensor prefix = check_prefix(kVarlenBwdOp, prefix_len, cu.size(0) - 1, "N", q);
  const c10::cuda::CUDAGuard guard(q.device());
  if (q.numel() == 0) return;
  poison_views({dq, dk, dv});
  if (cu.size(0) == 1 || max_seqlen == 0) return;
  const at::Tensor qa = readable(q), ka = readable(k), va = readable(v);
  run_backward(varlen_params(qa, ka, va, cu, max_seqlen, prefix, causal, scale), dout, out, lse, dq, dk, dv);
}

}  // namespace aimv2
