"""Lean, export-friendly Beam on canonical ``auto_deploy`` ops.

Mirrors ``transformers.models.beam.modeling_beam`` (BeamForCausalLM): decoder layers with RMSNorm
before and after attention and MLP, rotary position embeddings (default, linear, llama3, yarn,
proportional), grouped-query attention with q/k norm and mixture-of-experts feed-forward layers.
Also: sliding-window attention on sliding_attention layers; RoPE only on sliding_attention layers; q
scaled on NoPE layers by the model: (1 + (position + 1) / 2048) ** 0.1; depth-scaled residual adds:
the n-th add (n = 2 * layer_idx + 2 for the attention, + 1 for the feed-forward) keeps sqrt((n - 1)
/ n) of the residual and adds the block over sqrt(n); logits softcap by
config.final_logit_softcapping. Module names equal the checkpoint keys, so HuggingFace state dicts
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
from transformers import BeamConfig
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import ModelOutput

import onboardlm.ops  # noqa: F401  (registers torch.ops.auto_deploy.*)
from onboardlm.models.factory import AutoModelForCausalLMFactory
from onboardlm.ops import ActivationType


def _rope_inverse_frequencies(config: BeamConfig, layer_type: str) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and cos/sin scaling for the layer type's rope_type (static types only)."""
    parameters = config.rope_parameters[layer_type]
    rope_type = parameters.get("rope_type", "default")
    if rope_type in ("dynamic", "longrope"):
        raise NotImplementedError(f"rope_type {rope_type!r} depends on the sequence length at run time")
    if rope_type != "default":
        return ROPE_INIT_FUNCTIONS[rope_type](config, layer_type=layer_type)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    base = parameters["rope_theta"]
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    return inv_freq, 1.0


@dataclass
class BeamCausalLMOutput(ModelOutput):
    logits: torch.FloatTensor | None = None


class BeamRMSNorm(nn.Module):
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


