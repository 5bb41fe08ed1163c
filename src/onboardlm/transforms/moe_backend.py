"""Routed experts without host synchronisation, so MoE decode steps can be captured in CUDA graphs.

The reference ``torch_moe`` sorts tokens by expert and loops over the experts that received tokens,
which reads the per-expert token counts on the host. :func:`use_grouped_moe` points every
``torch_moe`` node at :func:`grouped_moe`, which takes the experts stacked ``[E, ...]`` (a strided view
of the checkpoint's fused expert tensor when the per-expert weights are slices of one, else a stacked
copy) and picks its kernel from the static token count ``T``:

- ``T * top_k <= E`` (decode of small batches): only the selected experts are read, in place, by the
  two Triton launches of :mod:`onboardlm.kernels.moe_decode` (``kernel``; where Triton cannot run, or
  with ``kernel=False``, the selected experts' weights are gathered for batched matrix-vector products);
- ``T <= DENSE_MAX_TOKENS``: every expert on every token as three batched matmuls, combined with a
  dense ``[T, E]`` routing matrix (zero for unselected experts): all weights are read once;
- longer inputs (prefill): tokens sorted by expert and three grouped GEMMs (``torch._grouped_mm``,
  the kernel transformers' MoE models use), with no host synchronisation; where that kernel is
  missing or refuses the inputs, and for non-default variants (non-gated, other activations, routing
  on the input), the reference op runs on the unstacked views.

Numerics follow the reference: expert MLPs in the weight dtype, routing weights and the sum over the
selected experts in fp32, one cast to the input dtype at the end.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node
from torch.fx.operator_schemas import normalize_function

from onboardlm.kernels import moe_decode
from onboardlm.ops._library import op_targets
from onboardlm.ops.moe import ActivationType, torch_moe
from onboardlm.transforms.dump import dumps_graph
from onboardlm.transforms.graph_tensors import drop_unread, graph_tensor

_LOG = logging.getLogger(__name__)

#: Above this many tokens the all-experts path computes too much; grouped GEMMs run instead.
DENSE_MAX_TOKENS = 256
_SILU = (int(ActivationType.Silu), int(ActivationType.Swiglu))


def stack_experts(weights: list[torch.Tensor]) -> torch.Tensor:
    """``[E, ...]`` of the per-expert ``weights``: a view when they are evenly spaced slices of one tensor."""
    first = weights[0]
    same_layout = all(
        w.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        and w.shape == first.shape
        and w.stride() == first.stride()
        and w.dtype == first.dtype
        for w in weights
    )
    if same_layout and len(weights) > 1:
        step = weights[1].storage_offset() - first.storage_offset()
        offsets = [w.storage_offset() for w in weights]
        if step > 0 and offsets == [first.storage_offset() + i * step for i in range(len(weights))]:
            return first.as_strided((len(weights), *first.shape), (step, *first.stride()))
    return torch.stack(weights)


def _reference(
    x: torch.Tensor,
    selected: torch.Tensor,
    routing: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: torch.Tensor,
    is_gated_mlp: bool,
    act_fn: int,
    apply_routing_on_input: bool,
) -> torch.Tensor:
    return torch_moe._init_fn(
        x, selected, routing, list(w1.unbind(0)), list(w2.unbind(0)), list(w3.unbind(0)),
        is_gated_mlp, act_fn, "", 0, apply_routing_on_input,
    )  # fmt: skip


def _gathered(
    hidden: torch.Tensor, ids: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor
) -> torch.Tensor:
    """Expert outputs ``[T * k, H]`` for token rows ``hidden`` ``[T * k, H]``, experts ``ids`` ``[T * k]``."""
    h = hidden[:, :, None]
    inner = F.silu(torch.bmm(w1[ids], h)) * torch.bmm(w3[ids], h)
    return torch.bmm(w2[ids], inner)[:, :, 0]


def _dense(hidden: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """Every expert's output ``[E, T, H]`` for every token of ``hidden`` ``[T, H]``."""
    inner = F.silu(torch.matmul(hidden, w1.transpose(1, 2))) * torch.matmul(hidden, w3.transpose(1, 2))
    return torch.bmm(inner, w2.transpose(1, 2))


