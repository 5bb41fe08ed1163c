"""Canonical reference ops, registered as ``torch.ops.auto_deploy.<name>`` on import.

One module per category; see OPS.md for the contract. Importing this package registers every op
(ops that another stack registered first are left as they are).
"""

from onboardlm.ops import (  # noqa: F401
    attention,
    key_bias_attention,
    linear,
    mla,
    moe,
    norm,
    quantization,
    rope,
    sharding,
    sparse_attention,
    ssm,
)
from onboardlm.ops._library import DECLARED_OPS, get_op, op_is_registered
from onboardlm.ops.moe import ActivationType

__all__ = ["DECLARED_OPS", "ActivationType", "get_op", "op_is_registered"]
