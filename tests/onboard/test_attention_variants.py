"""Attention and MLP variants measured from transformers models: output gates (AFMoE, MiniCPM5-MoE),
norms inside the attention and the MLP (BitNet), learned activations (Apertus' xIELU), q/k norms after
an inverse RoPE with the final norm also on the embeddings (NanoChat), differential attention
(DiffLlama, here with grouped KV heads), MiniCPM3's depth-scaled residuals, embedding scale field and
logit divisor the config derives, an attention output bias on some layers only (GPT-NeoX-Japanese's
last-layer ``dense_bias``), and MoE layers named by a per-layer config list or a
dense-layer count.

Expected values are facts of the transformers implementations; each generated file is also run
against its transformers model (the independent reference) on the tiny config.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from onboardlm.errors import UnsupportedFeature
from onboardlm.onboard.analyze import analyze
from onboardlm.onboard.generate import generate_model_file
from onboardlm.testing import assert_rmse_close, tiny_config, transfer_weights
from onboardlm.testing.reference import installed_model_type, missing_reference_reason, reference_params

#: (model_type, config overrides): AFMoE with every layer dense keeps its gated attention without
#: its MoE router (not measured yet).
CASES = {
    "afmoe": {"num_dense_layers": 100},
    "minicpm5_moe": {},
    "bitnet": {},
    "apertus": {},
    "nanochat": {},
    "ministral3": {},
    "diffllama": {"num_key_value_heads": 16},
    "minicpm3": {},
    "gpt_neox_japanese": {"num_hidden_layers": 3},
    "laguna": {},
    "mimo_v2_flash": {},
}
#: Fields set on the tiny config of the generated-model comparison: Ministral3's q scale by position
#: is 1 below ``original_max_position_embeddings``; a period of 2 makes the test's positions use it.
TINY_ROPE = {"ministral3": {"original_max_position_embeddings": 2}}


class _Specs(dict):
    """Each case's spec, analyzed when a test first asks for it; skipped where the installed
    transformers has no such model type."""

    def __missing__(self, name: str) -> object:
        if installed_model_type(name) is None:
            pytest.skip(missing_reference_reason(name))
        self[name] = analyze(AutoConfig.for_model(name, **CASES[name]))
        return self[name]


@pytest.fixture(scope="module")
def specs() -> dict:
    return _Specs()


def test_separate_output_gate(specs: dict) -> None:
    attention = specs["afmoe"].attention
    assert attention.output_gate == "separate" and attention.gate is not None
    assert attention.gate.name == "gate_proj"
    assert [p.name for p in attention.projections] == ["q_proj", "k_proj", "v_proj"]
    assert attention.out.name == "o_proj"


def test_output_gate_per_head_in_the_q_projection(specs: dict) -> None:
    spec = specs["minicpm5_moe"]
    assert spec.attention.output_gate == "per_head" and spec.attention.gate is None
    assert [p.name for p in spec.attention.projections] == ["q_gate_proj", "k_proj", "v_proj"]
    assert spec.feed_forward.layer_condition == "config.mlp_layer_types[layer_idx] == 'sparse'"


def test_output_gate_of_one_value_per_head(specs: dict) -> None:
    """Laguna: ``g_proj`` gives one value per head and token; softplus of it (in fp32) scales each
    head's output (the activation measured, not read from the code); the MoE router's logits are
    tanh soft-capped by a float field found by rebuilding the router with it set."""
    spec = specs["laguna"]
    attention = spec.attention
    assert attention.output_gate == "head_scalar" and attention.gate_activation == "softplus"
    assert attention.gate is not None and attention.gate.name == "g_proj"
    assert [p.name for p in attention.projections] == ["q_proj", "k_proj", "v_proj"]
    assert spec.feed_forward.router.logit_softcap_field == "moe_router_logit_softcapping"
    assert all(
        spec.attention.gate_activation == "sigmoid" for name, spec in specs.items() if name != "laguna"
    )


def test_value_heads_of_their_own_width_scale_and_per_layer_kv_heads(specs: dict) -> None:
    """MiMo-V2-Flash: value heads of ``v_head_dim`` channels (keys of ``head_dim``), values times
    ``attention_value_scale`` (found by the probe among the float fields), twice the KV heads and
    per-head sinks on the sliding-window layers only (the layer-type list placing both)."""
    attention = specs["mimo_v2_flash"].attention
    assert attention.v_head_dim == "config.v_head_dim"
    assert attention.value_scale == "config.attention_value_scale"
    sliding = 'config.layer_types[layer_idx] == "sliding_attention"'
    assert attention.sinks and attention.sinks_flag == sliding
    assert attention.kv_heads == (
        f"config.num_key_value_heads * 2 if {sliding} else config.num_key_value_heads"
    )
    others = [spec.attention for name, spec in specs.items() if name != "mimo_v2_flash"]
    assert all(a.v_head_dim is None and a.value_scale is None and a.sinks_flag is None for a in others)


def test_norms_inside_attention_and_mlp(specs: dict) -> None:
    spec = specs["bitnet"]
    assert spec.attention.out_norm is not None and spec.attention.out_norm_name == "attn_sub_norm"
    assert spec.feed_forward.inner_norm is not None and spec.feed_forward.inner_norm_name == "ffn_sub_norm"
    assert spec.attention.out_norm.kind == spec.feed_forward.inner_norm.kind == "rms"
    assert spec.attention.output_gate == "none"


def test_learned_activation(specs: dict) -> None:
    mlp = specs["apertus"].feed_forward
    assert mlp.kind == "plain" and mlp.act_module == "ACT2CLS[config.hidden_act](dtype=config.dtype)"
    assert specs["bitnet"].feed_forward.act_module is None  # a parameter-free activation


def test_q_scale_by_position(specs: dict) -> None:
    attention = specs["ministral3"].attention
    assert attention.position_scale == (
        'config.rope_parameters["llama_4_scaling_beta"]',
        'config.rope_parameters["original_max_position_embeddings"]',
    )
    assert all(spec.attention.position_scale is None for name, spec in specs.items() if name != "ministral3")


def test_differential_attention(specs: dict) -> None:
    """The four lambda vectors pair as transformers' exp(q1.k1) - exp(q2.k2) (found by the probe, not
    by their names); the weightless per-pair RMSNorm is measured with the config's epsilon."""
    attention = specs["diffllama"].attention
    a, b, c, d = attention.differential
    assert {a, b} == {"lambda_q1", "lambda_k1"} and {c, d} == {"lambda_q2", "lambda_k2"}
    assert attention.differential_norm_name == "groupnorm"
    norm = attention.differential_norm
    assert norm.kind == "rms" and not norm.weight and norm.eps == "config.rms_norm_eps"
    assert attention.kind == "gqa" and attention.output_gate == "none" and attention.out_norm is None
    assert all(
        getattr(spec.attention, "differential", None) is None
        for name, spec in specs.items()
        if name != "diffllama"
    )


