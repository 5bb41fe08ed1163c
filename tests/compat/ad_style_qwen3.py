"""Qwen3 (dense) written the way TensorRT-LLM AutoDeploy model files are (prefill only), for compat tests.

Uses AutoDeploy's *relative* imports (``from ... import custom_ops``, ``from ..hf import ...``), so it
only loads as ``tensorrt_llm._torch.auto_deploy.models.custom.ad_style_qwen3`` through
``autodeploy_shim``. Per-head Q/K RMSNorm before RoPE; op calls use AutoDeploy's argument forms.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_utils import PreTrainedModel
from transformers.models.qwen3.configuration_qwen3 import Qwen3Config
from transformers.utils import ModelOutput

from ... import custom_ops  # noqa: F401  (registers torch.ops.auto_deploy.*)
from ..hf import AutoModelForCausalLMFactory


@dataclass
class Qwen3CausalLMOutput(ModelOutput):
    logits: torch.FloatTensor | None = None


class Qwen3RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.ops.auto_deploy.torch_rmsnorm(hidden_states, self.weight, self.variance_epsilon)


class Qwen3RotaryEmbedding(nn.Module):
    """Keeps only ``inv_freq``; the full cos/sin table is computed in the graph, then gathered."""

    def __init__(self, dim: int, max_position_embeddings: int, base: float) -> None:
        super().__init__()
        self.max_position_embeddings = max_position_embeddings
        self.register_buffer(
            "inv_freq", 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim)), persistent=False
        )

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(self.max_position_embeddings, dtype=torch.float32, device=x.device)
        angles = torch.outer(positions, self.inv_freq.float().to(x.device))
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(x.dtype)[position_ids], angles.sin().to(x.dtype)[position_ids]


class Qwen3MLP(nn.Module):
    def __init__(self, config: Qwen3Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.ops.auto_deploy.torch_linear_simple(
            x, self.gate_proj.weight, self.gate_proj.bias, tp_mode="colwise", layer_type="mlp"
        )
        up = torch.ops.auto_deploy.torch_linear_simple(
            x, self.up_proj.weight, self.up_proj.bias, tp_mode="colwise", layer_type="mlp"
        )
        down = torch.ops.auto_deploy.torch_linear_simple(
            self.act_fn(gate) * up,
            self.down_proj.weight,
            self.down_proj.bias,
            tp_mode="rowwise",
            layer_type="mlp",
        )
        return torch.ops.auto_deploy.all_reduce(down, layer_type="mlp")


class Qwen3Attention(nn.Module):
    def __init__(self, config: Qwen3Config, layer_idx: int) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
        self.scaling = self.head_dim**-0.5
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        self.q_norm = Qwen3RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = Qwen3RMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def forward(
        self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        ad = torch.ops.auto_deploy
        bsz, q_len, _ = hidden_states.size()
        qkv = []
        for proj, heads in (
            (self.q_proj, self.num_heads),
            (self.k_proj, self.num_kv_heads),
            (self.v_proj, self.num_kv_heads),
        ):
            out = ad.torch_linear_simple(
                hidden_states,
                proj.weight,
                proj.bias,
                tp_mode="colwise",
                tp_min_local_shape=self.head_dim,
                layer_type="mha",
            )
            qkv.append(ad.view(out, [bsz, q_len, heads, self.head_dim], tp_scaled_dim=2, layer_type="mha"))
        q, k, v = qkv
        q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = position_embeddings
        q, k = ad.torch_rope_with_explicit_cos_sin(q, k, cos, sin, 2)  # unsqueeze_dim=2 for bsnd
        # attn_mask, dropout_p, is_causal, scale, sinks, sliding_window, logit_cap, layout
        attn = ad.torch_attention(q, k, v, None, 0.0, True, self.scaling, None, None, None, "bsnd")
        attn = ad.view(attn, [bsz, q_len, self.num_heads * self.head_dim], tp_scaled_dim=2, layer_type="mha")
        out = ad.torch_linear_simple(
            attn, self.o_proj.weight, self.o_proj.bias, tp_mode="rowwise", layer_type="mha"
        )
        return ad.all_reduce(out, layer_type="mha")


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, config: Qwen3Config, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Qwen3Attention(config, layer_idx)
        self.mlp = Qwen3MLP(config)
        self.input_layernorm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings
        )
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class Qwen3PreTrainedModel(PreTrainedModel):
    config_class = Qwen3Config
    base_model_prefix = "model"
    _no_split_modules = ["Qwen3DecoderLayer"]


class Qwen3Model(Qwen3PreTrainedModel):
    def __init__(self, config: Qwen3Config) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(Qwen3DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        head_dim = getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
        rope_theta = getattr(config, "rope_theta", None)  # transformers 4.x; 5.x keeps it in rope_scaling
        if rope_theta is None:
            rope_theta = (config.rope_scaling or {}).get("rope_theta", 10000.0)
        self.rotary_emb = Qwen3RotaryEmbedding(head_dim, config.max_position_embeddings, rope_theta)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None,
        position_ids: torch.LongTensor,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        assert position_ids is not None, "position_ids must be provided for AD export"
        hidden_states = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        hidden_states = hidden_states.to(self.norm.weight.dtype)
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        for layer in self.layers:
            hidden_states = layer(hidden_states, position_embeddings)
        return self.norm(hidden_states)


class Qwen3ForCausalLM(Qwen3PreTrainedModel):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: Qwen3Config, **kwargs) -> None:
        super().__init__(config)
        self.model = Qwen3Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> Qwen3CausalLMOutput:
        assert position_ids is not None, "position_ids must be provided for AD export"
        hidden_states = self.model(input_ids, position_ids, inputs_embeds)
        return Qwen3CausalLMOutput(logits=self.lm_head(hidden_states).float())


AutoModelForCausalLMFactory.register_custom_model_cls("Qwen3Config", Qwen3ForCausalLM)
