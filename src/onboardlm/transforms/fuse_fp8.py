"""FP8 fake-quant linears become fused FP8 kernels (``auto_deploy::torch_quant_fp8_linear``).

The second stage of FP8 as TensorRT-LLM AutoDeploy runs it (its ``fuse_fp8_linear``): every
``torch_fake_quant_fp8_linear`` node (inserted by :mod:`onboardlm.transforms.quantize_fp8`) calls the
fused op instead, with the same arguments, which computes the same numbers from FP8 tensor-core
GEMMs and a Triton GEMV (:mod:`onboardlm.kernels.fp8_linear`). A node that called the reference
op's Python implementation directly (after ``use_direct_kernels``) calls the fused op's the same way.

With ``fuse_shared_input=True`` the FP8 linears that read one tensor with dynamic activation scales and
per-tensor or per-channel weight scales (q/k/v, gate/up) also become one linear over their weights
and per-channel scales concatenated along the output features, then split: the activation's
per-token quantisation is the same for all of them, so the numbers do not change, and a decode step
streams one weight instead of three narrow ones. Running the pass twice changes nothing more.
"""

from __future__ import annotations

import operator

import torch
from torch import nn
from torch._library.custom_ops import OPDEFS
from torch.fx import GraphModule, Node

from onboardlm.ops._library import FOREIGN_OPS, NAMESPACE, get_op, op_targets
from onboardlm.ops.quantization import weight_scheme
from onboardlm.transforms.dump import dumps_graph
from onboardlm.transforms.graph_tensors import drop_unread, graph_tensor

REFERENCE = "torch_fake_quant_fp8_linear"
FUSED = "torch_quant_fp8_linear"
_ARGS = ("input", "weight_quantized", "bias", "input_scale", "weight_scale", "input_zp", "weight_zp")


def _fused_target(reference_target: object) -> object:
    """The fused op called the way ``reference_target`` called the reference (overload or Python)."""
    if isinstance(reference_target, torch._ops.OpOverload) or FUSED in FOREIGN_OPS:
        return get_op(FUSED).default
    return OPDEFS[f"{NAMESPACE}::{FUSED}"]._init_fn


def _args(node: Node) -> dict[str, object]:
    return {**dict(zip(_ARGS, node.args, strict=False)), **node.kwargs}


def _fusable(gm: GraphModule, node: Node) -> tuple[Node, torch.Tensor, torch.Tensor] | None:
    """``(input, weight, per-channel scale [N, 1])`` of a fused FP8 linear that may join a group."""
    args = _args(node)
    weight_node, scales, bias = args["weight_quantized"], args["weight_scale"], args["bias"]
    if args["input_scale"] or bias is not None or not isinstance(args["input"], Node):
        return None
    if not (isinstance(weight_node, Node) and weight_node.op == "get_attr" and isinstance(scales, list)):
        return None
    scale_node = scales[0] if len(scales) == 1 else None
    if not (isinstance(scale_node, Node) and scale_node.op == "get_attr"):
        return None
    weight = graph_tensor(gm, str(weight_node.target))
    scale = graph_tensor(gm, str(scale_node.target))
    if weight_scheme(weight, scale)[0] == "block":
        return None
    return args["input"], weight, scale.float().reshape(-1, 1).expand(weight.shape[0], 1)


def _register(gm: GraphModule, like: Node, suffix: str, value: torch.Tensor) -> Node:
    module_path, _, attr = str(like.target).rpartition(".")
    owner = gm.get_submodule(module_path)
    name, index = f"{attr}_{suffix}", 1
    while hasattr(owner, name):
        name, index = f"{attr}_{suffix}_{index}", index + 1
    owner.register_parameter(name, nn.Parameter(value, requires_grad=False))
    return gm.graph.get_attr(f"{module_path}.{name}" if module_path else name)


def _fuse_group(gm: GraphModule, group: list[tuple[Node, torch.Tensor, torch.Tensor]]) -> None:
    first = group[0][0]
    with torch.no_grad():
        weight = torch.cat([w for _, w, _ in group])
        scale = torch.cat([s for _, _, s in group]).contiguous()
    sizes = [int(w.shape[0]) for _, w, _ in group]
    args = _args(first)
    with gm.graph.inserting_before(first):
        weight_node = _register(gm, args["weight_quantized"], "fused", weight)  # type: ignore[arg-type]
        scale_node = _register(gm, args["weight_quantized"], "scale_fused", scale)  # type: ignore[arg-type]
        fused = gm.graph.call_function(
            first.target, (args["input"], weight_node, None, [], [scale_node], [], [])
        )
        parts = gm.graph.call_function(torch.split, (fused, sizes, -1))
        outputs = [gm.graph.call_function(operator.getitem, (parts, i)) for i in range(len(group))]
    olds: list[Node] = []
    for (node, _, _), output in zip(group, outputs, strict=True):
        output.meta = dict(node.meta)
        node_args = _args(node)
        olds += [node_args["weight_quantized"], *node_args["weight_scale"]]  # type: ignore[list-item]
        node.replace_all_uses_with(output)
        gm.graph.erase_node(node)
    for old in dict.fromkeys(olds):
        if not old.users:
            gm.graph.erase_node(old)
    drop_unread(gm, (str(n.target) for n in olds))


@dumps_graph
def fuse_fp8_linears(gm: GraphModule, fuse_shared_input: bool = True) -> int:
    """Swap ``gm``'s FP8 fake-quant linears for the fused op in place (module doc); returns how many."""
    references = set(op_targets(REFERENCE))
    swapped = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in references:
            node.target = _fused_target(node.target)
            swapped += 1
    if fuse_shared_input:
        fused_targets = set(op_targets(FUSED))
        groups: dict[tuple[Node, torch.dtype, int], list[tuple[Node, torch.Tensor, torch.Tensor]]] = {}
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target in fused_targets:
                found = _fusable(gm, node)
                if found is not None:
                    source, weight, scale = found
                    groups.setdefault((source, weight.dtype, int(weight.shape[1])), []).append(
                        (node, weight, scale)
                    )
        for group in groups.values():
            if len(group) > 1:
                _fuse_group(gm, group)
    gm.graph.lint()
    gm.recompile()
    return swapped
