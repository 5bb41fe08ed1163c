"""Lean, export-friendly Lfm3 on canonical ``auto_deploy`` ops.

Mirrors ``transformers.models.lfm3.modeling_lfm3`` (Lfm3ForCausalLM): a hybrid stack of pre-norm
layers with RMSNorm, built from gated short-convolution mixers, dense MLPs, grouped-query attention
and rotary position embeddings. Layer kinds in the analyzed config: short_conv+mlp (1 of 3 layers),
attention+mlp (2 of 3 layers); a layer's kind is read from config.layer_types[layer_idx]; residual
steps with norms after the blocks too (sandwich); not for configs with
config.use_attention_gate=False (measured: other modules). Module names equal the checkpoint keys,
so HuggingFace state dicts load with ``strict=True``.

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
from transformers import Lfm3Config
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import ModelOutput

import onboardlm.ops  # noqa: F401  (registers torch.ops.auto_deploy.*)
from onboardlm.models.factory import AutoModelForCausalLMFactory


def _rope_inverse_frequencies(config: Lfm3Config, layer_type: str) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and cos/sin scaling for the layer type's rope_type (static types only)."""
    parameters = config.rope_parameters[layer_type]
    rope_type = parameters.get("rope_type", "default")
    if rope_type in ("dynamic", "longrope"):
        raise NotImplementedError(f"rope_type {rope_type!r} depends on the sequence length at run time")
    if rope_type != "default":
        return ROPE_INIT_FUNCTIONS[rope_type](config, layer_type=layer_type)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    base = parameters["rope_theta"]
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    return inv_freq, 1.0


@dataclass
class Lfm3CausalLMOutput(ModelOutput):
    logits: torch.FloatTensor | None = None


class Lfm3RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.ops.auto_deploy.torch_rmsnorm(hidden_states, self.weight, self.variance_epsilon)


