"""Gated delta rule and short-convolution mixers: measured specs and their emitted block classes
against transformers' own modules (the independent reference).

Expected spec values are facts of the transformers implementations: Qwen3-Next fuses q|k|v|z and
b|a per key head, Qwen3.5 keeps flat [q|k|v] and separate z, b, a projections, LFM2 chunks its
in-projection into B, C, x (B gates before the conv, C after) with every bias on ``conv_bias``.
"""

from __future__ import annotations

import importlib.util
from importlib.util import spec_from_file_location
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.export import Dim
from transformers import CONFIG_MAPPING, AutoModelForCausalLM

from onboardlm.errors import UnsupportedFeature
from onboardlm.onboard.analyze import analyze
from onboardlm.onboard.analyze_mixers import analyze_mixer, build_mixer, mixer_kind, relative_rmse
from onboardlm.onboard.generate import generate_model_file
from onboardlm.onboard.spec_mixers import GatedDeltaSpec, ShortConvSpec
from onboardlm.review import review_model_file
from onboardlm.review.catalog import RULES
from onboardlm.testing import assert_rmse_close, transfer_weights
from onboardlm.testing.reference import (
    built_by_transformers,
    installed_model_type,
    missing_reference_reason,
    requires_reference,
)
from onboardlm.testing.tiny_config import tiny_config

TYPES = ["qwen3_next", "qwen3_5_text", "qwen3_5_moe_text", "lara_mini", "olmo_hybrid", "lfm2", "lfm2_moe"]

#: Config variants the lean block must follow (the spec is measured on the tiny config only).
VARIANTS = {
    "gated_delta": {
        "linear_num_key_heads": 1,
        "linear_num_value_heads": 3,
        "linear_key_head_dim": 8,
        "linear_value_head_dim": 12,
        "linear_conv_kernel_dim": 3,
        "rms_norm_eps": 1e-3,
    },
    "short_conv": {"conv_bias": True, "conv_L_cache": 4},
}


def _tiny(model_type: str):
    config = tiny_config(CONFIG_MAPPING[model_type]())
    if model_type.startswith("lfm2"):  # the tiny copy keeps only attention layers
        config.layer_types = ["conv", "full_attention"]
    if model_type == "olmo_hybrid":  # True (its default) doubles the write strength: test_hybrid_post_norm.py
        config.linear_allow_neg_eigval = False
    return config


class _Measured(dict):
    """Per type: (config, the transformers mixer of layer 0, its path, the measured spec); a type the
    installed release lacks, or (on a release other than the pinned one) cannot build, skips."""

    def __getitem__(self, model_type: str) -> tuple:
        if installed_model_type(model_type) is None:
            pytest.skip(missing_reference_reason(model_type))
        if model_type not in self:
            self[model_type] = built_by_transformers(lambda: _measure(model_type))
        return super().__getitem__(model_type)


def _measure(model_type: str) -> tuple:
    config = _tiny(model_type)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    layer = model.model.layers[0]
    name, module = next((n, c) for n, c in layer.named_children() if mixer_kind(c))
    path = f"model.layers.0.{name}"
    return config, module, path, analyze_mixer(config, module, path, 0)


@pytest.fixture(scope="module")
def measured() -> _Measured:
    return _Measured()


def test_qwen3_next_fuses_qkvz_and_ba_per_key_head(measured: dict) -> None:
    spec = measured["qwen3_next"][3]
    assert isinstance(spec, GatedDeltaSpec) and spec.attr == "linear_attn"
    assert [(p.name, p.parts, p.per_key_head) for p in spec.projections] == [
        ("in_proj_qkvz", ("q", "k", "v", "z"), True),
        ("in_proj_ba", ("b", "a"), True),
    ]
    assert (spec.conv, spec.out, spec.A_log, spec.dt_bias, spec.norm) == (
        "conv1d",
        "out_proj",
        "A_log",
        "dt_bias",
        "norm",
    )
    assert spec.conv_activation == "config.hidden_act" and spec.norm_before_gate
    assert (spec.num_v_heads, spec.num_k_heads, spec.head_k_dim, spec.head_v_dim, spec.kernel_size) == (
        "config.linear_num_value_heads",
        "config.linear_num_key_heads",
        "config.linear_key_head_dim",
        "config.linear_value_head_dim",
        "config.linear_conv_kernel_dim",
    )
    assert spec.norm_eps == "config.rms_norm_eps" and spec.conv_bias == "False"


