"""ArchitectureSpec: what the analyzer measured about a transformers causal LM, one spec per block.

The generator reads only this spec, never the transformers model. Each block slot holds the spec of
one block kind; a new kind (a MoE feed-forward, an MLA attention) is a new spec class that joins the
slot's union type and gets its own emitter in ``generate.py``. Code-valued fields (``bias``,
``scaling``, ``eps``...) are Python expressions over ``config`` (or ``self``) that the emitted file
evaluates, so one generated file serves every config of the architecture.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from onboardlm.onboard.spec_hybrid import HybridSpec
from onboardlm.onboard.spec_moe import MLASpec, MoESpec
from onboardlm.onboard.spec_perlayer import PerLayerInputSpec

NormKind = Literal["rms", "layer"]
SlidingMode = Literal["none", "all", "layer_types"]
RopeStyle = Literal["neox", "interleaved", "half"]  # half: each frequency once (GPT-OSS tables)
MLPKind = Literal["gated", "fused_gated", "plain"]
#: differential attention's lambda_init per layer (Differential Transformer, eq. 2), an expression over
#: ``layer_idx`` the lean file evaluates; the attention probe confirms it on every layer of the tiny model
DIFFERENTIAL_LAMBDA_INIT = "0.8 - 0.6 * math.exp(-0.3 * layer_idx)"


@dataclass(frozen=True)
class NormSpec:
    """A normalisation module: RMSNorm or mean-centred LayerNorm, with ``(offset + weight)`` scaling."""

    class_name: str  # HF class name, "LayerNorm" for torch's own nn.LayerNorm
    kind: NormKind
    offset: float  # 1.0 when the weight is applied as (1 + weight)
    bias: bool
    eps: str  # config expression, e.g. "config.rms_norm_eps", or a literal the module hard-codes
    builtin: bool = False  # torch.nn.LayerNorm used as is
    head_weights: bool = False  # weight of shape [heads, head_dim]: one row per head (Cohere q/k norm)
    weight: bool = True  # False: no learned weight (OLMo, NanoChat)
    #: the weight multiplies the fp32 normalised value before the cast back (Gemma 4), not the value
    #: already cast to the input dtype (Llama); measured in bf16 (offset norms always scale in fp32)
    fp32_weight: bool = False


@dataclass(frozen=True)
class LinearSpec:
    """A linear layer by its checkpoint name; ``bias`` is a config expression or a literal."""

    name: str
    bias: str
    transposed: bool = False  # stored as transformers' Conv1D, weight [in, out]: transposed on load


@dataclass(frozen=True)
class RopeSpec:
    """The rotary module at model level and how attention applies its (cos, sin)."""

    class_name: str
    attr: str  # attribute on the inner model, e.g. "rotary_emb"
    style: RopeStyle  # how attention rotates q/k: NeoX halves or interleaved channel pairs
    table_layout: RopeStyle  # how the rotary module lays out its cos/sin tables
    rope_types: tuple[str, ...]
    partial: bool  # rotary dim < head dim: only the leading channels rotate
    per_layer_type: bool  # one table per config.layer_types value (forward takes layer_type)
    sin_first: bool = False  # the module returns (sin, cos), as GPT-J's does
    fixed_base: float | None = None  # no rope_parameters: a base the architecture hard-codes
    dim: str | None = None  # with fixed_base: expression of the rotary dim, e.g. "config.rotary_dim"
    complex_table: bool = (
        False  # transformers' module returns one complex freqs_cis table; the lean one cos/sin
    )
    base_field: str | None = None
    nope_layer_types: tuple[
        str, ...
    ] = ()  # per layer type: the types whose table is None (no RoPE)  # a RoPE base per layer from this config list, 0 for none (Granite-SWA)
    #: per layer type: the inverse frequencies come from the layer type's own config
    #: (``config.per_layer_config[layer_type]``: its head_dim), where per_layer_config overrides head_dim
    layer_type_config: bool = False


@dataclass(frozen=True)
class AttentionSpec:
    """Multi-head attention with MHA / GQA / MQA key-value heads on ``torch_attention``."""

    class_name: str
    attr: str  # attribute on the decoder layer, e.g. "self_attn"
    kind: Literal["mha", "gqa", "mqa"]
    projections: tuple[LinearSpec, ...]  # q, k, v (or one fused qkv)
    out: LinearSpec
    fused_qkv: bool
    scaling: str  # expression for the softmax scale
    qk_norm: NormSpec | None = None
    qk_norm_names: tuple[str, str] = ("q_norm", "k_norm")
    qk_norm_per_head: bool = True  # False: over the whole q / k projection (OLMo2)
    qk_norm_flag: str | None = None  # config expression without which there are no q/k norms
    qk_norm_after_rope: bool = False  # per-head q/k norms on the rotated q/k (HunYuan), else before RoPE
    sliding: SlidingMode = "none"
    #: without a sliding_window field: the measured window's config expression per layer (GPT-Neo:
    #: 'config.window_size if config.attention_layers[layer_idx] == "local" else None')
    sliding_expr: str | None = None
    #: chunked local attention (Llama 4): the chunk size's config expression per layer, None on layers
    #: attending to every earlier token ('config.attention_chunk_size if config.layer_types[layer_idx]
    #: == "chunked_attention" else None'); keys of the query's own chunk of positions only
    chunk_expr: str | None = None
    #: the layer's attention only wraps the module with the projections (GPT-Neo's attn.attention):
    #: its attribute there and the wrapper's class name; ``class_name`` is the inner module's
    inner_attr: str | None = None
    wrapper_class: str | None = None
    softcap: str | None = None  # expression for the attention logit soft-cap
    rope_flag: str | None = None  # config expression saying whether layer ``layer_idx`` uses RoPE
    num_heads: int = 0  # of the analyzed (full-size) config, for reports
    num_kv_heads: int = 0
    head_dim: int = 0
    sinks: bool = False  # a learned per-head sink logit in the softmax denominator (GPT-OSS)
    kv_heads: str = "config.num_key_value_heads"  # expression of the number of KV heads
    qkv_groups: str = "1"  # fused qkv: equal groups its output splits into first (1: flat [q | k | v])
    qkv_order: tuple[str, ...] = ("q", "k", "v")  # fused qkv: order of the parts inside a group
    alibi: bool = False  # ALiBi: a per-head linear bias on the key position joins the scores
    #: fused qkv: (config field, value, groups, order) of the other layouts bool config fields select,
    #: checked in order before the measured one (GPT-BigCode's multi_query=False: per head)
    qkv_switches: tuple[tuple[str, bool, str, tuple[str, ...]], ...] = ()
    #: the attention output (before the output projection) times sigmoid(gate): "separate" from its
    #: own projection ``gate`` (AFMoE), "per_head" from the q projection's second half of each head
    #: (Qwen3-Next, MiniCPM5-MoE: per head [q | gate]), "head_scalar" from its own projection to one
    #: value per head and token that scales the whole head (Laguna, LFM3)
    output_gate: Literal["none", "separate", "per_head", "head_scalar"] = "none"
    gate: LinearSpec | None = None
    #: the gate's activation, measured: sigmoid (AFMoE, Qwen3-Next, LFM3) or softplus in fp32 (Laguna)
    gate_activation: Literal["sigmoid", "softplus"] = "sigmoid"
    out_norm: NormSpec | None = None  # a norm of the attention output before the output projection (BitNet)
    out_norm_name: str = ""
    qk_norm_after_rope: bool = False  # q/k norms applied to the rotated q/k (NanoChat)
    rope_inverse: bool = False  # q/k rotate by minus the angle (NanoChat's rotate_half is (x2, -x1))
    #: (beta, period) expressions: after RoPE, q *= 1 + beta * log(1 + floor(position / period)), the
    #: Llama 4 attention temperature (Ministral3); the attention then takes ``position_ids``
    position_scale: tuple[str, str] | None = None
    #: Llama 4's NoPE layers: positions counted from 1 in that formula (``floor((position + 1) /
    #: period)``), and the expression over ``config`` and ``self`` (``use_rope``) of the layers that
    #: scale q (None: every layer)
    position_scale_offset: int = 0
    position_scale_flag: str | None = None
    #: differential attention (DiffLlama): the names of the four lambda vectors (q1, k1, q2, k2);
    #: every head attends to both halves of the value heads, heads h and h + heads/2 pair up as
    #: ``a_h - lambda * a_{h + heads/2}`` with ``lambda = exp(q1.k1) - exp(q2.k2) + lambda_init``,
    #: ``lambda_init = 0.8 - 0.6 * exp(-0.3 * layer_idx)``; the pair is normalised over its 2 * head_dim
    #: channels by ``differential_norm`` (a weightless RMSNorm, HF attribute ``differential_norm_name``,
    #: inlined in the lean file as ``torch_rmsnorm`` on a unit buffer) and scaled by 1 - lambda_init
    differential: tuple[str, str, str, str] | None = None
    #: a vector the decoder layer adds to the attention output, held by the attention on the layers
    #: ``out_bias_flag`` (an expression over ``config`` and ``layer_idx``) selects only, None on the
    #: others (GPT-NeoX-Japanese's ``dense_bias``, on the last layer): its name, "" for none
    out_bias: str = ""
    out_bias_flag: str | None = None
    differential_norm: NormSpec | None = None
    differential_norm_name: str = ""
    #: a weightless RMSNorm of each value head before attention (Gemma 4's ``v_norm``), inlined as
    #: ``torch_rmsnorm`` on a unit buffer: its epsilon expression (None for none) and HF attribute
    v_norm_eps: str | None = None
    v_norm_name: str = ""
    #: config fields the attention reads from its own layer's config (``config.per_layer_config[
    #: layer_idx]``): the widths that transformers' ``per_layer_config`` overrides on some layers
    #: (Gemma 4's head_dim and num_key_value_heads on full-attention layers), measured on every layer
    per_layer_fields: tuple[str, ...] = ()
    #: value heads of another width than q/k heads: the config expression of that width (MiMo-V2's
    #: ``config.v_head_dim``); None: values have head_dim channels
    v_head_dim: str | None = None
    #: a constant the values are multiplied by after their projection, as a config expression
    #: (MiMo-V2's ``attention_value_scale``); None: unscaled
    value_scale: str | None = None
    #: with ``sinks``: the config expression over ``layer_idx`` of the layers that have them (MiMo-V2:
    #: sliding-window layers only); None: every layer
    sinks_flag: str | None = None
    #: a learned bias per key/value head and key on the scores (Doge's dynamic mask), on
    #: ``torch_attention_key_bias``: (projection of the value heads to one value per KV head, vector
    #: of one value per KV head, the projection's bias expression): ``bias = exp(A *
    #: softplus(dt_proj(values)))``; None: no such bias
    key_bias: tuple[str, str, str] | None = None
    #: with ``key_bias``: the config expression of how many highest-bias keys a query row keeps once it
    #: has more (Doge's ``keep_window_size``); None: every key
    key_bias_window: str | None = None
    #: with a separate output gate: the attention's own vector of one value per head added to each
    #: head's gate channels before the activation (Beam's ``gate_bias``), "" for none
    gate_bias: str = ""
    #: with ``position_scale``: the scale is ``(1 + (position + offset) / period) ** beta`` (Beam's
    #: scalable softmax on its NoPE layers, a per-position factor its model passes to the attention)
    #: instead of Llama 4's ``1 + beta * log(1 + floor(...))``
    position_scale_power: bool = False
    #: cross-layer KV sharing (Gemma 4's ``num_kv_shared_layers``, Kolibri 1.1's ``kv_source_layers``):
    #: the config expression over ``layer_idx`` of the layer whose keys and values a layer attends to
    #: (``layer_idx`` itself where it computes its own), measured; None: every layer computes its own.
    #: ``kv_own``: the attributes only layers that compute their own keys and values hold
    kv_source: str | None = None
    kv_own: tuple[str, ...] = ()


@dataclass(frozen=True)
class MLPSpec:
    """A dense feed-forward block: gated (two or one fused input projection) or plain."""

    class_name: str
    attr: str  # attribute on the decoder layer, e.g. "mlp"
    kind: MLPKind
    inputs: tuple[LinearSpec, ...]  # gated: (gate, up); fused_gated: (gate_up,); plain: (up,)
    down: LinearSpec
    act_attr: str  # HF attribute name of the activation, e.g. "act_fn"
    act: str  # config expression of the activation name, e.g. "config.hidden_act"
    intermediate: str  # config expression, e.g. "config.intermediate_size"
    activation: str = ""  # the activation's name in the analyzed config, e.g. "silu"
    inline: bool = False  # the linears sit on the decoder layer itself (OPT's fc1/fc2), not in a block
    inner_norm: NormSpec | None = None  # a norm of the activated hidden before the down projection (BitNet)
    inner_norm_name: str = ""
    #: expression building an activation module with learned parameters (Apertus' xIELU), else None:
    #: ``ACT2FN[act]``
    act_module: str | None = None
    #: source of ``def <name>(config) -> int`` where ``intermediate`` calls it (LFM2's adjusted width)
    width_function: str = ""
    #: transformers builds the block as ``nn.Sequential(up, act, down)`` (CTRL): the lean class
    #: subclasses it so the checkpoint keys stay ``<attr>.0`` / ``<attr>.2``
    sequential: bool = False
    #: config expressions of constants scaling the gate before its activation and the block's output
    #: (Falcon-H1's ``mlp_multipliers``), else None
    gate_scale: str | None = None
    down_scale: str | None = None


@dataclass(frozen=True)
class DecoderLayerSpec:
    """Residual layout of a decoder layer: which norm sits where, and parallel or sequential blocks.

    Sequential: ``h += attn_post(attn(attn_pre(h)))``, then ``h += mlp_post(mlp(mlp_pre(h)))``;
    parallel: ``h += attn(n) + mlp(n)`` with ``n = attn_pre(h)``. Absent norms are None.
    """

    class_name: str
    norm: NormSpec
    attn_pre: str | None
    attn_post: str | None
    mlp_pre: str | None
    mlp_post: str | None
    parallel: bool = False
    residual_multiplier: str | None = None  # expression scaling each block output (Granite)
    norm_after_residual: bool = False  # post-LN: attn_post / mlp_post normalise the residual sum
    #: (config field, value, layout) of the other layouts a bool config field selects, checked in order
    #: before this one (OPT's do_layer_norm_before=False: post-LN)
    switches: tuple[tuple[str, bool, DecoderLayerSpec], ...] = ()
    #: (condition over config, field) of part sub-config settings that change the layer and that this
    #: file does not reproduce (MPT's attn_config.clip_qkv): the layer refuses a config that sets them
    refused: tuple[tuple[str, str], ...] = ()
    #: a tensor of the layer's own (not a block's) that multiplies the layer's output, residual
    #: included (Gemma 4's ``layer_scalar`` buffer): its name, whether it is a checkpoint buffer (else a
    #: parameter) and its shape; "" for none
    output_scale: str = ""
    output_scale_buffer: bool = True
    output_scale_shape: tuple[int, ...] = ()
    #: (norm attribute, condition over config and layer_idx): the norm exists only where the condition
    #: holds and is ``nn.Identity`` elsewhere (ModernBERT-decoder's first layer has no attn_norm)
    identity_norms: tuple[tuple[str, str], ...] = ()
    #: vectors of the layer's own (hidden size) that scale the residual before each block's add,
    #: ``h = w * h + block(h)`` (Doge's input_residual / post_attention_residual): (attention's,
    #: feed-forward's), None where the residual is added as it is
    residual_weights: tuple[str | None, str | None] = (None, None)
    #: depth-scaled residual adds (Beam): the index of layer 0's first add, counted from one; the
    #: attention's add of layer ``l`` is ``n = 2 * l + residual_adds``, the feed-forward's ``n + 1``, and
    #: the n-th add gives ``sqrt((n - 1) / n) * residual + block / sqrt(n)``; None: plain adds
    residual_adds: int | None = None


@dataclass(frozen=True)
class PositionEmbeddingSpec:
    """Learned absolute position embeddings added to the token embeddings (GPT-2, OPT)."""

    attr: str  # on the inner model, e.g. "wpe"
    offset: int = 0  # row of position 0 (OPT and BioGPT keep two rows before it)
    sinusoidal_base: float | None = None  # fixed sin/cos rows, not a checkpoint weight (XGLM)
    class_name: str | None = None  # the module class of a sinusoidal table
    #: of a sinusoidal table: frequency i is ``base^(-i / denominator)``, "half - 1" (XGLM) or "half" (CTRL)
    denominator: str = "half - 1"


@dataclass(frozen=True)
class EmbeddingSpec:
    attr: str  # on the inner model, e.g. "embed_tokens"
    scale: str | None = None  # expression multiplying the embeddings (Gemma, Granite)
    scaled_class: str | None = None  # HF embedding subclass that applies the scale itself (Gemma3)
    padding_idx: bool = True  # pass config.pad_token_id (absent from some configs, e.g. CodeGen's)
    positions: PositionEmbeddingSpec | None = None
    norm: str | None = None  # attribute of a norm applied to the embeddings (BLOOM)
    width: str = "config.hidden_size"  # expression of the embedding width (OPT: word_embed_proj_dim)
    project_in: str | None = None  # linear from the embedding width to the hidden size, if any
    project_out: str | None = None  # linear from the hidden size back to it, before the head
    #: (attribute, class) of a module that only holds the token embedding and ``norm`` (ModernBERT's
    #: ``embeddings``): ``attr`` and ``norm`` are then dotted paths through it
    wrapper: tuple[str, str] | None = None


@dataclass(frozen=True)
class HeadTransformSpec:
    """A transform of the last hidden state before the output projection (ModernBERT's prediction
    head): ``norm(act(dense(h)))``, its own module on the causal LM."""

    attr: str  # on the causal LM, e.g. "lm_head"
    class_name: str
    dense: LinearSpec
    act_attr: str
    act: str  # config expression of the activation name
    norm_attr: str
    norm: NormSpec


@dataclass(frozen=True)
class HeadSpec:
    """The causal-LM head: final norm attribute, lm_head bias and logit post-processing."""

    final_norm_attr: str | None  # None: no final norm (post-LN layers end in one)
    lm_head_bias: bool | str  # a config expression where a flag switches it (ERNIE-4.5's use_bias)
    logits_op: Literal["none", "divide", "multiply", "softcap"] = "none"
    logits_value: str | None = None  # expression used by logits_op
    attr: str = "lm_head"  # the output projection's name on the causal LM
    final_norm_flag: str | None = None  # expression without which there is no final norm (OPT)
    transform: HeadTransformSpec | None = None  # applied to the final hidden state before ``attr``
    final_norm_eps: str | None = None  # the final norm's epsilon where it differs from the layers' (CTRL)


AttentionSlot = AttentionSpec | MLASpec
FeedForwardSlot = MLPSpec | MoESpec


@dataclass(frozen=True)
class ArchitectureSpec:
    """Everything the generator needs for ``modeling_<model_type>.py``."""

    model_type: str
    config_class: str
    hf_module: str  # transformers module the lean file mirrors
    causal_lm_class: str
    model_class: str
    pretrained_class: str
    decoder_class: str
    attention: AttentionSlot
    feed_forward: FeedForwardSlot
    decoder: DecoderLayerSpec
    embedding: EmbeddingSpec
    head: HeadSpec
    rope: RopeSpec | None
    layers_attr: str = "layers"
    model_attr: str = "model"
    stack_attr: str | None = None  # the inner model only wraps the decoder stack here (OPT's "decoder")
    stack_class: str | None = None
    tie_word_embeddings: bool = False
    layer_types: tuple[str, ...] = field(default_factory=tuple)
    notes: tuple[str, ...] = field(default_factory=tuple)  # features found, for reports
    #: layers whose token mixer is not (only) attention: their kinds, order and block specs
    #: (``attention`` / ``feed_forward`` then hold the stack's attention / dense MLP spec, or None)
    hybrid: HybridSpec | None = None
    #: False where transformers' causal-LM class never ties its head (NemotronH: ``_tied_weights_keys = {}``,
    #: whatever ``tie_word_embeddings`` says)
    ties_head: bool = True
    #: a vector of its own per token and layer that every decoder layer mixes in (Gemma 4's per-layer
    #: embeddings), None for none
    per_layer_input: PerLayerInputSpec | None = None

    @property
    def stack_path(self) -> str:
        """Path of the module holding embeddings, layers and final norm: ``model`` or ``model.decoder``."""
        return f"{self.model_attr}.{self.stack_attr}" if self.stack_attr else self.model_attr

    @property
    def norm_specs(self) -> list[NormSpec]:
        """Distinct norm classes of the model, decoder norm first (one class may serve 1-D and per-head weights)."""
        found: dict[str, NormSpec] = {self.decoder.norm.class_name: self.decoder.norm}
        qk_norm = getattr(self.attention, "qk_norm", None)  # MLA has none
        if qk_norm is not None:
            known = found.setdefault(qk_norm.class_name, qk_norm)
            if qk_norm.head_weights and not known.head_weights:
                found[qk_norm.class_name] = dataclasses.replace(known, head_weights=True)
        for inner in (
            getattr(self.attention, "out_norm", None),
            getattr(self.feed_forward, "inner_norm", None),
            self.head.transform.norm if self.head.transform else None,
        ):
            if inner is not None:
                found.setdefault(inner.class_name, inner)
        return list(found.values())
