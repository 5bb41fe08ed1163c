"""CA rules: the input contract of the exported entry points."""

from __future__ import annotations

import ast

from onboardlm.review.context import ReviewContext
from onboardlm.review.findings import Flag, Outcome, rule
from onboardlm.review.source import FUNCTION_TYPES, SourceFile, call_name, constant_value

CONTRACT = ["input_ids", "position_ids", "inputs_embeds"]
MULTIMODAL_PREFIXES = ("pixel_", "image_", "video_", "audio_", "vision_", "input_features")
FORBIDDEN_PARAMS = frozenset(
    {
        "attention_mask",
        "past_key_values",
        "past_key_value",
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "cache_position",
        "return_dict",
        "head_mask",
        "layer_past",
    }
)
#: Flags that switch features a prefill-only export never runs.
DEAD_SWITCHES = FORBIDDEN_PARAMS | {
    "use_sliding_window",
    "use_return_dict",
    "training",
    "labels",
    "gradient_checkpointing",
    "is_torchdynamo_compiling",
    "is_tracing",
    "is_scripting",
}


def _is_position_assert(node: ast.stmt) -> bool:
    if not isinstance(node, ast.Assert) or not isinstance(node.test, ast.Compare):
        return False
    test = node.test
    return (
        isinstance(test.left, ast.Name)
        and test.left.id == "position_ids"
        and [type(op) for op in test.ops] == [ast.IsNot]
        and constant_value(test.comparators[0]) is None
    )


