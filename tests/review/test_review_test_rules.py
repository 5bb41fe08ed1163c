"""Test-file rules (F, G, H2): each passes on the reference test files and fails, at the right line,
on a small edit of them; the rules that need a test file fail without one."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from onboardlm.review import RULES, Status
from onboardlm.review.pytest_run import TestRun, run_pytest

MLP_ASSERT = (
    "    torch.testing.assert_close(model(x), reference(x), rtol=1e-3, atol=1e-3)\n\n\ndef test_rmsnorm"
)
MLP_TRANSFER = "    reference, model = hf.LlamaMLP(config).eval(), lean.LlamaMLP(config).eval()\n    transfer_weights(reference, model)\n"
SECOND_SHAPE = """        second = torch.randint(0, config.vocab_size, (3, 21))
        torch.testing.assert_close(
            gm(input_ids=second, position_ids=positions(3, 21)).logits,
            model(input_ids=second, position_ids=positions(3, 21)).logits,
        )
"""
SMOKE_TEST = """

def test_forward_runs(config: LlamaConfig) -> None:
    lean.LlamaForCausalLM(config)(torch.zeros(1, 3, dtype=torch.long), positions(1, 3))
"""
ISNAN_TEST = """

def test_logits_are_finite(config: LlamaConfig) -> None:
    logits = lean.LlamaForCausalLM(config)(torch.zeros(1, 3, dtype=torch.long), positions(1, 3)).logits
    assert not torch.isnan(logits).any()
"""
REFERENCE_CLASS = """

