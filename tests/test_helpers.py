"""The comparison helper itself: a check is only a check once a wrong answer has made it fail."""
import pytest
import torch

from tests.helpers import assert_close, rel_err


def test_one_wrong_row_fails_although_the_norm_passes():
    expected = torch.randn(4096, 64, dtype=torch.float64)
    actual = expected.clone()
    actual[1234] *= 1.5  # one row half again too large: a missed rescale, a wrong tile
    tol = 1e-2
    assert rel_err(actual, expected) < tol, "the norm alone must not see this row"
    with pytest.raises(AssertionError, match=r"element \(1234, \d+\)"):
        assert_close(actual, expected, tol, "one wrong row")


def test_one_zeroed_row_of_a_float32_tensor_fails():
    expected = torch.randn(20000, 32)
    actual = expected.clone()
    actual[-1] = 0  # an unwritten last row block read back as zeros
    assert rel_err(actual, expected) < 1e-2
    with pytest.raises(AssertionError, match="element"):
        assert_close(actual, expected, 1e-2, "zeroed row")


def test_rounding_noise_passes():
    expected = torch.randn(512, 256, dtype=torch.float64)
    assert_close(expected.float(), expected, 1e-5, "fp32 rounding")
    assert_close(expected.bfloat16(), expected, 1e-2, "bf16 rounding")
    assert_close(expected.half(), expected, 2e-3, "fp16 rounding")


def test_non_finite_and_shape_mismatch_fail():
    expected = torch.randn(8, 8)
    bad = expected.clone()
    bad[3, 3] = float("nan")
    with pytest.raises(AssertionError, match="non-finite"):
        assert_close(bad, expected, 1e-2)
    with pytest.raises(AssertionError, match="shape"):
        assert_close(expected[:4], expected, 1e-2)


def test_empty_and_scalar_tensors():
    assert_close(torch.empty(0, 3), torch.empty(0, 3), 1e-5)
    assert_close(torch.tensor(2.0), torch.tensor(2.0, dtype=torch.float64), 1e-5)
    with pytest.raises(AssertionError):
        assert_close(torch.tensor(2.1), torch.tensor(2.0, dtype=torch.float64), 1e-5)
