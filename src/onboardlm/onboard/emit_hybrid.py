"""Generate the lean file of a hybrid stack (``spec.hybrid``): one class per block kind, one
decoder-layer class per transformers layer class, each building the blocks of its layer's kind.

A layer class that serves several kinds (NemotronH's ``NemotronHBlock``: Mamba2, attention, MLP or
MoE behind one ``mixer`` attribute) reads its kind from the selector config list at ``layer_idx``
and builds and runs only that kind's blocks; each residual step is ``h = h + block(norm(h))``.
Token mixers call only canonical ops (``torch_ssm``, ``torch_causal_conv1d``...): states are not
passed in the model file, the runtime's cache transform swaps in cached versions of those ops.

Extending it: a new block kind adds its emitter to ``BLOCK_EMITTERS`` (source of its classes) and,
where its forward takes more than the hidden states, to ``POSITIONAL_KINDS``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from onboardlm.errors import UnsupportedFeature
from onboardlm.onboard.spec import ArchitectureSpec
from onboardlm.onboard.spec_hybrid import (
    HybridSpec,
    LayerKindSpec,
    Mamba1MixerSpec,
    Mamba2MixerSpec,
    StepSpec,
)

_HINT = "add a template for this block kind in onboardlm/onboard/templates and emit_hybrid.py"

#: Canonical ops of each block kind that carry state across tokens (cached by the runtime).
STATE_OPS = {
    "mamba2": ("torch_causal_conv1d", "torch_ssm"),
    "mamba1": ("torch_causal_conv1d", "torch_ssm"),
    "gated_delta": ("torch_causal_conv1d", "torch_gated_delta_rule"),
    "short_conv": ("torch_causal_conv1d",),
    "kda": ("torch_causal_conv1d", "torch_channel_gated_delta_rule"),
    "rg_lru": ("torch_causal_conv1d", "torch_rg_lru"),
}

#: Block kinds whose forward also takes the RoPE tables.
POSITIONAL_KINDS = frozenset({"attention"})


def _render(template: str, **variables: Any) -> str:
    from onboardlm.onboard.generate import render

    return render(template, **variables)


def emit_mamba2(mixer: Mamba2MixerSpec, spec: ArchitectureSpec) -> str:
    norm = _render("norm_gated.py.j2", class_name=mixer.norm_class, norm_before_gate=mixer.norm_before_gate)
    body = _render("mamba2_mixer.py.j2", m=mixer, config_class=spec.config_class)
    return norm + "\n\n" + body


def _emit_mixer(block: Any, spec: ArchitectureSpec) -> str:
    from onboardlm.onboard.emit_mixers import emit_mixer_classes

    return emit_mixer_classes(block, spec.config_class)


def emit_mamba1(mixer: Mamba1MixerSpec, spec: ArchitectureSpec) -> str:
    from onboardlm.onboard.generate import emit_norm, norm_constructor

    sizes = ("self.time_step_rank", "self.ssm_state_size", "self.ssm_state_size")
    norm_lines = [
        (name, norm_constructor(norm, size))
        for (name, norm), size in zip(mixer.ssm_norms, sizes, strict=False)
    ]
    defined = {norm.class_name for norm in spec.norm_specs}
    classes = {norm.class_name: norm for _, norm in mixer.ssm_norms if norm.class_name not in defined}
    norms = "".join(emit_norm(norm, spec) + "\n\n" for norm in classes.values())
    return norms + _render(
        "mamba1_mixer.py.j2", m=mixer, config_class=spec.config_class, norm_lines=norm_lines
    )


def _emit_attention(block: Any, spec: ArchitectureSpec) -> str:
    from onboardlm.onboard.generate import emit

    return emit(block, spec)


#: Source of each block kind's classes.
BLOCK_EMITTERS: dict[str, Callable[[Any, ArchitectureSpec], str]] = {
    "mamba2": emit_mamba2,
    "gated_delta": _emit_mixer,  # emit_mixers.py
    "short_conv": _emit_mixer,
    "kda": _emit_mixer,  # emit_mixers.emit_channel_delta
    "rg_lru": _emit_mixer,  # emit_mixers.emit_rg_lru
    "mamba1": emit_mamba1,
    "attention": _emit_attention,
    "mlp": _emit_attention,  # generate.emit dispatches on the spec class (MLPSpec, MoESpec...)
    "moe": _emit_attention,
}


def _placed_moe(hybrid: HybridSpec) -> Any:
    """The MoE spec whose layer rule (not the layer kinds) picks MoE or dense MLP, else None."""
    blocks = dict(hybrid.blocks)
    moe = blocks.get("moe")
    return moe if moe is not None and moe.dense_class is not None else None


def block_constructor(kind: str, block: Any, hybrid: HybridSpec | None = None) -> str:
    from onboardlm.onboard.emit_moe import feed_forward_constructor

    placed = _placed_moe(hybrid) if hybrid is not None else None
    if kind in ("mlp", "moe") and placed is not None:
        return feed_forward_constructor(placed)  # ``MoE(config) if <layer rule> else MLP(config)``
    if kind in ("mlp", "moe"):
        return feed_forward_constructor(block)
    return f"{getattr(block, 'wrapper_class', None) or block.class_name}(config, layer_idx)"


def _condition(hybrid: HybridSpec, kind: LayerKindSpec) -> str:
    values = kind.selectors
    if len(values) == 1:
        return f"self.block_type == {values[0]!r}"
    return f"self.block_type in {tuple(values)!r}"


def _scale_attr(expression: str) -> str:
    """The layer attribute holding a multiplier ``config.<name>`` (set in the constructor)."""
    name = expression.removeprefix("config.")
    if not name.isidentifier():
        raise UnsupportedFeature(expression, "a residual multiplier that is not one config field", _HINT)
    return name


def _scales(kind: LayerKindSpec) -> list[str]:
    """The multipliers the kind's steps read, as config expressions (each once)."""
    found = []
    for step in kind.steps:
        found += [step.scale] + [e for b in step.branches for e in (b.in_scale, b.out_scale)]
    return list(dict.fromkeys(e for e in found if e))


