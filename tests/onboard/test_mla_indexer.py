"""The analyzer measures DeepSeek sparse attention's lightning indexer inside MLA, against transformers."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from onboardlm.errors import UnsupportedFeature
from onboardlm.onboard.analyze_moe import analyze_mla
from onboardlm.testing.tiny_config import tiny_config


def _built(model_type: str, **overrides: object) -> tuple:
    config = tiny_config(AutoConfig.for_model(model_type))
    for name, value in overrides.items():
        setattr(config, name, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32).eval()
    return config, model


@pytest.mark.parametrize(("model_type", "indexer_pairs"), [("deepseek_v32", False), ("glm_moe_dsa", True)])
def test_indexer_is_measured(model_type: str, indexer_pairs: bool) -> None:
    """Children by shape, config fields by probe rebuild, and the indexer's RoPE layout from its selection
    (DeepSeek-V3.2 half-split, GLM-MoE-DSA interleaved); the main MLA always rotates channel pairs."""
    config, model = _built(model_type)
    spec = analyze_mla(config, model)
    assert spec is not None and spec.indexer is not None
    indexer = spec.indexer
    assert (indexer.q_attr, indexer.k_attr, indexer.norm_attr, indexer.weights_attr) == (
        "wq_b", "wk", "k_norm", "weights_proj",
    )  # fmt: skip
    assert (indexer.heads_field, indexer.head_dim_field, indexer.topk_field) == (
        "index_n_heads", "index_head_dim", "index_topk",
    )  # fmt: skip
    assert indexer.rope_pairs is indexer_pairs
    assert indexer.norm_bias and float(indexer.norm_eps) == 1e-6
    assert spec.rope_pairs and not spec.rope_interleave
    assert config.index_topk < 16, "the generated tests' 16-token sequences must outnumber the selected keys"


def test_layers_reusing_an_earlier_selection_are_refused() -> None:
    """GLM-MoE-DSA's "shared" indexer layers have no indexer of their own: refused with the layer named."""
    config, model = _built("glm_moe_dsa", indexer_types=["full", "shared"])
    with pytest.raises(UnsupportedFeature, match=r"model\.layers\.1\.self_attn.*without its own indexer"):
        analyze_mla(config, model)


def test_deepseek_v3_has_no_indexer() -> None:
    config, model = _built("deepseek_v3")
    spec = analyze_mla(config, model)
    assert spec is not None and spec.indexer is None
