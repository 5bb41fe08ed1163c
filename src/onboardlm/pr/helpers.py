"""The test helpers of onboardlm that the generated tests use, as one self-contained module.

TensorRT-LLM has ``assert_rmse_close`` but not the other helpers the generated tests call
(:data:`onboardlm.pr.imports.HELPER_NAMES`). This module copies their definitions, and everything
they need from onboardlm (transitively: the weight loader's strict key check, the error classes), out
of onboardlm's own source, so the copy cannot drift from what the tests were verified with. Imports
of other packages are kept; a name defined twice by different modules is refused.
"""

from __future__ import annotations

import ast
import importlib
import inspect
from dataclasses import dataclass, field

from onboardlm import __version__
from onboardlm.onboard.generate import format_source
from onboardlm.pr.imports import HELPER_NAMES
from onboardlm.pr.layout import PrError

#: Where each helper is defined in onboardlm.
HELPER_SOURCES: dict[str, str] = {
    "randomize_constant_tensors": "onboardlm.testing.random_init",
    "unit_embeddings": "onboardlm.testing.random_init",
    "transfer_weights": "onboardlm.testing.transfer",
    "record_calls": "onboardlm.testing.capture",
    "Call": "onboardlm.testing.capture",
    "first_tensor": "onboardlm.testing.capture",
    "missing_paths": "onboardlm.testing.capture",
    "cos_sin_tables": "onboardlm.testing.capture",
    "text_positions": "onboardlm.testing.capture",
    "rmse_ratio": "onboardlm.testing.metrics",
}
assert set(HELPER_SOURCES) == HELPER_NAMES


@dataclass
class _Module:
    """One onboardlm module: its source lines, top-level definitions and imports by bound name."""

    name: str
    lines: list[str]
    definitions: dict[str, ast.stmt] = field(default_factory=dict)
    imports: dict[str, tuple[str | None, str, str | None]] = field(
        default_factory=dict
    )  # name -> (from, what, as)

    @classmethod
    def load(cls, name: str) -> _Module:
        source = inspect.getsource(importlib.import_module(name))
        module = cls(name, source.splitlines())
        for node in ast.parse(source).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                module.definitions[node.name] = node
            elif isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        module.definitions[target.id] = node
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                module.definitions[node.target.id] = node
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    bound = alias.asname or alias.name.split(".")[0]
                    module.imports[bound] = (None, alias.name, alias.asname)
            elif isinstance(node, ast.ImportFrom) and node.module and node.module != "__future__":
                for alias in node.names:
                    module.imports[alias.asname or alias.name] = (node.module, alias.name, alias.asname)
        return module

    def segment(self, node: ast.stmt) -> str:
        """The source of ``node`` with its decorators and the ``#:`` comments right above it."""
        start = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))]) - 1
        while start > 0 and self.lines[start - 1].startswith("#"):
            start -= 1
        return "\n".join(self.lines[start : node.end_lineno])


def helper_module_source() -> str:
    """The text of the self-contained helper module (``_lean_model_test_utils.py``)."""
    modules: dict[str, _Module] = {}
    wanted: list[tuple[str, str]] = [(HELPER_SOURCES[name], name) for name in sorted(HELPER_NAMES)]
    chosen: dict[tuple[str, str], ast.stmt] = {}
    owner: dict[str, str] = {}  # bound name -> module that defines it
    external: set[tuple[str | None, str, str | None]] = set()
    depends: dict[str, set[str]] = {}  # module -> the onboardlm modules it takes definitions from

    while wanted:
        module_name, name = wanted.pop()
        module = modules.get(module_name) or modules.setdefault(module_name, _Module.load(module_name))
        if (module_name, name) in chosen:
            continue
        if name not in module.definitions:
            raise PrError(module_name, f"defines no {name} (the test helper module cannot be generated)")
        if owner.setdefault(name, module_name) != module_name:
            raise PrError(
                name, f"defined by both {owner[name]} and {module_name}; the helper module needs one"
            )
        node = module.definitions[name]
        chosen[(module_name, name)] = node
        depends.setdefault(module_name, set())
        for used in _names_used(node):
            if used in module.definitions and used != name:
                wanted.append((module_name, used))
            elif used in module.imports:
                source, what, asname = module.imports[used]
                if source is not None and source.split(".")[0] == "onboardlm":
                    wanted.append((source, what))
                    depends[module_name].add(source)
                elif source is None and what.split(".")[0] == "onboardlm":
                    raise PrError(module_name, f"uses module {what} itself; the helper module cannot copy it")
                else:
                    external.add(module.imports[used])

    blocks = []
    for module_name in _dependencies_first(depends):  # source order inside one module
        module = modules[module_name]
        nodes = sorted(
            {id(n): n for (m, _), n in chosen.items() if m == module_name}.values(), key=lambda n: n.lineno
        )
        blocks.append(f"# ---- from {module_name}\n\n" + "\n\n\n".join(module.segment(n) for n in nodes))
    header = (
        f'"""Test helpers of onboardlm {__version__} for the lean-model tests it writes (generated by\n'
        "``onboardlm pr`` from onboardlm's own source; regenerate rather than edit).\n"
        '"""\n\nfrom __future__ import annotations\n\n'
    )
    exports = "__all__ = [" + ", ".join(f'"{n}"' for n in sorted(HELPER_NAMES, key=str.lower)) + "]\n"
    text = header + _import_lines(external) + "\n\n" + exports + "\n\n" + "\n\n\n".join(blocks) + "\n"
    ast.parse(text)  # a broken copy is a bug here, not in the checkout
    return format_source(text)


def _dependencies_first(depends: dict[str, set[str]]) -> list[str]:
    order: list[str] = []

    def visit(module: str) -> None:
        if module not in order:
            for dependency in sorted(depends.get(module, ())):
                visit(dependency)
            order.append(module)

    for module in sorted(depends):
        visit(module)
    return order


def _names_used(node: ast.stmt) -> set[str]:
    """Every name the statement reads (code, decorators, annotations, base classes)."""
    names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
    # annotations under `from __future__ import annotations` are strings only when quoted; read those too
    for constant in ast.walk(node):
        if (
            isinstance(constant, ast.Constant)
            and isinstance(constant.value, str)
            and constant.value.isidentifier()
        ):
            names.add(constant.value)
    return names


def _import_lines(imports: set[tuple[str | None, str, str | None]]) -> str:
    plain = sorted(
        f"import {what}" + (f" as {asname}" if asname else "") for src, what, asname in imports if src is None
    )
    grouped: dict[str, list[str]] = {}
    for source, what, asname in imports:
        if source is not None:
            grouped.setdefault(source, []).append(what + (f" as {asname}" if asname else ""))
    froms = [
        f"from {source} import {', '.join(sorted(set(names)))}" for source, names in sorted(grouped.items())
    ]
    return "\n".join(plain + froms) + "\n"
