"""Lean, export-friendly GraniteSWA on canonical ``auto_deploy`` ops.

Mirrors ``transformers.models.granite_swa.modeling_granite_swa`` (GraniteSWAForCausalLM): pre-norm
decoder layers with RMSNorm, rotary position embeddings (default, linear, llama3, yarn,
proportional), grouped-query attention and a gated MLP. Also: sliding-window attention on
sliding_attention layers; embeddings scaled by config.embedding_multiplier; logits divide by
config.logits_scaling. Module names equal the checkpoint keys, so HuggingFace state dicts load with
``strict=True``.

Left out on purpose: KV cache, attention masks (attention is causal), dropout, gradient
checkpointing, attention-implementation switches, ``repeat_kv`` (the attention op handles GQA),
position-id generation (callers pass them), hidden-state/attention outputs and the loss.
Linear and reshape calls carry tensor-parallel sharding hints; they do not change the numbers.
"""

import copy
from dataclasses import dataclass

import torch
from torch import nn
from transformers import GraniteSWAConfig
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import ModelOutput

import onboardlm.ops  # noqa: F401  (registers torch.ops.auto_deploy.*)
from onboardlm.models.factory import AutoModelForCausalLMFactory


def _rope_inverse_frequencies(config: GraniteSWAConfig, base: float) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and cos/sin scaling for the config's rope_type on RoPE base ``base`` (static types only)."""
    rope_type = config.rope_parameters.get("rope_type", "default")
    if rope_type in ("dynamic", "longrope"):
        raise NotImplementedError(f"rope_type {rope_type!r} depends on the sequence length at run time")
    if rope_type != "default":  # transformers' function on a copy of the config with this base
        config = copy.deepcopy(config)
        config.rope_parameters = {**config.rope_parameters, "rope_theta": base}
        return ROPE_INIT_FUNCTIONS[rope_type](config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    return inv_freq, 1.0


@dataclass
class GraniteSWACausalLMOutput(ModelOutput):
    logits: torch.FloatTensor | None = None


class GraniteSWARMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.ops.auto_deploy.torch_rmsnorm(hidden_states, self.weight, self.variance_epsilon)


class GraniteSWARotaryEmbedding(nn.Module):
    """cos/sin of ``position_ids * inv_freq`` on one RoPE base, in fp32 once per forward for the layers
    whose ``config.layer_rope_theta`` entry it is."""

    def __init__(self, config: GraniteSWAConfig, base: float) -> None:
        super().__init__()
        self.base = base
        inv_freq, self.attention_scaling = _rope_inverse_frequencies(config, base)
        self.register_buffer("_ad_inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self._ad_inv_freq.float()
        angles = torch.cat((freqs, freqs), dim=-1)
        cos = angles.cos() * self.attention_scaling
        sin = angles.sin() * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)


class GraniteSWAMLP(nn.Module):
    def __init__(self, config: GraniteSWAConfig) -> None:
        super().__init__()
        bias = config.mlp_bias
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        linear = torch.ops.auto_deploy.torch_linear_simple
        gate = linear(x, self.gate_proj.weight, self.gate_proj.bias, tp_mode="colwise", layer_type="mlp")
        up = linear(x, self.up_proj.weight, self.up_proj.bias, tp_mode="colwise", layer_type="mlp")
        down = linear(
            self.act_fn(gate) * up,
            self.down_proj.weight,
            self.down_proj.bias,
            tp_mode="rowwise",
            layer_type="mlp",
        )
        return torch.ops.auto_deploy.all_reduce(down, layer_type="mlp")


class GraniteSWAAttention(nn.Module):
    def __init__(self, config: GraniteSWAConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.scaling = config.attention_multiplier
        self.sliding_window = (
            config.sliding_window if config.layer_types[layer_idx] == "sliding_attention" else None
        )
        self.sinks = nn.Parameter(torch.empty(self.num_heads))
        self.use_rope = bool(config.layer_rope_theta[layer_idx])
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)

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
            tp_min_local_shape=self.head_dim,
            layer_type="mha",
        )
        q = ops.view(q, [batch, seq_len, self.num_heads, self.head_dim], tp_scaled_dim=2, layer_type="mha")
        k = ops.view(k, [batch, seq_len, self.num_kv_heads, self.head_dim], tp_scaled_dim=2, layer_type="mha")
        v = ops.view(v, [batch, seq_len, self.num_kv_heads, self.head_dim], tp_scaled_dim=2, layer_type="mha")

        if self.use_rope:
            cos, sin = position_embeddings
            q, k = ops.torch_rope_with_explicit_cos_sin(q, k, cos, sin, 2)
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
            attn, [batch, seq_len, self.num_heads * self.head_dim], tp_scaled_dim=2, layer_type="mha"
        )
        out = ops.torch_linear_simple(
            attn, self.o_proj.weight, self.o_proj.bias, tp_mode="rowwise", layer_type="mha"
        )
        return ops.all_reduce(out, layer_type="mha")


class GraniteSWADecoderLayer(nn.Module):
    def __init__(self, config: GraniteSWAConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = GraniteSWAAttention(config, layer_idx)
        self.mlp = GraniteSWAMLP(config)
        self.input_layernorm = GraniteSWARMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = GraniteSWARMSNorm(config.hidden_size, config.rms_norm_eps)
        self.residual_multiplier = config.residual_multiplier

    def forward(
        self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        hidden_states = (
            hidden_states
            + self.self_attn(self.input_layernorm(hidden_states), position_embeddings)
            * self.residual_multiplier
        )
        return (
            hidden_states + self.mlp(self.post_attention_layernorm(hidden_states)) * self.residual_multiplier
        )


class GraniteSWAPreTrainedModel(PreTrainedModel):
    config_class = GraniteSWAConfig
    base_model_prefix = "model"
    _no_split_modules = ["GraniteSWADecoderLayer"]


class GraniteSWAModel(GraniteSWAPreTrainedModel):
    def __init__(self, config: GraniteSWAConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(
            GraniteSWADecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = GraniteSWARMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_embs = nn.ModuleList(
            GraniteSWARotaryEmbedding(config, base)
            for base in sorted({b for b in config.layer_rope_theta if b})
        )
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
        position_embeddings = {
            rotary.base: rotary(inputs_embeds, position_ids) for rotary in self.rotary_embs
        }
        hidden_states = inputs_embeds * self.embed_scale
        for index, layer in enumerate(self.layers):
            hidden_states = layer(hidden_states, position_embeddings.get(self.config.layer_rope_theta[index]))
        return self.norm(hidden_states)


class GraniteSWAForCausalLM(GraniteSWAPreTrainedModel):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: GraniteSWAConfig) -> None:
        super().__init__(config)
        self.model = GraniteSWAModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.logits_scaling = config.logits_scaling
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None,
        position_ids: torch.LongTensor,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> GraniteSWACausalLMOutput:
        assert position_ids is not None, "position_ids is required"
        hidden_states = self.model(input_ids, position_ids, inputs_embeds)
        logits = torch.ops.auto_deploy.torch_linear_simple(hidden_states, self.lm_head.weight, None)
        logits = logits / self.logits_scaling
        return GraniteSWACausalLMOutput(logits=logits.float())


AutoModelForCausalLMFactory.register_custom_model_cls("GraniteSWAConfig", GraniteSWAForCausalLM)
