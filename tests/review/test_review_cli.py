"""``onboardlm review``: PASS exits 0, FAIL exits 1 with numbered failures, bad input exits 2."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from onboardlm.cli import app

runner = CliRunner()


def test_pass_exits_0_with_the_verdict(files) -> None:
    result = runner.invoke(app, ["review", str(files.llama), "--test-file", str(files.llama_tests)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("REVIEW RESULT: PASS")
    assert "PASSED: 31/31 (N/A: 5)" in result.output


def test_fail_exits_1_with_numbered_failures(files, edit) -> None:
    edited = edit(files.llama, ("inv_freq, persistent=False)", "inv_freq)"))
    result = runner.invoke(app, ["review", str(edited.path), "--test-file", str(files.llama_tests)])
    assert result.exit_code == 1, result.output
    assert result.output.startswith("REVIEW RESULT: FAIL")
    line = edited.line_of("self.register_buffer(")
    failures = result.output.split("\nFAILURES\n")[1].strip().splitlines()
    assert [entry.split(" ", 2)[:2] for entry in failures] == [
        ["1.", "[BA1]"],  # the persistent buffer is now a key transformers' checkpoint lacks
        ["2.", "[D1]"],
    ]
    assert all(
        entry.startswith(f"{i}. [") and f"{edited.path}:{line} — " in entry
        for i, entry in enumerate(failures, 1)
    )


def test_json_parses_and_carries_the_verdict(files, edit) -> None:
    edited = edit(files.llama, ("inv_freq, persistent=False)", "inv_freq)"))
    result = runner.invoke(app, ["review", str(edited.path), "--json"])
    assert result.exit_code == 1
    data = json.loads(result.output)
    assert data["result"] == "FAIL" and data["test_file"] is None
    assert {f["rule_id"] for f in data["failures"]} >= {"D1", "F1", "G4"}


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda tmp: tmp / "missing.py", "model file does not exist"),
        (lambda tmp: (tmp / "notes.txt", (tmp / "notes.txt").write_text("hi"))[0], "not a Python file"),
        (lambda tmp: (tmp / "bad.py", (tmp / "bad.py").write_text("def (:\n"))[0], "does not parse"),
        (
            lambda tmp: (tmp / "m.py", (tmp / "m.py").write_text("class M:\n    pass\n"))[0],
            "no *ForCausalLM (or *LMHeadModel) class",
        ),
    ],
    ids=["missing", "not-python", "syntax-error", "no-causal-lm"],
)
def test_bad_input_exits_2_with_one_message(tmp_path, make, message) -> None:
    path = make(tmp_path)
    result = runner.invoke(app, ["review", str(path)])
    assert result.exit_code == 2
    message_text = " ".join(result.output.split())  # rich wraps the one message at the terminal width
    assert message_text.startswith(f"error: {path}") and message in message_text
    assert "Traceback" not in result.output and "REVIEW RESULT" not in result.output


def test_both_reference_options_exit_2(files, tmp_path) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text("[]")
    result = runner.invoke(
        app, ["review", str(files.llama), "--reference", "llama", "--checkpoint-keys", str(keys)]
    )
    assert result.exit_code == 2 and "not both" in result.output
