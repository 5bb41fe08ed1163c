"""Hybrid models (Mamba2, Gated DeltaNet, attention + both) run with cached state, as ``run`` and ``serve`` do.

Tiny random fp32 models on the canonical ops (``_hybrid_models``, written like a generated lean file):
- every decode step of a batch of prompts of different lengths equals the eager model run on that
  sequence alone from scratch (RMSE ratio < 1e-4): right padding never reaches a sequence's state;
- batched greedy decoding equals each prompt decoded alone and the cache-free reference decoder;
- the serving engine (continuous batching, chunked prefill, requests joining mid-run, padded decode
  steps on the spare state slot) gives each request the static runner's greedy tokens, and every
  state slot is free again at the end; admission waits for a free state slot.
"""

from __future__ import annotations

import pytest
import torch

from onboardlm.registry.settings import RunSettings
from onboardlm.runtime.cache import KVCache
from onboardlm.runtime.engine import CachedModel, build_cached_graph
from onboardlm.runtime.generate import greedy_generate
from onboardlm.runtime.paged_cache import BlockAllocator, StateSlots
from onboardlm.runtime.requests import FinishReason, GenerationRequest, RequestEvent, RequestSampling
from onboardlm.runtime.scheduler import Scheduler, SchedulerLimits
from onboardlm.runtime.serve_setup import ServeOptions, engine_for_model
from onboardlm.testing import assert_rmse_close
from onboardlm.testing.checkpoints import word_tokenizer
from onboardlm.testing.hybrid_models import LAYOUTS, random_model
from onboardlm.transforms.compile import SpeedOptions

TOL = 1e-4
PROMPT_LENGTHS = (9, 3, 6)
DECODE_STEPS = 5
VOCAB = {"<unk>": 0, "<s>": 1, **{f"w{i}": i for i in range(2, 50)}}
REQUESTS = [(3, 6), (11, 3), (2, 5), (17, 4), (6, 6)]  # (prompt length, max_tokens)


@pytest.fixture(scope="module", params=list(LAYOUTS))
def model(request):
    return random_model(request.param)


@pytest.fixture(scope="module")
def graph(model):
    """The dense cached graph, exported once per model (the reference path only folds weights in it)."""
    return build_cached_graph(model)


def _full_logits(model, sequence: list[int]) -> torch.Tensor:
    with torch.no_grad():
        ids = torch.tensor([sequence])
        return model(input_ids=ids, position_ids=torch.arange(len(sequence))[None]).logits[0, -1].float()


def _prompts(lengths, seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 50, (n,), generator=gen).tolist() for n in lengths]


@pytest.mark.parametrize("speed", [None, SpeedOptions(cuda_graphs=False)], ids=["reference", "fast_rewrites"])
def test_every_decode_step_matches_a_full_recompute(model, graph, speed) -> None:
    if speed is not None:  # the fast rewrites change the graph: a graph of its own
        graph = build_cached_graph(model)
    assert graph.has_state
    cached = CachedModel(graph, KVCache.allocate(graph.caches, 4, 32, "cpu"), speed=speed)
    prompts = _prompts(PROMPT_LENGTHS)
    sequences = [list(p) for p in prompts]
    logits = cached.prefill(prompts, DECODE_STEPS)
    gen = torch.Generator().manual_seed(2)
    for step in range(DECODE_STEPS + 1):
        for row, sequence in enumerate(sequences):
            assert_rmse_close(logits[row], _full_logits(model, sequence), TOL, msg=f"step {step} seq {row}")
        tokens = torch.randint(0, 50, (len(sequences),), generator=gen)  # any continuation
        for sequence, token in zip(sequences, tokens.tolist(), strict=True):
            sequence.append(token)
        logits = cached.decode(tokens)


