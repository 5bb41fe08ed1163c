"""C rules: which operations a model file calls.

Calls are resolved through imports and aliases, so ``ops = torch.ops.auto_deploy; ops.x(...)``,
``from torch.ops import auto_deploy`` and ``self.op = torch.ops.auto_deploy.x`` are read alike. Only
identifiers, calls and references are read: docstrings and comments never trigger a rule.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator

from onboardlm.review.context import ReviewContext
from onboardlm.review.findings import Flag, Outcome, rule
from onboardlm.review.model_index import ModelIndex, Role
from onboardlm.review.source import FUNCTION_TYPES, SourceFile, call_name, constant_value, dotted_parts

#: The canonical ops of OPS.md (``torch.ops.auto_deploy.<name>``) and the sharding-hint ops.
CANONICAL_OPS = frozenset(
    {
        "torch_attention",
        "torch_attention_sdpa",
        "torch_attention_repeat_kv",
        "torch_attention_key_bias",  # Doge's dynamic mask: a learned bias per key
        "torch_rope_with_explicit_cos_sin",
        "torch_rope_with_complex_freqs",
        "torch_rope_with_qk_interleaving",
        "torch_rmsnorm",
        "torch_rmsnorm_gated",
        "torch_l2norm",
        "torch_linear_simple",
        "torch_moe",
        "torch_moe_router",
        "torch_moe_dense_mlp",
        "torch_mla",
        "torch_sparse_mla",
        "torch_lightning_indexer",
        "torch_causal_conv1d",
        "torch_ssm",
        "torch_gated_delta_rule",
        "torch_channel_gated_delta_rule",  # Kimi Delta Attention: a decay per key channel
        "torch_rg_lru",  # Griffin's real-gated linear recurrence (Recurrent Gemma)
        # FP8 linears (AutoDeploy's names): the reference and the fused op; graph transforms insert them
        "torch_fake_quant_fp8_linear",
        "torch_quant_fp8_linear",
    }
)
SHARDING_HINT_OPS = frozenset({"view", "split_with_sizes", "all_reduce"})
PLAIN_TORCH_NAMESPACES = frozenset({"aten", "prims"})

#: Plain-PyTorch functions and modules that do what a canonical op does.
STAND_INS = {
    "torch.nn.functional.scaled_dot_product_attention": "torch_attention / torch_attention_sdpa",
    "torch.nn.functional.multi_head_attention_forward": "torch_attention",
    "torch.nn.MultiheadAttention": "torch_attention",
    "torch.nn.functional.rms_norm": "torch_rmsnorm",
    "torch.nn.RMSNorm": "torch_rmsnorm",
    "torch.nn.functional.normalize": "torch_l2norm",
    "torch.view_as_complex": "torch_rope_with_complex_freqs",
    "torch.nn.functional.conv1d": "torch_causal_conv1d",
}
#: nn modules whose call in a forward is a canonical op's job (outside routing code).
MODULE_CALL_OPS = {"torch.nn.Linear": "torch_linear_simple", "torch.nn.Conv1d": "torch_causal_conv1d"}
MATMULS = frozenset({"matmul", "bmm", "einsum", "baddbmm", "mm"})

BACKEND_NAME = re.compile(r"triton|flashinfer|trtllm|tensorrt_llm|cutlass|xformers", re.IGNORECASE)
KV_CACHE_NAME = re.compile(
    r"past_key|use_cache|kv_cache|cache_position|cache_kwargs|layer_past|present_key|cache$|^cache",
    re.IGNORECASE,
)
TRAINING_NAME = re.compile(
    r"dropout|gradient_checkpointing|^labels$|^loss$|loss_fct|loss_function|cross_?entropy", re.IGNORECASE
)
ATTENTION_SWITCH_NAME = re.compile(
    r"flash|sdpa|attn_implementation|all_attention_functions|attention_interface|eager_attention",
    re.IGNORECASE,
)
KV_NAME = re.compile(r"^(k|v|kv|xk|xv|keys?|values?)$|key|value|^k_|^v_|_k$|_v$", re.IGNORECASE)


# --------------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------------


def functions(src: SourceFile) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    return (node for node in ast.walk(src.tree) if isinstance(node, FUNCTION_TYPES))


def is_activation_matmul(src: SourceFile, node: ast.AST) -> bool:
    """``a @ b`` / matmul / bmm / einsum between activations (no ``weight`` operand): attention math."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.MatMult):
        operands: list[ast.AST] = [node.left, node.right]
    elif isinstance(node, ast.Call) and call_name(node) in MATMULS:
        operands = list(node.args)
        if isinstance(node.func, ast.Attribute) and call_name(node) != "einsum" and len(operands) < 2:
            operands.append(node.func.value)  # x.matmul(y)
    else:
        return False
    return not any(_mentions_weight(operand) for operand in operands)


