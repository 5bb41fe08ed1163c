"""The command line: help on every command and the op table (``run``: see test_run_cli.py)."""

from __future__ import annotations

import json
import re

from typer.testing import CliRunner

from onboardlm.cli import app

#: Every op named in OPS.md (the contract this package implements).
OPS_MD_OPS = {
    "torch_attention", "torch_attention_sdpa", "torch_attention_repeat_kv",
    "torch_attention_key_bias",  # Doge's dynamic mask attention (issue 13; OPS.md style)
    "torch_rope_with_explicit_cos_sin", "torch_rope_with_complex_freqs", "torch_rope_with_qk_interleaving",
    "torch_rmsnorm", "torch_rmsnorm_gated", "torch_l2norm",
    "torch_linear_simple", "view", "split_with_sizes", "all_reduce",
    "torch_moe", "torch_moe_router", "torch_moe_dense_mlp",
    "torch_mla",
    "torch_lightning_indexer", "torch_sparse_mla",  # DeepSeek sparse attention (issue 13; OPS.md style)
    "torch_causal_conv1d", "torch_ssm", "torch_gated_delta_rule",
    "torch_channel_gated_delta_rule",  # Kimi Delta Attention's per-channel decay (issue 15; OPS.md style)
    "torch_rg_lru",  # Griffin's RG-LRU (Recurrent Gemma; issue 15, OPS.md style)
    "torch_fake_quant_fp8_linear", "torch_quant_fp8_linear",  # FP8 (issue 16; AutoDeploy's names)
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
    assert f"{len(OPS_MD_OPS)} canonical ops" in result.output
    assert "torch_moe_dense_mlp" in result.output