def _scales_any(steps: list[StepSpec]) -> bool:
    return any(step.scale or any(b.in_scale or b.out_scale for b in step.branches) for step in steps)


def _moe_guard(hybrid: HybridSpec, kind: LayerKindSpec) -> list[str]:
    """A MoE that runs beside a dense MLP of its own (GraniteMoeHybrid's ``shared_mlp``) and that the
    transformers layer builds only under a config rule (``config.num_local_experts > 0``): the file
    builds it always and refuses configs where the rule is false (a layer of the MLP alone)."""
    moe = dict(hybrid.blocks).get("moe")
    beside = any(len({b.kind for b in step.branches} & {"moe", "mlp"}) == 2 for step in kind.steps)
    if moe is None or not beside or moe.layer_condition in ("True", "") or moe.dense_class is not None:
        return []
    return [
        f"if not ({moe.layer_condition}):",
        f'    raise NotImplementedError(f"layer {{layer_idx}}: layers without the MoE ({moe.layer_condition}'
        f' is false) are not built by this file")',
    ]


def _general_step_lines(step: StepSpec, positional: bool) -> list[str]:
    """``x = norm(h); h = h + post(sum_b block_b(x * in_b) * out_b) * scale`` (spec_hybrid.StepSpec)."""
    lines = []
    branches = step.branches
    shared = len(branches) > 1 or step.in_scale is not None
    if shared:
        lines.append(f"normed = self.{step.norm}(hidden_states)")
    terms = []
    for branch in branches:
        extra = ", position_embeddings" if positional and branch.kind in POSITIONAL_KINDS else ""
        argument = "normed" if shared else f"self.{step.norm}(hidden_states)"
        if branch.in_scale:
            argument += f" * self.{_scale_attr(branch.in_scale)}"
        term = f"self.{branch.attr}({argument}{extra})"
        if branch.out_scale:
            term += f" * self.{_scale_attr(branch.out_scale)}"
        terms.append(term)
    update = " + ".join(terms)
    if step.post_norm:
        update = f"self.{step.post_norm}({update})"
    if step.scale:
        update = f"({update})" if len(terms) > 1 and not step.post_norm else update
        update += f" * self.{_scale_attr(step.scale)}"
    lines.append(f"hidden_states = hidden_states + {update}")
    return lines


def _step_lines(hybrid: HybridSpec, kind: LayerKindSpec, positional: bool) -> list[str]:
    lines = []
    for step in kind.steps:
        extra = ", position_embeddings" if positional and step.kind in POSITIONAL_KINDS else ""
        if step.general:
            lines += _general_step_lines(step, positional)
        elif step.post:
            lines.append(
                f"hidden_states = hidden_states + self.{step.norm}(self.{step.attr}(hidden_states{extra}))"
            )
        else:
            lines.append(
                f"hidden_states = hidden_states + self.{step.attr}(self.{step.norm}(hidden_states){extra})"
            )
    lines.append("return hidden_states")
    return lines


