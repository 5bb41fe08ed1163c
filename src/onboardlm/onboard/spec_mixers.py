"""Specs of the token mixers that are not attention: gated delta rule (linear attention), short
causal convolution and Griffin's RG-LRU block, measured by :mod:`onboardlm.onboard.analyze_mixers`.

Like the other block specs, code-valued fields are Python expressions over ``config`` that the emitted
file evaluates, so one generated file serves every config of the architecture.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

#: Roles of the parts a gated-delta in-projection produces: query, key, value, output gate (z),
#: write strength (b, through a sigmoid) and decay input (a, through a softplus).
DeltaPart = Literal["q", "k", "v", "z", "b", "a"]
#: Roles of the three chunks of a short-convolution in-projection: the gate multiplied in before the
#: convolution, the gate multiplied in after it, and the convolved value.
ConvPart = Literal["pre_gate", "post_gate", "value"]


@dataclass(frozen=True)
class DeltaProjectionSpec:
    """One input projection of a gated-delta mixer: checkpoint name, bias expression, the parts its
    output holds in order, and whether they repeat once per key head (``[Hk, q | k | v | z]``,
    Qwen3-Next's ``in_proj_qkvz``) or lie flat one after the other (``[q | k | v]``)."""

    name: str
    bias: str
    parts: tuple[DeltaPart, ...]
    per_key_head: bool = False


@dataclass(frozen=True)
class GatedDeltaSpec:
    """Gated DeltaNet (Qwen3-Next, Qwen3.5): in-projections, a depthwise causal conv over ``[q|k|v]``
    with an activation, the gated delta rule (``torch_gated_delta_rule``), a per-head gated RMSNorm
    by ``z`` and an output projection."""

    class_name: str
    attr: str  # attribute on the decoder layer, e.g. "linear_attn"
    projections: tuple[DeltaProjectionSpec, ...]
    conv: str  # checkpoint name of the depthwise Conv1d, e.g. "conv1d"
    conv_bias: str
    conv_activation: str | None  # config expression of the activation after the conv, None: none
    out: str
    out_bias: str
    A_log: str  # checkpoint names of the per-value-head decay and time-step bias parameters
    dt_bias: str
    norm: str  # attribute of the gated norm
    norm_class: str
    norm_eps: str
    norm_before_gate: bool  # norm(x) * weight * silu(z), else norm(x * silu(z)) * weight
    num_v_heads: str
    num_k_heads: str
    head_k_dim: str
    head_v_dim: str
    kernel_size: str
    hidden_size: str = "config.hidden_size"
    #: expression of the factor on the write strength ``sigmoid(b)`` ("": 1). OLMo Hybrid's
    #: ``linear_allow_neg_eigval`` doubles it (eigenvalues of the state transition down to -1); the
    #: file then runs torch_channel_gated_delta_rule, which takes the decay and write strength as given
    write_scale: str = ""
    note: str = "gated delta rule (linear attention) with a short causal conv"
    kind: str = "gated_delta"  # the block kind hybrid stacks key their block specs by


@dataclass(frozen=True)
class ShortConvSpec:
    """Gated short convolution (LFM2): ``out(post_gate * conv(pre_gate * value))`` with one fused
    in-projection split in three and a depthwise causal conv (``torch_causal_conv1d``)."""

    class_name: str
    attr: str  # attribute on the decoder layer, e.g. "conv"
    in_proj: str
    in_bias: str
    parts: tuple[ConvPart, ...]  # order of the in-projection's three chunks
    conv: str
    conv_bias: str
    conv_activation: str | None
    out: str
    out_bias: str
    kernel_size: str
    width: str = "config.hidden_size"  # channels of the conv (= each chunk's width)
    hidden_size: str = "config.hidden_size"
    note: str = "gated short causal convolution"
    kind: str = "short_conv"


@dataclass(frozen=True)
class LinearSpec:
    """One ``nn.Linear`` of a chain: checkpoint name (relative to its owner), bias expression, and its
    input and output widths as expressions over ``config`` / the block's sizes."""

    name: str
    bias: str
    in_width: str
    out_width: str


@dataclass(frozen=True)
class ChannelDeltaSpec:
    """Kimi Delta Attention: q / k / v projections through one depthwise causal conv (with an
    activation), a forget-gate child giving one log decay per key channel (a linear chain, low-rank or
    one map, plus ``dt_bias`` and a per-head rate ``exp(A_log)``), a write strength ``sigmoid(b)``, the
    per-channel gated delta rule (``torch_channel_gated_delta_rule``), a per-head RMSNorm gated by an
    output-gate chain, and the output projection."""

    class_name: str
    attr: str
    children: tuple[str, ...]  # the mixer's children and parameters in registration order
    q: LinearSpec
    k: LinearSpec
    v: LinearSpec
    conv: str
    conv_bias: str
    conv_activation: str | None
    gate_attr: str  # the forget-gate child, e.g. "forget_gate"
    gate_class: str
    gate_children: tuple[str, ...]  # the forget gate's children and parameters in registration order
    gate_chain: tuple[LinearSpec, ...]  # hidden -> [rank ->] key channels
    A_log: str  # per-head decay rate exp(A_log), its shape's expressions
    A_log_shape: tuple[str, ...]
    dt_bias: str  # per-key-channel bias, flat [heads * head_k_dim]
    #: the decay: "softplus" ``-exp(A_log) * softplus(f + dt_bias)``; "bounded" also keeps
    #: ``lower_bound * sigmoid(exp(A_log) * (f + dt_bias))`` when ``bound_flag`` is set
    bound_flag: str | None
    lower_bound: str | None
    decay_in_input_dtype: bool  # the forget gate casts its output to the hidden states' dtype
    beta: LinearSpec
    out_gate: tuple[LinearSpec, ...]  # hidden -> [rank ->] value channels
    norm: str
    norm_class: str
    norm_eps: str
    norm_gate_act: str  # "sigmoid" or "silu": norm(x) * weight * act(gate)
    out: LinearSpec
    num_heads: str
    head_k_dim: str
    head_v_dim: str
    kernel_size: str
    hidden_size: str = "config.hidden_size"
    note: str = "gated delta rule with a per-channel decay (Kimi Delta Attention) and a short causal conv"
    kind: str = "kda"


@dataclass(frozen=True)
class RgLruSpec:
    """Griffin's recurrent block (RecurrentGemma): ``out(act(y(h)) * rg_lru(conv(x(h))))`` with a depthwise
    causal conv (``torch_causal_conv1d``) and the RG-LRU (``torch_rg_lru``) in a child holding its
    block-diagonal gates and recurrence parameter."""

    class_name: str
    attr: str  # attribute on the decoder layer, e.g. "temporal_block"
    gate: LinearSpec  # the branch through the activation (GeLU in RecurrentGemma)
    value: LinearSpec  # the branch through the conv and the recurrence
    activation: str  # config expression of the gate branch's activation
    conv: str
    conv_bias: str
    out: LinearSpec
    lru_attr: str  # the child holding the RG-LRU parameters, e.g. "rg_lru"
    lru_class: str
    recurrent_param: str
    input_gate_weight: str
    input_gate_bias: str
    recurrent_gate_weight: str
    recurrent_gate_bias: str
    lru_children: tuple[str, ...]  # the RG-LRU child's parameters in registration order
    width: str  # channels of the recurrence
    heads: str  # gate blocks
    kernel_size: str
    gate_scale: str = "8.0"
    hidden_size: str = "config.hidden_size"
    note: str = "Griffin's RG-LRU recurrent block with a short causal conv"
    kind: str = "rg_lru"


MixerSpec = GatedDeltaSpec | ShortConvSpec | ChannelDeltaSpec | RgLruSpec
