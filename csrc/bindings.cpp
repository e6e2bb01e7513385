// Registers the csrc/ kernels as the ops aimv2_kernels::cuda_<kernel>, implemented for CUDA tensors.
//
// They are backend-specific ops, not the public ones: the public custom ops (aimv2_kernels::rms_norm,
// ...) are defined in Python (aimv2_kernels/ops/) and ask the backend registry for an implementation;
// aimv2_kernels/cuda_backend/kernels.py registers these ops there, and holds their fake (meta) kernels.
// Loading the library (as the module aimv2_kernels._C, or through the first-use build) registers them.
#include <Python.h>
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY_FRAGMENT(aimv2_kernels, m) {
  m.set_python_module("aimv2_kernels.cuda_backend.kernels");
  m.def("cuda_rms_norm_fwd(Tensor x, Tensor? weight, float eps) -> (Tensor, Tensor)");
  m.def("cuda_rms_norm_residual_fwd(Tensor x, Tensor residual, Tensor? weight, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("cuda_rms_norm_bwd(Tensor dy, Tensor x, Tensor? weight, Tensor rstd, Tensor? dresidual, "
        "ScalarType? narrow_dtype=None) -> (Tensor, Tensor, Tensor)");
  m.def("cuda_swiglu_fwd(Tensor gate, Tensor up) -> Tensor");
  m.def("cuda_swiglu_bwd(Tensor dout, Tensor gate, Tensor up) -> (Tensor, Tensor)");
  m.def("cuda_swiglu_packed_fwd(Tensor x) -> Tensor");
  m.def("cuda_swiglu_packed_bwd(Tensor dout, Tensor x) -> Tensor");
  m.def("cuda_patch_mse_fwd(Tensor pred, Tensor target, Tensor? mask, bool norm_pix, float eps) -> Tensor");
  m.def("cuda_patch_mse_bwd(Tensor dloss, Tensor pred, Tensor target, Tensor? mask, bool norm_pix, float eps) -> Tensor");
  // Mutates its outputs in place and returns nothing (the `rows` of the linear-CE chunk driver).
  // logits is declared written too: dlogits_out may be logits itself.
  m.def("cuda_ce_rows(Tensor(a!) logits, Tensor? bias, Tensor labels, int ignore_index, Tensor scale, "
        "Tensor(b!) loss_out, Tensor(c!)? dlogits_out) -> ()");
  // Hopper attention (csrc/attention_sm90.cu); raise on other GPUs and on builds without sm_90a code.
  m.def("cuda_attention_fwd_sm90(Tensor q, Tensor k, Tensor v, Tensor? prefix_len, bool causal, float scale) "
        "-> (Tensor, Tensor)");
  m.def("cuda_attention_bwd_sm90(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor? prefix_len, bool causal, float scale, Tensor(a!) dq, Tensor(b!) dk, Tensor(c!) dv, "
        "bool deterministic=True) -> ()");
  m.def("cuda_attention_varlen_fwd_sm90(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, int max_seqlen, "
        "Tensor? prefix_len, bool causal, float scale) -> (Tensor, Tensor)");
  m.def("cuda_attention_varlen_bwd_sm90(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor cu_seqlens, int max_seqlen, Tensor? prefix_len, bool causal, float scale, Tensor(a!) dq, "
        "Tensor(b!) dk, Tensor(c!) dv, bool deterministic=True) -> ()");
  // sm_80 attention (csrc/attention_sm80.cu): mma.sync tiles, runs on sm_80 and newer.
  m.def("cuda_attention_fwd_sm80(Tensor q, Tensor k, Tensor v, Tensor? prefix_len, bool causal, float scale) "
        "-> (Tensor, Tensor)");
  m.def("cuda_attention_bwd_sm80(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor? prefix_len, bool causal, float scale, Tensor(a!) dq, Tensor(b!) dk, Tensor(c!) dv) -> ()");
  m.def("cuda_attention_varlen_fwd_sm80(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, int max_seqlen, "
        "Tensor? prefix_len, bool causal, float scale) -> (Tensor, Tensor)");
  m.def("cuda_attention_varlen_bwd_sm80(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor cu_seqlens, int max_seqlen, Tensor? prefix_len, bool causal, float scale, Tensor(a!) dq, "
        "Tensor(b!) dk, Tensor(c!) dv) -> ()");
  // No tensor argument to dispatch on: one kernel for every dispatch key.
  m.def("cuda_attention_sm80_has_code(int device) -> bool", &aimv2::attention_sm80_has_code);
}

TORCH_LIBRARY_IMPL(aimv2_kernels, CUDA, m) {
  m.impl("cuda_rms_norm_fwd", &aimv2::rms_norm_fwd);
  m.impl("cuda_rms_norm_residual_fwd", &aimv2::rms_norm_residual_fwd);
  m.impl("cuda_rms_norm_bwd", &aimv2::rms_norm_bwd);
  m.impl("cuda_swiglu_fwd", &aimv2::swiglu_fwd);
  m.impl("cuda_swiglu_bwd", &aimv2::swiglu_bwd);
  m.impl("cuda_swiglu_packed_fwd", &aimv2::swiglu_packed_fwd);
  m.impl("cuda_swiglu_packed_bwd", &aimv2::swiglu_packed_bwd);
  m.impl("cuda_patch_mse_fwd", &aimv2::patch_mse_fwd);
  m.impl("cuda_patch_mse_bwd", &aimv2::patch_mse_bwd);
  m.impl("cuda_ce_rows", &aimv2::ce_rows);
  m.impl("cuda_attention_fwd_sm90", &aimv2::attention_fwd_sm90);
  m.impl("cuda_attention_bwd_sm90", &aimv2::attention_bwd_sm90);
  m.impl("cuda_attention_varlen_fwd_sm90", &aimv2::attention_varlen_fwd_sm90);
  m.impl("cuda_attention_varlen_bwd_sm90", &aimv2::attention_varlen_bwd_sm90);
  m.impl("cuda_attention_fwd_sm80", &aimv2::attention_fwd_sm80);
  m.impl("cuda_attention_bwd_sm80", &aimv2::attention_bwd_sm80);
  m.impl("cuda_attention_varlen_fwd_sm80", &aimv2::attention_varlen_fwd_sm80);
  m.impl("cuda_attention_varlen_bwd_sm80", &aimv2::attention_varlen_bwd_sm80);
}

// An empty Python module, so that `import aimv2_kernels._C` loads the library (and registers the ops
// above). The name follows TORCH_EXTENSION_NAME, which the build sets (_C, or the first-use build's).
#define AIMV2_CONCAT_(a, b) a##b
#define AIMV2_CONCAT(a, b) AIMV2_CONCAT_(a, b)
#define AIMV2_STR_(a) #a
#define AIMV2_STR(a) AIMV2_STR_(a)

PyMODINIT_FUNC AIMV2_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, AIMV2_STR(TORCH_EXTENSION_NAME), nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
