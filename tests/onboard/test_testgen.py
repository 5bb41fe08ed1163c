"""generate_test_file: ruff-clean source that passes the review's F/G/H rules, writes the tiny config
as literals that rebuild it exactly, and tests every distinct decoder-layer kind and block."""

from __future__ import annotations

import ast
import dataclasses
import subprocess
from pathlib import Path
from typing import Any

import pytest
import transformers
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.deepseek_v3 import modeling_deepseek_v3
from transformers.models.gemma2 import modeling_gemma2

from onboardlm.errors import UnsupportedFeature
from onboardlm.onboard.generate import docstring_text, ruff_command
from onboardlm.onboard.testgen import (
    FP32_RMSE_TOL,
    TEST_SOFTCAP,
    generate_test_file,
    lean_blocks,
    make_test_config,
    python_literal,
    read_layout,
    snake_case,
)
from onboardlm.review import Status, review_model_file
from onboardlm.testing import tiny_config, unit_embeddings

ROOT = Path(__file__).resolve().parents[2]
LLAMA_FILE = ROOT / "src/onboardlm/models/custom/modeling_llama.py"
LEAN_SOURCES = {"deepseek_v3": (ROOT / "src/onboardlm/models/custom/modeling_deepseek_v3.py").read_text()}
TEST_RULES = ["F1", "F2", "F3", "F4", "G1", "G2", "G3", "G4", "G5", "H1", "H2"]


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Generated tests for a dense model, one with sliding/full layers and one with dense/MoE layers
    (that one from its lean file too, so its variants follow the flags the file reads)."""
    folder = tmp_path_factory.mktemp("generated")
    lean_modules = {
        "llama": "onboardlm.models.custom.modeling_llama",
        "gemma2": "modeling_gemma2",
        "deepseek_v3": "modeling_deepseek_v3",
    }
    files = {}
    for model_type, lean_module in lean_modules.items():
        files[model_type] = folder / f"test_{model_type}_modeling.py"
        lean_source = LEAN_SOURCES.get(model_type)
        files[model_type].write_text(
            generate_test_file(
                AutoConfig.for_model(model_type), lean_module, model_type, lean_source=lean_source
            )
        )
    return files


def module_constant(source: str, name: str) -> Any:
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and [t.id for t in node.targets if isinstance(t, ast.Name)] == [name]:
            return ast.literal_eval(node.value)
    raise KeyError(name)


def config_keywords(source: str) -> dict[str, Any]:
    """The config fields of ``make_config``: its dict literal plus the call's literal keywords."""
    function = next(
        node
        for node in ast.parse(source).body
        if isinstance(node, ast.FunctionDef) and node.name == "make_config"
    )
    fields = ast.literal_eval(next(node for node in ast.walk(function) if isinstance(node, ast.Dict)))
    call = next(node for node in ast.walk(function) if isinstance(node, ast.Call))
    return {**fields, **{kw.arg: ast.literal_eval(kw.value) for kw in call.keywords if kw.arg}}


def init_values(config: transformers.PretrainedConfig) -> dict[str, Any]:
    skip = {"transformers_version", "architectures", "dtype"}
    return {
        f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init and f.name not in skip
    }


def test_generated_files_are_ruff_clean(generated: dict[str, Path]) -> None:
    ruff = ruff_command()
    assert ruff is not None
    config = str(ROOT / "pyproject.toml")
    files = [str(path) for path in generated.values()]
    check = subprocess.run([*ruff, "check", "--config", config, *files], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
    fmt = subprocess.run(
        [*ruff, "format", "--check", "--config", config, *files], capture_output=True, text=True
    )
    assert fmt.returncode == 0, fmt.stdout


def test_generated_llama_test_passes_the_review_test_rules(generated: dict[str, Path]) -> None:
    report = review_model_file(LLAMA_FILE, generated["llama"], rule_ids=TEST_RULES)
    assert report.failures == []
    assert {r.rule.id for r in report.results if r.status is Status.PASS} == set(TEST_RULES) - {"H1"}


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "deepseek_v3"])
def test_config_literals_rebuild_the_tiny_config(generated: dict[str, Path], model_type: str) -> None:
    keywords = config_keywords(generated[model_type].read_text())
    assert keywords.pop("attn_implementation") == "eager"
    assert keywords["hidden_size"] == 64 and keywords["vocab_size"] == 1000
    assert keywords["initializer_range"] == 0.125  # 1 / sqrt(hidden_size)
    config = AutoConfig.for_model(model_type)
    rebuilt = type(config)(**keywords)
    assert init_values(rebuilt) == init_values(make_test_config(config))


