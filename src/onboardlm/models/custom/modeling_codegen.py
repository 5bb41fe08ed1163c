"""Lean, export-friendly CodeGen on canonical ``auto_deploy`` ops.

Mirrors ``transformers.models.codegen.modeling_codegen`` (CodeGenForCausalLM): decoder layers with
parallel attention and MLP after one LayerNorm, partial interleaved rotary position embeddings (base
10000), grouped-query attention (q/k/v fused, grouped per 4 groups) and a plain MLP. Module names
equal the checkpoint keys, so HuggingFace state dicts load with ``strict=True``.

Left out on purpose: KV cache, attention masks (attention is causal), dropout, gradient
checkpointing, attention-implementation switches, ``repeat_kv`` (the attention op handles GQA),
position-id generation (callers pass them), hidden-state/attention outputs and the loss.
Linear and reshape calls carry tensor-parallel sharding hints; they do not change the numbers.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import CodeGenConfig
from transformers.activations import ACT2FN
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import ModelOutput

import onboardlm.ops  # noqa: F401  (registers torch.ops.auto_deploy.*)
from onboardlm.models.factory import AutoModelForCausalLMFactory


def _rope_inverse_frequencies(config: CodeGenConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies of the rotary channels: the architecture fixes the base (10000); no scaling."""
    dim = config.rotary_dim
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    return inv_freq, 1.0


@dataclass
class CodeGenCausalLMOutput(ModelOutput):
    logits: torch.FloatTensor | None = None


class CodeGenRotaryEmbedding(nn.Module):
    """cos/sin of ``position_ids * inv_freq``, computed in fp32 once per forward for all layers."""

    def __init__(self, config: CodeGenConfig) -> None:
        super().__init__()
        inv_freq, self.attention_scaling = _rope_inverse_frequencies(config)
        self.register_buffer("_ad_inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self._ad_inv_freq.float()
        angles = freqs  # each frequency once; attention applies it to both halves
        cos = angles.cos() * self.attention_scaling
        sin = angles.sin() * self.attention_scaling
        return sin.to(x.dtype), cos.to(x.dtype)  # (sin, cos), the order transformers' module returns


class CodeGenMLP(nn.Module):
    def __init__(self, config: CodeGenConfig) -> None:
        super().__init__()
        self.fc_in = nn.Linear(config.hidden_size, config.n_inner or 4 * config.hidden_size, bias=True)
        self.fc_out = nn.Linear(config.n_inner or 4 * config.hidden_size, config.hidden_size, bias=True)
        self.act = ACT2FN[config.activation_function]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        linear = torch.ops.auto_deploy.torch_linear_simple
        hidden = linear(x, self.fc_in.weight, self.fc_in.bias, tp_mode="colwise", layer_type="mlp")
        down = linear(
            self.act(hidden), self.fc_out.weight, self.fc_out.bias, tp_mode="rowwise", layer_type="mlp"
        )
        return torch.ops.auto_deploy.all_reduce(down, layer_type="mlp")


class CodeGenAttention(nn.Module):
    def __init__(self, config: CodeGenConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.qkv_proj = nn.Linear(
            config.hidden_size, (self.num_heads + 2 * self.num_kv_heads) * self.head_dim, bias=False
        )
        self.out_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(
        self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        ops = torch.ops.auto_deploy
        batch, seq_len = hidden_states.shape[:2]
        sizes = [
            self.num_heads * self.head_dim // 4,
            self.num_kv_heads * self.head_dim // 4,
            self.num_kv_heads * self.head_dim // 4,
        ]  # q, v, k in each of the 4 groups
        qkv = ops.torch_linear_simple(
            hidden_states,
            self.qkv_proj.weight,
            self.qkv_proj.bias,
            tp_mode="colwise",
            tp_min_local_shape=sum(sizes),
            layer_type="mha",
        )
        qkv = ops.view(qkv, [batch, seq_len, 4, sum(sizes)], tp_scaled_dim=2, layer_type="mha")
        q, v, k = ops.split_with_sizes(qkv, sizes, dim=-1, layer_type="mha")
        q = ops.view(q, [batch, seq_len, self.num_heads, self.head_dim], tp_scaled_dim=2, layer_type="mha")
        k = ops.view(k, [batch, seq_len, self.num_kv_heads, self.head_dim], tp_scaled_dim=2, layer_type="mha")
        v = ops.view(v, [batch, seq_len, self.num_kv_heads, self.head_dim], tp_scaled_dim=2, layer_type="mha")

        sin, cos = position_embeddings
        cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)  # one table for both halves
        # channel pairs (2i, 2i+1) rotate together; the op leaves q and k in one de-interleaved channel
        # order, the same for both, so q·kᵀ is unchanged
        rotary_dim = cos.shape[-1]
        q_rot, k_rot = ops.torch_rope_with_qk_interleaving(
            q[..., :rotary_dim], k[..., :rotary_dim], cos, sin, 2
        )
        q = torch.cat((q_rot, q[..., rotary_dim:]), dim=-1)
        k = torch.cat((k_rot, k[..., rotary_dim:]), dim=-1)
        attn = ops.torch_attention(q, k, v, is_causal=True, scale=self.scaling, layout="bsnd")

        attn = ops.view(
            attn, [batch, seq_len, self.num_heads * self.head_dim], tp_scaled_dim=2, layer_type="mha"
        )
        out = ops.torch_linear_simple(
            attn, self.out_proj.weight, self.out_proj.bias, tp_mode="rowwise", layer_type="mha"
        )
        return ops.all_reduce(out, layer_type="mha")


class CodeGenBlock(nn.Module):
    def __init__(self, config: CodeGenConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn = CodeGenAttention(config, layer_idx)
        self.mlp = CodeGenMLP(config)
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)

    def forward(
        self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        normed = self.ln_1(hidden_states)
        return hidden_states + self.attn(normed, position_embeddings) + self.mlp(normed)


class CodeGenPreTrainedModel(PreTrainedModel):
    config_class = CodeGenConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["CodeGenBlock"]


class CodeGenModel(CodeGenPreTrainedModel):
    def __init__(self, config: CodeGenConfig) -> None:
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.h = nn.ModuleList(CodeGenBlock(config, i) for i in range(config.num_hidden_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.rotary_emb = CodeGenRotaryEmbedding(config)
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
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)
        hidden_states = inputs_embeds
        for layer in self.h:
            hidden_states = layer(hidden_states, position_embeddings)
        return self.ln_f(hidden_states)


class CodeGenForCausalLM(CodeGenPreTrainedModel):
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: CodeGenConfig) -> None:
        super().__init__(config)
        self.transformer = CodeGenModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=True)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None,
        position_ids: torch.LongTensor,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> CodeGenCausalLMOutput:
        assert position_ids is not None, "position_ids is required"
        hidden_states = self.transformer(input_ids, position_ids, inputs_embeds)
        logits = torch.ops.auto_deploy.torch_linear_simple(
            hidden_states, self.lm_head.weight, self.lm_head.bias
        )
        return CodeGenCausalLMOutput(logits=logits.float())


AutoModelForCausalLMFactory.register_custom_model_cls("CodeGenConfig", CodeGenForCausalLM)