def test_olmo_hybrid_keeps_every_projection_separate(measured: dict) -> None:
    spec = measured["olmo_hybrid"][3]
    assert [(p.name, p.parts) for p in spec.projections] == [
        ("q_proj", ("q",)),
        ("k_proj", ("k",)),
        ("v_proj", ("v",)),
        ("a_proj", ("a",)),
        ("b_proj", ("b",)),
        ("g_proj", ("z",)),
    ]
    assert (spec.out, spec.norm) == ("o_proj", "o_norm")
    assert spec.norm_eps == "1e-05"  # the gated norm hard-codes FLA's default, not config.rms_norm_eps


@pytest.mark.parametrize("model_type", ["qwen3_5_text", "qwen3_5_moe_text", "lara_mini"])
def test_qwen3_5_keeps_flat_qkv_and_separate_z_b_a(measured: dict, model_type: str) -> None:
    spec = measured[model_type][3]
    assert [(p.name, p.parts, p.per_key_head) for p in spec.projections] == [
        ("in_proj_qkv", ("q", "k", "v"), False),
        ("in_proj_z", ("z",), False),
        ("in_proj_b", ("b",), False),
        ("in_proj_a", ("a",), False),
    ]
    assert spec.out == "out_proj" and spec.norm_before_gate  # out_proj is as wide as in_proj_z here


@pytest.mark.parametrize("model_type", ["lfm2", "lfm2_moe"])
def test_lfm2_short_conv_gates_before_and_after_the_conv(measured: dict, model_type: str) -> None:
    spec = measured[model_type][3]
    assert isinstance(spec, ShortConvSpec) and spec.attr == "conv"
    assert spec.parts == ("pre_gate", "post_gate", "value")  # B, C, x
    assert (spec.in_proj, spec.conv, spec.out) == ("in_proj", "conv", "out_proj")
    assert spec.in_bias == spec.conv_bias == spec.out_bias == "config.conv_bias"
    assert spec.kernel_size == "config.conv_L_cache" and spec.conv_activation is None


def _variant(config, spec):
    variant = type(config)(**config.to_dict())
    for name, value in VARIANTS[spec.kind].items():
        setattr(variant, name, value)
    return variant


def _reference(module: nn.Module, config) -> nn.Module:
    torch.manual_seed(1)
    reference = type(module)(config, 0).eval()
    with torch.no_grad():  # random values in every weight (the decay and bias init are constants)
        for parameter in reference.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.2 + parameter)
    return reference


def _out(output):
    return output[0] if isinstance(output, (tuple, list)) else output


@pytest.mark.parametrize("model_type", TYPES)
@pytest.mark.parametrize("variant", [False, True])
def test_block_matches_transformers(measured: dict, model_type: str, variant: bool) -> None:
    """fp32 within an RMSE ratio of 1e-5, bf16 no further from transformers' bf16 than 2e-2, on the
    analyzed config and on a variant with other head counts, widths, kernel and biases."""
    config, module, _, spec = measured[model_type]
    config = _variant(config, spec) if variant else config
    reference = _reference(module, config)
    lean = build_mixer(spec, config, 0)
    lean.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 70, config.hidden_size)  # more than one 64-token chunk of the scan
    with torch.no_grad():
        assert relative_rmse(lean(x), _out(reference(x))) < 1e-5
        lean, reference = lean.to(torch.bfloat16), reference.to(torch.bfloat16)
        assert relative_rmse(lean(x.bfloat16()), _out(reference(x.bfloat16()))) < 2e-2


@pytest.mark.parametrize("model_type", ["qwen3_next", "qwen3_5_text", "lfm2"])
def test_block_exports_with_dynamic_batch_and_sequence(measured: dict, model_type: str) -> None:
    config, module, _, spec = measured[model_type]
    lean = build_mixer(spec, config, 0)
    lean.load_state_dict(_reference(module, config).state_dict(), strict=True)
    batch, seq = Dim("batch", min=1, max=16), Dim("seq", min=2, max=1024)
    exported = torch.export.export(
        lean, (torch.randn(2, 7, config.hidden_size),), dynamic_shapes=({0: batch, 1: seq},)
    )
    x = torch.randn(3, 67, config.hidden_size)
    with torch.no_grad():
        assert relative_rmse(exported.module()(x), lean(x)) < 1e-6
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    expected = "torch_gated_delta_rule" if spec.kind == "gated_delta" else "torch_causal_conv1d"
    assert any(expected in t for t in targets)


