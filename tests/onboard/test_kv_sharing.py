"""Cross-layer KV sharing measured from transformers models, against transformers' own config fields.

The references are transformers' facts: Kolibri 1.1's ``kv_source_layers`` lists the layer each layer
reads the keys and values of, and Gemma 4's ``kv_sharing_modes`` marks the last ``num_kv_shared_layers``
layers ``reuse`` (each reading the last earlier layer of its own layer type; releases without that
property keep the same roles as flags of the attention modules). The analyzer measures the
sources from a forward instead, and must agree; a count field that merely equals the number of sharing
layers is not taken for the rule.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

from onboardlm.errors import UnsupportedFeature
from onboardlm.onboard.analyze import analyze
from onboardlm.onboard.analyze_kv_sharing import kv_source_expression, measure_kv_sources
from onboardlm.onboard.generate import generate_model_file
from onboardlm.testing import tiny_config
from onboardlm.testing.reference import requires_reference


def _gemma4_sharing(shared: int = 1):  # noqa: ANN202 - a transformers config
    """Gemma 4's text config with its last ``shared`` layers reading earlier layers' keys and values."""
    config = AutoConfig.for_model("gemma4_unified_text")
    fields = config.to_dict()
    fields.update(num_hidden_layers=8, layer_types=["sliding_attention", "full_attention"] * 4)
    fields.update(num_kv_shared_layers=4, per_layer_config=None)
    config = type(config)(**fields)
    tiny = tiny_config(config)
    tiny.num_kv_shared_layers = shared
    return config, tiny


def _model(config):  # noqa: ANN001, ANN202 - a transformers config and model
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def _sources_of(modes: list[str | None], layer_types: list[str]) -> list[int]:
    """Gemma 4's sources, from transformers' kv_sharing_modes: a ``reuse`` layer reads the last
    earlier ``store`` layer of its layer type."""
    return [
        max(j for j in range(i) if modes[j] == "store" and layer_types[j] == layer_types[i])
        if mode == "reuse"
        else i
        for i, mode in enumerate(modes)
    ]


def _transformers_modes(config, model) -> list[str | None]:  # noqa: ANN001 - a transformers config and model
    """transformers' role of each layer in the sharing: the config's ``kv_sharing_modes`` where the
    release has them, else the flags its attention modules keep (transformers 5.17:
    ``is_kv_shared_layer`` reads another layer's, ``store_full_length_kv`` keeps its own for them)."""
    modes = getattr(config, "kv_sharing_modes", None)
    if modes is not None:
        return list(modes)
    attentions = [layer.self_attn for layer in model.model.layers]
    if not all(hasattr(a, "is_kv_shared_layer") and hasattr(a, "store_full_length_kv") for a in attentions):
        pytest.skip(f"transformers {transformers.__version__} names no layer's role in KV sharing")
    return [
        "reuse" if a.is_kv_shared_layer else "store" if a.store_full_length_kv else None for a in attentions
    ]


@requires_reference("kolibri1_1")
def test_kolibri_sources_are_its_kv_source_layers() -> None:
    tiny = tiny_config(AutoConfig.for_model("kolibri1_1"))
    model = _model(tiny)
    paths = [f"model.layers.{i}.self_attn" for i in range(tiny.num_hidden_layers)]
    sources = measure_kv_sources(model, paths, tiny.vocab_size)
    assert sources == list(tiny.kv_source_layers) and sources != list(range(tiny.num_hidden_layers))
    assert kv_source_expression(tiny, sources, lambda _: None) == "config.kv_source_layers[layer_idx]"


def test_gemma4_sources_follow_num_kv_shared_layers() -> None:
    _, tiny = _gemma4_sharing()
    tiny.eos_token_id = 1  # as many as the sharing layers: a decoy the cross-check must reject
    model = _model(tiny)
    paths = [f"model.layers.{i}.self_attn" for i in range(tiny.num_hidden_layers)]
    sources = measure_kv_sources(model, paths, tiny.vocab_size)
    assert sources == _sources_of(_transformers_modes(tiny, model), tiny.layer_types)
    assert sources[-1] != tiny.num_hidden_layers - 1  # the tiny config keeps a sharing layer
    measured: list[str] = []

    def measure(variant):  # noqa: ANN001, ANN202 - a config: the sources of its model
        measured.append("eos" if variant.eos_token_id != tiny.eos_token_id else "count")
        return measure_kv_sources(_model(variant), paths, tiny.vocab_size)

    expression = kv_source_expression(tiny, sources, measure)
    assert expression is not None and "config.num_kv_shared_layers" in expression
    assert "eos_token_id" not in expression and "eos" in measured  # tried, and refuted by the model
    # no count field that moves the sharing layers: no rule
    decoy = copy.deepcopy(tiny)
    decoy.num_kv_shared_layers = 0
    assert kv_source_expression(decoy, sources, lambda variant: sources) is None


def test_analyzed_file_builds_key_value_weights_on_producing_layers_only() -> None:
    config, tiny = _gemma4_sharing()
    spec = analyze(config)
    attention = spec.attention
    assert "config.num_kv_shared_layers" in attention.kv_source
    assert set(attention.kv_own) == {"k_proj", "v_proj", "k_norm"}
    source = generate_model_file(spec)
    assert "shared_kv[self.layer_idx] = (k, v)" in source and "k, v = shared_kv[self.kv_source]" in source
    assert "if self.kv_source == layer_idx:" in source
    namespace: dict = {}
    exec(compile(source, "modeling_gemma4_unified_text.py", "exec"), namespace)  # noqa: S102
    lean = namespace["Gemma4UnifiedForCausalLM"](tiny)
    reference = AutoModelForCausalLM.from_config(tiny)
    assert set(lean.state_dict()) == set(reference.state_dict())  # the checkpoint's keys, no others
    assert "model.layers.1.self_attn.k_proj.weight" in lean.state_dict()
    assert "model.layers.2.self_attn.k_proj.weight" not in lean.state_dict()  # it reads layer 1's


@requires_reference("kolibri1_1")
def test_kolibri_indexer_is_refused_by_module() -> None:
    with pytest.raises(UnsupportedFeature) as raised:
        analyze(AutoConfig.for_model("kolibri1_1"))
    assert raised.value.module_path == "model.layers.1.self_attn.indexer"
    assert "Kolibri1_1Indexer" in str(raised.value) and "query_states, key_states" in str(raised.value)


def test_gemma3n_sharing_is_measured_the_same_way() -> None:
    """Gemma 3n (refused earlier today for its AltUp streams) shares keys and values as Gemma 4 does:
    its attention is ready for the same rule once the rest of its layer is."""
    tiny = tiny_config(AutoConfig.for_model("gemma3n_text"))
    paths = [f"model.layers.{i}.self_attn" for i in range(tiny.num_hidden_layers)]
    model = _model(tiny)
    sources = measure_kv_sources(model, paths, tiny.vocab_size)
    assert sources == _sources_of(_transformers_modes(tiny, model), tiny.layer_types)
    assert sources != list(range(tiny.num_hidden_layers))

    def measure(variant):  # noqa: ANN001, ANN202 - a config: the sources of its model
        return measure_kv_sources(_model(variant), paths, tiny.vocab_size)

    assert "config.num_kv_shared_layers" in kv_source_expression(tiny, sources, measure)
