"""Lean, export-friendly FalconMamba on canonical ``auto_deploy`` ops.

Mirrors ``transformers.models.falcon_mamba.modeling_falcon_mamba`` (FalconMambaForCausalLM): a
hybrid stack of pre-norm layers with RMSNorm, built from Mamba1 selective-scan mixers. Layer kinds
in the analyzed config: mamba1 (2 of 2 layers); every layer is built as a mamba1 layer (re-onboard a
config with other kinds). Module names equal the checkpoint keys, so HuggingFace state dicts load
with ``strict=True``.

Left out on purpose: the KV cache and the mixers' conv and scan states (they run from a zero state
on ``torch_causal_conv1d`` / ``torch_ssm``; the runtime swaps in cached versions), attention masks
and padding masks (sequences are causal and unpadded), dropout, gradient checkpointing, fused-kernel
paths, position-id generation (callers pass them), hidden-state outputs and the loss.
Linear, split, view, conv, scan and gated-norm calls carry tensor-parallel sharding hints; they do
not change the numbers.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import FalconMambaConfig
from transformers.activations import ACT2FN
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import ModelOutput

import onboardlm.ops  # noqa: F401  (registers torch.ops.auto_deploy.*)
from onboardlm.models.factory import AutoModelForCausalLMFactory


@dataclass
class FalconMambaCausalLMOutput(ModelOutput):
    logits: torch.FloatTensor | None = None


class FalconMambaRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.ops.auto_deploy.torch_rmsnorm(hidden_states, self.weight, self.variance_epsilon)


class FalconMambaWeightlessRMSNorm(nn.Module):
    """RMSNorm without a learned weight (a unit buffer stands in for it)."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.register_buffer("_ad_unit_weight", torch.ones(hidden_size), persistent=False)
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.ops.auto_deploy.torch_rmsnorm(hidden_states, self._ad_unit_weight, self.variance_epsilon)


