"""Lean, export-friendly GPTNeoXJapanese on canonical ``auto_deploy`` ops.

Mirrors ``transformers.models.gpt_neox_japanese.modeling_gpt_neox_japanese``
(GPTNeoXJapaneseForCausalLM): pre-norm decoder layers with LayerNorm, rotary position embeddings
(default, linear, llama3, yarn, proportional), grouped-query attention (q/k/v fused, grouped per
head) and a plain MLP. Module names equal the checkpoint keys, so HuggingFace state dicts load with
``strict=True``.

Left out on purpose: KV cache, attention masks (attention is causal), dropout, gradient
checkpointing, attention-implementation switches, ``repeat_kv`` (the attention op handles GQA),
position-id generation (callers pass them), hidden-state/attention outputs and the loss.
Linear and reshape calls carry tensor-parallel sharding hints; they do not change the numbers.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import GPTNeoXJapaneseConfig
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import ModelOutput

import onboardlm.ops  # noqa: F401  (registers torch.ops.auto_deploy.*)
from onboardlm.models.factory import AutoModelForCausalLMFactory


def _rope_inverse_frequencies(config: GPTNeoXJapaneseConfig) -> tuple[torch.Tensor, float]:
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
class GPTNeoXJapaneseCausalLMOutput(ModelOutput):
    logits: torch.FloatTensor | None = None


class GPTNeoXJapaneseRotaryEmbedding(nn.Module):
    """cos/sin of ``position_ids * inv_freq``, computed in fp32 once per forward for all layers."""

    def __init__(self, config: GPTNeoXJapaneseConfig) -> None:
        super().__init__()
        inv_freq, self.attention_scaling = _rope_inverse_frequencies(config)
        self.register_buffer("_ad_inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self._ad_inv_freq.float()
        angles = torch.cat((freqs, freqs), dim=-1)
        cos = angles.cos() * self.attention_scaling
        sin = angles.sin() * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)


class GPTNeoXJapaneseMLP(nn.Module):
    def __init__(self, config: GPTNeoXJapaneseConfig) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, 4 * config.hidden_size, bias=False)
        self.dense_4h_to_h = nn.Linear(4 * config.hidden_size, config.hidden_size, bias=False)
        self.act = ACT2FN[config.hidden_act]

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


class GPTNeoXJapaneseAttention(nn.Module):
    def __init__(self, config: GPTNeoXJapaneseConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.query_key_value = nn.Linear(
            config.hidden_size, (self.num_heads + 2 * self.num_kv_heads) * self.head_dim, bias=False
        )
        self.dense = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.dense_bias = (
            nn.Parameter(torch.zeros(config.hidden_size))
            if layer_idx == config.num_hidden_layers - 1
            else None
        )

    def forward(
        self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        ops = torch.ops.auto_deploy
        batch, seq_len = hidden_states.shape[:2]
        sizes = [self.head_dim, self.head_dim, self.head_dim]  # q, k, v in each of the self.num_heads groups
        qkv = ops.torch_linear_simple(
            hidden_states,
            self.query_key_value.weight,
            self.query_key_value.bias,
            tp_mode="colwise",
            tp_min_local_shape=sum(sizes),
            layer_type="mha",
        )
        qkv = ops.view(qkv, [batch, seq_len, self.num_heads, sum(sizes)], tp_scaled_dim=2, layer_type="mha")
        q, k, v = ops.split_with_sizes(qkv, sizes, dim=-1, layer_type="mha")
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

    def add_output_bias(self, out: torch.Tensor) -> torch.Tensor:
        """The decoder layer adds ``dense_bias`` to this attention's output where the layer has it."""
        return out if self.dense_bias is None else out + self.dense_bias


class GPTNeoXJapaneseLayer(nn.Module):
    def __init__(self, config: GPTNeoXJapaneseConfig, layer_idx: int) -> None:
        super().__init__()
        self.attention = GPTNeoXJapaneseAttention(config, layer_idx)
        self.mlp = GPTNeoXJapaneseMLP(config)
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(
        self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        hidden_states = hidden_states + self.attention.add_output_bias(
            self.attention(self.input_layernorm(hidden_states), position_embeddings)
        )
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class GPTNeoXJapanesePreTrainedModel(PreTrainedModel):
    config_class = GPTNeoXJapaneseConfig
    base_model_prefix = "gpt_neox_japanese"
    _no_split_modules = ["GPTNeoXJapaneseLayer"]


class GPTNeoXJapaneseModel(GPTNeoXJapanesePreTrainedModel):
    def __init__(self, config: GPTNeoXJapaneseConfig) -> None:
        super().__init__(config)
        self.embed_in = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(GPTNeoXJapaneseLayer(config, i) for i in range(config.num_hidden_layers))
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.rotary_emb = GPTNeoXJapaneseRotaryEmbedding(config)
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
            inputs_embeds = self.embed_in(input_ids)
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(hidden_states, position_embeddings)
        return self.final_layer_norm(hidden_states)


class GPTNeoXJapaneseForCausalLM(GPTNeoXJapanesePreTrainedModel):
    _tied_weights_keys = {"embed_out.weight": "gpt_neox_japanese.embed_in.weight"}

    def __init__(self, config: GPTNeoXJapaneseConfig) -> None:
        super().__init__(config)
        self.gpt_neox_japanese = GPTNeoXJapaneseModel(config)
        self.embed_out = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None,
        position_ids: torch.LongTensor,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> GPTNeoXJapaneseCausalLMOutput:
        assert position_ids is not None, "position_ids is required"
        hidden_states = self.gpt_neox_japanese(input_ids, position_ids, inputs_embeds)
        logits = torch.ops.auto_deploy.torch_linear_simple(hidden_states, self.embed_out.weight, None)
        return GPTNeoXJapaneseCausalLMOutput(logits=logits.float())


AutoModelForCausalLMFactory.register_custom_model_cls("GPTNeoXJapaneseConfig", GPTNeoXJapaneseForCausalLM)
