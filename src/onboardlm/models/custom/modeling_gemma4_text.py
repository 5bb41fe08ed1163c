"""Lean, export-friendly Gemma4 on canonical ``auto_deploy`` ops.

Mirrors ``transformers.models.gemma4.modeling_gemma4`` (Gemma4ForCausalLM): decoder layers with
RMSNorm before and after attention and MLP, rotary position embeddings (default, linear, llama3,
yarn, proportional), grouped-query attention with q/k norm and a gated MLP. Also: value heads
normalised by a weightless RMSNorm (v_norm); sliding-window attention on sliding_attention layers;
decoder layers of different widths: head_dim read per layer from config.per_layer_config; layer
output scaled by its own layer_scalar; embeddings scaled by config.hidden_size**0.5; per-layer
inputs: each decoder layer mixes in config.hidden_size_per_layer_input channels of its own per token
(embed_tokens_per_layer rows plus the normalised per_layer_model_projection of the input embeddings)
after attention and MLP; 0 builds none; not for configs with config.num_kv_shared_layers>0 (KV
sharing) (measured: other modules). Module names equal the checkpoint keys, so HuggingFace state
dicts load with ``strict=True``.

Left out on purpose: KV cache, attention masks (attention is causal), dropout, gradient
checkpointing, attention-implementation switches, ``repeat_kv`` (the attention op handles GQA),
position-id generation (callers pass them), hidden-state/attention outputs and the loss.
Linear and reshape calls carry tensor-parallel sharding hints; they do not change the numbers.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import Gemma4TextConfig
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import ModelOutput

import onboardlm.ops  # noqa: F401  (registers torch.ops.auto_deploy.*)
from onboardlm.models.factory import AutoModelForCausalLMFactory


def _rope_inverse_frequencies(config: Gemma4TextConfig, layer_type: str) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and cos/sin scaling for the layer type's rope_type (static types only)."""
    config = config.per_layer_config[layer_type]  # the layer type's own head_dim (per_layer_config)
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
class Gemma4CausalLMOutput(ModelOutput):
    logits: torch.FloatTensor | None = None


class Gemma4RMSNorm(nn.Module):
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


class Gemma4TextScaledWordEmbedding(nn.Embedding):
    """Token embedding multiplied by a constant scale."""

    def __init__(
        self, num_embeddings: int, embedding_dim: int, padding_idx: int | None, embed_scale: float
    ) -> None:
        super().__init__(num_embeddings, embedding_dim, padding_idx)
        self.embed_scale = embed_scale

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids) * self.embed_scale


class Gemma4TextRotaryEmbedding(nn.Module):
    """cos/sin per layer type (each with its own RoPE parameters), in fp32, once per forward."""

    def __init__(self, config: Gemma4TextConfig) -> None:
        super().__init__()
        self.layer_types = sorted(set(config.layer_types))
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


class Gemma4TextMLP(nn.Module):
    def __init__(self, config: Gemma4TextConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_activation]

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


