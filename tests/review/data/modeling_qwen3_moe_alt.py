"""Lean Qwen3-MoE written in another layout than the golden Llama (review fixture).

Same contract, different style: a module-level op alias, positional op arguments, attention in a
module-level helper, class names that do not say what a class is (``TokenMixer``, ``ScaleNorm``,
``PositionTables``), and per-expert modules filled from packed transformers experts by a load hook.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import Qwen3MoeConfig
from transformers.activations import ACT2FN
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import ModelOutput

import onboardlm.ops  # noqa: F401  (registers torch.ops.auto_deploy.*)
from onboardlm.models.factory import AutoModelForCausalLMFactory
from onboardlm.ops import ActivationType

ad = torch.ops.auto_deploy


def _head_dim(config: Qwen3MoeConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, scale: float
):
    q, k = ad.torch_rope_with_explicit_cos_sin(q, k, cos, sin, 2)
    return ad.torch_attention(q, k, v, None, 0.0, True, scale, None, None, None, "bsnd")


def _unpack_experts(module: nn.Module, state_dict: dict, prefix: str, *args: object) -> None:
    """transformers 5 packs experts: gate_up_proj (E, 2I, H) and down_proj (E, H, I)."""
    gate_up = state_dict.pop(f"{prefix}experts.gate_up_proj", None)
    down = state_dict.pop(f"{prefix}experts.down_proj", None)
    if gate_up is None or down is None:
        return
    gate, up = gate_up.chunk(2, dim=1)
    for e in range(gate_up.shape[0]):
        state_dict[f"{prefix}experts.{e}.gate_proj.weight"] = gate[e]
        state_dict[f"{prefix}experts.{e}.up_proj.weight"] = up[e]
        state_dict[f"{prefix}experts.{e}.down_proj.weight"] = down[e]


@dataclass
class Qwen3MoeLogits(ModelOutput):
    logits: torch.FloatTensor | None = None


class Qwen3MoeScaleNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ad.torch_rmsnorm(x, self.weight, self.eps)


class Qwen3MoePositionTables(nn.Module):
    def __init__(self, config: Qwen3MoeConfig) -> None:
        super().__init__()
        dim = _head_dim(config)
        base = config.rope_parameters["rope_theta"]
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        self.register_buffer("_ad_inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self._ad_inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(x.dtype), angles.sin().to(x.dtype)


class Qwen3MoeFeedForward(nn.Module):
    def __init__(self, config: Qwen3MoeConfig, width: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.down_proj = nn.Linear(width, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = ad.torch_linear_simple(x, self.gate_proj.weight, None, "colwise", None, 1, "mlp")
        up = ad.torch_linear_simple(x, self.up_proj.weight, None, "colwise", None, 1, "mlp")
        down = ad.torch_linear_simple(
            self.act_fn(gate) * up, self.down_proj.weight, None, "rowwise", None, 1, "mlp"
        )
        return ad.all_reduce(down, "mlp")


class Qwen3MoeRoutedBlock(nn.Module):
    def __init__(self, config: Qwen3MoeConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(
            Qwen3MoeFeedForward(config, config.moe_intermediate_size) for _ in range(config.num_experts)
        )
        self.register_load_state_dict_pre_hook(_unpack_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        probs = torch.softmax(self.gate(flat), dim=-1, dtype=torch.float)
        weights, selected = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        out = ad.torch_moe(
            flat,
            selected,
            weights.to(x.dtype),
            [e.gate_proj.weight for e in self.experts],
            [e.down_proj.weight for e in self.experts],
            [e.up_proj.weight for e in self.experts],
            True,
            int(ActivationType.Silu),
        )
        return out.reshape(x.shape)


class Qwen3MoeTokenMixer(nn.Module):
    def __init__(self, config: Qwen3MoeConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            _head_dim(config),
        )
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.heads * self.dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.kv_heads * self.dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.kv_heads * self.dim, bias=bias)
        self.o_proj = nn.Linear(self.heads * self.dim, config.hidden_size, bias=bias)
        self.q_norm = Qwen3MoeScaleNorm(self.dim, config.rms_norm_eps)
        self.k_norm = Qwen3MoeScaleNorm(self.dim, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        b, s = x.shape[:2]
        q = ad.torch_linear_simple(x, self.q_proj.weight, self.q_proj.bias, "colwise", None, 1, "mha")
        k = ad.torch_linear_simple(x, self.k_proj.weight, self.k_proj.bias, "colwise", None, self.dim, "mha")
        v = ad.torch_linear_simple(x, self.v_proj.weight, self.v_proj.bias, "colwise", None, self.dim, "mha")
        q = self.q_norm(ad.view(q, [b, s, self.heads, self.dim], 2, "mha"))
        k = self.k_norm(ad.view(k, [b, s, self.kv_heads, self.dim], 2, "mha"))
        v = ad.view(v, [b, s, self.kv_heads, self.dim], 2, "mha")
        out = _attend(q, k, v, cos_sin[0], cos_sin[1], self.dim**-0.5)
        out = ad.view(out, [b, s, self.heads * self.dim], 2, "mha")
        return ad.all_reduce(
            ad.torch_linear_simple(out, self.o_proj.weight, self.o_proj.bias, "rowwise"), "mha"
        )


class Qwen3MoeBlock(nn.Module):
    def __init__(self, config: Qwen3MoeConfig, index: int) -> None:
        super().__init__()
        sparse = index not in config.mlp_only_layers and (index + 1) % config.decoder_sparse_step == 0
        self.self_attn = Qwen3MoeTokenMixer(config)
        self.mlp = (
            Qwen3MoeRoutedBlock(config) if sparse else Qwen3MoeFeedForward(config, config.intermediate_size)
        )
        self.input_layernorm = Qwen3MoeScaleNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = Qwen3MoeScaleNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos_sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3MoePreTrainedModel(PreTrainedModel):
    config_class = Qwen3MoeConfig
    base_model_prefix = "model"


class Qwen3MoeModel(Qwen3MoePreTrainedModel):
    def __init__(self, config: Qwen3MoeConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([Qwen3MoeBlock(config, i) for i in range(config.num_hidden_layers)])
        self.norm = Qwen3MoeScaleNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = Qwen3MoePositionTables(config)
        self.post_init()

    def forward(self, input_ids, position_ids, inputs_embeds=None, **kwargs) -> torch.Tensor:
        assert position_ids is not None
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        cos_sin = self.rotary_emb(x, position_ids)
        for layer in self.layers:
            x = layer(x, cos_sin)
        return self.norm(x)


class Qwen3MoeForCausalLM(Qwen3MoePreTrainedModel):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: Qwen3MoeConfig) -> None:
        super().__init__(config)
        self.model = Qwen3MoeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids, position_ids, inputs_embeds=None, **kwargs) -> Qwen3MoeLogits:
        assert position_ids is not None
        hidden = self.model(input_ids, position_ids, inputs_embeds)
        logits = ad.torch_linear_simple(hidden, self.lm_head.weight, None)
        return Qwen3MoeLogits(logits.float())


AutoModelForCausalLMFactory.register_custom_model_cls("Qwen3MoeConfig", Qwen3MoeForCausalLM)
