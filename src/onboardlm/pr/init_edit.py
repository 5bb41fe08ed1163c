"""Add a model module's import (and its class to ``__all__``) to the custom models' ``__init__.py``.

``from .modeling_<type> import <Class>`` goes before the first ``from .modeling_*`` import that sorts
after it (else after the last import); the class goes into ``__all__`` the same way when the file has
one, in the quote and comma style of its neighbours. Everything else stays byte for byte (libcst).
"""

from __future__ import annotations

import libcst as cst
from libcst.helpers import get_full_name_for_node

from onboardlm.pr.layout import PrError


def add_model_import(text: str, module: str, class_name: str, subject: str) -> str:
    """``text`` (an ``__init__.py``) with ``from .<module> import <class_name>`` and the ``__all__`` entry."""
    try:
        tree = cst.parse_module(text)
    except cst.ParserSyntaxError as err:
        raise PrError(subject, f"does not parse: {err.message} (line {err.raw_line})") from None
    body = list(tree.body)
    _refuse_existing(body, module, class_name, subject)
    line = cst.parse_statement(f"from .{module} import {class_name}")
    body.insert(_import_position(body, module), line)
    body = [_with_all_entry(statement, class_name) for statement in body]
    return tree.with_changes(body=body).code


def _imports(statement: cst.CSTNode) -> list[cst.Import | cst.ImportFrom]:
    if isinstance(statement, cst.SimpleStatementLine):
        return [s for s in statement.body if isinstance(s, (cst.Import, cst.ImportFrom))]
    return []


def _relative_module(node: cst.Import | cst.ImportFrom) -> str | None:
    if isinstance(node, cst.ImportFrom) and len(node.relative) == 1 and node.module is not None:
        return get_full_name_for_node(node.module)
    return None


def _refuse_existing(body: list[cst.CSTNode], module: str, class_name: str, subject: str) -> None:
    for statement in body:
        for node in _imports(statement):
            if _relative_module(node) == module:
                raise PrError(subject, f"imports .{module} already")
            if isinstance(node.names, cst.ImportStar):
                continue
            for alias in node.names:
                bound = alias.asname.name if alias.asname is not None else alias.name
                if get_full_name_for_node(bound) == class_name:
                    raise PrError(subject, f"binds {class_name} already", "the class name is taken")


def _import_position(body: list[cst.CSTNode], module: str) -> int:
    last_import = -1
    for index, statement in enumerate(body):
        nodes = _imports(statement)
        if not nodes:
            continue
        last_import = index
        relative = _relative_module(nodes[0])
        if relative is not None and relative.startswith("modeling_") and relative > module:
            return index
    if last_import >= 0:
        return last_import + 1
    has_docstring = (
        bool(body) and isinstance(body[0], cst.SimpleStatementLine) and isinstance(body[0].body[0], cst.Expr)
    )
    return 1 if has_docstring else 0


def _with_all_entry(statement: cst.CSTNode, class_name: str) -> cst.CSTNode:
    if not isinstance(statement, cst.SimpleStatementLine) or len(statement.body) != 1:
        return statement
    assign = statement.body[0]
    if not (
        isinstance(assign, cst.Assign)
        and len(assign.targets) == 1
        and isinstance(assign.targets[0].target, cst.Name)
        and assign.targets[0].target.value == "__all__"
        and isinstance(assign.value, (cst.List, cst.Tuple))
    ):
        return statement
    elements = list(assign.value.elements)
    strings = [e.value for e in elements if isinstance(e.value, cst.SimpleString)]
    quote = strings[0].quote if strings else '"'
    value = cst.SimpleString(f"{quote}{class_name}{quote}")
    position = next(
        (
            i
            for i, e in enumerate(elements)
            if isinstance(e.value, cst.SimpleString) and e.value.evaluated_value > class_name
        ),
        len(elements),
    )
    comma = cst.Comma(whitespace_after=_separator(assign.value))
    if not elements:
        elements = [cst.Element(value)]
    elif position < len(elements):
        elements.insert(position, elements[position].with_changes(value=value, comma=comma))
    else:  # the old last element gets a separating comma, the new one its trailing comma (or none)
        last = elements[-1]
        elements[-1] = last.with_changes(comma=comma)
        elements.append(last.with_changes(value=value))
    return statement.with_changes(
        body=[assign.with_changes(value=assign.value.with_changes(elements=elements))]
    )


def _separator(container: cst.List | cst.Tuple) -> cst.BaseParenthesizableWhitespace:
    """The whitespace between two elements: as between the first two, else as before the first when
    it starts a new line, else one space."""
    elements = container.elements
    if len(elements) >= 2 and isinstance(elements[0].comma, cst.Comma):
        return elements[0].comma.whitespace_after
    if isinstance(container, cst.List):
        opening = container.lbracket.whitespace_after
    else:
        opening = container.lpar[0].whitespace_after if container.lpar else cst.SimpleWhitespace("")
    return opening if isinstance(opening, cst.ParenthesizedWhitespace) else cst.SimpleWhitespace(" ")
