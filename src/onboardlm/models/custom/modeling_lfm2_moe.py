"""Lean, export-friendly Lfm2Moe on canonical ``auto_deploy`` ops.

Mirrors ``transformers.models.lfm2_moe.modeling_lfm2_moe`` (Lfm2MoeForCausalLM): a hybrid stack of
pre-norm layers with RMSNorm, built from gated short-convolution mixers, dense MLPs, grouped-query
attention, mixture-of-experts feed-forward and rotary position embeddings. Layer kinds in the
analyzed config: short_conv+mlp (1 of 2 layers), attention+moe (1 of 2 layers); a layer's kind is
read from config.layer_types[layer_idx]. Module names equal the checkpoint keys, so HuggingFace
state dicts load with ``strict=True``.

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
from transformers import Lfm2MoeConfig
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import ModelOutput

import onboardlm.ops  # noqa: F401  (registers torch.ops.auto_deploy.*)
from onboardlm.models.factory import AutoModelForCausalLMFactory
from onboardlm.ops import ActivationType


def _rope_inverse_frequencies(config: Lfm2MoeConfig) -> tuple[torch.Tensor, float]:
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
class Lfm2MoeCausalLMOutput(ModelOutput):
    logits: torch.FloatTensor | None = None


class Lfm2MoeRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.ops.auto_deploy.torch_rmsnorm(hidden_states, self.weight, self.variance_epsilon)


class Lfm2MoeRotaryEmbedding(nn.Module):
    """cos/sin of ``position_ids * inv_freq``, computed in fp32 once per forward for all layers."""

    def __init__(self, config: Lfm2MoeConfig) -> None:
        super().__init__()
        inv_freq, self.attention_scaling = _rope_inverse_frequencies(config)
        self.register_buffer("_ad_inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self._ad_inv_freq.float()
        angles = torch.cat((freqs, freqs), dim=-1)
        cos = angles.cos() * self.attention_scaling
        sin = angles.sin() * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)


class Lfm2MoeShortConv(nn.Module):
    """Gated short convolution: ``out(post_gate * conv(pre_gate * value))``, a depthwise causal conv."""

    def __init__(self, config: Lfm2MoeConfig, layer_idx: int) -> None:
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


class Lfm2MoeMLP(nn.Module):
    def __init__(self, config: Lfm2MoeConfig) -> None:
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


class Lfm2MoeAttention(nn.Module):
    def __init__(self, config: Lfm2MoeConfig, layer_idx: int) -> None:
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
        self.q_layernorm = Lfm2MoeRMSNorm(self.head_dim, config.norm_eps)
        self.k_layernorm = Lfm2MoeRMSNorm(self.head_dim, config.norm_eps)

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


def _store_expert_tensors(
    state_dict: dict[str, torch.Tensor], prefix: str, name: str, stacked: torch.Tensor
) -> None:
    """Split ``stacked`` along its first (expert) dim into ``<prefix><e>.<name>`` entries."""
    state_dict.update({f"{prefix}{index}.{name}": tensor for index, tensor in enumerate(stacked.unbind(0))})


class Lfm2MoeExpert(nn.Module):
    """One routed expert's weights; Lfm2MoeSparseMoeBlock runs all experts at once through torch_moe."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)


