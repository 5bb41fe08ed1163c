"""Small AST helpers for the mutation catalogue: where a node sits, and expressions to put in its place."""

from __future__ import annotations

import ast
from collections.abc import Iterator


def parse_expr(text: str) -> ast.expr:
    """One expression from source text."""
    node = ast.parse(text, mode="eval").body
    return node


def scaled(expr: ast.expr, factor: float) -> ast.expr:
    """``expr * factor``, None kept None (``(lambda v: ...)(expr)``, so ``expr`` is evaluated once)."""
    call = parse_expr(f"(lambda v: None if v is None else v * {factor!r})(0)")
    assert isinstance(call, ast.Call)
    call.args = [expr]
    return call


def shifted(expr: ast.expr, delta: int) -> ast.expr:
    """``expr + delta``, None kept None."""
    call = parse_expr(f"(lambda v: None if v is None else v + {delta!r})(0)")
    assert isinstance(call, ast.Call)
    call.args = [expr]
    return call


def is_self_attr(node: ast.AST, name: str | None = None) -> bool:
    """``self.<name>`` (any name when ``name`` is None)."""
    return (
        isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "self"
        and (name is None or node.attr == name)
    )


def call_attr(node: ast.AST) -> str | None:
    """The last name of a call's function: ``torch_attention`` for ``ops.torch_attention(...)``."""
    if not isinstance(node, ast.Call):
        return None
    func = node.func
    if isinstance(func, ast.Attribute):
        return func.attr
    if isinstance(func, ast.Name):
        return func.id
    return None


def classes(tree: ast.Module, suffix: str = "") -> Iterator[ast.ClassDef]:
    """Top-level classes whose name ends with ``suffix``."""
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name.endswith(suffix):
            yield node


def method(cls: ast.ClassDef, name: str) -> ast.FunctionDef | None:
    for node in cls.body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node
    return None


def self_assignments(scope: ast.AST, attr: str) -> Iterator[ast.Assign]:
    """``self.<attr> = ...`` statements under ``scope``."""
    for node in ast.walk(scope):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and is_self_attr(node.targets[0], attr):
            yield node


def constructed_attrs(cls: ast.ClassDef, suffixes: tuple[str, ...]) -> set[str]:
    """Attributes that ``__init__`` sets to a call of a class whose name ends with one of ``suffixes``."""
    init = method(cls, "__init__")
    found = set()
    for node in ast.walk(init) if init is not None else ():
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and is_self_attr(node.targets[0])):
            continue
        value = node.value
        if isinstance(value, ast.IfExp):  # ``A(config) if cond else B(config)``
            value = value.body
        name = call_attr(value)
        if name is not None and name.endswith(suffixes):
            target = node.targets[0]
            assert isinstance(target, ast.Attribute)
            found.add(target.attr)
    return found


def replace_in_parent(tree: ast.AST, old: ast.AST, new: ast.AST) -> bool:
    """Put ``new`` where ``old`` is (a field or a list element of its parent); False if not found."""
    for parent in ast.walk(tree):
        for field, value in ast.iter_fields(parent):
            if value is old:
                setattr(parent, field, new)
                return True
            if isinstance(value, list):
                for index, item in enumerate(value):
                    if item is old:
                        value[index] = new
                        return True
    return False
