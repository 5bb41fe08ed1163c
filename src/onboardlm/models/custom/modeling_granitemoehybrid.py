"""Lean, export-friendly GraniteMoeHybrid on canonical ``auto_deploy`` ops.

Mirrors ``transformers.models.granitemoehybrid.modeling_granitemoehybrid``
(GraniteMoeHybridForCausalLM): a hybrid stack of pre-norm layers with RMSNorm, built from Mamba2 SSD
mixers, mixture-of-experts feed-forward, dense MLPs. Layer kinds in the analyzed config: mamba2+moe
(2 of 2 layers); a layer's kind is read from config.layer_types[layer_idx]; residual steps with
blocks in parallel on one normed input, multipliers on block inputs, outputs or residual adds.
Module names equal the checkpoint keys, so HuggingFace state dicts load with ``strict=True``.

Left out on purpose: the KV cache and the mixers' conv and scan states (they run from a zero state
on ``torch_causal_conv1d`` / ``torch_ssm``; the runtime swaps in cached versions), attention masks
and padding masks (sequences are causal and unpadded), dropout, gradient checkpointing, fused-kernel
paths, position-id generation (callers pass them), hidden-state outputs and the loss.
Linear, split, view, conv, scan and gated-norm calls carry tensor-parallel sharding hints; they do
not change the numbers.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import GraniteMoeHybridConfig
from transformers.activations import ACT2FN
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import ModelOutput

import onboardlm.ops  # noqa: F401  (registers torch.ops.auto_deploy.*)
from onboardlm.models.factory import AutoModelForCausalLMFactory
from onboardlm.ops import ActivationType


@dataclass
class GraniteMoeHybridCausalLMOutput(ModelOutput):
    logits: torch.FloatTensor | None = None


class GraniteMoeHybridRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.ops.auto_deploy.torch_rmsnorm(hidden_states, self.weight, self.variance_epsilon)


class GraniteMoeHybridRMSNormGated(nn.Module):
    """Grouped RMSNorm of the SSM output, gated by SiLU(gate) before the norm."""

    def __init__(self, hidden_size: int, group_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps
        self.group_size = group_size

    def forward(self, hidden_states: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return torch.ops.auto_deploy.torch_rmsnorm_gated(
            hidden_states,
            self.weight,
            gate,
            self.variance_epsilon,
            self.group_size,
            norm_before_gate=False,
            tp_mode="colwise",
            layer_type="ssm",
        )


class GraniteMoeHybridMambaLayer(nn.Module):
    """Mamba2 (SSD) mixer: in_proj -> causal depthwise conv on x|B|C -> selective scan -> gated RMSNorm
    -> out_proj. The conv and the scan run from a zero state here; the runtime's cache transform swaps
    in their cached versions (conv and SSM state per sequence)."""

    def __init__(self, config: GraniteMoeHybridConfig, layer_idx: int) -> None:
        super().__init__()
        self.num_heads = config.mamba_n_heads
        self.n_groups = config.mamba_n_groups
        self.ssm_state_size = config.mamba_d_state
        self.intermediate_size = int(config.mamba_expand * config.hidden_size)
        self.head_dim = self.intermediate_size // self.num_heads
        self.conv_kernel_size = config.mamba_d_conv
        self.conv_dim = self.intermediate_size + 2 * self.n_groups * self.ssm_state_size
        self.chunk_size = config.mamba_chunk_size
        self.time_step_limit = [float(value) for value in config.time_step_limit]
        self.in_proj = nn.Linear(
            config.hidden_size,
            self.intermediate_size + self.conv_dim + self.num_heads,
            bias=config.mamba_proj_bias,
        )
        self.conv1d = nn.Conv1d(
            self.conv_dim,
            self.conv_dim,
            kernel_size=self.conv_kernel_size,
            groups=self.conv_dim,
            padding=self.conv_kernel_size - 1,
            bias=config.mamba_conv_bias,
        )
        self.act = ACT2FN[config.hidden_act]
        self.dt_bias = nn.Parameter(torch.ones(self.num_heads))
        self.A_log = nn.Parameter(torch.zeros(self.num_heads))
        self.D = nn.Parameter(torch.ones(self.num_heads))
        self.norm = GraniteMoeHybridRMSNormGated(
            self.intermediate_size, self.intermediate_size // self.n_groups, config.rms_norm_eps
        )
        self.out_proj = nn.Linear(self.intermediate_size, config.hidden_size, bias=config.mamba_proj_bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        ops = torch.ops.auto_deploy
        batch, seq_len, _ = hidden_states.shape
        inner, group_state = self.intermediate_size, self.n_groups * self.ssm_state_size
        projected = ops.torch_linear_simple(
            hidden_states,
            self.in_proj.weight,
            self.in_proj.bias,
            tp_mode="colwise",
            output_sizes=[inner, inner, group_state, group_state, self.num_heads],
            layer_type="ssm",
        )
        gate, xbc, dt = ops.split_with_sizes(
            projected, [inner, self.conv_dim, self.num_heads], dim=-1, enable_sharding=True, layer_type="ssm"
        )
        xbc = ops.torch_causal_conv1d(
            xbc,
            self.conv1d.weight,
            self.conv1d.bias,
            padding=self.conv_kernel_size - 1,
            groups=self.conv_dim,
            shardable=True,
            output_sizes=[inner, group_state, group_state],
            layer_type="ssm",
        )
        xbc = self.act(xbc)
        x, B, C = ops.split_with_sizes(
            xbc, [inner, group_state, group_state], dim=-1, enable_sharding=True, layer_type="ssm"
        )
        x = ops.view(x, [batch, seq_len, self.num_heads, self.head_dim], tp_scaled_dim=2, layer_type="ssm")
        B = ops.view(
            B, [batch, seq_len, self.n_groups, self.ssm_state_size], tp_scaled_dim=2, layer_type="ssm"
        )
        C = ops.view(
            C, [batch, seq_len, self.n_groups, self.ssm_state_size], tp_scaled_dim=2, layer_type="ssm"
        )
        y = ops.torch_ssm(
            x,
            -torch.exp(self.A_log.float()),
            B,
            C,
            self.D,
            dt,
            self.dt_bias,
            self.time_step_limit,
            self.chunk_size,
            shardable=True,
            layer_type="ssm",
        )
        y = ops.view(y, [batch, seq_len, inner], tp_scaled_dim=2, layer_type="ssm")
        y = self.norm(y, gate)
        out = ops.torch_linear_simple(
            y.to(hidden_states.dtype),
            self.out_proj.weight,
            self.out_proj.bias,
            tp_mode="rowwise",
            layer_type="ssm",
        )
        return ops.all_reduce(out, layer_type="ssm")


def _store_expert_tensors(
    state_dict: dict[str, torch.Tensor], prefix: str, name: str, stacked: torch.Tensor
) -> None:
    """Split ``stacked`` along its first (expert) dim into ``<prefix><e>.<name>`` entries."""
    state_dict.update({f"{prefix}{index}.{name}": tensor for index, tensor in enumerate(stacked.unbind(0))})


class GraniteMoeHybridExpert(nn.Module):
    """One routed expert's weights; GraniteMoeHybridMoE runs all experts at once through torch_moe."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)