class ReferenceRMSNorm(torch.nn.Module):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
"""
LAST_LINE = "            model(input_ids=second, position_ids=positions(3, 21)).logits,\n        )\n"


@dataclass(frozen=True)
class Case:
    """An edit of the golden test file that must fail ``rule`` on the line holding ``marker``."""

    rule: str
    what: str
    replacements: tuple[tuple[str, str], ...]
    marker: str | None  # None: the finding is about a missing test (line 1)


CASES = [
    Case("F1", "large hidden size", (("        hidden_size=64,\n", "        hidden_size=4096,\n"),), "hidden_size=4096"),
    Case("F1", "too many layers", (("        num_hidden_layers=3,\n", "        num_hidden_layers=12,\n"),), "num_hidden_layers=12"),
    Case("F2", "smoke test", ((LAST_LINE, LAST_LINE + SMOKE_TEST),), "def test_forward_runs"),
    Case("F3", "isnan-only test", ((LAST_LINE, LAST_LINE + ISNAN_TEST),), "assert not torch.isnan"),
    Case("F4", "reference re-implemented in the test", (("\n\ndef make_config", REFERENCE_CLASS + "\n\ndef make_config"), ("    reference = hf.LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)\n", "    reference = ReferenceRMSNorm(config.hidden_size)\n")), "class ReferenceRMSNorm"),
    Case("G1", "identical-math tolerance too loose", ((MLP_ASSERT, MLP_ASSERT.replace("rtol=1e-3", "rtol=1e-2")),), "def test_mlp_is_identical_math"),
    Case("G1", "attention tolerance too loose", (('rmse_ratio_tol=0.10, msg="attention"', 'rmse_ratio_tol=0.2, msg="attention"'),), "def test_attention"),
    Case("G1", "no norm test", (("def test_rmsnorm_is_identical_math", "def _unused_rmsnorm_check"),), None),
    Case("G2", "layer tolerance too loose", (('rmse_ratio_tol=0.05, msg="decoder layer"', 'rmse_ratio_tol=0.1, msg="decoder layer"'),), "def test_decoder_layer"),
    Case("G3", "logits tolerance too loose", (('rmse_ratio_tol=0.05, msg=f"logits', 'rmse_ratio_tol=0.5, msg=f"logits'),), "def test_full_model_logits"),
    Case("G3", "full model on CUDA", (("    input_ids = torch.randint(0, config.vocab_size, (2, 13))\n", '    input_ids = torch.randint(0, config.vocab_size, (2, 13), device="cuda")\n'),), 'device="cuda"'),
    Case("G4", "test without the export level", (("def test_export_with_dynamic_batch_and_sequence", "def _export_not_a_test"),), None),
    Case("G4", "export without dynamic shapes", ((", dynamic_shapes=dynamic\n", "\n"),), "gm = torch_export_to_gm"),
    Case("G4", "exported output never compared", ((SECOND_SHAPE, ""), ("        torch.testing.assert_close(\n            gm(input_ids=input_ids", "        print(\n            gm(input_ids=input_ids")), "gm = torch_export_to_gm"),
    Case("G5", "one shape only", ((SECOND_SHAPE, ""),), "gm = torch_export_to_gm"),
    Case("G5", "test without the export level", (("def test_export_with_dynamic_batch_and_sequence", "def _export_not_a_test"),), None),
    Case("H2", "weights copied by hand", ((MLP_TRANSFER, "    reference, model = hf.LlamaMLP(config).eval(), lean.LlamaMLP(config).eval()\n    model.gate_proj.weight.data.copy_(reference.gate_proj.weight.data)\n"),), ".copy_("),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.rule}-{c.what}")
def test_edit_fails_the_rule_at_its_line(case, files, edit, review_rule, lines_failed) -> None:
    edited = edit(files.llama_tests, *case.replacements)
    report = review_rule(case.rule, files.llama, edited.path)
    assert report.result(case.rule).status is Status.FAIL
    expected = edited.line_of(case.marker) if case.marker else 1
    assert expected in lines_failed(report, case.rule), report.result(case.rule).findings


TEST_RULES = [r.id for r in RULES if r.needs_tests]


@pytest.mark.parametrize("rule_id", TEST_RULES)
def test_reference_test_files_pass_the_rule(rule_id, files, review_rule) -> None:
    for model, tests in ((files.llama, files.llama_tests), (files.moe, files.moe_tests)):
        result = review_rule(rule_id, model, tests).result(rule_id)
        assert result.status is Status.PASS, (model.name, result.findings)


@pytest.mark.parametrize("rule_id", TEST_RULES)
def test_rules_about_tests_fail_without_a_test_file(rule_id, files, review_rule) -> None:
    finding = review_rule(rule_id, files.llama).result(rule_id).findings[0]
    assert finding.status is Status.FAIL and "--test-file" in finding.reason


def test_every_test_rule_has_a_failing_example() -> None:
    assert {case.rule for case in CASES} == set(TEST_RULES)


def test_moe_block_needs_its_tolerance(files, edit, review_rule, lines_failed) -> None:
    edited = edit(
        files.moe_tests,
        (
            "assert_rmse_close(model(x), reference(x), 0.02)",
            "assert_rmse_close(model(x), reference(x), 0.05)",
        ),
    )
    report = review_rule("G1", files.moe, edited.path)
    assert lines_failed(report, "G1") == [edited.line_of("def test_moe_block_from_packed_experts")]


def test_layer_with_two_kinds_needs_both_built(files, edit, review_rule, lines_failed) -> None:
    edited = edit(
        files.moe_tests,
        (
            '@pytest.mark.parametrize("index", [0, 1], ids=["dense", "moe"])\ndef test_decoder_layer(config: Qwen3MoeConfig, index: int)',
            "def test_decoder_layer(config: Qwen3MoeConfig, index: int = 1)",
        ),
    )
    report = review_rule("G2", files.moe, edited.path)
    assert edited.line_of("def test_decoder_layer") in lines_failed(report, "G2")


def test_layer_kind_fields_must_be_set_without_tiny_config(files, edit, review_rule, lines_failed) -> None:
    edited = edit(files.moe_tests, ("        mlp_only_layers=[0],\n", ""))
    report = review_rule("F1", files.moe, edited.path)
    assert "config.mlp_only_layers" in report.failures[0].reason
    tiny = edit(
        files.moe_tests,
        ("    return Qwen3MoeConfig(\n", "    return tiny_config(Qwen3MoeConfig(\n"),
        ('        attn_implementation="eager",\n    )\n', '        attn_implementation="eager",\n    ))\n'),
        ("        mlp_only_layers=[0],\n", ""),
        ("from onboardlm.testing import", "from onboardlm.testing import tiny_config,"),
    )
    assert review_rule("F1", files.moe, tiny.path).passed


def test_tolerance_passed_through_a_helper_is_read(files, edit, review_rule) -> None:
    helper = "def check_close(actual, expected, tol):\n    assert_rmse_close(actual, expected, tol)\n\n\ndef test_attention"
    edited = edit(
        files.llama_tests,
        ("def test_attention", helper),
        (
            'assert_rmse_close(model(x, rope), expected, rmse_ratio_tol=0.10, msg="attention")',
            "check_close(model(x, rope), expected, 0.10)",
        ),
    )
    assert review_rule("G1", files.llama, edited.path).passed
    loose = edit(
        files.llama_tests,
        ("def test_attention", helper),
        (
            'assert_rmse_close(model(x, rope), expected, rmse_ratio_tol=0.10, msg="attention")',
            "check_close(model(x, rope), expected, 0.3)",
        ),
    )
    assert not review_rule("G1", files.llama, loose.path).passed


def test_run_tests_maps_failed_tests_to_their_level(files, review_rule, lines_failed, monkeypatch) -> None:
    names = {"test_mlp_is_identical_math", "test_rmsnorm_is_identical_math", "test_rotary_tables_match"}
    names |= {"test_decoder_layer", "test_full_model_logits", "test_position_ids_are_required"}
    failed = {"test_attention": "AssertionError: RMSE ratio 0.3 > 0.1"}
    run = TestRun(True, "1 failed, 7 passed", failed=failed, passed=frozenset(names))
    monkeypatch.setattr("onboardlm.review.context.run_pytest", lambda path: run)
    report = review_rule({"G1", "G2", "G3"}, files.llama, files.llama_tests, run_tests=True)
    lines = files.llama_tests.read_text().splitlines()
    assert lines_failed(report, "G1") == [lines.index("def test_attention(config: LlamaConfig) -> None:") + 1]
    assert report.result("G2").status is Status.PASS and report.result("G3").status is Status.PASS


def test_run_tests_fails_level_tests_that_did_not_run(files, review_rule, monkeypatch) -> None:
    monkeypatch.setattr("onboardlm.review.context.run_pytest", lambda path: TestRun(True, "0 tests ran"))
    report = review_rule("G4", files.llama, files.llama_tests, run_tests=True)
    assert report.failures[0].reason.endswith("did not run (0 tests ran)")


def test_run_tests_fails_every_level_when_pytest_cannot_run(files, review_rule, monkeypatch) -> None:
    monkeypatch.setattr(
        "onboardlm.review.context.run_pytest", lambda path: TestRun(False, "pytest exited with code 4")
    )
    report = review_rule({"G1", "G4"}, files.llama, files.llama_tests, run_tests=True)
    assert all("could not be run" in f.reason for f in report.failures) and len(report.failures) == 2


def test_run_pytest_reads_outcomes_per_test_function(tmp_path: Path) -> None:
    test_file = tmp_path / "sample_tests.py"
    test_file.write_text(
        "import pytest\n\n"
        "@pytest.mark.parametrize('x', [1, 2])\ndef test_one(x):\n    assert x == 1\n\n"
        "def test_two():\n    assert True\n\n"
        "def test_three():\n    pytest.skip('no reference')\n"
    )
    run = run_pytest(test_file)
    assert run.ran
    assert (
        set(run.failed) == {"test_one"} and set(run.skipped) == {"test_three"} and run.passed == {"test_two"}
    )
    assert "assert 2 == 1" in run.failed["test_one"] and run.skipped["test_three"] == "Skipped: no reference"
    assert run.summary == "1 failed, 2 passed, 1 skipped"


def test_run_pytest_says_why_nothing_ran(tmp_path: Path) -> None:
    broken = tmp_path / "broken_tests.py"
    broken.write_text("import no_such_module_here\n\ndef test_one():\n    pass\n")
    run = run_pytest(broken)
    assert (
        not run.ran and run.summary.startswith("collection failed") and "no_such_module_here" in run.summary
    )
    assert run_pytest(tmp_path / "absent_tests.py") == TestRun(
        False, f"{tmp_path / 'absent_tests.py'}: no such test file"
    )
