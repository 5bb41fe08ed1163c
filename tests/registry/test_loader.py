"""Loading and merging: deep-merge semantics, provenance, errors that name file and key, lookups."""

from __future__ import annotations

from pathlib import Path

import pytest
from ruamel.yaml import YAML

from onboardlm.registry import (
    RegistryError,
    RunSettings,
    deep_merge,
    explain_settings,
    find_entry,
    load_run_settings,
    load_yaml_file,
    merged_settings,
    read_entries,
    render_standalone_yaml,
    settings_for_model,
    shipped_registry_dir,
    standalone_yaml,
)

SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_deep_merge_merges_mappings_and_replaces_lists_and_scalars() -> None:
    base = {"a": 1, "nested": {"x": 1, "y": {"deep": 1, "keep": 2}}, "items": [1, 2, 3], "gone": {"k": 1}}
    override = {"a": 2, "nested": {"y": {"deep": 9}, "z": 3}, "items": [4], "gone": None, "new": [1]}
    merged = deep_merge(base, override)
    assert merged == {
        "a": 2,
        "nested": {"x": 1, "y": {"deep": 9, "keep": 2}, "z": 3},
        "items": [4],
        "gone": None,
        "new": [1],
    }
    assert base["nested"]["y"] == {"deep": 1, "keep": 2} and base["items"] == [1, 2, 3]  # inputs untouched
    merged["new"].append(2)
    assert override["new"] == [1]  # result shares no mutable state with the inputs


def test_merged_settings_merge_left_to_right(tmp_path: Path) -> None:
    first = write(tmp_path / "a.yaml", "max_seq_len: 512\nmodel_kwargs: {a: 1, b: 2}\nsampling: {top_k: 5}\n")
    second = write(
        tmp_path / "b.yaml", "max_seq_len: 1024\nmodel_kwargs: {b: 3}\ncuda_graph_batch_sizes: [1]\n"
    )
    settings = merged_settings([first, second])
    assert settings.max_seq_len == 1024
    assert settings.model_kwargs == {"a": 1, "b": 3}
    assert settings.sampling.top_k == 5 and settings.sampling.top_p == 1.0
    assert settings.cuda_graph_batch_sizes == [1]
    assert merged_settings([]) == RunSettings()


def test_dashboard_default_states_the_schema_defaults() -> None:
    shipped = load_yaml_file(shipped_registry_dir() / "configs" / "dashboard_default.yaml")
    assert RunSettings.model_validate(shipped) == RunSettings()


@pytest.mark.parametrize("name", [entry.name for entry in read_entries()])
def test_registry_and_standalone_file_give_identical_settings(name: str, tmp_path: Path) -> None:
    from_registry = settings_for_model(name)
    standalone = write(tmp_path / "standalone.yaml", render_standalone_yaml(name))
    assert merged_settings([standalone]) == from_registry
    assert load_yaml_file(standalone) == standalone_yaml(name)
    assert load_run_settings(name, yaml_extra=[standalone]) == load_run_settings(name, use_registry=True)


def test_shipped_entries_are_true_to_their_world_size() -> None:
    expected = {SMOL: 1, "meta-llama/Llama-3.1-8B-Instruct": 2, "meta-llama/Llama-3.3-70B-Instruct": 4}
    for name, world_size in expected.items():
        assert settings_for_model(name).world_size == world_size
    assert settings_for_model(SMOL).dtype == "bfloat16"


def test_yaml_extra_applies_over_the_registry(tmp_path: Path) -> None:
    extra = write(tmp_path / "short.yaml", "max_new_tokens: 4\nmodel_kwargs: {num_hidden_layers: 2}\n")
    settings = load_run_settings(SMOL, use_registry=True, yaml_extra=[extra])
    assert settings.max_new_tokens == 4 and settings.dtype == "bfloat16"
    assert settings.model_kwargs == {"num_hidden_layers": 2}
    with pytest.raises(RegistryError, match="needs a model name"):
        load_run_settings(None, use_registry=True)


def test_show_reports_which_file_set_each_key(registry_dir: Path) -> None:
    explained = explain_settings(SMOL, registry_dir)
    sources = {row.key: (row.source.name if row.source else None) for row in explained.rows}
    assert sources["dtype"] == "smollm2-135m-instruct.yaml"
    assert sources["world_size"] == "world_size_1.yaml"
    assert sources["sampling.top_p"] == "dashboard_default.yaml"
    assert sources["sampling.seed"] is None and sources["prompts"] is None
    assert explained.to_json()["sources"]["dtype"] == "smollm2-135m-instruct.yaml"


def test_unknown_key_error_names_file_and_key(tmp_path: Path) -> None:
    good = write(tmp_path / "good.yaml", "max_seq_len: 512\n")
    bad = write(tmp_path / "bad.yaml", "max_seq_length: 512\n")
    with pytest.raises(RegistryError) as err:
        merged_settings([good, bad])
    assert str(bad) in str(err.value)
    assert "'max_seq_length': unknown key, did you mean 'max_seq_len'?" in str(err.value)
    nested = write(tmp_path / "nested.yaml", "sampling:\n  temprature: 0.7\n")
    with pytest.raises(RegistryError, match=r"nested\.yaml: key 'sampling\.temprature': unknown key"):
        merged_settings([good, nested])


