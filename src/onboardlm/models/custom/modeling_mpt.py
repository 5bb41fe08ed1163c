"""Lean, export-friendly Mpt on canonical ``auto_deploy`` ops.

Mirrors ``transformers.models.mpt.modeling_mpt`` (MptForCausalLM): pre-norm decoder layers with
LayerNorm, grouped-query attention with ALiBi biases and a plain MLP. Also: not for configs with
config.attn_config.clip_qkv other than None, config.attn_config.softmax_scale other than None
(measured: other modules). Module names equal the checkpoint keys, so HuggingFace state dicts load
with ``strict=True``.

Left out on purpose: KV cache, attention masks (attention is causal), dropout, gradient
checkpointing, attention-implementation switches, ``repeat_kv`` (the attention op handles GQA),
position-id generation (callers pass them), hidden-state/attention outputs and the loss.
Linear and reshape calls carry tensor-parallel sharding hints; they do not change the numbers.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import MptConfig
from transformers.activations import ACT2FN
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import ModelOutput

import onboardlm.ops  # noqa: F401  (registers torch.ops.auto_deploy.*)
from onboardlm.models.factory import AutoModelForCausalLMFactory


def _alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi slopes (Press et al.), as BLOOM builds them: ``2^(-8 i / n)`` for the ``n`` heads of the
    closest power of two below ``num_heads``, then every other slope of ``2n`` heads for the rest."""
    closest = 1 << (num_heads.bit_length() - 1)
    base = 2.0 ** (-(2.0 ** -(closest.bit_length() - 1 - 3)))
    slopes = torch.pow(torch.tensor(base), torch.arange(1, 1 + closest, dtype=torch.int32))
    if closest != num_heads:
        extra_base = 2.0 ** (-(2.0 ** -(closest.bit_length() - 3)))
        extra = torch.arange(1, 1 + 2 * min(closest, num_heads - closest), 2, dtype=torch.int32)
        slopes = torch.cat([slopes, torch.pow(torch.tensor(extra_base), extra)])
    return slopes.float()


@dataclass
class MptCausalLMOutput(ModelOutput):
    logits: torch.FloatTensor | None = None


class MptMLP(nn.Module):
    def __init__(self, config: MptConfig) -> None:
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, 4 * config.hidden_size, bias=False)
        self.down_proj = nn.Linear(4 * config.hidden_size, config.hidden_size, bias=False)
        self.act = ACT2FN["gelu"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        linear = torch.ops.auto_deploy.torch_linear_simple
        hidden = linear(x, self.up_proj.weight, self.up_proj.bias, tp_mode="colwise", layer_type="mlp")
        down = linear(
            self.act(hidden), self.down_proj.weight, self.down_proj.bias, tp_mode="rowwise", layer_type="mlp"
        )
        return torch.ops.auto_deploy.all_reduce(down, layer_type="mlp")


class MptAttention(nn.Module):
    def __init__(self, config: MptConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.Wqkv = nn.Linear(
            config.hidden_size, (self.num_heads + 2 * self.num_kv_heads) * self.head_dim, bias=False
        )
        self.out_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.register_buffer("_ad_alibi_slopes", _alibi_slopes(self.num_heads), persistent=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        ops = torch.ops.auto_deploy
        batch, seq_len = hidden_states.shape[:2]
        sizes = [
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
        ]
        qkv = ops.torch_linear_simple(
            hidden_states,
            self.Wqkv.weight,
            self.Wqkv.bias,
            tp_mode="colwise",
            output_sizes=sizes,
            tp_min_local_shape=self.head_dim,
            layer_type="mha",
        )
        q, k, v = ops.split_with_sizes(qkv, sizes, dim=-1, enable_sharding=True, layer_type="mha")
        q = ops.view(q, [batch, seq_len, self.num_heads, self.head_dim], tp_scaled_dim=2, layer_type="mha")
        k = ops.view(k, [batch, seq_len, self.num_kv_heads, self.head_dim], tp_scaled_dim=2, layer_type="mha")
        v = ops.view(v, [batch, seq_len, self.num_kv_heads, self.head_dim], tp_scaled_dim=2, layer_type="mha")
        # ALiBi: slope_h * key position; the query's own position would shift a whole row, which the softmax ignores
        key_positions = torch.arange(seq_len, device=hidden_states.device, dtype=torch.float32)
        alibi = (self._ad_alibi_slopes[:, None, None] * key_positions).to(q.dtype)[None]
        attn = ops.torch_attention(
            q, k, v, attn_mask=alibi, is_causal=True, scale=self.scaling, layout="bsnd"
        )

        attn = ops.view(
            attn, [batch, seq_len, self.num_heads * self.head_dim], tp_scaled_dim=2, layer_type="mha"
        )
        out = ops.torch_linear_simple(
            attn, self.out_proj.weight, self.out_proj.bias, tp_mode="rowwise", layer_type="mha"
        )
        return ops.all_reduce(out, layer_type="mha")


class MptBlock(nn.Module):
    def __init__(self, config: MptConfig, layer_idx: int) -> None:
        super().__init__()
        if config.attn_config.clip_qkv is not None:
            raise NotImplementedError("config.attn_config.clip_qkv=set is not reproduced by this file")
        if config.attn_config.softmax_scale is not None:
            raise NotImplementedError("config.attn_config.softmax_scale=set is not reproduced by this file")
        self.attn = MptAttention(config, layer_idx)
        self.ffn = MptMLP(config)
        self.norm_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon, bias=False)
        self.norm_2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.attn(self.norm_1(hidden_states))
        return hidden_states + self.ffn(self.norm_2(hidden_states))


class MptPreTrainedModel(PreTrainedModel):
    config_class = MptConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["MptBlock"]


class MptModel(MptPreTrainedModel):
    def __init__(self, config: MptConfig) -> None:
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.blocks = nn.ModuleList(MptBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon, bias=False)
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
        hidden_states = inputs_embeds
        for layer in self.blocks:
            hidden_states = layer(hidden_states)
        return self.norm_f(hidden_states)


class MptForCausalLM(MptPreTrainedModel):
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: MptConfig) -> None:
        super().__init__(config)
        self.transformer = MptModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None,
        position_ids: torch.LongTensor,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> MptCausalLMOutput:
        assert position_ids is not None, "position_ids is required"
        hidden_states = self.transformer(input_ids, position_ids, inputs_embeds)
        logits = torch.ops.auto_deploy.torch_linear_simple(hidden_states, self.lm_head.weight, None)
        return MptCausalLMOutput(logits=logits.float())


AutoModelForCausalLMFactory.register_custom_model_cls("MptConfig", MptForCausalLM)
