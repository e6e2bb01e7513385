"""Bad input gets an error naming the argument, the value and what was expected."""
import pytest
import torch

import aimv2_kernels as ak


def _qkv(B=2, H=2, S=5, D=16, dtype=torch.float32):
    return torch.randn(3, B, H, S, D, dtype=dtype).unbind(0)


@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda: ak.rms_norm(torch.randint(0, 3, (2, 4))), TypeError, ["x", "dtype", "int64"]),
        (lambda: ak.rms_norm(torch.randn(2, 4), torch.randn(5)), ValueError, ["weight", "(4,)", "(5,)"]),
        (lambda: ak.rms_norm(torch.randn(2, 4), eps=-1.0), ValueError, ["eps", "-1.0"]),
        (lambda: ak.rms_norm(torch.randn(2, 4), torch.randn(4, device="meta")), ValueError, ["weight", "meta", "cpu"]),
        (lambda: ak.rms_norm_residual(torch.randn(2, 4), torch.randn(2, 5)), ValueError, ["residual", "(2, 5)"]),
        (lambda: ak.swiglu(torch.randn(2, 4), torch.randn(2, 4, dtype=torch.float64)), TypeError, ["up", "float64"]),
        (lambda: ak.swiglu_packed(torch.randn(2, 5)), ValueError, ["x", "even", "(2, 5)"]),
        (lambda: ak.prefix_causal_attention(*_qkv(D=24)), ValueError, ["head dim", "24", "128"]),
        (lambda: ak.prefix_causal_attention(*_qkv(), -1), ValueError, ["prefix_len", "-1"]),
        (lambda: ak.prefix_causal_attention(*_qkv(), torch.tensor([1, -2])), ValueError, ["prefix_len", "-2"]),
        (lambda: ak.prefix_causal_attention(*_qkv(), torch.tensor([1, 2, 3])), ValueError, ["prefix_len", "(2,)", "(3,)"]),
        (lambda: ak.prefix_causal_attention(*_qkv(), torch.tensor([1.0, 2.0])), TypeError, ["prefix_len", "float32"]),
        (lambda: ak.prefix_causal_attention(*_qkv(), 2.5), TypeError, ["prefix_len", "float"]),
        (lambda: ak.prefix_causal_attention(_qkv()[0], _qkv(S=6)[1], _qkv()[2]), ValueError, ["k", "(2, 2, 6, 16)"]),
        (lambda: ak.prefix_causal_attention(_qkv()[0][..., :1, :, :], *_qkv()[1:]), ValueError, ["k", "shape"]),
        (lambda: ak.prefix_causal_attention(*(t.transpose(-1, -2) for t in _qkv(S=16))), ValueError, ["q", "contiguous last"]),
        (lambda: ak.prefix_causal_attention(torch.randn(2, 5, 16), *_qkv()[1:]), ValueError, ["q", "4 dimensions"]),
        (lambda: ak.patch_mse_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 5)), ValueError, ["target", "(2, 3, 5)"]),
        (lambda: ak.patch_mse_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.ones(2, 3)), TypeError, ["mask", "bool"]),
        (lambda: ak.patch_mse_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.ones(3, 2, dtype=torch.bool)), ValueError, ["mask", "(3, 2)"]),
        (lambda: ak.linear_cross_entropy(torch.randn(4, 3), torch.randn(6, 5), torch.zeros(4, dtype=torch.long)), ValueError, ["weight", "(6, 5)"]),
        (lambda: ak.linear_cross_entropy(torch.randn(4, 3), torch.randn(6, 3), torch.zeros(4)), TypeError, ["labels", "float32"]),
        (lambda: ak.linear_cross_entropy(torch.randn(4, 3), torch.randn(6, 3), torch.zeros(5, dtype=torch.long)), ValueError, ["labels", "(5,)"]),
        (lambda: ak.set_backend("cudnn"), ValueError, ["backend", "cudnn"]),
    ],
)
def test_bad_input_is_named(call, error, words):
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} missing from: {message}"