class GraniteMoeHybridTopKRouter(nn.Module):
    """Softmax over all experts, then each token's top-k, renormalised."""

    def __init__(self, config: GraniteMoeHybridConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.weight = nn.Parameter(torch.zeros(config.num_local_experts, config.hidden_size))

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert ids and fp32 routing weights, both ``[T, top_k]``, for tokens ``[T, H]``."""
        logits = torch.nn.functional.linear(hidden_states, self.weight)
        weights, selected = torch.topk(torch.softmax(logits.float(), dim=-1), self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return selected, weights


class GraniteMoeHybridMoE(nn.Module):
    """Mixture of experts behind a softmax top-k router.

    The routed experts run in torch_moe;
    a load hook unpacks HF's packed expert tensors.
    """

    def __init__(self, config: GraniteMoeHybridConfig) -> None:
        super().__init__()
        self.router = GraniteMoeHybridTopKRouter(config)
        self.experts = nn.ModuleList(
            GraniteMoeHybridExpert(config.hidden_size, config.intermediate_size)
            for _ in range(config.num_local_experts)
        )
        self._register_load_state_dict_pre_hook(self._unpack_packed_experts)

    def _unpack_packed_experts(self, state_dict: dict[str, torch.Tensor], prefix: str, *args: object) -> None:
        """Load hook: HF's packed ``experts.gate_up_proj`` [E, 2I, H] and ``experts.down_proj``
        [E, H, I] become per-expert ``experts.<e>.{gate,up,down}_proj`` keys; gate and up are
        the two halves of gate_up. Per-expert checkpoints load unchanged.
        """
        experts = f"{prefix}experts."
        gate_up = state_dict.pop(f"{experts}gate_up_proj", None)
        if gate_up is None:  # the name checkpoints on disk use
            gate_up = state_dict.pop(f"{prefix}input_linear.weight", None)
        if gate_up is not None:
            _store_expert_tensors(state_dict, experts, "gate_proj.weight", gate_up.chunk(2, dim=1)[0])
            _store_expert_tensors(state_dict, experts, "up_proj.weight", gate_up.chunk(2, dim=1)[1])
        down = state_dict.pop(f"{experts}down_proj", None)
        if down is None:
            down = state_dict.pop(f"{prefix}output_linear.weight", None)
        if down is not None:
            _store_expert_tensors(state_dict, experts, "down_proj.weight", down)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        tokens = hidden_states.reshape(-1, hidden_states.shape[-1])
        selected_experts, routing_weights = self.router(tokens)
        out = torch.ops.auto_deploy.torch_moe(
            tokens,
            selected_experts,
            routing_weights,
            w1_weight=[expert.gate_proj.weight for expert in self.experts],
            w2_weight=[expert.down_proj.weight for expert in self.experts],
            w3_weight=[expert.up_proj.weight for expert in self.experts],
            is_gated_mlp=True,
            act_fn=ActivationType.Silu,
            layer_type="moe",
        )
        out = torch.ops.auto_deploy.all_reduce(out, layer_type="moe")
        return out.reshape(hidden_states.shape)


class GraniteMoeHybridMLP(nn.Module):
    def __init__(self, config: GraniteMoeHybridConfig) -> None:
        super().__init__()
        self.intermediate_size = config.shared_intermediate_size
        self.input_linear = nn.Linear(config.hidden_size, 2 * self.intermediate_size, bias=False)
        self.output_linear = nn.Linear(self.intermediate_size, config.hidden_size, bias=False)
        self.activation = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        linear = torch.ops.auto_deploy.torch_linear_simple
        gate_up = linear(
            x,
            self.input_linear.weight,
            self.input_linear.bias,
            tp_mode="colwise",
            output_sizes=[self.intermediate_size, self.intermediate_size],
            layer_type="mlp",
        )
        gate, up = torch.ops.auto_deploy.split_with_sizes(
            gate_up,
            [self.intermediate_size, self.intermediate_size],
            dim=-1,
            enable_sharding=True,
            layer_type="mlp",
        )
        down = linear(
            self.activation(gate) * up,
            self.output_linear.weight,
            self.output_linear.bias,
            tp_mode="rowwise",
            layer_type="mlp",
        )
        return torch.ops.auto_deploy.all_reduce(down, layer_type="mlp")


class GraniteMoeHybridDecoderLayer(nn.Module):
    def __init__(self, config: GraniteMoeHybridConfig, layer_idx: int) -> None:
        super().__init__()
        if config.layer_types[layer_idx] != "linear_attention":
            raise NotImplementedError(
                f"layer {layer_idx}: only 'linear_attention' layers are built by this file"
            )
        if not (config.num_local_experts > 0):
            raise NotImplementedError(
                f"layer {layer_idx}: layers without the MoE (config.num_local_experts > 0 is false) are not built by this file"
            )
        self.input_layernorm = GraniteMoeHybridRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mamba = GraniteMoeHybridMambaLayer(config, layer_idx)
        self.post_attention_layernorm = GraniteMoeHybridRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.block_sparse_moe = GraniteMoeHybridMoE(config)
        self.shared_mlp = GraniteMoeHybridMLP(config)
        self.residual_multiplier = config.residual_multiplier

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = (
            hidden_states + self.mamba(self.input_layernorm(hidden_states)) * self.residual_multiplier
        )
        normed = self.post_attention_layernorm(hidden_states)
        hidden_states = (
            hidden_states
            + (self.block_sparse_moe(normed) + self.shared_mlp(normed)) * self.residual_multiplier
        )
        return hidden_states


class GraniteMoeHybridPreTrainedModel(PreTrainedModel):
    config_class = GraniteMoeHybridConfig
    base_model_prefix = "model"
    _no_split_modules = ["GraniteMoeHybridDecoderLayer"]

    def _check_and_adjust_experts_implementation(self, experts_implementation: str | None) -> str:
        """The experts run in ``torch_moe``: transformers' experts kernels never apply."""
        return "eager"


class GraniteMoeHybridModel(GraniteMoeHybridPreTrainedModel):
    def __init__(self, config: GraniteMoeHybridConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(
            GraniteMoeHybridDecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = GraniteMoeHybridRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.embed_scale = config.embedding_multiplier
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None,
        position_ids: torch.LongTensor,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        assert position_ids is not None, "position_ids is required"
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        hidden_states = inputs_embeds * self.embed_scale
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        return self.norm(hidden_states)


class GraniteMoeHybridForCausalLM(GraniteMoeHybridPreTrainedModel):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: GraniteMoeHybridConfig) -> None:
        super().__init__(config)
        self.model = GraniteMoeHybridModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.logits_scaling = config.logits_scaling
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None,
        position_ids: torch.LongTensor,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> GraniteMoeHybridCausalLMOutput:
        assert position_ids is not None, "position_ids is required"
        hidden_states = self.model(input_ids, position_ids, inputs_embeds)
        logits = torch.ops.auto_deploy.torch_linear_simple(hidden_states, self.lm_head.weight, None)
        logits = logits / self.logits_scaling
        return GraniteMoeHybridCausalLMOutput(logits=logits.float())


AutoModelForCausalLMFactory.register_custom_model_cls("GraniteMoeHybridConfig", GraniteMoeHybridForCausalLM)
