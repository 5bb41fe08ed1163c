"""B rules: structure and self-containment of a model file."""

from __future__ import annotations

import ast

from onboardlm.review.context import ReviewContext
from onboardlm.review.findings import Outcome, rule
from onboardlm.review.model_index import ModelIndex
from onboardlm.review.moe import (
    converts_experts,
    expert_assignments,
    fused_expert_parameters,
    has_moe,
    load_hooks,
)
from onboardlm.review.source import call_name, dotted_parts

CUSTOM_PACKAGES = ("onboardlm.models.custom", "tensorrt_llm._torch.auto_deploy.models.custom")
GENERIC_TENSOR_NAMES = frozenset({"weight", "bias"})


def _is_model_module(path: str) -> bool:
    """A custom model file, or the package that re-exports them (transformers' modeling files excluded)."""
    if path.startswith("transformers"):
        return False
    if any(path == pkg or path.startswith(pkg + ".") for pkg in CUSTOM_PACKAGES):
        return True
    return any(part.startswith("modeling_") for part in path.lstrip(".").split("."))


@rule(
    "B",
    "B1",
    "no import from another custom model file (`from .modeling_*`); shared non-model utilities are allowed.",
)
def check_b1(ctx: ReviewContext) -> Outcome:
    """Relative or absolute imports of ``modeling_*`` modules or of the custom-model package fail."""
    flags = []
    for node in ast.walk(ctx.src.tree):
        if isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            joiner = "." if node.module else ""
            paths = [module, *(module + joiner + alias.name for alias in node.names)]
        elif isinstance(node, ast.Import):
            paths = [alias.name for alias in node.names]
        else:
            continue
        hit = next((p for p in paths if _is_model_module(p)), None)
        if hit is not None:
            flags.append(
                ctx.src.flag(
                    node, f"imports another custom model file ({hit}): every model file is self-contained"
                )
            )
    return Outcome.of(flags, "imports no other custom model file")


def config_names(model: ModelIndex) -> dict[str, ast.AST]:
    """Config class names the file uses (registration string, ``config_class``), with where."""
    names: dict[str, ast.AST] = {}
    call = model.registration
    if (
        call is not None
        and call.args
        and isinstance(call.args[0], ast.Constant)
        and isinstance(call.args[0].value, str)
    ):
        names[call.args[0].value] = call
    for cls in model.top_level:
        for node in cls.body:
            is_config_class = isinstance(node, ast.Assign) and any(
                getattr(t, "id", "") == "config_class" for t in node.targets
            )
            if is_config_class and (parts := dotted_parts(node.value)) is not None:
                names.setdefault(parts[-1], node)
    return names


def transformers_has(name: str) -> bool:
    import transformers

    try:
        return isinstance(getattr(transformers, name, None), type)
    except Exception:  # a broken optional import inside transformers
        return False


@rule("B", "B2", "the config class is imported from transformers whenever transformers has it.")
def check_b2(ctx: ReviewContext) -> Outcome:
    """Judgement: the config class is the registered name and any ``config_class``; a file that
    neither defines nor imports it (the factory passes the config in) passes. N/A when transformers
    has no such class (then B3 applies)."""
    src, names = ctx.src, config_names(ctx.model)
    if not names:
        reason = "cannot tell the config class: no registration string and no config_class"
        return Outcome.of([src.flag(1, reason)], "")
    in_transformers = [n for n in names if transformers_has(n)]
    if not in_transformers:
        return Outcome.not_applicable(f"transformers has no {', '.join(names)} (bundled config: see B3)")
    flags = []
    for name in in_transformers:
        if name in src.classes:
            flags.append(
                src.flag(src.classes[name], f"defines {name}, which transformers has: import it instead")
            )
        origin = src.imports.get(name)
        if origin is not None and not origin.startswith("transformers"):
            flags.append(
                src.flag(_import_line(src.tree, name), f"imports {name} from {origin}, not from transformers")
            )
    first = names[in_transformers[0]]
    return Outcome.of(flags, f"{', '.join(in_transformers)} comes from transformers", src.path, first.lineno)


def _import_line(tree: ast.Module, name: str) -> int:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and any(
            (a.asname or a.name) == name for a in node.names
        ):
            return node.lineno
    return 1


