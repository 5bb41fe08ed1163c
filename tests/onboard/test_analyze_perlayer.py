"""Per-layer inputs (Gemma 4's per-layer embeddings): measured, generated, tested both ways.

The reference is transformers itself: ``Gemma4TextModel.get_per_layer_inputs`` /
``project_per_layer_inputs`` compute what each layer receives, and the decoder layer mixes it in
after attention and feed-forward, before its ``layer_scalar``. Gemma 3n takes a per-layer input too,
but mixes it into one of its AltUp streams: the measurement leaves it to the ordinary analysis, which
names the AltUp streams.
"""

from __future__ import annotations

import ast
import sys
import types

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, Gemma4TextConfig, LlamaConfig

from onboardlm.errors import UnsupportedFeature
from onboardlm.models.factory import load_checkpoint_into
from onboardlm.onboard.analyze import analyze
from onboardlm.onboard.analyze_perlayer import layer_extra_inputs, measure_per_layer_inputs
from onboardlm.onboard.config_variants import candidate_variants
from onboardlm.onboard.generate import generate_model_file
from onboardlm.testing import transfer_weights
from onboardlm.testing.capture import Call


def _gemma4_text(**overrides) -> Gemma4TextConfig:
    fields = dict(
        vocab_size=100,
        vocab_size_per_layer_input=90,  # rows apart from the vocabulary: the field is told by them
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        hidden_size_per_layer_input=12,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        sliding_window=8,
    )
    return Gemma4TextConfig(**{**fields, **overrides})


def _model(config):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def measured():
    config = _gemma4_text()
    model = _model(config)
    found = measure_per_layer_inputs(config, model)
    assert found is not None
    return config, model, *found


def test_the_decoder_layer_takes_its_per_layer_input_beside_the_hidden_states(measured) -> None:
    _, model, _, _ = measured
    assert layer_extra_inputs(model.model.layers[0]) == ["per_layer_input"]  # not shared_kv_states


def test_measured_modules_scales_and_fields(measured) -> None:
    _, _, spec, _ = measured
    assert spec.argument == "per_layer_input"
    assert spec.width == "hidden_size_per_layer_input"
    assert spec.rows == "config.vocab_size_per_layer_input"
    assert (spec.table, spec.projection, spec.projection_norm) == (
        "embed_tokens_per_layer",
        "per_layer_model_projection",
        "per_layer_projection_norm",
    )
    assert spec.table_scale == "config.hidden_size_per_layer_input**0.5"
    assert spec.table_class == "Gemma4TextScaledWordEmbedding"
    assert spec.projection_scale == "config.hidden_size**-0.5"
    assert spec.combine_scale == "2**-0.5"
    assert (spec.gate, spec.up, spec.norm, spec.act_attr) == (
        "per_layer_input_gate",
        "per_layer_projection",
        "post_per_layer_input_norm",
        "act_fn",
    )
    assert spec.act == "config.hidden_activation"


def test_the_rest_is_measured_on_the_config_without_them(measured) -> None:
    config, model, _, stripped = measured
    assert stripped.hidden_size_per_layer_input == 0 and config.hidden_size_per_layer_input == 12
    keys = set(_model(stripped).state_dict())
    dropped = set(model.state_dict()) - keys
    assert keys < set(model.state_dict())
    assert {key.split(".")[-2] for key in dropped} == {
        "embed_tokens_per_layer",
        "per_layer_model_projection",
        "per_layer_projection_norm",
        "per_layer_input_gate",
        "per_layer_projection",
        "post_per_layer_input_norm",
    }


