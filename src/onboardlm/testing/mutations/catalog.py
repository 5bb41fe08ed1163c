"""Plausible porting bugs, each an AST edit of a generated lean model file.

A kind edits every site of its pattern at once (a bug made once is usually made everywhere, e.g. the
same wrong epsilon in every norm) and returns the lines it changed; no line means the file has no
such construct and the kind does not apply. Numeric perturbations are small on purpose (3-5 %,
epsilon x10, a window one token longer): the point is whether the generated tests see them.
"""

from __future__ import annotations

import ast
import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from onboardlm.testing.mutations.edits import (
    call_attr,
    classes,
    constructed_attrs,
    is_self_attr,
    method,
    parse_expr,
    replace_in_parent,
    scaled,
    self_assignments,
    shifted,
)

__all__ = ["KINDS", "Kind", "Mutant", "kinds_by_name", "mutants"]

Edit = Callable[[ast.Module], list[int]]
#: Why a kind cannot change the numbers on a test config (its fields as literals), or None.
Requirement = Callable[[dict[str, Any]], str | None]


@dataclass(frozen=True)
class Kind:
    name: str
    bug: str
    edit: Edit
    requires: Requirement | None = None


@dataclass(frozen=True)
class Mutant:
    """One kind applied to one file: the mutated source and the original lines it changed."""

    kind: str
    bug: str
    source: str
    lines: tuple[int, ...]


# -------------------------------------------------------------------------------- scalar factors


def _scale_assignments(attrs: tuple[str, ...], factor: float, first_only: bool = False) -> Edit:
    """``self.<attr> = E`` -> ``E * factor`` (only the first assignment per class with ``first_only``)."""

    def edit(tree: ast.Module) -> list[int]:
        lines = []
        for cls in classes(tree):
            for attr in attrs:
                for node in self_assignments(cls, attr):
                    node.value = scaled(node.value, factor)
                    lines.append(node.lineno)
                    if first_only:
                        break
        return lines

    return edit


def _rope_base(tree: ast.Module) -> list[int]:
    """``...["rope_theta"]`` read as the RoPE base -> 5 % larger."""
    lines = []
    for node in list(ast.walk(tree)):
        if (
            isinstance(node, ast.Subscript)
            and isinstance(node.slice, ast.Constant)
            and node.slice.value == "rope_theta"
        ):
            replace_in_parent(tree, node, scaled(copy.deepcopy(node), 1.05))
            lines.append(node.lineno)
    return lines


def _partial_rotary(tree: ast.Module) -> list[int]:
    """``partial_rotary_factor`` read from the config -> 1.0 (rotate the whole head)."""
    lines = []
    for node in list(ast.walk(tree)):
        reads_factor = (
            isinstance(node, ast.Call)
            and call_attr(node) == "get"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and node.args[0].value == "partial_rotary_factor"
        ) or (isinstance(node, ast.Attribute) and node.attr == "partial_rotary_factor")
        if reads_factor and replace_in_parent(tree, node, ast.Constant(1.0)):
            lines.append(node.lineno)
    return lines


def _rope_scaling_ignored(tree: ast.Module) -> list[int]:
    """``rope_type != "default"`` -> False: every RoPE scaling (yarn, llama3, linear, mscale) ignored."""
    lines = []
    for node in list(ast.walk(tree)):
        if (
            isinstance(node, ast.Compare)
            and len(node.ops) == 1
            and isinstance(node.ops[0], ast.NotEq)
            and isinstance(node.comparators[0], ast.Constant)
            and node.comparators[0].value == "default"
            and replace_in_parent(tree, node, ast.Constant(False))
        ):
            lines.append(node.lineno)
    return lines


# -------------------------------------------------------------------------------- RoPE application

_ROPE_OPS = ("torch_rope_with_explicit_cos_sin", "torch_rope_with_qk_interleaving")


