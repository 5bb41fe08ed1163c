"""Gemma 2 written the way TensorRT-LLM AutoDeploy model files are (prefill only), for compat tests.

``(1 + weight)`` RMSNorm passed to ``torch_rmsnorm`` in the forward, four norms per layer, scaled
embeddings, ``query_pre_attn_scalar`` scaling, and ``sliding_window`` / ``logit_cap`` passed as
positional arguments of ``torch_attention`` (as AD's Gemma2 does); final logit softcap in PyTorch.
"""

from dataclasses import dataclass

import torch
from tensorrt_llm._torch.auto_deploy.models.hf import AutoModelForCausalLMFactory
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_utils import PreTrainedModel
from transformers.models.gemma2.configuration_gemma2 import Gemma2Config
from transformers.utils import ModelOutput


@dataclass
class Gemma2CausalLMOutput(ModelOutput):
    logits: torch.FloatTensor | None = None


class Gemma2RMSNorm(nn.Module):
    """Zero-initialised weight used as ``1 + weight``."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.auto_deploy.torch_rmsnorm(x, 1.0 + self.weight, self.eps)


class Gemma2RotaryEmbedding(nn.Module):
    def __init__(self, dim: int, max_position_embeddings: int, base: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
        angles = torch.outer(torch.arange(max_position_embeddings, dtype=torch.float32), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        self.register_buffer("_ad_cos_cached", angles.cos(), persistent=False)
        self.register_buffer("_ad_sin_cached", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos = self._ad_cos_cached.to(dtype=x.dtype, device=x.device)
        sin = self._ad_sin_cached.to(dtype=x.dtype, device=x.device)
        return cos[position_ids], sin[position_ids]


class Gemma2MLP(nn.Module):
    def __init__(self, config: Gemma2Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ad = torch.ops.auto_deploy
        gate = ad.torch_linear_simple(
            x, self.gate_proj.weight, self.gate_proj.bias, tp_mode="colwise", layer_type="mlp"
        )
        up = ad.torch_linear_simple(
            x, self.up_proj.weight, self.up_proj.bias, tp_mode="colwise", layer_type="mlp"
        )
        down = ad.torch_linear_simple(
            self.act_fn(gate) * up,
            self.down_proj.weight,
            self.down_proj.bias,
            tp_mode="rowwise",
            layer_type="mlp",
        )
        return ad.all_reduce(down, layer_type="mlp")


class Gemma2Attention(nn.Module):
    def __init__(self, config: Gemma2Config, layer_idx: int) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scaling = config.query_pre_attn_scalar**-0.5
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        self.attn_logit_softcapping = config.attn_logit_softcapping
        is_sliding = config.layer_types[layer_idx] == "sliding_attention"
        self.sliding_window = config.sliding_window if is_sliding else None

    def forward(
        self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        ad = torch.ops.auto_deploy
        bsz, q_len, _ = hidden_states.size()
        heads = {"q": self.num_heads, "k": self.num_kv_heads, "v": self.num_kv_heads}
        states = {}
        for name, n in heads.items():
            proj = getattr(self, f"{name}_proj")
            x = ad.torch_linear_simple(
                hidden_states,
                proj.weight,
                proj.bias,
                tp_mode="colwise",
                tp_min_local_shape=self.head_dim,
                layer_type="mha",
            )
            states[name] = ad.view(x, [bsz, q_len, n, self.head_dim], tp_scaled_dim=2, layer_type="mha")
        cos, sin = position_embeddings
        q, k = ad.torch_rope_with_explicit_cos_sin(states["q"], states["k"], cos, sin, 2)
        attn = ad.torch_attention(
            q,
            k,
            states["v"],
            None,  # attn_mask
            0.0,  # dropout_p
            True,  # is_causal
            self.scaling,
            None,  # sinks
            self.sliding_window,
            self.attn_logit_softcapping,
            "bsnd",
        )
        attn = ad.view(attn, [bsz, q_len, self.num_heads * self.head_dim], tp_scaled_dim=2, layer_type="mha")
        out = ad.torch_linear_simple(
            attn, self.o_proj.weight, self.o_proj.bias, tp_mode="rowwise", layer_type="mha"
        )
        return ad.all_reduce(out, layer_type="mha")


class Gemma2DecoderLayer(nn.Module):
    def __init__(self, config: Gemma2Config, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Gemma2Attention(config, layer_idx)
        self.mlp = Gemma2MLP(config)
        eps = config.rms_norm_eps
        self.input_layernorm = Gemma2RMSNorm(config.hidden_size, eps=eps)
        self.post_attention_layernorm = Gemma2RMSNorm(config.hidden_size, eps=eps)
        self.pre_feedforward_layernorm = Gemma2RMSNorm(config.hidden_size, eps=eps)
        self.post_feedforward_layernorm = Gemma2RMSNorm(config.hidden_size, eps=eps)

    def forward(
        self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        attn = self.self_attn(self.input_layernorm(hidden_states), position_embeddings)
        hidden_states = hidden_states + self.post_attention_layernorm(attn)
        mlp = self.mlp(self.pre_feedforward_layernorm(hidden_states))
        return hidden_states + self.post_feedforward_layernorm(mlp)


class Gemma2PreTrainedModel(PreTrainedModel):
    config_class = Gemma2Config
    base_model_prefix = "model"
    _no_split_modules = ["Gemma2DecoderLayer"]


class Gemma2Model(Gemma2PreTrainedModel):
    def __init__(self, config: Gemma2Config) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(Gemma2DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = Gemma2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        theta = config.rope_parameters.get("rope_theta", 10000.0)
        self.rotary_emb = Gemma2RotaryEmbedding(config.head_dim, config.max_position_embeddings, theta)
        self.normalizer_value = config.hidden_size**0.5
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None,
        position_ids: torch.LongTensor,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        assert position_ids is not None, "position_ids must be provided for AD export"
        inputs_embeds = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        hidden_states = inputs_embeds * torch.tensor(self.normalizer_value, dtype=inputs_embeds.dtype)
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        for layer in self.layers:
            hidden_states = layer(hidden_states, position_embeddings)
        return self.norm(hidden_states)


class Gemma2ForCausalLM(Gemma2PreTrainedModel):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: Gemma2Config, **kwargs) -> None:
        super().__init__(config)
        self.model = Gemma2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        assert config.final_logit_softcapping is not None, "Gemma 2 requires final_logit_softcapping"
        self.final_logit_softcapping = config.final_logit_softcapping
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> Gemma2CausalLMOutput:
        assert position_ids is not None, "position_ids must be provided for AD export"
        logits = self.lm_head(self.model(input_ids, position_ids, inputs_embeds)).float()
        cap = self.final_logit_softcapping
        return Gemma2CausalLMOutput(logits=torch.tanh(logits / cap) * cap)


AutoModelForCausalLMFactory.register_custom_model_cls("Gemma2Config", Gemma2ForCausalLM)
