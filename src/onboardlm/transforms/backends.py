"""Backend selection for a single device: the reference kernels, called without dispatcher overhead.

Each ``auto_deploy`` op node of the graph goes through the PyTorch dispatcher and the custom-op
wrapper on every call, which costs more than the small decode-step kernels themselves. On one device
this pass calls the same kernels directly: sharding-hint ops become plain torch calls
(``torch_linear_simple`` -> ``F.linear``, ``view`` -> ``reshape``, ``split_with_sizes`` ->
``split``), ``all_reduce`` (an identity on one device) disappears, and every other op of this package
calls its Python implementation. The numbers do not change.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch._library.custom_ops import OPDEFS
from torch.fx import GraphModule, Node
from torch.fx.operator_schemas import normalize_function

from onboardlm.ops import DECLARED_OPS
from onboardlm.ops._library import FOREIGN_OPS, NAMESPACE
from onboardlm.transforms import cached_ops, paged_ops, state_ops
from onboardlm.transforms.dump import dumps_graph

_OWN_OPS = (
    *DECLARED_OPS,
    cached_ops.CACHED_ATTENTION,
    cached_ops.CACHED_MLA,
    paged_ops.PAGED_ATTENTION,
    *state_ops.CACHED_STATE_OPS.values(),
)


def _reshape(x: torch.Tensor, shape: list[int]) -> torch.Tensor:
    return x.reshape(shape)


def _split(x: torch.Tensor, split_sizes: list[int], dim: int = -1) -> list[torch.Tensor]:
    return list(torch.split(x, split_sizes, dim))


#: Hint ops: the plain function and the argument names it takes.
_PLAIN: dict[str, tuple[Callable[..., Any], tuple[str, ...]]] = {
    "torch_linear_simple": (F.linear, ("input", "weight", "bias")),
    "view": (_reshape, ("x", "shape")),
    "split_with_sizes": (_split, ("x", "split_sizes", "dim")),
}


def _own_op_name(node: Node) -> str | None:
    """The op name when ``node`` calls one of this package's ops (registered by us), else None."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return None
    namespace, _, name = node.target.name().partition("::")
    if namespace != NAMESPACE or name not in _OWN_OPS or name in FOREIGN_OPS:
        return None
    return name


@dumps_graph
def use_direct_kernels(gm: GraphModule) -> int:
    """Rewrite the op nodes of ``gm`` in place as described above; returns the number of nodes changed."""
    changed = 0
    for node in list(gm.graph.nodes):
        name = _own_op_name(node)
        if name is None:
            continue
        if name == "all_reduce":
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
        elif name in _PLAIN:
            function, keep = _PLAIN[name]
            normalized = normalize_function(
                node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True
            )
            assert normalized is not None
            node.target = function
            node.args = tuple(normalized.kwargs[k] for k in keep if k in normalized.kwargs)
            node.kwargs = {}
        else:
            node.target = OPDEFS[f"{NAMESPACE}::{name}"]._init_fn
        changed += 1
    gm.graph.lint()
    gm.recompile()
    return changed