def _mentions_weight(node: ast.AST) -> bool:
    return any(
        isinstance(n, (ast.Attribute, ast.Name))
        and "weight" in (getattr(n, "attr", "") or getattr(n, "id", ""))
        for n in ast.walk(node)
    )


def _names_in(node: ast.AST) -> Iterator[str]:
    for n in ast.walk(node):
        if isinstance(n, ast.Name):
            yield n.id
        elif isinstance(n, ast.Attribute):
            yield n.attr


def _identifier_flags(ctx: ReviewContext, pattern: re.Pattern[str], what: str) -> list[Flag]:
    src = ctx.src
    return [
        src.flag(node, f"{what}: {name!r}")
        for node, name in src.identifiers()
        if pattern.search(name) and not _is_canonical_reference(src, node)
    ]


def _is_canonical_reference(src: SourceFile, node: ast.AST) -> bool:
    """An attribute that names a canonical op (``...torch_attention_sdpa``), not a feature switch."""
    return (
        isinstance(node, ast.Attribute)
        and node.attr in CANONICAL_OPS | SHARDING_HINT_OPS
        and (src.qualify(node) or "").startswith("torch.ops.auto_deploy.")
    )


# --------------------------------------------------------------------------------------------------
# C1: canonical ops, no plain re-implementations
# --------------------------------------------------------------------------------------------------


@rule(
    "C",
    "C1",
    "canonical `torch.ops.auto_deploy.torch_*` ops wherever one exists: attention, RoPE, MoE, RMSNorm, linear with sharding hints, SSM. A plain-PyTorch re-implementation of one of these fails.",
)
def check_c1(ctx: ReviewContext) -> Outcome:
    """Stand-in functions/modules, transformers' modeling code, and re-implemented blocks fail.

    Judgement: re-implementations are recognised by their math in one function: mean of squares with
    (r)sqrt (RMSNorm), softmax over an activation matmul (attention), ``cat((-x2, x1))`` or a
    ``rotate_half``/``apply_rotary_pos_emb`` helper (RoPE), a loop over experts or ``index_add``
    (MoE dispatch); a call of an ``nn.Linear`` submodule outside routing code is a linear that
    ``torch_linear_simple`` (with its sharding hints) must do. Router code (MoE blocks, classes or
    functions named for routing or gating) may use plain linear, softmax and top-k.
    """
    model, src = ctx.model, ctx.src
    flags = [*_stand_in_flags(src), *_transformers_modeling_flags(src), *_module_call_flags(model)]
    for fn in functions(src):
        flags += _reimplementation_flags(model, fn)
    return Outcome.of(flags, "canonical ops for attention, RoPE, norms, linears (and MoE/SSM where present)")


def _stand_in_flags(src: SourceFile) -> list[Flag]:
    return [
        src.flag(node, f"{qualified} in {src.owner(node)} instead of canonical {STAND_INS[qualified]}")
        for node, qualified in src.references()
        if qualified in STAND_INS
    ]


def _transformers_modeling_flags(src: SourceFile) -> list[Flag]:
    """Classes or functions taken from transformers' modeling files (their own, non-canonical math)."""
    flags = []
    for node, qualified in src.references():
        parts = qualified.split(".")
        if parts[:2] == ["transformers", "models"] and any(p.startswith("modeling_") for p in parts):
            flags.append(
                src.flag(
                    node, f"uses transformers' implementation {qualified}: translate it onto canonical ops"
                )
            )
    return flags


def _module_call_flags(model: ModelIndex) -> list[Flag]:
    src, flags = model.src, []
    for cls in src.classes.values():
        modules = {
            c.attr: c.cls for c in model.built_by(cls.name) if c.cls in MODULE_CALL_OPS and not c.in_list
        }
        for call in ast.walk(cls):
            if not isinstance(call, ast.Call) or model.is_routing_code(call):
                continue
            parts = dotted_parts(call.func)
            if parts and len(parts) == 2 and parts[0] == "self" and parts[1] in modules:
                op = MODULE_CALL_OPS[modules[parts[1]]]
                flags.append(
                    src.flag(
                        call, f"self.{parts[1]}(...) calls {modules[parts[1]]} in {src.owner(call)}: use {op}"
                    )
                )
    return flags