@rule(
    "B",
    "B3",
    "a bundled config class exists only when transformers lacks it, and is registered with `AutoConfig.register`.",
)
def check_b3(ctx: ReviewContext) -> Outcome:
    """A bundled config is any class deriving from transformers' ``PretrainedConfig``; it must be
    passed by name to ``AutoConfig.register(model_type, Cls, ...)`` in the file."""
    src, bundled = ctx.src, ctx.model.config_classes
    if not bundled:
        return Outcome.not_applicable("no bundled config class")
    registered = {
        call.args[1].id
        for call in src.calls
        if call_name(call) == "register"
        and (src.call_target(call).endswith("AutoConfig.register"))
        and len(call.args) > 1
        and isinstance(call.args[1], ast.Name)
    }
    flags = []
    for cls in bundled:
        if transformers_has(cls.name):
            flags.append(src.flag(cls, f"bundles {cls.name} although transformers has it"))
        if cls.name not in registered:
            flags.append(
                src.flag(
                    cls, f"{cls.name} is not registered with AutoConfig.register(model_type, {cls.name})"
                )
            )
    return Outcome.of(
        flags, f"{', '.join(c.name for c in bundled)} bundled and registered", src.path, bundled[0].lineno
    )


def locate_key(model: ModelIndex, key: str) -> int:
    """The line that creates what a state-dict key names: its tensor (buffer or distinctly named
    parameter), else the deepest module on its path, else the causal LM class."""
    parts = [p for p in key.split(".") if not p.isdigit()]
    tensor, modules = parts[-1], parts[:-1]
    candidates = ([] if tensor in GENERIC_TENSOR_NAMES else [tensor]) + modules[::-1]
    for part in candidates:
        for node in ast.walk(model.src.tree):
            if _creates(node, part):
                return node.lineno
    assert model.causal_lm is not None
    return model.causal_lm.lineno


def _creates(node: ast.AST, name: str) -> bool:
    """``self.<name> = ...`` or ``register_buffer("<name>", ...)``."""
    if isinstance(node, ast.Assign):
        return any(
            isinstance(t, ast.Attribute) and dotted_parts(t.value) == ["self"] and t.attr == name
            for t in node.targets
        )
    return (
        isinstance(node, ast.Call)
        and call_name(node) == "register_buffer"
        and bool(node.args)
        and getattr(node.args[0], "value", None) == name
    )


@rule(
    "B",
    "BA1",
    "the module tree matches the checkpoint keys: loading the reference state dict with `strict=True` gives no missing and no unexpected keys (checked dynamically, not only by reading).",
)
def check_ba1(ctx: ReviewContext) -> Outcome:
    """Dynamic: imports the file, builds the causal LM on ``tiny_config`` and loads the reference.

    Judgement: the reference is transformers' model of ``--reference`` (default: the config's own
    model_type) built on the same tiny config; with ``--checkpoint-keys`` key patterns are compared
    with layer and expert numbers as ``*`` (load hooks cannot run on names alone). No reference at
    all fails: the rule cannot be shown to hold.
    """
    load, causal_lm = ctx.strict_load, ctx.model.causal_lm
    assert causal_lm is not None
    if load.ok:
        return Outcome.of([], load.reason, ctx.src.path, causal_lm.lineno)
    line = locate_key(ctx.model, load.keys[0]) if load.keys else causal_lm.lineno
    return Outcome.of([ctx.src.flag(line, load.reason)], "")


@rule(
    "B",
    "BA2",
    "a checkpoint with packed experts and a model with per-expert lists ⇒ a load hook converts them.",
)
def check_ba2(ctx: ReviewContext) -> Outcome:
    """Static: a load-state-dict pre-hook (or ``_load_from_state_dict``) whose code handles expert keys.

    Judgement: HuggingFace checkpoints come per-expert on the hub and packed from transformers 5, so a
    MoE model needs a converting hook whatever its own layout. Dynamic, when the reference packs
    experts: BA1's strict load must have succeeded.
    """
    model = ctx.model
    if not has_moe(model):
        return Outcome.not_applicable("no routed experts")
    sites: list[ast.AST] = [*fused_expert_parameters(model)] or [c.node for c in expert_assignments(model)]
    sites = sites or list(model.moe_blocks)
    hooks = [hook for hook in load_hooks(model) if converts_experts(hook)]
    if not hooks:
        reason = "experts without a load hook that converts packed (or per-expert) checkpoint experts"
        return Outcome.of([model.src.flag(node, reason) for node in sites], "")
    load = ctx.strict_load if ctx.checkpoint_keys is None else None
    if load is not None and load.packed_experts and not load.ok:
        return Outcome.of(
            [model.src.flag(hooks[0], f"the load hook does not convert packed experts: {load.reason}")], ""
        )
    evidence = (
        f", reference packs {len(load.packed_experts)} expert tensors" if load and load.packed_experts else ""
    )
    return Outcome.of(
        [], f"load hook converts experts{evidence}", model.src.path, getattr(hooks[0], "lineno", 1)
    )


RULES = (check_b1, check_b2, check_b3, check_ba1, check_ba2)