def test_non_finite_floats_are_written_as_source_that_evaluates_back() -> None:
    value = {"time_step_limit": (0.0, float("inf")), "floor": [float("-inf"), 1.5], "name": "x", "none": None}
    text = python_literal(value)
    assert "inf" not in text.replace('float("inf")', "").replace('float("-inf")', "")
    assert eval(text) == value  # noqa: S307 (our own literal text)


def test_every_layer_kind_gets_its_own_case(generated: dict[str, Path]) -> None:
    gemma2 = generated["gemma2"].read_text()
    assert module_constant(gemma2, "GEMMA2_DECODER_LAYERS") == {
        "layer0-sliding_attention": "model.layers.0",
        "layer1-full_attention": "model.layers.1",
    }
    assert module_constant(generated["deepseek_v3"].read_text(), "DEEPSEEK_V3_DECODER_LAYERS") == {
        "layer0-dense": "model.layers.0",
        "layer1-moe": "model.layers.1",
    }
    assert module_constant(generated["llama"].read_text(), "LLAMA_DECODER_LAYERS") == {
        "layer0": "model.layers.0"
    }


def test_blocks_by_role_with_the_fp32_tolerance(generated: dict[str, Path]) -> None:
    source = generated["deepseek_v3"].read_text()
    assert module_constant(source, "DEEPSEEK_V3_MOE_PATHS") == ["model.layers.1.mlp"]
    assert module_constant(source, "DEEPSEEK_V3_MLP_PATHS") == [
        "model.layers.0.mlp",
        "model.layers.1.mlp.shared_experts",
    ]
    assert module_constant(source, "FP32_RMSE_TOL") == FP32_RMSE_TOL == 1e-5
    assert module_constant(source, "BF16_RMSE_TOL") == 0.05
    tree = ast.parse(source)
    calls = {
        node.name: [ast.unparse(call) for call in ast.walk(node) if isinstance(call, ast.Call)]
        for node in tree.body
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")
    }
    fp32 = "assert_rmse_close(actual, call.result, rmse_ratio_tol=FP32_RMSE_TOL, msg=path)"
    for name in ("moe", "attention", "mlp"):
        assert fp32 in calls[f"test_block_deepseek_v3_{name}"]
    assert fp32 in calls["test_layer_deepseek_v3_decoder_layer"]
    # identical math is also checked element-wise
    identical = "torch.testing.assert_close(actual, call.result, rtol=0.001, atol=0.001)"
    assert identical in calls["test_block_deepseek_v3_mlp"]
    assert identical not in calls["test_block_deepseek_v3_attention"]
    assert any("FP32_RMSE_TOL" in c for c in calls["test_model_logits_fp32"])
    assert any("BF16_RMSE_TOL" in c for c in calls["test_model_logits_bf16"])
    assert any("FP32_RMSE_TOL" in c for c in calls["test_model_logits_variant"])


def test_variants_take_the_branches_the_base_config_does_not(generated: dict[str, Path]) -> None:
    """DeepSeek-V3's lean file keeps both states of norm_topk_prob, rope_interleave and q_lora_rank,
    and a yarn branch with a softmax mscale; the real checkpoints set yarn."""
    variants = module_constant(generated["deepseek_v3"].read_text(), "CONFIG_VARIANTS")
    assert variants["norm_topk_prob=False"] == {"norm_topk_prob": False}
    assert variants["rope_interleave=False"] == {"rope_interleave": False}
    assert variants["q_lora_rank=None"] == {"q_lora_rank": None}
    assert variants["tie_word_embeddings=True"] == {"tie_word_embeddings": True}
    yarn = variants["rope=yarn"]["rope_parameters"]
    assert yarn["rope_type"] == "yarn" and yarn["mscale_all_dim"] == 1.0
    # the llama test above was generated without the lean source: no flags read, still tie and RoPE
    assert set(module_constant(generated["llama"].read_text(), "CONFIG_VARIANTS")) == {
        "tie_word_embeddings=True",
        "rope=yarn",
    }


