"""Render the MoE and MLA building blocks of a lean model file from their measured specs.

``emit_moe`` and ``emit_mla`` return the source of a block's classes (and module-level helpers);
``block_imports`` the import lines they need beyond the file header, ``moe_constructor`` the
decoder layer's feed-forward expression (MoE block, or the dense MLP on dense layers). Templates:
``templates/moe_*.py.j2`` and ``templates/mla_*.py.j2``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import jinja2

from onboardlm.errors import UnsupportedFeature
from onboardlm.onboard.spec_moe import MOE_ACTIVATIONS, MLASpec, MoESpec

if TYPE_CHECKING:
    from onboardlm.onboard.spec import ArchitectureSpec, MLPSpec

__all__ = [
    "block_imports",
    "emit_mla",
    "emit_mla_slot",
    "emit_moe",
    "emit_moe_slot",
    "expert_class_name",
    "feed_forward_constructor",
    "moe_constructor",
]

_TEMPLATES = Path(__file__).parent / "templates"
_ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(_TEMPLATES),
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
    autoescape=False,
)
_ACTIVATION_TYPE_IMPORT = "from onboardlm.ops import ActivationType"
_HINT = "add a template for it in onboardlm/onboard/templates (moe_*.py.j2)"


def expert_class_name(spec: MoESpec) -> str:
    """Class of one routed expert's weights (no HF module sits at ``experts.<e>``)."""
    return f"{spec.prefix}Expert"


def _render(template: str, **context: object) -> str:
    return _ENV.get_template(template).render(**context).rstrip() + "\n"


def _summary(spec: MoESpec, dense_dispatch: bool) -> str:
    """Docstring of the MoE block: routing, shared experts, where the experts run."""
    router = spec.router
    if router.scoring == "sparsemixer":
        routing = "a sparse-mixer top-2 router"
    elif router.scoring == "sigmoid" and router.grouped:
        routing = "a sigmoid router with bias-corrected grouped top-k"
    elif router.scoring == "sigmoid":
        routing = "a sigmoid top-k router" + (
            " with a score-correction bias" if router.correction_bias else ""
        )
    else:
        routing = "a softmax top-k router" + (" with a bias" if router.has_bias else "")
        routing += " with a score-correction bias" if router.correction_bias else ""
    shared = f",\n    plus the always-on `{spec.shared.attr}`" if spec.shared else ""
    if spec.scaling_field:
        shared = f",\n    the routed output times ``config.{spec.scaling_field}``" + shared
    clamped = "clamped SwiGLU with biases" if spec.experts.has_bias else "clamped SwiGLU"
    runner = f"torch_moe_dense_mlp ({clamped})" if dense_dispatch else "torch_moe"
    return (
        f"Mixture of experts behind {routing}{shared}.\n\n"
        f"    The routed experts run in {runner};\n"
        "    a load hook unpacks HF's packed expert tensors.\n    "
    )


def _dispatch_is_dense(spec: MoESpec) -> bool:
    """Clamped-SwiGLU experts (GPT-OSS, MiniMax-M3) run in torch_moe_dense_mlp, the rest in torch_moe."""
    return spec.experts.activation == "clamped_swiglu"


def _router_is_dense(spec: MoESpec) -> bool:
    """GPT-OSS's router (biased linear, softmax over the top-k logits) is torch_moe_router, which gives
    the dense ``[T, E]`` weights torch_moe_dense_mlp mixes with; another router's top-k weights are
    scattered into ``[T, E]`` by the block."""
    router = spec.router
    return (
        _dispatch_is_dense(spec)
        and spec.experts.has_bias
        and router.scoring == "softmax"
        and router.norm_topk_prob
        and router.has_bias
        and not router.grouped
        and router.correction_bias is None
    )


def _router_template(spec: MoESpec, dense_dispatch: bool) -> str:
    if dense_dispatch and _router_is_dense(spec):
        return "moe_router_dense.py.j2"
    if spec.router.scoring == "sparsemixer":
        return "moe_router_sparsemixer.py.j2"
    router = spec.router
    scored = (
        router.scoring == "sigmoid" or router.correction_bias is not None or router.scaling_field is not None
    )
    return "moe_router_sigmoid.py.j2" if scored else "moe_router_softmax.py.j2"


def _half(first: bool, concatenated: bool) -> Callable[[str], str]:
    """Jinja helper: the gate (``first``) or up rows of a gate_up tensor whose dim 1 holds both."""

    def expression(name: str) -> str:
        if concatenated:
            return f"{name}.chunk(2, dim=1)[{0 if first else 1}]"
        return f"{name}[:, {0 if first else 1}::2]"

    return expression