class Lfm3RotaryEmbedding(nn.Module):
    """cos/sin per layer type (each with its own RoPE parameters), in fp32, once per forward."""

    def __init__(self, config: Lfm3Config) -> None:
        super().__init__()
        # a layer type whose rope_parameters entry is None or absent (LFM3's conv) has no RoPE: no table
        self.layer_types = sorted(
            {kind for kind in config.layer_types if config.rope_parameters.get(kind) is not None}
        )
        tables = [_rope_inverse_frequencies(config, layer_type) for layer_type in self.layer_types]
        self.attention_scaling = [scaling for _, scaling in tables]
        self.widths = [len(inv_freq) for inv_freq, _ in tables]  # rotary widths may differ per layer type
        inv_freqs = torch.zeros(len(tables), max(self.widths))
        for index, (inv_freq, _) in enumerate(tables):
            inv_freqs[index, : len(inv_freq)] = inv_freq
        self.register_buffer("_ad_inv_freq", inv_freqs, persistent=False)

    def forward(
        self, x: torch.Tensor, position_ids: torch.Tensor, layer_type: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        index = self.layer_types.index(layer_type)
        inv_freq = self._ad_inv_freq[index, : self.widths[index]]
        freqs = position_ids[..., None].float() * inv_freq.float()
        scaling = self.attention_scaling[index]
        angles = torch.cat((freqs, freqs), dim=-1)
        cos = angles.cos() * scaling
        sin = angles.sin() * scaling
        return cos.to(x.dtype), sin.to(x.dtype)


class Lfm3ShortConv(nn.Module):
    """Gated short convolution: ``out(post_gate * conv(pre_gate * value))``, a depthwise causal conv."""

    def __init__(self, config: Lfm3Config, layer_idx: int) -> None:
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


class Lfm3MLP(nn.Module):
    def __init__(self, config: Lfm3Config) -> None:
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w3 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN["silu"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        linear = torch.ops.auto_deploy.torch_linear_simple
        gate = linear(x, self.w1.weight, self.w1.bias, tp_mode="colwise", layer_type="mlp")
        up = linear(x, self.w3.weight, self.w3.bias, tp_mode="colwise", layer_type="mlp")
        down = linear(
            self.act_fn(gate) * up, self.w2.weight, self.w2.bias, tp_mode="rowwise", layer_type="mlp"
        )
        return torch.ops.auto_deploy.all_reduce(down, layer_type="mlp")


class Lfm3Attention(nn.Module):
    def __init__(self, config: Lfm3Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.sliding_window = (
            config.sliding_window if config.layer_types[layer_idx] == "sliding_attention" else None
        )
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        self.g_proj = nn.Linear(config.hidden_size, self.num_heads, bias=False)
        self.q_norm = Lfm3RMSNorm(self.head_dim, config.norm_eps)
        self.k_norm = Lfm3RMSNorm(self.head_dim, config.norm_eps)

    def forward(
        self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        ops = torch.ops.auto_deploy
        batch, seq_len = hidden_states.shape[:2]
        q = ops.torch_linear_simple(
            hidden_states, self.q_proj.weight, self.q_proj.bias, tp_mode="colwise", layer_type="mha"
        )
        gate = ops.torch_linear_simple(
            hidden_states, self.g_proj.weight, self.g_proj.bias, tp_mode="colwise", layer_type="mha"
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
        q = self.q_norm(q)
        k = self.k_norm(k)

        cos, sin = position_embeddings
        q, k = ops.torch_rope_with_explicit_cos_sin(q, k, cos, sin, 2)
        attn = ops.torch_attention(
            q, k, v, is_causal=True, scale=self.scaling, sliding_window=self.sliding_window, layout="bsnd"
        )

        attn = attn * torch.sigmoid(gate)[..., None]  # one gate value per head and token
        attn = ops.view(
            attn, [batch, seq_len, self.num_heads * self.head_dim], tp_scaled_dim=2, layer_type="mha"
        )
        out = ops.torch_linear_simple(
            attn, self.o_proj.weight, self.o_proj.bias, tp_mode="rowwise", layer_type="mha"
        )
        return ops.all_reduce(out, layer_type="mha")


class Lfm3DecoderLayer(nn.Module):
    def __init__(self, config: Lfm3Config, layer_idx: int) -> None:
        super().__init__()
        if not config.use_attention_gate:
            raise NotImplementedError("config.use_attention_gate=False is not reproduced by this file")
        self.block_type = config.layer_types[layer_idx]
        self.operator_norm = Lfm3RMSNorm(config.hidden_size, config.norm_eps)
        self.post_operator_norm = (
            Lfm3RMSNorm(config.hidden_size, config.norm_eps) if config.use_sandwich_norm else nn.Identity()
        )
        self.ffn_norm = Lfm3RMSNorm(config.hidden_size, config.norm_eps)
        self.feed_forward = Lfm3MLP(config)
        self.post_ffn_norm = (
            Lfm3RMSNorm(config.hidden_size, config.norm_eps) if config.use_sandwich_norm else nn.Identity()
        )
        if self.block_type == "conv":  # short_conv+mlp layers
            self.conv = Lfm3ShortConv(config, layer_idx)
        elif self.block_type in ("full_attention", "sliding_attention"):  # attention+mlp layers
            self.self_attn = Lfm3Attention(config, layer_idx)
        else:
            raise ValueError(
                f"layer {layer_idx}: block type {self.block_type!r} is none of 'conv', 'full_attention', 'sliding_attention'"
            )

    def forward(
        self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        if self.block_type == "conv":
            hidden_states = hidden_states + self.post_operator_norm(
                self.conv(self.operator_norm(hidden_states))
            )
            hidden_states = hidden_states + self.post_ffn_norm(
                self.feed_forward(self.ffn_norm(hidden_states))
            )
            return hidden_states
        elif self.block_type in ("full_attention", "sliding_attention"):
            hidden_states = hidden_states + self.post_operator_norm(
                self.self_attn(self.operator_norm(hidden_states), position_embeddings)
            )
            hidden_states = hidden_states + self.post_ffn_norm(
                self.feed_forward(self.ffn_norm(hidden_states))
            )
            return hidden_states
        raise AssertionError("unreachable: the constructor checked the block type")


class Lfm3PreTrainedModel(PreTrainedModel):
    config_class = Lfm3Config
    base_model_prefix = "model"
    _no_split_modules = ["Lfm3DecoderLayer"]


class Lfm3Model(Lfm3PreTrainedModel):
    def __init__(self, config: Lfm3Config) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(Lfm3DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.embedding_norm = Lfm3RMSNorm(config.hidden_size, config.norm_eps)
        self.rotary_emb = Lfm3RotaryEmbedding(config)
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
        position_embeddings = {
            layer_type: self.rotary_emb(inputs_embeds, position_ids, layer_type)
            for layer_type in self.rotary_emb.layer_types
        }
        hidden_states = inputs_embeds
        for layer, layer_type in zip(self.layers, self.config.layer_types, strict=True):
            hidden_states = layer(hidden_states, position_embeddings.get(layer_type))
        return self.embedding_norm(hidden_states)


class Lfm3ForCausalLM(Lfm3PreTrainedModel):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: Lfm3Config) -> None:
        super().__init__(config)
        self.model = Lfm3Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None,
        position_ids: torch.LongTensor,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> Lfm3CausalLMOutput:
        assert position_ids is not None, "position_ids is required"
        hidden_states = self.model(input_ids, position_ids, inputs_embeds)
        logits = torch.ops.auto_deploy.torch_linear_simple(hidden_states, self.lm_head.weight, None)
        return Lfm3CausalLMOutput(logits=logits.float())


AutoModelForCausalLMFactory.register_custom_model_cls("Lfm3Config", Lfm3ForCausalLM)