def _rope_layout(tree: ast.Module) -> list[int]:
    """Rotate-half (NeoX) RoPE <-> interleaved-pair RoPE."""
    lines = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in _ROPE_OPS
        ):
            first, second = _ROPE_OPS
            node.func.attr = second if node.func.attr == first else first
            lines.append(node.lineno)
    return lines


def _cos_sin_swapped(tree: ast.Module) -> list[int]:
    """cos and sin passed the other way round to the RoPE op."""
    lines = []
    for node in ast.walk(tree):
        if call_attr(node) in _ROPE_OPS and len(node.args) >= 4:
            node.args[2], node.args[3] = node.args[3], node.args[2]
            lines.append(node.lineno)
    return lines


# -------------------------------------------------------------------------------- norms


def _norm_eps(tree: ast.Module) -> list[int]:
    """Every norm epsilon x10 (``self.*eps* = ...`` in norm classes, ``eps=`` of LayerNorm calls)."""
    lines = []
    for cls in classes(tree):
        for node in ast.walk(cls):
            if (
                isinstance(node, ast.Assign)
                and len(node.targets) == 1
                and is_self_attr(node.targets[0])
                and "eps" in node.targets[0].attr
                and cls.name.endswith("Norm")
            ):
                node.value = scaled(node.value, 10.0)
                lines.append(node.lineno)
            if isinstance(node, ast.Call) and call_attr(node) in ("LayerNorm", "layer_norm"):
                for keyword in node.keywords:
                    if keyword.arg == "eps":
                        keyword.value = scaled(keyword.value, 10.0)
                        lines.append(node.lineno)
    return lines


