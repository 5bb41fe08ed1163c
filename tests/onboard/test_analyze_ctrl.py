"""CTRL's parts measured from transformers (issue 13): four hidden -> hidden attention projections
whose names say nothing (their q/k/v/output roles measured), a feed-forward built as an
``nn.Sequential``, and fixed sinusoidal positions kept as a buffer on the model.

Expected values are facts of the transformers implementation (``Wq`` feeds the queries, the table is
transformers' own ``positional_encoding``), not outputs of the analyzer.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.ctrl.modeling_ctrl import positional_encoding

from onboardlm.onboard.analyze import analyze
from onboardlm.onboard.analyze_classic import projections, separate_qkv_roles
from onboardlm.onboard.generate import generate_model_file
from onboardlm.testing import tiny_config
from onboardlm.testing.capture import record_calls


@pytest.fixture(scope="module")
def spec():
    return analyze(AutoConfig.for_model("ctrl"))


def test_separate_projection_roles_measured_not_named() -> None:
    config = tiny_config(AutoConfig.for_model("ctrl"))
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    path = "transformer.h.0.multi_head_attention"
    attn = model.get_submodule(path)
    input_ids = torch.arange(1, 7)[None]
    (call,) = record_calls(
        model, [path], input_ids=input_ids, position_ids=torch.arange(6)[None], use_cache=False
    )[path]
    linears = projections(attn)
    roles = separate_qkv_roles(attn, linears, (call.args, call.kwargs), config.hidden_size)
    assert roles == ("Wq", "Wk", "Wv", "dense")
    # renamed, the roles follow the modules, not the names
    renamed = {"a": linears["Wv"], "b": linears["dense"], "c": linears["Wq"], "d": linears["Wk"]}
    assert separate_qkv_roles(attn, renamed, (call.args, call.kwargs), config.hidden_size) == (
        "c",
        "d",
        "a",
        "b",
    )


def test_ctrl_spec(spec) -> None:
    attention = spec.attention
    assert [p.name for p in attention.projections] == ["Wq", "Wk", "Wv"]
    assert attention.out.name == "dense" and not attention.fused_qkv
    ff = spec.feed_forward
    assert ff.sequential and (ff.inputs[0].name, ff.act_attr, ff.down.name) == ("0", "1", "2")
    assert ff.intermediate == "config.dff"
    positions = spec.embedding.positions
    assert (positions.attr, positions.sinusoidal_base, positions.denominator) == (
        "pos_encoding",
        10000.0,
        "half",
    )
    assert spec.embedding.scale == "config.hidden_size**0.5"


def test_ctrl_lean_positions_and_feed_forward_equal_transformers(spec) -> None:
    namespace: dict = {}
    exec(compile(generate_model_file(spec), "modeling_ctrl.py", "exec"), namespace)  # noqa: S102
    config = tiny_config(AutoConfig.for_model("ctrl"))
    positions = namespace["CTRLSinusoidalPositions"](config)
    ids = torch.arange(40)[None]
    expected = positional_encoding(40, config.hidden_size, torch.float)[None]
    torch.testing.assert_close(
        positions(torch.zeros(1, 40, config.hidden_size), ids), expected, atol=1e-5, rtol=1e-5
    )
    ffn = namespace["CTRLFeedForward"](config)
    assert isinstance(ffn, nn.Sequential)
    assert set(ffn.state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_layer_norm_epsilon_hard_coded_in_the_layers_only(spec) -> None:
    config = tiny_config(AutoConfig.for_model("ctrl"))
    config.layer_norm_epsilon = 1e-3
    model = AutoModelForCausalLM.from_config(config)
    assert model.transformer.h[0].layernorm1.eps == 1e-6  # transformers' EncoderLayer hard-codes it
    assert model.transformer.layernorm.eps == 1e-3
    assert spec.decoder.norm.eps == "1e-06"
    assert spec.head.final_norm_eps == "config.layer_norm_epsilon"


def test_torch_layer_norms_get_a_block_test() -> None:
    import transformers.models.ctrl.modeling_ctrl as hf_module

    from onboardlm.onboard.testgen import read_layout

    config = tiny_config(AutoConfig.for_model("ctrl"))
    reference = AutoModelForCausalLM.from_config(config)
    groups = {group.cls: group for group in read_layout(reference, config, hf_module).blocks}
    norms = groups["nn.LayerNorm"]
    assert (norms.role, norms.test_name) == ("norm", "test_block_torch_layer_norm")
    # the layers of the one layer kind the test checks (layer 0)
    assert set(norms.paths) == {"transformer.h.0.layernorm1", "transformer.h.0.layernorm2"}
