"""A rules: class hierarchy, output dataclass, float logits and registration."""

from __future__ import annotations

import ast

from onboardlm.review.context import ReviewContext
from onboardlm.review.findings import Flag, Outcome, rule
from onboardlm.review.model_index import CAUSAL_LM_SUFFIXES, PRETRAINED_MODEL, ModelIndex
from onboardlm.review.source import SourceFile, argument, call_name, constant_value, dotted_parts
from onboardlm.review.structure import config_names

FLOAT32 = frozenset({"torch.float32", "torch.float"})
ELEMENTWISE = frozenset({"tanh", "clamp", "clip"})
_MAX_DEPTH = 8


@rule("A", "A1", "`*PreTrainedModel(PreTrainedModel)`.")
def check_a1(ctx: ReviewContext) -> Outcome:
    """Judgement: the causal LM must also derive from that class (else the class serves nothing)."""
    model, src = ctx.model, ctx.src
    causal_lm = model.causal_lm
    assert causal_lm is not None
    bases = [
        cls
        for cls in src.classes.values()
        if cls.name.endswith("PreTrainedModel") and set(model.bases(cls)) & PRETRAINED_MODEL
    ]
    if not bases:
        return Outcome.of([src.flag(causal_lm, "no *PreTrainedModel(PreTrainedModel) class")], "")
    if not any(base in model.ancestors(causal_lm) for base in bases):
        return Outcome.of([src.flag(causal_lm, f"{causal_lm.name} does not derive from {bases[0].name}")], "")
    return Outcome.of(
        [], f"{causal_lm.name} derives from {bases[0].name}(PreTrainedModel)", src.path, bases[0].lineno
    )


def output_classes(model: ModelIndex) -> dict[str, ast.ClassDef]:
    """``@dataclass`` classes deriving from transformers' ModelOutput with a ``logits`` field."""
    src, found = model.src, {}
    for cls in src.classes.values():
        is_dataclass = any(
            (src.qualify(d.func if isinstance(d, ast.Call) else d) or "") == "dataclasses.dataclass"
            for d in cls.decorator_list
        )
        is_output = any(b.startswith("transformers") and b.endswith(".ModelOutput") for b in model.bases(cls))
        has_logits = any(
            isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name) and n.target.id == "logits"
            for n in cls.body
        )
        if is_dataclass and is_output and has_logits:
            found[cls.name] = cls
    return found


