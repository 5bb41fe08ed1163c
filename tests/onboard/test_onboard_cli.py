"""`onboardlm onboard` from the command line: a real onboarding, and every kind of bad input."""

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


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("no-such-org/no-such-model",), "not in the local HuggingFace cache"),
        (("bert",), "encoder-only"),
        (("t5",), "encoder-decoder"),
        (("./does/not/exist",), "no such file or directory"),
    ],
    ids=["unknown-hub-id", "encoder-only", "seq2seq", "missing-path"],
)
def test_bad_model_exits_2_with_one_message_and_writes_nothing(
    args: tuple[str, ...], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    result = invoke(*args, "--out", str(tmp_path / "out"))
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert result.output.count("error:") == 1
    assert not (tmp_path / "out").exists()


def test_directory_problems_exit_2(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    assert "no config.json" in invoke(str(model), "--out", str(tmp_path / "a")).output
    (model / "config.json").write_text("{broken")
    result = invoke(str(model), "--out", str(tmp_path / "a"))
    assert result.exit_code == 2 and "malformed JSON" in result.output
    (model / "config.json").write_text(
        json.dumps({"model_type": "my_own_llm", "auto_map": {"AutoConfig": "x.C"}})
    )
    result = invoke(str(model), "--out", str(tmp_path / "a"))
    assert result.exit_code == 2 and "--allow-remote-code" in result.output
    assert not (tmp_path / "a").exists()


def test_existing_output_needs_force(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = invoke("llama", "--out", str(out))
    assert result.exit_code == 2 and "--force" in result.output
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_unsupported_architecture_fails_with_the_module_and_feature(tmp_path: Path) -> None:
    out = tmp_path / "mamba"
    result = invoke("mamba", "--out", str(out))
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
