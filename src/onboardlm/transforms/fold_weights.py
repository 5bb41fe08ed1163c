"""Computations on weights alone run once, when the graph is built, instead of at every step.

A lean model file may rearrange its weights inside ``forward``: GPT-OSS stacks its per-expert
projections into the dense-MoE layout, a router upcasts its weight, a rotary embedding casts its
inverse frequencies. Exported, these become graph nodes whose inputs are only ``get_attr`` tensors
and constants, and every prefill and decode step recomputes them (for GPT-OSS, a copy of every
expert's weights per step). :func:`fold_weight_computations` evaluates such nodes once and reads
their results as new graph tensors (``<source>_folded`` beside a single source tensor, else
``folded`` in the module holding all the sources); tensors no node reads any more are deleted
from the graph module, so the graph does not hold both layouts. Only tensor results are folded, and
only pure calls (no in-place or otherwise side-effecting op); metadata checks on weights
(``aten._assert_tensor_metadata``) are run once and dropped.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

from onboardlm.transforms.dump import dumps_graph
from onboardlm.transforms.graph_tensors import drop_unread, graph_tensor

_METADATA_CHECKS = (torch.ops.aten._assert_tensor_metadata.default,)


def _is_pure_call(node: Node) -> bool:
    if node.op != "call_function" or node.is_impure():
        return False
    schema = getattr(node.target, "_schema", None)
    return schema is None or not schema.is_mutable


def _evaluate(gm: GraphModule) -> tuple[dict[Node, torch.Tensor | None], list[Node]]:
    """The weight-only nodes (``get_attr`` and pure calls on them) and the metadata checks run.

    A call's value is kept only while a node may still need it: at the end, values are held for the
    calls read by a node that is not folded (``None`` for the others), so intermediate layouts are
    freed as soon as the next one is computed.
    """
    values: dict[Node, torch.Tensor | None] = {}
    checks: list[Node] = []
    pending = {node: len(node.users) for node in gm.graph.nodes}

    def release(inputs: list[Node]) -> None:
        for source in inputs:
            pending[source] -= 1
            if pending[source] == 0 and source.op == "call_function":
                values[source] = None

    with torch.no_grad():
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                value = graph_tensor(gm, str(node.target))
                if isinstance(value, torch.Tensor):
                    values[node] = value
                continue
            inputs = node.all_input_nodes
            if not inputs or not all(n in values for n in inputs):
                continue
            args = map_arg((node.args, node.kwargs), values.__getitem__)
            if node.op == "call_function" and node.target in _METADATA_CHECKS:
                node.target(*args[0], **args[1])
                checks.append(node)
                release(inputs)
            elif _is_pure_call(node):
                result = node.target(*args[0], **args[1])
                if isinstance(result, torch.Tensor):
                    values[node] = result
                    release(inputs)
    return values, checks


def _folded_name(gm: GraphModule, node: Node) -> tuple[str, str]:
    """Where a folded value lives: beside its one source tensor (``<name>_folded``), or in the deepest
    module holding all its sources (``folded``), with ``_<n>`` added when the name is taken."""
    sources, stack = set(), [node]
    while stack:
        current = stack.pop()
        if current.op == "get_attr":
            sources.add(str(current.target))
        stack.extend(current.all_input_nodes)
    paths = [target.split(".") for target in sorted(sources)]
    if len(paths) == 1:
        owner, base = paths[0][:-1], f"{paths[0][-1]}_folded"
    else:  # distinct tensors: their longest common prefix is a module path
        owner, base = [], "folded"
        for parts in zip(*paths, strict=False):
            if any(part != parts[0] for part in parts):
                break
            owner.append(parts[0])
    module = gm.get_submodule(".".join(owner))
    name, index = base, 1
    while hasattr(module, name):
        name, index = f"{base}_{index}", index + 1
    return ".".join(owner), name


@dumps_graph
def fold_weight_computations(gm: GraphModule) -> int:
    """Fold ``gm``'s weight-only computations in place (module doc); returns the number of nodes folded."""
    values, checks = _evaluate(gm)
    for check in checks:
        gm.graph.erase_node(check)
    folded = [n for n in values if n.op == "call_function"]
    read_before = {n for n in values if n.op == "get_attr" and n.users}  # dead reads are not ours to drop
    frontier = [n for n in folded if any(user not in values for user in n.users)]
    for node in frontier:
        value = values[node]
        assert value is not None, f"{node.name} is read by an unfolded node, so its value was kept"
        owner_path, name = _folded_name(gm, node)
        gm.get_submodule(owner_path).register_buffer(name, value.detach(), persistent=False)
        with gm.graph.inserting_before(node):
            replacement = gm.graph.get_attr(f"{owner_path}.{name}" if owner_path else name)
        replacement.meta = dict(node.meta)
        node.replace_all_uses_with(replacement, delete_user_cb=lambda user: user not in values)
    for node in reversed(list(gm.graph.nodes)):
        if (node in read_before or node.op == "call_function") and node in values and not node.users:
            gm.graph.erase_node(node)
    drop_unread(gm, (str(n.target) for n in read_before))
    gm.graph.lint()
    gm.recompile()
    return len(folded)
