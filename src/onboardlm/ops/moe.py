"""Mixture-of-experts ops: routed per-expert MLPs (``torch_moe``) and the GPT-OSS router and dense experts.

Signatures follow TensorRT-LLM AutoDeploy (``torch.ops.auto_deploy.torch_moe`` and friends), so an AD
model file runs on these ops unchanged. Unlike AD's reference, ``torch_moe`` also runs
``ActivationType.Gelu`` (exact erf GELU, as TensorRT-LLM's MoE kernels) and always computes on one rank
(AD's all-to-all path for ``mapping_config`` is not reproduced).

Numerics of ``torch_moe``: each expert MLP runs in its weight dtype (as the HF Mixtral/Qwen-MoE expert
loops do); the routing weight is applied in fp32 and the per-token sum over the top-k experts is
accumulated in fp32, then cast once to the input dtype. HF accumulates in the model dtype instead, so
in bf16 the results differ by at most bf16 rounding of the sum (well inside the MoE tolerance); in
fp32 they agree to float rounding.
"""

from enum import IntEnum

import torch
import torch.nn.functional as F

from onboardlm.ops._library import canonical_op
from onboardlm.ops.sharding import check_hints


class ActivationType(IntEnum):
    """Expert activation selector; values are TensorRT-LLM's ``ActivationType`` ones."""

    Gelu = 2
    Silu = 4
    Swiglu = 5
    Relu2 = 8


def _relu2(x: torch.Tensor) -> torch.Tensor:
    return torch.square(F.relu(x))


def _gelu(x: torch.Tensor) -> torch.Tensor:
    # Exact (erf) GELU, as TensorRT-LLM's MoE kernels use for ActivationType.Gelu.
    return F.gelu(x)


_ACTIVATIONS = {
    ActivationType.Gelu: _gelu,
    ActivationType.Silu: F.silu,
    ActivationType.Swiglu: F.silu,
    ActivationType.Relu2: _relu2,
}


def _check_moe_args(
    w1_weight: list[torch.Tensor],
    w2_weight: list[torch.Tensor],
    w3_weight: list[torch.Tensor],
    is_gated_mlp: bool,
    act_fn: int,
    layer_type: str,
) -> None:
    check_hints(layer_type=layer_type)
    if act_fn not in _ACTIVATIONS:
        names = ", ".join(f"{a.name}={a.value}" for a in _ACTIVATIONS)
        raise ValueError(f"act_fn must be an ActivationType ({names}), got {act_fn!r}")
    if len(w2_weight) != len(w1_weight):
        raise ValueError(f"w2_weight has {len(w2_weight)} experts but w1_weight has {len(w1_weight)}")
    if is_gated_mlp and len(w3_weight) != len(w1_weight):
        raise ValueError(
            f"a gated MLP needs one w3_weight per expert: got {len(w3_weight)} for {len(w1_weight)} experts"
        )


@canonical_op("torch_moe")
def torch_moe(
    x: torch.Tensor,
    selected_experts: torch.Tensor,
    routing_weights: torch.Tensor,
    w1_weight: list[torch.Tensor],
    w2_weight: list[torch.Tensor],
    w3_weight: list[torch.Tensor],
    is_gated_mlp: bool = True,
    act_fn: int = int(ActivationType.Silu),
    mapping_config: str = "",
    max_num_tokens: int = 0,
    apply_routing_on_input: bool = False,
    layer_type: str = "moe",
) -> torch.Tensor:
    """Routed experts: ``sum_k routing_weights[t, k] * expert[selected_experts[t, k]](x[t])``.

    ``x`` is ``(T, H)`` or ``(B, S, H)``; ``selected_experts`` and ``routing_weights`` are ``(T, k)``
    (weights already normalised). Expert ids outside ``[0, len(w1_weight))`` are ignored. Gated experts
    compute ``w2 @ (act(w1 @ x) * (w3 @ x))``, non-gated ``w2 @ act(w1 @ x)`` (``w3_weight`` unused).
    ``apply_routing_on_input`` scales the expert input instead of its output. ``mapping_config``,
    ``max_num_tokens`` and ``layer_type`` are distribution hints and change nothing numerically.
    Returns a new tensor shaped and typed like ``x``.
    """
    _check_moe_args(w1_weight, w2_weight, w3_weight, is_gated_mlp, act_fn, layer_type)
    act = _ACTIVATIONS[ActivationType(act_fn)]
    num_experts, top_k = len(w1_weight), selected_experts.shape[-1]
    hidden = x.reshape(-1, x.shape[-1])
    if selected_experts.numel() != hidden.shape[0] * top_k or routing_weights.shape != selected_experts.shape:
        raise ValueError(
            f"selected_experts {tuple(selected_experts.shape)} and routing_weights "
            f"{tuple(routing_weights.shape)} must both be ({hidden.shape[0]}, k) for x {tuple(x.shape)}"
        )

    # Sort the (token, slot) pairs by expert; invalid ids go to an extra bucket that is never run.
    ids = selected_experts.reshape(-1).long()
    ids = torch.where((ids >= 0) & (ids < num_experts), ids, num_experts)
    order = torch.argsort(ids, stable=True)
    counts = torch.bincount(ids, minlength=num_experts + 1).tolist()
    token_chunks = (order // top_k).split(counts)
    weight_chunks = routing_weights.reshape(-1).float()[order].split(counts)

    out = torch.zeros(hidden.shape, dtype=torch.float32, device=x.device)
    for e in range(num_experts):
        if counts[e] == 0:
            continue
        tokens, weights = token_chunks[e], weight_chunks[e][:, None]
        h = hidden.index_select(0, tokens)
        if apply_routing_on_input:
            h = h * weights
        h = h.to(w1_weight[e].dtype)
        inner = act(F.linear(h, w1_weight[e]))
        if is_gated_mlp:
            inner = inner * F.linear(h, w3_weight[e])
        y = F.linear(inner, w2_weight[e]).float()
        out.index_add_(0, tokens, y if apply_routing_on_input else y * weights)
    return out.to(x.dtype).reshape(x.shape)


@torch_moe.register_fake
def _torch_moe_fake(
    x: torch.Tensor,
    selected_experts: torch.Tensor,
    routing_weights: torch.Tensor,
    w1_weight: list[torch.Tensor],
    w2_weight: list[torch.Tensor],
    w3_weight: list[torch.Tensor],
    is_gated_mlp: bool = True,
    act_fn: int = int(ActivationType.Silu),
    mapping_config: str = "",
    max_num_tokens: int = 0,
    apply_routing_on_input: bool = False,
    layer_type: str = "moe",
) -> torch.Tensor:
    _check_moe_args(w1_weight, w2_weight, w3_weight, is_gated_mlp, act_fn, layer_type)
    return torch.empty_like(x)


def _check_top_k(top_k: int, num_experts: int) -> None:
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, {num_experts}] (the number of experts), got {top_k}")


