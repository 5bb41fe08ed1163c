"""Lean, export-friendly KimiLinear on canonical ``auto_deploy`` ops.

Mirrors ``transformers.models.kimi_linear.modeling_kimi_linear`` (KimiLinearForCausalLM): a hybrid
stack of pre-norm layers with RMSNorm, built from Kimi delta attention (gated delta rule with a
per-channel decay) mixers, dense MLPs, multi-head latent attention, mixture-of-experts feed-forward.
Layer kinds in the analyzed config: kda+mlp (1 of 2 layers), attention+moe (1 of 2 layers); a
layer's kind is read from config.layer_types[layer_idx]. Module names equal the checkpoint keys, so
HuggingFace state dicts load with ``strict=True``.

Left out on purpose: the KV cache and the mixers' conv and scan states (they run from a zero state
on ``torch_causal_conv1d`` / ``torch_channel_gated_delta_rule``; the runtime swaps in cached
versions), attention masks and padding masks (sequences are causal and unpadded), dropout, gradient
checkpointing, fused-kernel paths, position-id generation (callers pass them), hidden-state outputs
and the loss.
Linear, split, view, conv, scan and gated-norm calls carry tensor-parallel sharding hints; they do
not change the numbers.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import KimiLinearConfig
from transformers.activations import ACT2FN
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import ModelOutput

import onboardlm.ops  # noqa: F401  (registers torch.ops.auto_deploy.*)
from onboardlm.models.factory import AutoModelForCausalLMFactory
from onboardlm.ops import ActivationType


@dataclass
class KimiLinearCausalLMOutput(ModelOutput):
    logits: torch.FloatTensor | None = None


class KimiLinearRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.ops.auto_deploy.torch_rmsnorm(hidden_states, self.weight, self.variance_epsilon)


class KimiLinearRMSNormGated(nn.Module):
    """Per-head RMSNorm of the mixer output, times ``sigmoid(gate)`` after the norm."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        # fp32 norm and gate (the weight is not cast down), cast back at the end
        normed = torch.ops.auto_deploy.torch_rmsnorm(
            hidden_states.float(), self.weight.float(), self.variance_epsilon
        )
        return (normed * torch.sigmoid(gate.float())).to(hidden_states.dtype)


