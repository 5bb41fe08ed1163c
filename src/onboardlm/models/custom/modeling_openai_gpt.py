"""Lean, export-friendly OpenAIGPT on canonical ``auto_deploy`` ops.

Mirrors ``transformers.models.openai.modeling_openai`` (OpenAIGPTLMHeadModel): post-LN decoder
layers (LayerNorm of each residual sum), learned absolute position embeddings, grouped-query
attention and a plain MLP. Also: checkpoint linears stored as transformers' Conv1D ([in, out]) are
transposed on load. Module names equal the checkpoint keys, so HuggingFace state dicts load with
``strict=True``.

Left out on purpose: KV cache, attention masks (attention is causal), dropout, gradient
checkpointing, attention-implementation switches, ``repeat_kv`` (the attention op handles GQA),
position-id generation (callers pass them), hidden-state/attention outputs and the loss.
Linear and reshape calls carry tensor-parallel sharding hints; they do not change the numbers.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import OpenAIGPTConfig
from transformers.activations import ACT2FN
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import ModelOutput

import onboardlm.ops  # noqa: F401  (registers torch.ops.auto_deploy.*)
from onboardlm.models.factory import AutoModelForCausalLMFactory


@dataclass
class OpenAIGPTCausalLMOutput(ModelOutput):
    logits: torch.FloatTensor | None = None


class MLP(nn.Module):
    def __init__(self, config: OpenAIGPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.hidden_size, 4 * config.hidden_size, bias=True)
        self.c_proj = nn.Linear(4 * config.hidden_size, config.hidden_size, bias=True)
        self._register_load_state_dict_pre_hook(self._transpose_conv1d_weights)
        self.act = ACT2FN["gelu_pytorch_tanh"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        linear = torch.ops.auto_deploy.torch_linear_simple
        hidden = linear(x, self.c_fc.weight, self.c_fc.bias, tp_mode="colwise", layer_type="mlp")
        down = linear(
            self.act(hidden), self.c_proj.weight, self.c_proj.bias, tp_mode="rowwise", layer_type="mlp"
        )
        return torch.ops.auto_deploy.all_reduce(down, layer_type="mlp")

    def _transpose_conv1d_weights(
        self, state_dict: dict[str, torch.Tensor], prefix: str, *args: object
    ) -> None:
        """Load hook: the checkpoint stores ``c_fc`` and ``c_proj`` as transformers' Conv1D,
        weight [in, out]; nn.Linear holds [out, in]."""
        for name in ("c_fc", "c_proj"):
            key = f"{prefix}{name}.weight"
            if key in state_dict:
                state_dict[key] = state_dict[key].t()


class Attention(nn.Module):
    def __init__(self, config: OpenAIGPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.c_attn = nn.Linear(
            config.hidden_size, (self.num_heads + 2 * self.num_kv_heads) * self.head_dim, bias=True
        )
        self.c_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=True)
        self._register_load_state_dict_pre_hook(self._transpose_conv1d_weights)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        ops = torch.ops.auto_deploy
        batch, seq_len = hidden_states.shape[:2]
        sizes = [
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
        ]
        qkv = ops.torch_linear_simple(
            hidden_states,
            self.c_attn.weight,
            self.c_attn.bias,
            tp_mode="colwise",
            output_sizes=sizes,
            tp_min_local_shape=self.head_dim,
            layer_type="mha",
        )
        q, k, v = ops.split_with_sizes(qkv, sizes, dim=-1, enable_sharding=True, layer_type="mha")
        q = ops.view(q, [batch, seq_len, self.num_heads, self.head_dim], tp_scaled_dim=2, layer_type="mha")
        k = ops.view(k, [batch, seq_len, self.num_kv_heads, self.head_dim], tp_scaled_dim=2, layer_type="mha")
        v = ops.view(v, [batch, seq_len, self.num_kv_heads, self.head_dim], tp_scaled_dim=2, layer_type="mha")
        attn = ops.torch_attention(q, k, v, is_causal=True, scale=self.scaling, layout="bsnd")

        attn = ops.view(
            attn, [batch, seq_len, self.num_heads * self.head_dim], tp_scaled_dim=2, layer_type="mha"
        )
        out = ops.torch_linear_simple(
            attn, self.c_proj.weight, self.c_proj.bias, tp_mode="rowwise", layer_type="mha"
        )
        return ops.all_reduce(out, layer_type="mha")

    def _transpose_conv1d_weights(
        self, state_dict: dict[str, torch.Tensor], prefix: str, *args: object
    ) -> None:
        """Load hook: the checkpoint stores ``c_attn`` and ``c_proj`` as transformers' Conv1D,
        weight [in, out]; nn.Linear holds [out, in]."""
        for name in ("c_attn", "c_proj"):
            key = f"{prefix}{name}.weight"
            if key in state_dict:
                state_dict[key] = state_dict[key].t()


class Block(nn.Module):
    def __init__(self, config: OpenAIGPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.ln_1(hidden_states + self.attn(hidden_states))
        return self.ln_2(hidden_states + self.mlp(hidden_states))


class OpenAIGPTPreTrainedModel(PreTrainedModel):
    config_class = OpenAIGPTConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["Block"]


class OpenAIGPTModel(OpenAIGPTPreTrainedModel):
    def __init__(self, config: OpenAIGPTConfig) -> None:
        super().__init__(config)
        self.tokens_embed = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.positions_embed = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.h = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
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
            inputs_embeds = self.tokens_embed(input_ids)
        hidden_states = inputs_embeds + self.positions_embed(position_ids)
        for layer in self.h:
            hidden_states = layer(hidden_states)
        return hidden_states


class OpenAIGPTLMHeadModel(OpenAIGPTPreTrainedModel):
    _tied_weights_keys = {"lm_head.weight": "transformer.tokens_embed.weight"}

    def __init__(self, config: OpenAIGPTConfig) -> None:
        super().__init__(config)
        self.transformer = OpenAIGPTModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None,
        position_ids: torch.LongTensor,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> OpenAIGPTCausalLMOutput:
        assert position_ids is not None, "position_ids is required"
        hidden_states = self.transformer(input_ids, position_ids, inputs_embeds)
        logits = torch.ops.auto_deploy.torch_linear_simple(hidden_states, self.lm_head.weight, None)
        return OpenAIGPTCausalLMOutput(logits=logits.float())


AutoModelForCausalLMFactory.register_custom_model_cls("OpenAIGPTConfig", OpenAIGPTLMHeadModel)
