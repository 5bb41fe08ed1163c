"""Absorbed MLA decode equals the reference cached MLA (which expands the latent cache every step)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoConfig

from onboardlm.models.factory import AutoModelForCausalLMFactory
from onboardlm.runtime.engine import build_cached_graph
from onboardlm.testing import tiny_config
from onboardlm.testing.cached import prefill_then_decode, zero_caches
from onboardlm.transforms import cached_ops
from onboardlm.transforms.fast_mla import fast_cached_mla, use_fast_mla

HEADS, NOPE, ROPE, V, RANK = 4, 16, 8, 12, 24


def _call(dtype: torch.dtype, s_q: int, layout: str) -> dict:
    generator = torch.Generator().manual_seed(s_q)
    b, max_b, max_s = 3, 4, 20

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)

    q_shape = (b, s_q, HEADS) if layout == "bsnd" else (b, HEADS, s_q)
    return {
        "q_nope": rand(*q_shape, NOPE),
        "q_pe": rand(*q_shape, ROPE),
        "compressed_kv": rand(b, s_q, RANK),
        "kpe": rand(b, s_q, 1, ROPE) if layout == "bsnd" else rand(b, 1, s_q, ROPE),
        "kv_b_proj_weight": rand(HEADS * (NOPE + V), RANK) * 0.2,
        "ckv_cache": rand(max_b, max_s, RANK),  # stale values everywhere: only the valid prefix counts
        "kpe_cache": rand(max_b, max_s, 1, ROPE),
        "input_pos": torch.tensor([13, 0, 7]) if s_q == 1 else torch.tensor([0, 0, 0]),
        "kv_len": 14 if s_q == 1 else s_q,
        "layout": layout,
    }


@pytest.mark.parametrize("layout", ["bsnd", "bnsd"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_decode_step_equals_the_reference(dtype: torch.dtype, layout: str) -> None:
    args = _call(dtype, 1, layout)
    exact = {
        k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in args.items()
    }
    expected = cached_ops.cached_mla._init_fn(**exact)
    got_args = copy.deepcopy(args)
    got = fast_cached_mla(**got_args)
    assert got.shape == expected.shape and got.dtype == dtype
    error = (got.double() - expected).pow(2).mean().sqrt() / expected.pow(2).mean().sqrt()
    # the reference itself takes its softmax in fp32, whatever the dtype
    assert error < {torch.float64: 1e-6, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype], error
    for cache in ("ckv_cache", "kpe_cache"):  # the step's latent and RoPE key are stored like the reference
        torch.testing.assert_close(got_args[cache].double(), exact[cache], rtol=0, atol=0)


def test_prompts_go_to_the_reference() -> None:
    args = _call(torch.float32, 5, "bsnd")
    expected = cached_ops.cached_mla._init_fn(**copy.deepcopy(args))
    torch.testing.assert_close(fast_cached_mla(**args), expected, rtol=0, atol=0)


def test_deepseek_v3_graph_decodes_the_same() -> None:
    config = tiny_config(AutoConfig.for_model("deepseek_v3"))
    torch.manual_seed(0)
    graph = build_cached_graph(AutoModelForCausalLMFactory(config).build_model())
    fast = copy.deepcopy(graph.gm)
    assert use_fast_mla(fast) == config.num_hidden_layers
    batch, prompt, steps = 2, 6, 3
    ids = torch.randint(0, config.vocab_size, (batch, prompt + steps))

    def run(gm) -> torch.Tensor:
        return prefill_then_decode(gm, zero_caches(graph, batch, prompt + steps), ids, prompt)

    torch.testing.assert_close(run(fast), run(graph.gm), rtol=1e-5, atol=1e-5)


def test_decode_step_with_an_index_mask_equals_the_reference() -> None:
    """Sparse MLA: the keys a lightning indexer selected narrow the absorbed decode step as the reference."""
    args = _call(torch.float64, 1, "bsnd")
    generator = torch.Generator().manual_seed(7)
    args["index_mask"] = torch.rand(3, 1, 1, 14, generator=generator) < 0.5
    args["index_mask"][:, ..., 0] = True  # every query keeps a key
    expected = cached_ops.cached_mla._init_fn(**copy.deepcopy(args))
    dense = cached_ops.cached_mla._init_fn(**{**copy.deepcopy(args), "index_mask": None})
    torch.testing.assert_close(fast_cached_mla(**args), expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(expected, dense)


def test_deepseek_v32_graph_decodes_the_same() -> None:
    """The cached lightning indexer feeds the absorbed decode: same tokens as the reference graph, over
    more tokens than the indexer keeps."""
    config = tiny_config(AutoConfig.for_model("deepseek_v32"))
    torch.manual_seed(0)
    graph = build_cached_graph(AutoModelForCausalLMFactory(config).build_model())
    fast = copy.deepcopy(graph.gm)
    assert use_fast_mla(fast) == config.num_hidden_layers
    batch, prompt, steps = 2, 10, 4
    assert prompt > config.index_topk
    ids = torch.randint(0, config.vocab_size, (batch, prompt + steps))

    def run(gm) -> torch.Tensor:
        return prefill_then_decode(gm, zero_caches(graph, batch, prompt + steps), ids, prompt)

    torch.testing.assert_close(run(fast), run(graph.gm), rtol=1e-5, atol=1e-5)
