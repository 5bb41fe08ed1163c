"""Hybrid stacks measured from transformers models: block kinds, residual steps, kind order, Mamba2.

Expected values are facts of the transformers implementations (Mamba2's mixer reads ``num_heads``,
``n_groups`` and ``state_size``; Bamba builds attention on the layers of ``attn_layer_indices``), not
outputs of the analyzer. The Mamba2 template's math is checked against transformers' own mixer.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, BambaConfig

from onboardlm.errors import UnsupportedFeature
from onboardlm.onboard.analyze import analyze
from onboardlm.onboard.analyze_hybrid import block_kind, mamba2_reference, needs_hybrid
from onboardlm.onboard.generate import generate_model_file
from onboardlm.onboard.spec_hybrid import Mamba2MixerSpec
from onboardlm.testing import tiny_config


def _tiny_model(config):  # noqa: ANN001, ANN202 - a transformers config and model
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(config), dtype=torch.float32).eval()


def test_block_kinds_of_transformers_modules() -> None:
    model = _tiny_model(AutoConfig.for_model("nemotron_h"))
    layers = model.model.layers
    assert needs_hybrid(layers)
    kinds = [block_kind(layer.mixer) for layer in layers]
    assert kinds == ["mamba2", "moe", "attention", "mlp"]  # the tiny config keeps every block type
    assert block_kind(layers[0].norm) is None
    llama = _tiny_model(AutoConfig.for_model("llama"))
    assert not needs_hybrid(llama.model.layers)
    mamba = _tiny_model(AutoConfig.for_model("mamba"))
    assert block_kind(mamba.backbone.layers[0].mixer) == "mamba1"


def _skip_without_grouped_gated_norm() -> None:
    """Before transformers 5.2x Mamba2's gated norm normalised all groups at once (no ``group_size``):
    the grouped norm the lean file and mamba_ssm use cannot be measured there."""
    from transformers.models.mamba2 import modeling_mamba2

    norm = getattr(modeling_mamba2, "Mamba2RMSNormGated", None) or modeling_mamba2.MambaRMSNormGated
    if "group_size" not in inspect.signature(norm.__init__).parameters:
        pytest.skip(f"transformers {transformers.__version__}'s Mamba2 gated norm has no groups")


def test_mamba2_spec_reads_the_config_fields_the_mixer_reads() -> None:
    _skip_without_grouped_gated_norm()
    spec = analyze(AutoConfig.for_model("mamba2"))
    assert spec.hybrid is not None and spec.hybrid.selector is None
    assert [kind.name for kind in spec.hybrid.kinds] == ["mamba2"]
    (step,) = spec.hybrid.kinds[0].steps
    assert (step.attr, step.kind, step.norm) == ("mixer", "mamba2", "norm")
    mixer = spec.hybrid.block("mamba2")
    assert isinstance(mixer, Mamba2MixerSpec)
    assert (mixer.num_heads, mixer.n_groups, mixer.state_size) == (
        "config.num_heads",
        "config.n_groups",
        "config.state_size",
    )
    assert mixer.intermediate == "int(config.expand * config.hidden_size)"
    assert (mixer.conv_kernel, mixer.conv_bias, mixer.in_bias) == (
        "config.conv_kernel",
        "config.use_conv_bias",
        "config.use_bias",
    )
    assert mixer.eps == "config.layer_norm_epsilon" and not mixer.norm_before_gate
    assert spec.head.final_norm_attr == "norm_f" and spec.embedding.attr == "embeddings"


def test_mamba2_template_math_equals_transformers_mixer() -> None:
    _skip_without_grouped_gated_norm()
    spec = analyze(AutoConfig.for_model("mamba2")).hybrid.block("mamba2")
    model = _tiny_model(AutoConfig.for_model("mamba2"))
    mixer = model.backbone.layers[0].mixer
    with torch.no_grad():
        mixer.A_log.uniform_(-0.5, 1.0)
        mixer.dt_bias.normal_(-1.0, 0.5)
        mixer.D.normal_(0.5, 0.3)
        mixer.norm.weight.normal_(1.0, 0.3)
        x = torch.randn(2, 19, model.config.hidden_size)  # longer than one SSD chunk (8)
        expected = mixer(x)
        config = model.config
        actual = mamba2_reference(mixer, spec, config.n_groups, config.state_size, x)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def test_mamba1_spec_with_and_without_dt_b_c_norms() -> None:
    mixer = analyze(AutoConfig.for_model("mamba")).hybrid.block("mamba1")
    assert (mixer.intermediate, mixer.state_size, mixer.rank) == (
        "config.intermediate_size",
        "config.state_size",
        "config.time_step_rank",
    )
    assert (mixer.x_proj, mixer.dt_proj, mixer.ssm_norms) == ("x_proj", "dt_proj", ())
    falcon = analyze(AutoConfig.for_model("falcon_mamba")).hybrid.block("mamba1")
    names = [name for name, _ in falcon.ssm_norms]
    assert names == ["dt_layernorm", "b_layernorm", "c_layernorm"]
    assert all(not norm.weight and norm.eps == "config.mixer_rms_eps" for _, norm in falcon.ssm_norms)


def test_bamba_attention_layers_selected_by_layer_types() -> None:
    spec = analyze(BambaConfig(attn_layer_indices=[9, 18, 27]))
    hybrid = spec.hybrid
    assert hybrid is not None and hybrid.selector == "config.layer_types"
    kinds = {kind.name: kind for kind in hybrid.kinds}
    assert set(kinds) == {"mamba2+mlp", "attention+mlp"}
    assert kinds["mamba2+mlp"].selectors == ("linear_attention",)
    assert kinds["attention+mlp"].selectors == ("full_attention",)
    mamba_steps = [(s.attr, s.norm) for s in kinds["mamba2+mlp"].steps]
    assert mamba_steps == [("mamba", "input_layernorm"), ("feed_forward", "pre_ff_layernorm")]
    assert [s.attr for s in kinds["attention+mlp"].steps] == ["self_attn", "feed_forward"]
    assert spec.attention is not None and spec.rope is not None and spec.rope.partial
    source = generate_model_file(spec)
    assert "torch.ops.auto_deploy" in source and "ops.torch_ssm(" in source
    assert 'self.block_type == "full_attention"' in source


def test_falcon_h1_multipliers_and_switches_are_measured() -> None:
    """Falcon-H1's µP multipliers (1.0 in its default config, set to telling values for the probes) and
    its Mamba2 switches come out as config expressions, each confirmed on a rebuilt module."""
    spec = analyze(AutoConfig.for_model("falcon_h1"))
    mixer = spec.hybrid.block("mamba2")
    assert mixer.in_scale == "config.ssm_in_multiplier"
    assert mixer.segment_scales == tuple(f"config.ssm_multipliers[{i}]" for i in range(5))
    assert mixer.norm_flag == "config.mamba_rms_norm"
    assert mixer.norm_before_gate == "config.mamba_norm_before_gate"
    assert mixer.intermediate == (
        "(int(config.mamba_expand * config.hidden_size) if config.mamba_d_ssm is None else config.mamba_d_ssm)"
    )
    mlp = spec.hybrid.block("mlp")
    assert (mlp.gate_scale, mlp.down_scale) == ("config.mlp_multipliers[0]", "config.mlp_multipliers[1]")
    assert spec.attention.scaling.endswith("* config.key_multiplier")
    (kind,) = spec.hybrid.kinds
    (parallel, _) = kind.steps
    scales = {(b.attr, b.in_scale, b.out_scale) for b in parallel.branches}
    assert scales == {
        ("mamba", None, "config.ssm_out_multiplier"),
        ("self_attn", "config.attention_in_multiplier", "config.attention_out_multiplier"),
    }


@pytest.mark.parametrize(
    ("model_type", "where", "feature"),
    [
        ("zamba2", "model.layers.1", "a layer of nested layers"),
    ],
)
def test_hybrids_without_a_template_are_refused_by_module(model_type: str, where: str, feature: str) -> None:
    with pytest.raises(UnsupportedFeature) as raised:
        analyze(AutoConfig.for_model(model_type))
    assert raised.value.module_path == where
    assert feature in str(raised.value)


def test_zamba2_shared_block_is_refused_with_what_one_forward_measures() -> None:
    """Zamba2's hybrid layer runs a transformer block (attention + MLP) on the token embeddings
    concatenated to the hidden state, and transformers ties that block across the hybrid layers (the
    same Parameter objects): the refusal names both, measured on a model with two hybrid layers."""
    from onboardlm.onboard.analyze_hybrid import _refuse_nested_layers

    config = tiny_config(AutoConfig.for_model("zamba2"))
    config.num_hidden_layers, config.hybrid_layer_ids = 3, [1, 2]
    config.layers_block_type = ["linear_attention", "hybrid", "hybrid"]
    config.use_cache = False  # as analyze_hybrid runs it: a cache of this stack needs a mask to build
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    layers = model.model.layers
    assert (
        layers[1].shared_transformer.self_attn.q_proj.weight
        is layers[2].shared_transformer.self_attn.q_proj.weight
    )
    with pytest.raises(UnsupportedFeature) as raised:
        _refuse_nested_layers("model.layers", layers, model)
    message = str(raised.value)
    assert raised.value.module_path == "model.layers.1"
    assert (
        "shared_transformer (attention + mlp, its weights the same tensors as model.layers.2.shared_transformer's"
        in message
    )
    assert "reading the token embeddings beside the hidden state" in message
    assert "mamba_decoder (mamba2)" in message and "with linear" in message
    llama = _tiny_model(AutoConfig.for_model("llama"))
    _refuse_nested_layers("model.layers", llama.model.layers, llama)  # plain layers: nothing to refuse


def test_jamba_moe_placed_by_its_own_layer_rule_in_layers_of_every_kind() -> None:
    """Jamba picks MoE or MLP per layer by ``expert_layer_period`` / ``_offset`` (read from the layer's
    ``ffn_layer_class = A if num_experts > 1 else B`` choice), apart from its attention / Mamba kinds:
    every layer class builds ``MoE if <rule> else MLP``, the rule agrees with transformers on configs
    that move the MoE layers, and a config variant moves them for the generated tests."""
    from onboardlm.onboard.config_variants import candidate_variants

    spec = analyze(AutoConfig.for_model("jamba"))
    moe = spec.hybrid.block("moe")
    assert moe.dense_class == "JambaMLP" and "config.layers_num_experts[layer_idx]" in moe.layer_condition
    source = generate_model_file(spec)
    assert source.count(f"JambaSparseMoeBlock(config)\n            if {moe.layer_condition}") == 2
    small = tiny_config(AutoConfig.for_model("jamba")).to_dict()
    for offset, period in [(0, 2), (1, 2), (2, 3)]:
        fields = {
            **small,
            "num_hidden_layers": 6,
            "expert_layer_offset": offset,
            "expert_layer_period": period,
        }
        built = AutoModelForCausalLM.from_config(transformers.JambaConfig(**fields))
        expected = [i for i, layer in enumerate(built.model.layers) if hasattr(layer.feed_forward, "experts")]
        rule = [
            i for i in range(6) if eval(moe.layer_condition, {}, {"config": built.config, "layer_idx": i})
        ]
        assert rule == expected
    labels = [v.label for v in candidate_variants(tiny_config(AutoConfig.for_model("jamba")), source)]
    assert "expert_layer_offset=1" in labels


def test_lfm2_moe_default_config_completed_with_conv_and_attention_layers() -> None:
    """LFM2-MoE's default config leaves ``layer_types`` unset, which its layers read: completed with the
    one non-attention kind its modeling code compares against or keys its masks by ("conv"), attention
    between; transformers builds it, and the stack's MoE (from ``num_dense_layers``) sits beside the
    conv / attention kinds."""
    from onboardlm.models.config_completion import _layer_kinds_named, complete_default_config

    config = AutoConfig.for_model("lfm2_moe")
    # 5.17's layers compare with "full_attention" only; its mask mapping names "conv" (later releases
    # compare with "conv" as well)
    assert "conv" in _layer_kinds_named(config)[1]
    notes = complete_default_config(config)
    assert any(note.startswith("layer_types='conv'") for note in notes)
    assert set(config.layer_types) == {"conv", "full_attention"} and config.layer_types[2] == "full_attention"
    assert complete_default_config(AutoConfig.for_model("lfm2")) == []  # its own default lists them
    spec = analyze(config)
    moe = spec.hybrid.block("moe")
    assert moe.layer_condition == "layer_idx >= config.num_dense_layers" and moe.dense_class == "Lfm2MoeMLP"
    assert moe.experts.activation == "silu"  # ``self.act_fn = F.silu``, measured
    source = generate_model_file(spec)
    assert (
        "Lfm2MoeSparseMoeBlock(config) if layer_idx >= config.num_dense_layers else Lfm2MoeMLP(config)"
        in source
    )


def test_a_mixer_that_ignores_config_time_step_limit_is_refused_naming_the_release(monkeypatch) -> None:
    """transformers 5.17's Nemotron-H mixer clamps the time step at ``(config.time_step_min, inf)``
    whatever ``config.time_step_limit`` says; later releases read the field, as the Mamba2 template
    does. Such a mixer is refused in one line naming the release; rebuilt so on any release here."""
    from transformers.models.nemotron_h import modeling_nemotron_h

    mixer = modeling_nemotron_h.NemotronHMamba2Mixer
    build = mixer.__init__

    def clamped_at_time_step_min(self, config, *args, **kwargs) -> None:  # noqa: ANN001, ANN002, ANN003
        build(self, config, *args, **kwargs)
        self.time_step_limit = (config.time_step_min, float("inf"))

    monkeypatch.setattr(mixer, "__init__", clamped_at_time_step_min)
    with pytest.raises(UnsupportedFeature) as refused:
        analyze(AutoConfig.for_model("nemotron_h"))
    assert str(refused.value).startswith(
        f"model.layers.0.mixer: unsupported feature: transformers {transformers.__version__}'s"
        " NemotronHMamba2Mixer clamps the time step to (0.001, inf), not to config.time_step_limit"
        " (0.0, inf), which it ignores"
    )
    assert "\n" not in str(refused.value)
