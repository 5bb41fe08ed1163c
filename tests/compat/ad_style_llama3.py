"""Llama 3 written the way TensorRT-LLM AutoDeploy model files are (prefill only), for compat tests.

Imports the factory by its absolute AutoDeploy path and calls every op with AutoDeploy's argument
forms: hint keywords on ``torch_linear_simple`` / ``view`` / ``all_reduce``, ``unsqueeze_dim`` as a
positional ``2`` on the RoPE op and all eleven ``torch_attention`` arguments positionally.
Loaded through ``autodeploy_shim``; not an onboardlm model file.
"""

from dataclasses import dataclass

import torch
from tensorrt_llm._torch.auto_deploy.models.hf import AutoModelForCausalLMFactory
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.modeling_utils import PreTrainedModel
from transformers.models.llama.configuration_llama import LlamaConfig
from transformers.utils import ModelOutput


def _inv_freq(config: LlamaConfig) -> tuple[torch.Tensor, float]:
    rope_type = config.rope_parameters.get("rope_type", "default")
    if rope_type != "default":
        return ROPE_INIT_FUNCTIONS[rope_type](config, device=None)
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    exponents = torch.arange(0, dim, 2, dtype=torch.float32) / dim
    return 1.0 / (config.rope_parameters["rope_theta"] ** exponents), 1.0


@dataclass
class Llama3CausalLMOutput(ModelOutput):
    logits: torch.FloatTensor | None = None


class Llama3RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.ops.auto_deploy.torch_rmsnorm(hidden_states, self.weight, self.variance_epsilon)


class Llama3RotaryEmbedding(nn.Module):
    """cos/sin tables for every position, cached in ``_ad_`` buffers and gathered per forward."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        inv_freq, scaling = _inv_freq(config)
        angles = torch.outer(torch.arange(config.max_position_embeddings, dtype=inv_freq.dtype), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        self.register_buffer("_ad_cos_cached", angles.cos() * scaling, persistent=False)
        self.register_buffer("_ad_sin_cached", angles.sin() * scaling, persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos = self._ad_cos_cached.to(dtype=x.dtype, device=x.device)
        sin = self._ad_sin_cached.to(dtype=x.dtype, device=x.device)
        return cos[position_ids], sin[position_ids]


class Llama3MLP(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

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


class Llama3Attention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.scaling = self.head_dim**-0.5
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)

    def _project(self, x: torch.Tensor, proj: nn.Linear, heads: int) -> torch.Tensor:
        ad = torch.ops.auto_deploy
        bsz, q_len, _ = x.size()
        out = ad.torch_linear_simple(
            x, proj.weight, proj.bias, tp_mode="colwise", tp_min_local_shape=self.head_dim, layer_type="mha"
        )
        return ad.view(out, [bsz, q_len, heads, self.head_dim], tp_scaled_dim=2, layer_type="mha")

    def forward(
        self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        ad = torch.ops.auto_deploy
        bsz, q_len, _ = hidden_states.size()
        q = self._project(hidden_states, self.q_proj, self.num_heads)
        k = self._project(hidden_states, self.k_proj, self.num_kv_heads)
        v = self._project(hidden_states, self.v_proj, self.num_kv_heads)
        cos, sin = position_embeddings
        q, k = ad.torch_rope_with_explicit_cos_sin(q, k, cos, sin, 2)
        attn = ad.torch_attention(q, k, v, None, 0.0, True, self.scaling, None, None, None, "bsnd")
        attn = ad.view(attn, [bsz, q_len, self.num_heads * self.head_dim], tp_scaled_dim=2, layer_type="mha")
        out = ad.torch_linear_simple(
            attn, self.o_proj.weight, self.o_proj.bias, tp_mode="rowwise", layer_type="mha"
        )
        return ad.all_reduce(out, layer_type="mha")


class Llama3DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Llama3Attention(config, layer_idx)
        self.mlp = Llama3MLP(config)
        self.input_layernorm = Llama3RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = Llama3RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings
        )
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class Llama3PreTrainedModel(PreTrainedModel):
    config_class = LlamaConfig
    base_model_prefix = "model"
    _no_split_modules = ["Llama3DecoderLayer"]


class Llama3Model(Llama3PreTrainedModel):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(Llama3DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = Llama3RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = Llama3RotaryEmbedding(config)
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


class Llama3ForCausalLM(Llama3PreTrainedModel):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LlamaConfig, **kwargs) -> None:
        super().__init__(config)
        self.model = Llama3Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> Llama3CausalLMOutput:
        assert position_ids is not None, "position_ids must be provided for AD export"
        hidden_states = self.model(input_ids, position_ids, inputs_embeds)
        return Llama3CausalLMOutput(logits=self.lm_head(hidden_states).float())


AutoModelForCausalLMFactory.register_custom_model_cls("LlamaConfig", Llama3ForCausalLM)