def _is_one(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and node.value in (1, 1.0) and not isinstance(node.value, bool)


def _norm_offset(tree: ast.Module) -> list[int]:
    """Norm scale ``(1 + weight)`` <-> ``weight`` in every norm class's forward."""
    lines = []
    for cls in classes(tree, "Norm"):
        forward = method(cls, "forward")
        if forward is None:
            continue
        offsets = [
            node
            for node in ast.walk(forward)
            if isinstance(node, ast.BinOp)
            and isinstance(node.op, ast.Add)
            and _is_one(node.left)
            and is_self_attr(node.right, "weight")
        ]
        if offsets:
            for node in offsets:
                replace_in_parent(forward, node, node.right)
                lines.append(node.lineno)
            continue
        for node in [n for n in ast.walk(forward) if is_self_attr(n, "weight")]:
            replace_in_parent(forward, node, parse_expr("(1.0 + self.weight)"))
            lines.append(node.lineno)
    return lines


def _decoder_parts(cls: ast.ClassDef) -> tuple[set[str], set[str]]:
    return constructed_attrs(cls, ("Attention",)), constructed_attrs(cls, ("Norm", "LayerNorm"))


def _self_call(node: ast.AST, names: set[str]) -> bool:
    return isinstance(node, ast.Call) and is_self_attr(node.func) and node.func.attr in names


def _norm_placement(tree: ast.Module) -> list[int]:
    """The attention's norm moved to the other side: pre-norm becomes post-norm and vice versa."""
    lines = []
    for cls in classes(tree, "DecoderLayer"):
        forward = method(cls, "forward")
        attention, norms = _decoder_parts(cls)
        if forward is None or not attention or not norms:
            continue
        bound = {
            node.targets[0].id: node.value
            for node in ast.walk(forward)
            if isinstance(node, ast.Assign)
            and isinstance(node.targets[0], ast.Name)
            and _self_call(node.value, norms)
        }
        for node in list(ast.walk(forward)):
            if _self_call(node, attention) and node.args:
                first = node.args[0]
                if isinstance(first, ast.Name) and first.id in bound:
                    first = bound[first.id]
                if _self_call(first, norms):  # attn(norm(x)) -> norm(attn(x))
                    assert isinstance(first, ast.Call)
                    node.args[0] = first.args[0]
                    replace_in_parent(forward, node, ast.Call(first.func, [node], []))
                    lines.append(node.lineno)
                    break
            if _self_call(node, norms) and node.args and _self_call(node.args[0], attention):
                inner = node.args[0]  # norm(attn(x)) -> attn(norm(x))
                assert isinstance(inner, ast.Call)
                inner.args[0] = ast.Call(node.func, [inner.args[0]], [])
                replace_in_parent(forward, node, inner)
                lines.append(node.lineno)
                break
    return lines


def _qk_norm_dropped(tree: ast.Module) -> list[int]:
    """The per-head q/k norm is not applied (``q = self.q_norm(q)`` -> ``q = q``)."""
    lines = []
    for cls in classes(tree, "Attention"):
        forward = method(cls, "forward")
        for node in ast.walk(forward) if forward is not None else ():
            if (
                isinstance(node, ast.Assign)
                and isinstance(node.value, ast.Call)
                and is_self_attr(node.value.func)
                and node.value.func.attr in ("q_norm", "k_norm", "q_layernorm", "k_layernorm")
                and node.value.args
            ):
                node.value = node.value.args[0]
                lines.append(node.lineno)
    return lines


# -------------------------------------------------------------------------------- attention


def _gqa_mapping(tree: ast.Module) -> list[int]:
    """K/V heads tiled (``repeat``) instead of grouped: query head h reads KV head h % n_kv, not h // g."""
    lines = []
    for cls in classes(tree, "Attention"):
        for node in ast.walk(cls):
            if call_attr(node) != "torch_attention" or len(node.args) < 3:
                continue
            layout = next((k.value for k in node.keywords if k.arg == "layout"), None)
            dim = 1 if isinstance(layout, ast.Constant) and layout.value == "bnsd" else 2
            repeats = ["1", "1", "1", "1"]
            repeats[dim] = "self.num_heads // self.num_kv_heads"
            for index in (1, 2):
                tiled = parse_expr(f"_x.repeat({', '.join(repeats)})")
                assert isinstance(tiled, ast.Call) and isinstance(tiled.func, ast.Attribute)
                tiled.func.value = node.args[index]
                node.args[index] = tiled
            lines.append(node.lineno)
    return lines


def _grouped_query(fields: dict[str, Any]) -> str | None:
    heads, kv = fields.get("num_attention_heads"), fields.get("num_key_value_heads")
    if isinstance(heads, int) and isinstance(kv, int) and 1 < kv < heads:
        return None
    return f"no KV-head grouping to get wrong: {heads} query heads, {kv} KV heads"


def _keyword_to_none(names: tuple[str, ...]) -> Edit:
    def edit(tree: ast.Module) -> list[int]:
        lines = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                for keyword in node.keywords:
                    if keyword.arg in names and not (
                        isinstance(keyword.value, ast.Constant) and keyword.value.value is None
                    ):
                        keyword.value = ast.Constant(None)
                        lines.append(node.lineno)
        return lines

    return edit


def _forward_reads(tree: ast.Module, attr: str, replacement: str) -> list[int]:
    """``self.<attr>`` read in a forward -> ``replacement`` (``{}`` stands for the read)."""
    lines = []
    for cls in classes(tree):
        forward = method(cls, "forward")
        if forward is None:
            continue
        for node in list(ast.walk(forward)):
            if is_self_attr(node, attr) and isinstance(node.ctx, ast.Load):
                replace_in_parent(forward, node, parse_expr(replacement.format(ast.unparse(node))))
                lines.append(node.lineno)
    return lines


def _ssm_skip(tree: ast.Module) -> list[int]:
    """The SSM's ``D * x`` skip connection left out."""
    return _forward_reads(tree, "D", "({} * 0)")


def _ssm_argument(index: int, replacement: str, op: str = "torch_ssm") -> Edit:
    """Positional argument ``index`` of every ``op`` call (``torch_ssm``) -> ``replacement``."""

    def edit(tree: ast.Module) -> list[int]:
        lines = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and call_attr(node) == op and len(node.args) > index:
                node.args[index] = parse_expr(replacement.format(ast.unparse(node.args[index])))
                lines.append(node.lineno)
        return lines

    return edit


def _rg_lru_gates_swapped(tree: ast.Module) -> list[int]:
    """``torch_rg_lru``'s input-gate weight and bias passed as the recurrence gate's, and back."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and call_attr(node) == "torch_rg_lru" and len(node.args) > 4:
            node.args[1], node.args[2], node.args[3], node.args[4] = (
                node.args[3],
                node.args[4],
                node.args[1],
                node.args[2],
            )
            lines.append(node.lineno)
    return lines


def _gate_order(tree: ast.Module) -> list[int]:
    """The gated norm's SiLU gate on the other side of the norm."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and call_attr(node) == "torch_rmsnorm_gated":
            for keyword in node.keywords:
                if keyword.arg == "norm_before_gate" and isinstance(keyword.value, ast.Constant):
                    keyword.value = ast.Constant(not keyword.value.value)
                    lines.append(node.lineno)
    return lines


def _sliding_window(tree: ast.Module) -> list[int]:
    """The sliding window one token longer."""
    lines = []
    for node in list(ast.walk(tree)):
        if (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and is_self_attr(node.targets[0], "sliding_window")
        ):
            for read in [
                n for n in ast.walk(node.value) if isinstance(n, ast.Attribute) and n.attr == "sliding_window"
            ]:
                if node.value is read:
                    node.value = shifted(read, 1)
                else:
                    replace_in_parent(node.value, read, shifted(copy.deepcopy(read), 1))
                lines.append(node.lineno)
    return lines


# -------------------------------------------------------------------------------- linear layers


def _biased_linears(cls: ast.ClassDef) -> set[str]:
    """Attributes ``__init__`` builds as ``nn.Linear(..., bias=X)`` with X not the literal False."""
    found = set()
    for node in ast.walk(cls):
        if (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and is_self_attr(node.targets[0])
            and call_attr(node.value) == "Linear"
        ):
            assert isinstance(node.value, ast.Call) and isinstance(node.targets[0], ast.Attribute)
            bias = next((k.value for k in node.value.keywords if k.arg == "bias"), ast.Constant(True))
            if not (isinstance(bias, ast.Constant) and bias.value is False):
                found.add(node.targets[0].attr)
    return found


def _dropped_bias(tree: ast.Module) -> list[int]:
    """Linear biases loaded but not applied: every ``self.<proj>.bias`` of a linear that can have one
    (not built with ``bias=False``), passed to an op, becomes None."""
    lines = []
    for cls in classes(tree):
        biased = _biased_linears(cls)
        for node in ast.walk(cls):
            if not isinstance(node, ast.Call):
                continue
            for index, arg in enumerate(node.args):
                if (
                    isinstance(arg, ast.Attribute)
                    and arg.attr == "bias"
                    and isinstance(arg.value, ast.Attribute)
                    and is_self_attr(arg.value)
                    and arg.value.attr in biased
                ):
                    node.args[index] = ast.Constant(None)
                    lines.append(node.lineno)
    return lines


_OTHER_ACTIVATION = (
    '{"gelu": "gelu_pytorch_tanh", "gelu_pytorch_tanh": "gelu", "gelu_new": "gelu"}.get(_a, "gelu")'
)


def _activation(tree: ast.Module) -> list[int]:
    """A neighbouring activation: SiLU -> GELU, exact GELU <-> tanh GELU; MoE SiLU <-> GELU; GPT-OSS's
    swish alpha 1.702 (GELU-like) -> 1.0 (SiLU)."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == "ACT2FN":
            other = parse_expr(_OTHER_ACTIVATION)
            assert isinstance(other, ast.Call)
            other.args[0] = node.slice
            node.slice = other
            lines.append(node.lineno)
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "ActivationType"
            and node.attr in ("Silu", "Gelu")
        ):
            node.attr = "Gelu" if node.attr == "Silu" else "Silu"
            lines.append(node.lineno)
    for cls in classes(tree):
        for node in self_assignments(cls, "alpha"):
            node.value = ast.Constant(1.0)
            lines.append(node.lineno)
    return lines


# -------------------------------------------------------------------------------- MoE


def _top_k(tree: ast.Module) -> list[int]:
    """One expert fewer per token."""
    lines = []
    for cls in classes(tree):
        for node in self_assignments(cls, "top_k"):
            node.value = shifted(node.value, -1)
            lines.append(node.lineno)
    return lines


def _renormalisation(tree: ast.Module) -> list[int]:
    """Top-k weights renormalised when they should not be, or not when they should."""
    lines = []
    for cls in classes(tree):
        forward = method(cls, "forward")
        for node in list(ast.walk(forward)) if forward is not None else ():
            if isinstance(node, ast.If) and is_self_attr(node.test, "norm_topk_prob"):
                node.test = ast.UnaryOp(ast.Not(), node.test)
                lines.append(node.lineno)
        if lines or forward is None:
            continue
        for node in list(ast.walk(forward)):
            if (
                isinstance(node, ast.Assign)
                and isinstance(node.value, ast.BinOp)
                and isinstance(node.value.op, ast.Div)
                and any(call_attr(n) == "sum" for n in ast.walk(node.value.right))
            ):
                replace_in_parent(forward, node, ast.Pass())
                lines.append(node.lineno)
    return lines


def _shared_expert_gate(tree: ast.Module) -> list[int]:
    """The shared expert's sigmoid gate left out (``sigmoid(g) * shared`` -> ``shared``)."""
    lines = []
    for node in list(ast.walk(tree)):
        if (
            isinstance(node, ast.BinOp)
            and isinstance(node.op, ast.Mult)
            and call_attr(node.left) == "sigmoid"
            and replace_in_parent(tree, node, node.right)
        ):
            lines.append(node.lineno)
    return lines


def _output_gate(tree: ast.Module) -> list[int]:
    """The attention output gate left out (``attn * sigmoid(gate)`` -> ``attn``)."""
    lines = []
    for cls in classes(tree, "Attention"):
        for node in list(ast.walk(cls)):
            if (
                isinstance(node, ast.BinOp)
                and isinstance(node.op, ast.Mult)
                and call_attr(node.right) == "sigmoid"
                and replace_in_parent(cls, node, node.left)
            ):
                lines.append(node.lineno)
    return lines


def _output_bias(tree: ast.Module) -> list[int]:
    """An attention output bias held on some layers only (GPT-NeoX-Japanese's ``dense_bias``) never
    added: ``add_output_bias`` returns its input unchanged."""
    lines = []
    for cls in classes(tree, "Attention"):
        found = method(cls, "add_output_bias")
        if found is None or not found.args.args[1:]:
            continue
        found.body = [ast.Return(ast.Name(found.args.args[1].arg, ast.Load()))]
        lines.append(found.lineno)
    return lines


def _inner_norm(tree: ast.Module) -> list[int]:
    """A norm inside the attention or the MLP (BitNet's sub-norms before the output/down
    projection) not applied: ``x = self.<...norm>(y)`` -> ``x = y``; q/k norms are another kind."""
    lines = []
    for cls in [*classes(tree, "Attention"), *classes(tree, "MLP")]:
        forward = method(cls, "forward")
        for node in ast.walk(forward) if forward is not None else ():
            if (
                isinstance(node, ast.Assign)
                and isinstance(node.value, ast.Call)
                and is_self_attr(node.value.func)
                and "norm" in node.value.func.attr
                and node.value.func.attr not in ("q_norm", "k_norm", "q_layernorm", "k_layernorm")
                and len(node.value.args) == 1
            ):
                node.value = node.value.args[0]
                lines.append(node.lineno)
    return lines


def _rope_direction(tree: ast.Module) -> list[int]:
    """q/k rotated by the angle instead of minus the angle: ``sin = -sin`` left out."""
    lines = []
    for cls in classes(tree, "Attention"):
        forward = method(cls, "forward")
        if forward is None:
            continue
        for node in list(ast.walk(forward)):
            if (
                isinstance(node, ast.Assign)
                and [ast.unparse(t) for t in node.targets] == ["sin"]
                and ast.unparse(node.value) == "-sin"
            ):
                node.value = ast.Name("sin", ast.Load())
                lines.append(node.lineno)
    return lines


def _temperature(tree: ast.Module) -> list[int]:
    """The attention temperature per position not applied (``q = q * temperature[...]`` -> ``q = q``)."""
    lines = []
    for cls in classes(tree, "Attention"):
        forward = method(cls, "forward")
        for node in ast.walk(forward) if forward is not None else ():
            if (
                isinstance(node, ast.Assign)
                and [ast.unparse(t) for t in node.targets] == ["q"]
                and isinstance(node.value, ast.BinOp)
                and isinstance(node.value.op, ast.Mult)
                and any(isinstance(n, ast.Name) and n.id == "temperature" for n in ast.walk(node.value.right))
            ):
                node.value = node.value.left
                lines.append(node.lineno)
    return lines


# -------------------------------------------------------------------------------- embeddings


def _untied(tree: ast.Module) -> list[int]:
    """Tied input/output embeddings not declared: ``_tied_weights_keys`` removed."""
    lines = []
    for cls in classes(tree):
        kept = []
        for node in cls.body:
            if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "_tied_weights_keys" for t in node.targets
            ):
                lines.append(node.lineno)
            else:
                kept.append(node)
        cls.body = kept or [ast.Pass()]
    return lines


