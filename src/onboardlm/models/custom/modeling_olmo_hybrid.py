"""Lean, export-friendly OlmoHybrid on canonical ``auto_deploy`` ops.

Mirrors ``transformers.models.olmo_hybrid.modeling_olmo_hybrid`` (OlmoHybridForCausalLM): a hybrid
stack of pre-norm layers with RMSNorm, built from gated delta rule (linear attention) mixers, dense
MLPs, grouped-query attention and rotary position embeddings. Layer kinds in the analyzed config:
gated_delta+mlp (1 of 2 layers), attention+mlp (1 of 2 layers); a layer's kind is read from
config.layer_types[layer_idx]. Module names equal the checkpoint keys, so HuggingFace state dicts
load with ``strict=True``.

Left out on purpose: the KV cache and the mixers' conv and scan states (they run from a zero state
on ``torch_causal_conv1d`` / ``torch_gated_delta_rule``; the runtime swaps in cached versions),
attention masks and padding masks (sequences are causal and unpadded), dropout, gradient
checkpointing, fused-kernel paths, position-id generation (callers pass them), hidden-state outputs
and the loss.
Linear, split, view, conv, scan and gated-norm calls carry tensor-parallel sharding hints; they do
not change the numbers.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import OlmoHybridConfig
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import ModelOutput

import onboardlm.ops  # noqa: F401  (registers torch.ops.auto_deploy.*)
from onboardlm.models.factory import AutoModelForCausalLMFactory


def _rope_inverse_frequencies(config: OlmoHybridConfig) -> tuple[torch.Tensor, float]:
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
class OlmoHybridCausalLMOutput(ModelOutput):
    logits: torch.FloatTensor | None = None


class OlmoHybridRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.ops.auto_deploy.torch_rmsnorm(hidden_states, self.weight, self.variance_epsilon)


class OlmoHybridRotaryEmbedding(nn.Module):
    """cos/sin of ``position_ids * inv_freq``, computed in fp32 once per forward for all layers."""

    def __init__(self, config: OlmoHybridConfig) -> None:
        super().__init__()
        inv_freq, self.attention_scaling = _rope_inverse_frequencies(config)
        self.register_buffer("_ad_inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self._ad_inv_freq.float()
        angles = torch.cat((freqs, freqs), dim=-1)
        cos = angles.cos() * self.attention_scaling
        sin = angles.sin() * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)


class OlmoHybridRMSNormGated(nn.Module):
    """Per-head RMSNorm of the mixer output, gated by ``silu(gate)`` after the norm."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return torch.ops.auto_deploy.torch_rmsnorm_gated(
            hidden_states,
            self.weight,
            gate,
            self.variance_epsilon,
            self.weight.shape[0],
            norm_before_gate=True,
            layer_type="delta",
        )


