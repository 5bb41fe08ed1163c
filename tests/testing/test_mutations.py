"""Mutation catalogue: each kind edits the construct it names; a CI subset of the mutation score runs
the shipped generated tests against mutants of llama and qwen3_moe and every mutant must fail them."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from onboardlm.testing.mutations import KINDS, kinds_by_name, mutants
from onboardlm.testing.mutations.runner import lean_module_name, literal_config_fields

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "src/onboardlm/models/custom"
CI_KINDS = [
    "attention_scale",
    "rope_scaling_ignored",
    "norm_eps",
    "dropped_bias",
    "activation_swapped",
    "router_renormalisation",
    "untied_embeddings",
]

#: kind -> (model type, a line of the original file it changes, what that line becomes in the mutant)
EDITS = {
    "attention_scale": ("llama", "self.scaling = self.head_dim**-0.5", "v * 1.03)(self.head_dim ** (-0.5))"),
    "attention_softcap": ("gemma2", "self.logit_cap = config.attn_logit_softcapping", "v * 1.05"),
    "rope_base": (
        "llama",
        'base = config.rope_parameters["rope_theta"]',
        "v * 1.05)(config.rope_parameters[",
    ),
    "rope_scaling_ignored": ("llama", 'if rope_type != "default":', "if False:"),
    "partial_rotary_ignored": (
        "phi",
        'config.rope_parameters.get("partial_rotary_factor", 1.0)',
        "head_dim * 1.0",
    ),
    "rope_layout": ("llama", "ops.torch_rope_with_explicit_cos_sin(", "ops.torch_rope_with_qk_interleaving("),
    "rope_cos_sin_swapped": ("llama", "(q, k, cos, sin, 2)", "(q, k, sin, cos, 2)"),
    "norm_eps": ("llama", "self.variance_epsilon = eps", "v * 10.0)(eps)"),
    "norm_offset": (
        "gemma",
        "1.0 + self.weight, self.variance_epsilon",
        "(hidden_states, self.weight, self.",
    ),
    "norm_placement": (
        "llama",
        "self.input_layernorm(hidden_states), position_embeddings",
        "self.input_layernorm(self.self_attn(hidden_states, position_embeddings))",
    ),
    "qk_norm_dropped": ("qwen3", "q = self.q_norm(q)", "q = q\n"),
    "residual_multiplier": ("granite", "self.residual_multiplier = config.residual_multiplier", "v * 1.03"),
    "embedding_multiplier": ("gemma", "self.embed_scale = embed_scale", "v * 1.03)(embed_scale)"),
    "logits_scaling": ("cohere", "self.logit_scale = config.logit_scale", "v * 1.03"),
    "final_logit_softcap": (
        "gemma2",
        "self.final_logit_softcapping = config.final_logit_softcapping",
        "v * 1.05",
    ),
    "gqa_mapping": (
        "llama",
        "q, k, v, is_causal=True",
        "k.repeat(1, 1, self.num_heads // self.num_kv_heads, 1)",
    ),
    "sliding_window_off_by_one": (
        "mistral",
        "self.sliding_window = config.sliding_window",
        "v + 1)(config.sliding_window)",
    ),
    "attention_sinks_dropped": ("gpt_oss", "sinks=self.sinks", "sinks=None"),
    "dropped_bias": ("qwen2", "self.q_proj.bias", "self.q_proj.weight, None"),
    "activation_swapped": (
        "llama",
        "ACT2FN[config.hidden_act]",
        "'gelu_new': 'gelu'}.get(config.hidden_act, 'gelu')",
    ),
    "moe_top_k": (
        "mixtral",
        "self.top_k = config.num_experts_per_tok",
        "v + -1)(config.num_experts_per_tok)",
    ),
    "router_renormalisation": ("qwen3_moe", "if self.norm_topk_prob:", "if not self.norm_topk_prob:"),
    "routed_scaling_factor": (
        "deepseek_v3",
        "self.routed_scaling_factor = config.routed_scaling_factor",
        "v * 1.05",
    ),
    "shared_expert_gate_dropped": (
        "qwen2_moe",
        "shared = torch.sigmoid(shared_gate) * shared",
        "shared = shared\n",
    ),
    "untied_embeddings": ("llama", "_tied_weights_keys = {", None),
    "attention_output_gate_dropped": ("minicpm5_moe", "attn = attn * torch.sigmoid(gate)", "attn = attn\n"),
    "inner_norm_dropped": ("bitnet", "attn = self.attn_sub_norm(attn)", "attn = attn\n"),
    "rope_direction": ("nanochat", "sin = -sin", "sin = sin\n"),
    "attention_temperature_dropped": ("ministral3", "q = q * temperature[:, :, None, None]", "q = q\n"),
    "ssm_skip_dropped": ("mamba2", "            self.D,\n", "self.D * 0"),
    "ssm_dt_bias_dropped": ("mamba2", "            self.dt_bias,\n", "self.dt_bias * 0"),
    "ssm_decay_off": ("mamba2", "-torch.exp(self.A_log.float()),", "-torch.exp(self.A_log.float()) * 1.05"),
    "ssm_gate_order": ("mamba2", "norm_before_gate=False", "norm_before_gate=True"),
    "channel_decay_off": ("kimi_linear", "q, k, v, decay, torch.sigmoid(beta)", "q, k, v, decay * 1.05,"),
    "rg_lru_gate_scale_off": ("recurrent_gemma", "self.recurrent_param,\n            8.0,", "8.0 * 1.05"),
    "rg_lru_gates_swapped": (
        "recurrent_gemma",
        "x,\n            self.input_gate_weight,\n            self.input_gate_bias,",
        "x, self.recurrent_gate_weight, self.recurrent_gate_bias, self.input_gate_weight, self.input_gate_bias",
    ),
    "channel_write_strength_off": (
        "kimi_linear",
        "q, k, v, decay, torch.sigmoid(beta)",
        "torch.sigmoid(beta) * 0.95",
    ),
    "attention_output_bias_dropped": (
        "gpt_neox_japanese",
        "return out if self.dense_bias is None else out + self.dense_bias",
        "def add_output_bias(self, out: torch.Tensor) -> torch.Tensor:\n        return out\n",
    ),
    "shared_kv_query_unrotated": (
        "gemma4_unified_text",
        "q, _ = ops.torch_rope_with_explicit_cos_sin(q, q, cos, sin, 2)",
        None,
    ),
    "shared_kv_stored_before_rope": (
        "gemma4_unified_text",
        "shared_kv[self.layer_idx] = (k, v)",
        "shared_kv[self.layer_idx] = (k, v)\n            q, k = ops.torch_rope_with_explicit_cos_sin",
    ),
    "differential_lambda_init": (
        "diffllama",
        "self.lambda_init = 0.8 - 0.6 * math.exp(-0.3 * layer_idx)",
        "v * 1.03",
    ),
    "per_layer_input_dropped": (
        "gemma4_text",
        "hidden_states + self.mix_per_layer_input(hidden_states, per_layer_input)",
        "hidden_states = hidden_states + 0\n",
    ),
    "per_layer_input_first_layer": (
        "gemma4_text",
        "per_layer_inputs[:, :, index]",
        "per_layer_inputs[:, :, 0]",
    ),
}


def source(model_type: str) -> str:
    """The shipped generated file, else one generated now (MiniCPM5-MoE: not shipped, its bf16
    logits test misses the seed's tolerance by routing flips)."""
    path = MODELS / f"modeling_{model_type}.py"
    if path.exists():
        return path.read_text()
    from transformers import AutoConfig

    from onboardlm.onboard.analyze import analyze
    from onboardlm.onboard.generate import generate_model_file

    return generate_model_file(analyze(AutoConfig.for_model(model_type)))


def test_the_catalogue_has_the_issue_s_kinds() -> None:
    assert len(KINDS) >= 15
    assert set(EDITS) == {kind.name for kind in KINDS}  # every kind has an edit check below


@pytest.mark.parametrize("kind", sorted(EDITS))
def test_each_kind_edits_the_construct_it_names(kind: str) -> None:
    model_type, original, mutated = EDITS[kind]
    text = source(model_type)
    assert original in text
    (mutant,) = mutants(text, kinds_by_name([kind]))
    assert mutant.lines and all(1 <= line <= text.count("\n") for line in mutant.lines)
    first = text[: text.index(original)].count("\n") + 1  # the line the original text is on
    assert min(abs(line - first) for line in mutant.lines) <= 8  # a node may start lines earlier
    compile(mutant.source, f"{kind}.py", "exec")
    assert ast.dump(ast.parse(mutant.source)) != ast.dump(ast.parse(text))
    if mutated is not None:
        assert mutated in mutant.source
    else:
        assert original not in mutant.source


def test_kinds_that_do_not_apply_leave_no_mutant() -> None:
    llama = {m.kind for m in mutants(source("llama"))}
    assert not llama & {"router_renormalisation", "moe_top_k", "attention_softcap", "final_logit_softcap"}
    assert {"attention_scale", "rope_layout", "norm_eps", "gqa_mapping"} <= llama
    with pytest.raises(KeyError, match="no_such_kind"):
        kinds_by_name(["attention_scale", "no_such_kind"])


def test_the_runner_reads_the_lean_module_and_the_config_of_a_generated_test() -> None:
    test = (ROOT / "tests/models/generated/test_qwen3_moe_modeling.py").read_text()
    assert lean_module_name(test) == "onboardlm.models.custom.modeling_qwen3_moe"
    fields = literal_config_fields(test)
    assert fields["hidden_size"] == 64 and fields["num_key_value_heads"] == 2
    gqa = next(kind for kind in KINDS if kind.name == "gqa_mapping")
    assert gqa.requires is not None and gqa.requires(fields) is None
    assert "no KV-head grouping" in gqa.requires({"num_attention_heads": 4, "num_key_value_heads": 4})


@pytest.mark.slow
def test_ci_subset_of_the_mutation_score_catches_every_mutant(tmp_path: Path) -> None:
    """benchmarks/mutation_score.py on llama and qwen3_moe with a few kinds: all caught (100 %)."""
    out = tmp_path / "score.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks/mutation_score.py"),
            "llama",
            "qwen3_moe",
            "--kinds",
            ",".join(CI_KINDS),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads(out.read_text())
    llama, moe = data["files"]["llama"], data["files"]["qwen3_moe"]
    assert data["total"]["caught"] == data["total"]["applicable"] == 13
    assert {m["kind"] for m in moe["mutants"]} == set(CI_KINDS)
    assert "router_renormalisation" not in {m["kind"] for m in llama["mutants"]}
    by_kind = {m["kind"]: m for m in llama["mutants"]}
    assert by_kind["attention_scale"]["caught_by"].startswith("test_block_llama_attention")
    assert by_kind["attention_scale"]["metric"] > 100 * by_kind["attention_scale"]["tolerance"]
    # branches only a config variant takes
    assert by_kind["rope_scaling_ignored"]["caught_by"] == "test_model_logits_variant[rope=yarn]"
    assert by_kind["dropped_bias"]["caught_by"].startswith("test_model_logits_variant[")
    assert by_kind["untied_embeddings"]["caught_by"] == "test_model_logits_variant[tie_word_embeddings=True]"