def emit_layer_class(class_name: str, spec: ArchitectureSpec) -> str:
    from onboardlm.onboard.generate import norm_constructor

    hybrid = spec.hybrid
    assert hybrid is not None
    kinds = hybrid.kinds_of(class_name)
    norm = norm_constructor(spec.decoder.norm, "config.hidden_size")
    positional = spec.rope is not None

    def build(kind: LayerKindSpec) -> list[str]:
        lines = []
        for step in kind.steps:
            lines.append(f"self.{step.norm} = {norm}")
            for branch in step.branches:
                lines.append(
                    f"self.{branch.attr} = {block_constructor(branch.kind, hybrid.block(branch.kind), hybrid)}"
                )
            if step.post_norm and step.post_norm_flag:  # the identity where the flag is off
                lines.append(f"self.{step.post_norm} = {norm} if {step.post_norm_flag} else nn.Identity()")
            elif step.post_norm:
                lines.append(f"self.{step.post_norm} = {norm}")
        lines += [f"self.{_scale_attr(e)} = {e}" for e in _scales(kind)]
        return _moe_guard(hybrid, kind) + lines

    if len(kinds) == 1 and hybrid.selector is not None and len(hybrid.kinds) == 1:
        (value,) = kinds[0].selectors  # the analyzed config had layers of this kind only
        init = [
            f"if {hybrid.selector}[layer_idx] != {value!r}:",
            f'    raise NotImplementedError(f"layer {{layer_idx}}: only {value!r} layers are built by this file")',
            *build(kinds[0]),
        ]
        forward = _step_lines(hybrid, kinds[0], positional)
    elif len(kinds) == 1:
        init, forward = build(kinds[0]), _step_lines(hybrid, kinds[0], positional)
    else:
        if hybrid.selector is None:
            raise UnsupportedFeature(class_name, "several layer kinds in one class without a selector", _HINT)
        built = [build(kind) for kind in kinds]
        shared = [line for line in built[0] if all(line in other for other in built[1:])]  # every kind's
        init = [f"self.block_type = {hybrid.selector}[layer_idx]", *shared]
        forward = []
        bodies = [_step_lines(hybrid, kind, positional) for kind in kinds]
        one_body = all(
            body == bodies[0] for body in bodies
        )  # NemotronH: ``h + mixer(norm(h))`` for every kind
        for position, (kind, lines) in enumerate(zip(kinds, built, strict=True)):
            keyword = "if" if position == 0 else "elif"
            init.append(f"{keyword} {_condition(hybrid, kind)}:  # {kind.name} layers")
            init += [f"    {line}" for line in lines if line not in shared] or ["    pass"]
            if not one_body:
                forward.append(f"{keyword} {_condition(hybrid, kind)}:")
                forward += [f"    {line}" for line in bodies[position]]
        kinds_text = ", ".join(repr(v) for kind in kinds for v in kind.selectors)
        init += [
            "else:",
            f'    raise ValueError(f"layer {{layer_idx}}: block type {{self.block_type!r}} is none of {kinds_text}")',
        ]
        if one_body:
            forward = bodies[0]
        else:
            forward.append('raise AssertionError("unreachable: the constructor checked the block type")')
    signature = (
        "self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]"
        if positional
        else "self, hidden_states: torch.Tensor"
    )
    for field, value in hybrid.refused:  # settings whose blocks this file does not build
        init = [
            f"if {'' if value else 'not '}config.{field}:",
            f'    raise NotImplementedError("config.{field}={value!r} is not reproduced by this file")',
            *init,
        ]
    lines = [
        f"class {class_name}(nn.Module):",
        f"    def __init__(self, config: {spec.config_class}, layer_idx: int) -> None:",
        "        super().__init__()",
        *(f"        {line}" for line in init),
        "",
        f"    def forward({signature}) -> torch.Tensor:",
        *(f"        {line}" for line in forward),
    ]
    return "\n".join(lines) + "\n"


def layer_class_expression(spec: ArchitectureSpec) -> str:
    """Expression of layer ``i``'s class in the model's ModuleList (one class: the class itself)."""
    hybrid = spec.hybrid
    assert hybrid is not None
    classes = hybrid.layer_classes
    if len(classes) == 1:
        return classes[0]
    if hybrid.selector is None:
        raise UnsupportedFeature(spec.decoder_class, "layer classes without a selector", _HINT)
    *others, last = classes
    expression = last
    for cls in reversed(others):
        values = tuple(v for kind in hybrid.kinds_of(cls) for v in kind.selectors)
        expression = f"({cls} if {hybrid.selector}[i] in {values!r} else {expression})"
    return expression


