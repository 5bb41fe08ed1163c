"""Decoder layers of different widths (transformers' ``per_layer_config``) and the Gemma 4 attention parts.

Expected values are facts of the transformers implementation: Gemma 4's full-attention layers take
``head_dim`` (and, with ``num_global_key_value_heads``, ``num_key_value_heads``) from
``per_layer_config``; its attention normalises the value heads by a weightless RMSNorm, uses no
softmax scaling, its layers scale their output by a ``layer_scalar`` buffer, and its RMSNorm
multiplies the weight into the fp32 normalised value.
"""

from __future__ import annotations

import pytest
from transformers import AutoConfig, Gemma4UnifiedTextConfig, LlamaConfig
from transformers.models.gemma4_unified.modeling_gemma4_unified import Gemma4UnifiedRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from onboardlm.errors import UnsupportedFeature
from onboardlm.models.config_completion import complete_default_config
from onboardlm.onboard.analyze import _weight_in_fp32, analyze
from onboardlm.onboard.generate import generate_model_file
from onboardlm.onboard.testgen import BlockGroup, ReferenceLayout, keep_lean_modules


def _gemma4_unified(**overrides) -> Gemma4UnifiedTextConfig:
    fields = dict(
        vocab_size=100,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=8,
    )
    return Gemma4UnifiedTextConfig(**{**fields, **overrides})


@pytest.fixture(scope="module")
def spec():
    return analyze(AutoConfig.for_model("gemma4_unified_text"))


def test_per_layer_head_dim_is_read_from_each_layers_config(spec) -> None:
    assert spec.attention.per_layer_fields == ("head_dim",)
    assert spec.rope.per_layer_type and spec.rope.layer_type_config
    source = generate_model_file(spec)
    assert "layer_config = config.per_layer_config[layer_idx]" in source
    assert "self.head_dim = (\n            getattr(layer_config, " in source
    assert "config = config.per_layer_config[layer_type]" in source


def test_gemma4_attention_parts(spec) -> None:
    attn = spec.attention
    assert attn.v_norm_name == "v_norm" and attn.v_norm_eps == "config.rms_norm_eps"
    assert attn.scaling == "1.0"
    assert attn.qk_norm is not None and attn.qk_norm.fp32_weight
    assert spec.decoder.output_scale == "layer_scalar" and spec.decoder.output_scale_buffer
    assert spec.decoder.output_scale_shape == (1,)
    source = generate_model_file(spec)
    assert "v = ops.torch_rmsnorm(v, self._ad_v_norm_weight, self.v_norm_eps)" in source
    assert 'self.register_buffer("layer_scalar", torch.ones([1]))' in source
    assert "return hidden_states * self.layer_scalar" in source


def test_global_num_key_value_heads_per_layer_too() -> None:
    """``num_global_key_value_heads`` overrides the full layers' KV heads as well."""
    config = _gemma4_unified(num_global_key_value_heads=1, global_head_dim=16, attention_k_eq_v=False)
    config.per_layer_config = {1: {"head_dim": 16, "num_key_value_heads": 1}}
    spec = analyze(config)
    assert spec.attention.per_layer_fields == ("head_dim", "num_key_value_heads")
    assert "self.num_kv_heads = layer_config.num_key_value_heads" in generate_model_file(spec)


def test_an_override_the_templates_read_once_is_refused_by_name() -> None:
    config = _gemma4_unified(per_layer_config={1: {"intermediate_size": 256}})
    with pytest.raises(
        UnsupportedFeature, match="per_layer_config overrides intermediate_size on some layers"
    ):
        analyze(config)


def test_an_overridden_first_layer_is_refused() -> None:
    config = _gemma4_unified(per_layer_config={0: {"head_dim": 16}})
    with pytest.raises(UnsupportedFeature, match="overrides head_dim on the first layer"):
        analyze(config)


def test_norm_weight_in_fp32_is_measured() -> None:
    assert _weight_in_fp32(Gemma4UnifiedRMSNorm(16, eps=1e-6), 1e-6)
    assert not _weight_in_fp32(LlamaRMSNorm(16, eps=1e-6), 1e-6)
    assert not analyze(LlamaConfig(num_hidden_layers=1, hidden_size=64, intermediate_size=128,
                                   num_attention_heads=4, vocab_size=100)).decoder.norm.fp32_weight  # fmt: skip


def test_block_paths_the_lean_file_inlines_are_not_tested() -> None:
    layout = ReferenceLayout(
        causal_lm="X",
        layers=(),
        blocks=(
            BlockGroup(
                "XRMSNorm", "norm", ("model.layers.0.self_attn.q_norm", "model.layers.0.self_attn.v_norm")
            ),
        ),
    )
    lean = "class A:\n    def __init__(self):\n        self.q_norm = 1\n        self.v_norm_eps = 2\n"
    kept = keep_lean_modules(layout, lean)
    assert kept.blocks[0].paths == ("model.layers.0.self_attn.q_norm",)


def test_per_layer_inputs_not_measured_are_refused_naming_the_layer_input(monkeypatch) -> None:
    """Layers that mix in a per-layer embedding (``per_layer_input``) with linears of their own, in a
    way the per-layer input measurement does not find (test_analyze_perlayer.py), are refused by name."""
    monkeypatch.setattr("onboardlm.onboard.analyze.measure_per_layer_inputs", lambda *_: None)
    with pytest.raises(
        UnsupportedFeature, match=r"per-layer inputs: the layer takes per_layer_input"
    ) as caught:
        analyze(AutoConfig.for_model("gemma4_text"))
    assert caught.value.module_path == "model.layers.0"
    assert "per_layer_input_gate, per_layer_projection" in str(caught.value)


def test_a_draft_model_reading_another_models_keys_and_values_is_refused() -> None:
    """Gemma 4's assistant has no k/v projections: every layer reads the target model's shared KV. Its
    default config is completed as a checkpoint's would be: transformers 5.17's leaves the text config
    None, later releases build the one the class builds from an empty ``text_config``."""
    config = AutoConfig.for_model("gemma4_unified_assistant")
    complete_default_config(config)
    text = config.get_text_config()
    expected = AutoConfig.for_model("gemma4_unified_assistant", text_config={}).get_text_config()
    assert text.to_dict() == expected.to_dict() and text.num_kv_shared_layers == text.num_hidden_layers
    with pytest.raises(
        UnsupportedFeature, match="keys and values come from another model through shared_kv_states"
    ):
        analyze(text)
