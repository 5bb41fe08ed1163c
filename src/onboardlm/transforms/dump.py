"""``ONBOARDLM_DUMP_GRAPHS_DIR=DIR``: every graph transform writes the graph's code before and after it.

Each transform function carries :func:`dumps_graph`. With the variable unset a call costs one
environment lookup; with it set, a call writes ``DIR/NN_<transform>.txt`` (``NN`` counts the dumps
of this process, in call order; under torchrun in ``DIR/rank<R>/``): the readable Python code of
the graph before the transform, then after it. The graph is the first argument that is a GraphModule or carries one as ``.gm`` (a
``CachedGraph``); a transform that returns a new one is dumped from its result.
"""

from __future__ import annotations

import functools
import itertools
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from torch.fx import GraphModule

ENV_VAR = "ONBOARDLM_DUMP_GRAPHS_DIR"

F = TypeVar("F", bound=Callable[..., Any])

_counter = itertools.count(1)
_lock = threading.Lock()


def dumps_graph(transform: F) -> F:
    """Wrap ``transform`` so that, with :data:`ENV_VAR` set, its graph is dumped before and after."""
    name = transform.__name__

    @functools.wraps(transform)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        folder = os.environ.get(ENV_VAR)
        if not folder:
            return transform(*args, **kwargs)
        gm = _graph_module(*args, *kwargs.values())
        before = graph_code(gm) if gm is not None else None
        result = transform(*args, **kwargs)
        after_gm = _graph_module(result) or gm
        if before is not None and after_gm is not None:
            write_dump(Path(folder), name, before, graph_code(after_gm))
        return result

    return wrapper  # type: ignore[return-value]


def graph_code(gm: GraphModule) -> str:
    """The Python code of ``gm``'s graph as it is now (also when the transform did not recompile), each
    value annotated with its dtype and shape where the node has them (``x: "f32[s0, s1, 64]" = ...``;
    ``onboardlm viz`` reads them)."""
    code = gm.graph.python_code(root_module="self", verbose=True).src
    lines = [line for line in code.splitlines() if line.strip() and not line.lstrip().startswith("# File:")]
    return "\n".join(lines).strip() + "\n"


def write_dump(folder: Path, transform: str, before: str, after: str) -> Path:
    """Write one numbered dump file into ``folder`` (created if missing) and return its path."""
    with _lock:
        number = next(_counter)
    rank = os.environ.get("RANK")  # torchrun: one folder per rank, their graphs differ
    if rank is not None:
        folder = folder / f"rank{rank}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{number:02d}_{transform}.txt"
    verdict = "unchanged" if before == after else "changed"
    text = (
        f"# {transform} (dump {number} of pid {os.getpid()}): graph {verdict}\n"
        f"# ---- before ----\n{before}# ---- after ----\n{after}"
    )
    path.write_text(text, encoding="utf-8")
    return path


def split_dump(text: str) -> tuple[str, str]:
    """The (before, after) code of a dump file's text."""
    _, rest = text.split("# ---- before ----\n", 1)
    before, after = rest.split("# ---- after ----\n", 1)
    return before, after


def _graph_module(*values: Any) -> GraphModule | None:
    for value in values:
        if isinstance(value, GraphModule):
            return value
        inner = getattr(value, "gm", None)
        if isinstance(inner, GraphModule):
            return inner
    return None
