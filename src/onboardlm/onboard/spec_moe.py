"""Specs of the mixture-of-experts and multi-head-latent-attention blocks (measured by ``analyze_moe``).

A ``MoESpec`` fills the feed-forward slot and an ``MLASpec`` the attention slot of an
``ArchitectureSpec``; ``emit_moe`` renders them. Config-dependent values are recorded as the names
of the config fields the generated code reads.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "MOE_ACTIVATIONS",
    "ExpertsSpec",
    "IndexerSpec",
    "MLASpec",
    "MoESpec",
    "PackedExperts",
    "RouterSpec",
    "SharedExpertSpec",
]

#: Expert activations ``torch_moe`` runs: transformers' ``hidden_act`` name -> ActivationType member.
MOE_ACTIVATIONS = {"silu": "Silu", "swish": "Silu", "gelu": "Gelu", "relu2": "Relu2"}


@dataclass(frozen=True)
class RouterSpec:
    """How a token picks its experts, and the config fields the generated router reads.

    scoring: ``softmax`` (softmax over all experts, then top-k), ``sparsemixer`` (PhiMoE: twice the
    best remaining expert, weighted by a softmax over the experts within ``2 * config.<jitter_field>``
    of it, relative) or ``sigmoid`` (sigmoid scores, top-k
    chosen on score + ``e_score_correction_bias`` within the best ``topk_group`` of ``n_group``
    groups, scaled by ``routed_scaling_factor``). has_bias: the router linear has a bias (GPT-OSS).
    norm_topk_prob: measured; ``norm_field`` is the config field the HF router reads it from (None:
    a constant of the architecture). A sigmoid router may also be ungrouped (``grouped`` False), have
    no correction bias, and no scaling (``scaling_field`` None: the weights are not scaled).
    correction_bias: where ``e_score_correction_bias`` lives: ``router`` (a router buffer), ``block``
    (a buffer of the MoE block, handed to the router's forward: MiniMax-M2), None (no such bias).
    correction_name: the bias tensor's name (AFMoE's block keeps it as ``expert_bias``).
    class_name: transformers' router class; ``<Prefix>TopKRouter`` where the block routes with a bare
    linear itself (:mod:`onboardlm.onboard.block_routing`).
    linear_attr: the router keeps its ``[E, H]`` weight in a bias-free ``nn.Linear`` child of that name
    (AFMoE's ``router.gate``, HunYuan-MoE's ``gate.wg``); None: as its own ``weight``.
    choice_on: the top-k is chosen on ``scores`` (+ bias) or on the raw ``logits`` (+ bias).
    statics_attr / statics_class: the router keeps its correction bias in a submodule of that name and
    class (ERNIE-4.5's ``moe_statics``), with leading dims ``statics_shape`` (``(1,)``: ``[1, E]``).
    """

    attr: str
    class_name: str
    scoring: str
    top_k_field: str
    norm_topk_prob: bool
    norm_field: str | None
    has_bias: bool
    has_correction_bias: bool
    grouped: bool
    scaling_field: str | None
    correction_bias: str | None = "router"
    correction_name: str = "e_score_correction_bias"
    linear_attr: str | None = None
    jitter_field: str | None = None
    choice_on: str = "scores"
    statics_attr: str | None = None
    statics_class: str | None = None
    statics_shape: tuple[int, ...] = ()
    #: the float config field of a tanh soft-cap on the router logits, ``cap * tanh(logits / cap)``
    #: before the scores, off at 0 (Laguna's ``moe_router_logit_softcapping``); None: no cap
    logit_softcap_field: str | None = None


@dataclass(frozen=True)
class PackedExperts:
    """How the HF state dict packs expert tensors under ``experts.``.

    gate_up is ``[E, 2I, H]`` (``transposed``: ``[E, H, 2I]``) with gate and up ``concatenated`` as
    halves or interleaved row by row; down is ``[E, H, I]`` (``transposed``: ``[E, I, H]``).
    The aliases are the same tensors' names in checkpoints on disk (transformers renames them on
    load), relative to the MoE block, e.g. Aria's ``experts.fc1.weight``.
    """

    gate_up_key: str
    down_key: str
    concatenated: bool
    transposed: bool
    gate_up_bias_key: str | None
    down_bias_key: str | None
    gate_up_aliases: tuple[str, ...] = ()
    down_aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class ExpertsSpec:
    """Routed experts: count and width (and their config fields), activation, bias, packed layout.

    activation: a key of ``MOE_ACTIVATIONS``, or ``clamped_swiglu`` (GPT-OSS: gate clamped at
    ``limit``, up to ``[-limit, limit]``, ``(up + 1) * gate * sigmoid(alpha * gate)``).
    swiglu_alpha_expr / swiglu_limit_expr: Python expressions for ``alpha`` and ``limit``: the config
    field with the measured value as its default (transformers releases before the field existed
    hard-code that value in the module), or the literal when the config has no such field.
    """

    num_experts: int
    num_experts_field: str
    intermediate_size: int
    intermediate_field: str
    activation: str
    has_bias: bool
    packed: PackedExperts
    swiglu_alpha_expr: str | None = None
    swiglu_limit_expr: str | None = None
    #: False: ``down(act(up(x)))`` experts (NemotronH), packed ``up_proj`` (in ``packed.gate_up_key``)
    gated: bool = True


@dataclass(frozen=True)
class SharedExpertSpec:
    """An always-on gated MLP beside the routed experts, optionally behind a sigmoid gate."""

    attr: str
    class_name: str
    intermediate_expr: str
    gate_attr: str | None
    #: a non-gated ``down(act(up(x)))`` shared expert (NemotronH): its activation's config expression
    plain_act: str | None = None


@dataclass(frozen=True)
class MoESpec:
    """One architecture's MoE block and which decoder layers use it.

    The feed-forward slot of a MoE architecture: ``attr`` is the decoder layer's attribute (``mlp``).
    layer_condition: a Python expression over ``config`` and ``layer_idx`` that is true exactly for
    the MoE layers (checked against the measured ``moe_layers`` of the tiny model). dense_class: the
    plain gated MLP class of the other layers (``(config, intermediate_size=None)``), None when every
    layer is MoE; it may be the shared expert's class. dense_width_expr: the dense MLP's width when it
    is not ``config.intermediate_size`` (Cohere2-MoE's ``config.prefix_dense_intermediate_size``).
    mlp_bias: the gated MLPs' (shared expert, dense layers) ``bias=`` expression (``config.use_bias``).
    post_norm: (attribute, RMSNorm class of the file) the block applies to its output (A.X-K1).
    scaling_field: the float config field the block multiplies the routed experts' output by (Beam's,
    MiniMax-M3's ``routed_scaling_factor``, applied after the experts rather than in the router).
    mlp_swiglu: (alpha, limit) expressions when the gated MLPs (shared expert, dense layers) are fused
    clamped SwiGLUs (MiniMax-M3's ``gate_up_proj``, gate and up halves); None: plain gated MLPs.
    """

    class_name: str
    attr: str
    config_class: str
    prefix: str
    router: RouterSpec
    experts: ExpertsSpec
    shared: SharedExpertSpec | None
    layer_condition: str
    moe_layers: tuple[int, ...]
    dense_class: str | None
    dense_width_expr: str | None = None
    mlp_bias: str = "False"
    post_norm: tuple[str, str] | None = None
    scaling_field: str | None = None
    mlp_swiglu: tuple[str, str] | None = None
    #: the routing weights scale each expert's input, not its output (Llama 4: x * score per expert)
    routing_on_input: bool = False

    @property
    def note(self) -> str:
        """One line for reports: routing, expert activation, shared experts, dense layers."""
        if self.router.scoring == "sparsemixer":
            scoring = "sparse-mixer top-2"
        elif self.router.scoring == "sigmoid":
            scoring = "sigmoid grouped top-k" if self.router.grouped else "sigmoid top-k"
        else:
            scoring = "softmax top-k"
        parts = [f"MoE ({scoring} router, {self.experts.activation} experts"]
        if self.shared is not None:
            parts.append("gated shared expert" if self.shared.gate_attr else "shared experts")
        if self.dense_class is not None:
            parts.append("dense layers")
        if self.routing_on_input:
            parts.append("routing weights on the expert input")
        return ", ".join(parts) + ")"


@dataclass(frozen=True)
class IndexerSpec:
    """DeepSeek sparse attention's lightning indexer inside an MLA attention (``attr`` on it).

    Children by role (checkpoint keys): ``q_attr`` (low-rank query latent -> heads x dim), ``k_attr``
    (hidden -> one shared key), ``norm_attr`` (LayerNorm on the key, ``norm_eps``), ``weights_attr``
    (hidden -> one weight per head). ``*_field``: the config fields of the head count, head width and
    selected-key count. rope_pairs: RoPE rotates channel pairs (2i, 2i+1) (GLM-MoE-DSA), else
    half-split (DeepSeek-V3.2), on the first ``qk_rope_head_dim`` channels.
    """

    class_name: str
    attr: str
    q_attr: str
    k_attr: str
    norm_attr: str
    weights_attr: str
    heads_field: str
    head_dim_field: str
    topk_field: str
    norm_eps: str
    norm_bias: bool
    rope_pairs: bool

    @property
    def note(self) -> str:
        rope = "interleaved" if self.rope_pairs else "half-split"
        return f"lightning indexer (config.{self.topk_field} keys per query, {rope} RoPE)"


@dataclass(frozen=True)
class MLASpec:
    """DeepSeek-style multi-head latent attention (the attention slot; ``attr`` on the decoder layer).

    q_lora: queries go through ``q_a_proj -> q_a_layernorm -> q_b_proj`` (else one ``q_proj``); the
    generated code still branches on ``config.q_lora_rank`` so every checkpoint of the type loads.
    rope_interleave: the config has a ``rope_interleave`` field the HF attention branches on.
    rope_pairs: the HF attention always rotates channel pairs (2i, 2i+1) (DeepSeek-V2's complex table).
    yarn_mscale: the HF attention multiplies the softmax scale by YaRN's ``mscale(factor,
    mscale_all_dim)²``. norm_eps: expression of the latent norms' epsilon (DeepSeek: its norm's
    default, a literal).
    """

    class_name: str
    attr: str
    config_class: str
    norm_class: str
    norm_eps: str
    num_heads: int
    q_lora: bool
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_interleave: bool
    yarn_mscale: bool
    scaling: float
    rope_pairs: bool = False
    indexer: IndexerSpec | None = None  # DeepSeek sparse attention: attend only to the selected keys
    #: the model has no rotary embedding (Kimi Linear's MLA): the k_pe / q_pe channels stay unrotated
    nope: bool = False
    #: child gating each head's output by ``sigmoid(gate(hidden_states))`` before o_proj (Ling 3), else None
    head_gate: str | None = None

    @property
    def note(self) -> str:
        """One line for reports: query path, RoPE layout, softmax-scale correction."""
        q = "low-rank q" if self.q_lora else "full-rank q"
        rope = (
            "no"
            if self.nope
            else "interleaved (config.rope_interleave)"
            if self.rope_interleave
            else "interleaved channel-pair"
            if self.rope_pairs
            else "NeoX"
        )
        mscale = ", YaRN mscale" if self.yarn_mscale else ""
        sparse = f", sparse over a {self.indexer.note}" if self.indexer is not None else ""
        gate = f", per-head sigmoid output gate {self.head_gate}" if self.head_gate else ""
        return f"MLA ({q}, {rope} RoPE on the shared key part{mscale}{sparse}{gate})"