def _reimplementation_flags(model: ModelIndex, fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[Flag]:
    src, owner = model.src, model.src.owner(fn)
    body = sorted(src.walk(fn), key=lambda n: (getattr(n, "lineno", 0), getattr(n, "col_offset", 0)))
    calls = [n for n in body if isinstance(n, ast.Call) and not src.call_target(n).startswith("math.")]
    names = {call_name(c) for c in calls}
    flags = []
    if names & {"rsqrt", "sqrt"} and names & {"mean", "sum"}:
        node = next(c for c in calls if call_name(c) in {"rsqrt", "sqrt"})
        flags.append(
            src.flag(node, f"plain-PyTorch RMSNorm (mean of squares, rsqrt) in {owner}: use torch_rmsnorm")
        )
    if "softmax" in names and not model.is_routing_code(fn):
        matmul = next((n for n in body if is_activation_matmul(src, n)), None)
        if matmul is not None:
            flags.append(
                src.flag(
                    matmul, f"plain softmax attention (matmul + softmax) in {owner}: use torch_attention"
                )
            )
    if fn.name in {"rotate_half", "apply_rotary_pos_emb", "apply_rotary_emb"}:
        flags.append(src.flag(fn, f"plain-PyTorch RoPE helper {fn.name}: use a torch_rope_* op"))
    flags += [
        src.flag(
            c, f"plain rotate_half RoPE (cat of -x2, x1) in {owner}: use torch_rope_with_explicit_cos_sin"
        )
        for c in calls
        if call_name(c) in {"cat", "stack"} and _has_negated_element(c)
    ]
    flags += [
        src.flag(n, f"plain-PyTorch expert dispatch in {owner}: use torch_moe")
        for n in body
        if (isinstance(n, ast.For) and any("expert" in name.lower() for name in _names_in(n.iter)))
        or (isinstance(n, ast.Call) and call_name(n) in {"index_add_", "index_add"})
    ]
    return flags


def _has_negated_element(call: ast.Call) -> bool:
    if not call.args or not isinstance(call.args[0], (ast.Tuple, ast.List)):
        return False
    return any(isinstance(e, ast.UnaryOp) and isinstance(e.op, ast.USub) for e in call.args[0].elts)


# --------------------------------------------------------------------------------------------------
# C2 .. C8
# --------------------------------------------------------------------------------------------------


@rule(
    "C",
    "C2",
    "the only custom ops called are `torch.ops.auto_deploy.torch_*` and the sharding hints (`view`, `split_with_sizes`, `all_reduce`).",
)
def check_c2(ctx: ReviewContext) -> Outcome:
    """Judgement: a ``torch_*`` name must be one of OPS.md's canonical ops (an unknown one cannot run);
    ``torch.ops.aten``/``prims`` are plain PyTorch; defining ops in a model file fails."""
    src, flags = ctx.src, []
    for node, qualified in src.references():
        parts = qualified.split(".")
        if qualified.startswith(("torch.library", "torch._library")):
            flags.append(src.flag(node, f"defines or registers custom ops ({qualified}) in a model file"))
        if parts[:2] != ["torch", "ops"] or len(parts) < 4:
            continue
        namespace, name = parts[2], parts[3]
        if namespace == "auto_deploy" and name not in CANONICAL_OPS | SHARDING_HINT_OPS:
            flags.append(
                src.flag(node, f"torch.ops.auto_deploy.{name} is not a canonical op or sharding hint")
            )
        elif namespace not in {"auto_deploy", *PLAIN_TORCH_NAMESPACES}:
            flags.append(src.flag(node, f"custom op torch.ops.{namespace}.{name} outside auto_deploy"))
    return Outcome.of(flags, "custom ops are canonical torch.ops.auto_deploy ops and sharding hints only")


@rule(
    "C",
    "C3",
    "no backend-specific kernels (`triton_*`, `flashinfer_*`, `trtllm.*`, CUDA-only code), routers included: the file runs on CPU.",
)
def check_c3(ctx: ReviewContext) -> Outcome:
    """Backend names in identifiers or imports, ``.cuda()``, ``torch.cuda``, ``"cuda"`` devices fail."""
    src = ctx.src
    flags = _identifier_flags(ctx, BACKEND_NAME, "backend-specific name")
    for node in ast.walk(src.tree):
        if isinstance(node, ast.ImportFrom) and BACKEND_NAME.search(node.module or ""):
            flags.append(src.flag(node, f"imports backend module {node.module}"))
        elif isinstance(node, ast.Call) and call_name(node) == "cuda":
            flags.append(src.flag(node, ".cuda() call: the file must run on CPU"))
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and re.fullmatch(r"cuda(:\d+)?", node.value)
        ):
            flags.append(src.flag(node, f"CUDA device string {node.value!r}"))
    flags += [
        src.flag(node, f"CUDA-only code: {qualified}")
        for node, qualified in src.references()
        if qualified.startswith(("torch.cuda", "torch.backends.cuda", "torch.utils.cpp_extension"))
    ]
    return Outcome.of(flags, "no backend-specific kernels or CUDA-only code")