@canonical_op("torch_moe_router")
def torch_moe_router(
    hidden_states: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, top_k: int = 2
) -> torch.Tensor:
    """GPT-OSS router: dense ``(T, E)`` scores, softmax over each token's top-k logits, zeros elsewhere.

    Tokens are flattened to ``(T, H)``; ``logits = hidden_states @ weight.T + bias`` with ``weight``
    ``(E, H)``. Computed in the input dtype, as HF GPT-OSS does.
    """
    _check_top_k(top_k, weight.shape[0])
    logits = F.linear(hidden_states.reshape(-1, hidden_states.shape[-1]), weight, bias)
    top_values, top_indices = torch.topk(logits, top_k, dim=-1)
    return torch.zeros_like(logits).scatter_(1, top_indices, torch.softmax(top_values, dim=-1))


@torch_moe_router.register_fake
def _torch_moe_router_fake(
    hidden_states: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, top_k: int = 2
) -> torch.Tensor:
    _check_top_k(top_k, weight.shape[0])
    num_tokens = hidden_states.numel() // hidden_states.shape[-1]
    return hidden_states.new_empty((num_tokens, weight.shape[0]))


@canonical_op("torch_moe_dense_mlp")
def torch_moe_dense_mlp(
    hidden_states: torch.Tensor,
    routing_weights: torch.Tensor,
    gate_up_w: torch.Tensor,
    gate_up_b: torch.Tensor,
    down_w: torch.Tensor,
    down_b: torch.Tensor,
    alpha: float = 1.0,
    limit: float = 10.0,
) -> torch.Tensor:
    """GPT-OSS experts run densely on every token, then mixed by the ``(T, E)`` routing weights.

    ``gate_up_w`` ``(E, H, 2I)`` holds gate and up interleaved on its last dim (``::2`` / ``1::2``);
    gate is clamped to ``<= limit``, up to ``[-limit, limit]``, and the expert output is
    ``((up + 1) * gate * sigmoid(alpha * gate)) @ down_w + down_b``. Computed in the input dtype, as
    HF GPT-OSS does; output is shaped like ``hidden_states``.
    """
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    gate_up = torch.matmul(hidden, gate_up_w) + gate_up_b[:, None, :]  # (E, T, 2I)
    gate = gate_up[..., ::2].clamp(max=limit)
    up = gate_up[..., 1::2].clamp(min=-limit, max=limit)
    expert_out = torch.matmul((up + 1) * (gate * torch.sigmoid(gate * alpha)), down_w) + down_b[:, None, :]
    mixed = torch.einsum("eth,te->th", expert_out, routing_weights.to(expert_out.dtype))
    return mixed.to(hidden_states.dtype).reshape(hidden_states.shape)


@torch_moe_dense_mlp.register_fake
def _torch_moe_dense_mlp_fake(
    hidden_states: torch.Tensor,
    routing_weights: torch.Tensor,
    gate_up_w: torch.Tensor,
    gate_up_b: torch.Tensor,
    down_w: torch.Tensor,
    down_b: torch.Tensor,
    alpha: float = 1.0,
    limit: float = 10.0,
) -> torch.Tensor:
    return torch.empty_like(hidden_states)
