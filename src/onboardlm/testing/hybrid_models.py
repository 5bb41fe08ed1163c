"""Tiny hand-written hybrid causal LMs on the canonical ops, written the way a generated lean file is.

Until the generated hybrid files exist, these stand in for them in the runtime tests
(tests/runtime/test_hybrid_runtime.py, tests/transforms/test_state_cache.py): each layer's
token mixer is attention (``torch_attention`` + RoPE), a Mamba2 mixer (``torch_causal_conv1d`` ->
``torch_ssm`` -> ``torch_rmsnorm_gated``) or a Gated DeltaNet mixer (``torch_causal_conv1d`` ->
``torch_gated_delta_rule`` -> ``torch_rmsnorm_gated``), with sharding hints, module names as a
checkpoint would have them, ``forward(input_ids, position_ids)`` returning fp32 logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

import onboardlm.ops  # noqa: F401  (registers torch.ops.auto_deploy.*)


@dataclass
class HybridConfig:
    layer_types: tuple[str, ...] = ("mamba2", "attention", "delta")
    vocab_size: int = 50
    hidden_size: int = 32
    intermediate_size: int = 48
    rms_norm_eps: float = 1e-6
    # attention
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 8
    rope_theta: float = 10000.0
    # Mamba2
    mamba_num_heads: int = 4
    mamba_head_dim: int = 8
    mamba_n_groups: int = 2
    mamba_state_size: int = 8
    mamba_conv_kernel: int = 4
    mamba_chunk_size: int = 4  # small: prompts span several chunks
    time_step_limit: tuple[float, float] = field(default=(0.0, math.inf))
    # Gated DeltaNet
    linear_num_key_heads: int = 2
    linear_num_value_heads: int = 4
    linear_key_head_dim: int = 8
    linear_value_head_dim: int = 6
    linear_conv_kernel: int = 4


@dataclass
class HybridOutput(ModelOutput):
    logits: torch.FloatTensor | None = None


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.auto_deploy.torch_rmsnorm(x, self.weight, self.eps)


class MLP(nn.Module):
    def __init__(self, config: HybridConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        linear = torch.ops.auto_deploy.torch_linear_simple
        gate = linear(x, self.gate_proj.weight, None, tp_mode="colwise", layer_type="mlp")
        up = linear(x, self.up_proj.weight, None, tp_mode="colwise", layer_type="mlp")
        down = linear(F.silu(gate) * up, self.down_proj.weight, None, tp_mode="rowwise", layer_type="mlp")
        return torch.ops.auto_deploy.all_reduce(down, layer_type="mlp")


class Attention(nn.Module):
    def __init__(self, config: HybridConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim,
        )  # fmt: skip
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, hidden, bias=False)
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, self.head_dim, 2).float() / self.head_dim))
        self.register_buffer("_ad_inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        ops = torch.ops.auto_deploy
        b, s, _ = x.shape
        q = ops.torch_linear_simple(x, self.q_proj.weight, None, tp_mode="colwise", layer_type="mha")
        k = ops.torch_linear_simple(x, self.k_proj.weight, None, tp_mode="colwise", layer_type="mha")
        v = ops.torch_linear_simple(x, self.v_proj.weight, None, tp_mode="colwise", layer_type="mha")
        q = ops.view(q, [b, s, self.heads, self.head_dim], tp_scaled_dim=2, layer_type="mha")
        k = ops.view(k, [b, s, self.kv_heads, self.head_dim], tp_scaled_dim=2, layer_type="mha")
        v = ops.view(v, [b, s, self.kv_heads, self.head_dim], tp_scaled_dim=2, layer_type="mha")
        freqs = position_ids[..., None].float() * self._ad_inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)
        q, k = ops.torch_rope_with_explicit_cos_sin(
            q, k, angles.cos().to(x.dtype), angles.sin().to(x.dtype), 2
        )
        attn = ops.torch_attention(q, k, v, is_causal=True, layout="bsnd")
        attn = ops.view(attn, [b, s, self.heads * self.head_dim], tp_scaled_dim=2, layer_type="mha")
        out = ops.torch_linear_simple(attn, self.o_proj.weight, None, tp_mode="rowwise", layer_type="mha")
        return ops.all_reduce(out, layer_type="mha")


class Mamba2Mixer(nn.Module):
    """HF ``Mamba2Mixer`` without its cache: in_proj -> conv -> SSM -> gated norm -> out_proj."""

    def __init__(self, config: HybridConfig) -> None:
        super().__init__()
        self.heads, self.head_dim = config.mamba_num_heads, config.mamba_head_dim
        self.groups, self.state = config.mamba_n_groups, config.mamba_state_size
        self.inner = self.heads * self.head_dim
        self.conv_dim = self.inner + 2 * self.groups * self.state
        self.kernel, self.chunk_size = config.mamba_conv_kernel, config.mamba_chunk_size
        self.time_step_limit, self.eps = list(config.time_step_limit), config.rms_norm_eps
        self.in_proj = nn.Linear(config.hidden_size, self.inner + self.conv_dim + self.heads, bias=False)
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, self.kernel, groups=self.conv_dim, padding=self.kernel - 1
        )
        self.dt_bias = nn.Parameter(torch.ones(self.heads))
        self.A_log = nn.Parameter(torch.zeros(self.heads))
        self.D = nn.Parameter(torch.ones(self.heads))
        self.norm = RMSNorm(self.inner, config.rms_norm_eps)
        self.out_proj = nn.Linear(self.inner, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = torch.ops.auto_deploy
        b, s, _ = x.shape
        proj = ops.torch_linear_simple(x, self.in_proj.weight, None, tp_mode="colwise", layer_type="ssm")
        gate, xbc, dt = proj.split([self.inner, self.conv_dim, self.heads], dim=-1)
        xbc = ops.torch_causal_conv1d(
            xbc, self.conv1d.weight, self.conv1d.bias, 1, self.kernel - 1, 1, self.conv_dim, "zeros",
            shardable=True, layer_type="ssm",
        )  # fmt: skip
        hidden, B, C = F.silu(xbc).split(
            [self.inner, self.groups * self.state, self.groups * self.state], dim=-1
        )
        y = ops.torch_ssm(
            hidden.reshape(b, s, self.heads, self.head_dim),
            -torch.exp(self.A_log.float()),
            B.reshape(b, s, self.groups, self.state),
            C.reshape(b, s, self.groups, self.state),
            self.D,
            dt,
            self.dt_bias,
            self.time_step_limit,
            self.chunk_size,
            shardable=True,
            layer_type="ssm",
        )
        y = ops.torch_rmsnorm_gated(
            y.reshape(b, s, self.inner), self.norm.weight, gate, self.eps, self.inner // self.groups,
            layer_type="ssm",
        ).to(x.dtype)  # fmt: skip
        out = ops.torch_linear_simple(y, self.out_proj.weight, None, tp_mode="rowwise", layer_type="ssm")
        return ops.all_reduce(out, layer_type="ssm")


class GatedDeltaNet(nn.Module):
    """Qwen3-Next style: q/k/v through a depthwise conv, the gated delta rule, a gated norm per head."""

    def __init__(self, config: HybridConfig) -> None:
        super().__init__()
        self.k_heads, self.v_heads = config.linear_num_key_heads, config.linear_num_value_heads
        self.k_dim, self.v_dim = config.linear_key_head_dim, config.linear_value_head_dim
        self.key_size, self.value_size = self.k_heads * self.k_dim, self.v_heads * self.v_dim
        self.conv_dim = 2 * self.key_size + self.value_size
        self.kernel, self.eps = config.linear_conv_kernel, config.rms_norm_eps
        hidden = config.hidden_size
        self.in_proj_qkv = nn.Linear(hidden, self.conv_dim, bias=False)
        self.in_proj_z = nn.Linear(hidden, self.value_size, bias=False)
        self.in_proj_b = nn.Linear(hidden, self.v_heads, bias=False)
        self.in_proj_a = nn.Linear(hidden, self.v_heads, bias=False)
        self.conv1d = nn.Conv1d(
            self.conv_dim,
            self.conv_dim,
            self.kernel,
            groups=self.conv_dim,
            bias=False,
            padding=self.kernel - 1,
        )
        self.dt_bias = nn.Parameter(torch.ones(self.v_heads))
        self.A_log = nn.Parameter(torch.zeros(self.v_heads))
        self.norm = RMSNorm(self.v_dim, config.rms_norm_eps)
        self.out_proj = nn.Linear(self.value_size, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = torch.ops.auto_deploy
        b, s, _ = x.shape

        def linear(weight: torch.Tensor) -> torch.Tensor:
            return ops.torch_linear_simple(x, weight, None, tp_mode="colwise", layer_type="delta")

        qkv = linear(self.in_proj_qkv.weight)
        z, beta_raw, a = (
            linear(self.in_proj_z.weight),
            linear(self.in_proj_b.weight),
            linear(self.in_proj_a.weight),
        )
        qkv = ops.torch_causal_conv1d(
            qkv, self.conv1d.weight, None, 1, self.kernel - 1, 1, self.conv_dim, "zeros", shardable=True,
            output_sizes=[self.key_size, self.key_size, self.value_size], layer_type="delta",
        )  # fmt: skip
        q, k, v = F.silu(qkv).split([self.key_size, self.key_size, self.value_size], dim=-1)
        out = ops.torch_gated_delta_rule(
            q.reshape(b, s, self.k_heads, self.k_dim),
            k.reshape(b, s, self.k_heads, self.k_dim),
            v.reshape(b, s, self.v_heads, self.v_dim),
            a,
            beta_raw,
            self.A_log,
            self.dt_bias,
            shardable=True,
            layer_type="delta",
        )
        out = ops.torch_rmsnorm_gated(
            out, self.norm.weight, z.reshape(b, s, self.v_heads, self.v_dim), self.eps, self.v_dim,
            norm_before_gate=True, layer_type="delta",
        )  # fmt: skip
        out = ops.torch_linear_simple(
            out.reshape(b, s, self.value_size),
            self.out_proj.weight,
            None,
            tp_mode="rowwise",
            layer_type="delta",
        )
        return ops.all_reduce(out, layer_type="delta")


class KimiDeltaAttention(nn.Module):
    """Kimi Delta Attention style: separate q/k/v through a depthwise conv, a low-rank forget gate giving
    one decay per key channel, the per-channel gated delta rule, a gated norm per head."""

    def __init__(self, config: HybridConfig) -> None:
        super().__init__()
        self.heads, self.k_dim = config.linear_num_key_heads, config.linear_key_head_dim
        self.size = self.heads * self.k_dim
        self.kernel, self.eps = config.linear_conv_kernel, config.rms_norm_eps
        hidden = config.hidden_size
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(hidden, self.size, bias=False) for _ in range(3))
        self.conv1d = nn.Conv1d(
            3 * self.size,
            3 * self.size,
            self.kernel,
            groups=3 * self.size,
            bias=False,
            padding=self.kernel - 1,
        )
        self.f_a_proj = nn.Linear(hidden, self.k_dim, bias=False)
        self.f_b_proj = nn.Linear(self.k_dim, self.size, bias=False)
        self.dt_bias = nn.Parameter(torch.zeros(self.size))
        self.A_log = nn.Parameter(torch.zeros(self.heads))
        self.b_proj = nn.Linear(hidden, self.heads, bias=False)
        self.g_proj = nn.Linear(hidden, self.size, bias=False)
        self.norm = RMSNorm(self.k_dim, config.rms_norm_eps)
        self.o_proj = nn.Linear(self.size, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = torch.ops.auto_deploy
        b, s, _ = x.shape

        def linear(weight: torch.Tensor, h: torch.Tensor = x, mode: str = "colwise") -> torch.Tensor:
            return ops.torch_linear_simple(h, weight, None, tp_mode=mode, layer_type="delta")

        qkv = torch.cat(
            [linear(self.q_proj.weight), linear(self.k_proj.weight), linear(self.v_proj.weight)], -1
        )
        qkv = ops.torch_causal_conv1d(
            qkv, self.conv1d.weight, None, 1, self.kernel - 1, 1, 3 * self.size, "zeros", shardable=True,
            output_sizes=[self.size] * 3, layer_type="delta",
        )  # fmt: skip
        q, k, v = (t.reshape(b, s, self.heads, self.k_dim) for t in F.silu(qkv).split(self.size, dim=-1))
        forget = linear(self.f_b_proj.weight, linear(self.f_a_proj.weight, mode="none"))
        g = -self.A_log.float().exp()[:, None] * F.softplus(
            (forget.float() + self.dt_bias.float()).reshape(b, s, self.heads, self.k_dim)
        )
        beta = torch.sigmoid(linear(self.b_proj.weight).float())
        out = ops.torch_channel_gated_delta_rule(q, k, v, g, beta, shardable=True, layer_type="delta")
        out = ops.torch_rmsnorm_gated(
            out, self.norm.weight, linear(self.g_proj.weight).reshape(b, s, self.heads, self.k_dim), self.eps,
            self.k_dim, norm_before_gate=True, layer_type="delta",
        )  # fmt: skip
        out = linear(self.o_proj.weight, out.reshape(b, s, self.size), mode="rowwise")
        return ops.all_reduce(out, layer_type="delta")


class DecoderLayer(nn.Module):
    def __init__(self, config: HybridConfig, layer_type: str) -> None:
        super().__init__()
        self.layer_type = layer_type
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if layer_type == "attention":
            self.self_attn = Attention(config)
        elif layer_type == "mamba2":
            self.mixer = Mamba2Mixer(config)
        elif layer_type == "kda":
            self.linear_attn = KimiDeltaAttention(config)
        else:
            self.linear_attn = GatedDeltaNet(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        h = self.input_layernorm(x)
        if self.layer_type == "attention":
            h = self.self_attn(h, position_ids)
        elif self.layer_type == "mamba2":
            h = self.mixer(h)
        else:
            h = self.linear_attn(h)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))


class HybridForCausalLM(nn.Module):
    def __init__(self, config: HybridConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, t) for t in config.layer_types)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, **kwargs) -> HybridOutput:
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, position_ids)
        logits = torch.ops.auto_deploy.torch_linear_simple(self.norm(x), self.lm_head.weight, None)
        return HybridOutput(logits=logits.float())


#: One model of each mixer kind, and a hybrid of all three; the per-channel delta rule beside attention.
LAYOUTS = {
    "mamba2": ("mamba2", "mamba2"),
    "gated_delta": ("delta", "delta"),
    "hybrid": ("mamba2", "attention", "delta"),
    "channel_delta": ("kda", "attention"),
}


def random_model(layout: str, seed: int = 0, std: float = 0.4) -> HybridForCausalLM:
    """The model of ``layout`` with every parameter drawn at random (peaked logits: no greedy ties)."""
    torch.manual_seed(seed)
    model = HybridForCausalLM(HybridConfig(layer_types=LAYOUTS[layout]))
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, std)
    return model.eval()
