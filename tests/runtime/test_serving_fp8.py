"""``serve`` under ``quantize: fp8``: the paged engine's graph runs FP8 linears, and each request gets the
greedy tokens of ``onboardlm run``'s cached graph quantised the same way (CPU, reference and fast-path
rewrites)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from onboardlm.models.factory import AutoModelForCausalLMFactory
from onboardlm.ops._library import op_targets
from onboardlm.registry.settings import RunSettings
from onboardlm.runtime.cache import KVCache
from onboardlm.runtime.engine import CachedModel, build_cached_graph
from onboardlm.runtime.requests import GenerationRequest, RequestEvent, RequestSampling
from onboardlm.runtime.serve_setup import ServeOptions, engine_for_model
from onboardlm.testing.checkpoints import word_tokenizer
from onboardlm.transforms.quantize_fp8 import quantize_fp8_linears

CONFIG = LlamaConfig(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=50,
)  # fmt: skip
VOCAB = {"<unk>": 0, "<s>": 1, **{f"w{i}": i for i in range(2, 50)}}


@pytest.mark.parametrize("fast_path", [False, True], ids=["reference", "fast_path"])
def test_fp8_serving_gives_the_fp8_run_graph_tokens(fast_path: bool) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLMFactory(CONFIG).build_model()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.5)  # peaked logits: no greedy ties
    settings = RunSettings(max_batch_size=4, max_seq_len=32, max_new_tokens=6, quantize="fp8")
    options = ServeOptions(block_size=4, kv_cache_tokens=64, max_step_tokens=8, fast_path=fast_path)
    engine = engine_for_model(model, word_tokenizer(VOCAB), [], settings, options)
    fp8_ops = set(op_targets("torch_fake_quant_fp8_linear")) | set(op_targets("torch_quant_fp8_linear"))
    assert sum(1 for n in engine.model.graph.gm.graph.nodes if n.target in fp8_ops) > 0
    assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.float32  # the model itself is untouched

    graph = build_cached_graph(model, quantize_fp8_linears)
    dense = CachedModel(graph, KVCache.allocate(graph.caches, 1, 32, "cpu"))
    events: dict[str, list[RequestEvent]] = {}
    prompts = [[3, 9, 14, 2, 7], [11, 4, 40], [5, 6, 7, 8, 9, 10, 11]]
    for i, prompt in enumerate(prompts):
        request = GenerationRequest(str(i), prompt, RequestSampling(max_tokens=6))
        engine.submit(request, lambda e: events.setdefault(e.request_id, []).append(e))
        engine.run_once()
    for _ in range(100):
        if not engine.num_unfinished:
            break
        engine.run_once()
    for i, prompt in enumerate(prompts):
        got = [t for e in events[str(i)] for t in e.token_ids]
        assert got == dense.generate([prompt], max_new_tokens=6)[0].new_ids, f"request {i}"