def test_a_mixer_no_layout_reproduces_is_refused_with_its_path(measured: dict) -> None:
    config, module, path, _ = measured["lfm2"]

    class ScaledShortConv(type(module)):  # the same parts, an extra factor the template does not have
        def forward(self, hidden_states, **kwargs):
            return 2.0 * super().forward(hidden_states, **kwargs)

    odd = ScaledShortConv(config, 0).eval()
    with pytest.raises(UnsupportedFeature, match=r"model\.layers\.0\.conv \(ScaledShortConv\).*short conv"):
        analyze_mixer(config, odd, path, 0)


def test_other_mixers_are_not_taken_for_these() -> None:
    """Mamba2 (a third per-head vector, D) and attention are no gated delta or short conv mixer."""
    config = tiny_config(CONFIG_MAPPING["mamba2"]())
    model = AutoModelForCausalLM.from_config(config)
    assert mixer_kind(model.backbone.layers[0].mixer) is None
    llama = AutoModelForCausalLM.from_config(tiny_config(CONFIG_MAPPING["llama"]()))
    assert mixer_kind(llama.model.layers[0].self_attn) is None


# --------------------------------------------------------------------------------------------------
# Whole hybrid stacks: analyze -> generate -> the generated file against transformers
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model_type", "kinds"),
    [
        ("qwen3_5_text", {"gated_delta+mlp", "attention+mlp"}),
        ("qwen3_next", {"gated_delta+moe", "attention+moe"}),
    ],
)
def test_hybrid_stack_generates_a_file_that_matches_transformers(
    model_type: str, kinds: set[str], tmp_path: Path
) -> None:
    config = CONFIG_MAPPING[model_type]()
    spec = built_by_transformers(lambda: analyze(config))
    assert spec.hybrid is not None and {kind.name for kind in spec.hybrid.kinds} == kinds
    assert spec.hybrid.selector == "config.layer_types"
    assert isinstance(spec.hybrid.block("gated_delta"), GatedDeltaSpec)
    path = tmp_path / f"modeling_{model_type}.py"
    path.write_text(generate_model_file(spec))
    source = path.read_text()
    assert "torch.ops.auto_deploy.torch_gated_delta_rule" in source or "ops.torch_gated_delta_rule(" in source
    forwards = [line for line in source.splitlines() if line.strip().startswith("def forward(")]
    assert not [f for f in forwards if "state" in f.replace("hidden_states", "") or "cache" in f]
    module = importlib.util.module_from_spec(spec_from_file_location(f"generated_{model_type}", path))
    module.__spec__.loader.exec_module(module)
    tiny = tiny_config(config)
    reference = AutoModelForCausalLM.from_config(tiny, attn_implementation="eager").eval()
    lean = getattr(module, type(reference).__name__)(tiny).eval()
    transfer_weights(reference, lean)
    input_ids = torch.randint(0, tiny.vocab_size, (2, 70))  # more than one 64-token scan chunk
    positions = torch.arange(70)[None].expand(2, 70)
    with torch.no_grad():
        expected = reference(input_ids=input_ids, position_ids=positions).logits
        actual = lean(input_ids=input_ids, position_ids=positions).logits
    assert_rmse_close(actual, expected, rmse_ratio_tol=1e-5, msg=f"{model_type} logits")
    report = review_model_file(path, None, rule_ids=[rule.id for rule in RULES if not rule.needs_tests])
    assert report.passed, [f"{f.rule_id} {f.location}: {f.reason}" for f in report.failures]


@requires_reference("lara_mini")
def test_rope_the_model_withholds_from_some_layers_follows_their_type() -> None:
    """LaRA-mini's forward hands its full-attention layers no RoPE tables (sliding ones get them)."""
    spec = analyze(CONFIG_MAPPING["lara_mini"]())
    assert spec.hybrid is not None and isinstance(spec.hybrid.block("gated_delta"), GatedDeltaSpec)
    assert spec.hybrid.block("attention").rope_flag == 'config.layer_types[layer_idx] == "sliding_attention"'
