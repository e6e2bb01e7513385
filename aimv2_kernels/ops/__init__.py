"""The custom-op layer: one `torch.library` op per public function, namespace `aimv2_kernels`.

Each file defines, for one op family: the custom ops (forward and backward as separate ops, so both
appear as single nodes under torch.compile), their fake kernels, the registered autograd, the "torch"
backend implementations (reference forward, analytic backward), and the functional API that validates
inputs and calls the op. The op bodies dispatch through `aimv2_kernels.backend.resolve`.
"""