def _body_without_docstring(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[ast.stmt]:
    body = fn.body
    if body and isinstance(body[0], ast.Expr) and isinstance(constant_value(body[0].value), str):
        return body[1:]
    return body


@rule(
    "CA",
    "CA1",
    "`forward(input_ids, position_ids, inputs_embeds=None, **kwargs)` with `assert position_ids is not None`; no fallback generation of position ids.",
)
def check_ca1(ctx: ReviewContext) -> Outcome:
    """Every forward of a top-level model (PreTrainedModel subclass) follows the contract.

    Judgement: extra parameters are allowed only for multi-modal inputs (``pixel_*``, ``image_*``,
    ...); the assert must be the first statement; a fallback is a branch on ``position_ids`` being
    None or ``position_ids = ... arange ...``.
    """
    model, src, flags = ctx.model, ctx.src, []
    for cls in model.top_level:
        fn = model.method(cls, "forward")
        if fn is None:
            if cls is model.causal_lm:
                flags.append(src.flag(cls, f"{cls.name} has no forward"))
            continue
        flags += _signature_flags(src, cls.name, fn) + _assert_flags(src, cls.name, fn)
    flags += _fallback_flags(src)
    return Outcome.of(
        flags,
        "entry points take (input_ids, position_ids, inputs_embeds=None, **kwargs) and assert position_ids",
    )


def _signature_flags(src: SourceFile, owner: str, fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[Flag]:
    args = fn.args
    positional = [a.arg for a in [*args.posonlyargs, *args.args]]
    defaults = dict(zip(positional[len(positional) - len(args.defaults) :], args.defaults, strict=True))
    params = positional[1:]
    flags = []
    if params[:3] != CONTRACT:
        flags.append(
            src.flag(fn, f"{owner}.forward({', '.join(params)}) must start with {', '.join(CONTRACT)}")
        )
    if "position_ids" in defaults:
        flags.append(src.flag(fn, f"{owner}.forward: position_ids has a default; it is required"))
    if "inputs_embeds" in params and constant_value(defaults.get("inputs_embeds")) is not None:
        flags.append(src.flag(fn, f"{owner}.forward: inputs_embeds must default to None"))
    if args.kwarg is None:
        flags.append(src.flag(fn, f"{owner}.forward takes no **kwargs"))
    if args.vararg is not None:
        flags.append(src.flag(fn, f"{owner}.forward takes *{args.vararg.arg}"))
    extras = [*params[3:], *(a.arg for a in args.kwonlyargs)]
    flags += [
        src.flag(fn, f"{owner}.forward: extra parameter {name!r} is not part of the input contract")
        for name in extras
        if not name.startswith(MULTIMODAL_PREFIXES)
    ]
    return flags


def _assert_flags(src: SourceFile, owner: str, fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[Flag]:
    body = _body_without_docstring(fn)
    if body and _is_position_assert(body[0]):
        return []
    late = next((n for n in ast.walk(fn) if isinstance(n, ast.stmt) and _is_position_assert(n)), None)
    if late is not None:
        return [src.flag(late, f"{owner}.forward asserts position_ids, but not as its first statement")]
    return [src.flag(fn, f"{owner}.forward does not assert position_ids is not None")]


def _fallback_flags(src: SourceFile) -> list[Flag]:
    flags = []
    for node in ast.walk(src.tree):
        if isinstance(node, (ast.If, ast.IfExp, ast.While)) and _tests_position_ids(node.test):
            flags.append(
                src.flag(node, f"fallback for missing position_ids in {src.owner(node)}: assert instead")
            )
        elif (
            isinstance(node, ast.BoolOp) and isinstance(node.op, ast.Or) and _is_position_ids(node.values[0])
        ):
            flags.append(src.flag(node, f"`position_ids or ...` fallback in {src.owner(node)}"))
        elif isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            generated = any(
                isinstance(c, ast.Call) and call_name(c) == "arange" for c in ast.walk(node.value)
            )
            if generated and any(_is_position_ids(t) for t in targets):
                flags.append(src.flag(node, f"position_ids generated with arange in {src.owner(node)}"))
    return flags


def _is_position_ids(node: ast.AST) -> bool:
    return isinstance(node, ast.Name) and node.id == "position_ids"


def _tests_position_ids(test: ast.expr) -> bool:
    """A comparison of ``position_ids`` with None (or its truth value) inside a condition."""
    for node in ast.walk(test):
        if (
            isinstance(node, ast.Compare)
            and _is_position_ids(node.left)
            and any(constant_value(c) is None for c in node.comparators)
        ):
            return True
    return _is_position_ids(test) or (
        isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not) and _is_position_ids(test.operand)
    )


@rule(
    "CA",
    "CA2",
    "no dead branches for non-prefill features (`output_attentions`, `use_sliding_window` switches that never run).",
)
def check_ca2(ctx: ReviewContext) -> Outcome:
    """Branches on HF-runtime switches, constant-false conditions and unreachable statements fail."""
    src, flags = ctx.src, []
    for node in ast.walk(src.tree):
        if isinstance(node, (ast.If, ast.IfExp, ast.While)):
            switches = sorted(
                {getattr(n, "id", None) or getattr(n, "attr", "") for n in ast.walk(node.test)}
                & DEAD_SWITCHES
            )
            if switches:
                flags.append(
                    src.flag(
                        node,
                        f"branch on {', '.join(switches)} in {src.owner(node)}: never runs in prefill export",
                    )
                )
            elif constant_value(node.test) in (False, 0, None):
                flags.append(
                    src.flag(node, f"branch that never runs (constant condition) in {src.owner(node)}")
                )
        if isinstance(node, (*FUNCTION_TYPES, ast.If, ast.For, ast.While, ast.With, ast.Try)):
            flags += _unreachable_flags(src, node)
    return Outcome.of(flags, "no dead branches")


def _unreachable_flags(src: SourceFile, node: ast.AST) -> list[Flag]:
    flags = []
    for field in ("body", "orelse", "finalbody"):
        statements = getattr(node, field, None) or []
        for stmt, following in zip(statements, statements[1:], strict=False):
            if isinstance(stmt, (ast.Return, ast.Raise, ast.Continue, ast.Break)):
                flags.append(src.flag(following, f"unreachable statement in {src.owner(following)}"))
                break
    return flags


@rule(
    "CA",
    "CA3",
    "no `attention_mask`, `past_key_values`, `use_cache`, `output_attentions`, `output_hidden_states` parameters.",
)
def check_ca3(ctx: ReviewContext) -> Outcome:
    """Judgement: also the other HF-runtime inputs (``past_key_value``, ``cache_position``,
    ``return_dict``, ``head_mask``, ``layer_past``), as parameters of any function, as keyword
    arguments passed on, or read out of ``**kwargs``."""
    src = ctx.src
    flags = [
        src.flag(node, f"HF-runtime input {name!r} in {src.owner(node)}")
        for node, name in src.identifiers()
        if isinstance(node, (ast.arg, ast.keyword, ast.Constant)) and name in FORBIDDEN_PARAMS
    ]
    return Outcome.of(flags, "no attention-mask, cache or output-switch parameters")


RULES = (check_ca1, check_ca2, check_ca3)
