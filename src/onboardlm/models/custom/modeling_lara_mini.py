"""Lean, export-friendly LaraMini on canonical ``auto_deploy`` ops.

Mirrors ``transformers.models.lara_mini.modeling_lara_mini`` (LaraMiniForCausalLM): a hybrid stack
of pre-norm layers with RMSNorm, built from gated delta rule (linear attention) mixers,
mixture-of-experts feed-forward, grouped-query attention and rotary position embeddings. Layer kinds
in the analyzed config: gated_delta+moe (1 of 3 layers), attention+moe (2 of 3 layers); a layer's
kind is read from config.layer_types[layer_idx]. Module names equal the checkpoint keys, so
HuggingFace state dicts load with ``strict=True``.

Left out on purpose: the KV cache and the mixers' conv and scan states (they run from a zero state
on ``torch_causal_conv1d`` / ``torch_gated_delta_rule``; the runtime swaps in cached versions),
attention masks and padding masks (sequences are causal and unpadded), dropout, gradient
checkpointing, fused-kernel paths, position-id generation (callers pass them), hidden-state outputs
and the loss.
Linear, split, view, conv, scan and gated-norm calls carry tensor-parallel sharding hints; they do
not change the numbers.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import LaraMiniConfig
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import ModelOutput

import onboardlm.ops  # noqa: F401  (registers torch.ops.auto_deploy.*)
from onboardlm.models.factory import AutoModelForCausalLMFactory
from onboardlm.ops import ActivationType


def _rope_inverse_frequencies(config: LaraMiniConfig) -> tuple[torch.Tensor, float]:
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
class LaraMiniCausalLMOutput(ModelOutput):
    logits: torch.FloatTensor | None = None


class LaraMiniRMSNorm(nn.Module):
    """RMSNorm whose weight scales the fp32 normalised value before the cast back (as transformers'
    does for this model)."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        normed = torch.ops.auto_deploy.torch_rmsnorm(
            hidden_states.float(), self.weight.float(), self.variance_epsilon
        )
        return normed.to(hidden_states.dtype)


class LaraMiniRotaryEmbedding(nn.Module):
    """cos/sin of ``position_ids * inv_freq``, computed in fp32 once per forward for all layers."""

    def __init__(self, config: LaraMiniConfig) -> None:
        super().__init__()
        inv_freq, self.attention_scaling = _rope_inverse_frequencies(config)
        self.register_buffer("_ad_inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self._ad_inv_freq.float()
        angles = torch.cat((freqs, freqs), dim=-1)
        cos = angles.cos() * self.attention_scaling
        sin = angles.sin() * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)


