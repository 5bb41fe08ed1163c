"""Rewrite the onboardlm imports of a generated model or test file to TensorRT-LLM's (with libcst).

Only import statements change; every other byte of the file stays. An onboardlm import without a
TensorRT-LLM counterpart is refused by name, and the result is checked to import nothing from
onboardlm and to use no ``onboardlm`` name.
"""

from __future__ import annotations

import ast
from collections.abc import Sequence
from dataclasses import dataclass, field

import libcst as cst
from libcst.helpers import get_full_name_for_node

from onboardlm.pr.layout import LEAN_TEST_UTILS, MODEL_TEST_UTILS, PrError

AD = "tensorrt_llm._torch.auto_deploy"
CUSTOM_PACKAGE = f"{AD}.models.custom"

#: ``import X`` -> ``import Y``.
MODULE_IMPORTS: dict[str, str] = {"onboardlm.ops": f"{AD}.custom_ops"}


@dataclass(frozen=True)
class FromRule:
    """``from <module> import <names>`` goes to ``target`` (``names`` None: any name)."""

    target: str
    names: frozenset[str] | None = None


#: The onboardlm.testing names the generated tests use that TensorRT-LLM does not have; they come
#: from the helper module that ``onboardlm pr`` writes (see :mod:`onboardlm.pr.helpers`).
HELPER_NAMES = frozenset(
    {
        "randomize_constant_tensors",
        "unit_embeddings",
        "transfer_weights",
        "record_calls",
        "Call",
        "first_tensor",
        "missing_paths",
        "cos_sin_tables",
        "text_positions",
        "rmse_ratio",
    }
)

FROM_IMPORTS: dict[str, tuple[FromRule, ...]] = {
    "onboardlm.ops": (FromRule("tensorrt_llm._torch.utils", frozenset({"ActivationType"})),),
    "onboardlm.models.factory": (FromRule(f"{AD}.models.hf", frozenset({"AutoModelForCausalLMFactory"})),),
    "onboardlm.export": (FromRule(f"{AD}.export", frozenset({"torch_export_to_gm"})),),
    "onboardlm.models.custom": (FromRule(CUSTOM_PACKAGE),),
    "onboardlm.testing": (
        FromRule(MODEL_TEST_UTILS, frozenset({"assert_rmse_close"})),
        FromRule(LEAN_TEST_UTILS, HELPER_NAMES),
    ),
    "onboardlm.testing.capture": (FromRule(LEAN_TEST_UTILS, HELPER_NAMES),),
    "onboardlm.testing.random_init": (FromRule(LEAN_TEST_UTILS, HELPER_NAMES),),
    "onboardlm.testing.transfer": (FromRule(LEAN_TEST_UTILS, HELPER_NAMES),),
}


@dataclass
class Rewrite:
    """A rewritten file and the (old -> new) import lines it changed."""

    text: str
    changes: list[tuple[str, str]] = field(default_factory=list)


def rewrite_imports(text: str, subject: str, local_modules: Sequence[str] = ()) -> Rewrite:
    """``text`` with its onboardlm imports rewritten; ``local_modules`` (``modeling_llama``) are the
    lean model modules a staged test imports bare, which move into TensorRT-LLM's custom package."""
    try:
        tree = cst.parse_module(text)
    except cst.ParserSyntaxError as err:
        raise PrError(subject, f"does not parse: {err.message} (line {err.raw_line})") from None
    rewriter = _Rewriter(tree, subject, set(local_modules))
    text_out = tree.visit(rewriter).code
    check_no_onboardlm(text_out, subject)
    return Rewrite(text_out, rewriter.changes)


def check_no_onboardlm(text: str, subject: str) -> None:
    """Refuse ``text`` when it still imports from onboardlm or names ``onboardlm`` in code."""
    for node in ast.walk(ast.parse(text)):
        modules: list[str] = []
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            modules = [node.module]
        elif isinstance(node, ast.Name) and node.id == "onboardlm":
            modules = ["onboardlm"]
        bad = [m for m in modules if m.split(".")[0] == "onboardlm"]
        if bad:
            raise PrError(subject, f"still uses {bad[0]} (line {node.lineno}) after the import rewrite")


