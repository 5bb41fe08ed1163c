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


def width_function(
    module_class: type, linear_attr: str, config: PretrainedConfig, width: int, name: str
) -> str | None:
    """Source of ``def <name>(config) -> int``: the width ``module_class.__init__`` computes in a local
    variable before building ``self.<linear_attr> = nn.Linear(<variable>, ...)`` (LFM2's feed-forward:
    ``int(2 * intermediate_size / 3)``, a multiplier, rounded up to ``block_multiple_of``), written
    from its statements (assignments to that variable and ``if`` blocks of them, over ``config`` and
    ``int`` / ``round`` / ``min`` / ``max`` only); checked to give ``width`` on ``config``. None when
    the width is computed any other way."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(module_class.__init__)))
    except (OSError, TypeError, SyntaxError):
        return None
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.FunctionDef) else []
    variable = None
    for node in body:
        if (
            isinstance(node, ast.Assign)
            and [_self_attribute(t) for t in node.targets] == [linear_attr]
            and isinstance(node.value, ast.Call)
            and node.value.args
            and isinstance(node.value.args[0], ast.Name)
        ):
            variable = node.value.args[0].id
            end = body.index(node)
            break
    if variable is None:
        return None
    allowed = {"config", variable, "int", "round", "min", "max"}

    def only_assigns(statement: ast.stmt) -> bool:
        if isinstance(statement, ast.Assign):
            return [getattr(t, "id", None) for t in statement.targets] == [variable]
        if isinstance(statement, ast.If):
            return all(only_assigns(s) for s in (*statement.body, *statement.orelse))
        return False

    kept = [node for node in body[:end] if only_assigns(node)]
    if not kept or any(
        isinstance(n, ast.Name) and n.id not in allowed for node in kept for n in ast.walk(node)
    ):
        return None
    lines = [f"def {name}(config: {type(config).__name__}) -> int:"]
    lines += [f'    """The width {module_class.__name__} computes from the config (as transformers does)."""']
    lines += [textwrap.indent(ast.unparse(node), "    ") for node in kept]
    lines.append(f"    return {variable}")
    source = "\n".join(lines) + "\n"
    scope: dict = {}
    try:
        exec(
            compile(source, "<width>", "exec"),
            {"__builtins__": {"int": int, "round": round, "min": min, "max": max}},
            scope,
        )  # noqa: S102
        return source if scope[name](config) == width else None
    except Exception:  # noqa: BLE001 - a formula that does not run on this config is not the width
        return None
