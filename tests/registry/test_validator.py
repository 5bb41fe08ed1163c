"""The validator: a clean registry passes; each kind of problem is found and named."""

from __future__ import annotations

from pathlib import Path

from onboardlm.registry import has_errors, validate_registry


def messages(registry_dir: Path) -> list[str]:
    return [f"{p.severity} {p.subject}: {p.message}" for p in validate_registry(registry_dir)]


def test_shipped_registry_is_valid(registry_dir: Path) -> None:
    assert validate_registry() == []
    assert validate_registry(registry_dir) == []


def test_validator_finds_entry_problems(registry_dir: Path) -> None:
    models = registry_dir / "models.yaml"
    models.write_text(
        models.read_text()
        + "  - name: a/wrong-order\n    yaml_extra: [world_size_1.yaml, dashboard_default.yaml]\n"
        + "  - name: a/missing\n    yaml_extra: [dashboard_default.yaml, world_size_1.yaml, gone.yaml]\n"
        + "  - name: a/invalid\n    yaml_extra: [dashboard_default.yaml, world_size_1.yaml, invalid.yaml]\n"
        + "  - name: a/no-world-size\n    yaml_extra: [dashboard_default.yaml]\n"
        + "  - name: A/Missing\n    yaml_extra: [dashboard_default.yaml, world_size_1.yaml]\n"
        + "  - name: a/overrides\n    yaml_extra: [dashboard_default.yaml, world_size_1.yaml, world_size_2.yaml]\n"
    )
    (registry_dir / "configs" / "invalid.yaml").write_text("max_batch_size: 0\n")
    (registry_dir / "configs" / "orphan.yaml").write_text("dtype: float16\n")
    found = messages(registry_dir)
    expected = [
        "error a/wrong-order: yaml_extra must start with dashboard_default.yaml",
        "error a/missing: " + str(registry_dir / "configs" / "gone.yaml") + ": file not found",
        "key 'max_batch_size': must be a positive integer, got 0",
        "error a/no-world-size: yaml_extra needs exactly one world_size_N.yaml",
        "error A/Missing: differs only in case from a/missing",
        "error a/overrides: yaml_extra needs exactly one world_size_N.yaml",
        "warning " + str(registry_dir / "configs" / "orphan.yaml") + ": not used by any entry",
    ]
    for text in expected:
        assert any(text in line for line in found), (text, found)
    assert has_errors(validate_registry(registry_dir))


def test_validator_finds_duplicates_and_bad_world_size_files(registry_dir: Path) -> None:
    models = registry_dir / "models.yaml"
    models.write_text(
        models.read_text()
        + "  - name: meta-llama/Llama-3.1-8B-Instruct\n    yaml_extra: [dashboard_default.yaml, world_size_2.yaml]\n"
    )
    (registry_dir / "configs" / "world_size_4.yaml").write_text("world_size: 2\n")
    found = messages(registry_dir)
    assert "error meta-llama/Llama-3.1-8B-Instruct: listed more than once" in found
    assert any("world_size_4.yaml: sets world_size: 2, its name says 4" in line for line in found)
    assert any("meta-llama/Llama-3.3-70B-Instruct: merged world_size is 2, not 4" in line for line in found)


def test_validator_reports_an_unreadable_models_file(registry_dir: Path) -> None:
    (registry_dir / "models.yaml").write_text("models: [\n")
    (problem,) = validate_registry(registry_dir)
    assert problem.subject.endswith("models.yaml") and "malformed YAML at line" in problem.message


def test_warnings_alone_are_not_errors(registry_dir: Path) -> None:
    (registry_dir / "configs" / "orphan.yaml").write_text("dtype: float16\n")
    problems = validate_registry(registry_dir)
    assert [p.severity for p in problems] == ["warning"] and not has_errors(problems)
