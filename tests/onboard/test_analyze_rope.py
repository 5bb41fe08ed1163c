"""RoPE measurements of the analyzer against transformers' own modules: q/k norms before or after the
rotation, rotary tables checked against the lean file's frequencies, rotary widths per layer type,
a RoPE base per layer (Granite-SWA)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from onboardlm.errors import UnsupportedFeature
from onboardlm.onboard import analyze as analyze_module
from onboardlm.onboard.analyze import analyze
from onboardlm.onboard.generate import emit_rope_frequencies, emit_rotary, generate_model_file
from onboardlm.onboard.spec import RopeSpec
from onboardlm.testing import assert_rmse_close, tiny_config, transfer_weights
from onboardlm.testing.reference import built_by_transformers, requires_reference


def test_qk_norm_after_rope_is_measured() -> None:
    """HunYuan normalises the rotated q/k heads; Qwen3 normalises before rotating."""
    assert analyze(AutoConfig.for_model("hunyuan_v1_dense", head_dim=128)).attention.qk_norm_after_rope
    assert not analyze(AutoConfig.for_model("qwen3")).attention.qk_norm_after_rope


def test_dynamic_rope_with_a_fixed_alpha_is_measured() -> None:
    """HunYuan's checkpoints label a static base stretched by ``alpha`` "dynamic": measured as
    "ntk_alpha" against transformers' tables; a module that treats the same parameters as plain
    dynamic NTK (Llama's) is refused, naming the key."""
    tables = {"rope_type": "dynamic", "rope_theta": 1e4, "alpha": 1000.0, "factor": 1.0}
    spec = analyze(AutoConfig.for_model("hunyuan_v1_dense", head_dim=128, rope_parameters=tables))
    assert spec.rope is not None and spec.rope.rope_types == ("ntk_alpha",)
    assert 'config.rope_parameters.get("alpha")' in generate_model_file(spec)
    with pytest.raises(UnsupportedFeature, match="reads alpha") as raised:
        analyze(AutoConfig.for_model("llama", rope_parameters=tables))
    assert raised.value.module_path == "model.rotary_emb"


@requires_reference("beam")
def test_layer_types_without_rope_parameters_have_no_rope() -> None:
    """Beam's full-attention layers have no RoPE (rope_parameters[...] is None): measured per layer type."""
    spec = analyze(AutoConfig.for_model("beam"))
    assert spec.rope is not None and spec.rope.per_layer_type
    assert spec.rope.nope_layer_types == ("full_attention",)
    assert spec.attention.rope_flag == 'config.layer_types[layer_idx] == "sliding_attention"'


def test_nope_layer_types_logits_follow_transformers(tmp_path: Path) -> None:
    """Cohere-Compass with no RoPE on its full-attention layers (as transformers' own test sets it):
    the lean file skips their table and matches transformers."""
    config = AutoConfig.for_model(
        "cohere_compass_text",
        num_hidden_layers=4,
        layer_types=["sliding_attention"] * 3 + ["full_attention"],
        rope_parameters={
            "full_attention": None,
            "sliding_attention": {"rope_type": "default", "rope_theta": 5e4},
        },
    )
    spec = built_by_transformers(lambda: analyze(config))
    assert spec.rope is not None and spec.rope.nope_layer_types == ("full_attention",)
    assert spec.attention.rope_flag == 'config.layer_types[layer_idx] == "sliding_attention"'
    path = tmp_path / "modeling_cohere_compass_nope.py"
    path.write_text(generate_model_file(spec))
    tiny = tiny_config(config)
    reference = AutoModelForCausalLM.from_config(tiny, attn_implementation="eager").eval()
    module_spec = importlib.util.spec_from_file_location("cohere_compass_nope", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    model = module.CohereCompassForCausalLM(tiny).eval()
    transfer_weights(reference, model)
    input_ids, position_ids = torch.randint(0, tiny.vocab_size, (2, 12)), torch.arange(12)[None].expand(2, 12)
    with torch.no_grad():
        expected = reference(input_ids=input_ids, position_ids=position_ids).logits
        actual = model(input_ids=input_ids, position_ids=position_ids).logits
    assert_rmse_close(actual, expected, rmse_ratio_tol=1e-5, msg="NoPE layer types")


def _lean_rotary(spec: RopeSpec, config_class: str) -> type:
    """The lean file's frequency function and rotary class, on their own."""
    arch = SimpleNamespace(rope=spec, model_attr="model", config_class=config_class)
    source = "\n".join(
        [
            "import torch",
            "from torch import nn",
            "from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS",
            f"from transformers import {config_class}",
            emit_rope_frequencies(arch),  # type: ignore[arg-type]
            emit_rotary(arch),  # type: ignore[arg-type]
        ]
    )
    namespace: dict = {}
    exec(compile(source, "<lean rotary>", "exec"), namespace)  # noqa: S102
    return namespace[spec.class_name]


def test_rotary_widths_per_layer_type_follow_transformers() -> None:
    """Laguna: a partial rotary factor per layer type (half the head on full layers, all of it on
    sliding ones); the lean rotary module returns tables of each width, equal to transformers'."""
    layers = AutoConfig.for_model("laguna").num_hidden_layers
    config = AutoConfig.for_model(
        "laguna", layer_types=["full_attention", "sliding_attention"] * (layers // 2)
    )
    tiny = tiny_config(config)
    model = AutoModelForCausalLM.from_config(tiny)
    analyzer = analyze_module._Analyzer(config, tiny, model)
    analyzer.stack = model.model
    rope = analyzer._rope(model.model, "model", ("rotary_emb", model.model.rotary_emb))
    assert rope is not None and rope.per_layer_type and rope.partial
    lean = _lean_rotary(rope, type(config).__name__)(tiny)
    x, positions = torch.randn(1, 7, tiny.hidden_size), torch.arange(7)[None] + 2
    widths = set()
    for layer_type in ("full_attention", "sliding_attention"):
        expected = model.model.rotary_emb(x, positions, layer_type)
        for got, want in zip(lean(x, positions, layer_type), expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        widths.add(expected[0].shape[-1])
    assert len(widths) == 2


def test_rope_base_per_layer_is_measured() -> None:
    """Granite-SWA: one rotary module per base in a ModuleList; the config list that gives each
    layer its base (0: no RoPE) is found on a rebuilt model with telling values."""
    spec = analyze(AutoConfig.for_model("granite_swa"))
    assert spec.rope is not None and spec.rope.base_field == "layer_rope_theta"
    assert spec.attention.rope_flag == "config.layer_rope_theta[layer_idx]"


def test_rope_base_per_layer_logits_follow_transformers(tmp_path: Path) -> None:
    """The lean file on a config with a NoPE layer and two bases, against transformers."""
    base = AutoConfig.for_model("granite_swa")
    thetas = [[0.0, 1e4, 5e5, 1e4][i % 4] for i in range(base.num_hidden_layers)]
    path = tmp_path / "modeling_granite_swa_bases.py"
    path.write_text(generate_model_file(analyze(base)))
    config = AutoConfig.for_model("granite_swa", layer_rope_theta=thetas)
    tiny = tiny_config(config)
    assert sorted(set(tiny.layer_rope_theta)) == [0.0, 1e4, 5e5]
    reference = AutoModelForCausalLM.from_config(tiny, attn_implementation="eager").eval()
    spec = importlib.util.spec_from_file_location("granite_swa_bases", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.GraniteSWAForCausalLM(tiny).eval()
    transfer_weights(reference, model)
    input_ids, position_ids = torch.randint(0, tiny.vocab_size, (2, 12)), torch.arange(12)[None].expand(2, 12)
    with torch.no_grad():
        expected = reference(input_ids=input_ids, position_ids=position_ids).logits
        actual = model(input_ids=input_ids, position_ids=position_ids).logits
    assert_rmse_close(actual, expected, rmse_ratio_tol=1e-5, msg="per-layer RoPE bases")


def test_per_layer_float_list_gets_variants() -> None:
    """A float per layer read by the lean file, alike on every test layer: a 0 on the first layer,
    then a distinct value on each; int lists and lists that already differ get none."""
    from onboardlm.onboard.config_variants import _per_layer_float_variants

    found = _per_layer_float_variants("layer_rope_theta", [1e4, 1e4, 1e4], 3)
    assert [(v.label, v.overrides["layer_rope_theta"]) for v in found] == [
        ("layer_rope_theta[0]=0", [0.0, 2e4, 3e4]),
        ("layer_rope_theta=distinct", [1e4, 2e4, 3e4]),
    ]
    assert _per_layer_float_variants("heads", [4, 4, 4], 3) == []
    assert _per_layer_float_variants("layer_rope_theta", [0.0, 1e4, 1e4], 3) == []


def test_complex_table_is_measured_as_cos_sin() -> None:
    """DeepSeek-V2's rotary module returns one complex freqs_cis table: measured as the NeoX (cos, sin)
    tables it stands for; its MLA rotates channel pairs, generated with the interleaving cos/sin op."""
    config = AutoConfig.for_model("deepseek_v2", num_experts_per_tok=2, n_group=1, topk_group=1)
    spec = analyze(config)
    assert spec.rope is not None and spec.rope.complex_table and spec.rope.table_layout == "neox"
    assert spec.rope.class_name == "DeepseekV2RotaryEmbedding"
    assert spec.attention.rope_pairs and not spec.attention.rope_interleave
    source = generate_model_file(spec)
    assert "torch_rope_with_qk_interleaving(q_pe, k_pe" in source and "complex" not in source


def test_cos_sin_tables_of_a_complex_table() -> None:
    """A complex table rotates channel pair i by its angle; its cos/sin tables do the same through the
    canonical interleaving op (output de-interleaved, as the op documents)."""
    from onboardlm.ops.rope import torch_rope_with_complex_freqs, torch_rope_with_qk_interleaving
    from onboardlm.testing.capture import cos_sin_tables

    angles = torch.randn(2, 5, 4)
    freqs = torch.polar(torch.full_like(angles, 0.7), angles)
    q, k = torch.randn(2, 5, 3, 8), torch.randn(2, 5, 1, 8)
    want_q, want_k = torch_rope_with_complex_freqs(q, k, freqs, 2)
    cos, sin = cos_sin_tables(freqs)
    got_q, got_k = torch_rope_with_qk_interleaving(q, k, cos, sin, 2)
    order = torch.cat((torch.arange(0, 8, 2), torch.arange(1, 8, 2)))
    torch.testing.assert_close(got_q, want_q[..., order])
    torch.testing.assert_close(got_k, want_k[..., order])
    table = (torch.ones(1), torch.zeros(1))
    assert cos_sin_tables(table) is table


def test_llama4_text_is_measured_part_by_part() -> None:
    """Llama 4 (compared with transformers' own modules by the probes): one complex RoPE table rotating
    interleaved pairs; one weightless q/k norm shared by q and k, after RoPE, on RoPE layers only;
    chunked local attention on the ``chunked_attention`` layers; the NoPE layers' attention temperature
    (positions counted from 1); MoE on ``moe_layers`` with a sigmoid top-1 router whose weight scales
    each expert's input, a shared expert and dense layers of ``intermediate_size_mlp``."""
    spec = analyze(AutoConfig.for_model("llama4_text"))
    attn, moe = spec.attention, spec.feed_forward
    assert spec.rope.complex_table and spec.rope.style == "interleaved"
    assert attn.qk_norm_names == ("qk_norm", "qk_norm") and not attn.qk_norm.weight
    assert attn.qk_norm_after_rope
    assert attn.qk_norm_flag == "config.use_qk_norm and bool(config.no_rope_layers[layer_idx])"
    assert attn.rope_flag == "config.no_rope_layers[layer_idx]"
    assert attn.chunk_expr == (
        "config.attention_chunk_size if config.layer_types[layer_idx] == 'chunked_attention' else None"
    )
    assert attn.position_scale == ("config.attn_scale", "config.floor_scale")
    assert attn.position_scale_offset == 1
    assert attn.position_scale_flag == "not self.use_rope and config.attn_temperature_tuning"
    assert moe.routing_on_input and moe.router.scoring == "sigmoid" and moe.shared is not None
    assert moe.layer_condition == "layer_idx in config.moe_layers"
    assert moe.dense_width_expr == "config.intermediate_size_mlp"


def test_empty_per_layer_type_rope_parameters_are_completed() -> None:
    """Cohere-Compass's default config has ``rope_parameters == {}`` while its rotary module reads one
    table per layer type: completed with default RoPE per layer type, as transformers' own tests set it."""
    from onboardlm.models.config_completion import complete_default_config

    config = AutoConfig.for_model("cohere_compass_text")
    notes = complete_default_config(config)
    assert config.rope_parameters == {"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}
    assert any("rope_parameters['full_attention']" in note for note in notes)
    llama = AutoConfig.for_model("llama")
    assert not any("rope_parameters" in note for note in complete_default_config(llama))


def test_text_positions_of_multi_axis_position_ids() -> None:
    """M-RoPE position ids of text (every axis alike) replay into a lean rotary module as one row."""
    from onboardlm.testing.capture import Call, text_positions

    positions = torch.arange(5)[None].expand(3, 2, 5)
    args, kwargs = text_positions(Call((torch.zeros(2, 5, 4), positions), {}, None))
    assert torch.equal(args[1], torch.arange(5)[None].expand(2, 5))
    image = positions.clone()
    image[1] += 1
    args, _ = text_positions(Call((torch.zeros(2, 5, 4), image), {}, None))
    assert args[1] is image
