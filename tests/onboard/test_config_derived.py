"""derived_expression: an attribute a config computes in ``__post_init__`` is written as its
derivation over stored fields, so lean files also load configs of releases that do not compute it."""

from __future__ import annotations

import pytest
from transformers import AutoConfig

from onboardlm.onboard.config_derived import derived_expression
from onboardlm.onboard.config_variants import candidate_variants


@pytest.mark.parametrize(
    ("model_type", "overrides"),
    [
        ("falcon", {"multi_query": True, "new_decoder_architecture": False}),
        ("falcon", {"multi_query": False, "new_decoder_architecture": False, "num_kv_heads": 2}),
        ("falcon", {"multi_query": True, "new_decoder_architecture": True, "num_kv_heads": 4}),
        ("gpt_bigcode", {"multi_query": True}),
        ("gpt_bigcode", {"multi_query": False}),
    ],
)
def test_derivation_gives_the_config_s_value(model_type: str, overrides: dict) -> None:
    config = AutoConfig.for_model(model_type, **overrides)
    if not hasattr(config, "num_key_value_heads"):
        pytest.skip("this transformers release does not derive num_key_value_heads")
    expression = derived_expression(config, "num_key_value_heads")
    assert expression is not None and "num_key_value_heads" not in expression
    assert eval(expression, {}, {"config": config}) == config.num_key_value_heads  # noqa: S307


def test_stored_fields_have_no_derivation() -> None:
    assert derived_expression(AutoConfig.for_model("llama"), "num_key_value_heads") is None
    assert derived_expression(AutoConfig.for_model("falcon"), "not_an_attribute") is None


def test_flags_the_file_is_not_for_get_no_variant() -> None:
    source = '''"""Lean Falcon. Also: not for configs with config.alibi=True,
config.new_decoder_architecture=True (measured: other modules)."""
def f(config):
    return config.alibi, config.new_decoder_architecture, config.multi_query
'''
    config = AutoConfig.for_model("falcon", alibi=False, new_decoder_architecture=False, multi_query=True)
    labels = [variant.label for variant in candidate_variants(config, source)]
    assert "multi_query=False" in labels
    assert "alibi=True" not in labels and "new_decoder_architecture=True" not in labels


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"block_auto_adjust_ff_dim": False},
        {"block_ffn_dim_multiplier": 1.5, "block_multiple_of": 64, "intermediate_size": 1000},
    ],
)
def test_lfm2_feed_forward_width_written_from_its_init(overrides: dict) -> None:
    """LFM2's MLP computes its width from four fields; the written helper gives transformers' width."""
    from transformers.models.lfm2.modeling_lfm2 import Lfm2MLP

    from onboardlm.onboard.config_derived import width_function

    config = AutoConfig.for_model("lfm2", hidden_size=64, **overrides)
    width = Lfm2MLP(config).w2.in_features
    source = width_function(Lfm2MLP, "w2", config, width, "lfm2_mlp_width")
    assert source is not None and source.startswith("def lfm2_mlp_width(config: Lfm2Config) -> int:")
    scope: dict = {}
    exec(source, {"Lfm2Config": type(config)}, scope)  # noqa: S102
    assert scope["lfm2_mlp_width"](config) == width
    assert width_function(Lfm2MLP, "w2", config, width + 1, "f") is None  # checked against the module


def test_lfm2_functional_activation_is_measured() -> None:
    """``w2(F.silu(w1(x)) * w3(x))`` without an activation module: the activation is measured."""
    from onboardlm.onboard.analyze import analyze

    spec = analyze(AutoConfig.for_model("lfm2"))
    mlp = spec.feed_forward if spec.hybrid is None else spec.hybrid.block("mlp")
    assert (mlp.kind, mlp.activation, mlp.act_attr) == ("gated", "silu", "act_fn")
    assert [linear.name for linear in mlp.inputs] == ["w1", "w3"] and mlp.down.name == "w2"
    assert mlp.intermediate == "lfm2_mlp_width(config)" and "block_multiple_of" in mlp.width_function


def test_a_layer_list_naming_every_layer_gets_a_variant_without_layer_0() -> None:
    """``layer_idx in config.moe_layers`` (Llama 4) with every test layer listed: the variant leaves
    layer 0 out, so the branch of the unlisted layers (dense MLPs) runs in a test too."""
    config = AutoConfig.for_model("llama4_text", num_hidden_layers=3, moe_layers=[0, 1, 2])
    source = "def f(config, layer_idx):\n    return layer_idx in config.moe_layers\n"
    variants = {variant.label: variant.overrides for variant in candidate_variants(config, source)}
    assert variants["moe_layers=without_0"] == {"moe_layers": [1, 2]}
