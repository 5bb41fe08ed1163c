"""Staging folder, phase bookkeeping, registration and the report, each on its own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from onboardlm.errors import OnboardlmError
from onboardlm.onboard.fit import fit
from onboardlm.onboard.install import PackageTargets, render_custom_init
from onboardlm.onboard.phases import PhaseLog, PhaseOutcome
from onboardlm.onboard.register import find_registered, register
from onboardlm.onboard.report import render_markdown, report_data, write_report
from onboardlm.onboard.resolve import resolve
from onboardlm.onboard.result import OnboardResult, TestRecord
from onboardlm.onboard.staging import OutputExists, StagingFolder, check_destination, output_name
from onboardlm.registry.layout import shipped_registry_dir
from onboardlm.registry.loader import read_entries


@pytest.mark.parametrize(
    ("name", "folder"),
    [
        ("Qwen/Qwen3-8B", "Qwen__Qwen3-8B"),
        ("qwen3", "qwen3"),
        ("/models/SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct.Q4_1"),
        ("./checkpoints/my model", "my__model"),
    ],
)
def test_output_name(name: str, folder: str) -> None:
    assert output_name(name) == folder


def test_staging_replaces_the_destination_only_when_published(tmp_path: Path) -> None:
    destination = tmp_path / "out"
    destination.mkdir()
    (destination / "old.txt").write_text("old")
    with pytest.raises(OutputExists, match="pass --force"):
        check_destination(destination, force=False)
    check_destination(destination, force=True)

    staging = StagingFolder(destination)
    (staging.path / "new.txt").write_text("new")
    assert (destination / "old.txt").exists()  # untouched until publish
    staging.publish()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in destination.iterdir()] == ["new.txt"]

    discarded = StagingFolder(destination)
    (discarded.path / "half.txt").write_text("half")
    discarded.discard()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_phase_log_skips_dependents_and_keeps_internal_errors() -> None:
    events: list[tuple[str, str]] = []
    log = PhaseLog(lambda name, event, record: events.append((name, event)))
    assert log.run("a", lambda: PhaseOutcome(1, "one")) == 1
    assert log.run("b", lambda: 1 / 0) is None
    assert log.run("c", lambda: PhaseOutcome(3, "three"), needs=("b",)) is None
    assert log.run("d", lambda: PhaseOutcome(4, "four", passed=False)) is None
    statuses = {r.name: (r.status, r.summary) for r in log.records}
    assert statuses["a"] == ("pass", "one")
    assert statuses["b"][0] == "fail" and "ZeroDivisionError" in statuses["b"][1]
    assert statuses["c"] == ("skipped", "needs b")
    assert statuses["d"] == ("fail", "four")
    assert not log.passed
    assert events[:2] == [("a", "start"), ("a", "end")]


def test_phase_log_reraises_user_errors_when_asked() -> None:
    events: list[str] = []
    log = PhaseLog(lambda name, event, record: events.append(event))

    def fail() -> PhaseOutcome:
        raise OnboardlmError("thing", "is bad")

    with pytest.raises(OnboardlmError, match="thing: is bad"):
        log.run("resolve", fail, reraise=True)
    assert events == ["start", "abort"] and log.records == []


def _registry_copy(tmp_path: Path) -> Path:
    import shutil

    copy = tmp_path / "registry"
    shutil.copytree(shipped_registry_dir(), copy, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    return copy


def test_register_skips_a_bare_model_type_and_finds_a_gguf_source(tmp_path: Path) -> None:
    resolved = resolve("qwen3")
    outcome = register(
        resolved, fit(resolved.source.config), None, into_package=False, registry_dir=None, staging=tmp_path
    )
    assert not outcome.added and outcome.registered_as is None
    assert "no hub checkpoint" in outcome.not_done[0]
    assert list(tmp_path.iterdir()) == []

    from onboardlm.models.source import default_model_path

    gguf = resolve(str(default_model_path()))
    assert find_registered(gguf, read_entries()).name == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_register_adds_a_hub_model_to_the_given_registry(tmp_path: Path) -> None:
    from dataclasses import replace

    registry = _registry_copy(tmp_path)
    before = (registry / "models.yaml").read_text()
    resolved = resolve("qwen3")
    hub = replace(resolved, source=replace(resolved.source, name="Qwen/Qwen3-Test-8B", kind="hub"))
    size = fit(resolved.source.config)
    outcome = register(hub, size, None, into_package=True, registry_dir=registry, staging=tmp_path)
    assert outcome.added and outcome.package_files == [registry / "models.yaml"]
    after = (registry / "models.yaml").read_text()
    assert after.startswith(before)  # every other entry and comment kept
    entry = read_entries(registry)[-1]
    assert entry.name == "Qwen/Qwen3-Test-8B"
    assert entry.yaml_extra == ("dashboard_default.yaml", f"world_size_{size.world_size}.yaml")
    again = register(hub, size, None, into_package=True, registry_dir=registry, staging=tmp_path)
    assert not again.added and again.summary.startswith("already registered as Qwen/Qwen3-Test-8B")
    assert (registry / "models.yaml").read_text() == after


def test_register_into_a_copy_leaves_the_shipped_registry_alone(tmp_path: Path) -> None:
    from dataclasses import replace

    shipped = (shipped_registry_dir() / "models.yaml").read_text()
    resolved = resolve("qwen3")
    hub = replace(resolved, source=replace(resolved.source, name="Qwen/Qwen3-Test-8B", kind="hub"))
    outcome = register(
        hub, fit(resolved.source.config), None, into_package=False, registry_dir=None, staging=tmp_path
    )
    assert outcome.staged_files == [tmp_path / "registry" / "models.yaml"]
    assert read_entries(tmp_path / "registry")[-1].name == "Qwen/Qwen3-Test-8B"
    assert (shipped_registry_dir() / "models.yaml").read_text() == shipped


def _result(tmp_path: Path) -> OnboardResult:
    log = PhaseLog()
    log.run("fit", lambda: PhaseOutcome(None, "small"))
    log.run("verify", lambda: PhaseOutcome(None, "1/2 tests passed", passed=False))
    return OnboardResult(
        model="qwen3",
        model_type="qwen3",
        out_dir=tmp_path,
        phases=log.records,
        files=[tmp_path / "modeling_qwen3.py"],
        tests=[
            TestRecord("layer", "test_decoder_layer[full_attention]", 0.004, 0.05, True),
            TestRecord("model", "test_full_model_logits", 0.3, 0.05, False),
        ],
        not_done=["registry: a bare model_type names no hub checkpoint"],
    )


def test_report_json_has_the_documented_keys(tmp_path: Path) -> None:
    result = _result(tmp_path)
    paths = write_report(result, tmp_path)
    data = json.loads((tmp_path / "report.json").read_text())
    assert [p.name for p in paths] == ["report.json", "report.md"]
    assert data["status"] == "fail" and data["model_type"] == "qwen3"
    assert [p["name"] for p in data["phases"]] == ["fit", "verify"]
    assert set(data["phases"][0]) >= {"name", "status", "seconds"}
    assert data["tests"][1] == {
        "level": "model",
        "name": "test_full_model_logits",
        "metric": 0.3,
        "tolerance": 0.05,
        "passed": False,
        "margin": pytest.approx(0.05 / 0.3),
    }
    assert data["files"] == [str(tmp_path / "modeling_qwen3.py")]
    assert data == json.loads(json.dumps(report_data(result), default=str))


def test_report_markdown_lists_phases_tests_and_what_was_not_done(tmp_path: Path) -> None:
    text = render_markdown(_result(tmp_path))
    assert "status: **FAIL**" in text
    assert "| verify | fail |" in text
    assert "| model | `test_full_model_logits` | 0.3 | 0.05 | 0.167x | FAIL |" in text
    assert "| layer | `test_decoder_layer[full_attention]` | 0.004 | 0.05 | 12.5x | pass |" in text
    assert "- registry: a bare model_type names no hub checkpoint" in text


def test_package_targets_need_a_checkout_and_force(tmp_path: Path) -> None:
    custom = tmp_path / "src" / "onboardlm" / "models" / "custom"
    custom.mkdir(parents=True)
    with pytest.raises(OnboardlmError, match="not inside a source checkout") as caught:
        PackageTargets.for_model_type("qwen3", custom)
    assert not isinstance(caught.value, OutputExists)
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "tests" / "models" / "generated").mkdir(parents=True)
    (custom / "modeling_llama.py").write_text("")
    targets = PackageTargets.for_model_type("qwen3", custom)
    targets.check(force=False)
    written = targets.install("MODEL = 1\n", "TEST = 1\n")
    assert written == [
        custom / "modeling_qwen3.py",
        tmp_path / "tests/models/generated/test_qwen3_modeling.py",
        custom / "__init__.py",
    ]
    assert (custom / "__init__.py").read_text() == render_custom_init(["modeling_llama", "modeling_qwen3"])
    with pytest.raises(OutputExists, match="already exists"):
        targets.check(force=False)


def test_into_package_outside_a_checkout_stops_before_any_phase(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onboardlm.models.custom as custom_package
    from onboardlm.onboard import pipeline

    wheel_custom = tmp_path / "site-packages" / "onboardlm" / "models" / "custom"
    wheel_custom.mkdir(parents=True)
    monkeypatch.setattr(custom_package, "__file__", str(wheel_custom / "__init__.py"))
    monkeypatch.setattr(pipeline, "_resolve", lambda *args: pytest.fail("resolve ran"))
    options = pipeline.OnboardOptions(out_dir=tmp_path / "out", into_package=True)
    with pytest.raises(OnboardlmError, match="--into-package needs `pip install -e` of a clone"):
        pipeline.onboard("llama", options)
    assert not (tmp_path / "out").exists()