def test_depth_scaled_residuals_and_derived_scales(specs: dict) -> None:
    """MiniCPM3: each block output times scale_depth / sqrt(depth), embeddings times scale_emb, and
    the final hidden state divided by a property of the config class (hidden_size / dim_model_base)."""
    spec = specs["minicpm3"]
    assert spec.decoder.residual_multiplier == "config.scale_depth / math.sqrt(config.num_hidden_layers)"
    assert spec.embedding.scale == "config.scale_emb"
    assert (spec.head.logits_op, spec.head.logits_value) == ("divide", "config.logits_scaling")
    assert all(spec.decoder.residual_multiplier is None for name, spec in specs.items() if name != "minicpm3")


def test_output_bias_on_some_layers(specs: dict) -> None:
    """A vector only the last layer's attention holds, measured as a bias of the attention output (the
    layer adds it) and placed by an expression confirmed on a deeper rebuild of the layer class."""
    attention = specs["gpt_neox_japanese"].attention
    assert attention.out_bias == "dense_bias"
    assert attention.out_bias_flag == "layer_idx == config.num_hidden_layers - 1"
    assert all(
        getattr(spec.attention, "out_bias", "") == ""
        for name, spec in specs.items()
        if name != "gpt_neox_japanese"
    )


def test_inverse_rope_and_shared_final_norm(specs: dict) -> None:
    spec = specs["nanochat"]
    assert spec.attention.rope_inverse and spec.attention.qk_norm is not None
    assert spec.embedding.norm == spec.head.final_norm_attr == "norm"


@pytest.mark.parametrize("model_type", reference_params(list(CASES)))
def test_generated_model_matches_transformers(model_type: str, tmp_path: Path) -> None:
    config = AutoConfig.for_model(model_type, **CASES[model_type])
    path = tmp_path / f"modeling_{model_type}.py"
    path.write_text(generate_model_file(analyze(config)))
    module_spec = importlib.util.spec_from_file_location(f"generated_{model_type}", path)
    assert module_spec is not None and module_spec.loader is not None
    lean_module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(lean_module)

    tiny = tiny_config(config)
    tiny.rope_parameters = {**tiny.rope_parameters, **TINY_ROPE.get(model_type, {})}
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(
        tiny, attn_implementation="eager", dtype=torch.float32
    ).eval()
    with torch.no_grad():  # random gates, sub-norms and activation weights: none left at a neutral value
        for name, param in reference.named_parameters():
            if any(
                part in name
                for part in ("norm", "alpha", "gate_proj", "q_gate", "lambda_", "dense_bias", "g_proj")
            ):
                param.add_(torch.randn_like(param) * 0.2)
    lean_config = tiny_config(config)  # the reference's build set transformers-only fields on ``tiny``
    lean_config.rope_parameters = dict(tiny.rope_parameters)
    model = getattr(lean_module, type(reference).__name__)(lean_config).float().eval()
    transfer_weights(reference, model)
    input_ids = torch.randint(0, tiny.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    position_ids = torch.arange(12)[None].expand(2, 12)
    with torch.no_grad():
        expected = reference(input_ids=input_ids, position_ids=position_ids).logits
        actual = model(input_ids=input_ids, position_ids=position_ids).logits
    assert_rmse_close(actual, expected, rmse_ratio_tol=1e-5, msg=f"{model_type} logits")


#: model type -> (module path, words of the reason) for attention constructs no template covers.
REFUSED = {
    "jetmoe": ("model.layers.0.self_attention.experts", "module JetMoeMoA with submodules"),
    "inkling_text": ("model.layers.0.self_attn.k_sconv", "short convolution InklingShortConvolution"),
    "kolibri1_1": (  # its KV sharing is measured (test_kv_sharing.py); its indexer has no template
        "model.layers.1.self_attn.indexer",
        "a module without weights that takes query_states, key_states, attention_mask",
    ),
}


@pytest.mark.parametrize("model_type", reference_params(list(REFUSED)))
def test_attention_no_template_covers_is_named(model_type: str) -> None:
    path, words = REFUSED[model_type]
    with pytest.raises(UnsupportedFeature) as raised:
        analyze(AutoConfig.for_model(model_type))
    assert raised.value.module_path == path and words in raised.value.feature
