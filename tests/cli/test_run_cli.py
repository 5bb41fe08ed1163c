"""``onboardlm run``: registry and standalone settings and the log format (bad input: tests/test_bad_inputs.py).

Fast tests use a tiny random Llama saved with the shipped SmolLM2 tokenizer; the ``slow`` ones load the
shipped SmolLM2 GGUF.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from ruamel.yaml import YAML
from typer.testing import CliRunner

from onboardlm.cli import app
from onboardlm.registry import load_run_settings, render_standalone_yaml, shipped_registry_dir
from onboardlm.runtime.prompts import default_prompts
from onboardlm.runtime.runner import DEFAULT_MODEL_ID
from onboardlm.testing.checkpoints import save_tiny_llama

runner = CliRunner()
PROMPT_LINE = re.compile(r"^\[PROMPT (\d+)\] (.*)$", re.MULTILINE)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with a 2-layer random Llama checkpoint and SmolLM2's tokenizer."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture
def tiny_registry(tmp_path: Path, tiny_model: Path) -> Path:
    """A registry with one entry, the tiny model, whose own config sets prompts and sampling."""
    registry = tmp_path / "registry"
    (registry / "configs").mkdir(parents=True)
    for name in ("dashboard_default.yaml", "world_size_1.yaml"):
        shutil.copy(shipped_registry_dir() / "configs" / name, registry / "configs" / name)
    (registry / "configs" / "tiny.yaml").write_text(
        "max_new_tokens: 6\nmax_batch_size: 2\n"
        "sampling: {temperature: 0.8, top_k: 20, seed: 3}\n"
        "prompts: ['Hello there', 'Tell me a story', 'Why is the sky blue?']\n"
    )
    entry = {
        "name": str(tiny_model),
        "yaml_extra": ["dashboard_default.yaml", "world_size_1.yaml", "tiny.yaml"],
    }
    YAML(typ="safe").dump({"version": 1, "models": [entry]}, registry / "models.yaml")
    return registry


def _run(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["run", *args])
    assert "Traceback" not in result.output
    return result.exit_code, result.output


def _prompt_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("[PROMPT ")]


def test_use_registry_and_its_standalone_yaml_give_the_same_settings_and_output(
    tiny_registry: Path, tiny_model: Path, tmp_path: Path
) -> None:
    name = str(tiny_model)
    standalone = tmp_path / "standalone.yaml"
    standalone.write_text(render_standalone_yaml(name, tiny_registry))
    from_registry = load_run_settings(name, use_registry=True, registry_dir=tiny_registry)
    assert load_run_settings(name, yaml_extra=[standalone]) == from_registry
    assert from_registry.sampling.temperature == 0.8 and from_registry.max_batch_size == 2

    code_a, out_a = _run("--model", name, "--use-registry", "--registry-dir", str(tiny_registry))
    code_b, out_b = _run("--model", name, "--args.yaml-extra", str(standalone))
    assert code_a == 0 and code_b == 0, out_a + out_b
    lines = _prompt_lines(out_a)
    assert lines == _prompt_lines(out_b)
    assert [line.split(":")[0] for line in lines] == [
        "[PROMPT 0] Hello there", "[PROMPT 1] Tell me a story", "[PROMPT 2] Why is the sky blue?"
    ]  # fmt: skip
    summary = re.search(r"generated (\d+) tokens for 3 prompts in [\d.]+ s \(([\d.]+) tok/s", out_a)
    assert summary is not None, out_a
    assert 3 <= int(summary.group(1)) <= 3 * 6 and float(summary.group(2)) > 0  # max_new_tokens 6 each
    phases = re.search(
        r"timings start-up [\d.]+ s, load ([\d.]+) s, export ([\d.]+) s, warm-up ([\d.]+) s, first token ([\d.]+) s "
        r"\(mean per batch\)(, decode ([\d.]+) tok/s)?",
        out_a,
    )  # two batches (max_batch_size 2); warm-up is 0.0 on the CPU (nothing is compiled or captured)
    assert phases is not None, out_a
    assert float(phases.group(2)) > 0 and float(phases.group(3)) == 0.0


def test_command_line_options_override_the_settings(tiny_registry: Path, tiny_model: Path) -> None:
    code, out = _run(
        "--model", str(tiny_model), "--use-registry", "--registry-dir", str(tiny_registry),
        "-p", "One", "-p", "Two", "--temperature", "0", "--max-new-tokens", "3",
    )  # fmt: skip
    assert code == 0, out
    assert [line.split(":")[0] for line in _prompt_lines(out)] == ["[PROMPT 0] One", "[PROMPT 1] Two"]


@pytest.mark.slow
def test_default_run_answers_the_ten_default_prompts_in_the_log_format() -> None:
    code, out = _run("--max-new-tokens", "12")
    assert code == 0, out
    assert "(lean onboardlm model)" in out
    found = PROMPT_LINE.findall(out)
    assert [int(i) for i, _ in found] == list(range(10))
    for (_, rest), prompt in zip(found, default_prompts(), strict=True):
        assert rest.startswith(f"{prompt}: ")
    assert "Iceland" in found[3][1][len(default_prompts()[3]) :]


@pytest.mark.slow
def test_smollm2_registry_run_equals_its_standalone_yaml_run(tmp_path: Path) -> None:
    standalone = tmp_path / "smollm2.yaml"
    standalone.write_text(render_standalone_yaml(DEFAULT_MODEL_ID))
    common = ["--model", DEFAULT_MODEL_ID, "--num-hidden-layers", "2", "--max-new-tokens", "4", "-p", "Hi"]
    code_a, out_a = _run(*common, "--use-registry")
    code_b, out_b = _run(*common, "--args.yaml-extra", str(standalone))
    assert code_a == 0 and code_b == 0, out_a + out_b
    assert "bfloat16" in out_a  # the entry's own config applies
    assert _prompt_lines(out_a) == _prompt_lines(out_b) != []
