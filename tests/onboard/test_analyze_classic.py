"""Classic layouts measured from transformers models (issue 13): Conv1D weights, fused q/k/v layouts,
learned and sinusoidal absolute positions, ALiBi, fixed-base rotary tables, decoder-stack wrappers,
MLPs on the layer, post-LN and parallel layouts, and the config flags that switch them.

Expected values are facts of the transformers implementations (GPT-2 stores Conv1D [in, out]
weights, GPT-NeoX lays q/k/v out per head, CodeGen in four groups of q/v/k, OPT keeps two rows
before position 0), not outputs of the analyzer; slopes and tables are checked against
transformers' own functions.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.bloom.modeling_bloom import build_alibi_tensor
from transformers.pytorch_utils import Conv1D

from onboardlm.errors import UnsupportedFeature
from onboardlm.onboard.analyze import analyze
from onboardlm.onboard.analyze_classic import alibi_slopes, linear_layout, projections, split_fused_qkv
from onboardlm.onboard.generate import generate_model_file
from onboardlm.testing import tiny_config

TYPES = ["gpt2", "gpt_neox", "gptj", "codegen", "gpt_bigcode", "opt", "falcon", "bloom", "openai-gpt", "xglm"]


class _Specs(dict):
    """Each type's spec, analyzed the first time a test asks for it."""

    def __missing__(self, name: str) -> object:
        self[name] = analyze(AutoConfig.for_model(name))
        return self[name]


@pytest.fixture(scope="module")
def specs() -> dict:
    return _Specs()


def _rotary_module_on_the_model(model_type: str) -> bool:
    """transformers 5.25's GPT-J and CodeGen models own a rotary module; older releases compute RoPE
    inside the attention from position_ids."""
    model = AutoModelForCausalLM.from_config(tiny_config(AutoConfig.for_model(model_type)))
    return any(name.endswith("rotary_emb") for name, _ in model.named_modules())


# ------------------------------------------------------------------------------------------ helpers


def test_linear_layout_is_read_from_the_forward() -> None:
    assert linear_layout(nn.Linear(6, 4)) is False
    assert linear_layout(Conv1D(4, 6)) is True  # transformers' Conv1D: weight [in, out]
    assert linear_layout(nn.Linear(5, 5, bias=False)) is False  # square: told apart by running it
    assert linear_layout(Conv1D(5, 5)) is True
    assert linear_layout(nn.Embedding(10, 4)) is None
    assert linear_layout(nn.LayerNorm(4)) is None
    block = nn.Module()
    block.up, block.norm = Conv1D(8, 4), nn.LayerNorm(8)
    found = projections(block)
    assert list(found) == ["up"] and (found["up"].in_features, found["up"].out_features) == (4, 8)


def test_split_fused_qkv_per_head_and_in_groups() -> None:
    heads, kv_heads, head_dim = 4, 2, 3
    q, k, v = (torch.randn(2, 5, n, head_dim) for n in (heads, kv_heads, kv_heads))
    flat = torch.cat([t.flatten(-2) for t in (q, k, v)], dim=-1)
    assert all(
        torch.equal(a, b)
        for a, b in zip(split_fused_qkv(flat, 1, ("q", "k", "v"), 4, 2, 3), (q, k, v), strict=True)
    )
    # two KV groups, each [its 2 query heads | its k | its v] (Falcon's new decoder architecture)
    grouped = torch.cat(
        [torch.cat([q[:, :, 2 * g : 2 * g + 2].flatten(-2), k[:, :, g], v[:, :, g]], -1) for g in range(2)],
        -1,
    )
    assert all(
        torch.equal(a, b)
        for a, b in zip(split_fused_qkv(grouped, 2, ("q", "k", "v"), 4, 2, 3), (q, k, v), strict=True)
    )


