"""The tensors a graph module holds, by ``get_attr`` target: read one, drop the ones no node reads.

Passes that rewrite weights (sharding, fused linears, folded weights, stacked MoE experts) replace
``get_attr`` nodes; the tensors those nodes read must then leave the module too, or the graph keeps
both layouts alive.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch.fx import GraphModule


def graph_tensor(gm: GraphModule, target: str) -> Any:
    """The attribute ``target`` (a dotted ``get_attr`` path) of ``gm``."""
    module_path, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(module_path), name)


def drop_unread(gm: GraphModule, targets: Iterable[str]) -> None:
    """Delete each attribute of ``targets`` that no ``get_attr`` node of ``gm`` reads any more."""
    read = {str(node.target) for node in gm.graph.nodes if node.op == "get_attr"}
    for target in dict.fromkeys(targets):
        if target not in read:
            module_path, _, name = target.rpartition(".")
            delattr(gm.get_submodule(module_path), name)
