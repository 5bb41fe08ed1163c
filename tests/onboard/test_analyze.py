"""ArchitectureSpec measured from transformers models, and UnsupportedFeature for what no template covers.

Expected values are facts of the transformers implementations (e.g. Gemma2 norms scale by
``1 + weight``, Phi runs attention and MLP in parallel), not outputs of the analyzer.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from onboardlm.errors import UnsupportedFeature
from onboardlm.onboard import analyze as analyze_module
from onboardlm.onboard.analyze import analyze
from onboardlm.onboard.generate import generate_model_file


@pytest.fixture(scope="module")
def specs() -> dict:
    names = [
        "llama",
        "gemma2",
        "gemma3_text",
        "phi",
        "phi3",
        "olmo2",
        "granite",
        "cohere",
        "smollm3",
        "qwen2",
        "mistral",
        "glm",
        "exaone4",
    ]
    return {name: analyze(AutoConfig.for_model(name)) for name in names}


def test_llama_is_plain_pre_norm_gqa(specs: dict) -> None:
    spec = specs["llama"]
    assert (spec.config_class, spec.causal_lm_class, spec.model_class) == (
        "LlamaConfig",
        "LlamaForCausalLM",
        "LlamaModel",
    )
    assert spec.decoder.norm.kind == "rms" and spec.decoder.norm.offset == 0.0
    assert (spec.decoder.attn_pre, spec.decoder.mlp_pre) == ("input_layernorm", "post_attention_layernorm")
    assert not spec.decoder.parallel and spec.decoder.attn_post is None and spec.decoder.mlp_post is None
    assert [p.name for p in spec.attention.projections] == ["q_proj", "k_proj", "v_proj"]
    assert spec.attention.out.bias == "config.attention_bias"
    assert spec.feed_forward.kind == "gated" and [p.name for p in spec.feed_forward.inputs] == [
        "gate_proj",
        "up_proj",
    ]
    assert spec.feed_forward.inputs[0].bias == "config.mlp_bias"
    assert spec.rope is not None and spec.rope.style == "neox" and not spec.rope.partial
    assert spec.head.logits_op == "none" and not spec.head.lm_head_bias


def test_gemma2_sandwich_norms_softcaps_and_scaling(specs: dict) -> None:
    spec = specs["gemma2"]
    assert spec.decoder.norm.offset == 1.0
    layout = (spec.decoder.attn_pre, spec.decoder.attn_post, spec.decoder.mlp_pre, spec.decoder.mlp_post)
    assert layout == (
        "input_layernorm",
        "post_attention_layernorm",
        "pre_feedforward_layernorm",
        "post_feedforward_layernorm",
    )
    assert spec.attention.softcap == "config.attn_logit_softcapping"
    assert spec.attention.scaling == "config.query_pre_attn_scalar**-0.5"
    assert spec.attention.sliding == "layer_types"
    assert spec.head.logits_op == "softcap" and spec.embedding.scale == "config.hidden_size**0.5"
    assert spec.feed_forward.act == "config.hidden_activation"


def test_gemma3_per_layer_type_rope_and_head_qk_norm(specs: dict) -> None:
    spec = specs["gemma3_text"]
    assert spec.rope is not None and spec.rope.per_layer_type
    assert spec.attention.qk_norm is not None and spec.attention.qk_norm.offset == 1.0
    assert spec.attention.qk_norm_per_head
    assert spec.embedding.scaled_class == "Gemma3TextScaledWordEmbedding"


def test_phi_parallel_layernorm_partial_rope_and_head_bias(specs: dict) -> None:
    spec = specs["phi"]
    assert spec.decoder.parallel and spec.decoder.attn_pre == "input_layernorm"
    assert spec.decoder.norm.kind == "layer" and spec.decoder.norm.builtin and spec.decoder.norm.bias
    assert spec.rope is not None and spec.rope.partial
    assert spec.attention.out.name == "dense" and spec.feed_forward.kind == "plain"
    assert spec.head.lm_head_bias and spec.head.final_norm_attr == "final_layernorm"


def test_phi3_fused_projections(specs: dict) -> None:
    spec = specs["phi3"]
    assert spec.attention.fused_qkv and spec.attention.projections[0].name == "qkv_proj"
    assert spec.feed_forward.kind == "fused_gated" and spec.feed_forward.inputs[0].name == "gate_up_proj"


def test_olmo2_post_norm_and_projection_qk_norm(specs: dict) -> None:
    spec = specs["olmo2"]
    assert spec.decoder.attn_pre is None and spec.decoder.attn_post == "post_attention_layernorm"
    assert spec.decoder.mlp_post == "post_feedforward_layernorm"
    assert spec.attention.qk_norm is not None and not spec.attention.qk_norm_per_head


def test_granite_multipliers(specs: dict) -> None:
    spec = specs["granite"]
    assert spec.attention.scaling == "config.attention_multiplier"
    assert spec.decoder.residual_multiplier == "config.residual_multiplier"
    assert spec.embedding.scale == "config.embedding_multiplier"
    assert (spec.head.logits_op, spec.head.logits_value) == ("divide", "config.logits_scaling")


def test_cohere_interleaved_rope_parallel_mean_centred_norm(specs: dict) -> None:
    spec = specs["cohere"]
    assert spec.rope is not None and spec.rope.style == spec.rope.table_layout == "interleaved"
    assert spec.decoder.parallel and spec.decoder.norm.kind == "layer" and not spec.decoder.norm.bias
    assert spec.head.logits_op == "multiply"


def test_glm_rotates_pairs_from_neox_tables(specs: dict) -> None:
    rope = specs["glm"].rope
    assert rope is not None and (rope.style, rope.table_layout, rope.partial) == ("interleaved", "neox", True)


def test_nope_layers_sliding_window_and_literal_biases(specs: dict) -> None:
    assert specs["smollm3"].attention.rope_flag == "config.no_rope_layers[layer_idx]"
    assert specs["exaone4"].attention.rope_flag == 'config.layer_types[layer_idx] == "sliding_attention"'
    assert specs["mistral"].attention.sliding == "all"
    qwen2 = specs["qwen2"].attention
    assert [p.bias for p in qwen2.projections] == ["True"] * 3 and qwen2.out.bias == "False"


def test_unknown_architecture_names_the_module() -> None:
    with pytest.raises(UnsupportedFeature) as raised:
        analyze(AutoConfig.for_model("zaya"))  # a short convolution on the q/k/v projections
    assert raised.value.module_path == "model.layers.0.self_attn.qkv_proj"


def test_dynamic_rope_per_layer_type_is_refused() -> None:
    """Gemma3 with dynamic NTK on its global layers: no template computes per-type dynamic tables."""
    tables = {
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        "full_attention": {"rope_type": "dynamic", "rope_theta": 1e6, "factor": 2.0},
    }
    spec = analyze(AutoConfig.for_model("gemma3_text", rope_parameters=tables))
    with pytest.raises(UnsupportedFeature, match="dynamic") as raised:
        generate_model_file(spec)
    assert raised.value.module_path == "model.rotary_emb"


class _Gate(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(hidden))


def test_injected_unknown_module_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    build = AutoModelForCausalLM.from_config

    def with_extra_module(config, **kwargs):
        model = build(config, **kwargs)
        model.model.layers[0].extra_gate = _Gate(config.hidden_size)
        return model

    monkeypatch.setattr(analyze_module.AutoModelForCausalLM, "from_config", with_extra_module)
    with pytest.raises(UnsupportedFeature) as raised:
        analyze(AutoConfig.for_model("llama"))
    assert raised.value.module_path == "model.layers.0.extra_gate"


class _ScaledNorm(nn.Module):
    """A norm no template covers: RMS statistics, but the output is squared."""

    def __init__(self, hidden: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).pow(2) * self.weight


def test_unknown_norm_formula_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    build = AutoModelForCausalLM.from_config

    def with_odd_norm(config, **kwargs):
        model = build(config, **kwargs)
        model.model.norm = _ScaledNorm(config.hidden_size, config.rms_norm_eps)
        return model

    monkeypatch.setattr(analyze_module.AutoModelForCausalLM, "from_config", with_odd_norm)
    with pytest.raises(UnsupportedFeature, match="neither RMSNorm nor LayerNorm") as raised:
        analyze(AutoConfig.for_model("llama"))
    assert raised.value.module_path == "model.norm"


def test_checkpoint_dtype_does_not_change_the_spec() -> None:
    """A bf16 checkpoint config is measured in fp32 and gives the same spec."""
    assert analyze(AutoConfig.for_model("qwen3", dtype="bfloat16")) == analyze(AutoConfig.for_model("qwen3"))


def test_attention_wiring_no_template_covers_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """An attention that rotates q/k by twice the angle of its tables: the attention probe refuses it
    (NanoChat's rotation by minus the angle, with q/k norms after RoPE, is now a template)."""
    from transformers.models.llama import modeling_llama

    rotate = modeling_llama.apply_rotary_pos_emb

    def double_angle(q, k, cos, sin, unsqueeze_dim=1):
        return rotate(q, k, cos * cos - sin * sin, 2 * sin * cos, unsqueeze_dim)

    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", double_angle)
    with pytest.raises(UnsupportedFeature, match="attention output matches no template") as raised:
        analyze(AutoConfig.for_model("llama"))
    assert raised.value.module_path == "model.layers.0.self_attn"


def test_analysis_leaves_the_callers_random_state_alone() -> None:
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    analyze(AutoConfig.for_model("llama"))
    torch.testing.assert_close(torch.rand(3), expected)


def test_a_failing_probe_names_the_module_the_probe_and_the_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """An error no transformers frame explains names the module being measured, the analyzer probe and
    the failing call, never just "analysis failed (KeyError: ...)"."""

    class Tables(nn.Module):
        def forward(self, layer_type: str) -> None:
            return {"sliding_attention": None}[layer_type]

    monkeypatch.setattr(
        analyze_module._Analyzer, "_attention_softcap", lambda self: Tables()("full_attention")
    )
    with pytest.raises(UnsupportedFeature) as caught:
        analyze(AutoConfig.for_model("llama"))
    message = str(caught.value)
    assert caught.value.module_path == "model.layers.0.self_attn"
    assert re.search(r"probe _attention\w* \(analyze\.py:\d+\)", message)
    assert "in Tables, test_analyze.py:" in message
    assert "KeyError: 'full_attention'" in message and "analysis failed" not in message


def test_extra_hidden_streams_are_refused_in_one_line() -> None:
    """Gemma 3n's AltUp: lists of square hidden->hidden linears beside the layers carry extra copies
    of the hidden state; one line names both lists and the feature."""
    with pytest.raises(UnsupportedFeature) as raised:
        analyze(AutoConfig.for_model("gemma3n_text"))
    assert raised.value.module_path == "model.altup_projections"
    feature = raised.value.feature
    assert "3 extra copies of the hidden state carried beside model.layers" in feature
    assert "model.altup_projections, model.altup_unembed_projections" in feature and "AltUp" in feature
    assert "also" not in feature


def test_hard_coded_activation_is_the_closest_match() -> None:
    """MPT's MLP hard-codes exact GELU; on small random weights the tanh form is within 1e-5 too."""
    spec = analyze(AutoConfig.for_model("mpt"))  # attention settings in the attn_config part sub-config
    assert spec.feed_forward.act == '"gelu"' and spec.attention.alibi


def test_part_settings_that_change_the_layer_are_refused_by_the_file() -> None:
    """MPT's attn_config.clip_qkv and softmax_scale change the attention (measured: set on a rebuilt
    layer); its qk_ln and alibi do not in transformers. The shipped file refuses the first two."""
    from onboardlm.models.custom.modeling_mpt import MptForCausalLM

    spec = analyze(AutoConfig.for_model("mpt"))
    assert spec.decoder.refused == (
        ("config.attn_config.clip_qkv is not None", "config.attn_config.clip_qkv=set"),
        ("config.attn_config.softmax_scale is not None", "config.attn_config.softmax_scale=set"),
    )
    tiny = {"d_model": 64, "n_heads": 4, "n_layers": 2, "vocab_size": 256}
    with pytest.raises(NotImplementedError, match="clip_qkv"):
        MptForCausalLM(AutoConfig.for_model("mpt", **tiny, attn_config={"clip_qkv": 8.0}))
    MptForCausalLM(AutoConfig.for_model("mpt", **tiny))  # the defaults build


def test_gpt_neo_wrapped_unscaled_attention_with_a_measured_window() -> None:
    """GPT-Neo: attn wraps attn.attention, scores are not scaled, and 'local' layers apply a window
    inside the module (no sliding_window field): each found by measurement."""
    attention = analyze(AutoConfig.for_model("gpt_neo")).attention
    assert (attention.attr, attention.inner_attr, attention.wrapper_class) == (
        "attn",
        "attention",
        "GPTNeoAttention",
    )
    assert attention.class_name == "GPTNeoSelfAttention" and attention.scaling == "1.0"
    assert (
        attention.sliding_expr
        == "config.window_size if config.attention_layers[layer_idx] == 'local' else None"
    )


def test_lm_head_bias_follows_the_flag_that_switches_it() -> None:
    """ERNIE-4.5's ``use_bias`` adds the head's bias: the spec keeps the flag, not the tiny config's False."""
    spec = analyze(AutoConfig.for_model("ernie4_5_moe"))
    assert spec.head.lm_head_bias == "config.use_bias"
