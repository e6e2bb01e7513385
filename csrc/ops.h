// Host entry points of the csrc/ kernels, registered by bindings.cpp as aimv2_kernels::cuda_<name>.
// Each matches the "torch" implementation of the kernel of the same name in aimv2_kernels/ops/
// (arguments, output shapes and dtypes); outputs are contiguous.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace aimv2 {

// y (like x), rstd float32 x.shape[:-1]. weight (n,) or none, any supported float dtype.
std::tuple<at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                                double eps);

// (rms_norm(x + residual), x + residual, rstd): the pre-norm block's add-then-normalize. residual has
// x's dtype, or is a float32 stream under a float16/bfloat16 x: y comes back in x's dtype and the
// stream in the residual's.
std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_residual_fwd(const at::Tensor& x, const at::Tensor& residual,
                                                                     const std::optional<at::Tensor>& weight,
                                                                     double eps);

// (dx + dresidual, dweight in weight's dtype or an empty tensor without weight, dx in narrow_dtype or
// an empty tensor without it); dx and dresidual have x's dtype, dy x's or, when x is a float32 stream,
// float16/bfloat16 (y's dtype). dweight is summed deterministically (per-block partial sums, then a
// fixed-order tiled reduction over blocks). A narrow_dtype equal to dy's is written by the same pass.
std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& dy, const at::Tensor& x,
                                                            const std::optional<at::Tensor>& weight,
                                                            const at::Tensor& rstd,
                                                            const std::optional<at::Tensor>& dresidual,
                                                            std::optional<at::ScalarType> narrow_dtype);

// silu(gate) * up, and its gradients (dgate, dup).
at::Tensor swiglu_fwd(const at::Tensor& gate, const at::Tensor& up);
std::tuple<at::Tensor, at::Tensor> swiglu_bwd(const at::Tensor& dout, const at::Tensor& gate, const at::Tensor& up);

// x (..., 2H): gate x[..., :H], up x[..., H:]; the backward returns d x (..., 2H).
at::Tensor swiglu_packed_fwd(const at::Tensor& x);
at::Tensor swiglu_packed_bwd(const at::Tensor& dout, const at::Tensor& x);

// Mean over counted patches of the per-patch MSE of pred (B, N, P) against the (norm-pix) target;
// mask bool (B, N) or none. A float32 scalar; the backward returns d pred (like pred).
at::Tensor patch_mse_fwd(const at::Tensor& pred, const at::Tensor& target, const std::optional<at::Tensor>& mask,
                         bool norm_pix, double eps);
at::Tensor patch_mse_bwd(const at::Tensor& dloss, const at::Tensor& pred, const at::Tensor& target,
                         const std::optional<at::Tensor>& mask, bool norm_pix, double eps);

// The rows of one chunk of the linear cross-entropy (contract: ce_rows_torch in
// aimv2_kernels/linear_ce_chunks.py): logits float32 (c, V) with unit column stride; bias (V,) or
// none, any supported float dtype, any stride; labels (c,) int64/int32, any stride; scale a float32
// scalar on the device. Writes loss_out (c,) float32 and, when given, dlogits_out (c, V) in a
// supported float dtype, which may be logits itself (in place). Returns nothing; no host sync.
void ce_rows(const at::Tensor& logits, const std::optional<at::Tensor>& bias, const at::Tensor& labels,
             int64_t ignore_index, const at::Tensor& scale, const at::Tensor& loss_out,
             const std::optional<at::Tensor>& dlogits_out);

// Prefix-causal attention on sm_90 (csrc/attention_sm90.cu, sm_90a device code): q, k, v (B, H, S, D)
// bf16/fp16, D 64 or 128, unit last stride, other strides multiples of 16 bytes (TMA), 16-byte
// aligned data; prefix_len (B,) int32/int64 on the device or none. Returns (out, lse): out a
// (B, H, S, D) view of (B, S, H, D) memory, lse (B, H, S) float32 (natural log). Raises on another GPU
// or a build without sm_90a code.
std::tuple<at::Tensor, at::Tensor> attention_fwd_sm90(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      const std::optional<at::Tensor>& prefix_len, bool causal,
                                                      double scale);