def test_test_config_groups_kv_heads_and_makes_softcaps_bite() -> None:
    llama = make_test_config(AutoConfig.for_model("llama"))
    assert (llama.num_attention_heads, llama.num_key_value_heads) == (4, 2)
    gemma2 = make_test_config(AutoConfig.for_model("gemma2"))
    assert gemma2.attn_logit_softcapping == gemma2.final_logit_softcapping == TEST_SOFTCAP
    deepseek = make_test_config(AutoConfig.for_model("deepseek_v3"))  # MLA: no grouping to make
    assert deepseek.num_key_value_heads == deepseek.num_attention_heads


def test_read_layout_skips_expert_internals_and_unrepresented_layers() -> None:
    config = make_test_config(AutoConfig.for_model("deepseek_v3"))
    reference = modeling_deepseek_v3.DeepseekV3ForCausalLM(config)
    layout = read_layout(reference, config, modeling_deepseek_v3)
    paths = [path for group in layout.blocks for path in group.paths]
    assert not any(".experts" in path for path in paths)
    assert {group.role for group in layout.blocks} == {"attention", "norm", "mlp", "moe", "rotary"}

    gemma = make_test_config(AutoConfig.for_model("gemma2"))
    gemma.num_hidden_layers, gemma.layer_types = 4, ["sliding_attention", "full_attention"] * 2
    layout = read_layout(modeling_gemma2.Gemma2ForCausalLM(gemma), gemma, modeling_gemma2)
    assert [kind.path for kind in layout.layers] == ["model.layers.0", "model.layers.1"]
    assert not any(
        path.startswith(("model.layers.2", "model.layers.3")) for g in layout.blocks for path in g.paths
    )


def test_composite_config_is_refused() -> None:
    with pytest.raises(UnsupportedFeature, match="sub-configs"):
        generate_test_file(AutoConfig.for_model("gemma3"), "modeling_gemma3", "gemma3")


def test_snake_case_and_docstring_escaping() -> None:
    assert snake_case("Qwen3MoeSparseMoeBlock") == "qwen3_moe_sparse_moe_block"
    assert snake_case("LlamaRMSNorm") == "llama_rms_norm"
    assert snake_case("DeepseekV3MoE") == "deepseek_v3_moe"
    hostile = 'a """quote""" and a \\ backslash, ending in "'
    assert ast.literal_eval(f'"""{docstring_text(hostile)}"""') == hostile
    source = generate_test_file(AutoConfig.for_model("llama"), "modeling_llama", 'x"""\\y')
    assert ast.get_docstring(ast.parse(source)).splitlines()[0].endswith('(x"""\\y).')


def test_lean_blocks_no_layer_reaches_are_tested_standalone_when_both_build_from_the_config() -> None:
    """Qwen3-MoE's dense MLP class is built only for ``mlp_only_layers``; the tiny config has none."""
    source = (ROOT / "tests/compat/ad_style_qwen3_moe.py").read_text()
    assert "intermediate_size: int)" in source
    buildable = source.replace("intermediate_size: int)", "intermediate_size: int | None = None)")
    config = AutoConfig.for_model("qwen3_moe")
    generated = generate_test_file(config, "modeling_qwen3_moe", "qwen3_moe", lean_source=buildable)
    tree = ast.parse(generated)
    tests = {node.name: ast.unparse(node) for node in tree.body if isinstance(node, ast.FunctionDef)}
    standalone = tests["test_block_qwen3_moe_mlp"]
    assert "hf.Qwen3MoeMLP(make_config())" in standalone and "lean.Qwen3MoeMLP(make_config())" in standalone
    assert "rtol=0.001, atol=0.001" in standalone and "randomize_constant_tensors(reference)" in standalone
    # the lean constructor needs an argument transformers' does not: no test rather than a guess
    as_is = generate_test_file(config, "modeling_qwen3_moe", "qwen3_moe", lean_source=source)
    assert "def test_block_qwen3_moe_mlp" not in as_is


