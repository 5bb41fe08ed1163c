"""Lean, export-friendly MiMoV2Flash on canonical ``auto_deploy`` ops.

Mirrors ``transformers.models.mimo_v2_flash.modeling_mimo_v2_flash`` (MiMoV2FlashForCausalLM):
pre-norm decoder layers with RMSNorm, partial rotary position embeddings (default, linear, llama3,
yarn, proportional), grouped-query attention and mixture-of-experts feed-forward layers. Also:
attention sinks on the layers where config.layer_types[layer_idx] == "sliding_attention";
sliding-window attention on sliding_attention layers; 2x KV heads on config.layer_types ==
'sliding_attention' layers; values scaled by config.attention_value_scale. Module names equal the
checkpoint keys, so HuggingFace state dicts load with ``strict=True``.

Left out on purpose: KV cache, attention masks (attention is causal), dropout, gradient
checkpointing, attention-implementation switches, ``repeat_kv`` (the attention op handles GQA),
position-id generation (callers pass them), hidden-state/attention outputs and the loss.
Linear and reshape calls carry tensor-parallel sharding hints; they do not change the numbers.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import MiMoV2FlashConfig
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import ModelOutput

import onboardlm.ops  # noqa: F401  (registers torch.ops.auto_deploy.*)
from onboardlm.models.factory import AutoModelForCausalLMFactory
from onboardlm.ops import ActivationType


def _rope_inverse_frequencies(config: MiMoV2FlashConfig, layer_type: str) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and cos/sin scaling for the layer type's rope_type (static types only)."""
    parameters = config.rope_parameters[layer_type]
    rope_type = parameters.get("rope_type", "default")
    if rope_type in ("dynamic", "longrope"):
        raise NotImplementedError(f"rope_type {rope_type!r} depends on the sequence length at run time")
    if rope_type != "default":
        return ROPE_INIT_FUNCTIONS[rope_type](config, layer_type=layer_type)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    base = parameters["rope_theta"]
    dim = int(head_dim * parameters.get("partial_rotary_factor", 1.0))
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    return inv_freq, 1.0


@dataclass
class MiMoV2FlashCausalLMOutput(ModelOutput):
    logits: torch.FloatTensor | None = None


class MiMoV2FlashRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.ops.auto_deploy.torch_rmsnorm(hidden_states, self.weight, self.variance_epsilon)


