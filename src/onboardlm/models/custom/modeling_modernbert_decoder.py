"""Lean, export-friendly ModernBertDecoder on canonical ``auto_deploy`` ops.

Mirrors ``transformers.models.modernbert_decoder.modeling_modernbert_decoder``
(ModernBertDecoderForCausalLM): pre-norm decoder layers with LayerNorm, rotary position embeddings
(default, linear, llama3, yarn, proportional), grouped-query attention and a gated MLP with a fused
gate/up projection. Also: sliding-window attention on sliding_attention layers; a prediction head
(dense, act, norm) before the output projection; attn_norm only where layer_idx != 0 (nn.Identity
elsewhere). Module names equal the checkpoint keys, so HuggingFace state dicts load with
``strict=True``.

Left out on purpose: KV cache, attention masks (attention is causal), dropout, gradient
checkpointing, attention-implementation switches, ``repeat_kv`` (the attention op handles GQA),
position-id generation (callers pass them), hidden-state/attention outputs and the loss.
Linear and reshape calls carry tensor-parallel sharding hints; they do not change the numbers.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import ModernBertDecoderConfig
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import ModelOutput

import onboardlm.ops  # noqa: F401  (registers torch.ops.auto_deploy.*)
from onboardlm.models.factory import AutoModelForCausalLMFactory


def _rope_inverse_frequencies(config: ModernBertDecoderConfig, layer_type: str) -> tuple[torch.Tensor, float]:
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
class ModernBertDecoderCausalLMOutput(ModelOutput):
    logits: torch.FloatTensor | None = None


class ModernBertDecoderRotaryEmbedding(nn.Module):
    """cos/sin per layer type (each with its own RoPE parameters), in fp32, once per forward."""

    def __init__(self, config: ModernBertDecoderConfig) -> None:
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


class ModernBertDecoderMLP(nn.Module):
    def __init__(self, config: ModernBertDecoderConfig) -> None:
        super().__init__()
        bias = config.mlp_bias
        self.intermediate_size = config.intermediate_size
        self.Wi = nn.Linear(config.hidden_size, 2 * self.intermediate_size, bias=bias)
        self.Wo = nn.Linear(self.intermediate_size, config.hidden_size, bias=bias)
        self.act = ACT2FN[config.hidden_activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        linear = torch.ops.auto_deploy.torch_linear_simple
        gate_up = linear(
            x,
            self.Wi.weight,
            self.Wi.bias,
            tp_mode="colwise",
            output_sizes=[self.intermediate_size, self.intermediate_size],
            layer_type="mlp",
        )
        gate, up = torch.ops.auto_deploy.split_with_sizes(
            gate_up,
            [self.intermediate_size, self.intermediate_size],
            dim=-1,
            enable_sharding=True,
            layer_type="mlp",
        )
        down = linear(self.act(gate) * up, self.Wo.weight, self.Wo.bias, tp_mode="rowwise", layer_type="mlp")
        return torch.ops.auto_deploy.all_reduce(down, layer_type="mlp")


class ModernBertDecoderAttention(nn.Module):
    def __init__(self, config: ModernBertDecoderConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.sliding_window = (
            config.sliding_window if config.layer_types[layer_idx] == "sliding_attention" else None
        )
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.Wo = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)

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

        cos, sin = position_embeddings
        q, k = ops.torch_rope_with_explicit_cos_sin(q, k, cos, sin, 2)
        attn = ops.torch_attention(
            q, k, v, is_causal=True, scale=self.scaling, sliding_window=self.sliding_window, layout="bsnd"
        )

        attn = ops.view(
            attn, [batch, seq_len, self.num_heads * self.head_dim], tp_scaled_dim=2, layer_type="mha"
        )
        out = ops.torch_linear_simple(attn, self.Wo.weight, self.Wo.bias, tp_mode="rowwise", layer_type="mha")
        return ops.all_reduce(out, layer_type="mha")


class ModernBertDecoderLayer(nn.Module):
    def __init__(self, config: ModernBertDecoderConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn = ModernBertDecoderAttention(config, layer_idx)
        self.mlp = ModernBertDecoderMLP(config)
        self.attn_norm = (
            nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=False)
            if layer_idx != 0
            else nn.Identity()
        )
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=False)

    def forward(
        self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        hidden_states = hidden_states + self.attn(self.attn_norm(hidden_states), position_embeddings)
        return hidden_states + self.mlp(self.mlp_norm(hidden_states))


class ModernBertDecoderEmbeddings(nn.Module):
    """Holds the token embedding and its norm, as transformers' ModernBertDecoderEmbeddings does (the model calls them)."""

    def __init__(self, config: ModernBertDecoderConfig) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=False)


class ModernBertDecoderPreTrainedModel(PreTrainedModel):
    config_class = ModernBertDecoderConfig
    base_model_prefix = "model"
    _no_split_modules = ["ModernBertDecoderLayer"]


class ModernBertDecoderModel(ModernBertDecoderPreTrainedModel):
    def __init__(self, config: ModernBertDecoderConfig) -> None:
        super().__init__(config)
        self.embeddings = ModernBertDecoderEmbeddings(config)
        self.layers = nn.ModuleList(
            ModernBertDecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=False)
        self.rotary_emb = ModernBertDecoderRotaryEmbedding(config)
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
            inputs_embeds = self.embeddings.tok_embeddings(input_ids)
        position_embeddings = {
            layer_type: self.rotary_emb(inputs_embeds, position_ids, layer_type)
            for layer_type in self.rotary_emb.layer_types
        }
        hidden_states = self.embeddings.norm(inputs_embeds)
        for layer, layer_type in zip(self.layers, self.config.layer_types, strict=True):
            hidden_states = layer(hidden_states, position_embeddings[layer_type])
        return self.final_norm(hidden_states)


class ModernBertDecoderPredictionHead(nn.Module):
    """The final hidden state's transform before the output projection: norm(act(dense(h)))."""

    def __init__(self, config: ModernBertDecoderConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=config.classifier_bias)
        self.act = ACT2FN[config.classifier_activation]
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = torch.ops.auto_deploy.torch_linear_simple(
            hidden_states, self.dense.weight, self.dense.bias
        )
        return self.norm(self.act(hidden_states))


class ModernBertDecoderForCausalLM(ModernBertDecoderPreTrainedModel):
    _tied_weights_keys = {"decoder.weight": "model.embeddings.tok_embeddings.weight"}

    def __init__(self, config: ModernBertDecoderConfig) -> None:
        super().__init__(config)
        self.model = ModernBertDecoderModel(config)
        self.lm_head = ModernBertDecoderPredictionHead(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=config.decoder_bias)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None,
        position_ids: torch.LongTensor,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> ModernBertDecoderCausalLMOutput:
        assert position_ids is not None, "position_ids is required"
        hidden_states = self.model(input_ids, position_ids, inputs_embeds)
        hidden_states = self.lm_head(hidden_states)
        logits = torch.ops.auto_deploy.torch_linear_simple(
            hidden_states, self.decoder.weight, self.decoder.bias
        )
        return ModernBertDecoderCausalLMOutput(logits=logits.float())


AutoModelForCausalLMFactory.register_custom_model_cls("ModernBertDecoderConfig", ModernBertDecoderForCausalLM)