# -------------------------------------------------------------------------------- cross-layer KV sharing


def _is_rope(node: ast.stmt) -> bool:
    """A statement that rotates by RoPE: ``q, k = ops.torch_rope_*(...)``, or a block holding one."""
    return any(
        (call_attr(n) or "").startswith("torch_rope") for n in ast.walk(node) if isinstance(n, ast.Call)
    )


def _kv_store(node: ast.stmt) -> bool:
    """``shared_kv[...] = (k, v)``: the keys and values a layer leaves for the layers that read them."""
    return (
        isinstance(node, ast.Assign)
        and isinstance(node.targets[0], ast.Subscript)
        and isinstance(node.targets[0].value, ast.Name)
        and node.targets[0].value.id == "shared_kv"
    )


def _sharing_branches(tree: ast.Module) -> Iterable[ast.If]:
    """``if self.kv_source == self.layer_idx: <own keys and values> else: <another layer's>``."""
    for cls in classes(tree, "Attention"):
        forward = method(cls, "forward")
        for node in ast.walk(forward) if forward is not None else ():
            if isinstance(node, ast.If) and any(_kv_store(stmt) for stmt in node.body) and node.orelse:
                yield node


def _shared_query_unrotated(tree: ast.Module) -> list[int]:
    """A layer reading another layer's keys and values leaves its queries unrotated."""
    lines = []
    for branch in _sharing_branches(tree):
        kept = [stmt for stmt in branch.orelse if not _is_rope(stmt)]
        lines += [stmt.lineno for stmt in branch.orelse if _is_rope(stmt)]
        branch.orelse = kept or [ast.Pass()]
    return lines