def test_batched_greedy_equals_each_prompt_alone_and_the_cache_free_decoder(model, graph) -> None:
    prompts = _prompts(PROMPT_LENGTHS)
    cache = KVCache.allocate(graph.caches, 4, 32, "cpu")
    batched = CachedModel(graph, cache).generate(prompts, max_new_tokens=6)
    for prompt, result in zip(prompts, batched, strict=True):
        alone = CachedModel(graph, cache).generate([prompt], max_new_tokens=6)[0]  # same cache, reused
        assert result.new_ids == alone.new_ids == greedy_generate(model, prompt, max_new_tokens=6).new_ids


class Collector:
    def __init__(self) -> None:
        self.events: dict[str, list[RequestEvent]] = {}

    def __call__(self, event: RequestEvent) -> None:
        self.events.setdefault(event.request_id, []).append(event)

    def tokens(self, rid: str) -> list[int]:
        return [t for e in self.events[rid] for t in e.token_ids]


@pytest.mark.parametrize("fast_path", [False, True], ids=["reference", "fast_path"])
def test_serve_gives_every_request_the_static_runners_greedy_tokens(model, graph, fast_path) -> None:
    settings = RunSettings(max_batch_size=3, max_seq_len=32, max_new_tokens=8)
    options = ServeOptions(block_size=4, kv_cache_tokens=96, max_step_tokens=8, fast_path=fast_path)
    engine = engine_for_model(model, word_tokenizer(VOCAB), [], settings, options)
    slots = engine.scheduler.state_slots
    assert slots is not None and slots.num_slots == 3
    if fast_path:  # padded decode rows start from zero in the spare slot, which no request gets
        assert engine.model._buckets and engine.model.spare_slot == 3
        assert engine.model.cache.num_state_slots == 4
    out = Collector()
    prompts = _prompts([n for n, _ in REQUESTS], seed=3)
    for i, (prompt, (_, max_tokens)) in enumerate(zip(prompts, REQUESTS, strict=True)):
        engine.submit(GenerationRequest(str(i), prompt, RequestSampling(max_tokens=max_tokens)), out)
        engine.run_once()  # each request joins a running batch; the long ones prefill in chunks
        assert len(engine.scheduler.running) <= 3
    for _ in range(200):
        engine.run_once()
        if not engine.num_unfinished:
            break
    static = CachedModel(graph, KVCache.allocate(graph.caches, 1, 32, "cpu"))
    for i, (prompt, (_, max_tokens)) in enumerate(zip(prompts, REQUESTS, strict=True)):
        assert out.tokens(str(i)) == static.generate([prompt], max_new_tokens=max_tokens)[0].new_ids, i
        assert out.events[str(i)][-1].finish is FinishReason.LENGTH
    assert slots.num_free == slots.num_slots


def test_admission_waits_for_a_free_state_slot() -> None:
    scheduler = Scheduler(BlockAllocator(64, 4), SchedulerLimits(4, 64, 8), StateSlots(2))
    for i in range(3):
        scheduler.add(GenerationRequest(str(i), [2, 3, 4], RequestSampling(max_tokens=2)))
    scheduler.schedule()
    assert list(scheduler.running) == ["0", "1"] and len(scheduler.waiting) == 1
    assert sorted(seq.state_slot for seq in scheduler.running.values()) == [0, 1]
    freed = scheduler.running["0"].state_slot
    scheduler.finish(scheduler.running["0"])
    scheduler.schedule()
    assert scheduler.running["2"].state_slot == freed and scheduler.state_slots.num_free == 0


