"""A gated RMSNorm whose channel groups span tensor-parallel ranks, rewritten with a cross-rank sum.

Mamba2's gated norm normalises groups of ``d_inner / n_groups`` channels; with fewer groups than ranks
(``n_groups`` 1: one group of all ``d_inner`` channels) a group spans ranks. Each rank holds consecutive
channels of one group: its sum of squares over them goes into slot ``slot`` of a zero vector with one
slot per group, an all-reduce over the ranks adds up every group's sum, and the rank reads its own
group's mean square back. The rest is ``torch_rmsnorm_gated``'s math (fp32, SiLU gate before or after
the norm, result in the input's dtype) as aten ops.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node
from torch.fx.operator_schemas import normalize_function

_ATEN = torch.ops.aten


def replace_spanning_gated_norm(gm: GraphModule, node: Node, slot: int, slots: int, group_name: str) -> None:
    """Replace the ``torch_rmsnorm_gated`` ``node`` (weight already cut to the rank's channels)."""
    normalized = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
    assert normalized is not None, f"cannot normalise the arguments of {node.format_node()}"
    args = normalized.kwargs
    graph = gm.graph

    def call(target: object, *values: object, **kwargs: object) -> Node:
        return graph.call_function(target, values, kwargs)

    def fp32(value: Node) -> Node:
        return call(_ATEN._to_copy.default, value, dtype=torch.float32)

    with graph.inserting_before(node):
        hidden = fp32(args["x"])
        gate = None if args.get("gate") is None else call(_ATEN.silu.default, fp32(args["gate"]))
        before = bool(args.get("norm_before_gate", False))
        if gate is not None and not before:
            hidden = call(_ATEN.mul.Tensor, hidden, gate)
        squares = call(_ATEN.sum.dim_IntList, call(_ATEN.pow.Tensor_Scalar, hidden, 2), [-1], True)
        if slots > 1:
            squares = call(_ATEN.constant_pad_nd.default, squares, [slot, slots - 1 - slot])
        reduced = call(torch.ops._c10d_functional.all_reduce.default, squares, "sum", group_name)
        total = call(torch.ops._c10d_functional.wait_tensor.default, reduced)
        if slots > 1:
            total = call(_ATEN.slice.Tensor, total, -1, slot, slot + 1)
        mean = call(_ATEN.div.Scalar, total, args["group_size"])
        scale = call(_ATEN.rsqrt.default, call(_ATEN.add.Scalar, mean, args["eps"]))
        out = call(_ATEN.mul.Tensor, call(_ATEN.mul.Tensor, hidden, scale), fp32(args["weight"]))
        if gate is not None and before:
            out = call(_ATEN.mul.Tensor, out, gate)
        out = call(_ATEN._to_copy.default, out, dtype=node.meta["val"].dtype)
    node.replace_all_uses_with(out)
    graph.erase_node(node)