class FalconMambaMixer(nn.Module):
    """Mamba1 selective-scan mixer: in_proj -> causal depthwise conv on x -> x_proj (dt, B, C) -> dt_proj
    -> selective scan -> SiLU gate -> out_proj. The scan state is [channels, state] with its own decay
    per entry; it runs on ``torch_ssm`` as one head of width 1 per (state entry, channel) pair, state
    entry major, so head ``n * channels + c`` reads B/C group ``n`` (one state entry): B and C go in
    whole, and a rank holding some channels keeps every group. The skip ``D x`` is the scan's own, on
    state entry 0 of each channel, and the output sums a channel's heads. The conv and the scan run from
    a zero state here; the runtime's cache transform swaps in their cached versions."""

    chunk_size = 32  # SSD chunk length of the scan (exact for any length; bounds its memory)

    def __init__(self, config: FalconMambaConfig, layer_idx: int) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.ssm_state_size = config.state_size
        self.time_step_rank = config.time_step_rank
        self.conv_kernel_size = config.conv_kernel
        self.in_proj = nn.Linear(config.hidden_size, 2 * self.intermediate_size, bias=config.use_bias)
        self.conv1d = nn.Conv1d(
            self.intermediate_size,
            self.intermediate_size,
            kernel_size=self.conv_kernel_size,
            groups=self.intermediate_size,
            padding=self.conv_kernel_size - 1,
            bias=config.use_conv_bias,
        )
        self.act = ACT2FN[config.hidden_act]
        self.x_proj = nn.Linear(
            self.intermediate_size, self.time_step_rank + 2 * self.ssm_state_size, bias=False
        )
        self.dt_proj = nn.Linear(self.time_step_rank, self.intermediate_size, bias=True)
        self.dt_layernorm = FalconMambaWeightlessRMSNorm(self.time_step_rank, config.mixer_rms_eps)
        self.b_layernorm = FalconMambaWeightlessRMSNorm(self.ssm_state_size, config.mixer_rms_eps)
        self.c_layernorm = FalconMambaWeightlessRMSNorm(self.ssm_state_size, config.mixer_rms_eps)
        self.A_log = nn.Parameter(torch.zeros(self.intermediate_size, self.ssm_state_size))
        self.D = nn.Parameter(torch.ones(self.intermediate_size))
        self.out_proj = nn.Linear(self.intermediate_size, config.hidden_size, bias=config.use_bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        ops = torch.ops.auto_deploy
        batch, seq_len, _ = hidden_states.shape
        inner, state = self.intermediate_size, self.ssm_state_size
        projected = ops.torch_linear_simple(
            hidden_states,
            self.in_proj.weight,
            self.in_proj.bias,
            tp_mode="colwise",
            output_sizes=[inner, inner],
            layer_type="ssm",
        )
        x, gate = ops.split_with_sizes(
            projected, [inner, inner], dim=-1, enable_sharding=True, layer_type="ssm"
        )
        x = ops.torch_causal_conv1d(
            x,
            self.conv1d.weight,
            self.conv1d.bias,
            padding=self.conv_kernel_size - 1,
            groups=inner,
            shardable=True,
            layer_type="ssm",
        )
        x = self.act(x)
        ssm_parameters = ops.torch_linear_simple(
            x, self.x_proj.weight, None, tp_mode="rowwise", layer_type="ssm"
        )
        ssm_parameters = ops.all_reduce(ssm_parameters, layer_type="ssm")
        dt, B, C = torch.split(ssm_parameters, [self.time_step_rank, state, state], dim=-1)
        dt, B, C = self.dt_layernorm(dt), self.b_layernorm(B), self.c_layernorm(C)
        dt = ops.torch_linear_simple(dt, self.dt_proj.weight, None, tp_mode="colwise", layer_type="ssm")
        # heads [state entry, channel] flattened; x, dt and the per-channel parameters broadcast over
        # the state entries (-1 keeps the rank's own channel count)
        heads = [batch, seq_len, state * inner]
        y = ops.torch_ssm(
            ops.view(
                x[:, :, None, :].expand(-1, -1, state, -1), [*heads, 1], tp_scaled_dim=2, layer_type="ssm"
            ),
            -torch.exp(self.A_log.float()).t().flatten(),
            B[..., None],
            C[..., None],
            F.pad(self.D[None, :], (0, 0, 0, state - 1)).flatten(),
            ops.view(dt[:, :, None, :].expand(-1, -1, state, -1), heads, tp_scaled_dim=2, layer_type="ssm"),
            self.dt_proj.bias[None, :].expand(state, -1).flatten(),
            [0.0, float("inf")],
            self.chunk_size,
            shardable=True,
            layer_type="ssm",
        )
        y = ops.view(y, [batch, seq_len, state, inner], tp_scaled_dim=3, layer_type="ssm").sum(2)
        y = y * F.silu(gate.float())
        out = ops.torch_linear_simple(
            y.to(hidden_states.dtype),
            self.out_proj.weight,
            self.out_proj.bias,
            tp_mode="rowwise",
            layer_type="ssm",
        )
        return ops.all_reduce(out, layer_type="ssm")


class FalconMambaBlock(nn.Module):
    def __init__(self, config: FalconMambaConfig, layer_idx: int) -> None:
        super().__init__()
        self.norm = FalconMambaRMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.mixer = FalconMambaMixer(config, layer_idx)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.mixer(self.norm(hidden_states))
        return hidden_states


class FalconMambaPreTrainedModel(PreTrainedModel):
    config_class = FalconMambaConfig
    base_model_prefix = "backbone"
    _no_split_modules = ["FalconMambaBlock"]


class FalconMambaModel(FalconMambaPreTrainedModel):
    def __init__(self, config: FalconMambaConfig) -> None:
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(FalconMambaBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm_f = FalconMambaRMSNorm(config.hidden_size, config.layer_norm_epsilon)
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


class FalconMambaForCausalLM(FalconMambaPreTrainedModel):
    _tied_weights_keys = {"lm_head.weight": "backbone.embeddings.weight"}

    def __init__(self, config: FalconMambaConfig) -> None:
        super().__init__(config)
        self.backbone = FalconMambaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None,
        position_ids: torch.LongTensor,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> FalconMambaCausalLMOutput:
        assert position_ids is not None, "position_ids is required"
        hidden_states = self.backbone(input_ids, position_ids, inputs_embeds)
        logits = torch.ops.auto_deploy.torch_linear_simple(hidden_states, self.lm_head.weight, None)
        return FalconMambaCausalLMOutput(logits=logits.float())


AutoModelForCausalLMFactory.register_custom_model_cls("FalconMambaConfig", FalconMambaForCausalLM)