def _stored_before_rope(tree: ast.Module) -> list[int]:
    """The keys left for other layers are stored before RoPE rotates them."""
    lines = []
    for branch in _sharing_branches(tree):
        store = next(stmt for stmt in branch.body if _kv_store(stmt))
        rope = next((i for i, stmt in enumerate(branch.body) if _is_rope(stmt)), None)
        if rope is None:
            continue
        branch.body.remove(store)
        branch.body.insert(rope, store)
        lines.append(store.lineno)
    return lines


def _per_layer_input_dropped(tree: ast.Module) -> list[int]:
    """A decoder layer's per-layer input (Gemma 4) not mixed in: ``self.mix_per_layer_input(h, x)`` -> ``0``."""
    lines = []
    for cls in classes(tree):
        forward = method(cls, "forward")
        for node in list(ast.walk(forward)) if forward is not None else ():
            if isinstance(node, ast.Call) and is_self_attr(node.func, "mix_per_layer_input"):
                replace_in_parent(forward, node, ast.Constant(0))
                lines.append(node.lineno)
    return lines


def _per_layer_input_first_layer(tree: ast.Module) -> list[int]:
    """Every layer given the first layer's per-layer input (the packed table read without the layer
    index): ``per_layer_inputs[:, :, index]`` -> ``per_layer_inputs[:, :, 0]``."""
    lines = []
    for cls in classes(tree):
        forward = method(cls, "forward")
        for node in list(ast.walk(forward)) if forward is not None else ():
            if (
                isinstance(node, ast.Subscript)
                and ast.unparse(node.value) == "per_layer_inputs"
                and isinstance(node.slice, ast.Tuple)
                and isinstance(node.slice.elts[-1], ast.Name)
            ):
                node.slice.elts[-1] = ast.Constant(0)
                lines.append(node.lineno)
    return lines