def test_lean_blocks_with_another_forward_signature_are_not_replayed() -> None:
    source = (ROOT / "tests/compat/ad_style_gpt_oss.py").read_text()
    assert lean_blocks(source)["GptOssExperts"] == "moe"
    generated = generate_test_file(
        AutoConfig.for_model("gpt_oss"), "modeling_gpt_oss", "gpt_oss", lean_source=source
    )
    assert "GptOssExperts" not in generated  # HF passes router_indices, the lean forward does not take them
    assert "def test_block_gpt_oss_mlp" in generated  # the MoE block itself (it owns ``experts``)


def test_a_module_called_twice_per_forward_checks_every_call() -> None:
    """Llama-4's parameter-free q/k L2 norm is one module called for q and for k."""
    config = AutoConfig.for_model("llama4").get_text_config()
    tree = ast.parse(generate_test_file(config, "modeling_llama4", "llama4"))
    # The class was Llama4TextL2Norm before transformers 5.25 and Llama4TextWeightlessRMSNorm since.
    attention = AutoModelForCausalLM.from_config(tiny_config(config)).model.layers[0].self_attn
    name = f"test_block_{snake_case(type(attention.qk_norm).__name__)}"
    test = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    loop = next(node for node in ast.walk(test) if isinstance(node, ast.For))
    assert ast.unparse(loop.iter) == "calls[path]"
    assert "assert_close(actual, call.result, rtol=0.001, atol=0.001)" in ast.unparse(loop)


def test_the_shipped_llama_test_is_the_generator_s_output() -> None:
    """tests/models/generated/ holds what ``onboardlm onboard llama --into-package`` writes today."""
    shipped = ROOT / "tests/models/generated/test_llama_modeling.py"
    text = generate_test_file(
        AutoConfig.for_model("llama"),
        "onboardlm.models.custom.modeling_llama",
        "llama",
        lean_source=LLAMA_FILE.read_text(),
    )
    assert text == shipped.read_text()


def test_post_ln_attention_on_raw_embeddings_gets_unit_scale_embeddings(generated: dict[str, Path]) -> None:
    """GPT-1's first attention reads the embeddings unnormalised: at the initializer's scale its
    softmax is flat, so the generated test redraws them at unit scale; pre-LN llama's does not."""
    gpt1 = generate_test_file(AutoConfig.for_model("openai-gpt"), "modeling_openai_gpt", "openai-gpt")
    assert "    unit_embeddings(reference)\n" in gpt1
    assert "unit_embeddings" not in generated["llama"].read_text()


def test_unit_embeddings_draws_every_embedding_at_unit_scale_and_keeps_ties() -> None:
    config = tiny_config(AutoConfig.for_model("openai-gpt"))
    model = AutoModelForCausalLM.from_config(config)
    assert model.transformer.tokens_embed.weight.detach().std() < 0.1
    changed = unit_embeddings(model)
    assert changed == ["transformer.tokens_embed.weight", "transformer.positions_embed.weight"]
    for weight in (model.transformer.tokens_embed.weight, model.transformer.positions_embed.weight):
        assert 0.9 < float(weight.detach().std()) < 1.1
    assert model.lm_head.weight is model.transformer.tokens_embed.weight


def test_moe_bf16_logits_are_measured_against_fp32_transformers(generated: dict[str, Path]) -> None:
    """With experts, bf16 rounding flips routing differently in transformers and the lean file: the
    bf16 test compares both with transformers' fp32 logits; a dense model keeps the direct check."""
    moe = generated["deepseek_v3"].read_text()
    assert "tolerance = max(BF16_RMSE_TOL, 1.25 * rmse_ratio(transformers_bf16, exact))" in moe
    dense = generated["llama"].read_text()
    assert "rmse_ratio(" not in dense and "rmse_ratio_tol=BF16_RMSE_TOL" in dense