@rule("C", "C4", "no KV-cache logic (`past_key_value(s)`, `cache`, `DynamicCache`, `use_cache`).")
def check_c4(ctx: ReviewContext) -> Outcome:
    """Judgement: any identifier naming a cache fails (strict), except functools' memoising decorators
    and a config field read as ``config.<field>`` (LFM2's conv kernel size is ``config.conv_L_cache``)."""
    functools_names = {name for name, origin in ctx.src.imports.items() if origin.startswith("functools")}
    flags = [
        flag
        for flag, node in _with_nodes(ctx, KV_CACHE_NAME, "KV-cache logic")
        if not (ctx.src.qualify(node) or "").startswith("functools")
        and getattr(node, "id", getattr(node, "name", None)) not in functools_names
        and not _config_field(node)
    ]
    return Outcome.of(flags, "no KV-cache logic")


def _config_field(node: ast.AST) -> bool:
    """``config.<name>``: a field of the model's config, read."""
    return (
        isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "config"
        and isinstance(node.ctx, ast.Load)
    )


def _with_nodes(ctx: ReviewContext, pattern: re.Pattern[str], what: str) -> list[tuple[Flag, ast.AST]]:
    src = ctx.src
    return [
        (src.flag(node, f"{what}: {name!r}"), node)
        for node, name in src.identifiers()
        if pattern.search(name)
    ]


@rule("C", "C5", "no training paths (`self.training`, dropout, gradient checkpointing).")
def check_c5(ctx: ReviewContext) -> Outcome:
    """``.training``, dropout, gradient checkpointing, ``torch.utils.checkpoint``, labels and loss fail.

    Judgement: a canonical op's ``dropout_p`` keyword set to the literal 0 is no training path.
    """
    src = ctx.src
    flags = [
        flag
        for flag, node in _with_nodes(ctx, TRAINING_NAME, "training path")
        if not (isinstance(node, ast.keyword) and node.arg == "dropout_p" and constant_value(node.value) == 0)
    ]
    flags += [
        src.flag(n, "training branch: .training")
        for n in ast.walk(src.tree)
        if isinstance(n, ast.Attribute) and n.attr == "training"
    ]
    flags += [
        src.flag(node, f"gradient checkpointing: {qualified}")
        for node, qualified in src.references()
        if qualified.startswith("torch.utils.checkpoint")
    ]
    return Outcome.of(flags, "no training paths")


@rule(
    "C",
    "C6",
    "no flash/sdpa attention branches (`flash_attn`, `_flash_attention`, `attn_implementation` switches).",
)
def check_c6(ctx: ReviewContext) -> Outcome:
    """Judgement: the canonical op ``torch_attention_sdpa`` is not a switch, nor the model's own name
    in its class names (MiMo-V2-Flash's ``MiMoV2Flash*``); every other flash/sdpa name is."""
    causal_lm = ctx.model.causal_lm
    stem = re.sub(r"(ForCausalLM|LMHeadModel)$", "", causal_lm.name) if causal_lm is not None else ""
    src = ctx.src
    flags = [
        src.flag(node, f"attention-implementation switch: {name!r}")
        for node, name in src.identifiers()
        if ATTENTION_SWITCH_NAME.search(name.removeprefix(stem) if stem else name)
        and not _is_canonical_reference(src, node)
    ]
    for node in ast.walk(ctx.src.tree):
        if isinstance(node, ast.ImportFrom) and ATTENTION_SWITCH_NAME.search(node.module or ""):
            flags.append(ctx.src.flag(node, f"imports {node.module}"))
    return Outcome.of(flags, "no flash/sdpa attention branches")


