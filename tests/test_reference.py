"""The references against hand-worked cases and their defining formulas."""
import math

import torch
import torch.nn.functional as F

from aimv2_kernels import reference as ref


def test_prefix_visibility_matrix_prefix_2_of_5():
    # Query i sees key j iff j <= i or j < 2: rows 0 and 1 see keys 0 and 1 (bidirectional prefix).
    expected = torch.tensor(
        [
            [1, 1, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0],
            [1, 1, 1, 1, 0],
            [1, 1, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    got = ref.prefix_visibility(5, torch.tensor([2]))[0]
    assert torch.equal(got, expected)


def test_prefix_visibility_edge_values():
    causal = torch.ones(4, 4, dtype=torch.bool).tril()
    assert torch.equal(ref.prefix_visibility(4, torch.tensor([0]))[0], causal)
    assert torch.equal(ref.prefix_visibility(4, torch.tensor([1]))[0], causal)  # key 0 is always visible
    assert ref.prefix_visibility(4, torch.tensor([4]))[0].all()
    assert ref.prefix_visibility(4, torch.tensor([9]))[0].all()
    assert ref.prefix_visibility(4, None, causal=False)[0].all()


def test_attention_matches_softmax_with_dense_mask():
    q, k, v = torch.randn(3, 2, 3, 7, 16, dtype=torch.float64).unbind(0)
    prefix = torch.tensor([3, 0])
    got = ref.prefix_causal_attention(q, k, v, prefix)
    mask = ref.prefix_visibility(7, prefix).unsqueeze(1)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(got, expected)


def test_patch_loss_by_hand_two_patches():
    # Two patches of P=3; targets normalized per patch with the unbiased variance.
    target = torch.tensor([[[1.0, 2.0, 3.0], [2.0, 2.0, 5.0]]], dtype=torch.float64)
    pred = torch.tensor([[[0.0, 0.0, 0.0], [1.0, -1.0, 0.5]]], dtype=torch.float64)
    # patch 0: mean 2, unbiased var 1 -> t = (-1, 0, 1)/sqrt(1 + 1e-6); mse = 2/3 / (1 + 1e-6)
    mse0 = (2.0 / 3.0) / (1 + 1e-6)
    # patch 1: mean 3, unbiased var ((1 + 1 + 4) / 2) = 3 -> t = (-1, -1, 2)/sqrt(3 + 1e-6)
    t1 = torch.tensor([-1.0, -1.0, 2.0], dtype=torch.float64) / math.sqrt(3 + 1e-6)
    mse1 = float(((pred[0, 1] - t1) ** 2).mean())
    both = ref.patch_mse_loss(pred, target)
    assert math.isclose(float(both), (mse0 + mse1) / 2, rel_tol=1e-12)
    only_second = ref.patch_mse_loss(pred, target, torch.tensor([[False, True]]))
    assert math.isclose(float(only_second), mse1, rel_tol=1e-12)
    raw = ref.patch_mse_loss(pred, target, norm_pix=False)
    assert math.isclose(float(raw), float(((pred - target) ** 2).mean()), rel_tol=1e-12)


def test_patch_loss_is_a_token_mean_over_the_batch():
    pred, target = torch.randn(2, 2, 4, 6, dtype=torch.float64).unbind(0)
    mask = torch.tensor([[True, False, False, False], [True, True, True, False]])
    per_patch = ((pred - ref.normalize_patches(target)) ** 2).mean(-1)
    expected = per_patch[mask].sum() / 4  # 4 counted patches in the batch, not a per-sample mean
    torch.testing.assert_close(ref.patch_mse_loss(pred, target, mask), expected)


def test_linear_cross_entropy_matches_materialized_logits():
    hidden = torch.randn(2, 5, 8, dtype=torch.float64)
    weight = torch.randn(11, 8, dtype=torch.float64)
    bias = torch.randn(11, dtype=torch.float64)
    labels = torch.randint(0, 11, (2, 5))
    labels[0, 1] = -100
    logits = hidden @ weight.t() + bias
    expected = F.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(ref.linear_cross_entropy(hidden, weight, labels, bias), expected)


def test_rms_norm_and_swiglu_formulas():
    x = torch.randn(3, 5, dtype=torch.float64)
    w = torch.randn(5, dtype=torch.float64)
    torch.testing.assert_close(ref.rms_norm(x, w), x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * w)
    g, u = torch.randn(2, 4, 6, dtype=torch.float64).unbind(0)
    torch.testing.assert_close(ref.swiglu(g, u), g * torch.sigmoid(g) * u)
    torch.testing.assert_close(ref.swiglu_packed(torch.cat([g, u], -1)), ref.swiglu(g, u))
    y, stream = ref.rms_norm_residual(x, x.flip(0), w)
    torch.testing.assert_close(stream, x + x.flip(0))
    torch.testing.assert_close(y, ref.rms_norm(x + x.flip(0), w))


def test_reference_gradients_float64():
    # The references themselves are differentiable definitions; check them numerically.
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: ref.rms_norm(a, b), (x, w))
    q, k, v = (torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    prefix = torch.tensor([2])
    assert torch.autograd.gradcheck(lambda a, b, c: ref.prefix_causal_attention(a, b, c, prefix), (q, k, v))
    pred = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    target = torch.randn(2, 3, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda p: ref.patch_mse_loss(p, target), (pred,))
    h = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    wt = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 4, -100, 2])
    assert torch.autograd.gradcheck(lambda a, b: ref.linear_cross_entropy(a, b, labels), (h, wt))
