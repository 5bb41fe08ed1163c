"""Lean, export-friendly FalconH1 on canonical ``auto_deploy`` ops.

Mirrors ``transformers.models.falcon_h1.modeling_falcon_h1`` (FalconH1ForCausalLM): a hybrid stack
of pre-norm layers with RMSNorm, built from Mamba2 SSD mixers, grouped-query attention, dense MLPs
and rotary position embeddings. Layer kinds in the analyzed config: mamba2+mlp (2 of 2 layers);
every layer is built as a mamba2+mlp layer (re-onboard a config with other kinds); residual steps
with blocks in parallel on one normed input, multipliers on block inputs, outputs or residual adds.
Module names equal the checkpoint keys, so HuggingFace state dicts load with ``strict=True``.

Left out on purpose: the KV cache and the mixers' conv and scan states (they run from a zero state
on ``torch_causal_conv1d`` / ``torch_ssm``; the runtime swaps in cached versions), attention masks
and padding masks (sequences are causal and unpadded), dropout, gradient checkpointing, fused-kernel
paths, position-id generation (callers pass them), hidden-state outputs and the loss.
Linear, split, view, conv, scan and gated-norm calls carry tensor-parallel sharding hints; they do
not change the numbers.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import FalconH1Config
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import ModelOutput

import onboardlm.ops  # noqa: F401  (registers torch.ops.auto_deploy.*)
from onboardlm.models.factory import AutoModelForCausalLMFactory


def _rope_inverse_frequencies(config: FalconH1Config) -> tuple[torch.Tensor, float]:
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
class FalconH1CausalLMOutput(ModelOutput):
    logits: torch.FloatTensor | None = None


class FalconH1RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.ops.auto_deploy.torch_rmsnorm(hidden_states, self.weight, self.variance_epsilon)


class FalconH1RotaryEmbedding(nn.Module):
    """cos/sin of ``position_ids * inv_freq``, computed in fp32 once per forward for all layers."""

    def __init__(self, config: FalconH1Config) -> None:
        super().__init__()
        inv_freq, self.attention_scaling = _rope_inverse_frequencies(config)
        self.register_buffer("_ad_inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self._ad_inv_freq.float()
        angles = torch.cat((freqs, freqs), dim=-1)
        cos = angles.cos() * self.attention_scaling
        sin = angles.sin() * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)


class FalconH1RMSNormGated(nn.Module):
    """Grouped RMSNorm of the SSM output, gated by SiLU(gate) after the norm or (``norm_before_gate``
    False) before it."""

    def __init__(self, hidden_size: int, group_size: int, eps: float, norm_before_gate: bool) -> None:
        super().__init__()
        self.norm_before_gate = norm_before_gate
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps
        self.group_size = group_size

    def forward(self, hidden_states: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return torch.ops.auto_deploy.torch_rmsnorm_gated(
            hidden_states,
            self.weight,
            gate,
            self.variance_epsilon,
            self.group_size,
            norm_before_gate=self.norm_before_gate,
            tp_mode="colwise",
            layer_type="ssm",
        )


class FalconH1Mixer(nn.Module):
    """Mamba2 (SSD) mixer: in_proj -> causal depthwise conv on x|B|C -> selective scan -> gated RMSNorm
    -> out_proj. The conv and the scan run from a zero state here; the runtime's cache transform swaps
    in their cached versions (conv and SSM state per sequence)."""

    def __init__(self, config: FalconH1Config, layer_idx: int) -> None:
        super().__init__()
        self.num_heads = config.mamba_n_heads
        self.n_groups = config.mamba_n_groups
        self.ssm_state_size = config.mamba_d_state
        self.intermediate_size = (
            int(config.mamba_expand * config.hidden_size)
            if config.mamba_d_ssm is None
            else config.mamba_d_ssm
        )
        self.head_dim = self.intermediate_size // self.num_heads
        self.conv_kernel_size = config.mamba_d_conv
        self.conv_dim = self.intermediate_size + 2 * self.n_groups * self.ssm_state_size
        self.chunk_size = config.mamba_chunk_size
        self.time_step_limit = [float(value) for value in config.time_step_limit]
        self.in_scale = config.ssm_in_multiplier
        # µP multipliers of in_proj's gate | x | B | C | dt segments, one constant each
        group_state = self.n_groups * self.ssm_state_size
        sizes = [self.intermediate_size, self.intermediate_size, group_state, group_state, self.num_heads]
        scales = [
            config.ssm_multipliers[0],
            config.ssm_multipliers[1],
            config.ssm_multipliers[2],
            config.ssm_multipliers[3],
            config.ssm_multipliers[4],
        ]
        projection_scale = torch.cat(
            [torch.full((size,), float(scale)) for size, scale in zip(sizes, scales, strict=True)]
        )
        self.register_buffer("_ad_projection_scale", projection_scale, persistent=False)
        self.in_proj = nn.Linear(
            config.hidden_size,
            self.intermediate_size + self.conv_dim + self.num_heads,
            bias=config.mamba_proj_bias,
        )
        self.conv1d = nn.Conv1d(
            self.conv_dim,
            self.conv_dim,
            kernel_size=self.conv_kernel_size,
            groups=self.conv_dim,
            padding=self.conv_kernel_size - 1,
            bias=config.mamba_conv_bias,
        )
        self.act = ACT2FN[config.hidden_act]
        self.dt_bias = nn.Parameter(torch.ones(self.num_heads))
        self.A_log = nn.Parameter(torch.zeros(self.num_heads))
        self.D = nn.Parameter(torch.ones(self.num_heads))
        # without the gated norm the gate alone scales the scan output
        self.norm = (
            FalconH1RMSNormGated(
                self.intermediate_size,
                self.intermediate_size // self.n_groups,
                config.rms_norm_eps,
                config.mamba_norm_before_gate,
            )
            if config.mamba_rms_norm
            else None
        )
        self.out_proj = nn.Linear(self.intermediate_size, config.hidden_size, bias=config.projectors_bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        ops = torch.ops.auto_deploy
        batch, seq_len, _ = hidden_states.shape
        inner, group_state = self.intermediate_size, self.n_groups * self.ssm_state_size
        projected = ops.torch_linear_simple(
            hidden_states * self.in_scale,
            self.in_proj.weight,
            self.in_proj.bias,
            tp_mode="colwise",
            output_sizes=[inner, inner, group_state, group_state, self.num_heads],
            layer_type="ssm",
        )
        projected = projected * self._ad_projection_scale
        gate, xbc, dt = ops.split_with_sizes(
            projected, [inner, self.conv_dim, self.num_heads], dim=-1, enable_sharding=True, layer_type="ssm"
        )
        xbc = ops.torch_causal_conv1d(
            xbc,
            self.conv1d.weight,
            self.conv1d.bias,
            padding=self.conv_kernel_size - 1,
            groups=self.conv_dim,
            shardable=True,
            output_sizes=[inner, group_state, group_state],
            layer_type="ssm",
        )
        xbc = self.act(xbc)
        x, B, C = ops.split_with_sizes(
            xbc, [inner, group_state, group_state], dim=-1, enable_sharding=True, layer_type="ssm"
        )
        x = ops.view(x, [batch, seq_len, self.num_heads, self.head_dim], tp_scaled_dim=2, layer_type="ssm")
        B = ops.view(
            B, [batch, seq_len, self.n_groups, self.ssm_state_size], tp_scaled_dim=2, layer_type="ssm"
        )
        C = ops.view(
            C, [batch, seq_len, self.n_groups, self.ssm_state_size], tp_scaled_dim=2, layer_type="ssm"
        )
        y = ops.torch_ssm(
            x,
            -torch.exp(self.A_log.float()),
            B,
            C,
            self.D,
            dt,
            self.dt_bias,
            self.time_step_limit,
            self.chunk_size,
            shardable=True,
            layer_type="ssm",
        )
        y = ops.view(y, [batch, seq_len, inner], tp_scaled_dim=2, layer_type="ssm")
        y = y * F.silu(gate) if self.norm is None else self.norm(y, gate)
        out = ops.torch_linear_simple(
            y.to(hidden_states.dtype),
            self.out_proj.weight,
            self.out_proj.bias,
            tp_mode="rowwise",
            layer_type="ssm",
        )
        return ops.all_reduce(out, layer_type="ssm")


class FalconH1Attention(nn.Module):
    def __init__(self, config: FalconH1Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5 * config.key_multiplier
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(
        self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
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

        cos, sin = position_embeddings
        q, k = ops.torch_rope_with_explicit_cos_sin(q, k, cos, sin, 2)
        attn = ops.torch_attention(q, k, v, is_causal=True, scale=self.scaling, layout="bsnd")

        attn = ops.view(
            attn, [batch, seq_len, self.num_heads * self.head_dim], tp_scaled_dim=2, layer_type="mha"
        )
        out = ops.torch_linear_simple(
            attn, self.o_proj.weight, self.o_proj.bias, tp_mode="rowwise", layer_type="mha"
        )
        return ops.all_reduce(out, layer_type="mha")


class FalconH1MLP(nn.Module):
    def __init__(self, config: FalconH1Config) -> None:
        super().__init__()
        bias = config.mlp_bias
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)
        self.gate_scale = config.mlp_multipliers[0]
        self.down_scale = config.mlp_multipliers[1]
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        linear = torch.ops.auto_deploy.torch_linear_simple
        gate = linear(x, self.gate_proj.weight, self.gate_proj.bias, tp_mode="colwise", layer_type="mlp")
        up = linear(x, self.up_proj.weight, self.up_proj.bias, tp_mode="colwise", layer_type="mlp")
        gate = gate * self.gate_scale
        down = linear(
            self.act_fn(gate) * up,
            self.down_proj.weight,
            self.down_proj.bias,
            tp_mode="rowwise",
            layer_type="mlp",
        )
        down = down * self.down_scale
        return torch.ops.auto_deploy.all_reduce(down, layer_type="mlp")


class FalconH1DecoderLayer(nn.Module):
    def __init__(self, config: FalconH1Config, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = FalconH1RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mamba = FalconH1Mixer(config, layer_idx)
        self.self_attn = FalconH1Attention(config, layer_idx)
        self.pre_ff_layernorm = FalconH1RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.feed_forward = FalconH1MLP(config)
        self.ssm_out_multiplier = config.ssm_out_multiplier
        self.attention_in_multiplier = config.attention_in_multiplier
        self.attention_out_multiplier = config.attention_out_multiplier

    def forward(
        self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        normed = self.input_layernorm(hidden_states)
        hidden_states = (
            hidden_states
            + self.mamba(normed) * self.ssm_out_multiplier
            + self.self_attn(normed * self.attention_in_multiplier, position_embeddings)
            * self.attention_out_multiplier
        )
        hidden_states = hidden_states + self.feed_forward(self.pre_ff_layernorm(hidden_states))
        return hidden_states


class FalconH1PreTrainedModel(PreTrainedModel):
    config_class = FalconH1Config
    base_model_prefix = "model"
    _no_split_modules = ["FalconH1DecoderLayer"]


class FalconH1Model(FalconH1PreTrainedModel):
    def __init__(self, config: FalconH1Config) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(FalconH1DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.final_layernorm = FalconH1RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = FalconH1RotaryEmbedding(config)
        self.embed_scale = config.embedding_multiplier
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
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)
        hidden_states = inputs_embeds * self.embed_scale
        for layer in self.layers:
            hidden_states = layer(hidden_states, position_embeddings)
        return self.final_layernorm(hidden_states)


class FalconH1ForCausalLM(FalconH1PreTrainedModel):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: FalconH1Config) -> None:
        super().__init__(config)
        self.model = FalconH1Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.lm_head_multiplier = config.lm_head_multiplier
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None,
        position_ids: torch.LongTensor,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> FalconH1CausalLMOutput:
        assert position_ids is not None, "position_ids is required"
        hidden_states = self.model(input_ids, position_ids, inputs_embeds)
        logits = torch.ops.auto_deploy.torch_linear_simple(hidden_states, self.lm_head.weight, None)
        logits = logits * self.lm_head_multiplier
        return FalconH1CausalLMOutput(logits=logits.float())


AutoModelForCausalLMFactory.register_custom_model_cls("FalconH1Config", FalconH1ForCausalLM)