@pytest.mark.parametrize(
    ("text", "key", "message"),
    [
        ("world_size: 0\n", "world_size", "must be a positive integer, got 0"),
        ("max_batch_size: -3\n", "max_batch_size", "must be a positive integer, got -3"),
        ("max_seq_len: '4096'\n", "max_seq_len", "valid integer"),
        ("dtype: fp8\n", "dtype", "'float32', 'bfloat16', 'float16' or 'auto'"),
        ("cuda_graph_batch_sizes: [1, 0]\n", "cuda_graph_batch_sizes.1", "must be a positive integer"),
        ("sampling: {top_p: 0}\n", "sampling.top_p", "greater than 0"),
        ("compile: 1\n", "compile", "valid boolean"),
    ],
)
def test_bad_values_name_file_key_and_rule(tmp_path: Path, text: str, key: str, message: str) -> None:
    path = write(tmp_path / "cfg.yaml", text)
    with pytest.raises(RegistryError) as err:
        merged_settings([write(tmp_path / "base.yaml", "max_new_tokens: 8\n"), path])
    assert str(err.value).startswith(f"{path}: key '{key}'")
    assert message in str(err.value)


def test_cross_field_rule_names_the_merged_files(tmp_path: Path) -> None:
    path = write(tmp_path / "cfg.yaml", "max_seq_len: 16\nmax_new_tokens: 16\n")
    with pytest.raises(
        RegistryError, match=r"cfg\.yaml: max_new_tokens \(16\) must be smaller than max_seq_len"
    ):
        merged_settings([path])


def test_missing_and_malformed_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match=r"nope\.yaml: file not found"):
        load_yaml_file(tmp_path / "nope.yaml")
    broken = write(tmp_path / "broken.yaml", "a: 1\nb: [1, 2\nc: 3\n")
    with pytest.raises(RegistryError, match=r"broken\.yaml: malformed YAML at line \d+, column \d+"):
        load_yaml_file(broken)
    twice = write(tmp_path / "twice.yaml", "max_seq_len: 1\nmax_seq_len: 2\n")
    with pytest.raises(
        RegistryError, match=r"twice\.yaml: malformed YAML at line 2, column 1: duplicate key \"max_seq_len\""
    ) as err:
        load_yaml_file(twice)
    assert "\n" not in str(err.value)  # one line, not ruamel's explanation of duplicate keys
    listed = write(tmp_path / "list.yaml", "- a\n- b\n")
    with pytest.raises(RegistryError, match="expected a mapping"):
        load_yaml_file(listed)
    assert load_yaml_file(write(tmp_path / "empty.yaml", "# nothing\n")) == {}


def test_entry_with_missing_or_malformed_yaml_extra_names_the_file(registry_dir: Path) -> None:
    models = registry_dir / "models.yaml"
    models.write_text(models.read_text().replace("smollm2-135m-instruct.yaml]", "smollm2-typo.yaml]"))
    with pytest.raises(RegistryError, match=r"configs/smollm2-typo\.yaml: file not found"):
        settings_for_model(SMOL, registry_dir)
    write(registry_dir / "configs" / "world_size_2.yaml", "world_size: [2\n")
    with pytest.raises(RegistryError, match=r"configs/world_size_2\.yaml: malformed YAML at line 2"):
        settings_for_model("meta-llama/Llama-3.1-8B-Instruct", registry_dir)


def test_unknown_name_lists_close_matches(registry_dir: Path) -> None:
    with pytest.raises(RegistryError) as err:
        find_entry("HuggingFaceTB/SmolLM2-135M-Instruc", registry_dir)
    assert "not in the registry" in str(err.value)
    assert f"did you mean {SMOL}" in str(err.value)
    with pytest.raises(RegistryError, match="did you mean meta-llama/Llama-3.1-8B-Instruct"):
        find_entry("llama-3.1-8b-instruct", registry_dir)
    with pytest.raises(RegistryError, match="see `onboardlm registry list`"):
        find_entry("zzzz/qqqq", registry_dir)


def test_bad_registry_structure_is_reported(registry_dir: Path) -> None:
    models = registry_dir / "models.yaml"
    models.write_text("models:\n  - name: a/b\n    yaml_extras: [x.yaml]\n")
    with pytest.raises(RegistryError, match=r"models\[0\]: unknown key 'yaml_extras'"):
        read_entries(registry_dir)
    with pytest.raises(RegistryError, match="no models.yaml"):
        read_entries(registry_dir / "configs")
    assert YAML(typ="safe").load(models.read_text())  # the loader reports, it does not rewrite


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("modelz: []\n", "unknown top-level key 'modelz' (allowed: version, description, models)"),
        ("version: 1\n", "expected a 'models' list at the top level"),
        ("models: {a: 1}\n", "expected a 'models' list at the top level"),
        ("models: [x]\n", "models[0]: expected a mapping with name and yaml_extra"),
        ("models:\n  - {name: '  ', yaml_extra: [a.yaml]}\n", "models[0]: 'name' must be a non-empty string"),
        ("models:\n  - {name: 7, yaml_extra: [a.yaml]}\n", "models[0]: 'name' must be a non-empty string"),
        ("models:\n  - {name: a/b, yaml_extra: a.yaml}\n", "models[0] (a/b): 'yaml_extra' must be a list of file names"),
        ("models:\n  - {name: a/b, yaml_extra: [a.yaml, '']}\n", "models[0] (a/b): 'yaml_extra' must be a list of file names"),
        ("models:\n  - {name: a/b, yaml_extra: [sub/a.yaml]}\n", "models[0] (a/b): 'sub/a.yaml' must be a file name under configs/"),
        ("models:\n  - {name: a/b, yaml_extra: [a.yaml]}\n  - {name: c/d, x: 1}\n", "models[1]: unknown key 'x' (allowed: name, yaml_extra)"),
    ],
)  # fmt: skip
def test_models_file_schema_errors_are_one_line(registry_dir: Path, text: str, message: str) -> None:
    models = write(registry_dir / "models.yaml", text)
    with pytest.raises(RegistryError) as err:
        read_entries(registry_dir)
    assert str(err.value) == f"{models}: {message}"
