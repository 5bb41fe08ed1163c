"""Qwen3-MoE written the way TensorRT-LLM AutoDeploy model files are (prefill only), for compat tests.

Imports ``ActivationType`` from ``tensorrt_llm._torch.utils`` and the factory relatively, as AD files
do. Routed experts are a ``ModuleList`` of per-expert MLPs fed to ``torch_moe`` as weight lists; a
load-state-dict pre-hook unpacks transformers 5's fused 3-D expert tensors. Softmax top-k router in
plain PyTorch; dense MLP layers from ``mlp_only_layers`` / ``decoder_sparse_step``.
"""

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tensorrt_llm._torch.utils import ActivationType
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_utils import PreTrainedModel
from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
from transformers.utils import ModelOutput

from ..hf import AutoModelForCausalLMFactory


@dataclass
class Qwen3MoeCausalLMOutput(ModelOutput):
    logits: torch.FloatTensor | None = None


class Qwen3MoeRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.ops.auto_deploy.torch_rmsnorm(hidden_states, self.weight, self.variance_epsilon)


class Qwen3MoeRotaryEmbedding(nn.Module):
    def __init__(self, dim: int, max_position_embeddings: int, base: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
        angles = torch.outer(torch.arange(max_position_embeddings, dtype=torch.float32), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        self.register_buffer("_ad_cos_cached", angles.cos(), persistent=False)
        self.register_buffer("_ad_sin_cached", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._ad_cos_cached.to(x.dtype)[position_ids], self._ad_sin_cached.to(x.dtype)[position_ids]


class Qwen3MoeMLP(nn.Module):
    """Gated MLP: a dense layer's MLP, or one expert (then only its weights are used)."""

    def __init__(self, config: Qwen3MoeConfig, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
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


class Qwen3MoeSparseMoeBlock(nn.Module):
    def __init__(self, config: Qwen3MoeConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(
            Qwen3MoeMLP(config, config.moe_intermediate_size) for _ in range(config.num_experts)
        )
        self._register_load_state_dict_pre_hook(self._unpack_fused_experts)

    def _unpack_fused_experts(self, state_dict: dict[str, torch.Tensor], prefix: str, *args: Any) -> None:
        """``experts.gate_up_proj`` ``[E, 2I, H]`` and ``experts.down_proj`` ``[E, H, I]`` -> per-expert keys."""
        gate_up = state_dict.pop(f"{prefix}experts.gate_up_proj", None)
        if gate_up is not None:
            gate, up = gate_up.chunk(2, dim=1)
            for e in range(len(self.experts)):
                state_dict[f"{prefix}experts.{e}.gate_proj.weight"] = gate[e]
                state_dict[f"{prefix}experts.{e}.up_proj.weight"] = up[e]
        down = state_dict.pop(f"{prefix}experts.down_proj", None)
        if down is not None:
            for e in range(len(self.experts)):
                state_dict[f"{prefix}experts.{e}.down_proj.weight"] = down[e]

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch_size, seq_len, hidden_dim = hidden_states.shape
        flat = hidden_states.view(-1, hidden_dim)
        router_logits = self.gate(flat)
        routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
        routing_weights, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)
        if self.norm_topk_prob:
            routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
        routing_weights = routing_weights.to(flat.dtype)
        out = torch.ops.auto_deploy.torch_moe(
            flat,
            selected_experts,
            routing_weights,
            w1_weight=[expert.gate_proj.weight for expert in self.experts],
            w2_weight=[expert.down_proj.weight for expert in self.experts],
            w3_weight=[expert.up_proj.weight for expert in self.experts],
            is_gated_mlp=True,
            act_fn=ActivationType.Silu,
            layer_type="moe",
        )
        out = torch.ops.auto_deploy.all_reduce(out, layer_type="moe")
        return out.reshape(batch_size, seq_len, hidden_dim), router_logits


class Qwen3MoeAttention(nn.Module):
    def __init__(self, config: Qwen3MoeConfig, layer_idx: int) -> None:
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
        self.q_norm = Qwen3MoeRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = Qwen3MoeRMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def forward(
        self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        ad = torch.ops.auto_deploy
        bsz, q_len, _ = hidden_states.size()
        q = ad.torch_linear_simple(
            hidden_states, self.q_proj.weight, self.q_proj.bias, tp_mode="colwise", layer_type="mha"
        )
        q = ad.view(q, [bsz, q_len, self.num_heads, self.head_dim], tp_scaled_dim=2, layer_type="mha")
        kv = []
        for proj in (self.k_proj, self.v_proj):
            x = ad.torch_linear_simple(
                hidden_states,
                proj.weight,
                proj.bias,
                tp_mode="colwise",
                tp_min_local_shape=self.head_dim,
                layer_type="mha",
            )
            kv.append(
                ad.view(x, [bsz, q_len, self.num_kv_heads, self.head_dim], tp_scaled_dim=2, layer_type="mha")
            )
        k, v = kv
        q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = position_embeddings
        q, k = ad.torch_rope_with_explicit_cos_sin(q, k, cos, sin, 2)
        attn = ad.torch_attention(q, k, v, None, 0.0, True, self.scaling, None, None, None, "bsnd")
        attn = ad.view(attn, [bsz, q_len, self.num_heads * self.head_dim], tp_scaled_dim=2, layer_type="mha")
        out = ad.torch_linear_simple(
            attn, self.o_proj.weight, self.o_proj.bias, tp_mode="rowwise", layer_type="mha"
        )
        return ad.all_reduce(out, layer_type="mha")


class Qwen3MoeDecoderLayer(nn.Module):
    def __init__(self, config: Qwen3MoeConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Qwen3MoeAttention(config, layer_idx)
        is_moe = layer_idx not in config.mlp_only_layers and (
            config.num_experts > 0 and (layer_idx + 1) % config.decoder_sparse_step == 0
        )
        self.mlp = Qwen3MoeSparseMoeBlock(config) if is_moe else Qwen3MoeMLP(config, config.intermediate_size)
        self.input_layernorm = Qwen3MoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = Qwen3MoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings
        )
        mlp_out = self.mlp(self.post_attention_layernorm(hidden_states))
        if isinstance(mlp_out, tuple):  # MoE: (hidden_states, router_logits)
            mlp_out = mlp_out[0]
        return hidden_states + mlp_out


class Qwen3MoePreTrainedModel(PreTrainedModel):
    config_class = Qwen3MoeConfig
    base_model_prefix = "model"
    _no_split_modules = ["Qwen3MoeDecoderLayer"]

    def _check_and_adjust_experts_implementation(self, *args: Any, **kwargs: Any) -> None:
        """transformers 5 refuses models without grouped-mm experts; torch_moe needs no choice."""
        return None


class Qwen3MoeModel(Qwen3MoePreTrainedModel):
    def __init__(self, config: Qwen3MoeConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(Qwen3MoeDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = Qwen3MoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        head_dim = getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
        self.rotary_emb = Qwen3MoeRotaryEmbedding(
            head_dim, config.max_position_embeddings, config.rope_parameters["rope_theta"]
        )
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None,
        position_ids: torch.LongTensor,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        assert position_ids is not None, "position_ids must be provided for AD export"
        hidden_states = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        for layer in self.layers:
            hidden_states = layer(hidden_states, position_embeddings)
        return self.norm(hidden_states)


class Qwen3MoeForCausalLM(Qwen3MoePreTrainedModel):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: Qwen3MoeConfig, **kwargs) -> None:
        super().__init__(config)
        self.model = Qwen3MoeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> Qwen3MoeCausalLMOutput:
        assert position_ids is not None, "position_ids must be provided for AD export"
        hidden_states = self.model(input_ids, position_ids, inputs_embeds)
        return Qwen3MoeCausalLMOutput(logits=self.lm_head(hidden_states).float())


AutoModelForCausalLMFactory.register_custom_model_cls("Qwen3MoeConfig", Qwen3MoeForCausalLM)
