"""Lean, export-friendly XGLM on canonical ``auto_deploy`` ops.

Mirrors ``transformers.models.xglm.modeling_xglm`` (XGLMForCausalLM): pre-norm decoder layers with
LayerNorm, learned absolute position embeddings, grouped-query attention and a plain MLP. Also:
embeddings scaled by (config.hidden_size**0.5 if config.scale_embedding else 1.0); not for configs
with config.add_cross_attention=True (measured: other modules). Module names equal the checkpoint
keys, so HuggingFace state dicts load with ``strict=True``.

Left out on purpose: KV cache, attention masks (attention is causal), dropout, gradient
checkpointing, attention-implementation switches, ``repeat_kv`` (the attention op handles GQA),
position-id generation (callers pass them), hidden-state/attention outputs and the loss.
Linear and reshape calls carry tensor-parallel sharding hints; they do not change the numbers.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import XGLMConfig
from transformers.activations import ACT2FN
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import ModelOutput

import onboardlm.ops  # noqa: F401  (registers torch.ops.auto_deploy.*)
from onboardlm.models.factory import AutoModelForCausalLMFactory


class XGLMSinusoidalPositionalEmbedding(nn.Module):
    """Fixed sinusoidal position rows, computed in fp32 (not checkpoint weights): ``cat(sin, cos)`` of
    ``(position + 2) * 10000^(-i / (half - 1))`` over the hidden size."""

    def __init__(self, config: XGLMConfig) -> None:
        super().__init__()
        half = config.hidden_size // 2
        step = float(torch.tensor(10000.0, dtype=torch.float64).log()) / (half - 1)
        inv_freq = torch.exp(torch.arange(half, dtype=torch.int64).float() * -step)
        self.register_buffer("_ad_inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        angles = (position_ids + 2)[..., None].float() * self._ad_inv_freq.float()
        return torch.cat((angles.sin(), angles.cos()), dim=-1).to(x.dtype)


@dataclass
class XGLMCausalLMOutput(ModelOutput):
    logits: torch.FloatTensor | None = None


class XGLMScaledWordEmbedding(nn.Embedding):
    """Token embedding multiplied by a constant scale."""

    def __init__(
        self, num_embeddings: int, embedding_dim: int, padding_idx: int | None, embed_scale: float
    ) -> None:
        super().__init__(num_embeddings, embedding_dim, padding_idx)
        self.embed_scale = embed_scale

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids) * self.embed_scale


class XGLMAttention(nn.Module):
    def __init__(self, config: XGLMConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.out_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=True)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
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
        attn = ops.torch_attention(q, k, v, is_causal=True, scale=self.scaling, layout="bsnd")

        attn = ops.view(
            attn, [batch, seq_len, self.num_heads * self.head_dim], tp_scaled_dim=2, layer_type="mha"
        )
        out = ops.torch_linear_simple(
            attn, self.out_proj.weight, self.out_proj.bias, tp_mode="rowwise", layer_type="mha"
        )
        return ops.all_reduce(out, layer_type="mha")


class XGLMDecoderLayer(nn.Module):
    def __init__(self, config: XGLMConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = XGLMAttention(config, layer_idx)
        self.fc1 = nn.Linear(config.hidden_size, config.ffn_dim, bias=True)
        self.fc2 = nn.Linear(config.ffn_dim, config.hidden_size, bias=True)
        self.activation_fn = ACT2FN[config.activation_function]
        self.self_attn_layer_norm = nn.LayerNorm(config.hidden_size, eps=1e-05)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=1e-05)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(self.self_attn_layer_norm(hidden_states))
        return hidden_states + self.feed_forward(self.final_layer_norm(hidden_states))

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The plain MLP whose linears sit on the layer itself, as in the checkpoint."""
        linear = torch.ops.auto_deploy.torch_linear_simple
        hidden = linear(x, self.fc1.weight, self.fc1.bias, tp_mode="colwise", layer_type="mlp")
        down = linear(
            self.activation_fn(hidden), self.fc2.weight, self.fc2.bias, tp_mode="rowwise", layer_type="mlp"
        )
        return torch.ops.auto_deploy.all_reduce(down, layer_type="mlp")


class XGLMPreTrainedModel(PreTrainedModel):
    config_class = XGLMConfig
    base_model_prefix = "model"
    _no_split_modules = ["XGLMDecoderLayer"]


class XGLMModel(XGLMPreTrainedModel):
    def __init__(self, config: XGLMConfig) -> None:
        super().__init__(config)
        self.embed_tokens = XGLMScaledWordEmbedding(
            config.vocab_size,
            config.hidden_size,
            config.pad_token_id,
            (config.hidden_size**0.5 if config.scale_embedding else 1.0),
        )
        self.embed_positions = XGLMSinusoidalPositionalEmbedding(config)
        self.layers = nn.ModuleList(XGLMDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=1e-05)
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
        hidden_states = inputs_embeds + self.embed_positions(inputs_embeds, position_ids)
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        return self.layer_norm(hidden_states)


class XGLMForCausalLM(XGLMPreTrainedModel):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: XGLMConfig) -> None:
        super().__init__(config)
        self.model = XGLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None,
        position_ids: torch.LongTensor,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> XGLMCausalLMOutput:
        assert position_ids is not None, "position_ids is required"
        hidden_states = self.model(input_ids, position_ids, inputs_embeds)
        logits = torch.ops.auto_deploy.torch_linear_simple(hidden_states, self.lm_head.weight, None)
        return XGLMCausalLMOutput(logits=logits.float())


AutoModelForCausalLMFactory.register_custom_model_cls("XGLMConfig", XGLMForCausalLM)
