"""GPT-OSS written the way TensorRT-LLM AutoDeploy model files are (prefill only), for compat tests.

Imports ``get_hf_rope_theta`` from ``tensorrt_llm._utils`` as AD's GPT-OSS does. Attention sinks and
per-layer sliding window go to ``torch_attention`` as keywords; the router is ``torch_moe_router``
(positional ``top_k``) and the packed, biased experts run through ``torch_moe_dense_mlp`` with
positional ``alpha`` / ``limit``; ``lm_head`` is a ``torch_linear_simple`` with
``layer_type="lm_head"``, exactly as in AD's file. YaRN RoPE via transformers' init functions.
"""

from dataclasses import dataclass

import torch
from tensorrt_llm._utils import get_hf_rope_theta
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.modeling_utils import PreTrainedModel
from transformers.models.gpt_oss.configuration_gpt_oss import GptOssConfig
from transformers.utils import ModelOutput

from ..hf import AutoModelForCausalLMFactory

_GLU_ALPHA = 1.702
_GLU_LIMIT_FALLBACK = 7.0


@dataclass
class GptOssCausalLMOutput(ModelOutput):
    logits: torch.FloatTensor | None = None


class GptOssRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.auto_deploy.torch_rmsnorm(x, self.weight, self.eps)


class GptOssRotaryEmbedding(nn.Module):
    """cos/sin (NeoX halves) for every position, cached in ``_ad_`` buffers, gathered per forward."""

    def __init__(self, config: GptOssConfig, head_dim: int) -> None:
        super().__init__()
        rope_type = (config.rope_scaling or {}).get("rope_type", "default")
        if rope_type == "default":
            theta = get_hf_rope_theta(config, 10000.0)
            inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
            scaling = 1.0
        else:
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, device=None)
        angles = torch.outer(
            torch.arange(config.max_position_embeddings, dtype=torch.float32), inv_freq.float()
        )
        angles = torch.cat((angles, angles), dim=-1)
        self.register_buffer("_ad_cos_cached", angles.cos() * scaling, persistent=False)
        self.register_buffer("_ad_sin_cached", angles.sin() * scaling, persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos = self._ad_cos_cached[position_ids].to(dtype=x.dtype, device=x.device)
        sin = self._ad_sin_cached[position_ids].to(dtype=x.dtype, device=x.device)
        return cos, sin


class GptOssTopKRouter(nn.Module):
    def __init__(self, config: GptOssConfig) -> None:
        super().__init__()
        self.top_k = int(config.num_experts_per_tok)
        self.weight = nn.Parameter(torch.empty(config.num_local_experts, config.hidden_size))
        self.bias = nn.Parameter(torch.empty(config.num_local_experts))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.ops.auto_deploy.torch_moe_router(hidden_states, self.weight, self.bias, self.top_k)


class GptOssExperts(nn.Module):
    """Packed experts in checkpoint layout: gate/up interleaved on the last dim of ``gate_up_proj``."""

    def __init__(self, config: GptOssConfig) -> None:
        super().__init__()
        num_experts, hidden, inner = config.num_local_experts, config.hidden_size, config.intermediate_size
        self.alpha = _GLU_ALPHA
        self.limit = float(getattr(config, "swiglu_limit", _GLU_LIMIT_FALLBACK))
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, hidden, 2 * inner))
        self.gate_up_proj_bias = nn.Parameter(torch.empty(num_experts, 2 * inner))
        self.down_proj = nn.Parameter(torch.empty(num_experts, inner, hidden))
        self.down_proj_bias = nn.Parameter(torch.empty(num_experts, hidden))

    def forward(self, hidden_states: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
        return torch.ops.auto_deploy.torch_moe_dense_mlp(
            hidden_states,
            routing_weights,
            self.gate_up_proj,
            self.gate_up_proj_bias,
            self.down_proj,
            self.down_proj_bias,
            self.alpha,
            self.limit,
        )


class GptOssMLP(nn.Module):
    def __init__(self, config: GptOssConfig) -> None:
        super().__init__()
        self.router = GptOssTopKRouter(config)
        self.experts = GptOssExperts(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        bsz, seq_len, hidden_dim = hidden_states.shape
        out = self.experts(hidden_states, self.router(hidden_states))
        return out.view(bsz, seq_len, hidden_dim)


class GptOssAttention(nn.Module):
    def __init__(self, config: GptOssConfig, layer_idx: int) -> None:
        super().__init__()
        self.head_dim = int(getattr(config, "head_dim", config.hidden_size // config.num_attention_heads))
        self.num_heads = int(config.num_attention_heads)
        self.num_kv_heads = int(config.num_key_value_heads)
        self.scaling = self.head_dim**-0.5
        bias = bool(getattr(config, "attention_bias", True))
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        self.sinks = nn.Parameter(torch.empty(self.num_heads))
        layer_types = getattr(config, "layer_types", None)
        is_sliding = layer_types is not None and layer_types[layer_idx] == "sliding_attention"
        window = getattr(config, "sliding_window", None)
        self.sliding_window = int(window) if (is_sliding and window) else None

    def forward(
        self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        ad = torch.ops.auto_deploy
        bsz, q_len, _ = hidden_states.size()

        def project(proj: nn.Linear, heads: int) -> torch.Tensor:
            x = ad.torch_linear_simple(
                hidden_states,
                proj.weight,
                proj.bias,
                tp_mode="colwise",
                tp_min_local_shape=self.head_dim,
                layer_type="mha",
            )
            return ad.view(x, [bsz, q_len, heads, self.head_dim], tp_scaled_dim=2, layer_type="mha")

        q = project(self.q_proj, self.num_heads)
        k = project(self.k_proj, self.num_kv_heads)
        v = project(self.v_proj, self.num_kv_heads)
        cos, sin = position_embeddings
        q, k = ad.torch_rope_with_explicit_cos_sin(q, k, cos, sin, 2)
        attn = ad.torch_attention(
            q,
            k,
            v,
            attn_mask=None,
            dropout_p=0.0,
            is_causal=True,
            scale=self.scaling,
            sinks=self.sinks,
            sliding_window=self.sliding_window,
            layout="bsnd",
        )
        attn = ad.view(attn, [bsz, q_len, self.num_heads * self.head_dim], tp_scaled_dim=2, layer_type="mha")
        out = ad.torch_linear_simple(
            attn, self.o_proj.weight, self.o_proj.bias, tp_mode="rowwise", layer_type="mha"
        )
        return ad.all_reduce(out, layer_type="mha")


class GptOssDecoderLayer(nn.Module):
    def __init__(self, config: GptOssConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = GptOssAttention(config, layer_idx)
        self.mlp = GptOssMLP(config)
        self.input_layernorm = GptOssRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = GptOssRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings=position_embeddings
        )
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class GptOssPreTrainedModel(PreTrainedModel):
    config_class = GptOssConfig
    base_model_prefix = "model"
    _no_split_modules = ["GptOssDecoderLayer"]


class GptOssModel(GptOssPreTrainedModel):
    def __init__(self, config: GptOssConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(
            config.vocab_size, config.hidden_size, getattr(config, "pad_token_id", None)
        )
        self.layers = nn.ModuleList(GptOssDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = GptOssRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        head_dim = int(getattr(config, "head_dim", config.hidden_size // config.num_attention_heads))
        self.rotary_emb = GptOssRotaryEmbedding(config, head_dim)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None,
        position_ids: torch.LongTensor,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        assert position_ids is not None, "position_ids is required"
        hidden_states = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        for layer in self.layers:
            hidden_states = layer(hidden_states, position_embeddings=position_embeddings)
        return self.norm(hidden_states)


class GptOssForCausalLM(GptOssPreTrainedModel):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: GptOssConfig) -> None:
        super().__init__(config)
        self.model = GptOssModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> GptOssCausalLMOutput:
        assert position_ids is not None, "position_ids is required"
        hidden_states = self.model(input_ids, position_ids, inputs_embeds)
        logits = torch.ops.auto_deploy.torch_linear_simple(
            hidden_states, self.lm_head.weight, self.lm_head.bias, layer_type="lm_head"
        )
        return GptOssCausalLMOutput(logits=logits)


AutoModelForCausalLMFactory.register_custom_model_cls("GptOssConfig", GptOssForCausalLM)
