"""On a CUDA GPU: the fast path (SDPA attention, fused kernels, CUDA-graph prefill and decode) is right.

A SmolLM2-135M-shaped Llama with random weights runs on the GPU. In bf16 its prefill and decode logits
are checked against transformers' fp32 model on the CPU; its greedy tokens are checked against
transformers' own ``generate`` (sdpa, same GPU) for 64 steps: exactly in fp32; in bf16 a divergence
(rounding compounds over the steps of a random model) is accepted only where our logits for the prefix
are as close to the fp32 ones as transformers' bf16 logits are.
Skipped without CUDA.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from onboardlm.export import causal_lm_dynamic_shapes, torch_export_to_gm
from onboardlm.models.factory import AutoModelForCausalLMFactory
from onboardlm.testing import assert_rmse_close, transfer_weights
from onboardlm.transforms import INPUT_POS, KV_LEN, LOGIT_INDEX, insert_cached_attention, insert_logit_gather
from onboardlm.transforms.backends import use_direct_kernels
from onboardlm.transforms.compile import FastGraph, SpeedOptions, accelerate

pytestmark = pytest.mark.gpu

SMALL = LlamaConfig(
    hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0, max_position_embeddings=2048,
    rms_norm_eps=1e-5,
)  # fmt: skip
MAX_BATCH, MAX_SEQ, STEPS, PROMPT = 4, 128, 64, 16


def _reference(layer_std: float) -> torch.nn.Module:
    """transformers' model in fp32 on the CPU: unit-scale (tied) embeddings, ``layer_std`` elsewhere."""
    config = copy.deepcopy(SMALL)  # transformers writes its attention choice into the config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa").eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
            else:
                std = 1.0 if "embed_tokens" in name else layer_std
                param.copy_(std * torch.randn(param.shape, generator=generator))
    return model


@pytest.fixture(scope="module")
def calm() -> torch.nn.Module:
    """Small layer weights: bf16 stays close to fp32 (greedy decoding would repeat itself)."""
    return _reference(0.02)


@pytest.fixture(scope="module")
def lively() -> torch.nn.Module:
    """Larger layer weights: varied greedy tokens."""
    return _reference(0.05)


def allocate_cache(specs: list, max_batch: int, max_seq: int, device: str) -> dict[str, torch.Tensor]:
    """Zeroed KV caches, as the runtime's ``KVCache`` (whose package needs the CLI's dependencies)."""
    return {s.name: torch.zeros(max_batch, max_seq, *s.features, dtype=s.dtype, device=device) for s in specs}


def _fast_graph(reference: torch.nn.Module, dtype: torch.dtype, batch_sizes: tuple[int, ...]) -> FastGraph:
    lean = AutoModelForCausalLMFactory(SMALL).build_model(init_weights=False)
    transfer_weights(reference, lean)
    lean = lean.to("cuda", dtype)
    ids = torch.zeros(2, 8, dtype=torch.long, device="cuda")
    positions = torch.arange(8, device="cuda").expand(2, 8)
    gm = torch_export_to_gm(
        lean, kwargs={"input_ids": ids, "position_ids": positions}, dynamic_shapes=causal_lm_dynamic_shapes()
    )
    cached = insert_cached_attention(gm)
    insert_logit_gather(cached.gm)
    use_direct_kernels(cached.gm)
    cache = allocate_cache(cached.caches, MAX_BATCH, MAX_SEQ, "cuda")
    fast = accelerate(cached.gm, cache, SpeedOptions(batch_sizes=batch_sizes))
    assert fast.report.captured == list(batch_sizes) and not fast.report.skipped
    return fast


def _step(fast: FastGraph, ids: torch.Tensor, start: torch.Tensor, last: torch.Tensor, kv_len: int):
    """Run ``ids`` ``[b, s]`` at per-sequence offsets ``start``; fp32 logits at column ``last`` of a row."""
    positions = start[:, None] + torch.arange(ids.shape[1], device="cuda")
    inputs = {INPUT_POS: start, KV_LEN: kv_len, LOGIT_INDEX: last}
    return fast(input_ids=ids, position_ids=positions, **inputs, **fast.cache)[:, -1].float()


def _cpu_logits(reference: torch.nn.Module, rows: list[list[int]]) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack([reference(torch.tensor([row])).logits[0, -1] for row in rows])