def emit_hybrid_blocks(spec: ArchitectureSpec) -> list[str]:
    """Sources of the block classes and decoder-layer classes, in dependency order."""
    hybrid = spec.hybrid
    assert hybrid is not None
    sources = []
    for kind, block in hybrid.blocks:
        emitter = BLOCK_EMITTERS.get(kind)
        if emitter is None:
            raise UnsupportedFeature(
                getattr(block, "class_name", kind), f"no emitter for {kind} blocks", _HINT
            )
        if kind == "moe" and _placed_moe(hybrid) is not None:  # its dense MLP is the "mlp" block's class
            block = dataclasses.replace(block, dense_class=None, dense_width_expr=None)
        shared = getattr(dict(hybrid.blocks).get("moe"), "shared", None)
        if kind == "mlp" and shared is not None and shared.class_name == block.class_name:
            continue  # the MoE emits this class (NemotronH's shared expert is the dense MLP's class)
        sources.append(emitter(block, spec))
    sources += [emit_layer_class(cls, spec) for cls in hybrid.layer_classes]
    return sources


def describe_hybrid(spec: ArchitectureSpec) -> str:
    hybrid = spec.hybrid
    assert hybrid is not None
    names = {
        "mamba2": "Mamba2 SSD mixers",
        "gated_delta": "gated delta rule (linear attention) mixers",
        "short_conv": "gated short-convolution mixers",
        "kda": "Kimi delta attention (gated delta rule with a per-channel decay) mixers",
        "mamba1": "Mamba1 selective-scan mixers",
        "attention": "grouped-query attention",
        "mlp": "dense MLPs",
        "moe": "mixture-of-experts feed-forward",
    }
    if hasattr(dict(hybrid.blocks).get("attention"), "kv_lora_rank"):  # an MLASpec
        names["attention"] = "multi-head latent attention"
    blocks = ", ".join(names.get(kind, kind) for kind, _ in hybrid.blocks)
    counts = {name: hybrid.order.count(name) for name in dict.fromkeys(hybrid.order)}
    kinds = ", ".join(f"{name} ({count} of {len(hybrid.order)} layers)" for name, count in counts.items())
    selector = f"; a layer's kind is read from {hybrid.selector}[layer_idx]" if hybrid.selector else ""
    if not hybrid.selector and len(counts) == 1:  # no stored per-layer list to check
        selector = (
            f"; every layer is built as a {hybrid.order[0]} layer (re-onboard a config with other kinds)"
        )
    rope = " and rotary position embeddings" if spec.rope is not None else ""
    steps = [step for kind in hybrid.kinds for step in kind.steps]
    layouts = []
    if any(step.post_norm for step in steps):
        layouts.append("norms after the blocks too (sandwich)")
    if any(step.parallel for step in steps):
        layouts.append("blocks in parallel on one normed input")
    if _scales_any(steps):
        layouts.append("multipliers on block inputs, outputs or residual adds")
    if layouts:
        selector += f"; residual steps with {', '.join(layouts)}"
    if hybrid.refused:  # the sentence config_variants reads: no variant flips these
        settings = ", ".join(f"config.{field}={value}" for field, value in hybrid.refused)
        selector += f"; not for configs with {settings} (measured: other modules)"
    ops = dict.fromkeys(op for kind, _ in hybrid.blocks for op in STATE_OPS.get(kind, ()))
    stateful = " / ".join(f"``{op}``" for op in ops) or "the canonical ops"
    return (
        f"Lean, export-friendly {spec.causal_lm_class.removesuffix('ForCausalLM')} on canonical ``auto_deploy`` ops.\n\n"
        f"Mirrors ``{spec.hf_module}`` ({spec.causal_lm_class}): a hybrid stack of pre-norm layers with"
        f" RMSNorm, built from {blocks}{rope}. Layer kinds in the analyzed config: {kinds}{selector}."
        " Module names equal the checkpoint keys, so HuggingFace state dicts load with ``strict=True``.\n\n"
        f"Left out on purpose: the KV cache and the mixers' conv and scan states (they run from a zero state"
        f" on {stateful}; the runtime swaps in cached versions),"
        " attention masks and padding masks (sequences are causal and unpadded), dropout, gradient"
        " checkpointing, fused-kernel paths, position-id generation (callers pass them), hidden-state"
        " outputs and the loss.\n Linear, split, view, conv, scan and gated-norm calls carry tensor-parallel"
        " sharding hints; they do not change the numbers."
    )
