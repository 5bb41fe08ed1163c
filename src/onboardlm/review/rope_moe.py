"""D rules: RoPE tables and position handling, MoE expert layout."""

from __future__ import annotations

import ast
import re

from onboardlm.review.context import ReviewContext
from onboardlm.review.findings import Flag, Outcome, rule
from onboardlm.review.model_index import AD, ROPE_OPS, ModelIndex, Role
from onboardlm.review.moe import EXPERT_NAME_SETS, expert_assignments, fused_expert_parameters, has_moe
from onboardlm.review.source import FUNCTION_TYPES, argument, call_name, constant_value, dotted_parts

ROPE_TABLE_NAME = re.compile(r"inv_freq|cos|sin|freq|rope|rotary", re.IGNORECASE)
TABLE_ATTRIBUTE = re.compile(r"inv_freq|cos|sin|freqs", re.IGNORECASE)


def has_rope(model: ModelIndex) -> bool:
    uses_op = any(
        q.startswith(AD) and q[len(AD) :].split(".")[0] in ROPE_OPS for _, q in model.src.references()
    )
    return uses_op or bool(model.classes_with_role(Role.ROTARY))


@rule(
    "D",
    "D1",
    "RoPE tables that are not checkpoint weights are non-persistent buffers with the `_ad_` prefix, or are computed in-graph from `inv_freq`.",
)
def check_d1(ctx: ReviewContext) -> Outcome:
    """Judgement: a buffer is a RoPE table when it is registered by a rotary module or its name says
    so (inv_freq, cos, sin, freq, rope); tensor tables kept as plain attributes of a rotary module fail."""
    model, src = ctx.model, ctx.src
    if not has_rope(model):
        return Outcome.not_applicable("the model has no RoPE")
    flags, good = [], []
    for call in src.calls:
        if call_name(call) != "register_buffer" or not call.args:
            continue
        cls = src.enclosing_class(call)
        name = constant_value(call.args[0])
        in_rotary = cls is not None and model.role(cls) is Role.ROTARY
        if not isinstance(name, str):
            if in_rotary:
                flags.append(
                    src.flag(call, "RoPE buffer name is not a literal: cannot check the _ad_ prefix")
                )
            continue
        if not (in_rotary or ROPE_TABLE_NAME.search(name)):
            continue
        problems = [] if name.startswith("_ad_") else [f"{name!r} lacks the _ad_ prefix"]
        if constant_value(argument(call, 2, "persistent")) is not False:
            problems.append(f"{name!r} is persistent (pass persistent=False)")
        flags += [src.flag(call, f"RoPE buffer {p}") for p in problems]
        good += [] if problems else [call]
    flags += _table_attribute_flags(model)
    where = good[0].lineno if good else None
    return Outcome.of(
        flags, "RoPE tables are non-persistent _ad_ buffers or computed in-graph", src.path, where
    )


def _table_attribute_flags(model: ModelIndex) -> list[Flag]:
    src, flags = model.src, []
    for cls in model.classes_with_role(Role.ROTARY):
        for node in ast.walk(cls):
            if not isinstance(node, ast.Assign) or isinstance(node.value, ast.Constant):
                continue
            flags += [
                src.flag(node, f"RoPE table self.{target.attr} is a plain attribute, not an _ad_ buffer")
                for target in node.targets
                if isinstance(target, ast.Attribute)
                and dotted_parts(target.value) == ["self"]
                and TABLE_ATTRIBUTE.search(target.attr)
                and not target.attr.startswith("_ad_")
            ]
    return flags


@rule(
    "D",
    "D2",
    "cos/sin are gathered by `position_ids` once per forward at model level and passed to the layers; layers never receive `position_ids` for RoPE.",
)
def check_d2(ctx: ReviewContext) -> Outcome:
    """``position_ids`` lives only in top-level models and rotary modules (and module-level helpers
    called only from them); they pass it to nothing else, and call the rotary module outside loops.

    Judgement: a rotary module is one that registers ``inv_freq`` or whose class name says rotary/rope.
    """
    model, src = ctx.model, ctx.src
    if not has_rope(model):
        return Outcome.not_applicable("the model has no RoPE")
    allowed = _allowed_scopes(model)
    flags = []
    for fn in (n for n in ast.walk(src.tree) if isinstance(n, FUNCTION_TYPES)):
        inside = fn in allowed
        for node in src.walk(fn):
            if not inside and isinstance(node, ast.arg) and node.arg == "position_ids":
                flags.append(
                    src.flag(node, f"{src.owner(fn)} receives position_ids: pass gathered cos/sin instead")
                )
            elif not inside and isinstance(node, ast.Constant) and node.value == "position_ids":
                flags.append(
                    src.flag(node, f"{src.owner(fn)} reads position_ids: pass gathered cos/sin instead")
                )
            elif inside and isinstance(node, ast.Call):
                flags += _call_flags(model, allowed, node)
    return Outcome.of(_unique(flags), "cos/sin gathered once at model level; layers get no position_ids")


def _unique(flags: list[Flag]) -> list[Flag]:
    return list(dict.fromkeys(flags))


def _allowed_scopes(model: ModelIndex) -> set[ast.AST]:
    """Methods of top-level models and rotary modules, and module functions only they call."""
    src = model.src
    owners = [*model.top_level, *model.classes_with_role(Role.ROTARY)]
    allowed: set[ast.AST] = {fn for cls in owners for fn in cls.body if isinstance(fn, FUNCTION_TYPES)}
    for name, fn in src.functions.items():
        sites = [c for c in src.calls if isinstance(c.func, ast.Name) and c.func.id == name]
        if sites and all(src.enclosing_function(c) in allowed for c in sites):
            allowed.add(fn)
    return allowed