class KimiLinearForgetGate(nn.Module):
    """Forget gate: one log decay per key channel, ``-exp(A_log) * softplus(f + dt_bias)`` with ``f`` the
    input through a low-rank pair of linear maps.
    """

    def __init__(self, config: KimiLinearConfig) -> None:
        super().__init__()
        self.num_heads = config.linear_num_heads
        self.head_dim = config.linear_head_dim
        key_dim = self.num_heads * self.head_dim
        hidden_size = config.hidden_size
        self.dt_bias = nn.Parameter(torch.zeros(key_dim))
        self.A_log = nn.Parameter(torch.zeros(1, 1, self.num_heads, 1))
        self.f_a_proj = nn.Linear(hidden_size, config.linear_head_dim, bias=False)
        self.f_b_proj = nn.Linear(config.linear_head_dim, key_dim, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        ops = torch.ops.auto_deploy
        batch, seq_len = hidden_states.shape[:2]
        gate = ops.torch_linear_simple(
            hidden_states, self.f_a_proj.weight, self.f_a_proj.bias, tp_mode="none", layer_type="delta"
        )
        gate = ops.torch_linear_simple(
            gate, self.f_b_proj.weight, self.f_b_proj.bias, tp_mode="colwise", layer_type="delta"
        )
        gate = ops.view(
            gate, [batch, seq_len, self.num_heads, self.head_dim], tp_scaled_dim=2, layer_type="delta"
        )
        # reshape(-1, ...): the per-head parameters may come cut per rank
        gate = gate.float() + self.dt_bias.float().reshape(-1, self.head_dim)
        rate = self.A_log.float().exp().reshape(-1, 1)
        decay = -rate * F.softplus(gate)
        return decay


class KimiLinearDeltaAttention(nn.Module):
    """Kimi Delta Attention: q / k / v through a depthwise causal conv, a per-key-channel decay from the
    forget gate, write strength sigmoid(b), the per-channel gated delta rule, a gated norm per head."""

    def __init__(self, config: KimiLinearConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.linear_num_heads
        self.head_k_dim = config.linear_head_dim
        self.head_v_dim = config.linear_head_dim
        self.key_dim = self.num_heads * self.head_k_dim
        self.value_dim = self.num_heads * self.head_v_dim
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.conv_kernel_size = config.linear_conv_kernel_dim
        hidden_size = config.hidden_size
        self.q_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
        self.conv1d = nn.Conv1d(
            self.conv_dim,
            self.conv_dim,
            self.conv_kernel_size,
            groups=self.conv_dim,
            bias=False,
            padding=self.conv_kernel_size - 1,
        )
        self.forget_gate = KimiLinearForgetGate(config)
        self.b_proj = nn.Linear(hidden_size, self.num_heads, bias=False)
        self.g_a_proj = nn.Linear(hidden_size, config.linear_head_dim, bias=False)
        self.g_b_proj = nn.Linear(config.linear_head_dim, self.value_dim, bias=False)
        self.o_norm = KimiLinearRMSNormGated(self.head_v_dim, config.rms_norm_eps)
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False)
        self.conv_act = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        ops = torch.ops.auto_deploy
        batch, seq_len = hidden_states.shape[:2]
        key_dim, value_dim, conv_dim = self.key_dim, self.value_dim, self.conv_dim
        q = ops.torch_linear_simple(
            hidden_states, self.q_proj.weight, self.q_proj.bias, tp_mode="colwise", layer_type="delta"
        )
        k = ops.torch_linear_simple(
            hidden_states, self.k_proj.weight, self.k_proj.bias, tp_mode="colwise", layer_type="delta"
        )
        v = ops.torch_linear_simple(
            hidden_states, self.v_proj.weight, self.v_proj.bias, tp_mode="colwise", layer_type="delta"
        )
        mixed_qkv = ops.torch_causal_conv1d(
            torch.cat([q, k, v], dim=-1),
            self.conv1d.weight,
            self.conv1d.bias,
            1,
            self.conv_kernel_size - 1,
            1,
            conv_dim,
            shardable=True,
            output_sizes=[key_dim, key_dim, value_dim],
            layer_type="delta",
        )
        mixed_qkv = self.conv_act(mixed_qkv)
        q, k, v = ops.split_with_sizes(
            mixed_qkv, [key_dim, key_dim, value_dim], dim=-1, enable_sharding=True, layer_type="delta"
        )
        q = ops.view(
            q, [batch, seq_len, self.num_heads, self.head_k_dim], tp_scaled_dim=2, layer_type="delta"
        )
        k = ops.view(
            k, [batch, seq_len, self.num_heads, self.head_k_dim], tp_scaled_dim=2, layer_type="delta"
        )
        v = ops.view(
            v, [batch, seq_len, self.num_heads, self.head_v_dim], tp_scaled_dim=2, layer_type="delta"
        )
        decay = self.forget_gate(hidden_states)
        beta = ops.torch_linear_simple(
            hidden_states, self.b_proj.weight, self.b_proj.bias, tp_mode="colwise", layer_type="delta"
        )
        core = ops.torch_channel_gated_delta_rule(
            q, k, v, decay, torch.sigmoid(beta), shardable=True, layer_type="delta"
        )
        gate = ops.torch_linear_simple(
            hidden_states, self.g_a_proj.weight, self.g_a_proj.bias, tp_mode="none", layer_type="delta"
        )
        gate = ops.torch_linear_simple(
            gate, self.g_b_proj.weight, self.g_b_proj.bias, tp_mode="colwise", layer_type="delta"
        )
        gate = ops.view(
            gate, [batch, seq_len, self.num_heads, self.head_v_dim], tp_scaled_dim=2, layer_type="delta"
        )
        core = self.o_norm(core, gate)
        core = ops.view(core, [batch, seq_len, value_dim], tp_scaled_dim=2, layer_type="delta")
        out = ops.torch_linear_simple(
            core, self.o_proj.weight, self.o_proj.bias, tp_mode="rowwise", layer_type="delta"
        )
        return ops.all_reduce(out, layer_type="delta")


class KimiLinearAttention(nn.Module):
    """Multi-head latent attention: queries through a low-rank q_a/q_b pair (or one q_proj); keys and
    values expanded from the normed KV latent by ``kv_b_proj`` inside ``torch_mla``; one RoPE key part
    ``k_pe`` shared by all heads.
    """

    def __init__(self, config: KimiLinearConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        self.qk_head_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(config.hidden_size, self.q_lora_rank, bias=config.attention_bias)
            self.q_a_layernorm = KimiLinearRMSNorm(self.q_lora_rank, 1e-06)
            self.q_b_proj = nn.Linear(self.q_lora_rank, self.num_heads * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(
            config.hidden_size, self.kv_lora_rank + self.qk_rope_head_dim, bias=config.attention_bias
        )
        self.kv_a_layernorm = KimiLinearRMSNorm(self.kv_lora_rank, 1e-06)
        self.kv_b_proj = nn.Linear(
            self.kv_lora_rank, self.num_heads * (self.qk_nope_head_dim + self.v_head_dim), bias=False
        )
        self.o_proj = nn.Linear(
            self.num_heads * self.v_head_dim, config.hidden_size, bias=config.attention_bias
        )
        self.scaling = self.qk_head_dim**-0.5

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        ops = torch.ops.auto_deploy
        batch, seq_len = hidden_states.shape[:2]
        if self.q_lora_rank is None:
            q = ops.torch_linear_simple(
                hidden_states, self.q_proj.weight, None, tp_mode="colwise", layer_type="mla"
            )
        else:
            q_latent = ops.torch_linear_simple(
                hidden_states, self.q_a_proj.weight, self.q_a_proj.bias, tp_mode="none", layer_type="mla"
            )
            q = ops.torch_linear_simple(
                self.q_a_layernorm(q_latent), self.q_b_proj.weight, None, tp_mode="colwise", layer_type="mla"
            )
        q = ops.view(q, [batch, seq_len, self.num_heads, self.qk_head_dim], tp_scaled_dim=2, layer_type="mla")
        q_nope, q_pe = torch.split(q, [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)

        latent = ops.torch_linear_simple(
            hidden_states,
            self.kv_a_proj_with_mqa.weight,
            self.kv_a_proj_with_mqa.bias,
            tp_mode="none",
            layer_type="mla",
        )
        compressed_kv, k_pe = torch.split(latent, [self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        compressed_kv = self.kv_a_layernorm(compressed_kv)
        k_pe = ops.view(k_pe, [batch, seq_len, 1, self.qk_rope_head_dim], layer_type="mla")

        # no rotary embedding: the k_pe / q_pe channels enter the scores unrotated
        attn = ops.torch_mla(
            q_nope,
            q_pe,
            compressed_kv,
            k_pe,
            self.kv_b_proj.weight,
            is_causal=True,
            scale=self.scaling,
            layout="bsnd",
            enable_sharding=True,
            layer_type="mla",
        )
        attn = ops.view(
            attn, [batch, seq_len, self.num_heads * self.v_head_dim], tp_scaled_dim=2, layer_type="mla"
        )
        out = ops.torch_linear_simple(
            attn, self.o_proj.weight, self.o_proj.bias, tp_mode="rowwise", layer_type="mla"
        )
        return ops.all_reduce(out, layer_type="mla")


def _store_expert_tensors(
    state_dict: dict[str, torch.Tensor], prefix: str, name: str, stacked: torch.Tensor
) -> None:
    """Split ``stacked`` along its first (expert) dim into ``<prefix><e>.<name>`` entries."""
    state_dict.update({f"{prefix}{index}.{name}": tensor for index, tensor in enumerate(stacked.unbind(0))})


class KimiLinearMLP(nn.Module):
    """Gated MLP of a shared expert or a dense layer (``intermediate_size`` defaults to the config's)."""

    def __init__(self, config: KimiLinearConfig, intermediate_size: int | None = None) -> None:
        super().__init__()
        intermediate_size = config.intermediate_size if intermediate_size is None else intermediate_size
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        linear = torch.ops.auto_deploy.torch_linear_simple
        gate = linear(x, self.gate_proj.weight, None, tp_mode="colwise", layer_type="mlp")
        up = linear(x, self.up_proj.weight, None, tp_mode="colwise", layer_type="mlp")
        down = linear(
            self.act_fn(gate) * up, self.down_proj.weight, None, tp_mode="rowwise", layer_type="mlp"
        )
        return torch.ops.auto_deploy.all_reduce(down, layer_type="mlp")


class KimiLinearExpert(nn.Module):
    """One routed expert's weights; KimiLinearMoE runs all experts at once through torch_moe."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)


class KimiLinearTopkRouter(nn.Module):
    """Sigmoid scores; the top-k are chosen on score + ``e_score_correction_bias`` among the experts of
    the ``topk_group`` best of ``n_group`` groups (a group scores the sum of its two best experts).
    The chosen sigmoid scores (renormalised when norm_topk_prob) times ``routed_scaling_factor``
    are the routing weights. Computed in fp32.
    """

    def __init__(self, config: KimiLinearConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.num_local_experts
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.zeros(self.num_experts, config.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(self.num_experts))  # a checkpoint tensor

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert ids and fp32 routing weights, both ``[T, top_k]``, for tokens ``[T, H]``."""
        scores = torch.nn.functional.linear(hidden_states.float(), self.weight.float()).sigmoid()
        choice = scores + self.e_score_correction_bias.float()
        grouped = choice.view(-1, self.n_group, self.num_experts // self.n_group)
        group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
        best_groups = torch.topk(group_scores, k=self.topk_group, dim=-1)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, best_groups, 1.0)
        allowed = group_mask.unsqueeze(-1).expand_as(grouped).reshape(-1, self.num_experts)
        choice = choice.masked_fill(allowed == 0, float("-inf"))
        selected = torch.topk(choice, k=self.top_k, dim=-1)[1]
        weights = scores.gather(1, selected)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return selected, weights * self.routed_scaling_factor


class KimiLinearMoE(nn.Module):
    """Mixture of experts behind a sigmoid router with bias-corrected grouped top-k,
    plus the always-on `shared_experts`.

    The routed experts run in torch_moe;
    a load hook unpacks HF's packed expert tensors.
    """

    def __init__(self, config: KimiLinearConfig) -> None:
        super().__init__()
        self.gate = KimiLinearTopkRouter(config)
        self.experts = nn.ModuleList(
            KimiLinearExpert(config.hidden_size, config.moe_intermediate_size)
            for _ in range(config.num_local_experts)
        )
        self.shared_experts = KimiLinearMLP(
            config, intermediate_size=config.moe_intermediate_size * config.n_shared_experts
        )
        self._register_load_state_dict_pre_hook(self._unpack_packed_experts)

    def _unpack_packed_experts(self, state_dict: dict[str, torch.Tensor], prefix: str, *args: object) -> None:
        """Load hook: HF's packed ``experts.gate_up_proj`` [E, 2I, H] and ``experts.down_proj``
        [E, H, I] become per-expert ``experts.<e>.{gate,up,down}_proj`` keys; gate and up are
        the two halves of gate_up. Per-expert checkpoints load unchanged.
        """
        experts = f"{prefix}experts."
        gate_up = state_dict.pop(f"{experts}gate_up_proj", None)
        if gate_up is not None:
            _store_expert_tensors(state_dict, experts, "gate_proj.weight", gate_up.chunk(2, dim=1)[0])
            _store_expert_tensors(state_dict, experts, "up_proj.weight", gate_up.chunk(2, dim=1)[1])
        down = state_dict.pop(f"{experts}down_proj", None)
        if down is not None:
            _store_expert_tensors(state_dict, experts, "down_proj.weight", down)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        tokens = hidden_states.reshape(-1, hidden_states.shape[-1])
        selected_experts, routing_weights = self.gate(tokens)
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
        shared = self.shared_experts(tokens)
        out = out + shared
        return out.reshape(hidden_states.shape)


class KimiLinearDecoderLayer(nn.Module):
    def __init__(self, config: KimiLinearConfig, layer_idx: int) -> None:
        super().__init__()
        self.block_type = config.layer_types[layer_idx]
        self.input_layernorm = KimiLinearRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = KimiLinearRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = (
            KimiLinearMoE(config) if config.mlp_layer_types[layer_idx] == "sparse" else KimiLinearMLP(config)
        )
        if self.block_type == "linear_attention":  # kda+mlp layers
            self.self_attn = KimiLinearDeltaAttention(config, layer_idx)
        elif self.block_type == "full_attention":  # attention+moe layers
            self.self_attn = KimiLinearAttention(config, layer_idx)
        else:
            raise ValueError(
                f"layer {layer_idx}: block type {self.block_type!r} is none of 'linear_attention', 'full_attention'"
            )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(self.input_layernorm(hidden_states))
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states


class KimiLinearPreTrainedModel(PreTrainedModel):
    config_class = KimiLinearConfig
    base_model_prefix = "model"
    _no_split_modules = ["KimiLinearDecoderLayer"]

    def _check_and_adjust_experts_implementation(self, experts_implementation: str | None) -> str:
        """The experts run in ``torch_moe``: transformers' experts kernels never apply."""
        return "eager"


class KimiLinearModel(KimiLinearPreTrainedModel):
    def __init__(self, config: KimiLinearConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(
            KimiLinearDecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = KimiLinearRMSNorm(config.hidden_size, config.rms_norm_eps)
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
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        return self.norm(hidden_states)


class KimiLinearForCausalLM(KimiLinearPreTrainedModel):
    _tied_weights_keys = {}  # as transformers' class: the head is never tied to the embeddings

    def __init__(self, config: KimiLinearConfig) -> None:
        super().__init__(config)
        self.model = KimiLinearModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None,
        position_ids: torch.LongTensor,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> KimiLinearCausalLMOutput:
        assert position_ids is not None, "position_ids is required"
        hidden_states = self.model(input_ids, position_ids, inputs_embeds)
        logits = torch.ops.auto_deploy.torch_linear_simple(hidden_states, self.lm_head.weight, None)
        return KimiLinearCausalLMOutput(logits=logits.float())


AutoModelForCausalLMFactory.register_custom_model_cls("KimiLinearConfig", KimiLinearForCausalLM)
