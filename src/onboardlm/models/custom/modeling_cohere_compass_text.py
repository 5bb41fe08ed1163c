"""Lean, export-friendly CohereCompass on canonical ``auto_deploy`` ops.

Mirrors ``transformers.models.cohere_compass.modeling_cohere_compass`` (CohereCompassForCausalLM):
decoder layers with parallel attention and MLP after one LayerNorm, rotary position embeddings
(default, linear, llama3, yarn, proportional), grouped-query attention and a gated MLP. Module names
equal the checkpoint keys, so HuggingFace state dicts load with ``strict=True``.

Left out on purpose: KV cache, attention masks (attention is causal), dropout, gradient
checkpointing, attention-implementation switches, ``repeat_kv`` (the attention op handles GQA),
position-id generation (callers pass them), hidden-state/attention outputs and the loss.
Linear and reshape calls carry tensor-parallel sharding hints; they do not change the numbers.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CohereCompassTextConfig
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import ModelOutput

import onboardlm.ops  # noqa: F401  (registers torch.ops.auto_deploy.*)
from onboardlm.models.factory import AutoModelForCausalLMFactory


def _rope_inverse_frequencies(config: CohereCompassTextConfig, layer_type: str) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and cos/sin scaling for the layer type's rope_type (static types only)."""
    parameters = config.rope_parameters[layer_type]
    rope_type = parameters.get("rope_type", "default")
    if rope_type in ("dynamic", "longrope"):
        raise NotImplementedError(f"rope_type {rope_type!r} depends on the sequence length at run time")
    if rope_type != "default":
        return ROPE_INIT_FUNCTIONS[rope_type](config, layer_type=layer_type)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    base = parameters["rope_theta"]
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    return inv_freq, 1.0


@dataclass
class CohereCompassCausalLMOutput(ModelOutput):
    logits: torch.FloatTensor | None = None


class CohereCompassLayerNorm(nn.Module):
    """Mean-centred LayerNorm over the last dim in fp32, without a bias."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        normed = F.layer_norm(
            hidden_states.float(), hidden_states.shape[-1:], None, None, self.variance_epsilon
        )
        normed = normed * self.weight.float()
        return normed.to(hidden_states.dtype)


class CohereCompassRotaryEmbedding(nn.Module):
    """cos/sin per layer type (each with its own RoPE parameters), in fp32, once per forward."""

    def __init__(self, config: CohereCompassTextConfig) -> None:
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


class CohereCompassMLP(nn.Module):
    def __init__(self, config: CohereCompassTextConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
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


class CohereCompassAttention(nn.Module):
    def __init__(self, config: CohereCompassTextConfig, layer_idx: int) -> None:
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

        cos, sin = position_embeddings
        q, k = ops.torch_rope_with_explicit_cos_sin(q, k, cos, sin, 2)
        attn = ops.torch_attention(q, k, v, is_causal=True, scale=self.scaling, layout="bsnd")

        attn = ops.view(
            attn, [batch, seq_len, self.num_heads * self.head_dim], tp_scaled_dim=2, layer_type="mha"
        )
        out = ops.torch_linear_simple(
            attn, self.o_proj.weight, self.o_proj.bias, tp_mode="rowwise", layer_type="mha"
        )
        return ops.all_reduce(out, layer_type="mha")


class CohereCompassDecoderLayer(nn.Module):
    def __init__(self, config: CohereCompassTextConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = CohereCompassAttention(config, layer_idx)
        self.mlp = CohereCompassMLP(config)
        self.input_layernorm = CohereCompassLayerNorm(config.hidden_size, config.layer_norm_eps)

    def forward(
        self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        normed = self.input_layernorm(hidden_states)
        return hidden_states + self.self_attn(normed, position_embeddings) + self.mlp(normed)


class CohereCompassPreTrainedModel(PreTrainedModel):
    config_class = CohereCompassTextConfig
    base_model_prefix = "model"
    _no_split_modules = ["CohereCompassDecoderLayer"]


class CohereCompassTextModel(CohereCompassPreTrainedModel):
    def __init__(self, config: CohereCompassTextConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(
            CohereCompassDecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = CohereCompassLayerNorm(config.hidden_size, config.layer_norm_eps)
        self.rotary_emb = CohereCompassRotaryEmbedding(config)
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


class CohereCompassForCausalLM(CohereCompassPreTrainedModel):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: CohereCompassTextConfig) -> None:
        super().__init__(config)
        self.model = CohereCompassTextModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None,
        position_ids: torch.LongTensor,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> CohereCompassCausalLMOutput:
        assert position_ids is not None, "position_ids is required"
        hidden_states = self.model(input_ids, position_ids, inputs_embeds)
        logits = torch.ops.auto_deploy.torch_linear_simple(hidden_states, self.lm_head.weight, None)
        return CohereCompassCausalLMOutput(logits=logits.float())


AutoModelForCausalLMFactory.register_custom_model_cls("CohereCompassTextConfig", CohereCompassForCausalLM)