KINDS: tuple[Kind, ...] = (
    Kind("attention_scale", "softmax scale 3 % off", _scale_assignments(("scaling",), 1.03, first_only=True)),
    Kind("attention_softcap", "attention logit soft-cap 5 % off", _scale_assignments(("logit_cap",), 1.05)),
    Kind("rope_base", "RoPE base (rope_theta) 5 % off", _rope_base),
    Kind(
        "rope_scaling_ignored",
        "RoPE scaling (yarn/llama3/linear, yarn mscale) ignored",
        _rope_scaling_ignored,
    ),
    Kind("partial_rotary_ignored", "partial rotary factor ignored: whole head rotated", _partial_rotary),
    Kind("rope_layout", "rotate-half RoPE <-> interleaved pairs", _rope_layout),
    Kind("rope_cos_sin_swapped", "cos and sin swapped", _cos_sin_swapped),
    Kind("norm_eps", "norm epsilon x10", _norm_eps),
    Kind("norm_offset", "norm scale (1 + w) <-> w", _norm_offset),
    Kind("norm_placement", "attention norm on the other side (pre <-> post)", _norm_placement),
    Kind("qk_norm_dropped", "q/k norm not applied", _qk_norm_dropped),
    Kind(
        "residual_multiplier",
        "residual multiplier 3 % off",
        _scale_assignments(("residual_multiplier",), 1.03),
    ),
    Kind("embedding_multiplier", "embedding multiplier 3 % off", _scale_assignments(("embed_scale",), 1.03)),
    Kind(
        "logits_scaling",
        "output logit scale 3 % off",
        _scale_assignments(("logit_scale", "logits_scaling"), 1.03),
    ),
    Kind(
        "final_logit_softcap",
        "final logit soft-cap 5 % off",
        _scale_assignments(("final_logit_softcapping", "logits_soft_cap"), 1.05),
    ),
    Kind("gqa_mapping", "GQA head mapping h % n_kv instead of h // group", _gqa_mapping, _grouped_query),
    Kind("sliding_window_off_by_one", "sliding window one token longer", _sliding_window),
    Kind("attention_sinks_dropped", "attention sinks not applied", _keyword_to_none(("sinks",))),
    Kind("dropped_bias", "linear biases loaded but not applied", _dropped_bias),
    Kind("activation_swapped", "a neighbouring activation function", _activation),
    Kind("moe_top_k", "MoE top-k one less", _top_k),
    Kind("router_renormalisation", "top-k renormalisation switched", _renormalisation),
    Kind(
        "routed_scaling_factor",
        "routed scaling factor 5 % off",
        _scale_assignments(("routed_scaling_factor",), 1.05),
    ),
    Kind("shared_expert_gate_dropped", "shared-expert sigmoid gate left out", _shared_expert_gate),
    Kind("attention_output_gate_dropped", "attention output sigmoid gate left out", _output_gate),
    Kind("inner_norm_dropped", "norm inside the attention or MLP not applied", _inner_norm),
    Kind("rope_direction", "q/k rotated by the angle, not minus it", _rope_direction),
    Kind(
        "attention_temperature_dropped", "q scale by position (attention temperature) left out", _temperature
    ),
    Kind("attention_output_bias_dropped", "attention output bias of some layers not added", _output_bias),
    Kind(
        "differential_lambda_init",
        "differential attention lambda_init 3 % off",
        _scale_assignments(("lambda_init",), 1.03),
    ),
    Kind("untied_embeddings", "tied embeddings not declared tied", _untied),
    Kind("ssm_skip_dropped", "SSM skip term D * x left out", _ssm_skip),
    Kind("ssm_dt_bias_dropped", "SSM time-step bias not added", _ssm_argument(6, "({} * 0)")),
    Kind("ssm_decay_off", "SSM decay A 5 % off", _ssm_argument(1, "({} * 1.05)")),
    Kind("ssm_gate_order", "gated norm's gate before <-> after the norm", _gate_order),
    Kind(
        "channel_decay_off",
        "per-channel delta rule's log decay 5 % off",
        _ssm_argument(3, "({} * 1.05)", "torch_channel_gated_delta_rule"),
    ),
    Kind(
        "channel_write_strength_off",
        "per-channel delta rule's write strength 5 % off",
        _ssm_argument(4, "({} * 0.95)", "torch_channel_gated_delta_rule"),
    ),
    Kind(
        "rg_lru_gate_scale_off",
        "RG-LRU's recurrence-gate scale (Griffin's c = 8) 5 % off",
        _ssm_argument(6, "({} * 1.05)", "torch_rg_lru"),
    ),
    Kind("rg_lru_gates_swapped", "RG-LRU's input and recurrence gates swapped", _rg_lru_gates_swapped),
    Kind("shared_kv_query_unrotated", "queries of a KV-sharing layer not rotated", _shared_query_unrotated),
    Kind("shared_kv_stored_before_rope", "shared keys stored before RoPE", _stored_before_rope),
    Kind("per_layer_input_dropped", "per-layer input not mixed into the layer", _per_layer_input_dropped),
    Kind(
        "per_layer_input_first_layer",
        "every layer given the first layer's per-layer input",
        _per_layer_input_first_layer,
    ),
)


def kinds_by_name(names: Iterable[str] | None = None) -> list[Kind]:
    """The catalogue, or the named kinds in catalogue order (unknown names raise KeyError)."""
    if names is None:
        return list(KINDS)
    wanted = set(names)
    unknown = wanted - {kind.name for kind in KINDS}
    if unknown:
        raise KeyError(f"unknown mutation kinds: {', '.join(sorted(unknown))}")
    return [kind for kind in KINDS if kind.name in wanted]


def mutants(source: str, kinds: Iterable[Kind] | None = None) -> list[Mutant]:
    """Each kind that applies to ``source``, applied to a fresh copy of its syntax tree."""
    tree = ast.parse(source)
    found = []
    for kind in KINDS if kinds is None else kinds:
        copy_ = copy.deepcopy(tree)
        lines = kind.edit(copy_)
        if lines:
            ast.fix_missing_locations(copy_)
            found.append(Mutant(kind.name, kind.bug, ast.unparse(copy_) + "\n", tuple(sorted(set(lines)))))
    return found
