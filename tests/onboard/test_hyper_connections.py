"""Hyper-connections are refused by measurement: decoder layers that receive several residual streams."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

from onboardlm.errors import UnsupportedFeature
from onboardlm.models.config_completion import complete_default_config
from onboardlm.onboard.analyze import analyze
from onboardlm.onboard.analyze_streams import hyper_connection_refusal
from onboardlm.testing.tiny_config import tiny_config


@pytest.mark.parametrize(
    ("model_type", "shape"), [("deepseek_v4", "[1, 3, 4, 64]"), ("qwen4_exp_text", "[1, 3, 256]")]
)
def test_several_residual_streams_are_refused_with_that_reason(model_type: str, shape: str) -> None:
    """DeepSeek-V4 stacks its 4 streams on a new axis, Qwen4-Exp concatenates them: both are measured."""
    config = AutoConfig.for_model(model_type)
    complete_default_config(config)
    with pytest.raises(
        UnsupportedFeature, match=r"model\.layers\.0: .*hyper-connections: .* 4 residual streams"
    ) as err:
        analyze(config)
    assert shape in str(err.value)


def test_one_residual_stream_is_not_hyper_connections() -> None:
    config = tiny_config(LlamaConfig())
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    assert hyper_connection_refusal(model, config) is None


def test_qwen4_exp_indexer_fields_are_completed_as_a_checkpoint_sets_them() -> None:
    """All five QSA indexer fields are None in the default; a checkpoint sets every one (transformers
    cannot build the indexer otherwise). The multimodal default's text config is completed as well."""
    config = AutoConfig.for_model("qwen4_exp_text")
    notes = complete_default_config(config)
    assert (config.indexer_kv_heads, config.indexer_compress_ratio, config.indexer_budget) == (1, 4, 2048)
    assert config.indexer_n_heads == config.num_attention_heads and config.indexer_head_dim == config.head_dim
    assert any(note.startswith("indexer_budget=2048") for note in notes)
    config.validate()  # transformers' own checks (budget a multiple of the block, one key head) hold
    multimodal = AutoConfig.for_model("qwen4_exp")
    notes = complete_default_config(multimodal)
    assert multimodal.get_text_config(decoder=True).indexer_budget == 2048
    assert any(note.startswith("text_config.indexer_budget=") for note in notes)
