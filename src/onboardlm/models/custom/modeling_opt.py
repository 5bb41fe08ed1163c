"""Lean, export-friendly OPT on canonical ``auto_deploy`` ops.

Mirrors ``transformers.models.opt.modeling_opt`` (OPTForCausalLM): pre-norm decoder layers with
LayerNorm, learned absolute position embeddings, grouped-query attention and a plain MLP. Module
names equal the checkpoint keys, so HuggingFace state dicts load with ``strict=True``.

Left out on purpose: KV cache, attention masks (attention is causal), dropout, gradient
checkpointing, attention-implementation switches, ``repeat_kv`` (the attention op handles GQA),
position-id generation (callers pass them), hidden-state/attention outputs and the loss.
Linear and reshape calls carry tensor-parallel sharding hints; they do not change the numbers.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import OPTConfig
from transformers.activations import ACT2FN
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import ModelOutput

import onboardlm.ops  # noqa: F401  (registers torch.ops.auto_deploy.*)
from onboardlm.models.factory import AutoModelForCausalLMFactory


@dataclass
class OPTCausalLMOutput(ModelOutput):
    logits: torch.FloatTensor | None = None


class OPTAttention(nn.Module):
    def __init__(self, config: OPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        bias = config.enable_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.out_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)

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


class OPTDecoderLayer(nn.Module):
    def __init__(self, config: OPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = OPTAttention(config, layer_idx)
        bias = config.enable_bias
        self.fc1 = nn.Linear(config.hidden_size, config.ffn_dim, bias=bias)
        self.fc2 = nn.Linear(config.ffn_dim, config.hidden_size, bias=bias)
        self.activation_fn = ACT2FN[config.activation_function]
        self.self_attn_layer_norm = nn.LayerNorm(config.hidden_size, eps=1e-05)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=1e-05)
        self.do_layer_norm_before = config.do_layer_norm_before

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not self.do_layer_norm_before:
            hidden_states = self.self_attn_layer_norm(hidden_states + self.self_attn(hidden_states))
            return self.final_layer_norm(hidden_states + self.feed_forward(hidden_states))
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


class OPTPreTrainedModel(PreTrainedModel):
    config_class = OPTConfig
    base_model_prefix = "model"
    _no_split_modules = ["OPTDecoderLayer"]


class OPTDecoder(OPTPreTrainedModel):
    def __init__(self, config: OPTConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.word_embed_proj_dim, config.pad_token_id)
        if config.word_embed_proj_dim != config.hidden_size:
            self.project_in = nn.Linear(config.word_embed_proj_dim, config.hidden_size, bias=False)
            self.project_out = nn.Linear(config.hidden_size, config.word_embed_proj_dim, bias=False)
        else:
            self.project_in = self.project_out = None
        self.embed_positions = nn.Embedding(config.max_position_embeddings + 2, config.hidden_size)
        self.layers = nn.ModuleList(OPTDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.final_layer_norm = (
            nn.LayerNorm(config.hidden_size, eps=1e-05) if config.do_layer_norm_before else None
        )
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
        if self.project_in is not None:
            inputs_embeds = torch.ops.auto_deploy.torch_linear_simple(
                inputs_embeds, self.project_in.weight, None
            )
        hidden_states = inputs_embeds + self.embed_positions(position_ids + 2)
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        if self.final_layer_norm is not None:
            hidden_states = self.final_layer_norm(hidden_states)
        if self.project_out is not None:
            hidden_states = torch.ops.auto_deploy.torch_linear_simple(
                hidden_states, self.project_out.weight, None
            )
        return hidden_states


class OPTModel(OPTPreTrainedModel):
    """Holds the decoder stack under ``decoder``, as transformers' OPTModel does."""

    def __init__(self, config: OPTConfig) -> None:
        super().__init__(config)
        self.decoder = OPTDecoder(config)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None,
        position_ids: torch.LongTensor,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        assert position_ids is not None, "position_ids is required"
        return self.decoder(input_ids, position_ids, inputs_embeds)


class OPTForCausalLM(OPTPreTrainedModel):
    _tied_weights_keys = {"lm_head.weight": "model.decoder.embed_tokens.weight"}

    def __init__(self, config: OPTConfig) -> None:
        super().__init__(config)
        self.model = OPTModel(config)
        self.lm_head = nn.Linear(config.word_embed_proj_dim, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None,
        position_ids: torch.LongTensor,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> OPTCausalLMOutput:
        assert position_ids is not None, "position_ids is required"
        hidden_states = self.model(input_ids, position_ids, inputs_embeds)
        logits = torch.ops.auto_deploy.torch_linear_simple(hidden_states, self.lm_head.weight, None)
        return OPTCausalLMOutput(logits=logits.float())


AutoModelForCausalLMFactory.register_custom_model_cls("OPTConfig", OPTForCausalLM)
