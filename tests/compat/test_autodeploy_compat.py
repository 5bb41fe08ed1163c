"""Model files written for TensorRT-LLM AutoDeploy run on onboardlm with only their imports redirected.

Each ``ad_style_*.py`` beside this file imports the way AutoDeploy model files do (``tensorrt_llm...``
paths, absolute and relative) and calls ``torch.ops.auto_deploy.*`` with AutoDeploy's argument forms.
``autodeploy_shim`` points those imports at onboardlm; each file is built by the onboardlm factory on
a tiny config, filled from the transformers model of the same type through ``load_state_dict``
(strict key check, load hooks run), and must give transformers' logits (fp32, RMSE ratio <= 0.05).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    GptOssConfig,
    LlamaConfig,
    PretrainedConfig,
    Qwen3Config,
    Qwen3MoeConfig,
)

from onboardlm.models.factory import AutoModelForCausalLMFactory
from onboardlm.testing import assert_rmse_close, transfer_weights

HERE = Path(__file__).resolve().parent
RMSE_TOL = 0.05
BATCH, SEQ = 2, 12  # SEQ > sliding_window (4), so windows really cut


def _load_shim() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "onboardlm_tests_autodeploy_shim", HERE / "autodeploy_shim.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


shim = _load_shim()

_COMMON = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=128,
    attn_implementation="eager",
)


@dataclass(frozen=True)
class Case:
    stem: str  # model file beside this test
    model_cls: str  # the class the file registers
    make_config: Callable[[], PretrainedConfig]


CASES = {
    "llama3": Case(
        "ad_style_llama3",
        "Llama3ForCausalLM",
        lambda: LlamaConfig(
            intermediate_size=128,
            tie_word_embeddings=False,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
            **_COMMON,
        ),
    ),
    "qwen3": Case(
        "ad_style_qwen3",
        "Qwen3ForCausalLM",
        lambda: Qwen3Config(intermediate_size=128, head_dim=16, tie_word_embeddings=True, **_COMMON),
    ),
    "qwen3_moe": Case(
        "ad_style_qwen3_moe",
        "Qwen3MoeForCausalLM",
        lambda: Qwen3MoeConfig(
            intermediate_size=96,
            moe_intermediate_size=32,
            head_dim=16,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            mlp_only_layers=[1],  # layer 0 MoE, layer 1 dense
            **_COMMON,
        ),
    ),
    "gemma2": Case(
        "ad_style_gemma2",
        "Gemma2ForCausalLM",
        lambda: Gemma2Config(
            intermediate_size=128, head_dim=16, sliding_window=4, query_pre_attn_scalar=24, **_COMMON
        ),
    ),
    "gpt_oss": Case(
        "ad_style_gpt_oss",
        "GptOssForCausalLM",
        lambda: GptOssConfig(
            intermediate_size=32,
            head_dim=16,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=4,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 150000.0,
                "factor": 4.0,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "truncate": False,
                "original_max_position_embeddings": 32,
            },
            **_COMMON,
        ),
    ),
}


def _randomize(model: torch.nn.Module) -> None:
    """Perturb every parameter so norms, biases, sinks and zero-initialised weights all matter."""
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))


def _mapping() -> dict[str, type[torch.nn.Module]]:
    return dict(AutoModelForCausalLMFactory._custom_model_mapping)


def _check_case(case: Case) -> None:
    config = case.make_config()
    before = _mapping()
    with shim.autodeploy_imports(HERE):
        module = shim.load_model_file(case.stem)
        factory = AutoModelForCausalLMFactory(config)
        assert factory.model_class() == (getattr(module, case.model_cls), True)
        # Build before the HF model: transformers writes its experts implementation into the config.
        model = factory.build_model()
        reference = AutoModelForCausalLM.from_config(config).eval()
        _randomize(reference)
        transfer_weights(reference, model)  # load_state_dict, strict key check, load hooks run
        input_ids = torch.randint(0, config.vocab_size, (BATCH, SEQ))
        position_ids = torch.arange(SEQ).expand(BATCH, SEQ)
        with torch.no_grad():
            expected = reference(input_ids=input_ids, position_ids=position_ids).logits
            actual = model(input_ids=input_ids, position_ids=position_ids).logits
    assert _mapping() == before, "the factory mapping must be restored after the shim block"
    assert actual.dtype == torch.float32
    assert_rmse_close(actual, expected, RMSE_TOL, msg=case.stem)


@pytest.mark.parametrize("name", list(CASES))
def test_ad_style_file_matches_transformers(name: str) -> None:
    _check_case(CASES[name])
