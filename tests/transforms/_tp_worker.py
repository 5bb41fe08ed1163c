"""One tensor-parallel rank for ``test_sharding.py``: ``python _tp_worker.py JOB.json RANK``.

For every case in the job it builds the lean model on the saved config, exports it, shards it with
``apply_sharding_hints``, fills it from the safetensors checkpoint with ``load_rank_weights`` (only
this rank's slices) and saves the logits and the number of nodes the pass changed; for cases marked
``generate`` it then adds the KV cache and saves greedy continuations, on the reference ops and
through the GPU path's rewrites (fast attention, fused linears, folded weights, fused elementwise ops). ``build_lean`` and
``greedy_tokens`` are also used by the test for the unsharded reference.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from onboardlm.export import causal_lm_dynamic_shapes, torch_export_to_gm
from onboardlm.runtime.cache import KVCache
from onboardlm.runtime.distributed import RankInfo, load_rank_weights, process_group
from onboardlm.runtime.engine import CachedModel
from onboardlm.transforms import CachedGraph, insert_cached_attention, insert_logit_gather
from onboardlm.transforms.backends import use_direct_kernels
from onboardlm.transforms.compile import SpeedOptions
from onboardlm.transforms.sharding import apply_sharding_hints

COMPAT = Path(__file__).resolve().parents[1] / "compat"
EXPORT_SHAPE = (2, 8)  # the graph runs on the test's own (different) shape: dynamic dims must survive
PROMPTS = [[3, 1, 4, 1, 5, 9], [2, 6, 5]]
NEW_TOKENS = 6


def _load_file(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"onboardlm_tests_tp_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextmanager
def lean_class(model: str) -> Iterator[type[nn.Module]]:
    """``"pkg.module:Class"``, ``"compat:<ad_style stem>:Class"`` (loaded through the AD import shim)
    or ``"file:<path>:Class"`` (a model file; a relative path is taken from this file's folder)."""
    if model.startswith("compat:"):
        _, stem, cls = model.split(":")
        shim = _load_file(COMPAT / "autodeploy_shim.py")
        with shim.autodeploy_imports(COMPAT):
            yield getattr(shim.load_model_file(stem), cls)
    elif model.startswith("file:"):
        _, path, cls = model.split(":")
        yield getattr(_load_file(Path(__file__).parent / path), cls)
    else:
        module, cls = model.split(":")
        yield getattr(importlib.import_module(module), cls)


def build_lean(model: str, config: PretrainedConfig) -> nn.Module:
    with lean_class(model) as cls:
        return cls(config).eval()


def _export(lean: nn.Module, vocab_size: int) -> torch.fx.GraphModule:
    ids = torch.randint(0, vocab_size, EXPORT_SHAPE)
    positions = torch.arange(EXPORT_SHAPE[1]).expand(EXPORT_SHAPE)
    return torch_export_to_gm(
        lean, kwargs={"input_ids": ids, "position_ids": positions}, dynamic_shapes=causal_lm_dynamic_shapes()
    )


def greedy_tokens(graph: CachedGraph, speed: SpeedOptions | None = None) -> list[list[int]]:
    """Greedy continuations of :data:`PROMPTS` with the KV cache (prefill, then decode steps); with
    ``speed``, through the GPU path's graph rewrites (run on the CPU)."""
    cache = KVCache.allocate(graph.caches, len(PROMPTS), 32, "cpu")
    generations = CachedModel(graph, cache, speed=speed).generate(PROMPTS, max_new_tokens=NEW_TOKENS)
    return [g.new_ids for g in generations]


def _cached(gm: torch.fx.GraphModule) -> CachedGraph:
    """The engine's passes after sharding: cached attention, last-token logits, direct kernels."""
    cached = insert_cached_attention(gm)
    insert_logit_gather(cached.gm)
    use_direct_kernels(cached.gm)
    return cached


def run_case(case: dict, info: RankInfo, input_ids: torch.Tensor, out_dir: Path) -> None:
    config = AutoConfig.from_pretrained(case["config_dir"])
    gm = _export(build_lean(case["model"], config), config.vocab_size)
    report = apply_sharding_hints(gm, info.rank, info.world_size, shard_layers=case["shard_layers"])
    load_rank_weights(gm, [Path(case["checkpoint"])], report.params)
    positions = torch.arange(input_ids.shape[1]).expand(input_ids.shape)
    with torch.no_grad():
        logits = gm(input_ids=input_ids, position_ids=positions).logits
    result = {"changed": dict(report.changed)}
    if case["generate"]:
        graph = _cached(gm)
        result["tokens"] = greedy_tokens(graph)
        result["tokens_fast_path"] = greedy_tokens(graph, SpeedOptions())  # rewrites the same graph
    stem = f"{case['name']}.rank{info.rank}"
    torch.save(logits, out_dir / f"{stem}.pt")
    (out_dir / f"{stem}.json").write_text(json.dumps(result))


def main(job_file: str, rank: str) -> None:
    torch.set_num_threads(1)
    job = json.loads(Path(job_file).read_text())
    info = RankInfo(int(rank), job["world_size"], int(rank))
    input_ids = torch.load(job["input_ids"], weights_only=True)
    with process_group(info, "cpu", init_method=job["init_method"]):
        for case in job["cases"]:
            torch.manual_seed(0)
            run_case(case, info, input_ids, Path(job["out_dir"]))


if __name__ == "__main__":
    main(*sys.argv[1:])
