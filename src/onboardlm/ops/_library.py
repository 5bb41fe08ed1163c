"""Registration of canonical ops in the ``auto_deploy`` namespace.

Every op module declares its ops with :func:`canonical_op`. When another stack (TensorRT-LLM
AutoDeploy) has already registered an op of the same name, the existing op is kept and ours is not
registered: model files then run on whichever implementation was imported first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch._library.custom_ops import OPDEFS

NAMESPACE = "auto_deploy"

#: Ops this package declares, name -> category (the declaring module), in declaration order.
DECLARED_OPS: dict[str, str] = {}

#: Declared ops that another stack had registered first; theirs is in use.
FOREIGN_OPS: set[str] = set()


def op_is_registered(name: str) -> bool:
    """Whether ``torch.ops.auto_deploy.<name>`` already exists (from us or another stack)."""
    return bool(torch._C._dispatch_has_kernel(f"{NAMESPACE}::{name}")) or _has_schema(name)


def _has_schema(name: str) -> bool:
    try:
        return torch._C._get_schema(f"{NAMESPACE}::{name}", "") is not None
    except RuntimeError:
        return False


class _ExistingOp:
    """Stand-in returned when an op was registered elsewhere: our fake kernel is not attached."""

    def __init__(self, name: str) -> None:
        self.name = name

    def register_fake(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        return fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(getattr(torch.ops, NAMESPACE), self.name)(*args, **kwargs)


def canonical_op(name: str) -> Callable[[Callable[..., Any]], Any]:
    """Register the decorated function as ``torch.ops.auto_deploy.<name>`` (no mutated args).

    The schema is inferred from the type hints, so list arguments must be typed ``list[...]``.
    Attach the fake (meta) kernel with ``@<op>.register_fake`` right after the definition.
    """

    def decorate(fn: Callable[..., Any]) -> Any:
        DECLARED_OPS.setdefault(name, fn.__module__.rpartition(".")[2])
        if op_is_registered(name):
            FOREIGN_OPS.add(name)
            return _ExistingOp(name)
        return torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=())(fn)

    return decorate


def get_op(name: str) -> torch._ops.OpOverloadPacket:
    """The registered op packet ``torch.ops.auto_deploy.<name>``."""
    return getattr(getattr(torch.ops, NAMESPACE), name)


def op_targets(name: str) -> tuple[object, ...]:
    """What the target of an FX node calling op ``name`` may be: the packet, its default overload and,
    for an op defined in Python, the op object and its implementation (what ``use_direct_kernels``
    calls instead)."""
    packet = get_op(name)
    definition = OPDEFS.get(f"{NAMESPACE}::{name}")
    return (packet, packet.default) + (() if definition is None else (definition, definition._init_fn))
