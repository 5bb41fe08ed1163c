"""``onboardlm viz``: the DOT of a tiny Llama layer has the expected clusters, nodes and edges.

The DOT is parsed with a small parser (clusters by brace nesting, node labels, edges), so the test
checks the structure, not the text layout.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from typer.testing import CliRunner

from onboardlm.cli import app
from onboardlm.debug.profile import attach_profile
from onboardlm.debug.viz import VizNode, model_graph
from onboardlm.runtime.engine import build_cached_graph
from onboardlm.testing.checkpoints import save_tiny_llama, word_tokenizer
from onboardlm.transforms.dump import ENV_VAR

runner = CliRunner()


@dataclass
class Dot:
    labels: dict[str, list[str]] = field(default_factory=dict)  # node -> label lines
    cluster_of: dict[str, list[str]] = field(
        default_factory=dict
    )  # node -> enclosing clusters, outermost first
    edges: set[tuple[str, str]] = field(default_factory=set)
    clusters: dict[str, list[str]] = field(default_factory=dict)  # cluster -> its parents
    dashed: set[str] = field(default_factory=set)

    def node(self, op: str, weight: str | None = None) -> str:
        """The one node whose op line is ``op`` (and that reads ``weight``)."""
        found = [n for n, lines in self.labels.items() if len(lines) > 1 and lines[1] == op
                 and (weight is None or f"w: {weight}" in lines)]  # fmt: skip
        assert len(found) == 1, (op, weight, found)
        return found[0]

    def reaches(self, source: str, target: str) -> bool:
        frontier, seen = [source], set()
        while frontier:
            current = frontier.pop()
            if current == target:
                return True
            seen.add(current)
            frontier += [b for a, b in self.edges if a == current and b not in seen]
        return False


def parse_dot(text: str) -> Dot:
    dot, stack = Dot(), []
    for line in text.splitlines():
        line = line.strip()
        if m := re.match(r'subgraph "cluster_([^"]+)" \{', line):
            dot.clusters[m.group(1)] = list(stack)
            stack.append(m.group(1))
        elif line == "}":
            if stack:
                stack.pop()
        elif m := re.match(r'"([^"]+)" -> "([^"]+)";', line):
            dot.edges.add((m.group(1), m.group(2)))
        elif m := re.match(r'"([^"]+)" \[label="((?:[^"\\]|\\.)*)"(.*)\];', line):
            dot.labels[m.group(1)] = m.group(2).split("\\n")
            dot.cluster_of[m.group(1)] = list(stack)
            if "dashed" in m.group(3):
                dot.dashed.add(m.group(1))
    assert stack == [], "unbalanced braces"
    return dot


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer = word_tokenizer({"<unk>": 0, "<s>": 1, "</s>": 2, "hi": 3})
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), tokenizer)


def _viz(*args: str) -> str:
    result = runner.invoke(app, ["viz", *args])
    assert result.exit_code == 0, result.output
    return result.output


def test_the_dot_of_a_llama_layer_has_its_modules_nodes_and_edges(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "layer1.dot"
    printed = _viz(str(tiny), "--layer", "1", "-o", str(out))
    assert f"wrote {out}: model.layers.1" in printed
    dot = parse_dot(out.read_text())
    layer = "model.layers.1"
    assert {f"{layer}.{m}" for m in ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")} <= {
        c for c, parents in dot.clusters.items() if parents == [layer]
    }
    assert dot.clusters[f"{layer}.mlp.act_fn"] == [layer, f"{layer}.mlp"]
    q = dot.node("auto_deploy.torch_linear_simple.default", "self_attn.q_proj.weight")
    k = dot.node("auto_deploy.torch_linear_simple.default", "self_attn.k_proj.weight")
    o = dot.node("auto_deploy.torch_linear_simple.default", "self_attn.o_proj.weight")
    norm = dot.node("auto_deploy.torch_rmsnorm.default", "input_layernorm.weight")
    attention = dot.node("auto_deploy.torch_attention.default")
    silu = dot.node("aten.silu.default")
    assert (
        dot.cluster_of[q][-1] == f"{layer}.self_attn"
        and dot.cluster_of[attention][-1] == f"{layer}.self_attn"
    )
    assert dot.cluster_of[norm][-1] == f"{layer}.input_layernorm"
    assert dot.cluster_of[silu][-1] == f"{layer}.mlp.act_fn"
    assert (norm, q) in dot.edges and (norm, k) in dot.edges
    assert dot.reaches(q, attention) and dot.reaches(attention, o)
    assert re.fullmatch(r"f32\[\w+, \w+, 32\]", dot.labels[q][2]) and dot.labels[k][2].endswith(", 16]")
    # the residual stream from layer 0 and the RoPE tables come from outside the layer, dashed
    assert len(dot.dashed) == 3 and all(dot.cluster_of[n] == [] for n in dot.dashed)
    residual = next(n for n in dot.dashed if (n, norm) in dot.edges)
    assert dot.labels[residual][1].endswith(", 32]")


def test_a_graph_dump_file_is_drawn_with_modules_from_its_weights(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from onboardlm.models.factory import AutoModelForCausalLMFactory

    lean, _ = AutoModelForCausalLMFactory(str(tiny)).build_and_load()
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "dumps"))
    build_cached_graph(lean)
    dump = next((tmp_path / "dumps").glob("*_use_direct_kernels.txt"))
    out = tmp_path / "dump.dot"
    _viz(str(dump), "--layer", "0", "-o", str(out))
    dot = parse_dot(out.read_text())
    attention = dot.node("onboardlm_transforms_cached_ops_cached_attention")
    assert dot.cluster_of[attention][-1] == "model.layers.0.self_attn"
    q = next(n for n, lines in dot.labels.items() if "w: self_attn.q_proj.weight" in lines)
    assert dot.cluster_of[q][-1] == "model.layers.0.self_attn.q_proj"
    assert dot.labels[q][2] == "f32[s44, s70, 32]" or dot.labels[q][2].endswith(", 32]")
    assert dot.reaches(q, attention)
    assert {"k_cache_0", "v_cache_0", "input_pos"} <= dot.dashed


def test_a_cpu_profile_gives_each_node_its_op_time(tiny: Path, tmp_path: Path) -> None:
    gm, _ = model_graph(str(tiny), 1)
    ids, positions = torch.tensor([[3, 3, 3, 3]]), torch.arange(4)[None]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        gm(input_ids=ids, position_ids=positions)
    trace = tmp_path / "trace.json"
    prof.export_chrome_trace(str(trace))
    out = tmp_path / "profiled.dot"
    printed = _viz(str(tiny), "--layer", "1", "-o", str(out), "--profile", str(trace))
    assert "top-level trace ops matched to nodes" in printed
    dot = parse_dot(out.read_text())
    norm = dot.node("auto_deploy.torch_rmsnorm.default", "input_layernorm.weight")
    assert any(
        re.fullmatch(r"k: auto_deploy::torch_rmsnorm [\d.]+ (us|ms) x1", line) for line in dot.labels[norm]
    )


def test_gpu_kernels_are_attributed_to_the_op_that_launched_them(tmp_path: Path) -> None:
    events = [
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "tid": 1, "ts": 0, "dur": 10, "args": {"External id": 1}},
        {"ph": "X", "cat": "cpu_op", "name": "aten::addmm", "tid": 1, "ts": 1, "dur": 5, "args": {"External id": 2}},
        {"ph": "X", "cat": "cpu_op", "name": "aten::add", "tid": 1, "ts": 20, "dur": 4, "args": {"External id": 3}},
        {"ph": "X", "cat": "kernel", "name": "sm90_gemm", "tid": 7, "ts": 30, "dur": 12.5, "args": {"External id": 2}},
        {"ph": "X", "cat": "kernel", "name": "elementwise_add", "tid": 7, "ts": 50, "dur": 2, "args": {"External id": 3}},
    ]  # fmt: skip
    trace = tmp_path / "gpu.json"
    trace.write_text(json.dumps({"traceEvents": events}))
    nodes = [
        VizNode("mm", "aten.mm.default", "", [], "m", profile_name="aten::mm"),
        VizNode("add", "aten.add.Tensor", "", ["mm"], "m", profile_name="aten::add"),
    ]
    assert attach_profile(nodes, trace) == (2, 2)
    assert nodes[0].kernels == [("sm90_gemm", 12.5, 1)]  # launched by addmm, inside mm
    assert nodes[1].kernels == [("elementwise_add", 2.0, 1)]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--layer", "2"], "--layer 2: the model has 2 decoder layers (0 .. 1)"),
        (["--layer", "0", "--profile", "{tmp}/nope.json"], "{tmp}/nope.json: profile trace not found"),
    ],
)
def test_bad_viz_inputs_give_one_line(tiny: Path, tmp_path: Path, args: list[str], message: str) -> None:
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = runner.invoke(app, ["viz", str(tiny), *args, "-o", str(tmp_path / "x.dot")])
    assert result.exit_code == 2
    assert f"error: {message.replace('{tmp}', str(tmp_path))}" in " ".join(result.output.split())
    assert not (tmp_path / "x.dot").exists()


def test_a_picture_is_drawn_through_graphviz_or_a_note_says_why_not(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "layer0.svg"
    printed = " ".join(_viz(str(tiny), "--layer", "0", "-o", str(out)).split())
    assert (tmp_path / "layer0.dot").is_file()
    if shutil.which("dot") is None:
        assert "note: graphviz 'dot' is not installed" in printed and not out.exists()
    else:
        assert "<svg" in out.read_text() and "model.layers.0.self_attn" in out.read_text()
        assert "note:" not in printed


def test_the_cached_graph_shows_the_cache_inputs_of_the_cached_attention(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "cached.dot"
    _viz(str(tiny), "--layer", "0", "--cached", "-o", str(out))
    dot = parse_dot(out.read_text())
    attention = dot.node("auto_deploy.onboardlm_cached_attention.default")
    assert dot.cluster_of[attention][-1] == "model.layers.0.self_attn"
    assert {("k_cache_0", attention), ("v_cache_0", attention), ("input_pos", attention)} <= dot.edges
    assert {"k_cache_0", "v_cache_0", "input_pos", "kv_len"} <= dot.dashed