def test_the_measured_expressions_compute_what_transformers_gives_each_layer(measured) -> None:
    config, model, spec, _ = measured
    inner = model.model
    ids = torch.randint(
        1, config.vocab_size_per_layer_input, (2, 5), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        embeds = inner.embed_tokens(ids)
        expected = inner.project_per_layer_inputs(embeds, inner.get_per_layer_inputs(ids, embeds))
        namespace = {"config": config}
        shape = (2, 5, config.num_hidden_layers, config.hidden_size_per_layer_input)
        table = getattr(inner, spec.table)
        tokens = table.weight[ids] * eval(spec.table_scale, namespace)
        projected = getattr(inner, spec.projection)(embeds) * eval(spec.projection_scale, namespace)
        projected = getattr(inner, spec.projection_norm)(projected.reshape(shape))
        actual = (projected + tokens.reshape(shape)) * eval(spec.combine_scale)
    torch.testing.assert_close(actual, expected)


def test_analyze_carries_them_and_the_rest_is_gemma4s_layer() -> None:
    spec = analyze(AutoConfig.for_model("gemma4_text"))
    assert spec.per_layer_input is not None and spec.per_layer_input.width == "hidden_size_per_layer_input"
    assert spec.decoder.output_scale == "layer_scalar"
    assert any(note.startswith("per-layer inputs") for note in spec.notes)


@pytest.fixture(scope="module")
def lean_module():
    source = generate_model_file(analyze(_gemma4_text()))
    module = types.ModuleType("_lean_gemma4_text_per_layer")
    sys.modules[module.__name__] = module
    try:
        exec(compile(source, "<lean gemma4_text>", "exec"), module.__dict__)  # noqa: S102 - generated here
        yield source, module
    finally:
        sys.modules.pop(module.__name__, None)


def test_the_lean_file_keeps_both_ways_and_a_variant_tests_the_other(lean_module) -> None:
    source, _ = lean_module
    tree = ast.parse(source)
    tests = [ast.unparse(node.test) for node in ast.walk(tree) if isinstance(node, ast.If)]
    assert tests.count("config.hidden_size_per_layer_input") == 2  # the model's modules and the layer's
    labels = [variant.label for variant in candidate_variants(_gemma4_text(), source)]
    assert "hidden_size_per_layer_input=0" in labels


@pytest.mark.parametrize("width", [12, 0])
def test_lean_logits_and_per_layer_inputs_equal_transformers(lean_module, width: int) -> None:
    _, lean = lean_module
    config = _gemma4_text(hidden_size_per_layer_input=width)
    reference = _model(config)
    for module in reference.modules():  # layer_scalar and norm weights away from their init
        for name, tensor in [*module.named_buffers(recurse=False), *module.named_parameters(recurse=False)]:
            if name == "layer_scalar" or (name == "weight" and tensor.dim() == 1):
                tensor.data.uniform_(0.5, 1.5)
    model = lean.Gemma4ForCausalLM(_gemma4_text(hidden_size_per_layer_input=width)).eval()
    transfer_weights(reference, model)
    ids = torch.randint(
        1, config.vocab_size_per_layer_input, (2, 7), generator=torch.Generator().manual_seed(2)
    )
    positions = torch.arange(7)[None].expand(2, 7)
    with torch.no_grad():
        expected = reference(input_ids=ids, position_ids=positions, use_cache=False).logits
        actual = model(input_ids=ids, position_ids=positions).logits
        if width:
            inner, embeds = reference.model, reference.model.embed_tokens(ids)
            per_layer = inner.project_per_layer_inputs(embeds, inner.get_per_layer_inputs(ids, embeds))
            torch.testing.assert_close(model.model.per_layer_inputs(ids, embeds), per_layer)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def test_lean_per_layer_inputs_need_the_token_ids(lean_module) -> None:
    _, lean = lean_module
    model = lean.Gemma4ForCausalLM(_gemma4_text()).eval()
    with pytest.raises(ValueError, match="input_ids"):
        model(None, torch.arange(3)[None], inputs_embeds=torch.randn(1, 3, 64))


def test_gemma3n_per_layer_inputs_mixed_into_altup_streams_are_left_to_the_analysis() -> None:
    config = AutoConfig.for_model("gemma3n_text")
    from onboardlm.testing import tiny_config

    tiny = tiny_config(config)
    assert measure_per_layer_inputs(tiny, _model(tiny)) is None
    with pytest.raises(UnsupportedFeature, match="AltUp"):
        analyze(config)


def test_a_model_without_them_is_not_measured() -> None:
    config = LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    assert measure_per_layer_inputs(config, _model(config)) is None


def test_a_recorded_call_gives_an_argument_by_keyword_or_position() -> None:
    value = torch.ones(1)
    assert Call((torch.zeros(1), value), {}, None).argument("per_layer_input", 1) is value
    assert Call((torch.zeros(1),), {"per_layer_input": value}, None).argument("per_layer_input", 1) is value
    assert Call((torch.zeros(1),), {}, None).argument("per_layer_input", 1) is None


def test_scales_name_the_width_field_where_another_field_has_its_value() -> None:
    """head_dim equal to the per-layer width: the table scale is still the width field's square root."""
    config = _gemma4_text(head_dim=12)
    found = measure_per_layer_inputs(config, _model(config))
    assert found is not None
    assert found[0].table_scale == "config.hidden_size_per_layer_input**0.5"


def test_a_run_with_fewer_layers_loads_the_first_layers_per_layer_columns(lean_module) -> None:
    """The e2e reduced run: a 3-layer checkpoint into a 2-layer lean model keeps the first two layers'
    columns of the per-layer table and projection (transformers' own loader refuses the shapes)."""
    _, lean = lean_module
    kinds = ["sliding_attention", "full_attention", "full_attention"]
    reference = _model(_gemma4_text(layer_types=kinds))
    state = reference.state_dict()
    model = lean.Gemma4ForCausalLM(_gemma4_text(num_hidden_layers=2, layer_types=kinds[:2]))
    report = load_checkpoint_into(model.eval(), dict(state), subject="3-layer checkpoint")
    assert report.notes and "beyond num_hidden_layers" in report.notes[0]
    shallow = _model(_gemma4_text(num_hidden_layers=2, layer_types=kinds[:2]))
    columns = 2 * 12
    expected_state = {k: v for k, v in state.items() if ".layers.2." not in k}
    expected_state["model.embed_tokens_per_layer.weight"] = state["model.embed_tokens_per_layer.weight"][
        :, :columns
    ]
    expected_state["model.per_layer_model_projection.weight"] = state[
        "model.per_layer_model_projection.weight"
    ][:columns]
    shallow.load_state_dict(expected_state)
    ids = torch.randint(1, 90, (1, 6), generator=torch.Generator().manual_seed(3))
    positions = torch.arange(6)[None]
    with torch.no_grad():
        expected = shallow(input_ids=ids, position_ids=positions, use_cache=False).logits
        actual = model(input_ids=ids, position_ids=positions).logits
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def test_kv_sharing_is_refused_by_the_lean_file(lean_module) -> None:
    """num_kv_shared_layers > 0 (Gemma 4 E2B/E4B): the last layers reuse an earlier layer's keys and
    values in transformers; the lean file, which computes them on every layer, refuses the config."""
    source, lean = lean_module
    assert "if config.num_kv_shared_layers:" in source
    kinds = ["sliding_attention", "full_attention"] * 2
    with pytest.raises(NotImplementedError, match="num_kv_shared_layers"):
        lean.Gemma4ForCausalLM(_gemma4_text(num_hidden_layers=4, layer_types=kinds, num_kv_shared_layers=2))
