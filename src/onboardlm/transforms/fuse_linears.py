"""Linears that read one tensor become one GEMM over their concatenated weights.

Attention's q, k and v projections read the same normed hidden state, and so do a gated MLP's gate
and up projections (MLA's ``q_a_proj`` and ``kv_a_proj_with_mqa`` too). In a decode step each runs as
its own matrix-vector product, and the narrow ones (k and v under GQA) run far below the memory
bandwidth. :func:`fuse_shared_input_linears` replaces each such group of ``F.linear`` (or
``aten.linear``) nodes by one linear over the weights concatenated along the output features (biases
likewise), then splits the result's last dimension back into the original outputs.

Linears of one input are grouped by weight dtype, device, input width and whether they have a bias
(all or none of a group); weights and biases must be plain float tensors of the graph (``get_attr``),
so computed, quantized or tensor-subclass weights stay as they are, and so do the MoE ops, which take
their expert weights as lists. The concatenated tensors are registered next to each group's first
weight (``<name>_fused``); the originals are deleted from the graph module once no node reads them, so
the graph holds one copy of the weights. The outputs are those of the separate linears up to the
GEMM's blocking. Fusing a fused graph again changes nothing.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

from onboardlm.transforms.dump import dumps_graph
from onboardlm.transforms.graph_tensors import drop_unread, graph_tensor

#: The linear calls this pass fuses: ``(input, weight[, bias])``.
LINEAR_TARGETS = (F.linear, torch.ops.aten.linear.default)
_ARG_NAMES = ("input", "weight", "bias")
_FUSABLE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class _Linear:
    """One linear node with its input, and its weight and bias ``get_attr`` nodes and tensors."""

    node: Node
    input: Node
    weight: Node
    weight_value: torch.Tensor
    bias: Node | None
    bias_value: torch.Tensor | None

    def key(self) -> tuple[object, ...]:
        """Linears with equal keys can be fused."""
        weight, bias = self.weight_value, self.bias_value
        bias_key = None if bias is None else (bias.dtype, bias.device)
        return self.input, weight.dtype, weight.device, weight.shape[1], bias_key


def _plain_tensor(gm: GraphModule, node: object, ndim: int) -> torch.Tensor | None:
    """The tensor ``node`` reads when it is a ``get_attr`` of a plain float tensor of ``ndim`` dims."""
    if not (isinstance(node, Node) and node.op == "get_attr"):
        return None
    try:
        value = graph_tensor(gm, str(node.target))
    except AttributeError:
        return None
    if type(value) not in (torch.Tensor, nn.Parameter) or value.ndim != ndim:
        return None
    return value if value.dtype in _FUSABLE_DTYPES else None


def _as_linear(gm: GraphModule, node: Node) -> _Linear | None:
    """``node`` as a fusable linear, or None."""
    if node.op != "call_function" or node.target not in LINEAR_TARGETS or len(node.args) > 3:
        return None
    args = {**dict(zip(_ARG_NAMES, node.args, strict=False)), **node.kwargs}
    if set(args) - set(_ARG_NAMES) or not isinstance(args.get("input"), Node):
        return None
    weight = _plain_tensor(gm, args.get("weight"), ndim=2)
    bias_node = args.get("bias")
    bias = None if bias_node is None else _plain_tensor(gm, bias_node, ndim=1)
    if weight is None or (bias_node is not None and bias is None):
        return None
    return _Linear(node, args["input"], args["weight"], weight, bias_node, bias)


def _groups(gm: GraphModule) -> list[list[_Linear]]:
    """Fusable groups (two or more linears with one key), each in graph order."""
    by_key: dict[tuple[object, ...], list[_Linear]] = {}
    for node in gm.graph.nodes:
        linear = _as_linear(gm, node)
        if linear is not None:
            by_key.setdefault(linear.key(), []).append(linear)
    return [group for group in by_key.values() if len(group) > 1]


def _register(gm: GraphModule, like: Node, value: torch.Tensor, original: torch.Tensor) -> str:
    """Register ``value`` next to ``like``'s tensor under a free ``<name>_fused`` name; returns it."""
    module_path, _, attr = str(like.target).rpartition(".")
    owner = gm.get_submodule(module_path)
    name, index = f"{attr}_fused", 1
    while hasattr(owner, name):
        name, index = f"{attr}_fused_{index}", index + 1
    if isinstance(original, nn.Parameter):
        owner.register_parameter(name, nn.Parameter(value, requires_grad=False))
    else:
        owner.register_buffer(name, value)
    return f"{module_path}.{name}" if module_path else name


def _delete_unread(gm: GraphModule, nodes: list[Node]) -> None:
    """Erase the ``get_attr`` ``nodes`` nobody uses, and their tensors when no node reads them."""
    for node in nodes:
        if not node.users:
            gm.graph.erase_node(node)
    drop_unread(gm, (str(n.target) for n in nodes))


def _fuse(gm: GraphModule, group: list[_Linear]) -> None:
    first = group[0]
    with torch.no_grad():
        weight = torch.cat([linear.weight_value.detach() for linear in group])
        biases = [linear.bias_value.detach() for linear in group if linear.bias_value is not None]
        bias = torch.cat(biases) if biases else None
    weight_name = _register(gm, first.weight, weight, first.weight_value)
    bias_name = None
    if bias is not None and first.bias is not None and first.bias_value is not None:
        bias_name = _register(gm, first.bias, bias, first.bias_value)
    sizes = [int(linear.weight_value.shape[0]) for linear in group]
    graph = gm.graph
    with graph.inserting_before(first.node):
        weight_node = graph.get_attr(weight_name)
        bias_node = None if bias_name is None else graph.get_attr(bias_name)
        fused = graph.call_function(F.linear, (first.input, weight_node, bias_node))
        parts = graph.call_function(torch.split, (fused, sizes, -1))
        outputs = [graph.call_function(operator.getitem, (parts, index)) for index in range(len(group))]
    for linear, output in zip(group, outputs, strict=True):
        output.meta = dict(linear.node.meta)
        linear.node.replace_all_uses_with(output)
        graph.erase_node(linear.node)
    originals = [linear.weight for linear in group]
    originals += [linear.bias for linear in group if linear.bias is not None]
    _delete_unread(gm, list(dict.fromkeys(originals)))


@dumps_graph
def fuse_shared_input_linears(gm: GraphModule) -> int:
    """Fuse ``gm``'s linears that share an input, in place (module doc); returns the number of groups."""
    groups = _groups(gm)
    for group in groups:
        _fuse(gm, group)
    if groups:
        gm.graph.lint()
        gm.recompile()
    return len(groups)
