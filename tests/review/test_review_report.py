"""The rule registry, the report (text and data) and bad input."""

from __future__ import annotations

import json
import re

import pytest

from onboardlm.ops import DECLARED_OPS
from onboardlm.review import RULES, ReviewInputError, render_report, review_model_file
from onboardlm.review.findings import GROUPS
from onboardlm.review.operations import CANONICAL_OPS, SHARDING_HINT_OPS

CATALOGUE_IDS = [
    "B1",
    "B2",
    "B3",
    "BA1",
    "BA2",
    "C1",
    "C2",
    "C3",
    "C4",
    "C5",
    "C6",
    "C7",
    "C8",
    "C9",  # issue 8: sharding hints (not in REVIEW_RULES.md, which predates it)
    "CA1",
    "CA2",
    "CA3",
    "D1",
    "D2",
    "D4",
    "D5",
    "F1",
    "F2",
    "F3",
    "F4",
    "G1",
    "G2",
    "G3",
    "G4",
    "G5",
    "H1",
    "H2",
    "A1",
    "A2",
    "A3",
    "A4",
]
TRAINING_EDIT = (
    '        return torch.ops.auto_deploy.all_reduce(down, layer_type="mlp")\n',
    '        if self.training:\n            down = down * 1.0\n        return torch.ops.auto_deploy.all_reduce(down, layer_type="mlp")\n',
)


def test_every_catalogue_rule_is_registered_once_in_order() -> None:
    assert [r.id for r in RULES] == CATALOGUE_IDS
    assert all(r.text and r.group in GROUPS for r in RULES)


def test_canonical_ops_are_the_registered_ones() -> None:
    assert set(DECLARED_OPS) == CANONICAL_OPS | SHARDING_HINT_OPS


@pytest.fixture
def failing_report(files, edit):
    edited = edit(files.llama, TRAINING_EDIT)
    return edited, review_model_file(edited.path, files.llama_tests)


def test_text_report_has_verdict_groups_count_and_numbered_failures(failing_report) -> None:
    edited, report = failing_report
    text = render_report(report).plain
    lines = text.splitlines()
    assert lines[0] == "REVIEW RESULT: FAIL"
    headings = [line for line in lines if re.match(r"^[A-Z]+ — ", line)]
    assert headings == [f"{group} — {title}" for group, title in GROUPS.items()]
    assert f"PASSED: {report.num_passed}/{len(report.applicable)} (N/A: 5)" in lines
    numbered = lines[lines.index("FAILURES") + 1 :]
    assert numbered and all(line.startswith(f"{i}. [") for i, line in enumerate(numbered, start=1))
    line = edited.line_of("if self.training")
    assert any(f"[C5] {edited.path}:{line} — " in entry for entry in numbered)
    assert any(f"[CA2] {edited.path}:{line} — " in entry for entry in numbered)


def test_data_report_matches_the_text(failing_report) -> None:
    _, report = failing_report
    data = json.loads(json.dumps(report.to_dict()))
    assert data["result"] == "FAIL"
    assert [g["id"] for g in data["groups"]] == list(GROUPS)
    statuses = [rule["status"] for group in data["groups"] for rule in group["rules"]]
    assert data["passed"] == statuses.count("PASS") and data["applicable"] == len(statuses) - statuses.count(
        "N/A"
    )
    assert [f["number"] for f in data["failures"]] == list(range(1, len(report.failures) + 1))
    assert {f["rule_id"] for f in data["failures"]} == {"C5", "CA2"}


def test_a_passing_report_lists_no_failures(files) -> None:
    report = review_model_file(files.llama, files.llama_tests, rule_ids={"C1", "G4"})
    text = render_report(report).plain
    assert text.startswith("REVIEW RESULT: PASS") and "FAILURES" not in text and "PASSED: 2/2" in text


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.py", None, "model file does not exist"),
        ("model.txt", "x = 1\n", "not a Python file"),
        ("broken.py", "class A(:\n", "does not parse: line 1"),
        ("no_model.py", "class LlamaModel:\n    pass\n", "no \\*ForCausalLM \\(or \\*LMHeadModel\\) class"),
    ],
)
def test_bad_model_file_is_refused_with_one_message(tmp_path, name, content, message) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(ReviewInputError, match=message) as raised:
        review_model_file(path)
    assert str(path) in str(raised.value)


def test_bad_test_file_is_refused(files, tmp_path) -> None:
    broken = tmp_path / "test_broken.py"
    broken.write_text("def test_x(:\n")
    with pytest.raises(ReviewInputError, match="test file does not parse"):
        review_model_file(files.llama, broken)


def test_unknown_rule_id_is_refused(files) -> None:
    with pytest.raises(ReviewInputError, match="unknown rule id"):
        review_model_file(files.llama, rule_ids={"Z9"})
