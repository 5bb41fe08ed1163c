"""docs/support-matrix.md and the onboarding records: the committed page is what its inputs give, the
features come from the lean files' code, records link to registry entries, and a change to any input
makes ``--check`` fail."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from onboardlm.cli import app
from onboardlm.errors import OnboardlmError
from onboardlm.registry.checkout import CheckoutLayout
from onboardlm.registry.docs import record_and_refresh
from onboardlm.registry.matrix import build_matrix, main, matrix_text, scan_lean_file, tensor_parallel_stems
from onboardlm.registry.records import OnboardRecord, match_entry, read_records, record_from_report

CHECKOUT = CheckoutLayout.at()
SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"
NAMES = [SMOL, "HuggingFaceTB/SmolLM2-1.7B-Instruct", "meta-llama/Llama-3.2-1B-Instruct"]


def test_committed_support_matrix_is_current() -> None:
    committed = CHECKOUT.matrix_file.read_text(encoding="utf-8")
    assert committed == matrix_text(CHECKOUT), (
        "docs/support-matrix.md is out of date: run `onboardlm registry matrix` and commit it"
    )


@pytest.mark.parametrize(
    ("stem", "features", "lean_class"),
    [
        ("llama", (), "LlamaForCausalLM"),
        ("deepseek_v3", ("MoE", "MLA"), "DeepseekV3ForCausalLM"),
        ("gpt_oss", ("MoE", "sliding window", "attention sinks"), "GptOssForCausalLM"),
        ("gemma2", ("sliding window", "attention soft-cap"), "Gemma2ForCausalLM"),
        ("qwen3_moe", ("MoE", "q/k norm"), "Qwen3MoeForCausalLM"),
        ("bloom", ("ALiBi",), "BloomForCausalLM"),
    ],
)
def test_features_are_read_from_the_lean_files_code(
    stem: str, features: tuple[str, ...], lean_class: str
) -> None:
    scanned = scan_lean_file(CHECKOUT.custom_dir / f"modeling_{stem}.py")
    assert (scanned.stem, scanned.features, scanned.lean_class) == (stem, features, lean_class)


def test_a_file_without_registration_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "modeling_x.py"
    path.write_text("import torch\n")
    with pytest.raises(OnboardlmError, match="not a lean model file"):
        scan_lean_file(path)


def test_tensor_parallel_types_are_the_lean_files_the_sharding_test_loads() -> None:
    stems = tensor_parallel_stems(CHECKOUT.sharding_test)
    assert {"llama", "qwen3", "qwen3_moe", "gemma2", "mixtral", "deepseek_v3"} <= stems
    assert "gpt2" not in stems


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("SmolLM2-135M-Instruct.Q4_1", SMOL),  # a GGUF file of a registered model
        ("huggingfacetb/smollm2-135m-instruct", SMOL),  # the id in another case
        ("smollm2-1.7b-instruct-q4_k_m", "HuggingFaceTB/SmolLM2-1.7B-Instruct"),
        ("SmolLM2-135M-Instruct-abliterated", None),  # a different model with a longer name
        ("llama", None),  # a bare model_type
    ],
)
def test_a_report_links_to_its_registry_entry(model: str, expected: str | None) -> None:
    assert match_entry(model, NAMES) == expected


def _report(model: str = "SmolLM2-135M-Instruct.Q4_1", status: str = "pass") -> dict:
    tests = [
        {"level": "block", "name": "test_mlp", "metric": 1.23456e-7, "tolerance": 1e-5, "passed": True},
        {"level": "block", "name": "test_attention", "metric": 4.5e-7, "tolerance": 1e-5, "passed": True},
        {"level": "model", "name": "test_bf16", "metric": 0.0101, "tolerance": 0.05, "passed": True},
        {"level": "export", "name": "test_export", "metric": None, "tolerance": None, "passed": False},
    ]
    phases = [
        {
            "name": "review",
            "status": "pass",
            "seconds": 0.1,
            "summary": "REVIEW RESULT: PASS, 31/31 rules passed",
        },
        {"name": "e2e", "status": "pass", "seconds": 20.0, "summary": "full run: 10 prompts answered"},
    ]
    return {"model": model, "model_type": "llama", "status": status, "phases": phases, "tests": tests}


def test_record_keeps_counts_worst_metric_per_level_and_summaries() -> None:
    record = record_from_report(_report(), NAMES, "5.25.0")
    assert record.registered_as == SMOL and record.slug == "smollm2-135m-instruct"
    assert (record.tests_passed, record.tests_total) == (3, 4)
    assert record.worst_metric == {"block": 4.5e-7, "model": 0.0101}
    assert record.review.endswith("31/31 rules passed") and record.e2e == "full run: 10 prompts answered"
    assert OnboardRecord(**json.loads(record.to_json())) == record


def test_a_report_without_its_keys_is_one_error() -> None:
    with pytest.raises(OnboardlmError, match="not an onboarding report"):
        record_from_report({"model": "x"}, NAMES, "5.25.0")


@pytest.fixture
def checkout(tmp_path: Path) -> CheckoutLayout:
    """A small checkout: the shipped registry, two lean files, a two-type coverage sweep, the TP test."""
    root = tmp_path / "checkout"
    (root / "src" / "onboardlm").mkdir(parents=True)
    (root / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    layout = CheckoutLayout(root)
    shutil.copytree(
        CHECKOUT.registry_dir, layout.registry_dir, ignore=shutil.ignore_patterns("*.py", "__pycache__")
    )
    layout.custom_dir.mkdir(parents=True)
    for stem in ("llama", "mixtral"):
        shutil.copy2(CHECKOUT.custom_dir / f"modeling_{stem}.py", layout.custom_dir)
    layout.sharding_test.parent.mkdir(parents=True)
    layout.sharding_test.write_text('LLAMA = "onboardlm.models.custom.modeling_llama:LlamaForCausalLM"\n')
    swept = {"verdict": "pass", "tests": "15/15", "worst_rmse": {"model": 0.0}}
    types = {
        "llama": {"class": "LlamaForCausalLM", "tiny": swept},
        "mixtral": {
            "class": "MixtralForCausalLM",
            "tiny": {**swept, "tests": "13/13", "worst_rmse": {"model": 2.1e-4}},
        },
        "qwen3": {"class": "Qwen3ForCausalLM", "tiny": {**swept, "tests": "16/16"}},
        "bert": {"class": "BertLMHeadModel", "tiny": {"verdict": "refused", "tests": None, "worst_rmse": {}}},
    }
    counts = {"tiny": {"pass": 3, "refused": 1, "fail": 0}}
    layout.coverage_file.parent.mkdir(parents=True)
    layout.coverage_file.write_text(json.dumps({"transformers": "5.25.0", "counts": counts, "types": types}))
    return layout


def test_matrix_rows_from_the_inputs(checkout: CheckoutLayout) -> None:
    record_and_refresh(_report(), checkout)
    matrix = build_matrix(checkout)
    rows = {row.model_type: row for row in matrix.architectures}
    assert list(rows) == ["llama", "mixtral", "qwen3"]  # shipped first, then what else passes; bert refused
    llama, mixtral, qwen3 = rows["llama"], rows["mixtral"], rows["qwen3"]
    assert (llama.shipped, llama.tensor_parallel, llama.checkpoints, llama.verdict) == (
        True,
        True,
        (SMOL,),
        "pass (15/15)",
    )
    assert (mixtral.features, mixtral.tensor_parallel, mixtral.worst_model_rmse) == (("MoE",), False, 2.1e-4)
    assert (qwen3.shipped, qwen3.architecture) == (False, "Qwen3ForCausalLM")
    by_name = {row.name: row for row in matrix.checkpoints}
    assert len(by_name) == 9 and by_name[SMOL].record is not None and by_name[SMOL].dtype == "bfloat16"
    assert by_name[SMOL].cookbook == "../examples/cookbook/smollm2-135m-instruct.ipynb"
    assert by_name["meta-llama/Llama-3.1-8B-Instruct"].world_size == 2
    assert by_name["meta-llama/Llama-3.1-8B-Instruct"].record is None
    text = checkout.matrix_file.read_text()
    assert (
        "| llama | LlamaForCausalLM | - | pass (15/15) | 0 | yes | HuggingFaceTB/SmolLM2-135M-Instruct |"
        in text
    )
    assert "3 pass, 1 refused" in text


def test_check_fails_after_any_input_changes(checkout: CheckoutLayout, capsys: pytest.CaptureFixture) -> None:
    root = ["--root", str(checkout.root)]
    assert main(["--check", *root]) == 1  # never written
    assert main(["--write", *root]) == 0 and main(["--check", *root]) == 0
    shutil.copy2(CHECKOUT.custom_dir / "modeling_gpt_oss.py", checkout.custom_dir)  # a new lean file
    assert main(["--check", *root]) == 1
    assert "out of date" in capsys.readouterr().err
    main(["--write", *root])
    record_and_refresh(_report(), checkout)  # a record: its refresh rewrites the page itself
    assert main(["--check", *root]) == 0
    data = json.loads(checkout.coverage_file.read_text())
    data["types"]["llama"]["tiny"]["worst_rmse"]["model"] = 0.5
    checkout.coverage_file.write_text(json.dumps(data))
    assert main(["--check", *root]) == 1


def test_a_model_outside_the_registry_gets_no_record(checkout: CheckoutLayout) -> None:
    update = record_and_refresh({**_report(model="qwen3"), "model_type": "qwen3"}, checkout)
    assert update.record is None and read_records(checkout.records_dir) == []
    assert update.files == [checkout.matrix_file]


def test_cli_matrix_check_and_record(checkout: CheckoutLayout, tmp_path: Path) -> None:
    runner = CliRunner()
    root = ["--root", str(checkout.root)]
    stale = runner.invoke(app, ["registry", "matrix", "--check", *root])
    assert stale.exit_code == 1 and "out of date" in stale.output
    report = tmp_path / "report.json"
    report.write_text(json.dumps(_report()))
    recorded = runner.invoke(app, ["registry", "record", str(report), *root], terminal_width=250)
    assert recorded.exit_code == 0, recorded.output
    assert (checkout.records_dir / "smollm2-135m-instruct.json").is_file()
    assert runner.invoke(app, ["registry", "matrix", "--check", *root]).exit_code == 0
    assert runner.invoke(app, ["registry", "cookbook", "--check", *root]).exit_code == 0
    missing = runner.invoke(app, ["registry", "record", str(tmp_path / "nope.json"), *root])
    assert missing.exit_code == 2 and "file not found" in missing.output


def _result(tmp_path: Path):
    from onboardlm.onboard.phases import PhaseRecord
    from onboardlm.onboard.result import OnboardResult, TestRecord

    phases = [PhaseRecord("review", "pass", 0.1, "REVIEW RESULT: PASS, 31/31 rules passed")]
    tests = [TestRecord("model", "test_logits", 1e-6, 1e-5, True)]
    return OnboardResult("SmolLM2-135M-Instruct.Q4_1", "llama", tmp_path / "out", phases, tests=tests)


def test_onboard_into_package_records_and_refreshes(
    checkout: CheckoutLayout, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from onboardlm.onboard import pipeline

    monkeypatch.setattr(pipeline.PackageTargets, "checkout_root", staticmethod(lambda: checkout.root))
    result = _result(tmp_path)
    files = pipeline._refresh_docs(result)
    record = checkout.records_dir / "smollm2-135m-instruct.json"
    notebook = checkout.cookbook_dir / "smollm2-135m-instruct.ipynb"
    assert files == [record, checkout.matrix_file, notebook] and result.not_done == []
    assert read_records(checkout.records_dir)[0].worst_metric == {"model": 1e-6}
    assert main(["--check", "--root", str(checkout.root)]) == 0


def test_onboard_into_package_notes_a_failed_refresh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from onboardlm.onboard import pipeline

    monkeypatch.setattr(pipeline.PackageTargets, "checkout_root", staticmethod(lambda: tmp_path))
    result = _result(tmp_path)
    assert pipeline._refresh_docs(result) == []
    assert result.not_done == [
        f"docs: support matrix and cookbook not refreshed: {tmp_path}: not an onboardlm source checkout "
        "(run it in a clone installed with `pip install -e .`)"
    ]


def test_outside_a_checkout_each_command_is_one_line_and_exit_2(tmp_path: Path) -> None:
    runner = CliRunner()
    for command in (["matrix"], ["cookbook", "--check"], ["record", str(tmp_path / "r.json")]):
        result = runner.invoke(app, ["registry", *command, "--root", str(tmp_path)], terminal_width=250)
        assert result.exit_code == 2, command
        assert result.output.count("\n") == 1 and "not an onboardlm source checkout" in result.output
    assert main(["--check", "--root", str(tmp_path)]) == 2
