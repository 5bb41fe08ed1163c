"""Lean, export-friendly GPTBigCode on canonical ``auto_deploy`` ops.

Mirrors ``transformers.models.gpt_bigcode.modeling_gpt_bigcode`` (GPTBigCodeForCausalLM): pre-norm
decoder layers with LayerNorm, learned absolute position embeddings, grouped-query attention and a
plain MLP. Module names equal the checkpoint keys, so HuggingFace state dicts load with
``strict=True``.

Left out on purpose: KV cache, attention masks (attention is causal), dropout, gradient
checkpointing, attention-implementation switches, ``repeat_kv`` (the attention op handles GQA),
position-id generation (callers pass them), hidden-state/attention outputs and the loss.
Linear and reshape calls carry tensor-parallel sharding hints; they do not change the numbers.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import GPTBigCodeConfig
from transformers.activations import ACT2FN
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import ModelOutput

import onboardlm.ops  # noqa: F401  (registers torch.ops.auto_deploy.*)
from onboardlm.models.factory import AutoModelForCausalLMFactory


@dataclass
class GPTBigCodeCausalLMOutput(ModelOutput):
    logits: torch.FloatTensor | None = None


class GPTBigCodeMLP(nn.Module):
    def __init__(self, config: GPTBigCodeConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.hidden_size, config.n_inner or 4 * config.hidden_size, bias=True)
        self.c_proj = nn.Linear(config.n_inner or 4 * config.hidden_size, config.hidden_size, bias=True)
        self.act = ACT2FN[config.activation_function]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        linear = torch.ops.auto_deploy.torch_linear_simple
        hidden = linear(x, self.c_fc.weight, self.c_fc.bias, tp_mode="colwise", layer_type="mlp")
        down = linear(
            self.act(hidden), self.c_proj.weight, self.c_proj.bias, tp_mode="rowwise", layer_type="mlp"
        )
        return torch.ops.auto_deploy.all_reduce(down, layer_type="mlp")


class GPTBigCodeAttention(nn.Module):
    def __init__(self, config: GPTBigCodeConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = 1 if config.multi_query else config.n_head
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5 if config.scale_attn_weights else 1.0
        self.c_attn = nn.Linear(
            config.hidden_size, (self.num_heads + 2 * self.num_kv_heads) * self.head_dim, bias=True
        )
        self.c_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=True)
        self.multi_query = config.multi_query

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
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
                self.c_attn.weight,
                self.c_attn.bias,
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
                self.c_attn.weight,
                self.c_attn.bias,
                tp_mode="colwise",
                output_sizes=sizes,
                tp_min_local_shape=self.head_dim,
                layer_type="mha",
            )
            q, k, v = ops.split_with_sizes(qkv, sizes, dim=-1, enable_sharding=True, layer_type="mha")
        q = ops.view(q, [batch, seq_len, self.num_heads, self.head_dim], tp_scaled_dim=2, layer_type="mha")
        k = ops.view(k, [batch, seq_len, self.num_kv_heads, self.head_dim], tp_scaled_dim=2, layer_type="mha")
        v = ops.view(v, [batch, seq_len, self.num_kv_heads, self.head_dim], tp_scaled_dim=2, layer_type="mha")
        attn = ops.torch_attention(q, k, v, is_causal=True, scale=self.scaling, layout="bsnd")

        attn = ops.view(
            attn, [batch, seq_len, self.num_heads * self.head_dim], tp_scaled_dim=2, layer_type="mha"
        )
        out = ops.torch_linear_simple(
            attn, self.c_proj.weight, self.c_proj.bias, tp_mode="rowwise", layer_type="mha"
        )
        return ops.all_reduce(out, layer_type="mha")


class GPTBigCodeBlock(nn.Module):
    def __init__(self, config: GPTBigCodeConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn = GPTBigCodeAttention(config, layer_idx)
        self.mlp = GPTBigCodeMLP(config)
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.attn(self.ln_1(hidden_states))
        return hidden_states + self.mlp(self.ln_2(hidden_states))


class GPTBigCodePreTrainedModel(PreTrainedModel):
    config_class = GPTBigCodeConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["GPTBigCodeBlock"]


class GPTBigCodeModel(GPTBigCodePreTrainedModel):
    def __init__(self, config: GPTBigCodeConfig) -> None:
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.h = nn.ModuleList(GPTBigCodeBlock(config, i) for i in range(config.num_hidden_layers))
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


class GPTBigCodeForCausalLM(GPTBigCodePreTrainedModel):
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: GPTBigCodeConfig) -> None:
        super().__init__(config)
        self.transformer = GPTBigCodeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None,
        position_ids: torch.LongTensor,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> GPTBigCodeCausalLMOutput:
        assert position_ids is not None, "position_ids is required"
        hidden_states = self.transformer(input_ids, position_ids, inputs_embeds)
        logits = torch.ops.auto_deploy.torch_linear_simple(hidden_states, self.lm_head.weight, None)
        return GPTBigCodeCausalLMOutput(logits=logits.float())


AutoModelForCausalLMFactory.register_custom_model_cls("GPTBigCodeConfig", GPTBigCodeForCausalLM)
