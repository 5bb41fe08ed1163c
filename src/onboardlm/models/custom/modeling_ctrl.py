"""Lean, export-friendly CTRL on canonical ``auto_deploy`` ops.

Mirrors ``transformers.models.ctrl.modeling_ctrl`` (CTRLLMHeadModel): pre-norm decoder layers with
LayerNorm, fixed sinusoidal position embeddings, grouped-query attention and a plain MLP. Also:
embeddings scaled by config.hidden_size**0.5. Module names equal the checkpoint keys, so HuggingFace
state dicts load with ``strict=True``.

Left out on purpose: KV cache, attention masks (attention is causal), dropout, gradient
checkpointing, attention-implementation switches, ``repeat_kv`` (the attention op handles GQA),
position-id generation (callers pass them), hidden-state/attention outputs and the loss.
Linear and reshape calls carry tensor-parallel sharding hints; they do not change the numbers.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import CTRLConfig
from transformers.activations import ACT2FN
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import ModelOutput

import onboardlm.ops  # noqa: F401  (registers torch.ops.auto_deploy.*)
from onboardlm.models.factory import AutoModelForCausalLMFactory


class CTRLSinusoidalPositions(nn.Module):
    """Fixed sinusoidal position rows, computed in fp32 (not checkpoint weights): ``cat(sin, cos)`` of
    ``position * 10000^(-i / half)`` over the hidden size."""

    def __init__(self, config: CTRLConfig) -> None:
        super().__init__()
        half = config.hidden_size // 2
        step = float(torch.tensor(10000.0, dtype=torch.float64).log()) / half
        inv_freq = torch.exp(torch.arange(half, dtype=torch.int64).float() * -step)
        self.register_buffer("_ad_inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        angles = (position_ids)[..., None].float() * self._ad_inv_freq.float()
        return torch.cat((angles.sin(), angles.cos()), dim=-1).to(x.dtype)


@dataclass
class CTRLCausalLMOutput(ModelOutput):
    logits: torch.FloatTensor | None = None


class CTRLFeedForward(nn.Sequential):
    """transformers builds this block as ``nn.Sequential(up, activation, down)``: the same children, by index."""

    def __init__(self, config: CTRLConfig) -> None:
        super().__init__(
            nn.Linear(config.hidden_size, config.dff, bias=True),
            ACT2FN["relu"],
            nn.Linear(config.dff, config.hidden_size, bias=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        linear = torch.ops.auto_deploy.torch_linear_simple
        up, act, down = self
        hidden = linear(x, up.weight, up.bias, tp_mode="colwise", layer_type="mlp")
        out = linear(act(hidden), down.weight, down.bias, tp_mode="rowwise", layer_type="mlp")
        return torch.ops.auto_deploy.all_reduce(out, layer_type="mlp")


class MultiHeadAttention(nn.Module):
    def __init__(self, config: CTRLConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.Wq = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=True)
        self.Wk = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.Wv = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.dense = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=True)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        ops = torch.ops.auto_deploy
        batch, seq_len = hidden_states.shape[:2]
        q = ops.torch_linear_simple(
            hidden_states, self.Wq.weight, self.Wq.bias, tp_mode="colwise", layer_type="mha"
        )
        k = ops.torch_linear_simple(
            hidden_states,
            self.Wk.weight,
            self.Wk.bias,
            tp_mode="colwise",
            tp_min_local_shape=self.head_dim,
            layer_type="mha",
        )
        v = ops.torch_linear_simple(
            hidden_states,
            self.Wv.weight,
            self.Wv.bias,
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
            attn, self.dense.weight, self.dense.bias, tp_mode="rowwise", layer_type="mha"
        )
        return ops.all_reduce(out, layer_type="mha")


class EncoderLayer(nn.Module):
    def __init__(self, config: CTRLConfig, layer_idx: int) -> None:
        super().__init__()
        self.multi_head_attention = MultiHeadAttention(config, layer_idx)
        self.ffn = CTRLFeedForward(config)
        self.layernorm1 = nn.LayerNorm(config.hidden_size, eps=1e-06)
        self.layernorm2 = nn.LayerNorm(config.hidden_size, eps=1e-06)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.multi_head_attention(self.layernorm1(hidden_states))
        return hidden_states + self.ffn(self.layernorm2(hidden_states))


class CTRLPreTrainedModel(PreTrainedModel):
    config_class = CTRLConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["EncoderLayer"]


class CTRLModel(CTRLPreTrainedModel):
    def __init__(self, config: CTRLConfig) -> None:
        super().__init__(config)
        self.w = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.pos_encoding = CTRLSinusoidalPositions(config)
        self.h = nn.ModuleList(EncoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.embed_scale = config.hidden_size**0.5
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
            inputs_embeds = self.w(input_ids)
        hidden_states = inputs_embeds * self.embed_scale + self.pos_encoding(inputs_embeds, position_ids)
        for layer in self.h:
            hidden_states = layer(hidden_states)
        return self.layernorm(hidden_states)


class CTRLLMHeadModel(CTRLPreTrainedModel):
    _tied_weights_keys = {"lm_head.weight": "transformer.w.weight"}

    def __init__(self, config: CTRLConfig) -> None:
        super().__init__(config)
        self.transformer = CTRLModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=True)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None,
        position_ids: torch.LongTensor,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> CTRLCausalLMOutput:
        assert position_ids is not None, "position_ids is required"
        hidden_states = self.transformer(input_ids, position_ids, inputs_embeds)
        logits = torch.ops.auto_deploy.torch_linear_simple(
            hidden_states, self.lm_head.weight, self.lm_head.bias
        )
        return CTRLCausalLMOutput(logits=logits.float())


AutoModelForCausalLMFactory.register_custom_model_cls("CTRLConfig", CTRLLMHeadModel)
