"""One decoder layer of a graph as a hierarchical Graphviz diagram (DOT), optionally with profiled times.

The graph comes from a model (exported as the runtime exports it, on a model cut to ``layer + 1``
layers with uninitialised weights: only shapes matter) or from a graph dump file written under
``ONBOARDLM_DUMP_GRAPHS_DIR`` (the graph after its transform). Each node of the layer is a box with
its name, its op and its output shape (FX ``meta["val"]``; from a dump file, the shape annotations when
the code has them); nodes nest in one cluster per module (``model.layers.N`` > ``self_attn`` ...), from
FX ``meta["nn_module_stack"]`` (from a dump file: each node goes with the module of the weights it
reads, else of its inputs). Weights read by a node are listed in its box; values from outside the
layer (the residual stream, RoPE tables, caches) are dashed ellipses. With a ``torch.profiler`` chrome
trace, each node also lists the kernels its op launched and their total time (:mod:`onboardlm.debug.profile`).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.fx import GraphModule, Node

from onboardlm.errors import OnboardlmError
from onboardlm.transforms.dump import split_dump

#: Nodes that only check metadata or read sizes: left out of diagrams.
_NOISE = re.compile(r"(_assert_tensor_metadata|sym_size|_guards_fn|_assert_scalar|sym_constrain)")
_DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16", torch.int64: "i64",
           torch.int32: "i32", torch.bool: "b8", torch.float64: "f64"}  # fmt: skip


class VizError(OnboardlmError):
    """An input ``viz`` cannot draw: no such layer, an unreadable dump file."""


@dataclass
class VizNode:
    """One node of the diagram."""

    name: str
    op: str  # "aten.mm.default", "auto_deploy.torch_rmsnorm.default", "fused_add_rmsnorm", ...
    shape: str
    inputs: list[str]
    module: str  # the innermost module path, "" when unknown
    weights: list[str] = field(default_factory=list)
    profile_name: str | None = None  # the op's name in a profiler trace ("aten::mm")
    kernels: list[tuple[str, float, int]] = field(default_factory=list)  # (name, total us, calls)


@dataclass
class LayerGraph:
    """The nodes of one decoder layer (graph order), their outside inputs and the layer's module path."""

    layer: str
    nodes: list[VizNode]
    outside: dict[str, str]  # outside node name -> its shape
    module_types: dict[str, str] = field(default_factory=dict)
    source: str = ""


