"""Config attributes a config class computes from its stored fields instead of storing them.

transformers' configs set some attributes in ``__post_init__`` (Falcon's ``num_key_value_heads``
from ``num_kv_heads``, ``new_decoder_architecture`` and ``multi_query``, since 5.2x). A lean file that
reads such an attribute fails on a release whose config does not compute it, so it writes the
derivation itself, over fields every release stores.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap

from transformers import PretrainedConfig


def derived_expression(config: PretrainedConfig, name: str) -> str | None:
    """``config.<name>`` as an expression over the config's stored fields, when ``type(config)``
    computes ``name`` in ``__post_init__`` (the expression is checked to give the config's value);
    None when ``name`` is a stored field or no such derivation is found."""
    stored = {field.name for field in dataclasses.fields(config) if field.init}
    if name in stored:
        return None
    for klass in type(config).__mro__:
        method = klass.__dict__.get("__post_init__")
        if method is None:
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(method)))
        except (OSError, TypeError, SyntaxError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and [_self_attribute(t) for t in node.targets] == [name]:
                expression = _over_stored_fields(node.value, stored)
                if expression is not None and _evaluates_to(expression, config, getattr(config, name, None)):
                    return expression
    return None


def _self_attribute(node: ast.expr) -> str | None:
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
        return node.attr
    return None


def _over_stored_fields(node: ast.expr, stored: set[str]) -> str | None:
    """``node`` with ``self.x`` written ``config.x``; None if it reads anything but stored fields."""
    for child in ast.walk(node):
        if isinstance(child, ast.Name) and child.id != "self":
            return None
        if isinstance(child, ast.Call):
            return None
        attribute = _self_attribute(child) if isinstance(child, ast.Attribute) else None
        if isinstance(child, ast.Attribute) and attribute not in stored:
            return None
    return ast.unparse(node).replace("self.", "config.")


def _evaluates_to(expression: str, config: PretrainedConfig, expected: object) -> bool:
    try:
        return eval(expression, {"__builtins__": {}}, {"config": config}) == expected  # noqa: S307
    except Exception:  # noqa: BLE001 - an expression that does not evaluate is not the derivation
        return False
