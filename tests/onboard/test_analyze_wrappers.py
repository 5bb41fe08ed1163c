"""Wrapped parts measured from transformers' ModernBERT decoder (issue 13): the token embedding and
its norm inside an ``embeddings`` module, a prediction head (dense, activation, norm) before the output
projection, a norm slot that is ``nn.Identity`` on the first layer, and an eager attention that adds
its mask unguarded.

Expected values are facts of the transformers implementation (read from the model it builds), not
outputs of the analyzer.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from onboardlm.onboard.analyze import _fill_attention_masks, analyze
from onboardlm.onboard.generate import generate_model_file
from onboardlm.testing import tiny_config

pytest.importorskip("transformers.models.modernbert_decoder")


@pytest.fixture(scope="module")
def spec():
    return analyze(AutoConfig.for_model("modernbert-decoder"))


@pytest.fixture(scope="module")
def model() -> nn.Module:
    config = tiny_config(AutoConfig.for_model("modernbert-decoder"))
    config.num_hidden_layers = 4
    config.layer_types = ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def test_embedding_wrapper_and_its_norm(spec, model: nn.Module) -> None:
    assert model.get_input_embeddings() is model.model.embeddings.tok_embeddings
    embedding = spec.embedding
    assert embedding.wrapper == ("embeddings", type(model.model.embeddings).__name__)
    assert (embedding.attr, embedding.norm) == ("embeddings.tok_embeddings", "embeddings.norm")


def test_prediction_head_before_the_output_projection(spec, model: nn.Module) -> None:
    assert model.get_output_embeddings() is model.decoder
    head = spec.head
    assert (head.attr, head.lm_head_bias) == ("decoder", "config.decoder_bias")
    transform = head.transform
    assert (transform.attr, transform.class_name) == ("lm_head", type(model.lm_head).__name__)
    assert (transform.dense.name, transform.act_attr, transform.norm_attr) == ("dense", "act", "norm")
    assert (transform.act, transform.dense.bias) == ("config.classifier_activation", "config.classifier_bias")
    source = generate_model_file(spec)
    assert "self.lm_head = ModernBertDecoderPredictionHead(config)" in source
    assert "hidden_states = self.lm_head(hidden_states)" in source


def test_identity_norm_on_the_first_layer_only(spec, model: nn.Module) -> None:
    identity = [isinstance(layer.attn_norm, nn.Identity) for layer in model.model.layers]
    assert identity == [True, False, False, False]
    assert spec.decoder.identity_norms == (("attn_norm", "layer_idx != 0"),)
    source = " ".join(generate_model_file(spec).split())
    assert "if layer_idx != 0 else nn.Identity()" in source


def test_unguarded_eager_mask_filled_with_zeros(model: nn.Module) -> None:
    attention = model.model.layers[1].attn
    x = torch.randn(1, 5, model.config.hidden_size)
    tables = model.model.rotary_emb(x, torch.arange(5)[None], "sliding_attention")
    with torch.no_grad(), pytest.raises(TypeError):  # transformers adds the mask unguarded
        attention(x, position_embeddings=tables, attention_mask=None)
    zeros = torch.zeros(1, 1, 5, 5)
    with torch.no_grad():
        expected = attention(x, position_embeddings=tables, attention_mask=zeros)[0]
    _fill_attention_masks(model)
    with torch.no_grad():
        actual = attention(x, position_embeddings=tables, attention_mask=None)[0]
    torch.testing.assert_close(actual, expected)


def test_depth_scaled_residual_is_named_with_its_factor(monkeypatch: pytest.MonkeyPatch) -> None:
    """Beam's layer i adds ``h / sqrt(k) + residual * sqrt((k - 1) / k)`` at adds k = 2i + 2 and 2i + 3:
    with the blocks' outputs zeroed, layer 0 passes sqrt(1/2) * sqrt(2/3) = sqrt(1/3) of its input. A
    rescaled residual of no known formula (here: the depth-scaled candidates taken away) is refused
    with that factor."""
    from onboardlm.errors import UnsupportedFeature
    from onboardlm.onboard import analyze as analyze_module

    pytest.importorskip("transformers.models.beam")
    monkeypatch.setattr(analyze_module, "_FIRST_RESIDUAL_ADDS", ())
    with pytest.raises(UnsupportedFeature, match="rescales its residual stream") as raised:
        analyze(AutoConfig.for_model("beam"))
    assert raised.value.module_path == "model.layers.0"
    assert f"x{(1 / 3) ** 0.5:.4g}" in str(raised.value)