@rule(
    "C",
    "C7",
    "plain PyTorch only where no canonical op exists (embedding, activations, residuals, routing math).",
)
def check_c7(ctx: ReviewContext) -> Outcome:
    """Each plain primitive of a canonical op's math outside routing code fails: softmax, rsqrt,
    activation matmuls (attention scores), mask building (``masked_fill``, ``triu``, ``tril``).

    Judgement: C1 names the block that is re-implemented, C7 every primitive line of it; router
    code (see C1) may use softmax, top-k and matmuls with its gate weight, and a rotary module may
    build its cos/sin tables with a matmul (no canonical op computes tables).
    """
    model, src, flags = ctx.model, ctx.src, []
    rotary = {cls for cls in src.classes.values() if model.role(cls) is Role.ROTARY}
    kinds = {"softmax": "attention softmax", "log_softmax": "attention softmax", "rsqrt": "norm math"}
    kinds |= {"masked_fill": "attention mask", "triu": "attention mask", "tril": "attention mask"}
    for node in ast.walk(src.tree):
        if model.is_routing_code(node) or src.enclosing_function(node) is None:
            continue
        if isinstance(node, ast.Call) and call_name(node) in kinds:
            what = kinds[call_name(node)]
            flags.append(
                src.flag(
                    node, f"plain {call_name(node)} ({what}) in {src.owner(node)}: a canonical op does this"
                )
            )
        elif is_activation_matmul(src, node) and src.enclosing_class(node) not in rotary:
            flags.append(
                src.flag(node, f"plain activation matmul in {src.owner(node)}: a canonical op does this")
            )
    return Outcome.of(flags, "plain PyTorch only for embeddings, activations, residuals and routing")


@rule("C", "C8", "no `repeat_kv` / `repeat_interleave` / `expand(...).reshape` of K/V for GQA.")
def check_c8(ctx: ReviewContext) -> Outcome:
    """Judgement: K/V are recognised by name (``k``, ``v``, ``key*``, ``value*``, ``*_k``, ``*_v``);
    an expand that is reshaped later through a variable counts like a chained one."""
    src = ctx.src
    flags = [
        src.flag(node, f"repeats K/V heads: {name!r}")
        for node, name in src.identifiers()
        if "repeat_kv" in name
    ]
    flags += [
        src.flag(c, "repeat_interleave: the attention op handles GQA")
        for c in src.calls
        if call_name(c) == "repeat_interleave"
    ]
    for fn in functions(src):
        flags += _expand_reshape_flags(src, fn)
    return Outcome.of(flags, "no K/V head repetition (the attention op handles GQA)")


def _expand_reshape_flags(src: SourceFile, fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[Flag]:
    body = list(src.walk(fn))
    expanded: dict[str, int] = {}  # name -> line where it is assigned an expanded K/V
    for node in body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and _is_kv_expand(node.value):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    expanded[target.id] = min(node.lineno, expanded.get(target.id, node.lineno))
    flags = []
    for call in (n for n in body if isinstance(n, ast.Call)):
        if call_name(call) == "repeat" and isinstance(call.func, ast.Attribute) and _is_kv(call.func.value):
            flags.append(src.flag(call, "K/V .repeat(...): the attention op handles GQA"))
        if call_name(call) not in {"reshape", "view", "flatten"}:
            continue
        receivers = [call.func.value] if isinstance(call.func, ast.Attribute) else []
        receivers += call.args[:1]
        for receiver in receivers:
            if (isinstance(receiver, ast.Call) and _is_kv_expand(receiver)) or (
                isinstance(receiver, ast.Name) and expanded.get(receiver.id, call.lineno) < call.lineno
            ):
                flags.append(src.flag(call, "expand(...).reshape of K/V: the attention op handles GQA"))
                break
    return flags


def _is_kv_expand(call: ast.Call) -> bool:
    return (
        call_name(call) in {"expand", "expand_as"}
        and isinstance(call.func, ast.Attribute)
        and _is_kv(call.func.value)
    )


def _is_kv(node: ast.AST) -> bool:
    return any(KV_NAME.search(name) for name in _names_in(node))


RULES = (check_c1, check_c2, check_c3, check_c4, check_c5, check_c6, check_c7, check_c8)
