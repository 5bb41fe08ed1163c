"""The command line: help on every command, the op table, the default run and bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from transformers import LlamaConfig
from typer.testing import CliRunner

from onboardlm.cli import app

#: Every op named in OPS.md (the contract this package implements).
OPS_MD_OPS = {
    "torch_attention", "torch_attention_sdpa", "torch_attention_repeat_kv",
    "torch_rope_with_explicit_cos_sin", "torch_rope_with_complex_freqs", "torch_rope_with_qk_interleaving",
    "torch_rmsnorm", "torch_rmsnorm_gated", "torch_l2norm",
    "torch_linear_simple", "view", "split_with_sizes", "all_reduce",
    "torch_moe", "torch_moe_router", "torch_moe_dense_mlp",
    "torch_mla",
    "torch_causal_conv1d", "torch_ssm", "torch_gated_delta_rule",
}  # fmt: skip

runner = CliRunner()


def test_help_lists_commands_and_every_command_has_help() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    commands = re.findall(r"│ (\w[\w-]*)\s{2,}", result.output)
    assert {"ops", "run"} <= set(commands)
    for command in commands:
        sub = runner.invoke(app, [command, "--help"])
        assert sub.exit_code == 0, command
        assert "Usage" in sub.output


def test_ops_lists_every_op_of_the_contract_with_its_schema() -> None:
    result = runner.invoke(app, ["ops", "--json"])
    assert result.exit_code == 0
    entries = {entry["name"]: entry for entry in json.loads(result.output)}
    assert set(entries) == OPS_MD_OPS
    attention = entries["torch_attention"]
    assert attention["category"] == "attention"
    assert attention["signature"].startswith("torch_attention(Tensor query, Tensor key, Tensor value")
    assert 'str layout="bnsd"' in attention["signature"]


def test_ops_table_renders() -> None:
    result = runner.invoke(app, ["ops"], terminal_width=250)
    assert result.exit_code == 0
    assert "20 canonical ops" in result.output
    assert "torch_moe_dense_mlp" in result.output


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("/no/such/dir", "no such file or directory"),
        ("not-a-model-type-or-id", "not in the local HuggingFace cache"),
    ],
)
def test_run_with_a_bad_model_fails_with_one_clear_line(model: str, message: str) -> None:
    result = runner.invoke(app, ["run", "--model", model])
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_run_refuses_a_model_without_a_tokenizer(tmp_path: Path) -> None:
    LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=100).save_pretrained(
        tmp_path
    )
    result = runner.invoke(app, ["run", "--model", str(tmp_path)])
    assert result.exit_code == 2
    assert "has no tokenizer files" in result.output


def test_run_rejects_a_bad_dtype() -> None:
    result = runner.invoke(app, ["run", "--dtype", "float13"])
    assert result.exit_code == 2
    assert "float13" in result.output


@pytest.mark.slow
def test_default_run_answers_in_the_log_format() -> None:
    result = runner.invoke(app, ["run", "--max-new-tokens", "12"])
    assert result.exit_code == 0, result.output
    assert "(lean onboardlm model)" in result.output
    line = next(line for line in result.output.splitlines() if line.startswith("[PROMPT 0]"))
    assert line.startswith("[PROMPT 0] What is the capital of France?: ")
    assert "Paris" in line
