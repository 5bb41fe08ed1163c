"""A parsed Python file with what every rule needs: parents, imports, aliases and name resolution.

Names are resolved through the import table and through simple aliases (``ops =
torch.ops.auto_deploy`` in a function or at module level, ``self.op = torch.ops.auto_deploy.x`` in a
class), so ``ops.torch_attention(...)`` and ``torch.ops.auto_deploy.torch_attention(...)`` resolve to
the same qualified name.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from onboardlm.errors import OnboardlmError
from onboardlm.review.findings import Flag

Scope = ast.Module | ast.FunctionDef | ast.AsyncFunctionDef
FUNCTION_TYPES = (ast.FunctionDef, ast.AsyncFunctionDef)
_MAX_ALIAS_DEPTH = 8


class ReviewInputError(OnboardlmError):
    """A file given to the review that does not exist, is not Python, or cannot be reviewed."""


def dotted_parts(node: ast.AST) -> list[str] | None:
    """``a.b.c`` as ``["a", "b", "c"]``; None for anything but a chain of names."""
    if isinstance(node, ast.Name):
        return [node.id]
    if isinstance(node, ast.Attribute):
        head = dotted_parts(node.value)
        return None if head is None else [*head, node.attr]
    return None


def call_name(call: ast.Call) -> str:
    """The last name of what is called: ``rsqrt`` for ``torch.rsqrt(x)`` and ``x.rsqrt()``."""
    func = call.func
    if isinstance(func, ast.Attribute):
        return func.attr
    return func.id if isinstance(func, ast.Name) else ""


def constant_value(node: ast.AST | None) -> object:
    """The value of a literal number/string/bool/None (with unary minus); ``...`` otherwise."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        inner = constant_value(node.operand)
        if isinstance(inner, (int, float)) and not isinstance(inner, bool):
            return -inner
    return ...


def keyword_value(call: ast.Call, name: str) -> ast.expr | None:
    return next((kw.value for kw in call.keywords if kw.arg == name), None)


def argument(call: ast.Call, index: int, name: str) -> ast.expr | None:
    """A call argument given positionally at ``index`` or by keyword ``name``."""
    if len(call.args) > index and not any(isinstance(a, ast.Starred) for a in call.args[: index + 1]):
        return call.args[index]
    return keyword_value(call, name)


