"""Lean, export-friendly Mamba2 on canonical ``auto_deploy`` ops.

Mirrors ``transformers.models.mamba2.modeling_mamba2`` (Mamba2ForCausalLM): a hybrid stack of
pre-norm layers with RMSNorm, built from Mamba2 SSD mixers. Layer kinds in the analyzed config:
mamba2 (2 of 2 layers); every layer is built as a mamba2 layer (re-onboard a config with other
kinds). Module names equal the checkpoint keys, so HuggingFace state dicts load with
``strict=True``.

Left out on purpose: the KV cache and the SSM conv/scan states (the conv and the scan run from a
zero state on ``torch_causal_conv1d`` / ``torch_ssm``; the runtime swaps in cached versions),
attention masks and padding masks (sequences are causal and unpadded), dropout, gradient
checkpointing, fused-kernel paths, position-id generation (callers pass them), hidden-state outputs
and the loss.
Linear, split, view, conv, scan and gated-norm calls carry tensor-parallel sharding hints; they do
not change the numbers.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import Mamba2Config
from transformers.activations import ACT2FN
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import ModelOutput

import onboardlm.ops  # noqa: F401  (registers torch.ops.auto_deploy.*)
from onboardlm.models.factory import AutoModelForCausalLMFactory


@dataclass
class Mamba2CausalLMOutput(ModelOutput):
    logits: torch.FloatTensor | None = None


class Mamba2RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.ops.auto_deploy.torch_rmsnorm(hidden_states, self.weight, self.variance_epsilon)


class Mamba2RMSNormGated(nn.Module):
    """Grouped RMSNorm of the SSM output, gated by SiLU(gate) before the norm."""

    def __init__(self, hidden_size: int, group_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps
        self.group_size = group_size

    def forward(self, hidden_states: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return torch.ops.auto_deploy.torch_rmsnorm_gated(
            hidden_states,
            self.weight,
            gate,
            self.variance_epsilon,
            self.group_size,
            norm_before_gate=False,
            tp_mode="colwise",
            layer_type="ssm",
        )


class Mamba2Mixer(nn.Module):
    """Mamba2 (SSD) mixer: in_proj -> causal depthwise conv on x|B|C -> selective scan -> gated RMSNorm
    -> out_proj. The conv and the scan run from a zero state here; the runtime's cache transform swaps
    in their cached versions (conv and SSM state per sequence)."""

    def __init__(self, config: Mamba2Config, layer_idx: int) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.n_groups = config.n_groups
        self.ssm_state_size = config.state_size
        self.intermediate_size = int(config.expand * config.hidden_size)
        self.head_dim = self.intermediate_size // self.num_heads
        self.conv_kernel_size = config.conv_kernel
        self.conv_dim = self.intermediate_size + 2 * self.n_groups * self.ssm_state_size
        self.chunk_size = config.chunk_size
        self.time_step_limit = [float(value) for value in config.time_step_limit]
        self.in_proj = nn.Linear(
            config.hidden_size, self.intermediate_size + self.conv_dim + self.num_heads, bias=config.use_bias
        )
        self.conv1d = nn.Conv1d(
            self.conv_dim,
            self.conv_dim,
            kernel_size=self.conv_kernel_size,
            groups=self.conv_dim,
            padding=self.conv_kernel_size - 1,
            bias=config.use_conv_bias,
        )
        self.act = ACT2FN[config.hidden_act]
        self.dt_bias = nn.Parameter(torch.ones(self.num_heads))
        self.A_log = nn.Parameter(torch.zeros(self.num_heads))
        self.D = nn.Parameter(torch.ones(self.num_heads))
        self.norm = Mamba2RMSNormGated(
            self.intermediate_size, self.intermediate_size // self.n_groups, config.layer_norm_epsilon
        )
        self.out_proj = nn.Linear(self.intermediate_size, config.hidden_size, bias=config.use_bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        ops = torch.ops.auto_deploy
        batch, seq_len, _ = hidden_states.shape
        inner, group_state = self.intermediate_size, self.n_groups * self.ssm_state_size
        projected = ops.torch_linear_simple(
            hidden_states,
            self.in_proj.weight,
            self.in_proj.bias,
            tp_mode="colwise",
            output_sizes=[inner, inner, group_state, group_state, self.num_heads],
            layer_type="ssm",
        )
        gate, xbc, dt = ops.split_with_sizes(
            projected, [inner, self.conv_dim, self.num_heads], dim=-1, enable_sharding=True, layer_type="ssm"
        )
        xbc = ops.torch_causal_conv1d(
            xbc,
            self.conv1d.weight,
            self.conv1d.bias,
            padding=self.conv_kernel_size - 1,
            groups=self.conv_dim,
            shardable=True,
            output_sizes=[inner, group_state, group_state],
            layer_type="ssm",
        )
        xbc = self.act(xbc)
        x, B, C = ops.split_with_sizes(
            xbc, [inner, group_state, group_state], dim=-1, enable_sharding=True, layer_type="ssm"
        )
        x = ops.view(x, [batch, seq_len, self.num_heads, self.head_dim], tp_scaled_dim=2, layer_type="ssm")
        B = ops.view(
            B, [batch, seq_len, self.n_groups, self.ssm_state_size], tp_scaled_dim=2, layer_type="ssm"
        )
        C = ops.view(
            C, [batch, seq_len, self.n_groups, self.ssm_state_size], tp_scaled_dim=2, layer_type="ssm"
        )
        y = ops.torch_ssm(
            x,
            -torch.exp(self.A_log.float()),
            B,
            C,
            self.D,
            dt,
            self.dt_bias,
            self.time_step_limit,
            self.chunk_size,
            shardable=True,
            layer_type="ssm",
        )
        y = ops.view(y, [batch, seq_len, inner], tp_scaled_dim=2, layer_type="ssm")
        y = self.norm(y, gate)
        out = ops.torch_linear_simple(
            y.to(hidden_states.dtype),
            self.out_proj.weight,
            self.out_proj.bias,
            tp_mode="rowwise",
            layer_type="ssm",
        )
        return ops.all_reduce(out, layer_type="ssm")


class Mamba2Block(nn.Module):
    def __init__(self, config: Mamba2Config, layer_idx: int) -> None:
        super().__init__()
        self.norm = Mamba2RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.mixer = Mamba2Mixer(config, layer_idx)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.mixer(self.norm(hidden_states))
        return hidden_states


class Mamba2PreTrainedModel(PreTrainedModel):
    config_class = Mamba2Config
    base_model_prefix = "backbone"
    _no_split_modules = ["Mamba2Block"]


class Mamba2Model(Mamba2PreTrainedModel):
    def __init__(self, config: Mamba2Config) -> None:
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(Mamba2Block(config, i) for i in range(config.num_hidden_layers))
        self.norm_f = Mamba2RMSNorm(config.hidden_size, config.layer_norm_epsilon)
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
            inputs_embeds = self.embeddings(input_ids)
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        return self.norm_f(hidden_states)


class Mamba2ForCausalLM(Mamba2PreTrainedModel):
    _tied_weights_keys = {"lm_head.weight": "backbone.embeddings.weight"}

    def __init__(self, config: Mamba2Config) -> None:
        super().__init__(config)
        self.backbone = Mamba2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None,
        position_ids: torch.LongTensor,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> Mamba2CausalLMOutput:
        assert position_ids is not None, "position_ids is required"
        hidden_states = self.backbone(input_ids, position_ids, inputs_embeds)
        logits = torch.ops.auto_deploy.torch_linear_simple(hidden_states, self.lm_head.weight, None)
        return Mamba2CausalLMOutput(logits=logits.float())


AutoModelForCausalLMFactory.register_custom_model_cls("Mamba2Config", Mamba2ForCausalLM)
