"""`onboardlm registry list | show | add | validate`: output and exit codes (bad input: tests/test_bad_inputs.py)."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from onboardlm.cli import app
from onboardlm.registry import merged_settings, settings_for_model

SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"
runner = CliRunner()


def invoke(*args: str | Path):
    return runner.invoke(app, ["registry", *map(str, args)], terminal_width=250)


def test_help_of_every_registry_command() -> None:
    for command in ("list", "show", "add", "validate"):
        result = invoke(command, "--help")
        assert result.exit_code == 0 and "--registry-dir" in result.output, command


def test_list_shows_every_entry(registry_dir: Path) -> None:
    result = invoke("list", "--registry-dir", registry_dir)
    assert result.exit_code == 0
    assert "9 models" in result.output
    assert SMOL in result.output and "meta-llama/Llama-3.1-405B-Instruct" in result.output


def test_show_table_json_and_standalone_yaml(registry_dir: Path, tmp_path: Path) -> None:
    table = invoke("show", SMOL, "--registry-dir", registry_dir)
    assert table.exit_code == 0
    assert "smollm2-135m-instruct.yaml" in table.output and '"bfloat16"' in table.output
    as_json = json.loads(invoke("show", SMOL, "--json", "--registry-dir", registry_dir).output)
    assert as_json["settings"]["dtype"] == "bfloat16"
    assert as_json["sources"]["dtype"] == "smollm2-135m-instruct.yaml"
    as_yaml = invoke("show", SMOL, "--yaml", "--registry-dir", registry_dir)
    standalone = tmp_path / "smol.yaml"
    standalone.write_text(as_yaml.output)
    assert merged_settings([standalone]) == settings_for_model(SMOL, registry_dir)


def test_add_then_show(registry_dir: Path, tmp_path: Path) -> None:
    extra = tmp_path / "qwen3-8b.yaml"
    extra.write_text("dtype: bfloat16\n")
    result = invoke(
        "add", "Qwen/Qwen3-8B", "--params", "8.2B", "--extra", extra, "--registry-dir", registry_dir
    )
    assert result.exit_code == 0, result.output
    assert "added Qwen/Qwen3-8B" in result.output and "world_size_2.yaml + qwen3-8b.yaml" in result.output
    settings = settings_for_model("Qwen/Qwen3-8B", registry_dir)
    assert settings.world_size == 2 and settings.dtype == "bfloat16"
    assert invoke("validate", "--registry-dir", registry_dir).exit_code == 0


def test_validate_exit_codes(registry_dir: Path, tmp_path: Path) -> None:
    assert invoke("validate", "--registry-dir", registry_dir).exit_code == 0
    (registry_dir / "configs" / "world_size_2.yaml").write_text("world_size: 2\nmax_batch: 4\n")
    result = invoke("validate", "--registry-dir", registry_dir)
    assert result.exit_code == 2
    assert "meta-llama/Llama-3.1-8B-Instruct" in result.output and "max_batch" in result.output
    assert "registry has 2 error(s)" in result.output
    assert invoke("validate", "--registry-dir", tmp_path / "nowhere").exit_code == 2
