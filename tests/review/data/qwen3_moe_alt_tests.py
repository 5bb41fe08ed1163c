"""Equivalence tests of the Qwen3-MoE review fixture against transformers: block, layer, model, export.

Named so that pytest does not collect it with the suite; the review tests read it, and run it once.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch.export import Dim
from transformers import Qwen3MoeConfig
from transformers.models.qwen3_moe import modeling_qwen3_moe as hf

from onboardlm.export import torch_export_to_gm
from onboardlm.testing import assert_rmse_close, transfer_weights


def _load_lean() -> ModuleType:
    path = Path(__file__).with_name("modeling_qwen3_moe_alt.py")
    spec = importlib.util.spec_from_file_location("review_fixture_modeling_qwen3_moe_alt", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


lean = _load_lean()


@pytest.fixture
def config() -> Qwen3MoeConfig:
    return Qwen3MoeConfig(
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[0],
        vocab_size=1000,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )


def randomize(module: torch.nn.Module) -> torch.nn.Module:
    for parameter in module.parameters():
        torch.nn.init.normal_(parameter, std=0.1)
    return module.eval()


def positions(batch: int, seq: int) -> torch.Tensor:
    return torch.arange(seq)[None].expand(batch, seq)


def causal_mask(seq: int) -> torch.Tensor:
    return torch.full((seq, seq), torch.finfo(torch.float32).min).triu(1)[None, None]


def test_norm(config: Qwen3MoeConfig) -> None:
    reference = randomize(hf.Qwen3MoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps))
    model = lean.Qwen3MoeScaleNorm(config.hidden_size, config.rms_norm_eps)
    transfer_weights(reference, model)
    x = torch.randn(2, 5, config.hidden_size)
    torch.testing.assert_close(model(x), reference(x), rtol=1e-3, atol=1e-3)


def test_dense_mlp(config: Qwen3MoeConfig) -> None:
    reference = randomize(hf.Qwen3MoeMLP(config, intermediate_size=config.intermediate_size))
    model = lean.Qwen3MoeFeedForward(config, config.intermediate_size)
    transfer_weights(reference, model)
    x = torch.randn(2, 5, config.hidden_size)
    torch.testing.assert_close(model(x), reference(x), rtol=1e-3, atol=1e-3)


def test_attention(config: Qwen3MoeConfig) -> None:
    reference, model = randomize(hf.Qwen3MoeAttention(config, 0)), lean.Qwen3MoeTokenMixer(config).eval()
    transfer_weights(reference, model)
    x = torch.randn(2, 7, config.hidden_size)
    rope = hf.Qwen3MoeRotaryEmbedding(config)(x, positions(2, 7))
    expected, _ = reference(x, position_embeddings=rope, attention_mask=causal_mask(7))
    assert_rmse_close(model(x, rope), expected, rmse_ratio_tol=0.10)


def test_moe_block_from_packed_experts(config: Qwen3MoeConfig) -> None:
    reference, model = randomize(hf.Qwen3MoeSparseMoeBlock(config)), lean.Qwen3MoeRoutedBlock(config).eval()
    transfer_weights(reference, model)
    x = torch.randn(2, 7, config.hidden_size)
    assert_rmse_close(model(x), reference(x), 0.02)


@pytest.mark.parametrize("index", [0, 1], ids=["dense", "moe"])
def test_decoder_layer(config: Qwen3MoeConfig, index: int) -> None:
    reference = randomize(hf.Qwen3MoeDecoderLayer(config, index))
    model = lean.Qwen3MoeBlock(config, index).eval()
    transfer_weights(reference, model)
    x = torch.randn(2, 7, config.hidden_size)
    rope = hf.Qwen3MoeRotaryEmbedding(config)(x, positions(2, 7))
    expected = reference(x, attention_mask=causal_mask(7), position_embeddings=rope)
    assert_rmse_close(model(x, rope), expected, rmse_ratio_tol=0.05)


def test_full_model_logits(config: Qwen3MoeConfig) -> None:
    model = lean.Qwen3MoeForCausalLM(config).eval()  # first: transformers marks the config's experts backend
    reference = hf.Qwen3MoeForCausalLM(config).eval()
    transfer_weights(reference, model)
    input_ids = torch.randint(0, config.vocab_size, (2, 9))
    with torch.no_grad():
        expected = reference(input_ids=input_ids, position_ids=positions(2, 9)).logits
        actual = model(input_ids=input_ids, position_ids=positions(2, 9)).logits
    assert_rmse_close(actual, expected, rmse_ratio_tol=0.05)


def test_export_runs_two_shapes(config: Qwen3MoeConfig) -> None:
    model = lean.Qwen3MoeForCausalLM(config).eval()
    batch, seq = Dim("batch", min=1, max=16), Dim("seq", min=1, max=64)
    shapes = {"input_ids": {0: batch, 1: seq}, "position_ids": {0: batch, 1: seq}}
    ids = torch.randint(0, config.vocab_size, (2, 6))
    gm = torch_export_to_gm(
        model, kwargs={"input_ids": ids, "position_ids": positions(2, 6)}, dynamic_shapes=shapes
    )
    with torch.no_grad():
        for b, s in ((2, 6), (3, 11)):
            ids = torch.randint(0, config.vocab_size, (b, s))
            expected = model(input_ids=ids, position_ids=positions(b, s)).logits
            torch.testing.assert_close(gm(input_ids=ids, position_ids=positions(b, s)).logits, expected)
