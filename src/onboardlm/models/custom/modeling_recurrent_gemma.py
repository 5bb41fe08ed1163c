"""Lean, export-friendly RecurrentGemma on canonical ``auto_deploy`` ops.

Mirrors ``transformers.models.recurrent_gemma.modeling_recurrent_gemma``
(RecurrentGemmaForCausalLM): a hybrid stack of pre-norm layers with RMSNorm, built from rg_lru,
dense MLPs, grouped-query attention and rotary position embeddings. Layer kinds in the analyzed
config: rg_lru+mlp (1 of 2 layers), attention+mlp (1 of 2 layers); a layer's kind is read from
config.layer_types[layer_idx]. Module names equal the checkpoint keys, so HuggingFace state dicts
load with ``strict=True``.

Left out on purpose: the KV cache and the mixers' conv and scan states (they run from a zero state
on ``torch_causal_conv1d`` / ``torch_rg_lru``; the runtime swaps in cached versions), attention
masks and padding masks (sequences are causal and unpadded), dropout, gradient checkpointing,
fused-kernel paths, position-id generation (callers pass them), hidden-state outputs and the loss.
Linear, split, view, conv, scan and gated-norm calls carry tensor-parallel sharding hints; they do
not change the numbers.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import RecurrentGemmaConfig
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import ModelOutput

import onboardlm.ops  # noqa: F401  (registers torch.ops.auto_deploy.*)
from onboardlm.models.factory import AutoModelForCausalLMFactory


def _rope_inverse_frequencies(config: RecurrentGemmaConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and cos/sin scaling for the config's rope_type (static types only)."""
    rope_type = config.rope_parameters.get("rope_type", "default")
    if rope_type in ("dynamic", "longrope"):
        raise NotImplementedError(f"rope_type {rope_type!r} depends on the sequence length at run time")
    if rope_type != "default":
        return ROPE_INIT_FUNCTIONS[rope_type](config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    base = config.rope_parameters["rope_theta"]
    dim = int(head_dim * config.rope_parameters.get("partial_rotary_factor", 1.0))
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    return inv_freq, 1.0


@dataclass
class RecurrentGemmaCausalLMOutput(ModelOutput):
    logits: torch.FloatTensor | None = None


class RecurrentGemmaRMSNorm(nn.Module):
    """RMSNorm that scales by ``(1 + weight)``; the offset is added in the forward, and the scaling done
    in fp32 before the cast back (as transformers' offset norms do)."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        normed = torch.ops.auto_deploy.torch_rmsnorm(
            hidden_states.float(), 1.0 + self.weight.float(), self.variance_epsilon
        )
        return normed.to(hidden_states.dtype)


class RecurrentGemmaRotaryEmbedding(nn.Module):
    """cos/sin of ``position_ids * inv_freq``, computed in fp32 once per forward for all layers."""

    def __init__(self, config: RecurrentGemmaConfig) -> None:
        super().__init__()
        inv_freq, self.attention_scaling = _rope_inverse_frequencies(config)
        self.register_buffer("_ad_inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self._ad_inv_freq.float()
        angles = torch.cat((freqs, freqs), dim=-1)
        cos = angles.cos() * self.attention_scaling
        sin = angles.sin() * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)


class RecurrentGemmaRglru(nn.Module):
    """Real-gated linear recurrent unit: block-diagonal input and recurrence gates (one ``[D, D]`` block
    per head) and a per-channel recurrence parameter, run by ``torch_rg_lru``."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        block = width // heads
        self.recurrent_param = nn.Parameter(torch.empty(width))
        self.input_gate_weight = nn.Parameter(torch.empty(heads, block, block))
        self.input_gate_bias = nn.Parameter(torch.empty(heads, block))
        self.recurrent_gate_weight = nn.Parameter(torch.empty(heads, block, block))
        self.recurrent_gate_bias = nn.Parameter(torch.empty(heads, block))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.auto_deploy.torch_rg_lru(
            x,
            self.input_gate_weight,
            self.input_gate_bias,
            self.recurrent_gate_weight,
            self.recurrent_gate_bias,
            self.recurrent_param,
            8.0,
            shardable=True,
            layer_type="ssm",
        )


class RecurrentGemmaRecurrentBlock(nn.Module):
    """Griffin's recurrent block: ``linear_out(act(linear_y(h)) * rg_lru(conv(linear_x(h))))``,
    a depthwise causal conv before the RG-LRU."""

    def __init__(self, config: RecurrentGemmaConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.width = config.lru_width
        self.conv_kernel_size = config.conv1d_width
        hidden_size = config.hidden_size
        self.linear_y = nn.Linear(hidden_size, self.width, bias=True)
        self.linear_x = nn.Linear(hidden_size, self.width, bias=True)
        self.linear_out = nn.Linear(self.width, hidden_size, bias=True)
        self.conv_1d = nn.Conv1d(
            self.width,
            self.width,
            self.conv_kernel_size,
            groups=self.width,
            bias=True,
            padding=self.conv_kernel_size - 1,
        )
        self.rg_lru = RecurrentGemmaRglru(self.width, config.num_attention_heads)
        self.act_fn = ACT2FN[config.hidden_activation]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        ops = torch.ops.auto_deploy
        gate = ops.torch_linear_simple(
            hidden_states,
            self.linear_y.weight,
            self.linear_y.bias,
            tp_mode="colwise",
            layer_type="ssm",
        )
        value = ops.torch_linear_simple(
            hidden_states,
            self.linear_x.weight,
            self.linear_x.bias,
            tp_mode="colwise",
            layer_type="ssm",
        )
        value = ops.torch_causal_conv1d(
            value,
            self.conv_1d.weight,
            self.conv_1d.bias,
            1,
            self.conv_kernel_size - 1,
            1,
            self.width,
            shardable=True,
            layer_type="ssm",
        )
        mixed = self.rg_lru(value) * self.act_fn(gate)
        out = ops.torch_linear_simple(
            mixed,
            self.linear_out.weight,
            self.linear_out.bias,
            tp_mode="rowwise",
            layer_type="ssm",
        )
        return ops.all_reduce(out, layer_type="ssm")


class RecurrentGemmaMlp(nn.Module):
    def __init__(self, config: RecurrentGemmaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size // 2, bias=True)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size // 2, bias=True)
        self.down_proj = nn.Linear(config.intermediate_size // 2, config.hidden_size, bias=True)
        self.act_fn = ACT2FN[config.hidden_activation]

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


class RecurrentGemmaAttention(nn.Module):
    def __init__(self, config: RecurrentGemmaConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.sliding_window = config.attention_window_size
        self.q_proj = nn.Linear(
            config.hidden_size, self.num_heads * self.head_dim, bias=config.attention_bias
        )
        self.k_proj = nn.Linear(
            config.hidden_size, self.num_kv_heads * self.head_dim, bias=config.attention_bias
        )
        self.v_proj = nn.Linear(
            config.hidden_size, self.num_kv_heads * self.head_dim, bias=config.attention_bias
        )
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=True)

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
        rotary_dim = cos.shape[-1]
        q_rot, k_rot = ops.torch_rope_with_explicit_cos_sin(
            q[..., :rotary_dim], k[..., :rotary_dim], cos, sin, 2
        )
        q = torch.cat((q_rot, q[..., rotary_dim:]), dim=-1)
        k = torch.cat((k_rot, k[..., rotary_dim:]), dim=-1)
        attn = ops.torch_attention(
            q, k, v, is_causal=True, scale=self.scaling, sliding_window=self.sliding_window, layout="bsnd"
        )

        attn = ops.view(
            attn, [batch, seq_len, self.num_heads * self.head_dim], tp_scaled_dim=2, layer_type="mha"
        )
        out = ops.torch_linear_simple(
            attn, self.o_proj.weight, self.o_proj.bias, tp_mode="rowwise", layer_type="mha"
        )
        return ops.all_reduce(out, layer_type="mha")


class RecurrentGemmaDecoderLayer(nn.Module):
    def __init__(self, config: RecurrentGemmaConfig, layer_idx: int) -> None:
        super().__init__()
        self.block_type = config.layer_types[layer_idx]
        self.temporal_pre_norm = RecurrentGemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.channel_pre_norm = RecurrentGemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp_block = RecurrentGemmaMlp(config)
        if self.block_type == "linear_attention":  # rg_lru+mlp layers
            self.temporal_block = RecurrentGemmaRecurrentBlock(config, layer_idx)
        elif self.block_type == "sliding_attention":  # attention+mlp layers
            self.temporal_block = RecurrentGemmaAttention(config, layer_idx)
        else:
            raise ValueError(
                f"layer {layer_idx}: block type {self.block_type!r} is none of 'linear_attention', 'sliding_attention'"
            )

    def forward(
        self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        if self.block_type == "linear_attention":
            hidden_states = hidden_states + self.temporal_block(self.temporal_pre_norm(hidden_states))
            hidden_states = hidden_states + self.mlp_block(self.channel_pre_norm(hidden_states))
            return hidden_states
        elif self.block_type == "sliding_attention":
            hidden_states = hidden_states + self.temporal_block(
                self.temporal_pre_norm(hidden_states), position_embeddings
            )
            hidden_states = hidden_states + self.mlp_block(self.channel_pre_norm(hidden_states))
            return hidden_states
        raise AssertionError("unreachable: the constructor checked the block type")


class RecurrentGemmaPreTrainedModel(PreTrainedModel):
    config_class = RecurrentGemmaConfig
    base_model_prefix = "model"
    _no_split_modules = ["RecurrentGemmaDecoderLayer"]


class RecurrentGemmaModel(RecurrentGemmaPreTrainedModel):
    def __init__(self, config: RecurrentGemmaConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(
            RecurrentGemmaDecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.final_norm = RecurrentGemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RecurrentGemmaRotaryEmbedding(config)
        self.embed_scale = float(torch.tensor(config.hidden_size**0.5, dtype=torch.bfloat16))
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
        return self.final_norm(hidden_states)


class RecurrentGemmaForCausalLM(RecurrentGemmaPreTrainedModel):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: RecurrentGemmaConfig) -> None:
        super().__init__(config)
        self.model = RecurrentGemmaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.logits_soft_cap = config.logits_soft_cap
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None,
        position_ids: torch.LongTensor,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> RecurrentGemmaCausalLMOutput:
        assert position_ids is not None, "position_ids is required"
        hidden_states = self.model(input_ids, position_ids, inputs_embeds)
        logits = torch.ops.auto_deploy.torch_linear_simple(hidden_states, self.lm_head.weight, None)
        logits = torch.tanh(logits / self.logits_soft_cap) * self.logits_soft_cap
        return RecurrentGemmaCausalLMOutput(logits=logits.float())


AutoModelForCausalLMFactory.register_custom_model_cls("RecurrentGemmaConfig", RecurrentGemmaForCausalLM)
