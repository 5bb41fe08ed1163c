"""Where a model file keeps its routed experts and how it converts packed checkpoints (D4, D5, BA2, H1)."""

from __future__ import annotations

import ast
from collections.abc import Iterator

from onboardlm.review.model_index import Construction, ModelIndex
from onboardlm.review.source import FUNCTION_TYPES, call_name, dotted_parts

LOAD_HOOKS = frozenset({"register_load_state_dict_pre_hook", "_register_load_state_dict_pre_hook"})
TENSOR_FACTORIES = frozenset({"empty", "zeros", "ones", "randn", "rand", "full"})
#: Per-expert module names a checkpoint may use: gated (gate/up/down, Mixtral w1/w3/w2) or not.
EXPERT_NAME_SETS = ({"gate_proj", "up_proj", "down_proj"}, {"w1", "w2", "w3"}, {"up_proj", "down_proj"})


def has_moe(model: ModelIndex) -> bool:
    return bool(model.moe_blocks or expert_assignments(model))


def expert_assignments(model: ModelIndex) -> list[Construction]:
    return [c for c in model.constructions if c.attr == "experts"]


def fused_expert_parameters(model: ModelIndex) -> list[ast.Assign]:
    """``self.x = nn.Parameter(torch.empty(E, ., .))`` (3-D or more) in expert or MoE classes."""
    owners = {c.cls for c in expert_assignments(model) if not c.in_list} | {
        cls.name for cls in model.moe_blocks
    }
    found = []
    for name in owners & set(model.src.classes):
        for node in ast.walk(model.src.classes[name]):
            if (
                isinstance(node, ast.Assign)
                and isinstance(node.value, ast.Call)
                and call_name(node.value) == "Parameter"
                and any(_is_3d_factory(arg) for arg in ast.walk(node.value))
            ):
                found.append(node)
    return found


def _is_3d_factory(node: ast.AST) -> bool:
    if not isinstance(node, ast.Call) or call_name(node) not in TENSOR_FACTORIES:
        return False
    if len(node.args) == 1 and isinstance(node.args[0], (ast.Tuple, ast.List)):
        return len(node.args[0].elts) >= 3
    return len(node.args) >= 3


def load_hooks(model: ModelIndex) -> list[ast.AST]:
    """The functions registered as load-state-dict pre-hooks, and ``_load_from_state_dict`` overrides."""
    src = model.src
    hooks: list[ast.AST] = []
    for call in src.calls:
        if call_name(call) in LOAD_HOOKS and call.args:
            hooks.extend(_hook_function(model, call, call.args[0]))
    for cls in src.classes.values():
        hooks += [
            fn for fn in cls.body if isinstance(fn, FUNCTION_TYPES) and fn.name == "_load_from_state_dict"
        ]
    return hooks


def _hook_function(model: ModelIndex, site: ast.AST, expr: ast.expr) -> Iterator[ast.AST]:
    """The definition a hook argument names: ``self.method``, a function, a lambda or ``partial(f, ...)``."""
    if isinstance(expr, ast.Lambda):
        yield expr
    elif isinstance(expr, ast.Call) and call_name(expr) == "partial" and expr.args:
        yield from _hook_function(model, site, expr.args[0])
    elif (parts := dotted_parts(expr)) is not None:
        cls = model.src.enclosing_class(site)
        if parts[0] == "self" and len(parts) == 2 and cls is not None:
            method = model.method(cls, parts[1])
            if method is not None:
                yield method
        elif len(parts) == 1 and parts[0] in model.src.functions:
            yield model.src.functions[parts[0]]


def converts_experts(hook: ast.AST) -> bool:
    """Whether a hook's code handles expert keys (names or strings with ``expert`` or ``gate_up``)."""
    for node in ast.walk(hook):
        text = node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None
        text = text or getattr(node, "id", None) or getattr(node, "attr", None)
        if isinstance(text, str) and ("expert" in text.lower() or "gate_up" in text.lower()):
            return True
    return False