class OlmoHybridGatedDeltaNet(nn.Module):
    """Gated DeltaNet: in-projections, depthwise causal conv over [q | k | v], gated delta rule, gated norm."""

    def __init__(self, config: OlmoHybridConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_v_heads = config.linear_num_value_heads
        self.num_k_heads = config.linear_num_key_heads
        self.head_k_dim = config.linear_key_head_dim
        self.head_v_dim = config.linear_value_head_dim
        self.key_dim = self.num_k_heads * self.head_k_dim
        self.value_dim = self.num_v_heads * self.head_v_dim
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.conv_kernel_size = config.linear_conv_kernel_dim
        hidden_size = config.hidden_size
        self.q_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
        self.a_proj = nn.Linear(hidden_size, self.num_v_heads, bias=False)
        self.b_proj = nn.Linear(hidden_size, self.num_v_heads, bias=False)
        self.g_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
        self.conv1d = nn.Conv1d(
            self.conv_dim,
            self.conv_dim,
            self.conv_kernel_size,
            groups=self.conv_dim,
            bias=False,
            padding=self.conv_kernel_size - 1,
        )
        self.dt_bias = nn.Parameter(torch.ones(self.num_v_heads))
        self.A_log = nn.Parameter(torch.zeros(self.num_v_heads))
        self.o_norm = OlmoHybridRMSNormGated(self.head_v_dim, 1e-05)
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False)
        self.conv_act = ACT2FN[config.hidden_act]
        self.write_scale = 2.0 if config.linear_allow_neg_eigval else 1.0

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        ops = torch.ops.auto_deploy
        batch, seq_len = hidden_states.shape[:2]
        key_dim, value_dim, conv_dim = self.key_dim, self.value_dim, self.conv_dim
        q = ops.torch_linear_simple(
            hidden_states, self.q_proj.weight, self.q_proj.bias, tp_mode="colwise", layer_type="delta"
        )
        k = ops.torch_linear_simple(
            hidden_states, self.k_proj.weight, self.k_proj.bias, tp_mode="colwise", layer_type="delta"
        )
        v = ops.torch_linear_simple(
            hidden_states, self.v_proj.weight, self.v_proj.bias, tp_mode="colwise", layer_type="delta"
        )
        a = ops.torch_linear_simple(
            hidden_states, self.a_proj.weight, self.a_proj.bias, tp_mode="colwise", layer_type="delta"
        )
        b = ops.torch_linear_simple(
            hidden_states, self.b_proj.weight, self.b_proj.bias, tp_mode="colwise", layer_type="delta"
        )
        z = ops.torch_linear_simple(
            hidden_states, self.g_proj.weight, self.g_proj.bias, tp_mode="colwise", layer_type="delta"
        )
        z = ops.view(
            z, [batch, seq_len, self.num_v_heads, self.head_v_dim], tp_scaled_dim=2, layer_type="delta"
        )
        mixed_qkv = torch.cat([q, k, v], dim=-1)
        mixed_qkv = ops.torch_causal_conv1d(
            mixed_qkv,
            self.conv1d.weight,
            self.conv1d.bias,
            1,
            self.conv_kernel_size - 1,
            1,
            conv_dim,
            shardable=True,
            output_sizes=[key_dim, key_dim, value_dim],
            layer_type="delta",
        )
        mixed_qkv = self.conv_act(mixed_qkv)
        q, k, v = ops.split_with_sizes(
            mixed_qkv, [key_dim, key_dim, value_dim], dim=-1, enable_sharding=True, layer_type="delta"
        )
        q = ops.view(
            q, [batch, seq_len, self.num_k_heads, self.head_k_dim], tp_scaled_dim=2, layer_type="delta"
        )
        k = ops.view(
            k, [batch, seq_len, self.num_k_heads, self.head_k_dim], tp_scaled_dim=2, layer_type="delta"
        )
        v = ops.view(
            v, [batch, seq_len, self.num_v_heads, self.head_v_dim], tp_scaled_dim=2, layer_type="delta"
        )
        # write strength write_scale * sigmoid(b): the per-channel op takes decay and strength as given
        decay = -self.A_log.float().exp() * torch.nn.functional.softplus(a.float() + self.dt_bias.float())
        core = ops.torch_channel_gated_delta_rule(
            q,
            k,
            v,
            decay[..., None].expand(-1, -1, -1, self.head_k_dim),
            self.write_scale * b.float().sigmoid(),
            shardable=True,
            layer_type="delta",
        )
        core = self.o_norm(core, z)
        core = ops.view(core, [batch, seq_len, value_dim], tp_scaled_dim=2, layer_type="delta")
        out = ops.torch_linear_simple(
            core, self.o_proj.weight, self.o_proj.bias, tp_mode="rowwise", layer_type="delta"
        )
        return ops.all_reduce(out, layer_type="delta")