// Its backward into dq, dk, dv (like q: unit last stride, rows on 16-byte boundaries). deterministic:
// the same bits every run (a dQ kernel and a dK/dV kernel, 7 GEMMs per tile pair); otherwise 5 GEMMs
// per tile pair, dQ summed by float32 atomics in the dK/dV kernel (its last bits may vary run to run).
void attention_bwd_sm90(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& prefix_len,
                        bool causal, double scale, const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv,
                        bool deterministic);
// Varlen: packed sequences q, k, v (T, H, D), sample b the rows [cu_seqlens[b], cu_seqlens[b + 1])
// (int32 (N + 1,) on the device, N <= 65535), at most max_seqlen rows each, prefix_len (N,) or none.
// Returns out (T, H, D) and lse (H, T) float32; the backward writes dq, dk, dv (T, H, D, rows on
// 16-byte boundaries: views of a packed (T, 3, H, D) buffer qualify).
std::tuple<at::Tensor, at::Tensor> attention_varlen_fwd_sm90(const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v, const at::Tensor& cu_seqlens,
                                                             int64_t max_seqlen,
                                                             const std::optional<at::Tensor>& prefix_len, bool causal,
                                                             double scale);
void attention_varlen_bwd_sm90(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_seqlens,
                               int64_t max_seqlen, const std::optional<at::Tensor>& prefix_len, bool causal,
                               double scale, const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv,
                               bool deterministic);

// Prefix-causal attention on sm_80 and newer (csrc/attention_sm80.cu: mma.sync, cp.async, ldmatrix):
// the contract of attention_fwd / attention_bwd in aimv2_kernels/ops/attention.py. q, k, v (B, H, S, D)
// bf16/fp16, D 64 or 128, unit last stride, any other strides (inputs whose rows are not on 16-byte
// boundaries are copied first); prefix_len (B,) int32/int64 on the device or none, read on the device.
// Returns (out, lse): out a (B, H, S, D) view of (B, S, H, D) memory, lse (B, H, S) float32.
std::tuple<at::Tensor, at::Tensor> attention_fwd_sm80(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      const std::optional<at::Tensor>& prefix_len, bool causal,
                                                      double scale);
// Whether the library has device code for the card `device` (the sm_80 kernels run on sm_80 and newer,
// but only on cards an image was built for).
bool attention_sm80_has_code(int64_t device);
// Its backward into dq, dk, dv (any strides with a unit last stride, e.g. views of one packed buffer);
// deterministic (no atomics): a delta preprocess, a dK/dV kernel and a dQ kernel.
void attention_bwd_sm80(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& prefix_len,
                        bool causal, double scale, const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv);
// Varlen (the contract of attention_varlen_fwd / attention_varlen_bwd in
// aimv2_kernels/ops/attention_varlen.py): packed sequences q, k, v (T, H, D), as above but for the
// shape; sample b the rows [cu_seqlens[b], cu_seqlens[b + 1]) (int32 (N + 1,) on the device, read
// there), at most max_seqlen rows each, prefix_len (N,) int32/int64 or none. Returns out (T, H, D)
// contiguous and lse (H, T) float32; the backward writes dq, dk, dv (T, H, D) (any strides with a unit
// last stride: views of a packed (T, 3, H, D) buffer qualify). One launch per kernel for all sequences.
std::tuple<at::Tensor, at::Tensor> attention_varlen_fwd_sm80(const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v, const at::Tensor& cu_seqlens,
                                                             int64_t max_seqlen,
                                                             const std::optional<at::Tensor>& prefix_len, bool causal,
                                                             double scale);
void attention_varlen_bwd_sm80(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_seqlens,
                               int64_t max_seqlen, const std::optional<at::Tensor>& prefix_len, bool causal,
                               double scale, const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv);

}  // namespace aimv2