class BeamRotaryEmbedding(nn.Module):
    """cos/sin per layer type (each with its own RoPE parameters), in fp32, once per forward."""

    def __init__(self, config: BeamConfig) -> None:
        super().__init__()
        # a layer type whose rope_parameters entry is None has no RoPE: no table
        self.layer_types = sorted(
            {kind for kind in config.layer_types if config.rope_parameters[kind] is not None}
        )
        tables = [_rope_inverse_frequencies(config, layer_type) for layer_type in self.layer_types]
        self.attention_scaling = [scaling for _, scaling in tables]
        self.widths = [len(inv_freq) for inv_freq, _ in tables]  # rotary widths may differ per layer type
        inv_freqs = torch.zeros(len(tables), max(self.widths))
        for index, (inv_freq, _) in enumerate(tables):
            inv_freqs[index, : len(inv_freq)] = inv_freq
        self.register_buffer("_ad_inv_freq", inv_freqs, persistent=False)

    def forward(
        self, x: torch.Tensor, position_ids: torch.Tensor, layer_type: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        index = self.layer_types.index(layer_type)
        inv_freq = self._ad_inv_freq[index, : self.widths[index]]
        freqs = position_ids[..., None].float() * inv_freq.float()
        scaling = self.attention_scaling[index]
        angles = torch.cat((freqs, freqs), dim=-1)
        cos = angles.cos() * scaling
        sin = angles.sin() * scaling
        return cos.to(x.dtype), sin.to(x.dtype)


def _store_expert_tensors(
    state_dict: dict[str, torch.Tensor], prefix: str, name: str, stacked: torch.Tensor
) -> None:
    """Split ``stacked`` along its first (expert) dim into ``<prefix><e>.<name>`` entries."""
    state_dict.update({f"{prefix}{index}.{name}": tensor for index, tensor in enumerate(stacked.unbind(0))})


class BeamMLP(nn.Module):
    """Gated MLP of a shared expert or a dense layer (``intermediate_size`` defaults to the config's)."""

    def __init__(self, config: BeamConfig, intermediate_size: int | None = None) -> None:
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


class BeamExpert(nn.Module):
    """One routed expert's weights; BeamMoE runs all experts at once through torch_moe."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)


class BeamTopKRouter(nn.Module):
    """Sigmoid scores; the top-k are chosen on score + ``e_score_correction_bias`` among the experts of
    the ``topk_group`` best of ``n_group`` groups (a group scores the sum of its two best experts).
    The chosen sigmoid scores (renormalised when norm_topk_prob) times ``routed_scaling_factor``
    are the routing weights. Computed in fp32.
    """

    def __init__(self, config: BeamConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.num_experts
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.weight = nn.Parameter(torch.zeros(self.num_experts, config.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(self.num_experts))  # a checkpoint tensor

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert ids and fp32 routing weights, both ``[T, top_k]``, for tokens ``[T, H]``."""
        scores = torch.nn.functional.linear(hidden_states.float(), self.weight.float()).sigmoid()
        choice = scores + self.e_score_correction_bias.float()
        grouped = choice.view(-1, self.n_group, self.num_experts // self.n_group)
        group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
        best_groups = torch.topk(group_scores, k=self.topk_group, dim=-1)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, best_groups, 1.0)
        allowed = group_mask.unsqueeze(-1).expand_as(grouped).reshape(-1, self.num_experts)
        choice = choice.masked_fill(allowed == 0, float("-inf"))
        selected = torch.topk(choice, k=self.top_k, dim=-1)[1]
        weights = scores.gather(1, selected)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return selected, weights


class BeamMoE(nn.Module):
    """Mixture of experts behind a sigmoid router with bias-corrected grouped top-k,
    the routed output times ``config.routed_scaling_factor``.

    The routed experts run in torch_moe;
    a load hook unpacks HF's packed expert tensors.
    """

    def __init__(self, config: BeamConfig) -> None:
        super().__init__()
        self.gate = BeamTopKRouter(config)
        self.experts = nn.ModuleList(
            BeamExpert(config.hidden_size, config.moe_intermediate_size) for _ in range(config.num_experts)
        )
        self.routed_scaling_factor = config.routed_scaling_factor
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
        out = out * self.routed_scaling_factor
        out = torch.ops.auto_deploy.all_reduce(out, layer_type="moe")
        return out.reshape(hidden_states.shape)


class BeamAttention(nn.Module):
    def __init__(self, config: BeamConfig, layer_idx: int) -> None:
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
        self.use_temperature = bool(not self.use_rope)
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        self.gate_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.gate_bias = nn.Parameter(torch.zeros(self.num_heads))
        self.q_norm = BeamRMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = BeamRMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        temperature: torch.Tensor,
    ) -> torch.Tensor:
        ops = torch.ops.auto_deploy
        batch, seq_len = hidden_states.shape[:2]
        q = ops.torch_linear_simple(
            hidden_states, self.q_proj.weight, self.q_proj.bias, tp_mode="none", layer_type="mha"
        )
        gate = ops.torch_linear_simple(
            hidden_states, self.gate_proj.weight, self.gate_proj.bias, tp_mode="none", layer_type="mha"
        )
        k = ops.torch_linear_simple(
            hidden_states,
            self.k_proj.weight,
            self.k_proj.bias,
            tp_mode="none",
            tp_min_local_shape=self.head_dim,
            layer_type="mha",
        )
        v = ops.torch_linear_simple(
            hidden_states,
            self.v_proj.weight,
            self.v_proj.bias,
            tp_mode="none",
            tp_min_local_shape=self.head_dim,
            layer_type="mha",
        )
        q = ops.view(q, [batch, seq_len, self.num_heads, self.head_dim], tp_scaled_dim=-1, layer_type="mha")
        k = ops.view(
            k, [batch, seq_len, self.num_kv_heads, self.head_dim], tp_scaled_dim=-1, layer_type="mha"
        )
        v = ops.view(
            v, [batch, seq_len, self.num_kv_heads, self.head_dim], tp_scaled_dim=-1, layer_type="mha"
        )
        q = self.q_norm(q)
        k = self.k_norm(k)

        if self.use_rope:
            cos, sin = position_embeddings
            q, k = ops.torch_rope_with_explicit_cos_sin(q, k, cos, sin, 2)
        if self.use_temperature:
            q = q * temperature[:, :, None, None].to(q.dtype)  # attention temperature per query position
        attn = ops.torch_attention(
            q, k, v, is_causal=True, scale=self.scaling, sliding_window=self.sliding_window, layout="bsnd"
        )

        attn = ops.view(
            attn, [batch, seq_len, self.num_heads * self.head_dim], tp_scaled_dim=-1, layer_type="mha"
        )
        gate = ops.view(
            gate, [batch, seq_len, self.num_heads, self.head_dim], tp_scaled_dim=-1, layer_type="mha"
        )
        gate = gate + self.gate_bias[:, None]  # one bias per head
        gate = ops.view(
            gate, [batch, seq_len, self.num_heads * self.head_dim], tp_scaled_dim=-1, layer_type="mha"
        )
        attn = attn * torch.sigmoid(gate)
        out = ops.torch_linear_simple(
            attn, self.o_proj.weight, self.o_proj.bias, tp_mode="none", layer_type="mha"
        )
        return ops.all_reduce(out, layer_type="mha")


