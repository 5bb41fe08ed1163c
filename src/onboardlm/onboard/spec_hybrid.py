"""Spec of hybrid stacks: decoder layers whose token mixer is not (only) attention.

A hybrid model is measured layer by layer. Each decoder layer is a sequence of residual *steps*
``h = h + block(norm(h))``; a block is a token mixer (attention, a Mamba2 SSM, ...) or a feed-forward
(dense MLP, MoE). Layers with the same class and the same steps form one :class:`LayerKindSpec`; the
per-layer order of the kinds is read from the built model, and the config list that selects a layer's
kind (``config.layers_block_type``, ``config.layer_types``...) is found by matching its values to that
order. Each distinct block kind has one block spec (``HybridSpec.blocks``), emitted once as one class.

Extending it: a new token mixer is a new ``MixerKind`` value, a spec class here (frozen dataclass
with ``class_name`` and ``kind``), a recogniser in ``analyze_hybrid.MIXER_RECOGNISERS`` and an
emitter in ``emit_hybrid.BLOCK_EMITTERS``. Nothing else changes: layer kinds, the per-layer order,
the decoder-layer classes and the generated tests are shared by every mixer kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: Block kinds a hybrid layer step may hold. Token mixers: "attention" (AttentionSpec), "mamba2"
#: (Mamba2MixerSpec); feed-forwards: "mlp" (MLPSpec), "moe" (MoESpec). Other helpers add theirs.
MixerKind = str

#: Kinds that mix tokens (the others act on each token alone).
TOKEN_MIXERS = frozenset(
    {"attention", "mamba2", "mamba1", "gated_delta", "short_conv", "kda", "lightning", "rg_lru"}
)

#: Kinds whose canonical op keeps per-sequence state in the runtime (SSM, convolution, recurrence).
STATEFUL_MIXERS = frozenset({"mamba2", "mamba1", "gated_delta", "short_conv", "kda", "rg_lru"})


@dataclass(frozen=True)
class Mamba2MixerSpec:
    """A Mamba2 (SSD) mixer on ``torch_causal_conv1d`` + ``torch_ssm`` + ``torch_rmsnorm_gated``.

    ``in_proj`` gives ``[gate (I) | x (I) | B (G*N) | C (G*N) | dt (H)]``; the causal depthwise conv
    and the activation act on ``x|B|C``; the scan runs per head (``I / H`` channels each, B/C shared by
    ``H / G`` heads); the gated RMSNorm (groups of ``I / G``) gates with SiLU(gate); ``out_proj`` maps
    back. Every size is a config expression, so one file serves every config of the architecture.
    """

    class_name: str
    norm_class: str  # HF class of the gated RMSNorm, e.g. "Mamba2RMSNormGated"
    in_proj: str
    out_proj: str
    conv: str  # attribute of the nn.Conv1d
    norm: str  # attribute of the gated norm
    act_attr: str
    act: str  # config expression of the activation name
    in_bias: str  # config expressions of the biases
    out_bias: str
    conv_bias: str
    num_heads: str
    n_groups: str
    state_size: str
    intermediate: str
    conv_kernel: str
    chunk_size: str
    time_step_limit: str  # expression of the (min, max) pair
    eps: str
    norm_before_gate: bool | str = False  # or the config expression that picks it
    #: config expression keeping the gated norm (None: always); without it ``silu(gate) * y``
    norm_flag: str | None = None
    in_scale: str | None = None  # config expression of a multiplier on the mixer input
    segment_scales: tuple[str, ...] = ()  # multipliers of in_proj's gate | x | B | C | dt (µP)
    kind: MixerKind = "mamba2"

    @property
    def note(self) -> str:
        return "Mamba2 SSD mixer (torch_causal_conv1d, torch_ssm, torch_rmsnorm_gated)"


@dataclass(frozen=True)
class Mamba1MixerSpec:
    """A Mamba1 selective-scan mixer, run on ``torch_ssm`` with one head per (channel, state) pair.

    ``in_proj`` gives ``[x (I) | gate (I)]``; the causal depthwise conv and the activation act on x;
    ``x_proj`` gives ``[dt (R) | B (N) | C (N)]`` (each optionally RMS-normalised: Jamba, Falcon-Mamba);
    ``dt_proj`` maps dt to I channels (its bias is the scan's ``dt_bias``). Mamba1's state is
    ``[I, N]`` with a per-entry ``A [I, N]``: on ``torch_ssm`` that is ``I * N`` heads of width 1, each
    with its own group for B and C, so the scan (and the runtime's cached scan) is Mamba2's op; the
    output sums the N heads of a channel, adds ``D * x`` and is gated by SiLU(gate).
    """

    class_name: str
    in_proj: str
    x_proj: str
    dt_proj: str
    out_proj: str
    conv: str
    act_attr: str
    act: str
    in_bias: str
    out_bias: str
    conv_bias: str
    intermediate: str
    state_size: str
    rank: str
    conv_kernel: str
    #: norms of dt, B and C after x_proj (attribute names and NormSpec), or () where there are none
    ssm_norms: tuple[tuple[str, Any], ...] = ()
    kind: MixerKind = "mamba1"

    @property
    def note(self) -> str:
        return "Mamba1 selective-scan mixer (torch_causal_conv1d, torch_ssm over channel x state heads)"


@dataclass(frozen=True)
class BranchSpec:
    """A block of a parallel step beside the step's first one: it reads the same normed input (times
    ``in_scale``) and its output (times ``out_scale``) is added to the others' (Falcon-H1's attention
    beside its Mamba2 mixer, GraniteMoeHybrid's shared MLP beside its MoE)."""

    attr: str
    kind: MixerKind
    in_scale: str | None = None  # config expression multiplying the block's input (None: 1)
    out_scale: str | None = None  # config expression multiplying the block's output (None: 1)


@dataclass(frozen=True)
class StepSpec:
    """One residual step of a layer: ``h = h + self.<attr>(self.<norm>(h))``, or with ``post`` the
    post-norm step ``h = h + self.<norm>(self.<attr>(h))`` (OLMo 2's layout).

    The general pre-norm step, measured where the plain one does not continue the residual stream:
    ``x = norm(h); h = h + post_norm(sum_b block_b(x * in_b) * out_b) * scale`` with the blocks of
    ``parallel`` beside ``attr``, a sandwich norm ``post_norm`` (LFM3) and a residual multiplier
    ``scale`` (Granite's ``residual_multiplier``); every scale is a config expression.
    """

    attr: str
    kind: MixerKind
    norm: str
    post: bool = False
    post_norm: str | None = None
    scale: str | None = None
    in_scale: str | None = None
    out_scale: str | None = None
    parallel: tuple[BranchSpec, ...] = ()
    #: bool config expression without which ``post_norm`` is the identity (LFM3's ``use_sandwich_norm``)
    post_norm_flag: str | None = None

    @property
    def branches(self) -> tuple[BranchSpec, ...]:
        """Every block of the step, the first one included."""
        return (BranchSpec(self.attr, self.kind, self.in_scale, self.out_scale), *self.parallel)

    @property
    def general(self) -> bool:
        """Anything beyond ``h = h + block(norm(h))`` and the post-norm step."""
        return bool(self.parallel or self.post_norm or self.scale or self.in_scale or self.out_scale)


@dataclass(frozen=True)
class LayerKindSpec:
    """Decoder layers of one class with the same residual steps (e.g. ``mamba2+mlp``)."""

    name: str
    class_name: str
    steps: tuple[StepSpec, ...]
    selectors: tuple[Any, ...] = ()  # values of the selector config list that give this kind


@dataclass(frozen=True)
class HybridSpec:
    """The layer kinds of a hybrid stack, their order, and one block spec per block kind."""

    kinds: tuple[LayerKindSpec, ...]
    order: tuple[str, ...]  # kind name of each layer of the analyzed (tiny) config
    selector: str | None  # config expression of the per-layer list choosing a kind (None: one kind)
    blocks: tuple[tuple[MixerKind, Any], ...]  # block spec of each block kind
    norm_class: str  # the layers' RMSNorm class
    #: (bool field, value) settings under which transformers builds a block module this file does not
    #: have (LFM3's ``use_attention_gate=False``: attention without its output gate); the layers refuse them
    refused: tuple[tuple[str, bool], ...] = ()

    def block(self, kind: MixerKind) -> Any:
        return dict(self.blocks)[kind]

    @property
    def layer_classes(self) -> list[str]:
        return list(dict.fromkeys(kind.class_name for kind in self.kinds))

    def kinds_of(self, class_name: str) -> list[LayerKindSpec]:
        return [kind for kind in self.kinds if kind.class_name == class_name]

    @property
    def stateful(self) -> list[MixerKind]:
        """Block kinds whose canonical op needs per-sequence state from the runtime."""
        return [kind for kind, _ in self.blocks if kind in STATEFUL_MIXERS]