def _sorted_grouped(
    hidden: torch.Tensor, ids: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Expert outputs ``[T * k, H]`` in sorted order, and the token of each row, by grouped GEMMs."""
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    ends = torch.cumsum(torch.bincount(flat, minlength=w1.shape[0]), 0).to(torch.int32)
    token = order // ids.shape[1]
    rows = hidden[token]
    gate = torch._grouped_mm(rows, w1.transpose(1, 2), offs=ends)
    up = torch._grouped_mm(rows, w3.transpose(1, 2), offs=ends)
    return torch._grouped_mm(F.silu(gate) * up, w2.transpose(1, 2), offs=ends), order, token


#: Whether the Triton MoE decode kernels built and ran, per device (tried once, on the first call).
_KERNEL_WORKS: dict[str, bool] = {}


def _kernel_works(hidden: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> bool:
    """Whether :mod:`onboardlm.kernels.moe_decode` runs here. The first call on a device tries it once
    (in warm-up, before any CUDA-graph capture): a Triton build error on an unforeseen GPU or Triton
    release is logged and the gathered path runs from then on."""
    if not moe_decode.is_available(hidden, w1, w2, w3):
        return False
    device = str(hidden.device)
    if device not in _KERNEL_WORKS:
        try:
            ids = torch.zeros(1, 1, dtype=torch.long, device=hidden.device)
            moe_decode.moe_decode(hidden[:1], ids, torch.zeros(1, 1, device=hidden.device), w1, w2, w3)
            _KERNEL_WORKS[device] = True
        except Exception as error:  # noqa: BLE001  (Triton raises its own compilation errors)
            _KERNEL_WORKS[device] = False
            _LOG.warning("MoE decode kernel unavailable on %s (%s); using gathered experts", device, error)
    return _KERNEL_WORKS[device]


def grouped_moe(
    x: torch.Tensor,
    selected_experts: torch.Tensor,
    routing_weights: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: torch.Tensor,
    is_gated_mlp: bool = True,
    act_fn: int = int(ActivationType.Silu),
    apply_routing_on_input: bool = False,
    kernel: bool = True,
) -> torch.Tensor:
    """``torch_moe`` on stacked experts ``w1``/``w3`` ``[E, I, H]``, ``w2`` ``[E, H, I]`` (module doc)."""
    hidden = x.reshape(-1, x.shape[-1])
    tokens, top_k = hidden.shape[0], selected_experts.shape[-1]
    num_experts = w1.shape[0]
    default = is_gated_mlp and act_fn in _SILU and not apply_routing_on_input
    if not default:
        args = (is_gated_mlp, act_fn, apply_routing_on_input)
        return _reference(x, selected_experts, routing_weights, w1, w2, w3, *args)
    ids = selected_experts.reshape(tokens, top_k).long()
    valid = (ids >= 0) & (ids < num_experts)
    ids = torch.where(valid, ids, 0)
    weights = routing_weights.reshape(tokens, top_k).float() * valid
    hidden = hidden.to(w1.dtype)
    if tokens > DENSE_MAX_TOKENS:
        try:
            rows, order, token = _sorted_grouped(hidden, ids, w1, w2, w3)
        except (RuntimeError, AttributeError):  # no grouped GEMM for this device, dtype or layout
            args = (is_gated_mlp, act_fn, apply_routing_on_input)
            return _reference(x, selected_experts, routing_weights, w1, w2, w3, *args)
        scaled = rows.float() * weights.reshape(-1)[order, None]
        out = torch.zeros(tokens, rows.shape[-1], device=x.device).index_add_(0, token, scaled)
    elif tokens * top_k <= num_experts and kernel and _kernel_works(hidden, w1, w2, w3):
        out = moe_decode.moe_decode(hidden, ids, weights, w1, w2, w3)
    elif tokens * top_k <= num_experts:
        rows = hidden.repeat_interleave(top_k, dim=0)
        out = _gathered(rows, ids.reshape(-1), w1, w2, w3).float().reshape(tokens, top_k, -1)
        out = (out * weights[:, :, None]).sum(dim=1)
    else:
        dense = torch.zeros(tokens, num_experts, device=x.device).scatter_add_(1, ids, weights)
        out = torch.einsum("te,eth->th", dense, _dense(hidden, w1, w2, w3).float())
    return out.to(x.dtype).reshape(x.shape)


def _is_torch_moe(node: Node) -> bool:
    return node.op == "call_function" and node.target in op_targets("torch_moe")


def _attribute(gm: GraphModule, node: Node) -> torch.Tensor:
    if node.op != "get_attr":
        raise ValueError(f"expert weight {node.name} is not a parameter of the graph")
    return graph_tensor(gm, str(node.target))


@dumps_graph
def use_grouped_moe(gm: GraphModule, kernel: bool = True) -> int:
    """Point every ``torch_moe`` node of ``gm`` at :func:`grouped_moe` (in place); returns how many.
    ``kernel``: the Triton decode kernels for few tokens where they can run."""
    changed = 0
    for node in list(gm.graph.nodes):
        if not _is_torch_moe(node):
            continue
        normalized = normalize_function(
            torch.ops.auto_deploy.torch_moe.default, node.args, node.kwargs, normalize_to_only_use_kwargs=True
        )
        assert normalized is not None
        args = normalized.kwargs
        stacked = []
        for name in ("w1_weight", "w2_weight", "w3_weight"):
            weights = [_attribute(gm, n) for n in args[name]] or [
                _attribute(gm, n) for n in args["w1_weight"]
            ]
            attr = f"_grouped_moe_{changed}_{name}"
            gm.register_buffer(attr, stack_experts(weights), persistent=False)
            with gm.graph.inserting_before(node):
                stacked.append(gm.graph.get_attr(attr))
        options = {
            "is_gated_mlp": args.get("is_gated_mlp", True),
            "act_fn": int(args.get("act_fn", int(ActivationType.Silu))),
            "apply_routing_on_input": args.get("apply_routing_on_input", False),
            "kernel": kernel,
        }
        with gm.graph.inserting_before(node):
            grouped = gm.graph.call_function(
                grouped_moe, (args["x"], args["selected_experts"], args["routing_weights"], *stacked), options
            )
        grouped.meta = dict(node.meta)
        node.replace_all_uses_with(grouped)
        gm.graph.erase_node(node)
        experts = {n for name in ("w1_weight", "w2_weight", "w3_weight") for n in args[name]}
        for weight in experts:
            if not weight.users:
                gm.graph.erase_node(weight)
        drop_unread(gm, (str(n.target) for n in experts))  # the stacked copies replace them
        changed += 1
    gm.graph.lint()
    gm.recompile()
    return changed
