"""Lean, export-friendly GPTNeo on canonical ``auto_deploy`` ops.

Mirrors ``transformers.models.gpt_neo.modeling_gpt_neo`` (GPTNeoForCausalLM): pre-norm decoder
layers with LayerNorm, learned absolute position embeddings, grouped-query attention and a plain
MLP. Also: sliding-window attention (config.window_size) where config.attention_layers is 'local';
attention scores not scaled. Module names equal the checkpoint keys, so HuggingFace state dicts load
with ``strict=True``.

Left out on purpose: KV cache, attention masks (attention is causal), dropout, gradient
checkpointing, attention-implementation switches, ``repeat_kv`` (the attention op handles GQA),
position-id generation (callers pass them), hidden-state/attention outputs and the loss.
Linear and reshape calls carry tensor-parallel sharding hints; they do not change the numbers.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import GPTNeoConfig
from transformers.activations import ACT2FN
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import ModelOutput

import onboardlm.ops  # noqa: F401  (registers torch.ops.auto_deploy.*)
from onboardlm.models.factory import AutoModelForCausalLMFactory


@dataclass
class GPTNeoCausalLMOutput(ModelOutput):
    logits: torch.FloatTensor | None = None


class GPTNeoMLP(nn.Module):
    def __init__(self, config: GPTNeoConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(
            config.hidden_size, config.intermediate_size or 4 * config.hidden_size, bias=True
        )
        self.c_proj = nn.Linear(
            config.intermediate_size or 4 * config.hidden_size, config.hidden_size, bias=True
        )
        self.act = ACT2FN[config.activation_function]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        linear = torch.ops.auto_deploy.torch_linear_simple
        hidden = linear(x, self.c_fc.weight, self.c_fc.bias, tp_mode="colwise", layer_type="mlp")
        down = linear(
            self.act(hidden), self.c_proj.weight, self.c_proj.bias, tp_mode="rowwise", layer_type="mlp"
        )
        return torch.ops.auto_deploy.all_reduce(down, layer_type="mlp")


class GPTNeoAttention(nn.Module):
    """Holds the attention under the checkpoint's key ``attention``."""

    def __init__(self, config: GPTNeoConfig, layer_idx: int) -> None:
        super().__init__()
        self.attention = GPTNeoSelfAttention(config, layer_idx)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.attention(hidden_states)


class GPTNeoSelfAttention(nn.Module):
    def __init__(self, config: GPTNeoConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.scaling = 1.0
        self.sliding_window = config.window_size if config.attention_layers[layer_idx] == "local" else None
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
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
        attn = ops.torch_attention(
            q, k, v, is_causal=True, scale=self.scaling, sliding_window=self.sliding_window, layout="bsnd"
        )

        attn = ops.view(
            attn, [batch, seq_len, self.num_heads * self.head_dim], tp_scaled_dim=2, layer_type="mha"
        )
        out = ops.torch_linear_simple(
            attn, self.out_proj.weight, self.out_proj.bias, tp_mode="rowwise", layer_type="mha"
        )
        return ops.all_reduce(out, layer_type="mha")


class GPTNeoBlock(nn.Module):
    def __init__(self, config: GPTNeoConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn = GPTNeoAttention(config, layer_idx)
        self.mlp = GPTNeoMLP(config)
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.attn(self.ln_1(hidden_states))
        return hidden_states + self.mlp(self.ln_2(hidden_states))


class GPTNeoPreTrainedModel(PreTrainedModel):
    config_class = GPTNeoConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["GPTNeoBlock"]


class GPTNeoModel(GPTNeoPreTrainedModel):
    def __init__(self, config: GPTNeoConfig) -> None:
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.h = nn.ModuleList(GPTNeoBlock(config, i) for i in range(config.num_hidden_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
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
            inputs_embeds = self.wte(input_ids)
        hidden_states = inputs_embeds + self.wpe(position_ids)
        for layer in self.h:
            hidden_states = layer(hidden_states)
        return self.ln_f(hidden_states)


class GPTNeoForCausalLM(GPTNeoPreTrainedModel):
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: GPTNeoConfig) -> None:
        super().__init__(config)
        self.transformer = GPTNeoModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None,
        position_ids: torch.LongTensor,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> GPTNeoCausalLMOutput:
        assert position_ids is not None, "position_ids is required"
        hidden_states = self.transformer(input_ids, position_ids, inputs_embeds)
        logits = torch.ops.auto_deploy.torch_linear_simple(hidden_states, self.lm_head.weight, None)
        return GPTNeoCausalLMOutput(logits=logits.float())


AutoModelForCausalLMFactory.register_custom_model_cls("GPTNeoConfig", GPTNeoForCausalLM)
