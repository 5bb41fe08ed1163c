"""Elementwise fusion: each small reference op of the graph becomes one compiled kernel.

Between the matmuls, the reference ops run as chains of small kernels (an RMSNorm is about eight:
upcast, square, mean, add, rsqrt, two multiplies, downcast). This pass points the graph's RMSNorm and
RoPE nodes, every ``silu(gate) * up`` pair and every residual add feeding an RMSNorm (the add and the
norm become one kernel that returns both the sum and its norm) at functions that ``torch.compile``
turns into one fused kernel each. Only these small functions are compiled (dynamic shapes, a few seconds each, shared
by all layers), not the whole graph. The functions compute the reference formulas; with
``compile=False`` (the CPU path) they run eagerly, which is how the rewrite is tested off the GPU.
"""

from __future__ import annotations

import functools
import logging
import operator
from collections.abc import Callable
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F
from torch._library.custom_ops import OPDEFS
from torch.fx import GraphModule, Node

from onboardlm.ops._library import NAMESPACE, op_targets
from onboardlm.ops.norm import torch_rmsnorm
from onboardlm.transforms.dump import dumps_graph

logger = logging.getLogger(__name__)

#: Reference ops replaced by a compiled copy of their own implementation.
FUSED_OPS = ("torch_rmsnorm", "torch_rope_with_explicit_cos_sin")


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``: the gated MLP's activation."""
    return F.silu(gate) * up


def _implementation(name: str) -> Callable[..., Any]:
    return OPDEFS[f"{NAMESPACE}::{name}"]._init_fn


#: The reference RMSNorm's Python implementation (resolved here: dynamo cannot trace the registry lookup).
_rmsnorm = torch_rmsnorm._init_fn


def add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x + residual, torch_rmsnorm(x + residual))``: a residual add and the norm that follows it."""
    total = x + residual
    return total, _rmsnorm(total, weight, eps)


#: Compiled variants allowed per fused function. One function serves every layer of every graph in
#: the process (hidden sizes, q/k-norm head dims, ranks, dtypes); dynamo's default of 8 is reached by a
#: process that runs a few models, after which the function would fall back to eager for good.
RECOMPILE_LIMIT = 64


@cache
def _compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` compiled on first call; if compiling fails, ``fn`` itself from then on (with a warning)."""
    dynamo_config = torch._dynamo.config
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
    compiled = torch.compile(fn, dynamic=True, fullgraph=True)
    failures: list[Exception] = []

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        if not failures:
            try:
                return compiled(*args, **kwargs)
            except Exception as error:  # noqa: BLE001  (a compiler failure must not stop inference)
                failures.append(error)
                logger.warning("torch.compile of %s failed, running it eagerly: %s", fn.__name__, error)
        return fn(*args, **kwargs)

    return run


def _fused_op_name(node: Node) -> str | None:
    """The name of the reference op ``node`` calls (op overload or its Python implementation)."""
    if node.op != "call_function":
        return None
    for name in FUSED_OPS:
        if node.target in op_targets(name):
            return name
    return None


def _silu_mul_pairs(gm: GraphModule) -> list[tuple[Node, Node]]:
    """``(silu, mul)`` node pairs where ``mul`` multiplies the only use of ``silu`` by another tensor."""
    pairs = []
    for node in gm.graph.nodes:
        is_silu = node.op == "call_function" and node.target in (torch.ops.aten.silu.default, F.silu)
        if not is_silu or len(node.users) != 1:
            continue
        (user,) = node.users
        if user.target == torch.ops.aten.mul.Tensor and len(user.args) == 2 and not user.kwargs:
            pairs.append((node, user))
    return pairs


def _add_rmsnorm_pairs(gm: GraphModule) -> list[tuple[Node, Node]]:
    """``(add, norm)`` pairs: a ``torch_rmsnorm`` node whose input is a plain two-tensor add."""
    pairs = []
    for node in gm.graph.nodes:
        if _fused_op_name(node) != "torch_rmsnorm" or node.kwargs:
            continue
        add = node.args[0]
        if (
            isinstance(add, Node)
            and add.target == torch.ops.aten.add.Tensor
            and len(add.args) == 2
            and not add.kwargs
            and all(isinstance(arg, Node) for arg in add.args)
        ):
            pairs.append((add, node))
    return pairs


def _fuse_add_rmsnorm(gm: GraphModule, wrap: Callable[..., Any]) -> int:
    pairs = _add_rmsnorm_pairs(gm)
    for add, norm in pairs:
        with gm.graph.inserting_before(norm):
            fused = gm.graph.call_function(wrap(add_rmsnorm), (*add.args, *norm.args[1:]))
            total = gm.graph.call_function(operator.getitem, (fused, 0))
            normed = gm.graph.call_function(operator.getitem, (fused, 1))
        total.meta, normed.meta = dict(add.meta), dict(norm.meta)
        norm.replace_all_uses_with(normed)
        add.replace_all_uses_with(total)
        gm.graph.erase_node(norm)
        gm.graph.erase_node(add)
    return len(pairs)


@dumps_graph
def fuse_elementwise(gm: GraphModule, compile: bool = True) -> int:
    """Rewrite ``gm`` in place as described above; returns the number of fused calls made."""
    wrap = _compiled if compile else (lambda fn: fn)
    changed = _fuse_add_rmsnorm(gm, wrap)
    for node in list(gm.graph.nodes):
        name = _fused_op_name(node)
        if name is not None:
            node.target = wrap(_implementation(name))
            changed += 1
    for silu, mul in _silu_mul_pairs(gm):
        up = mul.args[1] if mul.args[0] is silu else mul.args[0]
        with gm.graph.inserting_before(mul):
            fused = gm.graph.call_function(wrap(silu_mul), (silu.args[0], up))
        fused.meta = dict(mul.meta)
        mul.replace_all_uses_with(fused)
        gm.graph.erase_node(mul)
        gm.graph.erase_node(silu)
        changed += 1
    gm.graph.lint()
    gm.recompile()
    return changed
