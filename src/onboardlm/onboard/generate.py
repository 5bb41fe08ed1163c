"""Phases 2-5: write ``modeling_<model_type>.py`` from an ArchitectureSpec.

One jinja2 template per building block (``templates/*.py.j2``) and one emitter per block kind. An
emitter turns its spec into template variables (constructor lines, forward lines) and renders it;
``EMITTERS`` maps a spec class to its emitter, so a new block kind (MoE, MLA) plugs into the
feed-forward or attention slot by adding a spec class and an emitter. The header imports everything a
lean file may use; the pinned ruff (the environment's own, never another one first on PATH) drops the
unused imports (F401), sorts them and formats the file, so the output reads like the hand-written
golden Llama. Generated test files go through the same ``format_source``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import subprocess
import tempfile
import textwrap
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import jinja2

from onboardlm.errors import UnsupportedFeature
from onboardlm.onboard import emit_perlayer
from onboardlm.onboard.emit_hybrid import describe_hybrid, emit_hybrid_blocks, layer_class_expression
from onboardlm.onboard.emit_moe import emit_mla_slot, emit_moe_slot, feed_forward_constructor
from onboardlm.onboard.spec import (
    DIFFERENTIAL_LAMBDA_INIT,
    ArchitectureSpec,
    AttentionSpec,
    DecoderLayerSpec,
    LinearSpec,
    MLPSpec,
    NormSpec,
)
from onboardlm.onboard.spec_moe import MLASpec, MoESpec

logger = logging.getLogger(__name__)

TEMPLATES = Path(__file__).parent / "templates"
_HINT = "add a template for this combination in onboardlm/onboard/templates"


@cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=False,
        undefined=jinja2.StrictUndefined,
        autoescape=False,
    )


def render(template: str, **variables: Any) -> str:
    """Render one block template; the result ends with exactly one newline."""
    return _environment().get_template(template).render(**variables).rstrip() + "\n"


# ------------------------------------------------------------------------------------------ helpers


def norm_constructor(norm: NormSpec, size: str) -> str:
    """Expression building a norm of width ``size`` (torch's nn.LayerNorm or the file's own class)."""
    if norm.builtin:
        affine = "" if norm.weight else ", elementwise_affine=False"
        bias = "" if norm.bias or not norm.weight else ", bias=False"
        return f"nn.LayerNorm({size}, eps={norm.eps}{affine}{bias})"
    return f"{norm.class_name}({size}, {norm.eps})"


def emit_norm(norm: NormSpec, spec: ArchitectureSpec) -> str:
    if norm.builtin:
        return ""
    return render("norm_rms.py.j2" if norm.kind == "rms" else "norm_layer.py.j2", norm=norm)


def _prefix(spec: ArchitectureSpec) -> str:
    return spec.causal_lm_class.removesuffix("ForCausalLM").removesuffix("LMHeadModel")


def _output_class(spec: ArchitectureSpec) -> str:
    return f"{_prefix(spec)}CausalLMOutput"


# ------------------------------------------------------------------------------------------ blocks


def emit_rope_frequencies(spec: ArchitectureSpec) -> str:
    rope = spec.rope
    if rope is None:
        return ""
    return render(
        "rope_frequencies.py.j2",
        config_class=spec.config_class,
        per_layer_type=rope.per_layer_type,
        partial=rope.partial,
        refused=[kind for kind in ("dynamic", "longrope") if kind not in rope.rope_types],
        fixed_base=rope.fixed_base,
        dim=rope.dim,
        base_field=rope.base_field,
        ntk_alpha="ntk_alpha" in rope.rope_types,
        layer_type_config=rope.layer_type_config,
    )


def emit_rotary(spec: ArchitectureSpec) -> str:
    if spec.rope is None:
        return ""
    longrope, dynamic = ("longrope" in spec.rope.rope_types), ("dynamic" in spec.rope.rope_types)
    if (longrope or dynamic) and (spec.rope.per_layer_type or spec.rope.base_field):
        kind = "per layer type" if spec.rope.per_layer_type else "with a base per layer"
        raise UnsupportedFeature(f"{spec.model_attr}.{spec.rope.attr}", f"dynamic RoPE {kind}", _HINT)
    return render(
        "rotary.py.j2", config_class=spec.config_class, rope=spec.rope, longrope=longrope, dynamic=dynamic
    )


def _key_bias_lines(attn: AttentionSpec) -> list[str]:
    """The projection of the value heads and the vector behind a bias per key (Doge's dt_proj and A),
    and the number of highest-bias keys a query row keeps; refused beside what the op lacks."""
    others = {
        "a fused q/k/v projection": attn.fused_qkv,
        "value heads of another width": attn.v_head_dim,
        "differential attention": attn.differential,
        "a sliding window": attn.sliding != "none" or attn.sliding_expr,
        "chunked attention": attn.chunk_expr,
        "a logit soft-cap": attn.softcap,
        "sink logits": attn.sinks,
        "ALiBi": attn.alibi,
    }
    present = [name for name, value in others.items() if value]
    if present:
        raise UnsupportedFeature(attn.class_name, f"a bias per key beside {', '.join(present)}", _HINT)
    name, vector, bias = attn.key_bias  # type: ignore[misc]
    return [
        f"self.{name} = nn.Linear(self.num_kv_heads * self.head_dim, self.num_kv_heads, bias={bias})",
        f"self.{vector} = nn.Parameter(torch.zeros(self.num_kv_heads))",
        f"self.keep_window = {attn.key_bias_window or 'None'}",
    ]


def emit_attention(attn: AttentionSpec, spec: ArchitectureSpec) -> str:
    if spec.rope is not None and spec.rope.style == "neox" and spec.rope.table_layout == "interleaved":
        raise UnsupportedFeature(
            f"{spec.model_attr}.{spec.rope.attr}", "NeoX RoPE on interleaved tables", _HINT
        )
    init = [
        "self.layer_idx = layer_idx",
        *_width_lines(attn),
        f"self.scaling = {attn.scaling}",
    ]
    if attn.sliding == "all":
        init.append("self.sliding_window = config.sliding_window")
    elif attn.sliding == "layer_types":
        init.append(
            'self.sliding_window = config.sliding_window if config.layer_types[layer_idx] == "sliding_attention" else None'
        )
    if attn.sliding_expr:
        init.append(f"self.sliding_window = {attn.sliding_expr}")
    if attn.chunk_expr:
        init.append(f"self.attention_chunk_size = {attn.chunk_expr}")
    if attn.softcap:
        init.append(f"self.logit_cap = {attn.softcap}")
    if attn.sinks:
        sinks = "nn.Parameter(torch.empty(self.num_heads))"
        init.append(
            f"self.sinks = {sinks} if {attn.sinks_flag} else None"
            if attn.sinks_flag
            else f"self.sinks = {sinks}"
        )
    if attn.v_head_dim:
        init.append(f"self.v_head_dim = {attn.v_head_dim}")
    if attn.value_scale:
        init.append(f"self.value_scale = {attn.value_scale}")
    if attn.rope_flag:
        init.append(f"self.use_rope = bool({attn.rope_flag})")
    if attn.position_scale and attn.position_scale_flag:  # after use_rope, which it may read
        init.append(f"self.use_temperature = bool({attn.position_scale_flag})")
    v_dim = "self.v_head_dim" if attn.v_head_dim else "self.head_dim"
    if attn.v_head_dim and (
        attn.fused_qkv or attn.output_gate in ("separate", "per_head") or attn.differential or attn.out_norm
    ):
        raise UnsupportedFeature(
            attn.class_name,
            "value heads of another width beside a fused q/k/v, a gate of the q width or differential attention",
            _HINT,
        )
    if attn.fused_qkv:
        qkv = attn.projections[0]
        init.append(
            f"self.{qkv.name} = nn.Linear(config.hidden_size, (self.num_heads + 2 * self.num_kv_heads) * self.head_dim, bias={qkv.bias})"
        )
    else:
        q, k, v = attn.projections
        q_width = (
            "2 * self.num_heads * self.head_dim"
            if attn.output_gate == "per_head"
            else "self.num_heads * self.head_dim"
        )
        init += [
            f"self.{q.name} = nn.Linear(config.hidden_size, {q_width}, bias={q.bias})",
            f"self.{k.name} = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias={k.bias})",
            f"self.{v.name} = nn.Linear(config.hidden_size, self.num_kv_heads * {v_dim}, bias={v.bias})",
        ]
    init.append(
        f"self.{attn.out.name} = nn.Linear(self.num_heads * {v_dim}, config.hidden_size, bias={attn.out.bias})"
    )
    linears = [*attn.projections, attn.out]
    start = len(init) - len(linears)
    init[start:] = _hoist_bias(init[start:], [linear.bias for linear in linears])
    if attn.gate is not None:  # a gate of the q width, or of one value per head
        width = "self.num_heads" if attn.output_gate == "head_scalar" else "self.num_heads * self.head_dim"
        init.append(f"self.{attn.gate.name} = nn.Linear(config.hidden_size, {width}, bias={attn.gate.bias})")
        linears.append(attn.gate)
    if attn.out_bias:  # held on the layers the flag selects only; the decoder layer adds it
        if attn.inner_attr:
            raise UnsupportedFeature(attn.class_name, "output bias of a wrapped attention", _HINT)
        init.append(
            f"self.{attn.out_bias} = nn.Parameter(torch.zeros(config.hidden_size)) if {attn.out_bias_flag} else None"
        )
    if attn.differential:
        init.append(f"self.lambda_init = {DIFFERENTIAL_LAMBDA_INIT}")
        init += [
            f"self.{name} = nn.Parameter(torch.zeros(self.head_dim))" for name in sorted(attn.differential)
        ]
        norm = attn.differential_norm
        if norm is None or norm.kind != "rms" or norm.weight or norm.offset:
            raise UnsupportedFeature(
                attn.class_name, "differential attention without a weightless RMSNorm per head pair", _HINT
            )
        init += [  # the weightless RMSNorm of each head pair's 2 * head_dim channels (no checkpoint key)
            'self.register_buffer("_ad_pair_norm_weight", torch.ones(2 * self.head_dim), persistent=False)',
            f"self.pair_norm_eps = {norm.eps}",
        ]
    if attn.gate_bias:  # one bias per head on a separate gate's channels (Beam)
        init.append(f"self.{attn.gate_bias} = nn.Parameter(torch.zeros(self.num_heads))")
    if attn.key_bias is not None:  # a bias per key/value head and key, from the values (Doge)
        init += _key_bias_lines(attn)
    if attn.out_norm is not None:
        init.append(
            f"self.{attn.out_norm_name} = {norm_constructor(attn.out_norm, 'self.num_heads * self.head_dim')}"
        )
    if attn.output_gate != "none" and attn.fused_qkv:
        raise UnsupportedFeature(attn.class_name, "output gate beside a fused q/k/v projection", _HINT)
    init += [f"self.{field} = config.{field}" for field in dict.fromkeys(f for f, *_ in attn.qkv_switches)]
    init += _qk_norm_lines(attn)
    if attn.v_norm_eps is not None:  # HF's weightless v norm has no checkpoint key: inlined
        init += [
            f"# {attn.v_norm_name}: a weightless RMSNorm of each value head",
            'self.register_buffer("_ad_v_norm_weight", torch.ones(self.head_dim), persistent=False)',
            f"self.v_norm_eps = {attn.v_norm_eps}",
        ]
    init += _conv1d_hook_lines(linears)
    if attn.alibi:
        init.append(
            'self.register_buffer("_ad_alibi_slopes", _alibi_slopes(self.num_heads), persistent=False)'
        )
    rope_lines: list[str] = []
    if spec.rope is not None:
        rope_lines = render("rope_apply.py.j2", rope=spec.rope).rstrip("\n").split("\n")
        if attn.rope_inverse:  # rotate by minus the angle: sin(-a) = -sin(a)
            rope_lines.insert(1, "sin = -sin  # q and k rotate by minus the angle")
        if attn.rope_flag:
            rope_lines = ["if self.use_rope:", *(f"    {line}" for line in rope_lines)]
    if attn.kv_source:
        init = _kv_sharing_init(attn, spec, init)
    wrapper = ""
    if attn.inner_attr:
        wrapper = render(
            "attention_wrapper.py.j2",
            attn=attn,
            config_class=spec.config_class,
            positional=spec.rope is not None,
        )
    return wrapper + render(
        "attention.py.j2",
        attn=attn,
        config_class=spec.config_class,
        init_lines=init,
        rope_lines=rope_lines,
        kv_shared=bool(attn.kv_source),
        positional=spec.rope is not None,
        temperature=_takes_temperature(spec),
        qkv_lines=_fused_qkv_lines(attn) if attn.fused_qkv else [],
        methods=_conv1d_hook_method(linears),
        shared_rope_lines=_query_rope_lines(rope_lines) if attn.kv_source else [],
    )


def _kv_sharing_init(attn: AttentionSpec, spec: ArchitectureSpec, init: list[str]) -> list[str]:
    """Constructor lines of an attention some of whose layers read another layer's keys and values:
    the key/value projections and norms (``attn.kv_own``) exist on the layers that compute their own
    only, as in the checkpoint. The forward takes the store ``shared_kv`` those layers write to."""
    others = {
        "a fused q/k/v projection": attn.fused_qkv,
        "differential attention": attn.differential,
        "ALiBi": attn.alibi,
        "an output gate": attn.output_gate != "none",
        "q/k norms over the whole projection, switched by a flag or after RoPE": attn.qk_norm is not None
        and (not attn.qk_norm_per_head or attn.qk_norm_flag or attn.qk_norm_after_rope),
        "an attention temperature": attn.position_scale,
        "a wrapped attention": attn.inner_attr,
        "value heads of another width": attn.v_head_dim,
        "no RoPE": spec.rope is None,
    }
    found = [name for name, present in others.items() if present]
    if found:
        raise UnsupportedFeature(attn.class_name, f"cross-layer KV sharing beside {', '.join(found)}", _HINT)
    own = tuple(f"self.{name} =" for name in attn.kv_own)
    kept = [line for line in init if not line.startswith(own)]
    moved = [line for line in init if line.startswith(own)]
    at = kept.index("self.layer_idx = layer_idx") + 1
    kept.insert(at, f"self.kv_source = {attn.kv_source}  # the layer whose keys and values it attends to")
    return [
        *kept,
        "if self.kv_source == layer_idx:  # keys and values of its own (the others have no such weights)",
        *(f"    {line}" for line in moved),
    ]


def _query_rope_lines(rope_lines: list[str]) -> list[str]:
    """``rope_lines`` rotating q only (the keys of a layer reading another layer's come rotated): q
    takes k's place in the op, whose second output is dropped."""
    lines = []
    for line in rope_lines:
        body = line.lstrip()
        if body.startswith(("k = ", "k_rot = ")):
            continue
        body = re.sub(r"^(q\w*), k\w* = ", r"\1, _ = ", body)
        body = re.sub(r"\bk\[", "q[", body)
        body = re.sub(r"\(q, k,", "(q, q,", body)
        lines.append(line[: len(line) - len(line.lstrip())] + body)
    return lines


def _width_lines(attn: AttentionSpec) -> list[str]:
    """Head counts and head dim; where ``per_layer_config`` overrides some of them on some layers, read
    from the layer's own config (``config.per_layer_config[layer_idx]``: the config itself elsewhere)."""
    lines = [
        "self.num_heads = config.num_attention_heads",
        f"self.num_kv_heads = {attn.kv_heads}",
        'self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads',
    ]
    if not attn.per_layer_fields:
        return lines
    fields = ", ".join(attn.per_layer_fields)
    return [
        f"layer_config = config.per_layer_config[layer_idx]  # per layer: {fields}",
        *(line.replace("config.", "layer_config.").replace("(config,", "(layer_config,") for line in lines),
    ]


def _takes_temperature(spec: ArchitectureSpec) -> bool:
    """Whether decoder layers and attention take the q scale per position (``attention_temperature``
    of the model, computed once per forward like the RoPE tables)."""
    if not getattr(spec.attention, "position_scale", None) or spec.rope is None:
        return False
    if spec.stack_attr:
        raise UnsupportedFeature(
            spec.attention.class_name, "q scale by position in a wrapped decoder stack", _HINT
        )
    return True


def _fused_qkv_lines(attn: AttentionSpec) -> list[str]:
    """Forward lines splitting a fused q/k/v output into q, k, v: the measured layout, and where a
    config flag switches the layout (GPT-BigCode's ``multi_query``), one branch per layout."""
    name = attn.projections[0].name
    default = _fused_split(name, attn.qkv_groups, attn.qkv_order)
    if not attn.qkv_switches:
        return default
    lines = []
    for index, (field, value, groups, order) in enumerate(attn.qkv_switches):
        keyword = "if" if index == 0 else "elif"
        lines.append(f"{keyword} {'' if value else 'not '}self.{field}:")
        lines += [f"    {line}" for line in _fused_split(name, groups, order)]
    return [*lines, "else:", *(f"    {line}" for line in default)]


def _fused_split(name: str, groups: str, order: tuple[str, ...]) -> list[str]:
    """Lines splitting the output of fused projection ``name`` laid out in ``groups`` groups of
    ``order``: flat (one group) with ``output_sizes`` hints, else viewed as groups first."""
    width = {"q": "self.num_heads * self.head_dim", "k": "self.num_kv_heads * self.head_dim"}
    if groups == "self.num_heads":  # one head's q, k and v per group: as many KV heads as heads
        width = {"q": "self.head_dim", "k": "self.head_dim"}
    elif groups == "self.num_kv_heads":
        width = {"q": "self.num_heads // self.num_kv_heads * self.head_dim", "k": "self.head_dim"}
    elif groups != "1":
        width = {part: f"{size} // {groups}" for part, size in width.items()}
    width["v"] = width["k"]
    sizes = f"[{', '.join(width[part] for part in order)}]"
    targets = ", ".join(order)
    linear = f'ops.torch_linear_simple(hidden_states, self.{name}.weight, self.{name}.bias, tp_mode="colwise"'
    if groups == "1":
        return [
            f"sizes = {sizes}",
            f'qkv = {linear}, output_sizes=sizes, tp_min_local_shape=self.head_dim, layer_type="mha")',
            f'{targets} = ops.split_with_sizes(qkv, sizes, dim=-1, enable_sharding=True, layer_type="mha")',
        ]
    return [
        f"sizes = {sizes}  # {targets} in each of the {groups} groups",
        f'qkv = {linear}, tp_min_local_shape=sum(sizes), layer_type="mha")',
        f'qkv = ops.view(qkv, [batch, seq_len, {groups}, sum(sizes)], tp_scaled_dim=2, layer_type="mha")',
        f'{targets} = ops.split_with_sizes(qkv, sizes, dim=-1, layer_type="mha")',
    ]


def _conv1d_hook_lines(linears: list[LinearSpec]) -> list[str]:
    if not any(linear.transposed for linear in linears):
        return []
    return ["self._register_load_state_dict_pre_hook(self._transpose_conv1d_weights)"]


def _conv1d_hook_method(linears: list[LinearSpec]) -> str:
    """The load hook of a block whose checkpoint stores linears as transformers' Conv1D ([in, out])."""
    names = [linear.name for linear in linears if linear.transposed]
    if not names:
        return ""
    if len(names) != len(linears):
        raise UnsupportedFeature(", ".join(names), "Conv1D and nn.Linear projections in one block", _HINT)
    described = " and ".join(f"``{name}``" for name in names)
    return render("conv1d_hook.py.j2", names=repr(tuple(names)), described=described)


def _qk_norm_lines(attn: AttentionSpec) -> list[str]:
    """Constructor lines of the q/k norms: per head, per head with one weight row each, or per projection."""
    if attn.qk_norm is None:
        return []
    if attn.qk_norm.head_weights:
        q_size, k_size = "(self.num_heads, self.head_dim)", "(self.num_kv_heads, self.head_dim)"
    elif attn.qk_norm_per_head:
        q_size, k_size = "self.head_dim", "self.head_dim"
    else:
        q_size, k_size = "self.num_heads * self.head_dim", "self.num_kv_heads * self.head_dim"
    q_norm, k_norm = attn.qk_norm_names
    norms = [f"self.{q_norm} = {norm_constructor(attn.qk_norm, q_size)}"]
    if k_norm != q_norm:  # else one weightless norm serves both (Llama 4's qk_norm)
        norms.append(f"self.{k_norm} = {norm_constructor(attn.qk_norm, k_size)}")
    if attn.qk_norm_flag:
        return [
            f"self.use_qk_norm = {attn.qk_norm_flag}",
            "if self.use_qk_norm:",
            *(f"    {n}" for n in norms),
        ]
    return norms


def emit_mlp(mlp: MLPSpec, spec: ArchitectureSpec) -> str:
    if mlp.inline:  # the decoder layer builds and calls the linears itself
        return ""
    if mlp.sequential:  # an nn.Sequential in transformers: the same children, by index
        return render("mlp_sequential.py.j2", mlp=mlp, config_class=spec.config_class)
    init = []
    if mlp.kind == "fused_gated":
        fused = mlp.inputs[0]
        init += [
            f"self.intermediate_size = {mlp.intermediate}",
            f"self.{fused.name} = nn.Linear(config.hidden_size, 2 * self.intermediate_size, bias={fused.bias})",
            f"self.{mlp.down.name} = nn.Linear(self.intermediate_size, config.hidden_size, bias={mlp.down.bias})",
        ]
    else:
        init += [
            f"self.{linear.name} = nn.Linear(config.hidden_size, {mlp.intermediate}, bias={linear.bias})"
            for linear in mlp.inputs
        ]
        init.append(
            f"self.{mlp.down.name} = nn.Linear({mlp.intermediate}, config.hidden_size, bias={mlp.down.bias})"
        )
    init = _hoist_bias(init, [linear.bias for linear in (*mlp.inputs, mlp.down)])
    if mlp.inner_norm is not None:
        width = "self.intermediate_size" if mlp.kind == "fused_gated" else mlp.intermediate
        init.append(f"self.{mlp.inner_norm_name} = {norm_constructor(mlp.inner_norm, width)}")
    init += [
        f"self.{name} = {expr}"
        for name, expr in (("gate_scale", mlp.gate_scale), ("down_scale", mlp.down_scale))
        if expr
    ]
    linears = [*mlp.inputs, mlp.down]
    init += _conv1d_hook_lines(linears)
    template = "mlp_plain.py.j2" if mlp.kind == "plain" else "mlp_gated.py.j2"
    source = render(
        template,
        mlp=mlp,
        config_class=spec.config_class,
        init_lines=init,
        methods=_conv1d_hook_method(linears),
    )
    return f"{mlp.width_function}\n\n{source}" if mlp.width_function else source


def _hoist_bias(lines: list[str], biases: list[str]) -> list[str]:
    """One ``bias = config.x`` line when every linear of a block takes the same config flag."""
    if len(set(biases)) != 1 or not biases[0].startswith("config."):
        return lines
    shared = f"bias={biases[0]})"
    return [f"bias = {biases[0]}", *(line.replace(shared, "bias=bias)") for line in lines)]


def _block_call(
    attr: str, argument: str, pre: str | None, post: str | None, extra: str = "", bias: bool = False
) -> str:
    inner = f"self.{pre}({argument})" if pre else argument
    call = f"self.{attr}({inner}{extra})"
    if bias:  # the block's output bias, on some layers only (the block's own method adds it)
        call = f"self.{attr}.add_output_bias({call})"
    return f"self.{post}({call})" if post else call


def emit_decoder_layer(layer: DecoderLayerSpec, spec: ArchitectureSpec) -> str:
    attn, ff = spec.attention, spec.feed_forward
    init = []
    for condition, field in layer.refused:  # part sub-config settings measured to change the layer
        init += [
            f"if {condition}:",
            f'    raise NotImplementedError("{field} is not reproduced by this file")',
        ]
    init.append(
        f"self.{attn.attr} = {getattr(attn, 'wrapper_class', None) or attn.class_name}(config, layer_idx)"
    )
    methods = ""
    if isinstance(ff, MLPSpec) and ff.inline:
        up, down = ff.inputs[0], ff.down
        lines = [
            f"self.{up.name} = nn.Linear(config.hidden_size, {ff.intermediate}, bias={up.bias})",
            f"self.{down.name} = nn.Linear({ff.intermediate}, config.hidden_size, bias={down.bias})",
        ]
        init += _hoist_bias(lines, [up.bias, down.bias])
        init.append(f"self.{ff.act_attr} = ACT2FN[{ff.act}]")
        methods = render("mlp_inline.py.j2", mlp=ff)
    else:
        init.append(f"self.{ff.attr} = {feed_forward_constructor(ff)}")
    norms = [layer.attn_pre, layer.attn_post, layer.mlp_pre, layer.mlp_post]
    identity = dict(layer.identity_norms)  # norms built only on some layers, nn.Identity on the others
    init += [
        f"self.{name} = {norm_constructor(layer.norm, 'config.hidden_size')}"
        + (f" if {identity[name]} else nn.Identity()" if name in identity else "")
        for name in norms
        if name
    ]
    if layer.residual_multiplier:
        init.append(f"self.residual_multiplier = {layer.residual_multiplier}")
    init += [
        f"self.{name} = nn.Parameter(torch.ones(config.hidden_size))"
        for name in layer.residual_weights
        if name
    ]
    if layer.residual_adds:
        init += [
            "# the n-th residual add keeps sqrt((n - 1) / n) of the residual and adds the block over sqrt(n)",
            f"add = 2 * layer_idx + {layer.residual_adds}  # the attention's; the feed-forward's is add + 1",
            "self.attn_residual_scale, self.attn_output_scale = math.sqrt((add - 1) / add), 1 / math.sqrt(add)",
            "self.mlp_residual_scale, self.mlp_output_scale = math.sqrt(add / (add + 1)), 1 / math.sqrt(add + 1)",
        ]
    forward = _layout_lines(layer, spec)
    for field, value, other in layer.switches:  # another layout where a config flag says so
        init.append(f"self.{field} = config.{field}")
        forward = [
            f"if {'' if value else 'not '}self.{field}:",
            *(f"    {line}" for line in _layout_lines(other, spec)),
            *forward,
        ]
    if spec.per_layer_input is not None:  # mixed in after the blocks, before the output scale
        init += emit_perlayer.layer_init_lines(spec, norm_constructor(layer.norm, "config.hidden_size"))
        forward = emit_perlayer.layer_forward_lines(forward, spec)
        methods = "\n\n".join(m for m in (methods, emit_perlayer.layer_method(spec)) if m)
    if layer.output_scale:  # a checkpoint tensor of the layer's own scales its whole output
        init += _output_scale_lines(layer)
        forward = _scaled_returns(forward, layer.output_scale)
    return render(
        "decoder_layer.py.j2",
        layer=layer,
        config_class=spec.config_class,
        init_lines=init,
        forward_lines=forward,
        positional=spec.rope is not None,
        temperature=_takes_temperature(spec),
        methods=methods,
        kv_shared=bool(getattr(attn, "kv_source", None)),
        per_layer_argument=emit_perlayer.SLICE if spec.per_layer_input is not None else "",
    )


def _output_scale_lines(layer: DecoderLayerSpec) -> list[str]:
    """The layer's own output scale under its checkpoint name: a buffer or a parameter."""
    shape = list(layer.output_scale_shape)
    if layer.output_scale_buffer:
        return [f'self.register_buffer("{layer.output_scale}", torch.ones({shape}))  # a checkpoint buffer']
    return [f"self.{layer.output_scale} = nn.Parameter(torch.ones({shape}))"]


def _scaled_returns(lines: list[str], name: str) -> list[str]:
    """``lines`` with each ``return x`` returning ``x * self.<name>`` (the residual included)."""
    scaled = []
    for line in lines:
        body = line.lstrip()
        if not body.startswith("return "):
            scaled.append(line)
            continue
        indent = line[: len(line) - len(body)]
        if body != "return hidden_states":
            scaled.append(f"{indent}hidden_states = {body.removeprefix('return ')}")
        scaled.append(f"{indent}return hidden_states * self.{name}")
    return scaled


def _layout_lines(layer: DecoderLayerSpec, spec: ArchitectureSpec) -> list[str]:
    """Forward lines of a decoder layer with ``layer``'s residual layout."""
    attn, ff = spec.attention, spec.feed_forward
    scale = " * self.residual_multiplier" if layer.residual_multiplier else ""
    positions = ", position_embeddings" if spec.rope is not None else ""
    if _takes_temperature(spec):
        positions += ", temperature"
    if getattr(attn, "kv_source", None):  # keys and values some layers leave for others
        positions += ", shared_kv"
    bias = bool(getattr(attn, "out_bias", ""))
    if layer.parallel and layer.mlp_pre:  # a norm for each block
        attn_call = _block_call(attn.attr, "hidden_states", layer.attn_pre, layer.attn_post, positions, bias)
        mlp_call = _block_call(ff.attr, "hidden_states", layer.mlp_pre, layer.mlp_post)
        total = f"({attn_call} + {mlp_call}){scale}" if scale else f"{attn_call} + {mlp_call}"
        forward = [f"return hidden_states + {total}"]
    elif layer.parallel:
        attn_call = _block_call(attn.attr, "normed", None, layer.attn_post, positions, bias)
        mlp_call = _block_call(ff.attr, "normed", None, layer.mlp_post)
        total = f"({attn_call} + {mlp_call}){scale}" if scale else f"{attn_call} + {mlp_call}"
        forward = [f"normed = self.{layer.attn_pre}(hidden_states)", f"return hidden_states + {total}"]
    elif layer.norm_after_residual:  # post-LN: the norms take the residual sums
        attn_call = _block_call(attn.attr, "hidden_states", layer.attn_pre, None, positions, bias)
        mlp_call = _block_call(ff.attr, "hidden_states", layer.mlp_pre, None)
        forward = [
            f"hidden_states = self.{layer.attn_post}(hidden_states + {attn_call}{scale})",
            f"return self.{layer.mlp_post}(hidden_states + {mlp_call}{scale})",
        ]
    else:
        attn_call = _block_call(attn.attr, "hidden_states", layer.attn_pre, layer.attn_post, positions, bias)
        mlp_call = _block_call(ff.attr, "hidden_states", layer.mlp_pre, layer.mlp_post)
        # the residual times the layer's own vector before a block's add (Doge), where it has one
        if layer.residual_adds:  # depth-scaled adds: scales fixed per layer in __init__
            return [
                f"hidden_states = self.attn_residual_scale * hidden_states + self.attn_output_scale * {attn_call}",
                f"return self.mlp_residual_scale * hidden_states + self.mlp_output_scale * {mlp_call}",
            ]
        attn_res, mlp_res = (
            f"self.{name} * hidden_states" if name else "hidden_states" for name in layer.residual_weights
        )
        forward = [
            f"hidden_states = {attn_res} + {attn_call}{scale}",
            f"return {mlp_res} + {mlp_call}{scale}",
        ]
    return forward


def emit_model(spec: ArchitectureSpec) -> str:
    embedding, rope, positions = spec.embedding, spec.rope, spec.embedding.positions
    padding = ", config.pad_token_id" if embedding.padding_idx else ""
    width = embedding.width
    if embedding.scaled_class:
        embed = f"{embedding.scaled_class}(config.vocab_size, {width}{padding}, {embedding.scale})"
    else:
        embed = f"nn.Embedding(config.vocab_size, {width}{padding})"
    init = [f"self.{embedding.attr} = {embed}"]
    if embedding.project_in:  # both exist exactly when the embedding width differs from the hidden size
        init += [
            f"if {width} != config.hidden_size:",
            f"    self.{embedding.project_in} = nn.Linear({width}, config.hidden_size, bias=False)",
            f"    self.{embedding.project_out} = nn.Linear(config.hidden_size, {width}, bias=False)",
            "else:",
            f"    self.{embedding.project_in} = self.{embedding.project_out} = None",
        ]
    if positions is not None and positions.sinusoidal_base:
        init.append(f"self.{positions.attr} = {positions.class_name}(config)")
    elif positions is not None:
        rows = "config.max_position_embeddings" + (f" + {positions.offset}" if positions.offset else "")
        init.append(f"self.{positions.attr} = nn.Embedding({rows}, config.hidden_size)")
    if embedding.norm and embedding.norm != spec.head.final_norm_attr:  # else the final norm, called twice
        init.append(f"self.{embedding.norm} = {norm_constructor(spec.decoder.norm, 'config.hidden_size')}")
    final_spec = spec.decoder.norm
    if spec.head.final_norm_eps:  # the layers hard-code their epsilon, the final norm reads the config
        final_spec = dataclasses.replace(final_spec, eps=spec.head.final_norm_eps)
    final_norm = norm_constructor(final_spec, "config.hidden_size")
    if spec.head.final_norm_flag:
        final_norm = f"{final_norm} if {spec.head.final_norm_flag} else None"
    layer_class = layer_class_expression(spec) if spec.hybrid is not None else spec.decoder_class
    init.append(
        f"self.{spec.layers_attr} = nn.ModuleList({layer_class}(config, i) for i in range(config.num_hidden_layers))"
    )
    if spec.head.final_norm_attr:
        init.append(f"self.{spec.head.final_norm_attr} = {final_norm}")
    forward = []
    if rope is not None:
        if rope.base_field:  # one rotary module per distinct non-zero base, as transformers builds them
            init.append(
                f"self.{rope.attr} = nn.ModuleList({rope.class_name}(config, base) for base in sorted({{b for b in config.{rope.base_field} if b}}))"
            )
        else:
            init.append(f"self.{rope.attr} = {rope.class_name}(config)")
        if rope.per_layer_type:
            forward = [
                f"position_embeddings = {{layer_type: self.{rope.attr}(inputs_embeds, position_ids, layer_type) for layer_type in self.{rope.attr}.layer_types}}"
            ]
        elif rope.base_field:
            forward = [
                f"position_embeddings = {{rotary.base: rotary(inputs_embeds, position_ids) for rotary in self.{rope.attr}}}"
            ]
        else:
            forward = [f"position_embeddings = self.{rope.attr}(inputs_embeds, position_ids)"]
    hidden = "inputs_embeds"
    if embedding.scale and not embedding.scaled_class:
        init.append(f"self.embed_scale = {embedding.scale}")
        hidden = "inputs_embeds * self.embed_scale"
    if embedding.project_in:
        forward += [
            f"if self.{embedding.project_in} is not None:",
            f"    inputs_embeds = torch.ops.auto_deploy.torch_linear_simple({hidden}, self.{embedding.project_in}.weight, None)",
        ]
        hidden = "inputs_embeds"
    if positions is not None and positions.sinusoidal_base:
        hidden += f" + self.{positions.attr}(inputs_embeds, position_ids)"
    elif positions is not None:
        offset = f" + {positions.offset}" if positions.offset else ""
        hidden += f" + self.{positions.attr}(position_ids{offset})"
    if embedding.norm:
        hidden = f"self.{embedding.norm}({hidden})"
    forward.append(f"hidden_states = {hidden}")
    layers = f"self.{spec.layers_attr}"
    layer_positions = ", temperature" if _takes_temperature(spec) else ""
    if layer_positions:
        beta, period = spec.attention.position_scale
        init += [f"self.position_scale_beta = {beta}", f"self.position_scale_period = {period}"]
        forward.append("temperature = self.attention_temperature(position_ids)")
    shared = getattr(spec.attention, "kv_source", None) and spec.hybrid is None
    if shared:  # each layer's keys and values, by layer index, for the layers that read them
        forward.append("shared_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}")
    layer_positions += ", shared_kv" if shared else ""
    if rope is None:
        forward += [f"for layer in {layers}:", "    hidden_states = layer(hidden_states)"]
    elif rope.per_layer_type:
        tables = (
            "position_embeddings.get(layer_type)"
            if rope.nope_layer_types
            else "position_embeddings[layer_type]"
        )
        forward += [
            f"for layer, layer_type in zip({layers}, self.config.layer_types, strict=True):",
            f"    hidden_states = layer(hidden_states, {tables}{layer_positions})",
        ]
    elif rope.base_field:  # no tables (None) for a layer whose base is 0
        forward += [
            f"for index, layer in enumerate({layers}):",
            f"    hidden_states = layer(hidden_states, position_embeddings.get(self.config.{rope.base_field}[index]){layer_positions})",
        ]
    else:
        forward += [
            f"for layer in {layers}:",
            f"    hidden_states = layer(hidden_states, position_embeddings{layer_positions})",
        ]
    final = spec.head.final_norm_attr
    if final and spec.head.final_norm_flag:
        forward += [f"if self.{final} is not None:", f"    hidden_states = self.{final}(hidden_states)"]
    elif final:
        forward.append(f"hidden_states = self.{final}(hidden_states)")
    if embedding.project_out:
        forward += [
            f"if self.{embedding.project_out} is not None:",
            f"    hidden_states = torch.ops.auto_deploy.torch_linear_simple(hidden_states, self.{embedding.project_out}.weight, None)",
        ]
    if forward[-1] == f"hidden_states = self.{final}(hidden_states)":
        forward[-1] = f"return self.{final}(hidden_states)"
    else:
        forward.append("return hidden_states")
    if embedding.wrapper:  # the embedding and its norm live in a module of their own
        attr, class_name = embedding.wrapper
        inner = [line for line in init if line.startswith(f"self.{attr}.")]
        init = [f"self.{attr} = {class_name}(config)"] + [line for line in init if line not in inner]
        holder = render(
            "embedding_wrapper.py.j2",
            class_name=class_name,
            config_class=spec.config_class,
            init_lines=[line.replace(f"self.{attr}.", "self.", 1) for line in inner],
        )
    else:
        holder = ""
    if spec.per_layer_input is not None:  # computed once per forward, a slice for each layer
        width = f"config.{spec.per_layer_input.width}"
        init += emit_perlayer.model_init_lines(spec, norm_constructor(spec.decoder.norm, width))
        forward = emit_perlayer.model_forward_lines(forward, spec)
    methods = emit_perlayer.model_method(spec)
    if spec.stack_attr:  # the inner model only holds the decoder stack, as transformers' does
        stack = render(
            "model.py.j2",
            spec=spec,
            class_name=spec.stack_class,
            init_lines=init,
            forward_lines=forward,
            methods=methods,
        )
        wrapper = render(
            "model_wrapper.py.j2", spec=spec, stack=f"self.{spec.stack_attr}", stack_class=spec.stack_class
        )
        return (holder + "\n\n" if holder else "") + stack.rstrip("\n") + "\n\n\n" + wrapper
    model = render(
        "model.py.j2",
        spec=spec,
        class_name=spec.model_class,
        init_lines=init,
        forward_lines=forward,
        temperature=bool(layer_positions),
        temperature_offset=getattr(spec.attention, "position_scale_offset", 0),
        temperature_power=getattr(spec.attention, "position_scale_power", False),
        methods=methods,
    )
    return (holder + "\n\n" if holder else "") + model


def _emit_sinusoidal_positions(spec: ArchitectureSpec) -> str:
    positions = spec.embedding.positions
    if positions is None or not positions.sinusoidal_base:
        return ""
    return render("sinusoidal_positions.py.j2", positions=positions, config_class=spec.config_class)


def emit_head_transform(spec: ArchitectureSpec) -> str:
    transform = spec.head.transform
    if transform is None:
        return ""
    return render(
        "head_transform.py.j2",
        transform=transform,
        config_class=spec.config_class,
        norm=norm_constructor(transform.norm, "config.hidden_size"),
    )


def emit_causal_lm(spec: ArchitectureSpec) -> str:
    return render(
        "causal_lm.py.j2",
        spec=spec,
        output_class=_output_class(spec),
        logits_attr=spec.head.logits_value.removeprefix("config.") if spec.head.logits_value else None,
    )


#: Emitter of each block spec kind: the attention and feed-forward slots dispatch through this table.
EMITTERS: dict[type, Callable[[Any, ArchitectureSpec], str]] = {
    AttentionSpec: emit_attention,
    MLPSpec: emit_mlp,
    DecoderLayerSpec: emit_decoder_layer,
    NormSpec: emit_norm,
    MoESpec: emit_moe_slot,
    MLASpec: emit_mla_slot,
}


def emit(block: Any, spec: ArchitectureSpec) -> str:
    emitter = EMITTERS.get(type(block))
    if emitter is None:
        raise UnsupportedFeature(
            getattr(block, "class_name", type(block).__name__),
            f"no emitter for {type(block).__name__}",
            _HINT,
        )
    return emitter(block, spec)


# ------------------------------------------------------------------------------------------ file


def describe(spec: ArchitectureSpec) -> str:
    """Module docstring: what the file mirrors, its features, and what was left out."""
    layer, attn, ff, rope = spec.decoder, spec.attention, spec.feed_forward, spec.rope
    norm = {"rms": "RMSNorm", "layer": "LayerNorm"}[layer.norm.kind] + (
        " (1 + weight)" if layer.norm.offset else ""
    )
    if layer.parallel and layer.mlp_pre:
        layout = f"decoder layers with parallel attention and MLP, each after its own {norm}"
    elif layer.parallel:
        layout = f"decoder layers with parallel attention and MLP after one {norm}"
    elif layer.norm_after_residual:
        layout = f"post-LN decoder layers ({norm} of each residual sum)"
    elif layer.attn_pre and layer.attn_post:
        layout = f"decoder layers with {norm} before and after attention and MLP"
    elif layer.attn_post:
        layout = f"decoder layers with {norm} after attention and MLP (post-norm)"
    else:
        layout = f"pre-norm decoder layers with {norm}"
    # MHA and MQA are edge cases of grouped-query attention
    attention = "multi-head latent attention" if isinstance(attn, MLASpec) else "grouped-query attention"
    features = [layout]
    if spec.embedding.positions is not None and spec.embedding.positions.sinusoidal_base:
        features.append("fixed sinusoidal position embeddings")
    elif spec.embedding.positions is not None:
        features.append("learned absolute position embeddings")
    if rope is not None and rope.fixed_base is not None:
        style = "interleaved " if rope.style == "interleaved" else ""
        partial = "partial " if rope.partial else ""
        features.append(f"{partial}{style}rotary position embeddings (base {rope.fixed_base:g})")
    elif rope is not None:
        runtime = [kind for kind in ("longrope", "dynamic") if kind in rope.rope_types]
        kinds = ", ".join(["default", "linear", "llama3", "yarn", "proportional", *runtime])
        style = "interleaved " if rope.style == "interleaved" else ""
        partial = "partial " if rope.partial else ""
        features.append(f"{partial}{style}rotary position embeddings ({kinds})")
    if getattr(attn, "alibi", False):
        attention += " with ALiBi biases"
    if getattr(attn, "fused_qkv", False) and attn.qkv_groups != "1":
        attention += (
            " (q/k/v fused, grouped per "
            + (
                "head"
                if attn.qkv_groups == "self.num_heads"
                else "KV head"
                if attn.qkv_groups == "self.num_kv_heads"
                else f"{attn.qkv_groups} groups"
            )
            + ")"
        )
    features.append(attention + (" with q/k norm" if getattr(attn, "qk_norm", None) else ""))
    features.append(
        {
            "gated": "a gated MLP",
            "fused_gated": "a gated MLP with a fused gate/up projection",
            "plain": "a plain MLP",
        }.get(getattr(ff, "kind", ""), "mixture-of-experts feed-forward layers")
    )
    extras = [
        note
        for note in spec.notes
        if any(
            word in note
            for word in ("sliding", "soft-cap", "scaled", "logits", "NoPE", "different widths", "value heads")
        )
    ]
    if spec.head.transform is not None:
        transform = spec.head.transform
        extras.append(
            f"a prediction head ({transform.dense.name}, {transform.act_attr}, {transform.norm_attr}) before the output projection"
        )
    extras += [note for note in spec.notes if note.endswith("(nn.Identity elsewhere)")]
    if spec.per_layer_input is not None:
        per_layer = spec.per_layer_input
        extras.append(
            f"per-layer inputs: each decoder layer mixes in config.{per_layer.width} channels of its own per"
            f" token ({per_layer.table} rows plus the normalised {per_layer.projection} of the input"
            " embeddings) after attention and MLP; 0 builds none"
        )
    unsupported = [note.split(":")[0] for note in spec.notes if note.endswith("by this file")]
    if unsupported:  # flags whose other value builds other modules or attention than this file's
        extras.append(
            f"not for configs with {', '.join(dict.fromkeys(unsupported))} (measured: other modules)"
        )
    if any(linear.transposed for linear in (*getattr(attn, "projections", ()), *getattr(ff, "inputs", ()))):
        extras.append("checkpoint linears stored as transformers' Conv1D ([in, out]) are transposed on load")
    extra = f" Also: {'; '.join(extras)}." if extras else ""
    lines = [
        f"Lean, export-friendly {_prefix(spec)} on canonical ``auto_deploy`` ops.",
        "",
        f"Mirrors ``{spec.hf_module}`` ({spec.causal_lm_class}): {', '.join(features[:-1])} and {features[-1]}.{extra}"
        " Module names equal the checkpoint keys, so HuggingFace state dicts load with ``strict=True``.",
        "",
        "Left out on purpose: KV cache, attention masks (attention is causal), dropout, gradient"
        " checkpointing, attention-implementation switches, ``repeat_kv`` (the attention op handles GQA),"
        " position-id generation (callers pass them), hidden-state/attention outputs and the loss."
        "\n Linear and reshape calls carry tensor-parallel sharding hints; they do not change the numbers.",
    ]
    return _wrap("\n".join(lines))


def _wrap(text: str, width: int = 100) -> str:
    paragraphs = text.split("\n\n")
    return (
        "\n\n".join(
            "\n".join(
                textwrap.fill(line.strip(), width=width, break_long_words=False, break_on_hyphens=False)
                for line in p.split("\n")
            )
            for p in paragraphs
        )
        + "\n"
    )


def generate_model_file(spec: ArchitectureSpec) -> str:
    """Source text of ``modeling_<model_type>.py`` for ``spec``, ruff-formatted when ruff is present."""
    embedding = spec.embedding
    if spec.hybrid is not None:  # layers whose token mixer is not (only) attention
        return _generate_hybrid(spec)
    blocks = [
        emit_rope_frequencies(spec),
        render("alibi.py.j2") if getattr(spec.attention, "alibi", False) else "",
        _emit_sinusoidal_positions(spec),
        render("output.py.j2", output_class=_output_class(spec)),
        *(emit(norm, spec) for norm in spec.norm_specs),
        render("embedding_scaled.py.j2", class_name=embedding.scaled_class) if embedding.scaled_class else "",
        emit_rotary(spec),
        emit(spec.feed_forward, spec),
        emit(spec.attention, spec),
        emit(spec.decoder, spec),
        emit_model(spec),
        emit_head_transform(spec),
        emit_causal_lm(spec),
    ]
    body = "\n\n".join(block.rstrip("\n") + "\n" for block in blocks if block.strip())
    header = render("header.py.j2", docstring=docstring_text(describe(spec)), config_class=spec.config_class)
    return format_source(header + "\n\n" + body)


def _generate_hybrid(spec: ArchitectureSpec) -> str:
    if getattr(spec.attention, "kv_source", None):
        raise UnsupportedFeature(spec.attention.class_name, "cross-layer KV sharing in a hybrid stack", _HINT)
    blocks = [
        emit_rope_frequencies(spec),
        render("output.py.j2", output_class=_output_class(spec)),
        *(emit(norm, spec) for norm in spec.norm_specs),
        emit_rotary(spec),
        *emit_hybrid_blocks(spec),
        emit_model(spec),
        emit_causal_lm(spec),
    ]
    body = "\n\n".join(block.rstrip("\n") + "\n" for block in blocks if block.strip())
    docstring = docstring_text(_wrap(describe_hybrid(spec)))
    header = render("header.py.j2", docstring=docstring, config_class=spec.config_class)
    return format_source(header + "\n\n" + body)


def docstring_text(text: str) -> str:
    """``text`` made safe inside a triple-quoted docstring: backslashes and triple quotes escaped."""
    text = text.replace("\\", "\\\\").replace('"""', '\\"\\"\\"')
    return text[:-1] + '\\"' if text.endswith('"') else text


def format_source(source: str) -> str:
    """``ruff check --fix`` (unused imports F401, import order I) and ``ruff format``; unchanged (with
    a warning) without ruff or when ruff fails.

    ``--isolated`` and an empty working folder keep the output the same wherever the command runs
    (no project settings, no local module taken for first party).
    """
    ruff = ruff_command()
    if ruff is None:
        logger.warning("ruff is not installed: the generated file is left unformatted")
        return source
    settings = ["--isolated", "--line-length", "110", "--target-version", "py310"]
    first_party = ["--config", "lint.isort.known-first-party=['onboardlm']"]
    for args in (["check", "--fix", "--select", "F401,I", "--quiet", *first_party], ["format"]):
        with tempfile.TemporaryDirectory(prefix="onboardlm-ruff-") as empty:
            done = subprocess.run(
                [*ruff, *args, *settings, "--stdin-filename", "modeling.py", "-"],
                input=source,
                capture_output=True,
                text=True,
                check=False,
                cwd=empty,
            )
        if done.returncode != 0:  # the file is kept as generated; the verify phase reports real errors
            logger.warning("ruff %s failed on the generated file: %s", args[0], done.stderr.strip()[:300])
            continue
        source = done.stdout
    return source


def ruff_command() -> list[str] | None:
    """The pinned ruff of this environment (the binary of the installed ``ruff`` package), never
    another ruff first on PATH; None when this install lacks it."""
    try:
        from ruff import find_ruff_bin

        return [os.fsdecode(find_ruff_bin())]
    except (ImportError, FileNotFoundError):
        return None
