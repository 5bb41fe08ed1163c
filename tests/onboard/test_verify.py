"""verify: runs a test file in a subprocess and reports, per test, level, metric, tolerance and outcome;
bad input gives a report that says why instead of an exception."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from transformers import AutoConfig

from onboardlm.onboard.testgen import generate_test_file
from onboardlm.onboard.verify import LEVELS, TestReport, level_of, verify

ROOT = Path(__file__).resolve().parents[2]
LLAMA_FILE = ROOT / "src/onboardlm/models/custom/modeling_llama.py"


def number_after(prefix: str, text: str) -> float:
    match = re.search(re.escape(prefix) + r"([0-9.e+-]+)", text)
    assert match is not None, text
    return float(match.group(1))


def write_llama_test(folder: Path, lean_module: str) -> Path:
    path = folder / "test_llama_modeling.py"
    path.write_text(generate_test_file(AutoConfig.for_model("llama"), lean_module, "llama"))
    return path


@pytest.fixture(scope="module")
def golden(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TestReport]:
    folder = tmp_path_factory.mktemp("golden")
    test_file = write_llama_test(folder, "onboardlm.models.custom.modeling_llama")
    return folder, verify(test_file, timeout_s=300)


def test_generated_llama_test_passes_all_four_levels(golden: tuple[Path, TestReport]) -> None:
    folder, report = golden
    assert report.passed, report.output_tail
    assert report.reason == "" and report.output_tail == ""
    assert report.levels == dict.fromkeys(LEVELS, True)
    assert all(result.passed and result.outcome == "passed" for result in report.tests)
    by_name = {result.name: result for result in report.tests}
    attention = by_name["test_block_llama_attention[model.layers.0.self_attn]"]
    assert (attention.level, attention.metric_kind, attention.tolerance) == ("block", "rmse_ratio", 1e-5)
    assert 0.0 <= attention.metric < 1e-6
    mlp = by_name["test_block_llama_mlp[model.layers.0.mlp]"]
    assert (mlp.metric_kind, mlp.tolerance) == ("max_abs_error", 1e-3) and mlp.metric < 1e-4
    layer = by_name["test_layer_llama_decoder_layer[layer0]"]
    assert (layer.level, layer.metric_kind, layer.tolerance) == ("layer", "rmse_ratio", 1e-5)
    assert by_name["test_model_logits_fp32"].tolerance == 1e-5
    assert by_name["test_model_logits_bf16"].tolerance == 0.05
    assert by_name["test_export_dynamic_batch_and_sequence"].level == "export"
    assert sorted(p.name for p in folder.iterdir()) == ["test_llama_modeling.py"]  # nothing written
    as_json = json.loads(json.dumps(report.to_dict()))
    assert as_json["passed"] and len(as_json["tests"]) == len(report.tests)


def test_broken_lean_file_fails_at_the_level_of_the_bug(tmp_path: Path) -> None:
    source = LLAMA_FILE.read_text()
    assert "self.act_fn(gate) * up" in source
    (tmp_path / "modeling_llama.py").write_text(
        source.replace("self.act_fn(gate) * up", "self.act_fn(up) * gate")
    )
    report = verify(write_llama_test(tmp_path, "modeling_llama"), pythonpath=tmp_path, timeout_s=300)
    assert not report.passed and report.reason == ""
    assert report.levels == {"block": False, "layer": False, "model": False, "export": True}
    failed = {result.name: result for result in report.failed}
    mlp = failed["test_block_llama_mlp[model.layers.0.mlp]"]
    assert mlp.metric_kind == "max_abs_error" and mlp.metric > 10 * mlp.tolerance
    # the metric is the difference torch.testing.assert_close itself reported
    assert mlp.metric == pytest.approx(number_after("Greatest absolute difference: ", mlp.message))
    layer = failed["test_layer_llama_decoder_layer[layer0]"]
    assert layer.metric_kind == "rmse_ratio" and layer.metric > layer.tolerance == 1e-5
    assert layer.metric == pytest.approx(number_after("RMSE ratio ", layer.message), rel=1e-3)
    assert not any(name.startswith(("test_block_llama_attention", "test_block_llama_rms")) for name in failed)
    assert "test_block_llama_mlp" in report.output_tail


def test_missing_file_timeout_and_collection_error_are_reported(tmp_path: Path) -> None:
    missing = verify(tmp_path / "test_nothing.py", timeout_s=10)
    assert not missing.passed and "no such test file" in missing.reason

    slow = tmp_path / "test_slow.py"
    slow.write_text("import time\n\n\ndef test_sleeps() -> None:\n    time.sleep(60)\n")
    timed_out = verify(slow, timeout_s=0.5)
    assert not timed_out.passed and timed_out.reason == "pytest did not finish within 0.5 s"

    broken = tmp_path / "test_broken.py"
    broken.write_text("import modeling_that_does_not_exist\n\n\ndef test_x() -> None:\n    assert True\n")
    crashed = verify(broken, timeout_s=120)
    assert not crashed.passed and crashed.tests == ()
    assert crashed.reason.startswith("collection failed") and "modeling_that_does_not_exist" in crashed.reason


def test_level_comes_from_the_name_prefix() -> None:
    assert [level_of(f"test_{level}_x[a]") for level in LEVELS] == list(LEVELS)
    assert level_of("test_something") == "other"
