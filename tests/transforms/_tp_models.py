"""A toy language model with the hint patterns no shipped lean file uses yet, for the TP test.

Three residual blocks: MLA as the generator's template writes it (latent projections
``tp_mode="none"``, ``q_b_proj`` colwise + ``view``, ``torch_mla(enable_sharding=True)``, ``o_proj``
rowwise with a bias + ``all_reduce``); GQA attention with one fused QKV weight (``output_sizes``,
``tp_min_local_shape``, ``split_with_sizes(enable_sharding=True)``); and an MLP with one fused
gate/up weight. Built on a ``DeepseekV3Config`` (attention and MLP sizes only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DeepseekV3Config
from transformers.utils import ModelOutput

import onboardlm.ops  # noqa: F401  (registers torch.ops.auto_deploy.*)


@dataclass
class ToyOutput(ModelOutput):
    logits: torch.FloatTensor | None = None


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.auto_deploy.torch_rmsnorm(x, self.weight, self.eps)


class MlaAttention(nn.Module):
    def __init__(self, config: DeepseekV3Config) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.kv_lora_rank = config.kv_lora_rank
        self.nope_dim, self.rope_dim = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        self.qk_head_dim = self.nope_dim + self.rope_dim
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.q_a_proj = nn.Linear(hidden, config.q_lora_rank, bias=False)
        self.q_a_layernorm = RMSNorm(config.q_lora_rank, eps)
        self.q_b_proj = nn.Linear(config.q_lora_rank, self.num_heads * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, self.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, eps)
        self.kv_b_proj = nn.Linear(
            self.kv_lora_rank, self.num_heads * (self.nope_dim + self.v_head_dim), bias=False
        )
        self.o_proj = nn.Linear(self.num_heads * self.v_head_dim, hidden, bias=True)

    def forward(self, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ops = torch.ops.auto_deploy
        batch, seq_len = hidden_states.shape[:2]
        q_latent = ops.torch_linear_simple(
            hidden_states, self.q_a_proj.weight, None, tp_mode="none", layer_type="mla"
        )
        q = ops.torch_linear_simple(
            self.q_a_layernorm(q_latent), self.q_b_proj.weight, None, tp_mode="colwise", layer_type="mla"
        )
        q = ops.view(q, [batch, seq_len, self.num_heads, self.qk_head_dim], tp_scaled_dim=2, layer_type="mla")
        q_nope, q_pe = torch.split(q, [self.nope_dim, self.rope_dim], dim=-1)
        latent = ops.torch_linear_simple(
            hidden_states, self.kv_a_proj_with_mqa.weight, None, tp_mode="none", layer_type="mla"
        )
        compressed_kv, k_pe = torch.split(latent, [self.kv_lora_rank, self.rope_dim], dim=-1)
        k_pe = k_pe.reshape(batch, seq_len, 1, self.rope_dim)
        q_pe, k_pe = ops.torch_rope_with_explicit_cos_sin(q_pe, k_pe, cos, sin, 2)
        attn = ops.torch_mla(
            q_nope,
            q_pe,
            self.kv_a_layernorm(compressed_kv),
            k_pe,
            self.kv_b_proj.weight,
            is_causal=True,
            layout="bsnd",
            enable_sharding=True,
            layer_type="mla",
        )
        attn = ops.view(
            attn, [batch, seq_len, self.num_heads * self.v_head_dim], tp_scaled_dim=2, layer_type="mla"
        )
        out = ops.torch_linear_simple(
            attn, self.o_proj.weight, self.o_proj.bias, tp_mode="rowwise", layer_type="mla"
        )
        return ops.all_reduce(out, layer_type="mla")


class FusedQKVAttention(nn.Module):
    def __init__(self, config: DeepseekV3Config) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.hidden_size // self.num_heads
        self.sizes = [self.num_heads * self.head_dim] + [self.num_kv_heads * self.head_dim] * 2
        self.qkv_proj = nn.Linear(config.hidden_size, sum(self.sizes), bias=True)
        self.o_proj = nn.Linear(self.sizes[0], config.hidden_size, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        ops = torch.ops.auto_deploy
        batch, seq_len = hidden_states.shape[:2]
        qkv = ops.torch_linear_simple(
            hidden_states,
            self.qkv_proj.weight,
            self.qkv_proj.bias,
            tp_mode="colwise",
            output_sizes=self.sizes,
            tp_min_local_shape=self.head_dim,
            layer_type="mha",
        )
        q, k, v = ops.split_with_sizes(qkv, self.sizes, -1, enable_sharding=True, layer_type="mha")
        heads = (self.num_heads, self.num_kv_heads, self.num_kv_heads)
        q, k, v = (
            ops.view(x, [batch, seq_len, n, self.head_dim], tp_scaled_dim=2, layer_type="mha")
            for x, n in zip((q, k, v), heads, strict=True)
        )
        attn = ops.torch_attention(q, k, v, is_causal=True, layout="bsnd")
        attn = ops.view(attn, [batch, seq_len, self.sizes[0]], tp_scaled_dim=2, layer_type="mha")
        out = ops.torch_linear_simple(attn, self.o_proj.weight, None, tp_mode="rowwise", layer_type="mha")
        return ops.all_reduce(out, layer_type="mha")


class FusedGateUpMLP(nn.Module):
    def __init__(self, config: DeepseekV3Config) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * self.intermediate_size, bias=False)
        self.down_proj = nn.Linear(self.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = torch.ops.auto_deploy
        sizes = [self.intermediate_size] * 2
        gate_up = ops.torch_linear_simple(
            x, self.gate_up_proj.weight, None, tp_mode="colwise", output_sizes=sizes, layer_type="mlp"
        )
        gate, up = ops.split_with_sizes(gate_up, sizes, -1, enable_sharding=True, layer_type="mlp")
        down = ops.torch_linear_simple(
            F.silu(gate) * up, self.down_proj.weight, None, tp_mode="rowwise", layer_type="mlp"
        )
        return ops.all_reduce(down, layer_type="mlp")


class ToyForCausalLM(nn.Module):
    def __init__(self, config: DeepseekV3Config) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MlaAttention(config)
        self.fused_attn = FusedQKVAttention(config)
        self.mlp = FusedGateUpMLP(config)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        rope_dim = config.qk_rope_head_dim
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rope_dim, 2).float() / rope_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, inputs_embeds: torch.Tensor | None = None
    ) -> ToyOutput:
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        freqs = position_ids[..., None].float() * self.inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), angles.cos(), angles.sin())
        hidden = hidden + self.fused_attn(hidden)
        hidden = hidden + self.mlp(hidden)
        return ToyOutput(logits=self.lm_head(self.norm(hidden)).float())