def moe_constructor(spec: MoESpec) -> str:
    """Expression that builds a decoder layer's feed-forward (``config`` and ``layer_idx`` in scope)."""
    block = f"{spec.class_name}(config)"
    if spec.dense_class is None:
        return block
    width = f", intermediate_size={spec.dense_width_expr}" if spec.dense_width_expr else ""
    return f"{block} if {spec.layer_condition} else {spec.dense_class}(config{width})"


def emit_moe(spec: MoESpec) -> str:
    """Gated MLP (shared expert, dense layers), expert, router and MoE block classes, and the hook helper."""
    if spec.experts.activation not in MOE_ACTIVATIONS and spec.experts.activation != "clamped_swiglu":
        raise UnsupportedFeature(
            f"{spec.class_name}.experts", f"activation {spec.experts.activation!r}", _HINT
        )
    dense_dispatch = _dispatch_is_dense(spec)
    packed = spec.experts.packed
    context = {
        "block_class": spec.class_name,
        "config_class": spec.config_class,
        "expert_class": expert_class_name(spec),
        "router": spec.router,
        "experts": spec.experts,
        "shared": spec.shared,
        "packed": packed,
        "dense_dispatch": dense_dispatch,
        "dense_router": _router_is_dense(spec),
        "mlp_swiglu": spec.mlp_swiglu,
        "mlp_bias": spec.mlp_bias,
        "post_norm": spec.post_norm,
        "scaling_field": spec.scaling_field,
        "routing_on_input": spec.routing_on_input,
        "dispatch_op": "torch_moe_dense_mlp" if dense_dispatch else "torch_moe",
        "bias": spec.experts.has_bias,
        "act_member": "" if dense_dispatch else MOE_ACTIVATIONS[spec.experts.activation],
        "norm_doc": (
            " (renormalised when norm_topk_prob)"
            if spec.router.norm_field
            else (", renormalised" if spec.router.norm_topk_prob else "")
        ),
        "summary": _summary(spec, dense_dispatch),
        "gate_up_shape": (
            ("[E, H, 2I]" if packed.transposed else "[E, 2I, H]")
            if spec.experts.gated
            else ("[E, H, I]" if packed.transposed else "[E, I, H]")
        ),
        "down_shape": "[E, I, H]" if packed.transposed else "[E, H, I]",
        "gate_part": _half(True, packed.concatenated),
        "up_part": _half(False, packed.concatenated),
    }
    mlp_classes = [spec.shared.class_name if spec.shared else None, spec.dense_class]
    parts = [_render("moe_store_helper.py.j2")]
    parts += [
        _render("moe_mlp.py.j2", mlp_class=name, **context)
        for name in dict.fromkeys(mlp_classes)
        if name is not None
    ]
    parts += [
        _render("moe_expert.py.j2", **context),
        _render(_router_template(spec, dense_dispatch), **context),
        _render("moe_block.py.j2", **context),
    ]
    return "\n\n".join(part.rstrip("\n") + "\n" for part in parts)


def emit_mla(spec: MLASpec) -> str:
    """The MLA attention class (and the YaRN mscale helper when the HF attention uses it).

    The file must define ``spec.norm_class`` (RMSNorm with ``(hidden_size, eps)``).
    """
    return _render("mla_attention.py.j2", mla=spec)


def block_imports(*blocks: object) -> tuple[str, ...]:
    """Import lines the emitted MoE / MLA blocks need beyond the file header's (others: none)."""
    imports = []
    if any(isinstance(b, MoESpec) and not _dispatch_is_dense(b) for b in blocks):
        imports.append(_ACTIVATION_TYPE_IMPORT)
    if any(isinstance(b, MLASpec) and b.yarn_mscale for b in blocks):
        imports.append("import math")
    return tuple(imports)


def feed_forward_constructor(block: MoESpec | MLPSpec) -> str:
    """Expression building a decoder layer's feed-forward: a dense MLP, or :func:`moe_constructor`."""
    return moe_constructor(block) if isinstance(block, MoESpec) else f"{block.class_name}(config)"


def emit_moe_slot(block: MoESpec, arch: ArchitectureSpec) -> str:
    """``generate.EMITTERS`` entry of the feed-forward slot; a block's output norm must be a norm
    class of the file."""
    if block.post_norm is not None and block.post_norm[1] not in {n.class_name for n in arch.norm_specs}:
        raise UnsupportedFeature(
            f"{block.class_name}.{block.post_norm[0]}",
            f"output norm {block.post_norm[1]} is not a norm class of the file",
            _HINT,
        )
    return emit_moe(block)


def emit_mla_slot(block: MLASpec, arch: ArchitectureSpec) -> str:
    """``generate.EMITTERS`` entry of the attention slot; the file must define the latent norms' class."""
    defined = {norm.class_name for norm in arch.norm_specs}
    if block.norm_class not in defined:
        raise UnsupportedFeature(
            f"{block.class_name}.kv_a_layernorm",
            f"latent norm {block.norm_class} is not a norm class of the file",
            _HINT,
        )
    return emit_mla(block)