def _call_flags(model: ModelIndex, allowed: set[ast.AST], call: ast.Call) -> list[Flag]:
    """``position_ids`` passed to a callee that is not allowed, or the rotary module called in a loop."""
    src = model.src
    callee = _callee_class(model, call)
    if callee is not None and model.role(callee) is Role.ROTARY:
        loop = next((a for a in src.ancestors(call) if isinstance(a, (ast.For, ast.While))), None)
        if loop is not None:
            return [src.flag(call, f"cos/sin computed inside a loop in {src.owner(call)}: compute them once")]
        return []
    passes = any(isinstance(a, ast.Name) and a.id == "position_ids" for a in call.args) or any(
        kw.arg == "position_ids" or (isinstance(kw.value, ast.Name) and kw.value.id == "position_ids")
        for kw in call.keywords
    )
    if not passes or _is_allowed_callee(model, allowed, call, callee):
        return []
    return [src.flag(call, f"{src.owner(call)} passes position_ids on to {ast.unparse(call.func)}")]


def _callee_class(model: ModelIndex, call: ast.Call) -> ast.ClassDef | None:
    """The file class of ``self.x(...)`` (from what ``self.x`` was built as) or of ``Cls(...)``."""
    parts = dotted_parts(call.func)
    cls = model.src.enclosing_class(call)
    if parts and len(parts) == 2 and parts[0] == "self" and cls is not None:
        built = model.attribute_classes(cls.name, parts[1])
        return next((model.src.classes[n] for n in built if n in model.src.classes), None)
    if parts and len(parts) == 1 and parts[0] in model.src.classes:
        return model.src.classes[parts[0]]
    if parts and len(parts) == 1 and cls is not None:  # ``x(...)`` for ``x`` in ``self.items`` (a ModuleList)
        for node in model.src.ancestors(call):
            for generator in getattr(node, "generators", []):
                items = dotted_parts(generator.iter)
                if (
                    isinstance(generator.target, ast.Name)
                    and generator.target.id == parts[0]
                    and items
                    and len(items) == 2
                    and items[0] == "self"
                ):
                    built = model.attribute_classes(cls.name, items[1])
                    return next((model.src.classes[n] for n in built if n in model.src.classes), None)
    return None


def _is_allowed_callee(
    model: ModelIndex, allowed: set[ast.AST], call: ast.Call, callee: ast.ClassDef | None
) -> bool:
    if callee is not None:
        return callee in model.top_level
    parts = dotted_parts(call.func)
    if parts and len(parts) == 1 and parts[0] in model.src.functions:
        return model.src.functions[parts[0]] in allowed
    cls = model.src.enclosing_class(call)
    if parts and len(parts) == 2 and parts[0] == "self" and cls is not None:  # an allowed method of its own
        return any(
            isinstance(fn, FUNCTION_TYPES) and fn.name == parts[1] and fn in allowed for fn in cls.body
        )
    qualified = model.src.qualify(call.func) or ""
    return qualified.startswith(("torch.", "math.")) and not qualified.startswith(AD)


@rule("D", "D4", "routed experts are an `nn.ModuleList` of per-expert modules.")
def check_d4(ctx: ReviewContext) -> Outcome:
    """Judgement: a model has routed experts when a class builds ``self.experts`` or calls a MoE op;
    ``experts`` must be built as ``nn.ModuleList`` of modules, and a 3-D ``nn.Parameter`` in an
    experts or MoE class is a packed layout and fails."""
    model = ctx.model
    if not has_moe(model):
        return Outcome.not_applicable("no routed experts")
    assignments = expert_assignments(model)
    flags = [
        model.src.flag(
            c.node, f"{c.owner}.experts is {c.cls.rsplit('.', 1)[-1]}, not an nn.ModuleList of experts"
        )
        for c in assignments
        if not c.in_list
    ]
    flags += [
        model.src.flag(node, "experts stored as a fused (packed) parameter")
        for node in fused_expert_parameters(model)
    ]
    if not assignments:
        flags += [
            model.src.flag(cls, f"{cls.name} routes to experts but builds no `experts` ModuleList")
            for cls in model.moe_blocks
        ]
    where = assignments[0].node.lineno if assignments else None
    return Outcome.of(
        _unique(flags), "experts are an nn.ModuleList of per-expert modules", ctx.src.path, where
    )


@rule(
    "D",
    "D5",
    "each expert has `gate_proj`, `up_proj`, `down_proj` (or the checkpoint's own per-expert names).",
)
def check_d5(ctx: ReviewContext) -> Outcome:
    """Judgement: accepted per-expert names are gate/up/down, Mixtral's w1/w2/w3 and non-gated up/down;
    BA1's strict load is what proves they are the checkpoint's."""
    model = ctx.model
    if not has_moe(model):
        return Outcome.not_applicable("no routed experts")
    listed = [c for c in expert_assignments(model) if c.in_list]
    if not listed:
        sites = [c.node for c in expert_assignments(model)] or list(model.moe_blocks)
        return Outcome.of([model.src.flag(node, "experts are not per-expert modules") for node in sites], "")
    flags = []
    for construction in listed:
        cls = model.src.classes.get(construction.cls)
        if cls is None:
            flags.append(
                model.src.flag(
                    construction.node, f"expert class {construction.cls} is not defined in the file"
                )
            )
            continue
        attrs = model.self_attributes(cls)
        if not any(names <= attrs for names in EXPERT_NAME_SETS):
            flags.append(
                model.src.flag(cls, f"expert {cls.name} has {sorted(attrs)}, not gate_proj/up_proj/down_proj")
            )
    first = model.src.classes.get(listed[0].cls)
    return Outcome.of(
        flags, "experts have per-expert projections", ctx.src.path, first.lineno if first else None
    )


RULES = (check_d1, check_d2, check_d4, check_d5)
