"""Small variants of families that already pass, measured from transformers models: Doge's bias per
key on the attention scores (``exp(A * softplus(dt_proj(values)))``, the ``keep_window_size``
highest-bias keys kept), its residual scaled by the layer's own vectors before each add, and the
``is_moe`` flag whose other value builds a feed-forward block the file does not have (refused);
Beam's depth-scaled residual adds, its output gate's bias per head and the q scale per position its
model passes to the NoPE layers.

Expected values are facts of the transformers implementation; the generated file is also run
against its transformers model (the independent reference) on the tiny config.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from onboardlm.onboard.analyze import analyze
from onboardlm.onboard.config_variants import SHORT_KEY_WINDOW, candidate_variants
from onboardlm.onboard.generate import generate_model_file
from onboardlm.testing import assert_rmse_close, randomize_constant_tensors, tiny_config, transfer_weights
from onboardlm.testing.reference import installed_model_type, missing_reference_reason


@pytest.fixture(scope="module")
def doge() -> object:
    if installed_model_type("doge") is None:
        pytest.skip(missing_reference_reason("doge"))
    return analyze(AutoConfig.for_model("doge"))


def test_bias_per_key_and_its_window(doge) -> None:
    attention = doge.attention
    assert attention.key_bias == ("dt_proj", "A", "config.attention_bias")
    assert attention.key_bias_window == "config.keep_window_size"
    assert [p.name for p in attention.projections] == ["q_proj", "k_proj", "v_proj"]
    assert attention.out.name == "o_proj"


def test_residual_weights_and_refused_feed_forward_flag(doge) -> None:
    decoder = doge.decoder
    assert decoder.residual_weights == ("input_residual", "post_attention_residual")
    assert (decoder.attn_pre, decoder.mlp_pre, decoder.attn_post, decoder.mlp_post) == (
        "input_layernorm", "post_attention_layernorm", None, None,
    )  # fmt: skip
    assert decoder.output_scale == ""
    assert ("config.is_moe", "config.is_moe=True") in decoder.refused


def test_plain_layers_have_no_residual_weights_or_key_bias() -> None:
    spec = analyze(AutoConfig.for_model("llama"))
    assert spec.decoder.residual_weights == (None, None) and spec.decoder.refused == ()
    assert spec.attention.key_bias is None and spec.attention.key_bias_window is None


def test_key_window_variant_is_offered() -> None:
    source = "class A:\n    def __init__(self, config):\n        self.keep_window = config.keep_window_size\n"
    tiny = tiny_config(AutoConfig.for_model("doge"))
    labels = {variant.label: variant.overrides for variant in candidate_variants(tiny, source)}
    assert labels[f"keep_window_size={SHORT_KEY_WINDOW}"] == {"keep_window_size": SHORT_KEY_WINDOW}


def _lean_module(spec, tmp_path: Path):
    path = tmp_path / "modeling_doge.py"
    path.write_text(generate_model_file(spec))
    module_spec = importlib.util.spec_from_file_location("generated_doge_variants", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("keep_window", [None, 3])
def test_generated_doge_matches_transformers(doge, tmp_path: Path, keep_window: int | None) -> None:
    """Random A and residual vectors (zeros and ones at initialisation, where they would hide); a
    window of 3 keys drops keys of the 12-token rows."""
    lean = _lean_module(doge, tmp_path)
    overrides = {} if keep_window is None else {"keep_window_size": keep_window}
    tiny = tiny_config(AutoConfig.for_model("doge", **overrides))
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(
        tiny, attn_implementation="eager", dtype=torch.float32
    ).eval()
    randomize_constant_tensors(reference)
    model = lean.DogeForCausalLM(tiny_config(AutoConfig.for_model("doge", **overrides))).float().eval()
    transfer_weights(reference, model)
    input_ids = torch.randint(0, tiny.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    position_ids = torch.arange(12)[None].expand(2, 12)
    with torch.no_grad():
        expected = reference(input_ids=input_ids, position_ids=position_ids).logits
        actual = model(input_ids=input_ids, position_ids=position_ids).logits
    assert_rmse_close(actual, expected, rmse_ratio_tol=1e-5, msg="doge logits")


def test_generated_doge_refuses_the_expert_flag(doge, tmp_path: Path) -> None:
    lean = _lean_module(doge, tmp_path)
    with pytest.raises(NotImplementedError, match="config.is_moe=True"):
        lean.DogeForCausalLM(tiny_config(AutoConfig.for_model("doge", is_moe=True)))


@pytest.fixture(scope="module")
def beam() -> object:
    if installed_model_type("beam") is None:
        pytest.skip(missing_reference_reason("beam"))
    return analyze(AutoConfig.for_model("beam"))


def test_beam_depth_scaled_residual_adds(beam) -> None:
    """transformers' ``depth_scaled_residual_add``: add index 2 * (layer_idx + 1) for the attention."""
    assert beam.decoder.residual_adds == 2
    assert beam.decoder.residual_multiplier is None and beam.decoder.residual_weights == (None, None)


def test_beam_gate_bias_and_nope_q_scale(beam) -> None:
    """``gate_bias`` per head on the separate gate; ``compute_attention_scaling``'s
    ``(1 + (position + 1) / 2048) ** 0.1`` on the layers without RoPE (constants of the model code)."""
    attention = beam.attention
    assert attention.output_gate == "separate" and attention.gate_bias == "gate_bias"
    assert attention.position_scale == ("0.1", "2048") and attention.position_scale_power
    assert (attention.position_scale_offset, attention.position_scale_flag) == (1, "not self.use_rope")


def test_plain_layers_have_no_depth_scaling_or_gate_bias() -> None:
    spec = analyze(AutoConfig.for_model("qwen3_next")) if installed_model_type("qwen3_next") else None
    llama = analyze(AutoConfig.for_model("llama"))
    assert llama.decoder.residual_adds is None and not llama.attention.position_scale_power
    if spec is not None:
        assert spec.attention.gate_bias == ""


def test_generated_beam_matches_transformers(beam, tmp_path: Path) -> None:
    """Random gate biases (zero at initialisation) and positions far enough that the NoPE layers' q
    scale is well above one."""
    path = tmp_path / "modeling_beam.py"
    path.write_text(generate_model_file(beam))
    module_spec = importlib.util.spec_from_file_location("generated_beam_variants", path)
    assert module_spec is not None and module_spec.loader is not None
    lean = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(lean)
    tiny = tiny_config(AutoConfig.for_model("beam"))
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(
        tiny, attn_implementation="eager", dtype=torch.float32
    ).eval()
    randomize_constant_tensors(reference)
    model = lean.BeamForCausalLM(tiny_config(AutoConfig.for_model("beam"))).float().eval()
    transfer_weights(reference, model)
    input_ids = torch.randint(0, tiny.vocab_size, (1, 6), generator=torch.Generator().manual_seed(1))
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 5]]) * 3000
    with torch.no_grad():
        expected = reference(input_ids=input_ids, position_ids=position_ids).logits
        actual = model(input_ids=input_ids, position_ids=position_ids).logits
    assert_rmse_close(actual, expected, rmse_ratio_tol=1e-5, msg="beam logits")