@pytest.mark.parametrize("heads", [1, 3, 4, 6, 8, 12, 16, 24, 40, 112])
def test_alibi_slopes_equal_transformers(heads: int) -> None:
    table = build_alibi_tensor(torch.ones(1, 3), heads, torch.float32).reshape(heads, 3)
    torch.testing.assert_close(alibi_slopes(heads), table[:, 1], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ specs


def test_gpt2_conv1d_fused_qkv_learned_positions_and_scale_flags(specs: dict) -> None:
    spec = specs["gpt2"]
    attn, mlp = spec.attention, spec.feed_forward
    assert attn.fused_qkv and [p.name for p in attn.projections] == ["c_attn"]
    assert all(p.transposed for p in (*attn.projections, attn.out, *mlp.inputs, mlp.down))
    assert (attn.qkv_groups, attn.qkv_order, attn.kv_heads) == (
        "1",
        ("q", "k", "v"),
        "config.num_attention_heads",
    )
    assert attn.scaling == (
        "(self.head_dim**-0.5 if config.scale_attn_weights else 1.0)"
        " / (layer_idx + 1 if config.scale_attn_by_inverse_layer_idx else 1)"
    )
    assert mlp.intermediate == "config.n_inner or 4 * config.hidden_size"
    assert spec.rope is None and (spec.embedding.positions.attr, spec.embedding.positions.offset) == (
        "wpe",
        0,
    )
    assert (spec.layers_attr, spec.causal_lm_class) == ("h", "GPT2LMHeadModel")


def test_gpt_neox_per_head_qkv_and_a_norm_per_parallel_block(specs: dict) -> None:
    spec = specs["gpt_neox"]
    assert spec.attention.qkv_groups == "self.num_heads"
    layer = spec.decoder
    assert layer.parallel and (layer.attn_pre, layer.mlp_pre) == (
        "input_layernorm",
        "post_attention_layernorm",
    )
    assert spec.rope.partial and spec.rope.style == "neox"


def test_gptj_and_codegen_fixed_base_sin_first_rotary(specs: dict) -> None:
    for name in ("gptj", "codegen"):
        if not _rotary_module_on_the_model(name):
            with pytest.raises(UnsupportedFeature, match="RoPE computed inside the attention"):
                analyze(AutoConfig.for_model(name))
            continue
        rope = specs[name].rope
        assert (rope.fixed_base, rope.dim, rope.sin_first) == (10000.0, "config.rotary_dim", True)
        assert (rope.style, rope.table_layout, rope.partial) == ("interleaved", "half", True)
    if _rotary_module_on_the_model("gptj"):
        assert specs["gptj"].decoder.parallel and specs["gptj"].head.lm_head_bias


def test_codegen_qkv_in_four_groups_of_q_v_k(specs: dict) -> None:
    if not _rotary_module_on_the_model("codegen"):
        pytest.skip("this transformers release computes CodeGen's RoPE inside the attention: refused")
    attn = specs["codegen"].attention
    assert (attn.qkv_groups, attn.qkv_order) == ("4", ("q", "v", "k"))  # mp_num = 4, not the head count


def test_gpt_bigcode_mqa_and_the_multi_query_switch(specs: dict) -> None:
    attn = specs["gpt_bigcode"].attention
    assert attn.kind == "mqa" and attn.qkv_groups == "1"
    assert attn.qkv_switches == (("multi_query", False, "self.num_heads", ("q", "k", "v")),)


def test_opt_stack_inline_mlp_projections_and_post_ln_switch(specs: dict) -> None:
    spec = specs["opt"]
    assert (spec.model_attr, spec.stack_attr, spec.stack_class) == ("model", "decoder", "OPTDecoder")
    mlp = spec.feed_forward
    assert mlp.inline and [p.name for p in mlp.inputs] == ["fc1"] and mlp.down.name == "fc2"
    assert mlp.intermediate == "config.ffn_dim" and mlp.inputs[0].bias == "config.enable_bias"
    embedding = spec.embedding
    assert (embedding.positions.attr, embedding.positions.offset) == ("embed_positions", 2)
    assert (embedding.width, embedding.project_in, embedding.project_out) == (
        "config.word_embed_proj_dim",
        "project_in",
        "project_out",
    )
    assert spec.head.final_norm_flag == "config.do_layer_norm_before"
    (field, value, post_ln), *_ = spec.decoder.switches
    assert (field, value) == ("do_layer_norm_before", False) and post_ln.norm_after_residual


def test_falcon_switch_and_the_flags_it_does_not_reproduce(specs: dict) -> None:
    try:
        spec = specs["falcon"]
    except UnsupportedFeature as err:  # before 5.2x Falcon's eager attention needs a mask tensor
        if "FalconAttention" not in str(err) or "attention_mask" not in str(err):
            raise
        pytest.skip(f"this transformers release's Falcon cannot be probed: {err}")
    assert spec.attention.kind == "mqa" and spec.attention.qkv_switches[0][:3] == (
        "multi_query",
        False,
        "self.num_heads",
    )
    unsupported = {note.split(":")[0] for note in spec.notes if note.endswith("by this file")}
    assert {"config.alibi=True", "config.new_decoder_architecture=True"} <= unsupported
    assert "config.new_decoder_architecture" in generate_model_file(spec).split('"""')[1]


def test_bloom_alibi_embedding_norm_and_literal_activation(specs: dict) -> None:
    spec = specs["bloom"]
    assert spec.attention.alibi and spec.rope is None and spec.attention.qkv_groups == "self.num_heads"
    assert spec.embedding.norm == "word_embeddings_layernorm" and spec.head.final_norm_attr == "ln_f"
    assert spec.feed_forward.act == '"gelu_pytorch_tanh"'


def test_openai_gpt_post_ln_without_final_norm(specs: dict) -> None:
    spec = specs["openai-gpt"]
    assert spec.decoder.norm_after_residual and (spec.decoder.attn_post, spec.decoder.mlp_post) == (
        "ln_1",
        "ln_2",
    )
    assert spec.head.final_norm_attr is None


def test_xglm_sinusoidal_positions_and_switched_embedding_scale(specs: dict) -> None:
    embedding = specs["xglm"].embedding
    assert (embedding.positions.sinusoidal_base, embedding.positions.offset) == (10000.0, 2)
    assert embedding.scale == "(config.hidden_size**0.5 if config.scale_embedding else 1.0)"


# ------------------------------------------------------------------------------------------ refusals


def test_refused_with_module_and_feature(monkeypatch: pytest.MonkeyPatch) -> None:
    """CTRL's four unnamed projections are told apart by measurement; a fifth one is not."""
    import onboardlm.onboard.analyze as analyze_module

    build = AutoModelForCausalLM.from_config

    def with_extra_projection(config, **kwargs):
        model = build(config, **kwargs)
        for layer in model.transformer.h:
            layer.multi_head_attention.Wx = nn.Linear(config.hidden_size, config.hidden_size)
        return model

    monkeypatch.setattr(analyze_module.AutoModelForCausalLM, "from_config", with_extra_projection)
    with pytest.raises(UnsupportedFeature, match="attention projections") as raised:
        analyze(AutoConfig.for_model("ctrl"))
    assert raised.value.module_path == "transformer.h.0.multi_head_attention"
    assert "\n" not in str(raised.value)