def _returns(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[ast.Return]:
    return [n for n in ast.walk(fn) if isinstance(n, ast.Return)]


@rule("A", "A2", "a `ModelOutput` dataclass with `logits`.")
def check_a2(ctx: ReviewContext) -> Outcome:
    """Judgement: the causal LM's forward must also return it, on every path."""
    model, src = ctx.model, ctx.src
    causal_lm = model.causal_lm
    assert causal_lm is not None
    outputs = output_classes(model)
    if not outputs:
        return Outcome.of([src.flag(causal_lm, "no @dataclass ModelOutput subclass with a logits field")], "")
    forward = model.method(causal_lm, "forward")
    if forward is None:
        return Outcome.of([src.flag(causal_lm, f"{causal_lm.name} has no forward")], "")
    flags = [
        src.flag(ret, f"{causal_lm.name}.forward returns something other than {' / '.join(outputs)}")
        for ret in _returns(forward)
        if not (isinstance(ret.value, ast.Call) and dotted_parts(ret.value.func) in ([n] for n in outputs))
    ]
    first = next(iter(outputs.values()))
    return Outcome.of(
        flags, f"{first.name} (ModelOutput dataclass with logits) is returned", src.path, first.lineno
    )


@rule("A", "A3", "logits returned as float.")
def check_a3(ctx: ReviewContext) -> Outcome:
    """Judgement: the logits expression, followed through the names it uses, is a cast
    (``.float()``, ``.to(torch.float32)``, ``.type(torch.float32)``) or arithmetic, ``tanh`` or
    ``clamp`` of one (final-logit softcapping after the cast)."""
    model, src = ctx.model, ctx.src
    causal_lm = model.causal_lm
    assert causal_lm is not None
    forward = model.method(causal_lm, "forward")
    if forward is None:
        return Outcome.of([src.flag(causal_lm, f"{causal_lm.name} has no forward")], "")
    flags: list[Flag] = []
    for ret in _returns(forward):
        logits = _logits_expression(ret)
        if logits is None or not _is_float(src, forward, logits, ret):
            flags.append(src.flag(ret, "logits are not cast to float (.float()) before they are returned"))
    return Outcome.of(flags, "logits returned as float32", src.path, forward.lineno)


def _logits_expression(ret: ast.Return) -> ast.expr | None:
    if isinstance(ret.value, ast.Call):
        return argument(ret.value, 0, "logits")
    return None


def _last_value(fn: ast.AST, expr: ast.expr, before: ast.AST) -> ast.expr:
    """The value last assigned to a name before ``before`` (the expression itself otherwise)."""
    if not isinstance(expr, ast.Name):
        return expr
    value = expr
    for node in ast.walk(fn):
        if (
            isinstance(node, ast.Assign)
            and node.lineno < before.lineno
            and any(isinstance(t, ast.Name) and t.id == expr.id for t in node.targets)
        ):
            value = node.value
    return value


def _is_float(src: SourceFile, fn: ast.AST, expr: ast.expr, before: ast.AST, depth: int = 0) -> bool:
    """A float cast, or arithmetic / an elementwise function (softcapping) of one."""
    if depth > _MAX_DEPTH:
        return False
    if isinstance(expr, ast.Name):
        value = _last_value(fn, expr, before)
        return value is not expr and _is_float(src, fn, value, before, depth + 1)
    if isinstance(expr, ast.BinOp):
        return any(_is_float(src, fn, side, before, depth + 1) for side in (expr.left, expr.right))
    if not isinstance(expr, ast.Call):
        return False
    name = call_name(expr)
    if name == "float" and isinstance(expr.func, ast.Attribute) and not expr.args:
        return True
    if name in {"to", "type"}:
        dtype = argument(expr, 0, "dtype")
        return dtype is not None and (src.qualify(dtype) or "") in FLOAT32
    if name in ELEMENTWISE:
        inner = expr.args[0] if expr.args else getattr(expr.func, "value", None)
        return inner is not None and _is_float(src, fn, inner, before, depth + 1)
    return False


@rule(
    "A",
    "A4",
    "the last statement registers the model with `AutoModelForCausalLMFactory.register_custom_model_cls`.",
)
def check_a4(ctx: ReviewContext) -> Outcome:
    """The call names a config class (string) and the file's causal LM; when the file sets
    ``config_class``, the registered name must be that class."""
    model, src = ctx.model, ctx.src
    last = src.tree.body[-1] if src.tree.body else None
    call = last.value if isinstance(last, ast.Expr) and isinstance(last.value, ast.Call) else None
    if call is None or call_name(call) != "register_custom_model_cls":
        where = model.registration.lineno if model.registration is not None else None
        detail = f" (it is at line {where})" if where else ""
        return Outcome.of([src.flag(last or 1, f"the last statement is not the registration{detail}")], "")
    return Outcome.of(
        _registration_flags(model, call), "registered with AutoModelForCausalLMFactory", src.path, call.lineno
    )


def _registration_flags(model: ModelIndex, call: ast.Call) -> list[Flag]:
    src, flags = model.src, []
    if not src.call_target(call).endswith("AutoModelForCausalLMFactory.register_custom_model_cls"):
        flags.append(
            src.flag(call, f"registers through {src.call_target(call)}, not AutoModelForCausalLMFactory")
        )
    name = constant_value(call.args[0]) if call.args else None
    if not isinstance(name, str):
        flags.append(src.flag(call, "the first argument is not the config class name as a string"))
    target = call.args[1] if len(call.args) > 1 else None
    if not (
        isinstance(target, ast.Name) and target.id in src.classes and target.id.endswith(CAUSAL_LM_SUFFIXES)
    ):
        flags.append(
            src.flag(call, "the second argument is not the file's *ForCausalLM (or *LMHeadModel) class")
        )
    declared = [n for n, node in config_names(model).items() if not isinstance(node, ast.Call)]
    if isinstance(name, str) and declared and name not in declared:
        flags.append(src.flag(call, f"registers {name!r} but config_class is {declared[0]}"))
    return flags


RULES = (check_a1, check_a2, check_a3, check_a4)
