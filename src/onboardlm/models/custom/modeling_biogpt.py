"""Lean, export-friendly BioGpt on canonical ``auto_deploy`` ops.

Mirrors ``transformers.models.biogpt.modeling_biogpt`` (BioGptForCausalLM): pre-norm decoder layers
with LayerNorm, learned absolute position embeddings, grouped-query attention and a plain MLP. Also:
embeddings scaled by (config.hidden_size**0.5 if config.scale_embedding else 1.0). Module names
equal the checkpoint keys, so HuggingFace state dicts load with ``strict=True``.

Left out on purpose: KV cache, attention masks (attention is causal), dropout, gradient
checkpointing, attention-implementation switches, ``repeat_kv`` (the attention op handles GQA),
position-id generation (callers pass them), hidden-state/attention outputs and the loss.
Linear and reshape calls carry tensor-parallel sharding hints; they do not change the numbers.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import BioGptConfig
from transformers.activations import ACT2FN
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import ModelOutput

import onboardlm.ops  # noqa: F401  (registers torch.ops.auto_deploy.*)
from onboardlm.models.factory import AutoModelForCausalLMFactory


@dataclass
class BioGptCausalLMOutput(ModelOutput):
    logits: torch.FloatTensor | None = None


class BioGptScaledWordEmbedding(nn.Embedding):
    """Token embedding multiplied by a constant scale."""

    def __init__(
        self, num_embeddings: int, embedding_dim: int, padding_idx: int | None, embed_scale: float
    ) -> None:
        super().__init__(num_embeddings, embedding_dim, padding_idx)
        self.embed_scale = embed_scale

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids) * self.embed_scale


class BioGptAttention(nn.Module):
    def __init__(self, config: BioGptConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.out_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=True)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
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
        attn = ops.torch_attention(q, k, v, is_causal=True, scale=self.scaling, layout="bsnd")

        attn = ops.view(
            attn, [batch, seq_len, self.num_heads * self.head_dim], tp_scaled_dim=2, layer_type="mha"
        )
        out = ops.torch_linear_simple(
            attn, self.out_proj.weight, self.out_proj.bias, tp_mode="rowwise", layer_type="mha"
        )
        return ops.all_reduce(out, layer_type="mha")


class BioGptDecoderLayer(nn.Module):
    def __init__(self, config: BioGptConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = BioGptAttention(config, layer_idx)
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=True)
        self.activation_fn = ACT2FN[config.hidden_act]
        self.self_attn_layer_norm = nn.LayerNorm(config.hidden_size, eps=1e-05)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=1e-05)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(self.self_attn_layer_norm(hidden_states))
        return hidden_states + self.feed_forward(self.final_layer_norm(hidden_states))

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The plain MLP whose linears sit on the layer itself, as in the checkpoint."""
        linear = torch.ops.auto_deploy.torch_linear_simple
        hidden = linear(x, self.fc1.weight, self.fc1.bias, tp_mode="colwise", layer_type="mlp")
        down = linear(
            self.activation_fn(hidden), self.fc2.weight, self.fc2.bias, tp_mode="rowwise", layer_type="mlp"
        )
        return torch.ops.auto_deploy.all_reduce(down, layer_type="mlp")


class BioGptPreTrainedModel(PreTrainedModel):
    config_class = BioGptConfig
    base_model_prefix = "biogpt"
    _no_split_modules = ["BioGptDecoderLayer"]


class BioGptModel(BioGptPreTrainedModel):
    def __init__(self, config: BioGptConfig) -> None:
        super().__init__(config)
        self.embed_tokens = BioGptScaledWordEmbedding(
            config.vocab_size,
            config.hidden_size,
            config.pad_token_id,
            (config.hidden_size**0.5 if config.scale_embedding else 1.0),
        )
        self.embed_positions = nn.Embedding(config.max_position_embeddings + 2, config.hidden_size)
        self.layers = nn.ModuleList(BioGptDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=1e-05)
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
        hidden_states = inputs_embeds + self.embed_positions(position_ids + 2)
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        return self.layer_norm(hidden_states)


class BioGptForCausalLM(BioGptPreTrainedModel):
    _tied_weights_keys = {"output_projection.weight": "biogpt.embed_tokens.weight"}

    def __init__(self, config: BioGptConfig) -> None:
        super().__init__(config)
        self.biogpt = BioGptModel(config)
        self.output_projection = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None,
        position_ids: torch.LongTensor,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> BioGptCausalLMOutput:
        assert position_ids is not None, "position_ids is required"
        hidden_states = self.biogpt(input_ids, position_ids, inputs_embeds)
        logits = torch.ops.auto_deploy.torch_linear_simple(hidden_states, self.output_projection.weight, None)
        return BioGptCausalLMOutput(logits=logits.float())


AutoModelForCausalLMFactory.register_custom_model_cls("BioGptConfig", BioGptForCausalLM)
