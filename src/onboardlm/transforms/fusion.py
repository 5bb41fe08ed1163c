"""Elementwise fusion: each small reference op of the graph becomes one compiled kernel.

Between the matmuls, the reference ops run as chains of small kernels (an RMSNorm is about eight:
upcast, square, mean, add, rsqrt, two multiplies, downcast). This pass points the graph's RMSNorm and
RoPE nodes, and every ``silu(gate) * up`` pair, at functions that ``torch.compile`` turns into one
fused kernel each. Only these small functions are compiled (dynamic shapes, a few seconds each, shared
by all layers), not the whole graph. The functions compute the reference formulas; with
``compile=False`` (the CPU path) they run eagerly, which is how the rewrite is tested off the GPU.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F
from torch._library.custom_ops import OPDEFS
from torch.fx import GraphModule, Node

from onboardlm.ops._library import NAMESPACE

logger = logging.getLogger(__name__)

#: Reference ops replaced by a compiled copy of their own implementation.
FUSED_OPS = ("torch_rmsnorm", "torch_rope_with_explicit_cos_sin")


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``: the gated MLP's activation."""
    return F.silu(gate) * up


def _implementation(name: str) -> Callable[..., Any]:
    return OPDEFS[f"{NAMESPACE}::{name}"]._init_fn


@cache
def _compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` compiled on first call; if compiling fails, ``fn`` itself from then on (with a warning)."""
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
        op = getattr(torch.ops.auto_deploy, name)
        if node.target in (op, op.default, _implementation(name)):
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


def fuse_elementwise(gm: GraphModule, compile: bool = True) -> int:
    """Rewrite ``gm`` in place as described above; returns the number of nodes rewritten."""
    wrap = _compiled if compile else (lambda fn: fn)
    changed = 0
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
