"""Helpers for equivalence tests: RMSE comparison, tiny configs, HF -> lean weight transfer."""

from onboardlm.testing.metrics import assert_rmse_close, rmse_ratio
from onboardlm.testing.random_init import randomize_constant_tensors, unit_embeddings
from onboardlm.testing.tiny_config import tiny_config
from onboardlm.testing.transfer import transfer_weights

__all__ = [
    "assert_rmse_close",
    "randomize_constant_tensors",
    "rmse_ratio",
    "tiny_config",
    "transfer_weights",
    "unit_embeddings",
]