#: Shipped generated hybrid files (model_type, config overrides, has attention layers): Mamba2 only;
#: Mamba2 + attention; Mamba1 + attention with MoE placed by its own layer rule (Jamba, both placements);
#: short convolution + attention with a functional-activation MLP of a computed width (LFM2).
#: LFM2-MoE: the MoE placed by num_dense_layers beside conv / attention kinds. Kimi Linear: Kimi Delta
#: Attention (torch_channel_gated_delta_rule) beside MLA without RoPE.
#: GraniteMoeHybrid, LFM3: residual steps with a multiplier, parallel blocks, sandwich norms.
#: Falcon-H1: Mamba2 and attention in parallel from one norm, µP multipliers (a per-segment in_proj scale).
SHIPPED = [
    ("mamba2", {}, False),
    ("bamba", {"attn_layer_indices": [1, 5]}, True),
    ("jamba", {}, True),
    ("jamba", {"expert_layer_offset": 0, "attn_layer_offset": 0, "attn_layer_period": 2}, True),
    ("lfm2", {"num_hidden_layers": 3, "layer_types": ["conv", "full_attention", "conv"]}, True),
    (
        "nemotron_h",
        {},
        True,
    ),  # Mamba2, MoE (non-gated experts), attention and MLP layers behind one attribute
    (
        "lfm2_moe",
        {"num_hidden_layers": 3, "layer_types": ["conv", "full_attention", "conv"], "num_dense_layers": 1},
        True,
    ),
    # Kimi Delta Attention (per-channel decay) beside NoPE MLA attention, dense and MoE layers
    ("kimi_linear", {}, True),
    # general residual steps: Mamba2 then a MoE beside a shared MLP, both scaled by the residual multiplier
    ("granitemoehybrid", {"residual_multiplier": 1.3}, False),
    # sandwich norms around short convolution / full and sliding-window attention with a head gate
    ("lfm3", {}, True),
    # Mamba2 beside attention in one step, µP multipliers everywhere (in_proj segments, key, MLP, logits)
    (
        "falcon_h1",
        {
            "mamba_rms_norm": True,
            "ssm_multipliers": [0.7, 1.3, 0.55, 1.45, 0.8],
            "mlp_multipliers": [0.75, 1.25],
            "key_multiplier": 1.2,
            "attention_in_multiplier": 0.8,
            "attention_out_multiplier": 1.1,
            "ssm_in_multiplier": 0.9,
            "ssm_out_multiplier": 1.3,
        },
        True,
    ),
    # Griffin's RG-LRU recurrent blocks beside sliding-window MQA with partial RoPE (window 8 < the sequences)
    ("recurrent_gemma", {}, True),
]


@pytest.mark.parametrize(
    ("model_type", "overrides", "attention"), SHIPPED, ids=[f"{t}-{i}" for i, (t, _, _) in enumerate(SHIPPED)]
)
def test_shipped_generated_hybrid_files_decode_like_a_full_recompute(
    model_type: str, overrides: dict, attention: bool
) -> None:
    import importlib.util

    from transformers import AutoConfig

    from onboardlm.models.factory import AutoModelForCausalLMFactory
    from onboardlm.testing.tiny_config import tiny_config

    if importlib.util.find_spec(f"onboardlm.models.custom.modeling_{model_type}") is None:
        pytest.skip(f"no generated modeling_{model_type}.py in this tree")
    torch.manual_seed(0)
    model = AutoModelForCausalLMFactory(
        tiny_config(AutoConfig.for_model(model_type, **overrides))
    ).build_model()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.3)
    model.eval()
    graph = build_cached_graph(model)
    assert graph.has_state and any(spec.per_token for spec in graph.caches) == attention
    vocab = model.config.vocab_size
    prompts = _prompts((7, 2, 5))
    sequences = [list(p) for p in prompts]
    cached = CachedModel(graph, KVCache.allocate(graph.caches, 3, 24, "cpu"))
    logits = cached.prefill(prompts, 3)
    for step in range(4):
        for row, sequence in enumerate(sequences):
            assert_rmse_close(logits[row], _full_logits(model, sequence), TOL, msg=f"step {step} seq {row}")
        tokens = torch.randint(0, vocab, (len(sequences),))
        for sequence, token in zip(sequences, tokens.tolist(), strict=True):
            sequence.append(token)
        logits = cached.decode(tokens)