class _Rewriter(cst.CSTTransformer):
    def __init__(self, module: cst.Module, subject: str, local_modules: set[str]) -> None:
        super().__init__()
        self.module, self.subject, self.local_modules = module, subject, local_modules
        self.changes: list[tuple[str, str]] = []

    def leave_SimpleStatementLine(
        self, original_node: cst.SimpleStatementLine, updated_node: cst.SimpleStatementLine
    ) -> cst.SimpleStatementLine | cst.FlattenSentinel[cst.SimpleStatementLine]:
        if len(updated_node.body) != 1 or not isinstance(updated_node.body[0], (cst.Import, cst.ImportFrom)):
            self._refuse_compound(updated_node)
            return updated_node
        statement = updated_node.body[0]
        replacements = (
            self._import(statement) if isinstance(statement, cst.Import) else self._import_from(statement)
        )
        if replacements is None:
            return updated_node
        old = self.module.code_for_node(statement)
        lines = [
            updated_node.with_changes(body=[new]) if i == 0 else cst.SimpleStatementLine(body=[new])
            for i, new in enumerate(replacements)
        ]
        self.changes += [(old, self.module.code_for_node(new)) for new in replacements]
        return lines[0] if len(lines) == 1 else cst.FlattenSentinel(lines)

    def _refuse_compound(self, line: cst.SimpleStatementLine) -> None:
        for statement in line.body:
            if isinstance(statement, (cst.Import, cst.ImportFrom)) and self._import_mentions_onboardlm(
                statement
            ):
                raise PrError(self.subject, "an onboardlm import shares its line with other statements")

    def _import_mentions_onboardlm(self, statement: cst.Import | cst.ImportFrom) -> bool:
        if isinstance(statement, cst.Import):
            return any(_name(a.name).split(".")[0] == "onboardlm" for a in statement.names)
        return statement.module is not None and _name(statement.module).split(".")[0] == "onboardlm"

    def _import(self, statement: cst.Import) -> list[cst.BaseSmallStatement] | None:
        names = [(_name(alias.name), _asname(alias)) for alias in statement.names]
        if not any(n.split(".")[0] == "onboardlm" or n in self.local_modules for n, _ in names):
            return None
        out = []
        for name, asname in names:
            alias = f" as {asname}" if asname else ""
            if name in self.local_modules:
                out.append(_parse(f"from {CUSTOM_PACKAGE} import {name}{alias}"))
            elif name in MODULE_IMPORTS:
                out.append(_parse(f"import {MODULE_IMPORTS[name]}{alias}"))
            elif name.split(".")[0] == "onboardlm":
                raise PrError(self.subject, f"imports {name}, which has no TensorRT-LLM counterpart")
            else:
                out.append(_parse(f"import {name}{alias}"))
        return out

    def _import_from(self, statement: cst.ImportFrom) -> list[cst.BaseSmallStatement] | None:
        if statement.relative or statement.module is None:
            return None
        module = _name(statement.module)
        if module.split(".")[0] != "onboardlm":
            return None
        if isinstance(statement.names, cst.ImportStar):
            raise PrError(self.subject, f"imports * from {module}; name the imports")
        rules = FROM_IMPORTS.get(module)
        if rules is None:
            raise PrError(self.subject, f"imports from {module}, which has no TensorRT-LLM counterpart")
        grouped: dict[str, list[str]] = {}
        for alias in statement.names:
            name, asname = _name(alias.name), _asname(alias)
            rule = next((r for r in rules if r.names is None or name in r.names), None)
            if rule is None:
                raise PrError(self.subject, f"imports {module}.{name}, which has no TensorRT-LLM counterpart")
            grouped.setdefault(rule.target, []).append(f"{name} as {asname}" if asname else name)
        return [_parse(f"from {target} import {', '.join(names)}") for target, names in grouped.items()]


def _name(node: cst.CSTNode) -> str:
    name = get_full_name_for_node(node)
    if name is None:
        raise ValueError(f"not a dotted name: {node}")
    return name


def _asname(alias: cst.ImportAlias) -> str | None:
    return _name(alias.asname.name) if alias.asname is not None else None


def _parse(code: str) -> cst.BaseSmallStatement:
    statement = cst.parse_statement(code)
    assert isinstance(statement, cst.SimpleStatementLine)
    return statement.body[0]