class OlmoHybridMLP(nn.Module):
    def __init__(self, config: OlmoHybridConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        linear = torch.ops.auto_deploy.torch_linear_simple
        gate = linear(x, self.gate_proj.weight, self.gate_proj.bias, tp_mode="colwise", layer_type="mlp")
        up = linear(x, self.up_proj.weight, self.up_proj.bias, tp_mode="colwise", layer_type="mlp")
        down = linear(
            self.act_fn(gate) * up,
            self.down_proj.weight,
            self.down_proj.bias,
            tp_mode="rowwise",
            layer_type="mlp",
        )
        return torch.ops.auto_deploy.all_reduce(down, layer_type="mlp")


class OlmoHybridAttention(nn.Module):
    def __init__(self, config: OlmoHybridConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.use_rope = bool(config.layer_types[layer_idx] == "full_attention")
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        self.q_norm = OlmoHybridRMSNorm(self.num_heads * self.head_dim, config.rms_norm_eps)
        self.k_norm = OlmoHybridRMSNorm(self.num_kv_heads * self.head_dim, config.rms_norm_eps)

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
        q = self.q_norm(q)
        k = self.k_norm(k)
        q = ops.view(q, [batch, seq_len, self.num_heads, self.head_dim], tp_scaled_dim=2, layer_type="mha")
        k = ops.view(k, [batch, seq_len, self.num_kv_heads, self.head_dim], tp_scaled_dim=2, layer_type="mha")
        v = ops.view(v, [batch, seq_len, self.num_kv_heads, self.head_dim], tp_scaled_dim=2, layer_type="mha")

        if self.use_rope:
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


class OlmoHybridLinearAttentionDecoderLayer(nn.Module):
    def __init__(self, config: OlmoHybridConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = OlmoHybridRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.linear_attn = OlmoHybridGatedDeltaNet(config, layer_idx)
        self.post_attention_layernorm = OlmoHybridRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = OlmoHybridMLP(config)

    def forward(
        self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        hidden_states = hidden_states + self.linear_attn(self.input_layernorm(hidden_states))
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states


class OlmoHybridAttentionDecoderLayer(nn.Module):
    def __init__(self, config: OlmoHybridConfig, layer_idx: int) -> None:
        super().__init__()
        self.post_attention_layernorm = OlmoHybridRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = OlmoHybridAttention(config, layer_idx)
        self.post_feedforward_layernorm = OlmoHybridRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = OlmoHybridMLP(config)

    def forward(
        self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        hidden_states = hidden_states + self.post_attention_layernorm(
            self.self_attn(hidden_states, position_embeddings)
        )
        hidden_states = hidden_states + self.post_feedforward_layernorm(self.mlp(hidden_states))
        return hidden_states


class OlmoHybridPreTrainedModel(PreTrainedModel):
    config_class = OlmoHybridConfig
    base_model_prefix = "model"
    _no_split_modules = ["OlmoHybridLinearAttentionDecoderLayer"]


class OlmoHybridModel(OlmoHybridPreTrainedModel):
    def __init__(self, config: OlmoHybridConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(
            (
                OlmoHybridLinearAttentionDecoderLayer
                if config.layer_types[i] in ("linear_attention",)
                else OlmoHybridAttentionDecoderLayer
            )(config, i)
            for i in range(config.num_hidden_layers)
        )
        self.norm = OlmoHybridRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = OlmoHybridRotaryEmbedding(config)
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
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(hidden_states, position_embeddings)
        return self.norm(hidden_states)


class OlmoHybridForCausalLM(OlmoHybridPreTrainedModel):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: OlmoHybridConfig) -> None:
        super().__init__(config)
        self.model = OlmoHybridModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None,
        position_ids: torch.LongTensor,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> OlmoHybridCausalLMOutput:
        assert position_ids is not None, "position_ids is required"
        hidden_states = self.model(input_ids, position_ids, inputs_embeds)
        logits = torch.ops.auto_deploy.torch_linear_simple(hidden_states, self.lm_head.weight, None)
        return OlmoHybridCausalLMOutput(logits=logits.float())


AutoModelForCausalLMFactory.register_custom_model_cls("OlmoHybridConfig", OlmoHybridForCausalLM)
