"""On a CUDA GPU: the serving engine's fast path (Triton paged attention, fused kernels, CUDA-graph decode
steps padded to decode batch sizes) computes what the reference paged graph computes.

- fp32 (attention on the reference op, everything else on the fast path, decode steps replayed from CUDA
  graphs): every request of a continuous-batching run gets exactly the reference engine's greedy tokens.
- bf16 (the Triton paged kernel inside the CUDA graphs): the logits of mixed prefill/decode steps and of
  padded decode steps are those of the reference paged graph up to bf16 rounding.
Skipped without CUDA.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from onboardlm.models.factory import AutoModelForCausalLMFactory
from onboardlm.registry.settings import RunSettings
from onboardlm.runtime.paged_cache import PagedKVCache, blocks_for
from onboardlm.runtime.paged_model import PagedModel, build_paged_graph, default_speed
from onboardlm.runtime.requests import GenerationRequest, RequestSampling
from onboardlm.runtime.scheduler import Chunk, Sequence
from onboardlm.runtime.serve_setup import ServeOptions, engine_for_model
from onboardlm.testing.checkpoints import word_tokenizer

pytestmark = pytest.mark.gpu

CONFIG = LlamaConfig(
    hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2,
    vocab_size=300, max_position_embeddings=512,
)  # fmt: skip
VOCAB = {"<unk>": 0, "<s>": 1, **{f"w{i}": i for i in range(2, 300)}}
MAX_BATCH, MAX_SEQ, BLOCK = 8, 160, 16


def _model(dtype: torch.dtype, std: float) -> torch.nn.Module:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.manual_seed(0)
    model = AutoModelForCausalLMFactory(CONFIG).build_model()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, std)
    return model.to("cuda", dtype)


def _tokens(engine, requests: list[tuple[list[int], int]]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}

    def collect(event) -> None:
        out.setdefault(event.request_id, []).extend(event.token_ids)

    for i, (prompt, max_tokens) in enumerate(requests):
        engine.submit(GenerationRequest(f"r{i}", prompt, RequestSampling(max_tokens=max_tokens)), collect)
        if i % 3 == 2:
            engine.run_once()  # later requests join a running batch
    for _ in range(2000):
        engine.run_once()
        if not engine.num_unfinished:
            break
    assert engine.scheduler.allocator.num_used == 0
    return out


def test_fast_path_gives_the_reference_greedy_tokens_fp32() -> None:
    model = _model(torch.float32, 0.3)
    settings = RunSettings(device="cuda", dtype="float32", max_batch_size=MAX_BATCH, max_seq_len=MAX_SEQ)
    gen = torch.Generator().manual_seed(1)
    requests = [
        (torch.randint(2, 300, (int(n),), generator=gen).tolist(), int(m))
        for n, m in zip(torch.randint(3, 100, (13,), generator=gen), torch.randint(1, 40, (13,), generator=gen), strict=True)
    ]  # fmt: skip
    answers = {}
    for fast in (False, True):
        options = ServeOptions(block_size=BLOCK, kv_cache_tokens=MAX_BATCH * MAX_SEQ, max_step_tokens=64, fast_path=fast)  # fmt: skip
        engine = engine_for_model(model, word_tokenizer(VOCAB), [], settings, options)
        if fast:
            assert engine.model.captured, "decode steps must be captured in CUDA graphs"
        answers[fast] = _tokens(engine, requests)
    assert answers[True] == answers[False]


def _paged(model: torch.nn.Module, fast: bool) -> PagedModel:
    graph = build_paged_graph(model)
    speed = default_speed(torch.device("cuda")) if fast else None
    blocks = MAX_BATCH * blocks_for(MAX_SEQ, BLOCK) + (1 if fast else 0)
    cache = PagedKVCache.allocate(graph.caches, blocks, BLOCK, "cuda")
    return PagedModel(graph, cache, max_batch=MAX_BATCH, max_seq_len=MAX_SEQ, speed=speed)


def test_paged_kernel_in_cuda_graphs_matches_the_reference_bf16() -> None:
    model = _model(torch.bfloat16, 0.05)
    reference, fast = _paged(model, False), _paged(model, True)
    assert fast.captured
    gen = torch.Generator().manual_seed(2)
    lengths = [40, 7, 1, 75, 130]  # prompt lengths; the 130-token prompt takes two chunks
    per_seq = blocks_for(MAX_SEQ, BLOCK)
    seqs = {
        name: [
            Sequence(GenerationRequest(f"s{i}", torch.randint(2, 300, (n,), generator=torch.Generator().manual_seed(i)).tolist(),
                                       RequestSampling(max_tokens=20)), list(range(i * per_seq, (i + 1) * per_seq)))
            for i, n in enumerate(lengths)
        ]
        for name in ("reference", "fast")
    }  # fmt: skip
    models = {"reference": reference, "fast": fast}

    def step(plan: list[tuple[int, int]]) -> None:  # (sequence, tokens) per chunk
        logits = {}
        for name, model_ in models.items():
            chunks = [Chunk(seqs[name][i], seqs[name][i].num_cached, n) for i, n in plan]
            logits[name] = model_.step(chunks)
            for chunk in chunks:
                chunk.seq.num_cached += chunk.length
        want, got = logits["reference"], logits["fast"]
        error = (got - want).pow(2).mean().sqrt() / want.pow(2).mean().sqrt()
        assert error < 0.03, f"step {plan}: RMSE ratio {error:.3e}"
        for i, _ in plan:  # the next token: the same for both (teacher forced)
            token = int(torch.randint(2, 300, (1,), generator=gen))
            for name in models:
                seq = seqs[name][i]
                if seq.num_cached == len(seq.tokens):
                    seq.tokens.append(token)

    decodes = [(0, 1), (1, 1), (2, 1)]
    step([(0, 40), (1, 7), (2, 1)])  # prompts
    for _ in range(3):
        step(decodes)  # decode steps of 3 rows, padded to 4, from a CUDA graph
    step([*decodes, (3, 75), (4, 64)])  # decodes beside prompt chunks (eager)
    step([*decodes, (3, 1), (4, 66)])
    for _ in range(8):
        step([*decodes, (3, 1), (4, 1)])  # 5 rows, padded to 8
