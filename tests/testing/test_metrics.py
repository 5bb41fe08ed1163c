import pytest
import torch

from onboardlm.testing import assert_rmse_close, rmse_ratio


def test_ratio_is_relative_l2_error_in_fp32() -> None:
    expected = torch.tensor([3.0, 4.0], dtype=torch.bfloat16)
    actual = torch.tensor([3.0, 4.5], dtype=torch.bfloat16)
    assert rmse_ratio(actual, expected) == pytest.approx(0.5 / 5.0)


def test_passes_within_tolerance_despite_one_outlier() -> None:
    expected = torch.ones(1000)
    actual = expected.clone()
    actual[0] = 2.0  # one element off by 100 %; element-wise checks would fail
    assert_rmse_close(actual, expected, rmse_ratio_tol=0.05)


def test_failure_message_names_ratio_and_both_norms() -> None:
    with pytest.raises(
        AssertionError,
        match=r"layer 3: RMSE ratio 1\.000e-01 > tolerance 5\.000e-02.*‖expected‖=1\.0000e\+01",
    ):
        assert_rmse_close(torch.full((4,), 5.5), torch.full((4,), 5.0), 0.05, msg="layer 3")


def test_shape_mismatch_and_nan_fail() -> None:
    with pytest.raises(AssertionError, match="shape"):
        assert_rmse_close(torch.zeros(2, 3), torch.zeros(3, 2), 1.0)
    with pytest.raises(AssertionError, match="non-finite"):
        assert_rmse_close(torch.tensor([float("nan")]), torch.tensor([1.0]), 1.0)


def test_zero_reference() -> None:
    assert_rmse_close(torch.zeros(3), torch.zeros(3), 0.0)
    with pytest.raises(AssertionError):
        assert_rmse_close(torch.ones(3), torch.zeros(3), 10.0)