def test_bf16_prefill_and_padded_decode_logits_match_the_cpu_fp32_reference(calm) -> None:
    fast = _fast_graph(calm, torch.bfloat16, (1, 2, 4))
    lengths = [20, 13, 7]
    rows = [torch.randint(0, SMALL.vocab_size, (n,)).tolist() for n in lengths]
    width = max(lengths)
    ids = torch.tensor([row + [0] * (width - len(row)) for row in rows], device="cuda")
    length = torch.tensor(lengths, device="cuda")
    logits = _step(fast, ids, torch.zeros(3, dtype=torch.long, device="cuda"), length - 1, width)
    assert_rmse_close(logits.cpu(), _cpu_logits(calm, rows), 0.02, "prefill")
    for step in range(6):  # batch 3 replays the graph captured for 4
        tokens = torch.randint(0, SMALL.vocab_size, (3,))
        rows = [row + [int(t)] for row, t in zip(rows, tokens, strict=True)]
        logits = _step(fast, tokens[:, None].cuda(), length, length * 0, width + step + 1)
        length = length + 1
        assert_rmse_close(logits.cpu(), _cpu_logits(calm, rows), 0.02, f"decode step {step}")


def test_prefills_replay_from_captured_buckets_and_equal_the_direct_run(calm) -> None:
    """Batch 3 of widths 20 and then 25 both replay the (4, 32) bucket; stale inputs do not leak."""
    fast = _fast_graph(calm, torch.bfloat16, (1, 2, 4))
    zero = torch.zeros(3, dtype=torch.long, device="cuda")
    for width in (20, 25):
        ids = torch.randint(0, SMALL.vocab_size, (3, width), device="cuda")
        last = torch.tensor([width - 1, width - 5, 3], device="cuda")
        replayed = _step(fast, ids, zero, last, width)
        positions = torch.arange(width, device="cuda").expand(3, width)
        direct = fast.gm(
            input_ids=ids, position_ids=positions, **{INPUT_POS: zero, KV_LEN: width, LOGIT_INDEX: last},
            **fast.cache,
        )[:, -1].float()  # fmt: skip
        assert_rmse_close(replayed, direct, 1e-3, f"captured prefill, width {width}")
    assert fast.report.prefill_captured == ["4x32"] and not fast.report.prefill_skipped


def _greedy(fast: FastGraph, prompt: torch.Tensor) -> list[int]:
    start = torch.zeros(1, dtype=torch.long, device="cuda")
    token = _step(fast, prompt, start, start + PROMPT - 1, PROMPT).argmax(-1)
    tokens = [token]
    for i in range(STEPS - 1):
        token = _step(fast, token[:, None], start + PROMPT + i, start, PROMPT + i + 1).argmax(-1)
        tokens.append(token)
    return torch.cat(tokens).tolist()


def _transformers_greedy(reference: torch.nn.Module, dtype: torch.dtype, prompt: torch.Tensor):
    """transformers' greedy tokens and the logits of each step, on the GPU."""
    hf = copy.deepcopy(reference).to("cuda", dtype)
    with torch.no_grad():
        out = hf.generate(
            prompt, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False,
            output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
    return out.sequences[0, PROMPT:].tolist(), [logits[0].float() for logits in out.logits]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_greedy_tokens_match_transformers_generate_for_64_steps(lively, dtype: torch.dtype) -> None:
    fast = _fast_graph(lively, dtype, (1,))
    prompt = torch.randint(0, SMALL.vocab_size, (1, PROMPT), device="cuda")
    theirs, logits = _transformers_greedy(lively, dtype, prompt)
    ours = _greedy(fast, prompt)
    assert len(set(theirs)) > 16, "degenerate reference: greedy decoding repeats itself"
    first = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b), None)
    if first is None:
        return
    assert dtype == torch.bfloat16, f"fp32 tokens diverge at step {first}: {ours[first:]} vs {theirs[first:]}"
    # bf16: accepted where our logits for that prefix are as close to fp32 as transformers' bf16 ones
    prefix = prompt[0].tolist() + theirs[:first]
    exact = _cpu_logits(lively, [prefix])[0]
    ids = torch.tensor([prefix], device="cuda")
    zero = torch.zeros(1, dtype=torch.long, device="cuda")
    ours_logits = _step(fast, ids, zero, zero + len(prefix) - 1, len(prefix))[0].cpu()
    ours_error, hf_error = (
        float((x - exact).pow(2).mean().sqrt()) for x in (ours_logits, logits[first].cpu())
    )
    margin = abs(float(exact[theirs[first]] - exact[ours[first]]))
    print(
        f"bf16 greedy tokens diverge at step {first}: fp32 margin {margin:.3f}; "
        f"logit error vs fp32: ours {ours_error:.3f}, transformers {hf_error:.3f}"
    )
    assert ours_error <= 1.5 * hf_error, f"step {first}: ours {ours[first]}, transformers {theirs[first]}"
