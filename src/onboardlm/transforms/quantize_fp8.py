"""Linears become FP8 fake-quant linears (``auto_deploy::torch_fake_quant_fp8_linear``).

The first stage of FP8 as TensorRT-LLM AutoDeploy runs it: the exported graph's linears are rewritten
to the reference fake-quant op, whose FP8 weight and scales become tensors of the graph module under
the checkpoint's names (``<module>.weight`` in ``float8_e4m3fn``, ``<module>.weight_scale`` or
``weight_scale_inv``, and ``input_scale`` / ``activation_scale`` for a static activation scale), so an
FP8 checkpoint loads into the graph with a plain key match. The second stage,
:mod:`onboardlm.transforms.fuse_fp8`, swaps in the fused kernels on CUDA.

Two sources:

* ``specs`` (an FP8 checkpoint, :mod:`onboardlm.models.fp8_checkpoint`): the linears whose weights the
  checkpoint stores in FP8; their tensors are created empty (on the weight's device, ``meta`` while
  the graph waits for its checkpoint) in the checkpoint's shapes, to be filled by the loader.
* no ``specs`` (``--quantize fp8`` on a float checkpoint): every linear of a plain 2-D float weight
  is quantised now, per output channel (``scale = amax / 448``, ``[N, 1]`` fp32 ``weight_scale``);
  activations are then quantised dynamically per token. Linears whose result reaches the output
  without another linear on the way (the LM head) and weights that another op also reads (tied
  embeddings) stay in float, as FP8 checkpoints leave them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node
from torch.fx.operator_schemas import normalize_function

from onboardlm.errors import WeightsError
from onboardlm.ops._library import get_op, op_targets
from onboardlm.ops.quantization import FP8_DTYPE, FP8_MAX
from onboardlm.transforms.dump import dumps_graph
from onboardlm.transforms.graph_tensors import graph_tensor

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Fp8LinearSpec:
    """How a checkpoint stores one linear in FP8: its scale tensors' names (beside the weight) and shapes."""

    weight_shape: tuple[int, ...]
    scale_name: str
    scale_shape: tuple[int, ...]
    input_scale_name: str | None = None
    input_scale_shape: tuple[int, ...] = ()


def _linear_targets() -> tuple[object, ...]:
    return (*op_targets("torch_linear_simple"), F.linear, torch.ops.aten.linear.default)


def _linear_args(node: Node) -> dict[str, object] | None:
    """``{"input", "weight", "bias"}`` of a linear call, or None when ``node`` is no linear."""
    if node.op != "call_function" or node.target not in _linear_targets():
        return None
    if isinstance(node.target, torch._ops.OpOverload):
        normalized = normalize_function(
            node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True
        )
        assert normalized is not None
        args = dict(normalized.kwargs)
    else:
        names = ("input", "weight", "bias")
        args = {**dict(zip(names, node.args, strict=False)), **node.kwargs}
    return {"input": args.get("input"), "weight": args.get("weight"), "bias": args.get("bias")}


def _output_linears(gm: GraphModule, linears: set[Node]) -> set[Node]:
    """The linears whose result reaches the graph output without passing another linear (the LM head)."""
    found: set[Node] = set()
    seen: set[Node] = set()
    stack = [n for n in gm.graph.nodes if n.op == "output"]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node in linears:
            found.add(node)
            continue
        stack.extend(node.all_input_nodes)
    return found


def quantize_weight_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight_fp8, scale [N, 1] fp32)`` with ``weight ~= weight_fp8 * scale`` (row amax maps to 448)."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp_min(1e-12)
    return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def _set_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Put ``value`` at ``module.<name>``: a frozen parameter where a parameter was, else a buffer."""
    if name in module._parameters:
        module._parameters[name] = nn.Parameter(value, requires_grad=False)
    else:
        if hasattr(module, name) and name not in module._buffers:
            raise WeightsError(f"{type(module).__name__}.{name}", "is taken by something other than a tensor")
        module.register_buffer(name, value, persistent=True)


@dumps_graph
def quantize_fp8_linears(gm: GraphModule, specs: Mapping[str, Fp8LinearSpec] | None = None) -> int:
    """Rewrite ``gm``'s linears to FP8 fake-quant linears in place (module doc); returns how many.

    ``specs`` maps a weight's name (``model.layers.0.mlp.down_proj.weight``) to its checkpoint layout;
    a spec that no linear of the graph reads raises :class:`WeightsError`.
    """
    linears: dict[Node, dict[str, object]] = {}
    readers: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            readers[str(node.target)] = readers.get(str(node.target), 0) + len(node.users)
        args = _linear_args(node)
        if args is not None and isinstance(args["weight"], Node) and args["weight"].op == "get_attr":
            linears[node] = args
    skip: set[str] = set()
    if specs is None:  # the LM head, and weights some other op reads too, stay in float
        uses: dict[str, int] = {}
        for args in linears.values():
            name = str(args["weight"].target)  # type: ignore[union-attr]
            uses[name] = uses.get(name, 0) + 1
        skip = {name for name, count in uses.items() if readers.get(name, 0) != count}
        skip |= {str(linears[n]["weight"].target) for n in _output_linears(gm, set(linears))}  # type: ignore[union-attr]
    fake_quant = get_op("torch_fake_quant_fp8_linear").default
    done: set[str] = set()
    for node, args in linears.items():
        weight_node = args["weight"]
        assert isinstance(weight_node, Node)
        target = str(weight_node.target)
        module_path, _, attr = target.rpartition(".")
        module = gm.get_submodule(module_path)
        value = graph_tensor(gm, target)
        if not isinstance(value, torch.Tensor) or value.dim() != 2:
            continue
        if specs is None:
            if target in skip or (target not in done and value.dtype not in _FLOATS):
                continue
            if target not in done:
                quantized, scale = quantize_weight_per_channel(value)
                _set_tensor(module, attr, quantized)
                _set_tensor(module, "weight_scale", scale.to(value.device))
            scale_name, input_name = "weight_scale", None
        else:
            spec = specs.get(target)
            if spec is None:
                continue
            if tuple(value.shape) != spec.weight_shape:
                raise WeightsError(
                    target,
                    f"has shape {list(spec.weight_shape)} in the checkpoint, {list(value.shape)} in the model",
                )
            if target not in done:
                device = value.device
                _set_tensor(module, attr, torch.empty(value.shape, dtype=FP8_DTYPE, device=device))
                _set_tensor(module, spec.scale_name, torch.empty(spec.scale_shape, device=device))
                if spec.input_scale_name is not None:
                    empty = torch.empty(spec.input_scale_shape, device=device)
                    _set_tensor(module, spec.input_scale_name, empty)
            scale_name, input_name = spec.scale_name, spec.input_scale_name
        done.add(target)
        prefix = f"{module_path}." if module_path else ""
        with gm.graph.inserting_before(node):
            scale_node = gm.graph.get_attr(prefix + scale_name)
            input_scales = [gm.graph.get_attr(prefix + input_name)] if input_name else []
            replacement = gm.graph.call_function(
                fake_quant, (args["input"], weight_node, args["bias"], input_scales, [scale_node], [], [])
            )
        replacement.meta = dict(node.meta)
        node.replace_all_uses_with(replacement)
        gm.graph.erase_node(node)
    if specs is not None:
        unread = sorted(set(specs) - done)
        if unread:
            raise WeightsError(
                unread[0],
                f"is stored in FP8 but no linear op of the model reads it ({len(unread)} such weights)",
                "only linear layers load from FP8 checkpoints; MoE experts and embeddings must be float",
            )
    gm.graph.lint()
    gm.recompile()
    return len(done)