class BeamDecoderLayer(nn.Module):
    def __init__(self, config: BeamConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = BeamAttention(config, layer_idx)
        self.mlp = BeamMoE(config) if config.mlp_layer_types[layer_idx] == "sparse" else BeamMLP(config)
        self.input_layernorm = BeamRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = BeamRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.pre_feedforward_layernorm = BeamRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_feedforward_layernorm = BeamRMSNorm(config.hidden_size, config.rms_norm_eps)
        # the n-th residual add keeps sqrt((n - 1) / n) of the residual and adds the block over sqrt(n)
        add = 2 * layer_idx + 2  # the attention's; the feed-forward's is add + 1
        self.attn_residual_scale, self.attn_output_scale = math.sqrt((add - 1) / add), 1 / math.sqrt(add)
        self.mlp_residual_scale, self.mlp_output_scale = math.sqrt(add / (add + 1)), 1 / math.sqrt(add + 1)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        temperature: torch.Tensor,
    ) -> torch.Tensor:
        hidden_states = (
            self.attn_residual_scale * hidden_states
            + self.attn_output_scale
            * self.post_attention_layernorm(
                self.self_attn(self.input_layernorm(hidden_states), position_embeddings, temperature)
            )
        )
        return (
            self.mlp_residual_scale * hidden_states
            + self.mlp_output_scale
            * self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(hidden_states)))
        )


class BeamPreTrainedModel(PreTrainedModel):
    config_class = BeamConfig
    base_model_prefix = "model"
    _no_split_modules = ["BeamDecoderLayer"]

    def _check_and_adjust_experts_implementation(self, experts_implementation: str | None) -> str:
        """The experts run in ``torch_moe``: transformers' experts kernels never apply."""
        return "eager"


class BeamModel(BeamPreTrainedModel):
    def __init__(self, config: BeamConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(BeamDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = BeamRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = BeamRotaryEmbedding(config)
        self.position_scale_beta = 0.1
        self.position_scale_period = 2048
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
        position_embeddings = {
            layer_type: self.rotary_emb(inputs_embeds, position_ids, layer_type)
            for layer_type in self.rotary_emb.layer_types
        }
        hidden_states = inputs_embeds
        temperature = self.attention_temperature(position_ids)
        for layer, layer_type in zip(self.layers, self.config.layer_types, strict=True):
            hidden_states = layer(hidden_states, position_embeddings.get(layer_type), temperature)
        return self.norm(hidden_states)

    def attention_temperature(self, position_ids: torch.Tensor) -> torch.Tensor:
        """The q scale per position (Beam's scalable softmax on NoPE layers), once per forward like the
        RoPE tables: ``(1 + (position + 1) / period) ** beta``."""
        return torch.exp(
            self.position_scale_beta * torch.log1p((position_ids.float() + 1) / self.position_scale_period)
        )


class BeamForCausalLM(BeamPreTrainedModel):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: BeamConfig) -> None:
        super().__init__(config)
        self.model = BeamModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.final_logit_softcapping = config.final_logit_softcapping
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None,
        position_ids: torch.LongTensor,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> BeamCausalLMOutput:
        assert position_ids is not None, "position_ids is required"
        hidden_states = self.model(input_ids, position_ids, inputs_embeds)
        logits = torch.ops.auto_deploy.torch_linear_simple(hidden_states, self.lm_head.weight, None)
        logits = torch.tanh(logits / self.final_logit_softcapping) * self.final_logit_softcapping
        return BeamCausalLMOutput(logits=logits.float())


AutoModelForCausalLMFactory.register_custom_model_cls("BeamConfig", BeamForCausalLM)
