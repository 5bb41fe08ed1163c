"""`onboardlm onboard` from the command line: real onboardings, a failing phase (bad input: tests/test_bad_inputs.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from onboardlm.cli import app

runner = CliRunner()


def invoke(*args: str):  # noqa: ANN201 - click Result
    return runner.invoke(app, ["onboard", *args])


def test_llama_onboards_with_every_phase_passing(tmp_path: Path) -> None:
    out = tmp_path / "llama"
    result = invoke("llama", "--out", str(out))
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "pass" and report["model_type"] == "llama"
    phases = {phase["name"]: phase["status"] for phase in report["phases"]}
    for name in ("resolve", "fit", "survey", "analyze", "generate", "testgen", "verify", "review"):
        assert phases[name] == "pass", (name, report["phases"])
    levels = {test["level"] for test in report["tests"]}
    assert levels == {"block", "layer", "model", "export"}
    assert all(test["passed"] for test in report["tests"])
    assert (out / "modeling_llama.py").is_file() and (out / "test_llama_modeling.py").is_file()
    assert (out / "report.md").read_text().startswith("# Onboarding report: llama")
    assert [p.name for p in tmp_path.iterdir()] == ["llama"]  # no staging folder left behind


def test_unsupported_architecture_fails_with_the_module_and_feature(tmp_path: Path) -> None:
    out = tmp_path / "rwkv"
    result = invoke("rwkv", "--out", str(out))
    assert result.exit_code == 1, result.output
    report = json.loads((out / "report.json").read_text())
    analyze = next(phase for phase in report["phases"] if phase["name"] == "analyze")
    assert analyze["status"] == "fail" and "unsupported feature" in analyze["summary"]
    skipped = {phase["name"] for phase in report["phases"] if phase["status"] == "skipped"}
    assert {"generate", "testgen", "verify", "review"} <= skipped
    assert not list(out.glob("modeling_*.py"))  # nothing unverified is emitted


def test_the_shipped_smollm2_gguf_onboards_and_answers(tmp_path: Path) -> None:
    """The README's main job: a real checkpoint through every phase, then the end-to-end run."""
    out = tmp_path / "smollm2"
    result = invoke("--out", str(out))  # no MODEL: the shipped SmolLM2-135M-Instruct GGUF
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "pass" and report["model_type"] == "llama"
    assert {phase["name"]: phase["status"] for phase in report["phases"]}["e2e"] == "pass"
    assert {test["level"] for test in report["tests"]} == {"block", "layer", "model", "export"}
    answers = {p["prompt"].strip(): p["output"] for p in report["prompts"] if p["run"] == "full"}
    assert len(answers) == 10
    assert "Reyk" in answers["Where is the capital of Iceland?"]  # the model's real knowledge
    assert "[PROMPT 3] Where is the capital of Iceland? : " in result.output
    assert "registered as HuggingFaceTB/SmolLM2-135M-Instruct" in json.dumps(report["phases"])


def test_a_review_failure_stops_before_registration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A generated file that works but breaks the contract (a past_key_values parameter) fails CA3."""
    from onboardlm.onboard import generate

    original = generate.generate_model_file

    def with_cache_parameter(spec):  # noqa: ANN001, ANN202
        text = original(spec)
        anchor = "        inputs_embeds: torch.Tensor | None = None,\n        **kwargs,"
        assert anchor in text
        return text.replace(
            anchor,
            "        inputs_embeds: torch.Tensor | None = None,\n"
            "        past_key_values: object = None,\n        **kwargs,",
        )

    monkeypatch.setattr(generate, "generate_model_file", with_cache_parameter)
    out = tmp_path / "llama"
    result = invoke("llama", "--out", str(out))
    assert result.exit_code == 1, result.output
    report = json.loads((out / "report.json").read_text())
    phases = {phase["name"]: phase["status"] for phase in report["phases"]}
    assert phases["verify"] == "pass" and phases["review"] == "fail" and phases["register"] == "skipped"
    failing = [f for f in report["review"]["failures"] if f["rule_id"] == "CA3"]
    assert failing and failing[0]["file"].endswith("modeling_llama.py")
    assert "## Review" in (out / "report.md").read_text() and "CA3" in (out / "report.md").read_text()