class Gemma4TextAttention(nn.Module):
    def __init__(self, config: Gemma4TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        layer_config = config.per_layer_config[layer_idx]  # per layer: head_dim
        self.num_heads = layer_config.num_attention_heads
        self.num_kv_heads = layer_config.num_key_value_heads
        self.head_dim = (
            getattr(layer_config, "head_dim", None)
            or layer_config.hidden_size // layer_config.num_attention_heads
        )
        self.scaling = 1.0
        self.sliding_window = (
            config.sliding_window if config.layer_types[layer_idx] == "sliding_attention" else None
        )
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        self.q_norm = Gemma4RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = Gemma4RMSNorm(self.head_dim, config.rms_norm_eps)
        # v_norm: a weightless RMSNorm of each value head
        self.register_buffer("_ad_v_norm_weight", torch.ones(self.head_dim), persistent=False)
        self.v_norm_eps = config.rms_norm_eps

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
        v = ops.torch_rmsnorm(v, self._ad_v_norm_weight, self.v_norm_eps)
        q = self.q_norm(q)
        k = self.k_norm(k)

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


class Gemma4TextDecoderLayer(nn.Module):
    def __init__(self, config: Gemma4TextConfig, layer_idx: int) -> None:
        super().__init__()
        if config.num_kv_shared_layers:
            raise NotImplementedError(
                "config.num_kv_shared_layers>0 (KV sharing) is not reproduced by this file"
            )
        self.self_attn = Gemma4TextAttention(config, layer_idx)
        self.mlp = Gemma4TextMLP(config)
        self.input_layernorm = Gemma4RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = Gemma4RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.pre_feedforward_layernorm = Gemma4RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_feedforward_layernorm = Gemma4RMSNorm(config.hidden_size, config.rms_norm_eps)
        # per-layer inputs (0: none)
        if config.hidden_size_per_layer_input:
            self.act_fn = ACT2FN[config.hidden_activation]
            self.per_layer_input_gate = nn.Linear(
                config.hidden_size, config.hidden_size_per_layer_input, bias=False
            )
            self.per_layer_projection = nn.Linear(
                config.hidden_size_per_layer_input, config.hidden_size, bias=False
            )
            self.post_per_layer_input_norm = Gemma4RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.register_buffer("layer_scalar", torch.ones([1]))  # a checkpoint buffer

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        per_layer_input: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden_states = hidden_states + self.post_attention_layernorm(
            self.self_attn(self.input_layernorm(hidden_states), position_embeddings)
        )
        hidden_states = hidden_states + self.post_feedforward_layernorm(
            self.mlp(self.pre_feedforward_layernorm(hidden_states))
        )
        if per_layer_input is not None:
            hidden_states = hidden_states + self.mix_per_layer_input(hidden_states, per_layer_input)
        return hidden_states * self.layer_scalar

    def mix_per_layer_input(self, hidden_states: torch.Tensor, per_layer_input: torch.Tensor) -> torch.Tensor:
        """The layer's per-layer input, gated by the hidden states and projected back to their width."""
        linear = torch.ops.auto_deploy.torch_linear_simple
        gate = self.act_fn(linear(hidden_states, self.per_layer_input_gate.weight, None))
        return self.post_per_layer_input_norm(
            linear(gate * per_layer_input, self.per_layer_projection.weight, None)
        )


class Gemma4PreTrainedModel(PreTrainedModel):
    config_class = Gemma4TextConfig
    base_model_prefix = "model"
    _no_split_modules = ["Gemma4TextDecoderLayer"]


class Gemma4TextModel(Gemma4PreTrainedModel):
    def __init__(self, config: Gemma4TextConfig) -> None:
        super().__init__(config)
        self.embed_tokens = Gemma4TextScaledWordEmbedding(
            config.vocab_size, config.hidden_size, config.pad_token_id, config.hidden_size**0.5
        )
        self.layers = nn.ModuleList(
            Gemma4TextDecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = Gemma4RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = Gemma4TextRotaryEmbedding(config)
        # per-layer inputs: each layer's own embedding of every token (0: none)
        if config.hidden_size_per_layer_input:
            self.embed_tokens_per_layer = Gemma4TextScaledWordEmbedding(
                config.vocab_size_per_layer_input,
                config.num_hidden_layers * config.hidden_size_per_layer_input,
                config.pad_token_id,
                config.hidden_size_per_layer_input**0.5,
            )
            self.per_layer_model_projection = nn.Linear(
                config.hidden_size, config.num_hidden_layers * config.hidden_size_per_layer_input, bias=False
            )
            self.per_layer_projection_norm = Gemma4RMSNorm(
                config.hidden_size_per_layer_input, config.rms_norm_eps
            )
            self._register_load_state_dict_pre_hook(self._keep_own_layers_columns)
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
        per_layer_inputs = (
            self.per_layer_inputs(input_ids, inputs_embeds)
            if self.config.hidden_size_per_layer_input
            else None
        )
        for index, (layer, layer_type) in enumerate(zip(self.layers, self.config.layer_types, strict=True)):
            per_layer_input = None if per_layer_inputs is None else per_layer_inputs[:, :, index]
            hidden_states = layer(hidden_states, position_embeddings[layer_type], per_layer_input)
        return self.norm(hidden_states)

    def per_layer_inputs(
        self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor
    ) -> torch.Tensor:
        """Every layer's own input per token, ``[B, S, num_hidden_layers, config.hidden_size_per_layer_input]``:
        its columns of the per-layer embedding table plus its slice of the normalised projection of
        the input embeddings."""
        if input_ids is None:
            raise ValueError("per-layer inputs embed the token ids: pass input_ids")
        config = self.config
        shape = (*inputs_embeds.shape[:-1], config.num_hidden_layers, config.hidden_size_per_layer_input)
        tokens = self.embed_tokens_per_layer(input_ids).reshape(shape)
        projected = torch.ops.auto_deploy.torch_linear_simple(
            inputs_embeds, self.per_layer_model_projection.weight, None
        )
        projected = self.per_layer_projection_norm((projected * config.hidden_size**-0.5).reshape(shape))
        return (projected + tokens) * 2**-0.5

    def _keep_own_layers_columns(
        self, state_dict: dict[str, torch.Tensor], prefix: str, *args: object
    ) -> None:
        """Load hook: of a checkpoint with more layers than this model (a run with fewer
        num_hidden_layers), the first layers' columns of the per-layer table and projection."""
        columns = self.config.num_hidden_layers * self.config.hidden_size_per_layer_input
        for name, dim in (("embed_tokens_per_layer", 1), ("per_layer_model_projection", 0)):
            key = f"{prefix}{name}.weight"
            if key in state_dict and state_dict[key].shape[dim] > columns:
                state_dict[key] = state_dict[key].narrow(dim, 0, columns)


class Gemma4ForCausalLM(Gemma4PreTrainedModel):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: Gemma4TextConfig) -> None:
        super().__init__(config)
        self.model = Gemma4TextModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None,
        position_ids: torch.LongTensor,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> Gemma4CausalLMOutput:
        assert position_ids is not None, "position_ids is required"
        hidden_states = self.model(input_ids, position_ids, inputs_embeds)
        logits = torch.ops.auto_deploy.torch_linear_simple(hidden_states, self.lm_head.weight, None)
        return Gemma4CausalLMOutput(logits=logits.float())


AutoModelForCausalLMFactory.register_custom_model_cls("Gemma4TextConfig", Gemma4ForCausalLM)