class Lfm2MoeTopKRouter(nn.Module):
    """Sigmoid scores; the top-k are chosen on the scores + ``expert_bias``
    (the MoE block's, passed in).
    The routing weights are the chosen sigmoid scores (renormalised when norm_topk_prob)
    times ``config.routed_scaling_factor``. Computed in fp32.
    """

    def __init__(self, config: Lfm2MoeConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.num_experts
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.zeros(self.num_experts, config.hidden_size))

    def forward(
        self, hidden_states: torch.Tensor, expert_bias: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert ids and fp32 routing weights, both ``[T, top_k]``, for tokens ``[T, H]``."""
        scores = torch.nn.functional.linear(hidden_states.float(), self.weight.float()).sigmoid()
        choice = scores + expert_bias.float()
        selected = torch.topk(choice, k=self.top_k, dim=-1)[1]
        weights = scores.gather(1, selected)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return selected, weights * self.routed_scaling_factor


class Lfm2MoeSparseMoeBlock(nn.Module):
    """Mixture of experts behind a sigmoid top-k router with a score-correction bias.

    The routed experts run in torch_moe;
    a load hook unpacks HF's packed expert tensors.
    """

    def __init__(self, config: Lfm2MoeConfig) -> None:
        super().__init__()
        self.gate = Lfm2MoeTopKRouter(config)
        self.register_buffer(  # a checkpoint tensor the router reads
            "expert_bias", torch.zeros(config.num_experts)
        )
        self.experts = nn.ModuleList(
            Lfm2MoeExpert(config.hidden_size, config.moe_intermediate_size) for _ in range(config.num_experts)
        )
        self._register_load_state_dict_pre_hook(self._unpack_packed_experts)

    def _unpack_packed_experts(self, state_dict: dict[str, torch.Tensor], prefix: str, *args: object) -> None:
        """Load hook: HF's packed ``experts.gate_up_proj`` [E, 2I, H] and ``experts.down_proj``
        [E, H, I] become per-expert ``experts.<e>.{gate,up,down}_proj`` keys; gate and up are
        the two halves of gate_up. Per-expert checkpoints load unchanged.
        """
        experts = f"{prefix}experts."
        gate_up = state_dict.pop(f"{experts}gate_up_proj", None)
        if gate_up is not None:
            _store_expert_tensors(state_dict, experts, "gate_proj.weight", gate_up.chunk(2, dim=1)[0])
            _store_expert_tensors(state_dict, experts, "up_proj.weight", gate_up.chunk(2, dim=1)[1])
        down = state_dict.pop(f"{experts}down_proj", None)
        if down is not None:
            _store_expert_tensors(state_dict, experts, "down_proj.weight", down)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        tokens = hidden_states.reshape(-1, hidden_states.shape[-1])
        selected_experts, routing_weights = self.gate(tokens, self.expert_bias)
        out = torch.ops.auto_deploy.torch_moe(
            tokens,
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
        return out.reshape(hidden_states.shape)


class Lfm2MoeDecoderLayer(nn.Module):
    def __init__(self, config: Lfm2MoeConfig, layer_idx: int) -> None:
        super().__init__()
        self.block_type = config.layer_types[layer_idx]
        self.operator_norm = Lfm2MoeRMSNorm(config.hidden_size, config.norm_eps)
        self.ffn_norm = Lfm2MoeRMSNorm(config.hidden_size, config.norm_eps)
        self.feed_forward = (
            Lfm2MoeSparseMoeBlock(config) if layer_idx >= config.num_dense_layers else Lfm2MoeMLP(config)
        )
        if self.block_type == "conv":  # short_conv+mlp layers
            self.conv = Lfm2MoeShortConv(config, layer_idx)
        elif self.block_type == "full_attention":  # attention+moe layers
            self.self_attn = Lfm2MoeAttention(config, layer_idx)
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


class Lfm2MoePreTrainedModel(PreTrainedModel):
    config_class = Lfm2MoeConfig
    base_model_prefix = "model"
    _no_split_modules = ["Lfm2MoeDecoderLayer"]

    def _check_and_adjust_experts_implementation(self, experts_implementation: str | None) -> str:
        """The experts run in ``torch_moe``: transformers' experts kernels never apply."""
        return "eager"


class Lfm2MoeModel(Lfm2MoePreTrainedModel):
    def __init__(self, config: Lfm2MoeConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(Lfm2MoeDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.embedding_norm = Lfm2MoeRMSNorm(config.hidden_size, config.norm_eps)
        self.pos_emb = Lfm2MoeRotaryEmbedding(config)
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
        position_embeddings = self.pos_emb(inputs_embeds, position_ids)
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(hidden_states, position_embeddings)
        return self.embedding_norm(hidden_states)


class Lfm2MoeForCausalLM(Lfm2MoePreTrainedModel):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: Lfm2MoeConfig) -> None:
        super().__init__(config)
        self.model = Lfm2MoeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None,
        position_ids: torch.LongTensor,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> Lfm2MoeCausalLMOutput:
        assert position_ids is not None, "position_ids is required"
        hidden_states = self.model(input_ids, position_ids, inputs_embeds)
        logits = torch.ops.auto_deploy.torch_linear_simple(hidden_states, self.lm_head.weight, None)
        return Lfm2MoeCausalLMOutput(logits=logits.float())


AutoModelForCausalLMFactory.register_custom_model_cls("Lfm2MoeConfig", Lfm2MoeForCausalLM)
