"""Kernels and their times per graph node, from a ``torch.profiler`` chrome trace.

A trace (``prof.export_chrome_trace(path)``) holds CPU op events (``cat: cpu_op``) and, on a GPU, the
kernels each launched (``cat: kernel``, linked to the launching op by its ``External id``). The graph's
nodes do not appear in it by name, so the top-level CPU ops (those not inside another op of the same
thread) are matched, in order, to the graph's op nodes of the same name (``aten::mm`` for
``aten.mm.default``), wrapping round for each forward the trace holds (a prefill and its decode steps); a
trace op with no node of its name among the next few is skipped. Each node then gets the kernels of its
ops, with their total time and count; a CPU-only trace gives each op itself as its "kernel".
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onboardlm.debug.viz import VizError, VizNode

#: How many graph op nodes ahead a trace op may match before it is taken for an op of no node.
LOOKAHEAD = 12
KERNEL_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


@dataclass(frozen=True)
class TraceOp:
    name: str
    tid: Any
    ts: float
    dur: float
    external_id: Any


def read_trace(path: Path) -> list[dict[str, Any]]:
    """The events of a chrome trace file, or a :class:`VizError` naming what is wrong with it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise VizError(str(path), "profile trace not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise VizError(str(path), f"not a chrome trace (JSON): {err}") from None
    events = data.get("traceEvents") if isinstance(data, dict) else data
    if not isinstance(events, list) or not any(
        isinstance(e, dict) and e.get("cat") == "cpu_op" for e in events
    ):
        raise VizError(
            str(path), "no CPU op events in it", "export it with torch.profiler's prof.export_chrome_trace"
        )
    return [e for e in events if isinstance(e, dict)]


def top_level_ops(events: list[dict[str, Any]]) -> tuple[list[TraceOp], dict[Any, TraceOp]]:
    """Top-level CPU ops in time order, and for every op's External id the top-level op holding it."""
    by_thread: dict[Any, list[TraceOp]] = defaultdict(list)
    for e in events:
        if e.get("cat") == "cpu_op" and e.get("ph") == "X":
            args = e.get("args") or {}
            op = TraceOp(
                str(e.get("name")),
                e.get("tid"),
                float(e["ts"]),
                float(e.get("dur", 0)),
                args.get("External id"),
            )
            by_thread[op.tid].append(op)
    tops: list[TraceOp] = []
    owner: dict[Any, TraceOp] = {}
    for ops in by_thread.values():
        ops.sort(key=lambda op: (op.ts, -op.dur))
        current: TraceOp | None = None
        for op in ops:
            if current is None or op.ts >= current.ts + current.dur:
                current = op
                tops.append(op)
            if op.external_id is not None:
                owner[op.external_id] = current
    tops.sort(key=lambda op: op.ts)
    return tops, owner


def kernels_by_op(
    events: list[dict[str, Any]], owner: dict[Any, TraceOp]
) -> dict[int, list[tuple[str, float]]]:
    """GPU kernels (name, duration in us) per top-level op (keyed by ``id(op)``)."""
    kernels: dict[int, list[tuple[str, float]]] = defaultdict(list)
    for e in events:
        if e.get("cat") in KERNEL_CATEGORIES:
            top = owner.get((e.get("args") or {}).get("External id"))
            if top is not None:
                kernels[id(top)].append((str(e.get("name")), float(e.get("dur", 0))))
    return kernels


def attach_profile(nodes: list[VizNode], trace: Path) -> tuple[int, int]:
    """Fill each node's ``kernels`` from ``trace``; returns (trace ops matched, top-level trace ops)."""
    events = read_trace(trace)
    tops, owner = top_level_ops(events)
    kernels = kernels_by_op(events, owner)
    has_gpu = bool(kernels)
    graph_ops = [node for node in nodes if node.profile_name]
    totals: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0.0, 0]))
    matched = 0
    position = 0
    for op in tops:
        if not graph_ops:
            break
        for step in range(min(LOOKAHEAD, len(graph_ops))):
            node = graph_ops[(position + step) % len(graph_ops)]
            if node.profile_name == op.name:
                launched = kernels.get(id(op), []) if has_gpu else [(op.name, op.dur)]
                for name, dur in launched:
                    entry = totals[node.name][name]
                    entry[0] += dur
                    entry[1] += 1
                position = (position + step + 1) % len(graph_ops)
                matched += 1
                break
    for node in nodes:
        if node.name in totals:
            node.kernels = sorted(
                ((name, total, int(calls)) for name, (total, calls) in totals[node.name].items()),
                key=lambda k: -k[1],
            )
    return matched, len(tops)
