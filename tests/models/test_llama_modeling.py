"""Golden lean Llama against transformers' LlamaForCausalLM: block, layer, full model, export."""

from __future__ import annotations

import pytest
import torch
from torch.export import Dim
from transformers import LlamaConfig
from transformers.models.llama import modeling_llama as hf

from onboardlm.export import torch_export_to_gm
from onboardlm.models.custom import modeling_llama as lean
from onboardlm.testing import assert_rmse_close, transfer_weights

CONFIG_VARIANTS = {
    "gqa": {},
    "mha_bias": {"num_key_value_heads": 4, "attention_bias": True, "mlp_bias": True},
    "mqa_llama3_rope": {
        "num_key_value_heads": 1,
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    },
    "tied_linear_rope": {
        "tie_word_embeddings": True,
        "rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    },
}


def make_config(variant: str) -> LlamaConfig:
    fields = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    fields.update(CONFIG_VARIANTS[variant])
    return LlamaConfig(**fields)


@pytest.fixture(params=sorted(CONFIG_VARIANTS))
def config(request: pytest.FixtureRequest) -> LlamaConfig:
    return make_config(request.param)


def positions(batch: int, seq: int) -> torch.Tensor:
    return torch.arange(seq)[None].expand(batch, seq)


def hf_rope(
    config: LlamaConfig, x: torch.Tensor, position_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return hf.LlamaRotaryEmbedding(config)(x, position_ids)


def causal_mask(seq: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.full((seq, seq), torch.finfo(dtype).min, dtype=dtype).triu(1)[None, None]


def test_mlp_is_identical_math(config: LlamaConfig) -> None:
    reference, model = hf.LlamaMLP(config).eval(), lean.LlamaMLP(config).eval()
    transfer_weights(reference, model)
    x = torch.randn(2, 7, config.hidden_size)
    torch.testing.assert_close(model(x), reference(x), rtol=1e-3, atol=1e-3)


def test_rmsnorm_is_identical_math(config: LlamaConfig) -> None:
    reference = hf.LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
    model = lean.LlamaRMSNorm(config.hidden_size, config.rms_norm_eps)
    reference.weight.data.normal_()
    transfer_weights(reference, model)
    x = torch.randn(2, 7, config.hidden_size)
    torch.testing.assert_close(model(x), reference(x), rtol=1e-3, atol=1e-3)


def test_rotary_tables_match(config: LlamaConfig) -> None:
    x, position_ids = torch.randn(2, 9, config.hidden_size), positions(2, 9) + 30
    expected = hf_rope(config, x, position_ids)
    actual = lean.LlamaRotaryEmbedding(config)(x, position_ids)
    for got, want in zip(actual, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_attention(config: LlamaConfig) -> None:
    reference, model = hf.LlamaAttention(config, layer_idx=0).eval(), lean.LlamaAttention(config, 0).eval()
    transfer_weights(reference, model)
    x, position_ids = torch.randn(2, 11, config.hidden_size), positions(2, 11)
    rope = hf_rope(config, x, position_ids)
    expected, _ = reference(x, position_embeddings=rope, attention_mask=causal_mask(11, x.dtype))
    assert_rmse_close(model(x, rope), expected, rmse_ratio_tol=0.10, msg="attention")


def test_decoder_layer(config: LlamaConfig) -> None:
    reference, model = (
        hf.LlamaDecoderLayer(config, layer_idx=0).eval(),
        lean.LlamaDecoderLayer(config, 0).eval(),
    )
    for norm in (reference.input_layernorm, reference.post_attention_layernorm):
        norm.weight.data.normal_(1.0, 0.1)
    transfer_weights(reference, model)
    x, position_ids = torch.randn(2, 11, config.hidden_size), positions(2, 11)
    rope = hf_rope(config, x, position_ids)
    expected = reference(x, attention_mask=causal_mask(11, x.dtype), position_embeddings=rope)
    assert_rmse_close(model(x, rope), expected, rmse_ratio_tol=0.05, msg="decoder layer")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_full_model_logits(config: LlamaConfig, dtype: torch.dtype) -> None:
    reference = hf.LlamaForCausalLM(config).eval().to(dtype)
    model = lean.LlamaForCausalLM(config).eval().to(dtype)
    transfer_weights(reference, model)
    input_ids = torch.randint(0, config.vocab_size, (2, 13))
    with torch.no_grad():
        expected = reference(input_ids=input_ids, position_ids=positions(2, 13)).logits
        actual = model(input_ids=input_ids, position_ids=positions(2, 13)).logits
    assert actual.dtype == torch.float32
    assert_rmse_close(actual, expected.float(), rmse_ratio_tol=0.05, msg=f"logits ({dtype})")


def test_position_ids_are_required(config: LlamaConfig) -> None:
    with pytest.raises(AssertionError, match="position_ids"):
        lean.LlamaForCausalLM(config)(torch.zeros(1, 3, dtype=torch.long), None)


def test_export_with_dynamic_batch_and_sequence(config: LlamaConfig) -> None:
    model = lean.LlamaForCausalLM(config).eval()
    input_ids = torch.randint(0, config.vocab_size, (2, 8))
    batch, seq = Dim("batch", min=1, max=64), Dim("seq", min=1, max=256)
    dynamic = {"input_ids": {0: batch, 1: seq}, "position_ids": {0: batch, 1: seq}}
    gm = torch_export_to_gm(
        model, kwargs={"input_ids": input_ids, "position_ids": positions(2, 8)}, dynamic_shapes=dynamic
    )

    with torch.no_grad():
        torch.testing.assert_close(
            gm(input_ids=input_ids, position_ids=positions(2, 8)).logits,
            model(input_ids=input_ids, position_ids=positions(2, 8)).logits,
        )
        second = torch.randint(0, config.vocab_size, (3, 21))
        torch.testing.assert_close(
            gm(input_ids=second, position_ids=positions(3, 21)).logits,
            model(input_ids=second, position_ids=positions(3, 21)).logits,
        )
