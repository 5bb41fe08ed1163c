"""Lean, export-friendly MiniCPM3 on canonical ``auto_deploy`` ops.

Mirrors ``transformers.models.minicpm3.modeling_minicpm3`` (MiniCPM3ForCausalLM): pre-norm decoder
layers with RMSNorm, rotary position embeddings (default, linear, llama3, yarn, proportional),
multi-head latent attention and a gated MLP. Also: embeddings scaled by config.scale_emb; logits
divide by config.logits_scaling. Module names equal the checkpoint keys, so HuggingFace state dicts
load with ``strict=True``.

Left out on purpose: KV cache, attention masks (attention is causal), dropout, gradient
checkpointing, attention-implementation switches, ``repeat_kv`` (the attention op handles GQA),
position-id generation (callers pass them), hidden-state/attention outputs and the loss.
Linear and reshape calls carry tensor-parallel sharding hints; they do not change the numbers.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import MiniCPM3Config
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import ModelOutput

import onboardlm.ops  # noqa: F401  (registers torch.ops.auto_deploy.*)
from onboardlm.models.factory import AutoModelForCausalLMFactory


def _rope_inverse_frequencies(config: MiniCPM3Config) -> tuple[torch.Tensor, float]:
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
class MiniCPM3CausalLMOutput(ModelOutput):
    logits: torch.FloatTensor | None = None


class MiniCPM3RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.ops.auto_deploy.torch_rmsnorm(hidden_states, self.weight, self.variance_epsilon)


class MiniCPM3ScaledWordEmbedding(nn.Embedding):
    """Token embedding multiplied by a constant scale."""

    def __init__(
        self, num_embeddings: int, embedding_dim: int, padding_idx: int | None, embed_scale: float
    ) -> None:
        super().__init__(num_embeddings, embedding_dim, padding_idx)
        self.embed_scale = embed_scale

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids) * self.embed_scale


class MiniCPM3RotaryEmbedding(nn.Module):
    """cos/sin of ``position_ids * inv_freq``, computed in fp32 once per forward for all layers."""

    def __init__(self, config: MiniCPM3Config) -> None:
        super().__init__()
        inv_freq, self.attention_scaling = _rope_inverse_frequencies(config)
        self.register_buffer("_ad_inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self._ad_inv_freq.float()
        angles = torch.cat((freqs, freqs), dim=-1)
        cos = angles.cos() * self.attention_scaling
        sin = angles.sin() * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)


class MiniCPM3MLP(nn.Module):
    def __init__(self, config: MiniCPM3Config) -> None:
        super().__init__()
        bias = config.mlp_bias
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)
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


def _yarn_mscale(scale: float, mscale: float) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


class MiniCPM3Attention(nn.Module):
    """Multi-head latent attention: queries through a low-rank q_a/q_b pair (or one q_proj); keys and
    values expanded from the normed KV latent by ``kv_b_proj`` inside ``torch_mla``; one RoPE key part
    ``k_pe`` shared by all heads.
    """

    def __init__(self, config: MiniCPM3Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        self.qk_head_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(config.hidden_size, self.q_lora_rank, bias=config.attention_bias)
            self.q_a_layernorm = MiniCPM3RMSNorm(self.q_lora_rank, 1e-06)
            self.q_b_proj = nn.Linear(self.q_lora_rank, self.num_heads * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(
            config.hidden_size, self.kv_lora_rank + self.qk_rope_head_dim, bias=config.attention_bias
        )
        self.kv_a_layernorm = MiniCPM3RMSNorm(self.kv_lora_rank, 1e-06)
        self.kv_b_proj = nn.Linear(
            self.kv_lora_rank, self.num_heads * (self.qk_nope_head_dim + self.v_head_dim), bias=False
        )
        self.o_proj = nn.Linear(
            self.num_heads * self.v_head_dim, config.hidden_size, bias=config.attention_bias
        )
        self.scaling = self.qk_head_dim**-0.5
        rope_parameters = config.rope_parameters
        rope_type = rope_parameters.get("rope_type", "default")
        if rope_type != "default" and rope_parameters.get("mscale_all_dim"):
            mscale = _yarn_mscale(rope_parameters["factor"], rope_parameters["mscale_all_dim"])
            self.scaling = self.scaling * mscale * mscale

    def forward(
        self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        ops = torch.ops.auto_deploy
        batch, seq_len = hidden_states.shape[:2]
        if self.q_lora_rank is None:
            q = ops.torch_linear_simple(
                hidden_states, self.q_proj.weight, None, tp_mode="colwise", layer_type="mla"
            )
        else:
            q_latent = ops.torch_linear_simple(
                hidden_states, self.q_a_proj.weight, self.q_a_proj.bias, tp_mode="none", layer_type="mla"
            )
            q = ops.torch_linear_simple(
                self.q_a_layernorm(q_latent), self.q_b_proj.weight, None, tp_mode="colwise", layer_type="mla"
            )
        q = ops.view(q, [batch, seq_len, self.num_heads, self.qk_head_dim], tp_scaled_dim=2, layer_type="mla")
        q_nope, q_pe = torch.split(q, [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)

        latent = ops.torch_linear_simple(
            hidden_states,
            self.kv_a_proj_with_mqa.weight,
            self.kv_a_proj_with_mqa.bias,
            tp_mode="none",
            layer_type="mla",
        )
        compressed_kv, k_pe = torch.split(latent, [self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        compressed_kv = self.kv_a_layernorm(compressed_kv)
        k_pe = ops.view(k_pe, [batch, seq_len, 1, self.qk_rope_head_dim], layer_type="mla")

        cos, sin = position_embeddings
        q_pe, k_pe = ops.torch_rope_with_explicit_cos_sin(q_pe, k_pe, cos, sin, 2)
        attn = ops.torch_mla(
            q_nope,
            q_pe,
            compressed_kv,
            k_pe,
            self.kv_b_proj.weight,
            is_causal=True,
            scale=self.scaling,
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


class MiniCPM3DecoderLayer(nn.Module):
    def __init__(self, config: MiniCPM3Config, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = MiniCPM3Attention(config, layer_idx)
        self.mlp = MiniCPM3MLP(config)
        self.input_layernorm = MiniCPM3RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = MiniCPM3RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.residual_multiplier = config.scale_depth / math.sqrt(config.num_hidden_layers)

    def forward(
        self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        hidden_states = (
            hidden_states
            + self.self_attn(self.input_layernorm(hidden_states), position_embeddings)
            * self.residual_multiplier
        )
        return (
            hidden_states + self.mlp(self.post_attention_layernorm(hidden_states)) * self.residual_multiplier
        )


class MiniCPM3PreTrainedModel(PreTrainedModel):
    config_class = MiniCPM3Config
    base_model_prefix = "model"
    _no_split_modules = ["MiniCPM3DecoderLayer"]


class MiniCPM3Model(MiniCPM3PreTrainedModel):
    def __init__(self, config: MiniCPM3Config) -> None:
        super().__init__(config)
        self.embed_tokens = MiniCPM3ScaledWordEmbedding(
            config.vocab_size, config.hidden_size, config.pad_token_id, config.scale_emb
        )
        self.layers = nn.ModuleList(MiniCPM3DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = MiniCPM3RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = MiniCPM3RotaryEmbedding(config)
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


class MiniCPM3ForCausalLM(MiniCPM3PreTrainedModel):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MiniCPM3Config) -> None:
        super().__init__(config)
        self.model = MiniCPM3Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.logits_scaling = config.logits_scaling
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None,
        position_ids: torch.LongTensor,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> MiniCPM3CausalLMOutput:
        assert position_ids is not None, "position_ids is required"
        hidden_states = self.model(input_ids, position_ids, inputs_embeds)
        logits = torch.ops.auto_deploy.torch_linear_simple(hidden_states, self.lm_head.weight, None)
        logits = logits / self.logits_scaling
        return MiniCPM3CausalLMOutput(logits=logits.float())


AutoModelForCausalLMFactory.register_custom_model_cls("MiniCPM3Config", MiniCPM3ForCausalLM)
