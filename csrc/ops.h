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

// (dx + dresidual, dweight in weight's dtype or an empty tensor without weight); dx and dresidual have
// x's dtype, dy x's or, when x is a float32 stream, float16/bfloat16 (y's dtype). dweight is summed
// deterministically (per-block partial sums, then a fixed-order reduction over blocks).
std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& dy, const at::Tensor& x,
                                                const std::optional<at::Tensor>& weight, const at::Tensor& rstd,
                                                const std::optional<at::Tensor>& dresidual);

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

}  // namespace aimv2