class LaraMiniRMSNormGated(nn.Module):
    """Per-head RMSNorm of the mixer output, gated by ``silu(gate)`` after the norm."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return torch.ops.auto_deploy.torch_rmsnorm_gated(
            hidden_states,
            self.weight,
            gate,
            self.variance_epsilon,
            self.weight.shape[0],
            norm_before_gate=True,
            layer_type="delta",
        )


class LaraMiniGatedDeltaNet(nn.Module):
    """Gated DeltaNet: in-projections, depthwise causal conv over [q | k | v], gated delta rule, gated norm."""

    def __init__(self, config: LaraMiniConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_v_heads = config.linear_num_value_heads
        self.num_k_heads = config.linear_num_key_heads
        self.head_k_dim = config.linear_key_head_dim
        self.head_v_dim = config.linear_value_head_dim
        self.key_dim = self.num_k_heads * self.head_k_dim
        self.value_dim = self.num_v_heads * self.head_v_dim
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.conv_kernel_size = config.linear_conv_kernel_dim
        hidden_size = config.hidden_size
        self.in_proj_qkv = nn.Linear(hidden_size, 2 * self.key_dim + self.value_dim, bias=False)
        self.in_proj_z = nn.Linear(hidden_size, self.value_dim, bias=False)
        self.in_proj_b = nn.Linear(hidden_size, self.num_v_heads, bias=False)
        self.in_proj_a = nn.Linear(hidden_size, self.num_v_heads, bias=False)
        self.conv1d = nn.Conv1d(
            self.conv_dim,
            self.conv_dim,
            self.conv_kernel_size,
            groups=self.conv_dim,
            bias=False,
            padding=self.conv_kernel_size - 1,
        )
        self.dt_bias = nn.Parameter(torch.ones(self.num_v_heads))
        self.A_log = nn.Parameter(torch.zeros(self.num_v_heads))
        self.norm = LaraMiniRMSNormGated(self.head_v_dim, config.rms_norm_eps)
        self.out_proj = nn.Linear(self.value_dim, hidden_size, bias=False)
        self.conv_act = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        ops = torch.ops.auto_deploy
        batch, seq_len = hidden_states.shape[:2]
        key_dim, value_dim, conv_dim = self.key_dim, self.value_dim, self.conv_dim
        mixed_qkv = ops.torch_linear_simple(
            hidden_states,
            self.in_proj_qkv.weight,
            self.in_proj_qkv.bias,
            tp_mode="colwise",
            output_sizes=[key_dim, key_dim, value_dim],
            layer_type="delta",
        )
        z = ops.torch_linear_simple(
            hidden_states, self.in_proj_z.weight, self.in_proj_z.bias, tp_mode="colwise", layer_type="delta"
        )
        z = ops.view(
            z, [batch, seq_len, self.num_v_heads, self.head_v_dim], tp_scaled_dim=2, layer_type="delta"
        )
        b = ops.torch_linear_simple(
            hidden_states, self.in_proj_b.weight, self.in_proj_b.bias, tp_mode="colwise", layer_type="delta"
        )
        a = ops.torch_linear_simple(
            hidden_states, self.in_proj_a.weight, self.in_proj_a.bias, tp_mode="colwise", layer_type="delta"
        )
        mixed_qkv = ops.torch_causal_conv1d(
            mixed_qkv,
            self.conv1d.weight,
            self.conv1d.bias,
            1,
            self.conv_kernel_size - 1,
            1,
            conv_dim,
            shardable=True,
            output_sizes=[key_dim, key_dim, value_dim],
            layer_type="delta",
        )
        mixed_qkv = self.conv_act(mixed_qkv)
        q, k, v = ops.split_with_sizes(
            mixed_qkv, [key_dim, key_dim, value_dim], dim=-1, enable_sharding=True, layer_type="delta"
        )
        q = ops.view(
            q, [batch, seq_len, self.num_k_heads, self.head_k_dim], tp_scaled_dim=2, layer_type="delta"
        )
        k = ops.view(
            k, [batch, seq_len, self.num_k_heads, self.head_k_dim], tp_scaled_dim=2, layer_type="delta"
        )
        v = ops.view(
            v, [batch, seq_len, self.num_v_heads, self.head_v_dim], tp_scaled_dim=2, layer_type="delta"
        )
        core = ops.torch_gated_delta_rule(
            q, k, v, a, b, self.A_log, self.dt_bias, shardable=True, layer_type="delta"
        )
        core = self.norm(core, z)
        core = ops.view(core, [batch, seq_len, value_dim], tp_scaled_dim=2, layer_type="delta")
        out = ops.torch_linear_simple(
            core, self.out_proj.weight, self.out_proj.bias, tp_mode="rowwise", layer_type="delta"
        )
        return ops.all_reduce(out, layer_type="delta")


def _store_expert_tensors(
    state_dict: dict[str, torch.Tensor], prefix: str, name: str, stacked: torch.Tensor
) -> None:
    """Split ``stacked`` along its first (expert) dim into ``<prefix><e>.<name>`` entries."""
    state_dict.update({f"{prefix}{index}.{name}": tensor for index, tensor in enumerate(stacked.unbind(0))})


class LaraMiniMLP(nn.Module):
    """Gated MLP of a shared expert or a dense layer (``intermediate_size`` defaults to the config's)."""

    def __init__(self, config: LaraMiniConfig, intermediate_size: int | None = None) -> None:
        super().__init__()
        intermediate_size = config.intermediate_size if intermediate_size is None else intermediate_size
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        linear = torch.ops.auto_deploy.torch_linear_simple
        gate = linear(x, self.gate_proj.weight, None, tp_mode="colwise", layer_type="mlp")
        up = linear(x, self.up_proj.weight, None, tp_mode="colwise", layer_type="mlp")
        down = linear(
            self.act_fn(gate) * up, self.down_proj.weight, None, tp_mode="rowwise", layer_type="mlp"
        )
        return torch.ops.auto_deploy.all_reduce(down, layer_type="mlp")


class LaraMiniExpert(nn.Module):
    """One routed expert's weights; LaraMiniSparseMoeBlock runs all experts at once through torch_moe."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)


class LaraMiniTopKRouter(nn.Module):
    """Softmax over all experts, then each token's top-k (renormalised when norm_topk_prob)."""

    def __init__(self, config: LaraMiniConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.weight = nn.Parameter(torch.zeros(config.num_experts, config.hidden_size))

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert ids and fp32 routing weights, both ``[T, top_k]``, for tokens ``[T, H]``."""
        logits = torch.nn.functional.linear(hidden_states, self.weight)
        weights, selected = torch.topk(torch.softmax(logits.float(), dim=-1), self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return selected, weights


class LaraMiniSparseMoeBlock(nn.Module):
    """Mixture of experts behind a softmax top-k router,
    plus the always-on `shared_expert`.

    The routed experts run in torch_moe;
    a load hook unpacks HF's packed expert tensors.
    """

    def __init__(self, config: LaraMiniConfig) -> None:
        super().__init__()
        self.gate = LaraMiniTopKRouter(config)
        self.experts = nn.ModuleList(
            LaraMiniExpert(config.hidden_size, config.moe_intermediate_size)
            for _ in range(config.num_experts)
        )
        self.shared_expert = LaraMiniMLP(config, intermediate_size=config.shared_expert_intermediate_size)
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
        selected_experts, routing_weights = self.gate(tokens)
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
        shared = self.shared_expert(tokens)
        out = out + shared
        return out.reshape(hidden_states.shape)


class LaraMiniAttention(nn.Module):
    def __init__(self, config: LaraMiniConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.sliding_window = (
            config.sliding_window if config.layer_types[layer_idx] == "sliding_attention" else None
        )
        self.use_rope = bool(config.layer_types[layer_idx] == "sliding_attention")
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        self.q_norm = LaraMiniRMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = LaraMiniRMSNorm(self.head_dim, config.rms_norm_eps)

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
        q = self.q_norm(q)
        k = self.k_norm(k)

        if self.use_rope:
            cos, sin = position_embeddings
            q, k = ops.torch_rope_with_explicit_cos_sin(q, k, cos, sin, 2)
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


class LaraMiniDecoderLayer(nn.Module):
    def __init__(self, config: LaraMiniConfig, layer_idx: int) -> None:
        super().__init__()
        self.block_type = config.layer_types[layer_idx]
        self.input_layernorm = LaraMiniRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = LaraMiniRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LaraMiniSparseMoeBlock(config)
        if self.block_type == "linear_attention":  # gated_delta+moe layers
            self.linear_attn = LaraMiniGatedDeltaNet(config, layer_idx)
        elif self.block_type in ("sliding_attention", "full_attention"):  # attention+moe layers
            self.self_attn = LaraMiniAttention(config, layer_idx)
        else:
            raise ValueError(
                f"layer {layer_idx}: block type {self.block_type!r} is none of 'linear_attention', 'sliding_attention', 'full_attention'"
            )

    def forward(
        self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        if self.block_type == "linear_attention":
            hidden_states = hidden_states + self.linear_attn(self.input_layernorm(hidden_states))
            hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
            return hidden_states
        elif self.block_type in ("sliding_attention", "full_attention"):
            hidden_states = hidden_states + self.self_attn(
                self.input_layernorm(hidden_states), position_embeddings
            )
            hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
            return hidden_states
        raise AssertionError("unreachable: the constructor checked the block type")


class LaraMiniPreTrainedModel(PreTrainedModel):
    config_class = LaraMiniConfig
    base_model_prefix = "model"
    _no_split_modules = ["LaraMiniDecoderLayer"]

    def _check_and_adjust_experts_implementation(self, experts_implementation: str | None) -> str:
        """The experts run in ``torch_moe``: transformers' experts kernels never apply."""
        return "eager"


class LaraMiniModel(LaraMiniPreTrainedModel):
    def __init__(self, config: LaraMiniConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(LaraMiniDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LaraMiniRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = LaraMiniRotaryEmbedding(config)
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


class LaraMiniForCausalLM(LaraMiniPreTrainedModel):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LaraMiniConfig) -> None:
        super().__init__(config)
        self.model = LaraMiniModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None,
        position_ids: torch.LongTensor,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> LaraMiniCausalLMOutput:
        assert position_ids is not None, "position_ids is required"
        hidden_states = self.model(input_ids, position_ids, inputs_embeds)
        logits = torch.ops.auto_deploy.torch_linear_simple(hidden_states, self.lm_head.weight, None)
        return LaraMiniCausalLMOutput(logits=logits.float())


AutoModelForCausalLMFactory.register_custom_model_cls("LaraMiniConfig", LaraMiniForCausalLM)
