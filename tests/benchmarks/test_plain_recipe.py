"""The GPU benchmark's plain-PyTorch recipe (``benchmarks/plain_recipe.py``) against transformers' Llama."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from onboardlm.testing import assert_rmse_close

PROMPT, STEPS = 6, 5


def load_recipe() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "plain_recipe.py"
    spec = importlib.util.spec_from_file_location("plain_recipe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


recipe = load_recipe()


def tiny_llama(tied: bool, **extra: object) -> tuple[LlamaConfig, LlamaForCausalLM]:
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, max_position_embeddings=64, initializer_range=0.2,
        tie_word_embeddings=tied, **extra,
    )  # fmt: skip
    torch.manual_seed(0)
    return config, LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("per_row_pos", [False, True], ids=["pos_s", "pos_bs"])
def test_prefill_and_decode_logits_match_transformers(tied: bool, per_row_pos: bool) -> None:
    config, hf = tiny_llama(tied, rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    model = recipe.RecipeLlama.from_hf(hf, config).setup_caches(max_batch=3, max_seq=PROMPT + STEPS)
    ids = torch.randint(0, config.vocab_size, (2, PROMPT + STEPS))
    with torch.no_grad():
        expected = hf(ids).logits  # the full sequence at once, no cache
        for end in range(PROMPT, PROMPT + STEPS + 1):
            start = 0 if end == PROMPT else end - 1
            pos = torch.arange(start, end)
            got = model(ids[:, start:end], pos.expand(2, -1) if per_row_pos else pos)
            assert got.dtype == torch.float32
            assert_rmse_close(got, expected[:, end - 1], 1e-5, f"logits at position {end - 1}")
            torch.testing.assert_close(got, expected[:, end - 1], atol=1e-4, rtol=1e-4)


def test_weights_are_shared_not_copied() -> None:
    config, hf = tiny_llama(tied=True)
    model = recipe.RecipeLlama.from_hf(hf, config)
    pairs = [(model.layers[1].mlp.up_proj, hf.model.layers[1].mlp.up_proj), (model.lm_head, hf.lm_head)]
    pairs.append((model.embed_tokens, hf.model.embed_tokens))
    for ours, theirs in pairs:  # the same storage: no copy of the weights
        assert ours.weight.data_ptr() == theirs.weight.data_ptr()
    assert model.lm_head.weight.data_ptr() == model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("batch", [1, 2])
def test_measure_decode_greedy_tokens_match_generate(batch: int) -> None:
    config, hf = tiny_llama(tied=False)
    new_tokens = 8
    result = recipe.measure_decode(hf, config, batch, PROMPT, new_tokens, "cpu", compile=False)
    gen = torch.Generator("cpu").manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (batch, PROMPT), generator=gen)
    expected = hf.generate(
        ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0
    )
    assert result["tokens"] == expected[0, PROMPT:].tolist()
    assert result["tok_s"] > 0 and result["decode_ms"] > 0 and result["compile_s"] >= 0
    assert result["decode_iqr_ms"] >= 0
    assert result["peak_gib"] is None


def test_rope_scaling_is_refused() -> None:
    config, hf = tiny_llama(False, rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0})
    with pytest.raises(NotImplementedError, match="linear"):
        recipe.RecipeLlama.from_hf(hf, config).setup_caches(1, 8)


@pytest.mark.gpu
def test_compiled_cuda_graph_decode_matches_transformers_on_cuda() -> None:
    config, hf = tiny_llama(tied=True)
    hf = hf.cuda()
    result = recipe.measure_decode(hf, config, 2, PROMPT, 8, "cuda", compile=True)
    gen = torch.Generator("cuda").manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (2, PROMPT), device="cuda", generator=gen)
    expected = hf.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    assert result["tokens"] == expected[0, PROMPT:].tolist()
    assert result["peak_gib"] > 0
