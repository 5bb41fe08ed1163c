"""H rules: how weights get from the HuggingFace model into the lean one."""

from __future__ import annotations

import ast

from onboardlm.review.context import ReviewContext
from onboardlm.review.findings import Outcome, rule
from onboardlm.review.model_index import ModelIndex
from onboardlm.review.moe import converts_experts, expert_assignments, has_moe, load_hooks
from onboardlm.review.source import call_name

LOADERS = frozenset({"transfer_weights", "load_state_dict", "load_checkpoint_into", "build_and_load"})
WEIGHT_MODULES = frozenset({"Linear", "Embedding", "Conv1d", "Conv2d", "LayerNorm", "RMSNorm", "Parameter"})
RESHAPES = frozenset({"unbind", "chunk", "split", "stack", "cat", "split_with_sizes"})
HAND_COPY_ATTRS = frozenset({"weight", "bias", "data"})


@rule("H", "H1", "MoE: converter from HF packed experts to the per-expert layout.")
def check_h1(ctx: ReviewContext) -> Outcome:
    """A load hook of the model (preferred) or a test helper converts packed experts; when the
    transformers reference packs experts, BA1's strict load shows that the conversion works."""
    model = ctx.model
    if not has_moe(model):
        return Outcome.not_applicable("no routed experts")
    hooks = [hook for hook in load_hooks(model) if converts_experts(hook)]
    helpers = _test_converters(ctx)
    if not hooks and not helpers:
        sites = [c.node for c in expert_assignments(model)] or list(model.moe_blocks)
        return Outcome.of(
            [model.src.flag(n, "no converter from packed experts to per-expert modules") for n in sites], ""
        )
    load = ctx.strict_load if ctx.checkpoint_keys is None else None
    if load is not None and load.packed_experts and not load.ok:
        return Outcome.of(
            [model.src.flag(hooks[0] if hooks else 1, f"packed experts do not convert: {load.reason}")], ""
        )
    where = hooks[0] if hooks else helpers[0]
    file = model.src.path if hooks else ctx.tests.src.path if ctx.tests else None
    return Outcome.of(
        [], "packed experts are converted to per-expert modules", file, getattr(where, "lineno", None)
    )


def _test_converters(ctx: ReviewContext) -> list[ast.AST]:
    if ctx.tests is None:
        return []
    return [
        fn
        for fn in ctx.tests.src.functions.values()
        if converts_experts(fn)
        and any(isinstance(c, ast.Call) and call_name(c) in RESHAPES for c in ast.walk(fn))
    ]


def _has_weights(model: ModelIndex, name: str, seen: frozenset[str] = frozenset()) -> bool:
    """Whether a file class owns parameters: builds weight modules, parameters or such classes."""
    for construction in model.built_by(name):
        last = construction.cls.rsplit(".", 1)[-1]
        if construction.cls.startswith("torch.nn") and last in WEIGHT_MODULES:
            return True
        nested = construction.cls in model.src.classes and construction.cls not in seen
        if nested and _has_weights(model, construction.cls, seen | {name}):
            return True
    return False


@rule(
    "H",
    "H2",
    "identical weights in the HF and lean models before comparing, loaded through the real loading path.",
    needs_tests=True,
)
def check_h2(ctx: ReviewContext) -> Outcome:
    """Every test comparing a lean class that has weights with transformers loads the reference's
    state dict (``transfer_weights``, ``load_state_dict``, ``load_checkpoint_into``); copying tensors
    by hand (``.copy_``, assigning ``.weight`` / ``.data``) fails."""
    assert ctx.tests is not None
    tests, model = ctx.tests, ctx.model
    src, flags = tests.src, []
    compared = [
        case
        for case in tests.tests
        if case.uses_hf and case.comparisons and any(_has_weights(model, n) for n in case.lean_classes)
    ]
    if not compared:
        flags.append(src.flag(1, "no test compares a lean module with weights against transformers"))
    for case in compared:
        calls = [c for code in case.code for c in ast.walk(code) if isinstance(c, ast.Call)]
        if not any(call_name(c) in LOADERS for c in calls):
            flags.append(
                src.flag(
                    case.node,
                    f"{case.name} compares without loading the reference weights (transfer_weights)",
                )
            )
    for node in ast.walk(src.tree):
        if isinstance(node, ast.Call) and call_name(node) == "copy_":
            flags.append(src.flag(node, "copies weights by hand (.copy_): load the state dict instead"))
        elif isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Attribute) and t.attr in HAND_COPY_ATTRS for t in node.targets
        ):
            flags.append(src.flag(node, "assigns weights by hand: load the state dict instead"))
    return Outcome.of(flags, "weights reach the lean model through load_state_dict", src.path, None)


RULES = (check_h1, check_h2)
