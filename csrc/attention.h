// Declarations shared by the attention kernels of csrc/: the sm_80 path (attention_sm80.cu) and the
// Hopper path (attention_sm90.cu). The host entries (the registered ops) are declared in ops.h.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace aimv2 {

// ---- sm_80 path (csrc/attention_sm80.cu): mma.sync tensor cores, cp.async, ldmatrix -------------

// One (B, H, S, D) tensor as the sm_80 kernels see it: element strides of the batch, head and row
// (sequence) dims; the last dim is contiguous. Rows must start on 16-byte boundaries (the host entry
// copies inputs that do not, and stages outputs that do not through a contiguous buffer). A varlen
// (T, H, D) tensor has batch_stride = row_stride: its "batch index" is a sequence's first token.
struct AttentionSm80Operand {
  void* data = nullptr;
  int64_t batch_stride = 0;
  int64_t head_stride = 0;
  int64_t row_stride = 0;
};

// Everything the sm_80 forward and backward kernels read. The forward uses q, k, v, out, lse; the
// backward all of them (out and lse as inputs, delta as scratch).
//
// Varlen mode (cu_seqlens set): packed sequences, q, k, v, out, dout, dq, dk, dv (T, H, D) and lse,
// delta (H, T). Sample b is the rows [cu_seqlens[b], cu_seqlens[b + 1]); batch is the number of
// sequences N and seqlen the longest (max_seqlen: it only sizes the grid).
struct AttentionSm80Params {
  AttentionSm80Operand q, k, v;
  AttentionSm80Operand out;             // forward output / backward input, (B, H, S, D)
  AttentionSm80Operand dout, dq, dk, dv;  // backward only
  float* lse = nullptr;                 // (B, H, S) fp32, natural log; varlen (H, T)
  float* delta = nullptr;               // backward scratch like lse: rowsum(dout * out)
  // lse and delta of (batch index, head) start at batch index * stats_batch_stride + head *
  // stats_head_stride: (H * S, S) padded, (1, T) varlen (the batch index being the first token).
  int64_t stats_batch_stride = 0;
  int64_t stats_head_stride = 0;
  const void* prefix = nullptr;         // (B,) int32 or int64 on the device, or null (plain causal)
  bool prefix_int64 = false;
  bool causal = true;                   // false: every key visible (prefix ignored)
  int batch = 0, heads = 0, seqlen = 0;
  const int* cu_seqlens = nullptr;      // varlen: (N + 1,) int32 row offsets on the device; null: padded
  int total_rows = 0;                   // varlen: T
  float scale = 1.f;                    // softmax scale (applied to q k^T)
};

// Launch the sm_80 kernels on `stream` for bf16 (else fp16) operands with head dim 64 or 128; the
// arguments are checked by the host entries (ops.h), not here.
void attention_sm80_fwd_launch(const AttentionSm80Params& params, int head_dim, bool bf16, cudaStream_t stream);
void attention_sm80_bwd_launch(const AttentionSm80Params& params, int head_dim, bool bf16, cudaStream_t stream);

// ---- sm_90a path (csrc/attention_sm90.cu): wgmma, TMA, mbarrier pipelines, warp specialization ----

// True when `device` is an sm_90 GPU (H100/H200) and this build carries sm_90a device code for the
// Hopper kernels (a build for plain "9.0" does not: wgmma and setmaxnreg need the arch-specific
// target). The first call per device reads a flag from device memory (synchronous, once).
bool attention_sm90_supported(int device);

}  // namespace aimv2
