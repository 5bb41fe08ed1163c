"""Lean, export-friendly Lfm2 on canonical ``auto_deploy`` ops.

Mirrors ``transformers.models.lfm2.modeling_lfm2`` (Lfm2ForCausalLM): a hybrid stack of pre-norm
layers with RMSNorm, built from gated short-convolution mixers, dense MLPs, grouped-query attention
and rotary position embeddings. Layer kinds in the analyzed config: short_conv+mlp (1 of 2 layers),
attention+mlp (1 of 2 layers); a layer's kind is read from config.layer_types[layer_idx]. Module
names equal the checkpoint keys, so HuggingFace state dicts load with ``strict=True``.

Left out on purpose: the KV cache and the mixers' conv and scan states (they run from a zero state
on ``torch_causal_conv1d``; the runtime swaps in cached versions), attention masks and padding masks
(sequences are causal and unpadded), dropout, gradient checkpointing, fused-kernel paths,
position-id generation (callers pass them), hidden-state outputs and the loss.
Linear, split, view, conv, scan and gated-norm calls carry tensor-parallel sharding hints; they do
not change the numbers.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import Lfm2Config
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import ModelOutput

import onboardlm.ops  # noqa: F401  (registers torch.ops.auto_deploy.*)
from onboardlm.models.factory import AutoModelForCausalLMFactory


def _rope_inverse_frequencies(config: Lfm2Config) -> tuple[torch.Tensor, float]:
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
class Lfm2CausalLMOutput(ModelOutput):
    logits: torch.FloatTensor | None = None


class Lfm2RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.ops.auto_deploy.torch_rmsnorm(hidden_states, self.weight, self.variance_epsilon)


class Lfm2RotaryEmbedding(nn.Module):
    """cos/sin of ``position_ids * inv_freq``, computed in fp32 once per forward for all layers."""

    def __init__(self, config: Lfm2Config) -> None:
        super().__init__()
        inv_freq, self.attention_scaling = _rope_inverse_frequencies(config)
        self.register_buffer("_ad_inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self._ad_inv_freq.float()
        angles = torch.cat((freqs, freqs), dim=-1)
        cos = angles.cos() * self.attention_scaling
        sin = angles.sin() * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)


class Lfm2ShortConv(nn.Module):
    """Gated short convolution: ``out(post_gate * conv(pre_gate * value))``, a depthwise causal conv."""

    def __init__(self, config: Lfm2Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.width = config.hidden_size
        self.conv_kernel_size = config.conv_L_cache
        hidden_size = config.hidden_size
        self.in_proj = nn.Linear(hidden_size, 3 * self.width, bias=config.conv_bias)
        self.conv = nn.Conv1d(
            self.width,
            self.width,
            self.conv_kernel_size,
            groups=self.width,
            bias=config.conv_bias,
            padding=self.conv_kernel_size - 1,
        )
        self.out_proj = nn.Linear(self.width, hidden_size, bias=config.conv_bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        ops = torch.ops.auto_deploy
        width = self.width
        projected = ops.torch_linear_simple(
            hidden_states,
            self.in_proj.weight,
            self.in_proj.bias,
            tp_mode="colwise",
            output_sizes=[width, width, width],
            layer_type="ssm",
        )
        pre_gate, post_gate, value = ops.split_with_sizes(
            projected, [width, width, width], dim=-1, enable_sharding=True, layer_type="ssm"
        )
        convolved = ops.torch_causal_conv1d(
            pre_gate * value,
            self.conv.weight,
            self.conv.bias,
            1,
            self.conv_kernel_size - 1,
            1,
            width,
            shardable=True,
            layer_type="ssm",
        )
        out = ops.torch_linear_simple(
            post_gate * convolved,
            self.out_proj.weight,
            self.out_proj.bias,
            tp_mode="rowwise",
            layer_type="ssm",
        )
        return ops.all_reduce(out, layer_type="ssm")


def lfm2_mlp_width(config: Lfm2Config) -> int:
    """The width Lfm2MLP computes from the config (as transformers does)."""
    intermediate_size = config.intermediate_size
    if config.block_auto_adjust_ff_dim:
        intermediate_size = int(2 * intermediate_size / 3)
        if config.block_ffn_dim_multiplier is not None:
            intermediate_size = int(config.block_ffn_dim_multiplier * intermediate_size)
            intermediate_size = config.block_multiple_of * (
                (intermediate_size + config.block_multiple_of - 1) // config.block_multiple_of
            )
    return intermediate_size


class Lfm2MLP(nn.Module):
    def __init__(self, config: Lfm2Config) -> None:
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, lfm2_mlp_width(config), bias=False)
        self.w3 = nn.Linear(config.hidden_size, lfm2_mlp_width(config), bias=False)
        self.w2 = nn.Linear(lfm2_mlp_width(config), config.hidden_size, bias=False)
        self.act_fn = ACT2FN["silu"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        linear = torch.ops.auto_deploy.torch_linear_simple
        gate = linear(x, self.w1.weight, self.w1.bias, tp_mode="colwise", layer_type="mlp")
        up = linear(x, self.w3.weight, self.w3.bias, tp_mode="colwise", layer_type="mlp")
        down = linear(
            self.act_fn(gate) * up, self.w2.weight, self.w2.bias, tp_mode="rowwise", layer_type="mlp"
        )
        return torch.ops.auto_deploy.all_reduce(down, layer_type="mlp")


class Lfm2Attention(nn.Module):
    def __init__(self, config: Lfm2Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.out_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.q_layernorm = Lfm2RMSNorm(self.head_dim, config.norm_eps)
        self.k_layernorm = Lfm2RMSNorm(self.head_dim, config.norm_eps)

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
        q = self.q_layernorm(q)
        k = self.k_layernorm(k)

        cos, sin = position_embeddings
        q, k = ops.torch_rope_with_explicit_cos_sin(q, k, cos, sin, 2)
        attn = ops.torch_attention(q, k, v, is_causal=True, scale=self.scaling, layout="bsnd")

        attn = ops.view(
            attn, [batch, seq_len, self.num_heads * self.head_dim], tp_scaled_dim=2, layer_type="mha"
        )
        out = ops.torch_linear_simple(
            attn, self.out_proj.weight, self.out_proj.bias, tp_mode="rowwise", layer_type="mha"
        )
        return ops.all_reduce(out, layer_type="mha")


class Lfm2DecoderLayer(nn.Module):
    def __init__(self, config: Lfm2Config, layer_idx: int) -> None:
        super().__init__()
        self.block_type = config.layer_types[layer_idx]
        self.operator_norm = Lfm2RMSNorm(config.hidden_size, config.norm_eps)
        self.ffn_norm = Lfm2RMSNorm(config.hidden_size, config.norm_eps)
        self.feed_forward = Lfm2MLP(config)
        if self.block_type == "conv":  # short_conv+mlp layers
            self.conv = Lfm2ShortConv(config, layer_idx)
        elif self.block_type == "full_attention":  # attention+mlp layers
            self.self_attn = Lfm2Attention(config, layer_idx)
        else:
            raise ValueError(
                f"layer {layer_idx}: block type {self.block_type!r} is none of 'conv', 'full_attention'"
            )

    def forward(
        self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        if self.block_type == "conv":
            hidden_states = hidden_states + self.conv(self.operator_norm(hidden_states))
            hidden_states = hidden_states + self.feed_forward(self.ffn_norm(hidden_states))
            return hidden_states
        elif self.block_type == "full_attention":
            hidden_states = hidden_states + self.self_attn(
                self.operator_norm(hidden_states), position_embeddings
            )
            hidden_states = hidden_states + self.feed_forward(self.ffn_norm(hidden_states))
            return hidden_states
        raise AssertionError("unreachable: the constructor checked the block type")


class Lfm2PreTrainedModel(PreTrainedModel):
    config_class = Lfm2Config
    base_model_prefix = "model"
    _no_split_modules = ["Lfm2DecoderLayer"]


class Lfm2Model(Lfm2PreTrainedModel):
    def __init__(self, config: Lfm2Config) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(Lfm2DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.embedding_norm = Lfm2RMSNorm(config.hidden_size, config.norm_eps)
        self.rotary_emb = Lfm2RotaryEmbedding(config)
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
        return self.embedding_norm(hidden_states)


class Lfm2ForCausalLM(Lfm2PreTrainedModel):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: Lfm2Config) -> None:
        super().__init__(config)
        self.model = Lfm2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None,
        position_ids: torch.LongTensor,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> Lfm2CausalLMOutput:
        assert position_ids is not None, "position_ids is required"
        hidden_states = self.model(input_ids, position_ids, inputs_embeds)
        logits = torch.ops.auto_deploy.torch_linear_simple(hidden_states, self.lm_head.weight, None)
        return Lfm2CausalLMOutput(logits=logits.float())


AutoModelForCausalLMFactory.register_custom_model_cls("Lfm2Config", Lfm2ForCausalLM)
