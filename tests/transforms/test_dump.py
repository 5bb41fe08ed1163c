"""ONBOARDLM_DUMP_GRAPHS_DIR: each transform of the runtime's graph build dumps its graph before/after."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from onboardlm.models.factory import AutoModelForCausalLMFactory
from onboardlm.runtime.cache import KVCache
from onboardlm.runtime.engine import CachedModel, build_cached_graph
from onboardlm.transforms import insert_cached_attention
from onboardlm.transforms.dump import ENV_VAR, split_dump

CONFIG = LlamaConfig(
    hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=50,
)  # fmt: skip
NAME = re.compile(r"^(\d{2,})_(\w+)\.txt$")


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLMFactory(CONFIG).build_model()


def _dumps(folder: Path) -> list[tuple[int, str, str, str]]:
    found = []
    for path in folder.iterdir():
        match = NAME.match(path.name)
        assert match, f"unexpected file {path.name}"
        before, after = split_dump(path.read_text())
        found.append((int(match.group(1)), match.group(2), before, after))
    return sorted(found)


def test_the_graph_build_dumps_every_transform_in_order(model, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "dumps"))
    graph = build_cached_graph(model)
    CachedModel(graph, KVCache.allocate(graph.caches, 2, 16, "cpu"))  # on the CPU: weight folding

    dumps = _dumps(tmp_path / "dumps")
    names = [name for _, name, _, _ in dumps]
    assert names == [
        "insert_cached_attention",
        "insert_logit_gather",
        "use_direct_kernels",
        "fold_weight_computations",
    ]
    numbers = [number for number, *_ in dumps]
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))  # one counter for the process
    code = {name: (before, after) for _, name, before, after in dumps}
    for name in ("insert_cached_attention", "insert_logit_gather", "use_direct_kernels"):
        before, after = code[name]
        assert before != after, f"{name} changes the graph, its dump must show it"
    before, after = code["insert_cached_attention"]
    assert "torch_attention" in before and "torch_attention" not in after
    assert "input_pos" in after and "input_pos" not in before
    # each dump starts from the graph the previous transform left
    assert code["insert_logit_gather"][0] == code["insert_cached_attention"][1]
    assert code["use_direct_kernels"][0] == code["insert_logit_gather"][1]


def test_nothing_is_written_without_the_variable(model, tmp_path, monkeypatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.chdir(tmp_path)
    build_cached_graph(model)
    assert list(tmp_path.iterdir()) == []


def test_the_wrapper_keeps_the_transform_s_name_and_doc() -> None:
    assert insert_cached_attention.__name__ == "insert_cached_attention"
    assert "cached attention" in (insert_cached_attention.__doc__ or "")


def test_each_torchrun_rank_dumps_into_its_own_folder(model, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    monkeypatch.setenv("RANK", "1")
    build_cached_graph(model)
    assert [p.name for p in tmp_path.iterdir()] == ["rank1"]
    assert [name for _, name, _, _ in _dumps(tmp_path / "rank1")][0] == "insert_cached_attention"


def test_serve_s_paged_build_and_the_fast_path_dump_their_steps(model, tmp_path, monkeypatch) -> None:
    from onboardlm.runtime.paged_model import build_paged_graph
    from onboardlm.transforms.compile import SpeedOptions, accelerate

    monkeypatch.setenv(ENV_VAR, str(tmp_path / "paged"))
    build_paged_graph(model)
    assert [name for _, name, _, _ in _dumps(tmp_path / "paged")] == [
        "insert_cached_attention",
        "to_paged_attention",
        "insert_logit_gather",
        "use_packed_logit_gather",
        "use_direct_kernels",
    ]
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "fast"))
    graph = build_cached_graph(model)
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "fast" / "accelerate"))
    cache = KVCache.allocate(graph.caches, 2, 16, "cpu")
    accelerate(graph.gm, cache.tensors, SpeedOptions(cuda_graphs=False))
    dumps = _dumps(tmp_path / "fast" / "accelerate")
    assert [name for _, name, _, _ in dumps] == [
        "use_fast_attention",
        "use_fast_mla",
        "use_grouped_moe",
        "fuse_fp8_linears",
        "fuse_shared_input_linears",
        "fold_weight_computations",
        "fuse_elementwise",
    ]
    changed = {name for _, name, before, after in dumps if before != after}
    assert {"use_fast_attention", "fuse_shared_input_linears"} <= changed  # SDPA attention, one q/k/v GEMM
    assert not {"use_fast_mla", "use_grouped_moe", "fuse_fp8_linears"} & changed  # no MLA, MoE or FP8 here
