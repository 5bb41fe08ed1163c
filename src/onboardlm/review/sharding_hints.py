"""C9: attention and MLP blocks carry the tensor-parallel sharding hints the sharding pass reads.

Every linear in an attention, MLP or MoE block is ``torch_linear_simple`` with an explicit
``tp_mode``; opening projections are ``colwise`` and closing ones ``rowwise``; every reshape is the
``auto_deploy.view`` hint op (not ``Tensor.view`` / ``reshape``); a block with a ``rowwise`` output
calls ``all_reduce`` after it. A plain ``nn.Linear`` call, ``F.linear`` or ``Tensor.reshape`` there
would stay unsharded and silently break TP.
"""

from __future__ import annotations

import ast

from onboardlm.review.context import ReviewContext
from onboardlm.review.findings import Flag, Outcome, rule
from onboardlm.review.model_index import Role
from onboardlm.review.source import FUNCTION_TYPES, SourceFile, call_name

BLOCK_ROLES = (Role.ATTENTION, Role.MLP, Role.MOE)
#: Token mixers other than attention (SSM, gated delta rule, short convolution): checked like blocks.
MIXER_OPS = frozenset(
    {
        "torch_ssm",
        "torch_gated_delta_rule",
        "torch_channel_gated_delta_rule",
        "torch_rg_lru",
        "torch_causal_conv1d",
    }
)
PLAIN_LINEAR = frozenset({"linear"})  # F.linear / torch.nn.functional.linear
PLAIN_RESHAPE = frozenset({"view", "reshape"})
#: Projections that open a block (shard their output) and close it (shard their input).
OPENING = (
    "q_proj", "k_proj", "v_proj", "qkv_proj", "gate_proj", "up_proj", "gate_up_proj", "fc1", "c_fc", "in_proj",
)  # fmt: skip
CLOSING = ("o_proj", "down_proj", "dense", "fc2", "c_proj", "out_proj")


@rule(
    "C",
    "C9",
    "attention and MLP linears and reshapes carry sharding hints: opening projections colwise, closing "
    "rowwise, an all_reduce after the rowwise output.",
)
def check_c9(ctx: ReviewContext) -> Outcome:
    """Judgement: ``tp_mode="none"`` is allowed (a deliberately replicated linear), a missing
    ``tp_mode`` is not; router gates are exempt (routing code keeps its weights replicated)."""
    model, src = ctx.model, ctx.src
    blocks = [cls for role in BLOCK_ROLES for cls in model.classes_with_role(role)]
    blocks += [
        cls
        for cls in model.src.classes.values()
        if cls not in blocks and model.ops_used(cls) & MIXER_OPS and model.role(cls) is not Role.DECODER_LAYER
    ]
    if not blocks:
        return Outcome.not_applicable("the file has no attention or MLP block")
    flags: list[Flag] = []
    for cls in blocks:
        linears = _linear_attributes(cls)
        for fn in (node for node in cls.body if isinstance(node, FUNCTION_TYPES) and node.name != "__init__"):
            if model.is_routing_code(fn):
                continue
            flags += _function_flags(src, cls, fn, linears, model.is_routing_code)
    return Outcome.of(flags, f"sharding hints on the linears and reshapes of {len(blocks)} block class(es)")


def _function_flags(
    src: SourceFile, cls: ast.ClassDef, fn: ast.AST, linears: set[str], is_routing
) -> list[Flag]:  # noqa: ANN001
    flags: list[Flag] = []
    rowwise = all_reduce = False
    aliases = _op_aliases(fn)
    for node in ast.walk(fn):
        if not isinstance(node, ast.Call) or is_routing(node):
            continue
        name = call_name(node)
        if isinstance(node.func, ast.Name) and node.func.id in aliases:
            name = aliases[node.func.id]
        if name == "torch_linear_simple":
            mode = _keyword(node, "tp_mode")
            projection = _projection(node)
            if mode is None:
                flags.append(src.flag(node, f"torch_linear_simple in {cls.name} has no tp_mode hint"))
            elif projection in OPENING and mode == "rowwise" or projection in CLOSING and mode == "colwise":
                flags.append(
                    src.flag(node, f"{projection} in {cls.name} is {mode}: the wrong side of the block")
                )
            rowwise |= mode == "rowwise"
        elif name == "all_reduce":
            all_reduce = True
        elif name in PLAIN_LINEAR:
            flags.append(src.flag(node, f"plain linear in {cls.name}: use torch_linear_simple with tp_mode"))
        elif name in PLAIN_RESHAPE and isinstance(node.func, ast.Attribute) and not _is_hint_op(node):
            flags.append(
                src.flag(node, f"plain {name}() in {cls.name}: use auto_deploy.view with tp_scaled_dim")
            )
        elif _calls_linear_module(node, linears):
            flags.append(src.flag(node, f"nn.Linear called directly in {cls.name}: no sharding hints"))
    if rowwise and not all_reduce:
        flags.append(src.flag(fn, f"{cls.name} has a rowwise linear but no all_reduce after it"))
    return flags


def _op_aliases(fn: ast.AST) -> dict[str, str]:
    """Local names bound to an op (``linear = torch.ops.auto_deploy.torch_linear_simple``) -> op name."""
    return {
        target.id: node.value.attr
        for node in ast.walk(fn)
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Attribute)
        for target in node.targets
        if isinstance(target, ast.Name)
    }


def _linear_attributes(cls: ast.ClassDef) -> set[str]:
    """``self.<name> = nn.Linear(...)`` attributes of ``cls``."""
    found = set()
    for node in ast.walk(cls):
        if (
            isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Call)
            and call_name(node.value) == "Linear"
        ):
            found |= {t.attr for t in node.targets if isinstance(t, ast.Attribute)}
    return found


def _calls_linear_module(call: ast.Call, linears: set[str]) -> bool:
    func = call.func
    return (
        isinstance(func, ast.Attribute)
        and func.attr in linears
        and isinstance(func.value, ast.Name)
        and func.value.id == "self"
    )


def _is_hint_op(call: ast.Call) -> bool:
    """``ops.view(...)`` / ``torch.ops.auto_deploy.view(...)``: a module-level op, not a tensor method."""
    owner = call.func.value if isinstance(call.func, ast.Attribute) else None
    text = ast.unparse(owner) if owner is not None else ""
    return text in ("ops", "torch.ops.auto_deploy") or text.endswith("auto_deploy")


def _keyword(call: ast.Call, name: str) -> str | None:
    for keyword in call.keywords:
        if keyword.arg == name:
            return keyword.value.value if isinstance(keyword.value, ast.Constant) else "dynamic"
    return None


def _projection(call: ast.Call) -> str | None:
    """The projection a ``torch_linear_simple`` call applies: ``q_proj`` for ``self.q_proj.weight``."""
    if len(call.args) < 2:
        return None
    weight = call.args[1]
    if isinstance(weight, ast.Attribute) and isinstance(weight.value, ast.Attribute):
        return weight.value.attr
    return None


RULES = (check_c9,)