class MiMoV2FlashRotaryEmbedding(nn.Module):
    """cos/sin per layer type (each with its own RoPE parameters), in fp32, once per forward."""

    def __init__(self, config: MiMoV2FlashConfig) -> None:
        super().__init__()
        self.layer_types = sorted(set(config.layer_types))
        tables = [_rope_inverse_frequencies(config, layer_type) for layer_type in self.layer_types]
        self.attention_scaling = [scaling for _, scaling in tables]
        self.widths = [len(inv_freq) for inv_freq, _ in tables]  # rotary widths may differ per layer type
        inv_freqs = torch.zeros(len(tables), max(self.widths))
        for index, (inv_freq, _) in enumerate(tables):
            inv_freqs[index, : len(inv_freq)] = inv_freq
        self.register_buffer("_ad_inv_freq", inv_freqs, persistent=False)

    def forward(
        self, x: torch.Tensor, position_ids: torch.Tensor, layer_type: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        index = self.layer_types.index(layer_type)
        inv_freq = self._ad_inv_freq[index, : self.widths[index]]
        freqs = position_ids[..., None].float() * inv_freq.float()
        scaling = self.attention_scaling[index]
        angles = torch.cat((freqs, freqs), dim=-1)
        cos = angles.cos() * scaling
        sin = angles.sin() * scaling
        return cos.to(x.dtype), sin.to(x.dtype)


def _store_expert_tensors(
    state_dict: dict[str, torch.Tensor], prefix: str, name: str, stacked: torch.Tensor
) -> None:
    """Split ``stacked`` along its first (expert) dim into ``<prefix><e>.<name>`` entries."""
    state_dict.update({f"{prefix}{index}.{name}": tensor for index, tensor in enumerate(stacked.unbind(0))})


class MiMoV2FlashMLP(nn.Module):
    """Gated MLP of a shared expert or a dense layer (``intermediate_size`` defaults to the config's)."""

    def __init__(self, config: MiMoV2FlashConfig, intermediate_size: int | None = None) -> None:
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


class MiMoV2FlashExpert(nn.Module):
    """One routed expert's weights; MiMoV2FlashMoE runs all experts at once through torch_moe."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)


class MiMoV2FlashTopkRouter(nn.Module):
    """Sigmoid scores; the top-k are chosen on score + ``e_score_correction_bias`` among the experts of
    the ``topk_group`` best of ``n_group`` groups (a group scores the sum of its two best experts).
    The chosen sigmoid scores (renormalised when norm_topk_prob) times ``routed_scaling_factor``
    are the routing weights. Computed in fp32.
    """

    def __init__(self, config: MiMoV2FlashConfig) -> None:
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


class MiMoV2FlashMoE(nn.Module):
    """Mixture of experts behind a sigmoid router with bias-corrected grouped top-k.

    The routed experts run in torch_moe;
    a load hook unpacks HF's packed expert tensors.
    """

    def __init__(self, config: MiMoV2FlashConfig) -> None:
        super().__init__()
        self.gate = MiMoV2FlashTopkRouter(config)
        self.experts = nn.ModuleList(
            MiMoV2FlashExpert(config.hidden_size, config.moe_intermediate_size)
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
        return out.reshape(hidden_states.shape)


class MiMoV2FlashAttention(nn.Module):
    def __init__(self, config: MiMoV2FlashConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = (
            config.num_key_value_heads * 2
            if config.layer_types[layer_idx] == "sliding_attention"
            else config.num_key_value_heads
        )
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.sliding_window = (
            config.sliding_window if config.layer_types[layer_idx] == "sliding_attention" else None
        )
        self.sinks = (
            nn.Parameter(torch.empty(self.num_heads))
            if config.layer_types[layer_idx] == "sliding_attention"
            else None
        )
        self.v_head_dim = config.v_head_dim
        self.value_scale = config.attention_value_scale
        self.q_proj = nn.Linear(
            config.hidden_size, self.num_heads * self.head_dim, bias=config.attention_bias
        )
        self.k_proj = nn.Linear(
            config.hidden_size, self.num_kv_heads * self.head_dim, bias=config.attention_bias
        )
        self.v_proj = nn.Linear(
            config.hidden_size, self.num_kv_heads * self.v_head_dim, bias=config.attention_bias
        )
        self.o_proj = nn.Linear(self.num_heads * self.v_head_dim, config.hidden_size, bias=False)

    def forward(
        self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        ops = torch.ops.auto_deploy
        batch, seq_len = hidden_states.shape[:2]
        q = ops.torch_linear_simple(
            hidden_states, self.q_proj.weight, self.q_proj.bias, tp_mode="colwise", layer_type="mha"
        )
        k = ops.torch_linear_simple(
            hidden_states,
            self.k_proj.weight,
            self.k_proj.bias,
            tp_mode="colwise",
            tp_min_local_shape=self.head_dim,
            layer_type="mha",
        )
        v = ops.torch_linear_simple(
            hidden_states,
            self.v_proj.weight,
            self.v_proj.bias,
            tp_mode="colwise",
            tp_min_local_shape=self.v_head_dim,
            layer_type="mha",
        )
        q = ops.view(q, [batch, seq_len, self.num_heads, self.head_dim], tp_scaled_dim=2, layer_type="mha")
        k = ops.view(k, [batch, seq_len, self.num_kv_heads, self.head_dim], tp_scaled_dim=2, layer_type="mha")
        v = ops.view(
            v, [batch, seq_len, self.num_kv_heads, self.v_head_dim], tp_scaled_dim=2, layer_type="mha"
        )
        v = v * self.value_scale

        cos, sin = position_embeddings
        rotary_dim = cos.shape[-1]
        q_rot, k_rot = ops.torch_rope_with_explicit_cos_sin(
            q[..., :rotary_dim], k[..., :rotary_dim], cos, sin, 2
        )
        q = torch.cat((q_rot, q[..., rotary_dim:]), dim=-1)
        k = torch.cat((k_rot, k[..., rotary_dim:]), dim=-1)
        attn = ops.torch_attention(
            q,
            k,
            v,
            is_causal=True,
            scale=self.scaling,
            sliding_window=self.sliding_window,
            sinks=self.sinks,
            layout="bsnd",
        )

        attn = ops.view(
            attn, [batch, seq_len, self.num_heads * self.v_head_dim], tp_scaled_dim=2, layer_type="mha"
        )
        out = ops.torch_linear_simple(
            attn, self.o_proj.weight, self.o_proj.bias, tp_mode="rowwise", layer_type="mha"
        )
        return ops.all_reduce(out, layer_type="mha")


class MiMoV2FlashDecoderLayer(nn.Module):
    def __init__(self, config: MiMoV2FlashConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = MiMoV2FlashAttention(config, layer_idx)
        self.mlp = (
            MiMoV2FlashMoE(config)
            if config.mlp_layer_types[layer_idx] == "sparse"
            else MiMoV2FlashMLP(config)
        )
        self.input_layernorm = MiMoV2FlashRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = MiMoV2FlashRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings
        )
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class MiMoV2FlashPreTrainedModel(PreTrainedModel):
    config_class = MiMoV2FlashConfig
    base_model_prefix = "model"
    _no_split_modules = ["MiMoV2FlashDecoderLayer"]

    def _check_and_adjust_experts_implementation(self, experts_implementation: str | None) -> str:
        """The experts run in ``torch_moe``: transformers' experts kernels never apply."""
        return "eager"


class MiMoV2FlashModel(MiMoV2FlashPreTrainedModel):
    def __init__(self, config: MiMoV2FlashConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(
            MiMoV2FlashDecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = MiMoV2FlashRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = MiMoV2FlashRotaryEmbedding(config)
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
        position_embeddings = {
            layer_type: self.rotary_emb(inputs_embeds, position_ids, layer_type)
            for layer_type in self.rotary_emb.layer_types
        }
        hidden_states = inputs_embeds
        for layer, layer_type in zip(self.layers, self.config.layer_types, strict=True):
            hidden_states = layer(hidden_states, position_embeddings[layer_type])
        return self.norm(hidden_states)


class MiMoV2FlashForCausalLM(MiMoV2FlashPreTrainedModel):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MiMoV2FlashConfig) -> None:
        super().__init__(config)
        self.model = MiMoV2FlashModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None,
        position_ids: torch.LongTensor,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> MiMoV2FlashCausalLMOutput:
        assert position_ids is not None, "position_ids is required"
        hidden_states = self.model(input_ids, position_ids, inputs_embeds)
        logits = torch.ops.auto_deploy.torch_linear_simple(hidden_states, self.lm_head.weight, None)
        return MiMoV2FlashCausalLMOutput(logits=logits.float())


AutoModelForCausalLMFactory.register_custom_model_cls("MiMoV2FlashConfig", MiMoV2FlashForCausalLM)