@dataclass
class SourceFile:
    """One parsed file. Build with :meth:`parse`."""

    path: Path
    text: str
    tree: ast.Module
    parents: dict[ast.AST, ast.AST] = field(default_factory=dict)

    @classmethod
    def parse(cls, path: Path, role: str) -> SourceFile:
        """Read and parse ``path``; :class:`ReviewInputError` names the file when that is impossible."""
        if not path.exists():
            raise ReviewInputError(str(path), f"{role} does not exist")
        if not path.is_file() or path.suffix != ".py":
            raise ReviewInputError(str(path), f"{role} is not a Python file (.py)")
        try:
            text = path.read_text(encoding="utf-8")
            tree = ast.parse(text, filename=str(path))
        except UnicodeDecodeError as err:
            raise ReviewInputError(str(path), f"{role} is not UTF-8 text: {err.reason}") from None
        except SyntaxError as err:
            raise ReviewInputError(
                str(path), f"{role} does not parse: line {err.lineno}: {err.msg}"
            ) from None
        source = cls(path, text, tree)
        for parent in ast.walk(tree):
            for child in ast.iter_child_nodes(parent):
                source.parents[child] = parent
        return source

    # ----------------------------------------------------------------- locations
    def flag(self, node: ast.AST | int, reason: str) -> Flag:
        line = node if isinstance(node, int) else getattr(node, "lineno", 1)
        return Flag(self.path, line, reason)

    def ancestors(self, node: ast.AST) -> Iterator[ast.AST]:
        while node in self.parents:
            node = self.parents[node]
            yield node

    def enclosing_function(self, node: ast.AST) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
        return next((a for a in self.ancestors(node) if isinstance(a, FUNCTION_TYPES)), None)

    def enclosing_class(self, node: ast.AST) -> ast.ClassDef | None:
        return next((a for a in self.ancestors(node) if isinstance(a, ast.ClassDef)), None)

    def owner(self, node: ast.AST) -> str:
        """``Class.method`` or ``function`` around ``node`` (``<module>`` at top level)."""
        fn, cls = self.enclosing_function(node), self.enclosing_class(node)
        names = [n.name for n in (cls, fn) if n is not None]
        return ".".join(names) or "<module>"

    # ----------------------------------------------------------------- indexes
    @cached_property
    def classes(self) -> dict[str, ast.ClassDef]:
        """Top-level classes by name."""
        return {node.name: node for node in self.tree.body if isinstance(node, ast.ClassDef)}

    @cached_property
    def functions(self) -> dict[str, ast.FunctionDef | ast.AsyncFunctionDef]:
        """Top-level functions by name."""
        return {node.name: node for node in self.tree.body if isinstance(node, FUNCTION_TYPES)}

    @cached_property
    def calls(self) -> list[ast.Call]:
        return [node for node in ast.walk(self.tree) if isinstance(node, ast.Call)]

    @cached_property
    def imports(self) -> dict[str, str]:
        """Local name -> qualified name for every import (relative ones keep their leading dots)."""
        table: dict[str, str] = {}
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.asname:
                        table[alias.asname] = alias.name
                    else:
                        head = alias.name.split(".")[0]
                        table[head] = head
            elif isinstance(node, ast.ImportFrom):
                module = "." * node.level + (node.module or "")
                for alias in node.names:
                    if alias.name != "*":
                        joiner = "" if module.endswith(".") else "."
                        table[alias.asname or alias.name] = f"{module}{joiner}{alias.name}"
        return table

    @cached_property
    def _aliases(self) -> dict[ast.AST, dict[str, ast.expr]]:
        """Per scope (module, function, class for ``self.x``): name -> aliased dotted expression."""
        aliases: dict[ast.AST, dict[str, ast.expr]] = {}
        for node in ast.walk(self.tree):
            if not isinstance(node, ast.Assign) or len(node.targets) != 1:
                continue
            if dotted_parts(node.value) is None:
                continue
            target = node.targets[0]
            if isinstance(target, ast.Name):
                scope: ast.AST = self.enclosing_function(node) or self.tree
                aliases.setdefault(scope, {})[target.id] = node.value
            elif _is_self_attribute(target) and (cls := self.enclosing_class(node)) is not None:
                assert isinstance(target, ast.Attribute)
                aliases.setdefault(cls, {})["self." + target.attr] = node.value
        return aliases

    # ----------------------------------------------------------------- resolution
    def qualify(self, node: ast.AST, depth: int = 0) -> str | None:
        """The qualified dotted name of a name chain, through imports and aliases; None if not a chain."""
        parts = dotted_parts(node)
        if parts is None:
            return None
        if depth < _MAX_ALIAS_DEPTH:
            if parts[0] == "self" and len(parts) > 1 and (cls := self.enclosing_class(node)) is not None:
                value = self._aliases.get(cls, {}).get("self." + parts[1])
                if value is not None:
                    return _join(self.qualify(value, depth + 1), parts[2:])
            for scope in self._scopes(node):
                value = self._aliases.get(scope, {}).get(parts[0])
                if value is not None and value is not node:
                    return _join(self.qualify(value, depth + 1), parts[1:])
        return ".".join([self.imports.get(parts[0], parts[0]), *parts[1:]])

    def call_target(self, call: ast.Call) -> str:
        """Qualified name of the called function, or its last name when it is not a name chain."""
        return self.qualify(call.func) or call_name(call)

    def _scopes(self, node: ast.AST) -> Iterator[ast.AST]:
        for ancestor in self.ancestors(node):
            if isinstance(ancestor, FUNCTION_TYPES):
                yield ancestor
        yield self.tree

    def references(self) -> Iterator[tuple[ast.expr, str]]:
        """Every maximal name chain (``a.b.c``, not its prefixes) with its qualified name."""
        for node in ast.walk(self.tree):
            if not isinstance(node, (ast.Name, ast.Attribute)):
                continue
            parent = self.parents.get(node)
            if isinstance(parent, ast.Attribute) and parent.value is node:
                continue
            qualified = self.qualify(node)
            if qualified is not None:
                yield node, qualified

    def identifiers(self) -> Iterator[tuple[ast.AST, str]]:
        """Every identifier the code spells: names, attributes, parameters, definitions, keywords, imports."""
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Name):
                yield node, node.id
            elif isinstance(node, ast.Attribute):
                yield node, node.attr
            elif isinstance(node, ast.arg):
                yield node, node.arg
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                yield node, node.name
            elif isinstance(node, ast.keyword) and node.arg:
                yield node, node.arg
            elif isinstance(node, ast.alias):
                yield node, node.asname or node.name
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and self._is_key(node):
                yield node, node.value

    def _is_key(self, node: ast.Constant) -> bool:
        """A string used as a key: ``d["x"]``, ``d.get("x")``, ``getattr(o, "x")``, ``kwargs.pop("x")``."""
        parent = self.parents.get(node)
        if isinstance(parent, ast.Subscript):
            return parent.slice is node
        return isinstance(parent, ast.Call) and call_name(parent) in {
            "get",
            "pop",
            "getattr",
            "hasattr",
            "setdefault",
        }

    def walk(self, node: ast.AST) -> Iterator[ast.AST]:
        """``ast.walk`` over ``node`` without entering nested function or class definitions."""
        stack = list(ast.iter_child_nodes(node))
        while stack:
            child = stack.pop()
            yield child
            if not isinstance(child, (*FUNCTION_TYPES, ast.ClassDef, ast.Lambda)):
                stack.extend(ast.iter_child_nodes(child))


def _is_self_attribute(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self"


def _join(head: str | None, rest: list[str]) -> str | None:
    return None if head is None else ".".join([head, *rest])
