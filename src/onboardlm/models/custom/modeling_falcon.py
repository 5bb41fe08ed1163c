"""Lean, export-friendly Falcon on canonical ``auto_deploy`` ops.

Mirrors ``transformers.models.falcon.modeling_falcon`` (FalconForCausalLM): decoder layers with
parallel attention and MLP after one LayerNorm, rotary position embeddings (default, linear, llama3,
yarn, proportional), grouped-query attention and a plain MLP. Also: not for configs with
config.alibi=True, config.new_decoder_architecture=True, config.parallel_attn=False (measured: other
modules). Module names equal the checkpoint keys, so HuggingFace state dicts load with
``strict=True``.

Left out on purpose: KV cache, attention masks (attention is causal), dropout, gradient
checkpointing, attention-implementation switches, ``repeat_kv`` (the attention op handles GQA),
position-id generation (callers pass them), hidden-state/attention outputs and the loss.
Linear and reshape calls carry tensor-parallel sharding hints; they do not change the numbers.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import FalconConfig
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import ModelOutput

import onboardlm.ops  # noqa: F401  (registers torch.ops.auto_deploy.*)
from onboardlm.models.factory import AutoModelForCausalLMFactory


def _rope_inverse_frequencies(config: FalconConfig) -> tuple[torch.Tensor, float]:
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
class FalconCausalLMOutput(ModelOutput):
    logits: torch.FloatTensor | None = None


class FalconRotaryEmbedding(nn.Module):
    """cos/sin of ``position_ids * inv_freq``, computed in fp32 once per forward for all layers."""

    def __init__(self, config: FalconConfig) -> None:
        super().__init__()
        inv_freq, self.attention_scaling = _rope_inverse_frequencies(config)
        self.register_buffer("_ad_inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self._ad_inv_freq.float()
        angles = torch.cat((freqs, freqs), dim=-1)
        cos = angles.cos() * self.attention_scaling
        sin = angles.sin() * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)


class FalconMLP(nn.Module):
    def __init__(self, config: FalconConfig) -> None:
        super().__init__()
        bias = config.bias
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.ffn_hidden_size, bias=bias)
        self.dense_4h_to_h = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=bias)
        self.act = ACT2FN[config.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        linear = torch.ops.auto_deploy.torch_linear_simple
        hidden = linear(
            x, self.dense_h_to_4h.weight, self.dense_h_to_4h.bias, tp_mode="colwise", layer_type="mlp"
        )
        down = linear(
            self.act(hidden),
            self.dense_4h_to_h.weight,
            self.dense_4h_to_h.bias,
            tp_mode="rowwise",
            layer_type="mlp",
        )
        return torch.ops.auto_deploy.all_reduce(down, layer_type="mlp")


class FalconAttention(nn.Module):
    def __init__(self, config: FalconConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = (
            config.num_kv_heads if config.new_decoder_architecture or not config.multi_query else 1
        )
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        bias = config.bias
        self.query_key_value = nn.Linear(
            config.hidden_size, (self.num_heads + 2 * self.num_kv_heads) * self.head_dim, bias=bias
        )
        self.dense = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        self.multi_query = config.multi_query

    def forward(
        self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        ops = torch.ops.auto_deploy
        batch, seq_len = hidden_states.shape[:2]
        if not self.multi_query:
            sizes = [
                self.head_dim,
                self.head_dim,
                self.head_dim,
            ]  # q, k, v in each of the self.num_heads groups
            qkv = ops.torch_linear_simple(
                hidden_states,
                self.query_key_value.weight,
                self.query_key_value.bias,
                tp_mode="colwise",
                tp_min_local_shape=sum(sizes),
                layer_type="mha",
            )
            qkv = ops.view(
                qkv, [batch, seq_len, self.num_heads, sum(sizes)], tp_scaled_dim=2, layer_type="mha"
            )
            q, k, v = ops.split_with_sizes(qkv, sizes, dim=-1, layer_type="mha")
        else:
            sizes = [
                self.num_heads * self.head_dim,
                self.num_kv_heads * self.head_dim,
                self.num_kv_heads * self.head_dim,
            ]
            qkv = ops.torch_linear_simple(
                hidden_states,
                self.query_key_value.weight,
                self.query_key_value.bias,
                tp_mode="colwise",
                output_sizes=sizes,
                tp_min_local_shape=self.head_dim,
                layer_type="mha",
            )
            q, k, v = ops.split_with_sizes(qkv, sizes, dim=-1, enable_sharding=True, layer_type="mha")
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
            attn, self.dense.weight, self.dense.bias, tp_mode="rowwise", layer_type="mha"
        )
        return ops.all_reduce(out, layer_type="mha")


class FalconDecoderLayer(nn.Module):
    def __init__(self, config: FalconConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attention = FalconAttention(config, layer_idx)
        self.mlp = FalconMLP(config)
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)

    def forward(
        self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        normed = self.input_layernorm(hidden_states)
        return hidden_states + self.self_attention(normed, position_embeddings) + self.mlp(normed)


class FalconPreTrainedModel(PreTrainedModel):
    config_class = FalconConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["FalconDecoderLayer"]


class FalconModel(FalconPreTrainedModel):
    def __init__(self, config: FalconConfig) -> None:
        super().__init__(config)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.h = nn.ModuleList(FalconDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.rotary_emb = FalconRotaryEmbedding(config)
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
            inputs_embeds = self.word_embeddings(input_ids)
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)
        hidden_states = inputs_embeds
        for layer in self.h:
            hidden_states = layer(hidden_states, position_embeddings)
        return self.ln_f(hidden_states)


class FalconForCausalLM(FalconPreTrainedModel):
    _tied_weights_keys = {"lm_head.weight": "transformer.word_embeddings.weight"}

    def __init__(self, config: FalconConfig) -> None:
        super().__init__(config)
        self.transformer = FalconModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None,
        position_ids: torch.LongTensor,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> FalconCausalLMOutput:
        assert position_ids is not None, "position_ids is required"
        hidden_states = self.transformer(input_ids, position_ids, inputs_embeds)
        logits = torch.ops.auto_deploy.torch_linear_simple(hidden_states, self.lm_head.weight, None)
        return FalconCausalLMOutput(logits=logits.float())


AutoModelForCausalLMFactory.register_custom_model_cls("FalconConfig", FalconForCausalLM)