# --------------------------------------------------------------------------------------------------
# nodes from a GraphModule
# --------------------------------------------------------------------------------------------------
def _shape(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        dims = ", ".join(str(d) for d in value.shape)
        return f"{_DTYPES.get(value.dtype, str(value.dtype).removeprefix('torch.'))}[{dims}]"
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(_shape(v) for v in value) + ")"
    if value is None:
        return ""
    return type(value).__name__ if not isinstance(value, (int, float)) else str(value)


def _op_name(node: Node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    name = getattr(target, "__name__", str(target))
    module = getattr(target, "__module__", "") or ""
    return name if module in ("", "_operator", "operator") else f"{module.rsplit('.', 1)[-1]}.{name}"


def profile_name(op: str) -> str | None:
    """The name a profiler gives the op ``op`` (``aten.mm.default`` -> ``aten::mm``), None for Python code."""
    parts = op.split(".")
    if len(parts) >= 2 and parts[0] in ("aten", "auto_deploy", "prims"):
        return f"{parts[0]}::{parts[1]}"
    return None


def nodes_of_graph(gm: GraphModule) -> tuple[list[VizNode], dict[str, str]]:
    """Every call node of ``gm`` as a :class:`VizNode` (weights folded into their readers), and the
    module class of each module path seen."""
    attrs = {node.name: str(node.target) for node in gm.graph.nodes if node.op == "get_attr"}
    types: dict[str, str] = {}
    nodes = []
    noise: set[str] = set()
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module", "placeholder"):
            continue
        if node.op != "placeholder" and _NOISE.search(str(node.target)):
            noise.add(node.name)
            continue
        stack = node.meta.get("nn_module_stack") or {}
        module = ""
        for path, cls in stack.values():
            path = _clean_path(path)
            types.setdefault(path, str(getattr(cls, "__name__", cls)).rsplit(".", 1)[-1])
            module = path
        inputs = [n.name for n in node.all_input_nodes if n.name not in attrs and n.name not in noise]
        weights = [attrs[n.name] for n in node.all_input_nodes if n.name in attrs]
        op = "input" if node.op == "placeholder" else _op_name(node)
        nodes.append(
            VizNode(node.name, op, _shape(node.meta.get("val")), inputs, module, weights, profile_name(op))
        )
    return nodes, types


def _clean_path(path: str) -> str:
    """``L['self'].model.layers[0].mlp`` -> ``model.layers.0.mlp`` (export's stack paths)."""
    path = re.sub(r"^L\['self'\]\.?", "", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    return re.sub(r"\[['\"]([^'\"]+)['\"]\]", r".\1", path).strip(".")


# --------------------------------------------------------------------------------------------------
# nodes from a dump file
# --------------------------------------------------------------------------------------------------
_ASSIGN = re.compile(r'^    (\w+)(?:: "([^"]*)")? = (.*?)(?:;  .*)?$')
_GETATTR = re.compile(r"^(?:self\.|getattr\(self\.)([\w.]+?)(?:, \"(\w+)\"\))?((?:\.\w+)*)$")
_CALL = re.compile(r"^([\w.]+)\((.*)\)$", re.DOTALL)
_ITEM = re.compile(r"^\w+\[\d+\]$")


def _attr_path(rhs: str) -> str | None:
    """``getattr(self.model.layers, "0").mlp.up_proj.weight`` -> ``model.layers.0.mlp.up_proj.weight``."""
    match = _GETATTR.match(rhs)
    if match is None:
        return None
    head, index, tail = match.groups()
    return ".".join(part for part in (head, index, tail.strip(".")) if part)


def nodes_of_dump(text: str, subject: str = "dump file") -> list[VizNode]:
    """The nodes of a dump file's graph (after its transform), weights folded into their readers; each
    node's module is the deepest module of the weights it reads, else taken from its inputs."""
    try:
        _, code = split_dump(text)
    except ValueError:
        code = text
    header = re.search(r"def forward\(self,?\s*(.*?)\):", code, re.DOTALL)
    if header is None:
        raise VizError(
            subject, "no graph code in it (no 'def forward(self, ...)')", "pass a graph dump .txt file"
        )
    nodes: list[VizNode] = []
    attrs: dict[str, str] = {}
    for name in re.findall(r"\w+", header.group(1)):
        nodes.append(VizNode(name, "input", "", [], ""))
    known = {node.name for node in nodes}
    for line in code.splitlines():
        match = _ASSIGN.match(line)
        if match is None:
            continue
        name, shape, rhs = match.groups()
        path = _attr_path(rhs)
        if path is not None:
            attrs[name] = path
            continue
        item = _ITEM.match(rhs)
        call = _CALL.match(rhs)
        if item is not None:
            op, arguments = "getitem", rhs
        elif call is not None and not _NOISE.search(call.group(1)):
            op, arguments = call.group(1).removeprefix("torch.ops."), call.group(2)
        else:
            continue
        words = re.findall(r"\b[A-Za-z_]\w*\b", arguments)
        inputs = [w for w in dict.fromkeys(words) if w in known]
        weights = [attrs[w] for w in dict.fromkeys(words) if w in attrs]
        nodes.append(VizNode(name, op, shape or "", inputs, "", weights, profile_name(op)))
        known.add(name)
    _modules_from_weights(nodes)
    return nodes


def _layer_root(path: str) -> str:
    """``model.layers.3.mlp.up_proj`` -> ``model.layers.3`` (up to the first index); else ``""``."""
    parts = path.split(".")
    index = next((i for i, part in enumerate(parts) if part.isdigit()), None)
    return ".".join(parts[: index + 1]) if index is not None else ""


def _modules_from_weights(nodes: list[VizNode]) -> None:
    """Module paths for a dump's nodes: a node reading weights is in their module (``...q_proj``); any
    other node in the common module of its latest layer's inputs, where a weight reader's output counts
    as its parent module's (it left the linear); an add that also reads a value of an earlier layer (the
    residual stream) is in its layer's root."""
    by_name = {node.name: node for node in nodes}
    for node in nodes:
        if node.weights:
            paths = [w.rsplit(".", 1)[0] for w in node.weights]
            node.module = max(paths, key=lambda p: p.count("."))
            continue
        candidates = []
        for name in node.inputs:
            source = by_name.get(name)
            if source is None or not source.module:
                continue
            module = source.module.rsplit(".", 1)[0] if source.weights else source.module
            candidates.append(module)
        if not candidates:
            continue
        latest = max(_layer_order(m)[0] for m in candidates)
        current = [m for m in candidates if _layer_order(m)[0] == latest]
        residual = "add" in node.op and any(_layer_order(m)[0] < latest for m in candidates)
        node.module = (_layer_root(current[0]) or current[0]) if residual else _common_prefix(current)


def _layer_order(path: str) -> tuple[int, int]:
    numbers = [int(n) for n in re.findall(r"\.(\d+)(?:\.|$)", path)]
    return (numbers[0] if numbers else -1, -path.count("."))


def _common_prefix(modules: list[str]) -> str:
    parts = [m.split(".") for m in modules]
    common = []
    for column in zip(*parts, strict=False):
        if len(set(column)) != 1:
            break
        common.append(column[0])
    return ".".join(common)


# --------------------------------------------------------------------------------------------------
# one layer
# --------------------------------------------------------------------------------------------------
def layer_prefix(modules: Iterable[str]) -> str | None:
    """The module path of the decoder layer list: the prefix ``P`` with the most ``P.<int>`` children."""
    counts: dict[str, set[int]] = {}
    for path in modules:
        parts = path.split(".")
        for i, part in enumerate(parts):
            if part.isdigit():
                counts.setdefault(".".join(parts[:i]), set()).add(int(part))
                break
    if not counts:
        return None
    return max(counts, key=lambda prefix: (len(counts[prefix]), -prefix.count(".")))


def select_layer(nodes: list[VizNode], layer: int, types: Mapping[str, str] | None = None) -> LayerGraph:
    """The nodes of decoder layer ``layer`` and the outside values they read."""
    prefix = layer_prefix(node.module for node in nodes if node.module)
    if prefix is None:
        raise VizError("graph", "no decoder layers found (no module path with a layer index)")
    root = f"{prefix}.{layer}" if prefix else str(layer)
    picked = [n for n in nodes if n.module == root or n.module.startswith(root + ".")]
    if not picked:
        count = len(
            {n.module.split(".")[len(prefix.split("."))] for n in nodes if n.module.startswith(prefix + ".")}
        )
        raise VizError(f"--layer {layer}", f"the graph has {count} decoder layers (0 .. {count - 1})")
    inside = {n.name for n in picked}
    by_name = {n.name: n for n in nodes}
    outside = {}
    for node in picked:
        for name in node.inputs:
            if name not in inside and name in by_name:
                outside[name] = by_name[name].shape
    return LayerGraph(root, picked, outside, dict(types or {}))


# --------------------------------------------------------------------------------------------------
# DOT
# --------------------------------------------------------------------------------------------------
def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _format_us(us: float) -> str:
    return f"{us / 1000:.2f} ms" if us >= 1000 else f"{us:.1f} us"


def _label(node: VizNode, root: str) -> str:
    lines = [node.name, node.op]
    if node.shape:
        lines.append(node.shape)
    lines += [f"w: {w.removeprefix(root + '.')}" for w in node.weights]
    for name, total, calls in node.kernels[:4]:
        short = name if len(name) <= 48 else name[:45] + "..."
        lines.append(f"k: {short} {_format_us(total)} x{calls}")
    if len(node.kernels) > 4:
        lines.append(f"k: ... {len(node.kernels) - 4} more")
    return "\n".join(lines)


def to_dot(graph: LayerGraph, title: str = "") -> str:
    """The diagram as DOT text: one cluster per module, nested as the modules are."""
    tree: dict[str, list[VizNode]] = {}
    for node in graph.nodes:
        tree.setdefault(node.module, []).append(node)
    modules = sorted(tree, key=lambda m: (m.count("."), m))
    all_modules = set()
    for module in modules:
        parts = module.split(".")
        for i in range(len(graph.layer.split(".")), len(parts) + 1):
            all_modules.add(".".join(parts[:i]))
    lines = [
        f"digraph {_quote('layer ' + graph.layer)} {{",
        f"  label={_quote(title or graph.layer)};",
        "  labelloc=t; rankdir=TB; compound=true;",
        '  node [shape=box, fontname="monospace", fontsize=9, style=rounded];',
        '  edge [fontname="monospace", fontsize=8];',
    ]

    order = {node.name: i for i, node in enumerate(graph.nodes)}

    def first_seen(module: str) -> int:
        return min(
            order[n.name] for n in graph.nodes if n.module == module or n.module.startswith(module + ".")
        )

    def emit(module: str, indent: str) -> None:
        kind = graph.module_types.get(module)
        label = f"{module} ({kind})" if kind else module
        lines.append(f"{indent}subgraph {_quote('cluster_' + module)} {{")
        lines.append(f"{indent}  label={_quote(label)}; style=rounded; color=gray50;")
        for node in tree.get(module, []):
            lines.append(f"{indent}  {_quote(node.name)} [label={_quote(_label(node, graph.layer))}];")
        children = sorted(
            (m for m in all_modules if m.rsplit(".", 1)[0] == module and m != module), key=first_seen
        )
        for child in children:
            emit(child, indent + "  ")
        lines.append(f"{indent}}}")

    emit(graph.layer, "  ")
    for name, shape in graph.outside.items():
        label = f"{name}\n{shape}" if shape else name
        lines.append(f"  {_quote(name)} [label={_quote(label)}, shape=ellipse, style=dashed];")
    for node in graph.nodes:
        for source in node.inputs:
            lines.append(f"  {_quote(source)} -> {_quote(node.name)};")
    lines.append("}")
    return "\n".join(lines) + "\n"


OUTPUT_SUFFIXES = (".dot", ".gv", ".svg", ".png", ".pdf")


def check_output(out: Path) -> None:
    """Refuse an output path ``render`` cannot write, before any work."""
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise VizError(str(out), f"unknown output format {out.suffix!r}", "use .dot, .svg, .png or .pdf")
    if not out.parent.is_dir():
        raise VizError(str(out), "its folder does not exist", "create it or pick another --output")


def render(dot_text: str, out: Path) -> tuple[list[Path], str | None]:
    """Write ``out`` (DOT when it ends in .dot/.gv, else DOT beside it and the picture through Graphviz's
    ``dot`` for .svg/.png/.pdf). Returns the files written and a note when the picture was not drawn."""
    check_output(out)
    suffix = out.suffix.lower()
    if suffix in (".dot", ".gv"):
        out.write_text(dot_text, encoding="utf-8")
        return [out], None
    dot_file = out.with_suffix(".dot")
    dot_file.write_text(dot_text, encoding="utf-8")
    executable = shutil.which("dot")
    if executable is None:
        return [dot_file], f"graphviz 'dot' is not installed: wrote {dot_file} only (apt install graphviz)"
    done = subprocess.run([executable, f"-T{suffix[1:]}", str(dot_file), "-o", str(out)], capture_output=True)
    if done.returncode != 0:
        problem = done.stderr.decode(errors="replace").strip().splitlines()
        return [dot_file], f"graphviz failed: {problem[-1] if problem else done.returncode}"
    return [dot_file, out], None


# --------------------------------------------------------------------------------------------------
# a model's graph
# --------------------------------------------------------------------------------------------------
def model_graph(model: str | None, layer: int, cached: bool = False) -> tuple[GraphModule, str]:
    """The exported graph of ``model`` (as ``onboardlm run`` names it) cut to ``layer + 1`` layers with
    uninitialised weights; with ``cached``, after the runtime's KV-cache transform."""
    from onboardlm.debug.transform_bisect import export_lean
    from onboardlm.models.factory import AutoModelForCausalLMFactory
    from onboardlm.runtime.runner import model_location
    from onboardlm.transforms import insert_cached_attention, insert_logit_gather

    factory = AutoModelForCausalLMFactory(model_location(model), {"num_hidden_layers": layer + 1})
    total = getattr(factory.source.config, "num_hidden_layers", None)
    if isinstance(total, int) and layer >= total:
        raise VizError(f"--layer {layer}", f"the model has {total} decoder layers (0 .. {total - 1})")
    cls, is_custom = factory.model_class()
    lean = factory.build_model("cpu", torch.float32, init_weights=False)
    with torch.no_grad():
        for tensor in lean.state_dict().values():  # no uninitialised NaNs reach export's checks
            if tensor.is_floating_point():
                tensor.zero_()
    try:
        gm = export_lean(lean)
    except Exception as err:  # a transformers class (no lean model) need not export
        first = (str(err).strip().splitlines() or [""])[0]
        raise VizError(
            model or "the default model",
            f"{type(lean).__name__} cannot be exported: {type(err).__name__}: {first}",
            "onboard it first, or pass --custom-model-dir with its lean model file",
        ) from None
    if cached:
        graph = insert_cached_attention(gm)
        insert_logit_gather(graph.gm)
        gm = graph.gm
    kind = "lean" if is_custom else "transformers"
    return gm, f"{type(lean).__name__} ({kind}), layer {layer}" + (", cached graph" if cached else "")
