"""Lean, export-friendly Doge on canonical ``auto_deploy`` ops.

Mirrors ``transformers.models.doge.modeling_doge`` (DogeForCausalLM): pre-norm decoder layers with
RMSNorm, rotary position embeddings (default, linear, llama3, yarn, proportional), grouped-query
attention with q/k norm and a gated MLP. Also: not for configs with config.is_moe=True (measured:
other modules). Module names equal the checkpoint keys, so HuggingFace state dicts load with
``strict=True``.

Left out on purpose: KV cache, attention masks (attention is causal), dropout, gradient
checkpointing, attention-implementation switches, ``repeat_kv`` (the attention op handles GQA),
position-id generation (callers pass them), hidden-state/attention outputs and the loss.
Linear and reshape calls carry tensor-parallel sharding hints; they do not change the numbers.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DogeConfig
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import ModelOutput

import onboardlm.ops  # noqa: F401  (registers torch.ops.auto_deploy.*)
from onboardlm.models.factory import AutoModelForCausalLMFactory


def _rope_inverse_frequencies(config: DogeConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and cos/sin scaling for the config's rope_type (static types only)."""
    rope_type = config.rope_parameters.get("rope_type", "default")
    if rope_type in ("dynamic", "longrope"):
        raise NotImplementedError(f"rope_type {rope_type!r} depends on the sequence length at run time")
    if rope_type != "default":
        return ROPE_INIT_FUNCTIONS[rope_type](config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    base = config.rope_parameters["rope_theta"]
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    return inv_freq, 1.0


@dataclass
class DogeCausalLMOutput(ModelOutput):
    logits: torch.FloatTensor | None = None


class DogeRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.ops.auto_deploy.torch_rmsnorm(hidden_states, self.weight, self.variance_epsilon)


class DogeRotaryEmbedding(nn.Module):
    """cos/sin of ``position_ids * inv_freq``, computed in fp32 once per forward for all layers."""

    def __init__(self, config: DogeConfig) -> None:
        super().__init__()
        inv_freq, self.attention_scaling = _rope_inverse_frequencies(config)
        self.register_buffer("_ad_inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self._ad_inv_freq.float()
        angles = torch.cat((freqs, freqs), dim=-1)
        cos = angles.cos() * self.attention_scaling
        sin = angles.sin() * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)


class DogeMLP(nn.Module):
    def __init__(self, config: DogeConfig) -> None:
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


class DogeAttention(nn.Module):
    def __init__(self, config: DogeConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        self.dt_proj = nn.Linear(
            self.num_kv_heads * self.head_dim, self.num_kv_heads, bias=config.attention_bias
        )
        self.A = nn.Parameter(torch.zeros(self.num_kv_heads))
        self.keep_window = config.keep_window_size
        self.q_norm = DogeRMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = DogeRMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(
        self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        ops = torch.ops.auto_deploy
        batch, seq_len = hidden_states.shape[:2]
        q = ops.torch_linear_simple(
            hidden_states, self.q_proj.weight, self.q_proj.bias, tp_mode="none", layer_type="mha"
        )
        k = ops.torch_linear_simple(
            hidden_states,
            self.k_proj.weight,
            self.k_proj.bias,
            tp_mode="none",
            tp_min_local_shape=self.head_dim,
            layer_type="mha",
        )
        v = ops.torch_linear_simple(
            hidden_states,
            self.v_proj.weight,
            self.v_proj.bias,
            tp_mode="none",
            tp_min_local_shape=self.head_dim,
            layer_type="mha",
        )
        q = ops.view(q, [batch, seq_len, self.num_heads, self.head_dim], tp_scaled_dim=-1, layer_type="mha")
        k = ops.view(
            k, [batch, seq_len, self.num_kv_heads, self.head_dim], tp_scaled_dim=-1, layer_type="mha"
        )
        v = ops.view(
            v, [batch, seq_len, self.num_kv_heads, self.head_dim], tp_scaled_dim=-1, layer_type="mha"
        )
        q = self.q_norm(q)
        k = self.k_norm(k)

        cos, sin = position_embeddings
        q, k = ops.torch_rope_with_explicit_cos_sin(q, k, cos, sin, 2)
        # a bias per key/value head and key on the scores, from the values: exp(A * softplus(dt_proj(v)))
        values = ops.view(
            v, [batch, seq_len, self.num_kv_heads * self.head_dim], tp_scaled_dim=-1, layer_type="mha"
        )
        dt = ops.torch_linear_simple(
            values, self.dt_proj.weight, self.dt_proj.bias, tp_mode="none", layer_type="mha"
        )
        key_bias = torch.exp(self.A * F.softplus(dt)).transpose(1, 2)  # [batch, kv_heads, seq_len]
        attn = ops.torch_attention_key_bias(q, k, v, key_bias, self.keep_window, True, self.scaling, "bsnd")

        attn = ops.view(
            attn, [batch, seq_len, self.num_heads * self.head_dim], tp_scaled_dim=-1, layer_type="mha"
        )
        out = ops.torch_linear_simple(
            attn, self.o_proj.weight, self.o_proj.bias, tp_mode="none", layer_type="mha"
        )
        return ops.all_reduce(out, layer_type="mha")


class DogeDecoderLayer(nn.Module):
    def __init__(self, config: DogeConfig, layer_idx: int) -> None:
        super().__init__()
        if config.is_moe:
            raise NotImplementedError("config.is_moe=True is not reproduced by this file")
        self.self_attn = DogeAttention(config, layer_idx)
        self.mlp = DogeMLP(config)
        self.input_layernorm = DogeRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = DogeRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.input_residual = nn.Parameter(torch.ones(config.hidden_size))
        self.post_attention_residual = nn.Parameter(torch.ones(config.hidden_size))

    def forward(
        self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        hidden_states = self.input_residual * hidden_states + self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings
        )
        return self.post_attention_residual * hidden_states + self.mlp(
            self.post_attention_layernorm(hidden_states)
        )


class DogePreTrainedModel(PreTrainedModel):
    config_class = DogeConfig
    base_model_prefix = "model"
    _no_split_modules = ["DogeDecoderLayer"]


class DogeModel(DogePreTrainedModel):
    def __init__(self, config: DogeConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(DogeDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = DogeRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = DogeRotaryEmbedding(config)
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
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(hidden_states, position_embeddings)
        return self.norm(hidden_states)


class DogeForCausalLM(DogePreTrainedModel):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DogeConfig) -> None:
        super().__init__(config)
        self.model = DogeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None,
        position_ids: torch.LongTensor,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> DogeCausalLMOutput:
        assert position_ids is not None, "position_ids is required"
        hidden_states = self.model(input_ids, position_ids, inputs_embeds)
        logits = torch.ops.auto_deploy.torch_linear_simple(hidden_states, self.lm_head.weight, None)
        return DogeCausalLMOutput(logits=logits.float())


AutoModelForCausalLMFactory.register_custom_model_cls("DogeConfig", DogeForCausalLM)
