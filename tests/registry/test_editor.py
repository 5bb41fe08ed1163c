"""Safe edits: round trip keeps every other byte, duplicates refused, failures leave nothing changed."""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import pytest

from onboardlm.registry import (
    RegistryError,
    add_entry,
    parse_param_count,
    read_entries,
    settings_for_model,
    validate_registry,
    world_size_for_params,
)
from onboardlm.registry import atomic as atomic_module

from .conftest import snapshot


def inserted_lines(old: str, new: str) -> list[str]:
    """The lines ``new`` adds to ``old``; fails when ``new`` changes or drops any line of ``old``."""
    matcher = difflib.SequenceMatcher(a=old.splitlines(True), b=new.splitlines(True), autojunk=False)
    added = []
    for tag, _, _, j1, j2 in matcher.get_opcodes():
        assert tag in ("equal", "insert"), f"{tag}: the edit changed text outside the new entry"
        if tag == "insert":
            added += new.splitlines(True)[j1:j2]
    return added


def test_add_keeps_comments_and_other_entries_byte_for_byte(registry_dir: Path) -> None:
    models = registry_dir / "models.yaml"
    old = models.read_bytes()
    result = add_entry("Qwen/Qwen3-0.6B", 1, [], registry_dir)
    new = models.read_bytes()
    assert new.startswith(old)
    assert inserted_lines(old.decode(), new.decode()) == [
        "  - name: Qwen/Qwen3-0.6B\n",
        "    yaml_extra: [dashboard_default.yaml, world_size_1.yaml]\n",
    ]
    assert result.yaml_extra == ("dashboard_default.yaml", "world_size_1.yaml")
    assert settings_for_model("Qwen/Qwen3-0.6B", registry_dir) == result.settings
    assert validate_registry(registry_dir) == []


HAND_WRITTEN = {
    "indented, comments, blank line, quotes, block list": (
        "# my registry\n"
        "version: 1   # schema\n"
        "models:\n"
        "  - name: a/one   # first\n"
        "    yaml_extra:\n"
        "      - dashboard_default.yaml\n"
        "      - world_size_1.yaml\n"
        "\n"
        "  # the second one\n"
        "  - name: 'b/two'\n"
        "    yaml_extra: ['dashboard_default.yaml', \"world_size_2.yaml\"]\n"
        "# trailing comment\n"
    ),
    "flush-left lists": (
        "models:\n"
        "- name: a/one   # first\n"
        "  yaml_extra:\n"
        "  - dashboard_default.yaml   # always first\n"
        "  - world_size_1.yaml\n"
        '- name: "b/two"\n'
        "  yaml_extra: [dashboard_default.yaml, world_size_2.yaml]\n"
    ),
    "wide indentation": (
        "models:\n"
        "    -   name: a/one\n"
        "        yaml_extra:\n"
        "            -   dashboard_default.yaml\n"
        "            -   world_size_1.yaml\n"
        "    -   name: b/two\n"
        "        yaml_extra: [dashboard_default.yaml, world_size_2.yaml]\n"
    ),
}


@pytest.mark.parametrize("text", HAND_WRITTEN.values(), ids=HAND_WRITTEN.keys())
def test_add_keeps_a_hand_written_layout(registry_dir: Path, text: str) -> None:
    models = registry_dir / "models.yaml"
    models.write_text(text)
    add_entry("c/three", 4, [], registry_dir)
    added = inserted_lines(text, models.read_text())
    assert [" ".join(line.split()) for line in added][:1] == ["- name: c/three"]
    assert len(added) in (2, 4)  # flow list after a flow-list entry, block list after a block-list entry
    assert [entry.name for entry in read_entries(registry_dir)] == ["a/one", "b/two", "c/three"]
    assert "c/three" not in text and models.read_text().count("c/three") == 1


def test_add_with_an_extra_config_from_a_path_copies_it(tmp_path: Path, registry_dir: Path) -> None:
    extra = tmp_path / "qwen3-0.6b.yaml"
    extra.write_text("# Qwen3 0.6B\ndtype: bfloat16\nmodel_kwargs: {num_hidden_layers: 2}\n")
    result = add_entry("Qwen/Qwen3-0.6B", 1, [extra], registry_dir)
    copied = registry_dir / "configs" / "qwen3-0.6b.yaml"
    assert result.copied_configs == (copied,)
    assert copied.read_bytes() == extra.read_bytes()
    settings = settings_for_model("Qwen/Qwen3-0.6B", registry_dir)
    assert settings.dtype == "bfloat16" and settings.model_kwargs == {"num_hidden_layers": 2}
    add_entry("Qwen/Qwen3-0.6B-Base", 1, ["qwen3-0.6b.yaml"], registry_dir)  # by name, once it is there
    assert settings_for_model("Qwen/Qwen3-0.6B-Base", registry_dir) == settings


@pytest.mark.parametrize(
    "name", ["HuggingFaceTB/SmolLM2-135M-Instruct", "huggingfacetb/smollm2-135m-instruct"]
)
def test_add_refuses_duplicates(registry_dir: Path, name: str) -> None:
    before = snapshot(registry_dir)
    with pytest.raises(RegistryError, match="already in the registry|differs only in case"):
        add_entry(name, 1, [], registry_dir)
    assert snapshot(registry_dir) == before


@pytest.mark.parametrize(
    ("world_size", "extra", "message"),
    [
        (3, None, r"world_size_3\.yaml: config file not found.*world sizes available: \[1, 2, 4, 8\]"),
        (0, None, "world size: must be a positive integer"),
        (1, "bad-key.yaml", r"bad-key\.yaml: key 'max_sequence_len': unknown key"),
        (1, "bad-value.yaml", r"bad-value\.yaml: key 'dtype'"),
        (1, "broken.yaml", r"broken\.yaml: malformed YAML at line 3.*flow mapping at line 2"),
        (1, "missing.yaml", r"missing\.yaml: config file not found"),
        (1, "world_size_2.yaml", "added to every entry already"),
        (1, "notes.txt", r"must end in \.yaml"),
    ],
)
def test_failed_add_leaves_every_file_byte_identical(
    tmp_path: Path, registry_dir: Path, world_size: int, extra: str | None, message: str
) -> None:
    (tmp_path / "bad-key.yaml").write_text("max_sequence_len: 10\n")
    (tmp_path / "bad-value.yaml").write_text("dtype: int8\n")
    (tmp_path / "broken.yaml").write_text("dtype: bfloat16\nmodel_kwargs: {a: 1\n")
    (tmp_path / "notes.txt").write_text("dtype: bfloat16\n")
    extras = [] if extra is None else [extra if extra.startswith("world_size") else tmp_path / extra]
    before = snapshot(registry_dir)
    with pytest.raises(RegistryError, match=message):
        add_entry("new/model", world_size, extras, registry_dir)
    assert snapshot(registry_dir) == before


def test_add_refuses_a_different_config_of_the_same_name(tmp_path: Path, registry_dir: Path) -> None:
    other = tmp_path / "smollm2-135m-instruct.yaml"
    other.write_text("dtype: float32\n")
    before = snapshot(registry_dir)
    with pytest.raises(RegistryError, match="a different .* exists already"):
        add_entry("new/model", 1, [other], registry_dir)
    assert snapshot(registry_dir) == before


def test_add_refuses_when_models_yaml_is_malformed(registry_dir: Path) -> None:
    models = registry_dir / "models.yaml"
    models.write_text(models.read_text() + "  - name: [unclosed\n")
    before = snapshot(registry_dir)
    with pytest.raises(RegistryError, match=r"models\.yaml: malformed YAML at line"):
        add_entry("new/model", 1, [], registry_dir)
    assert snapshot(registry_dir) == before


def test_failure_during_write_keeps_the_original(
    tmp_path: Path, registry_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    extra = tmp_path / "new-model.yaml"
    extra.write_text("dtype: float16\n")
    before = snapshot(registry_dir)
    real_fsync = os.fsync
    calls = []

    def failing_fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 2:  # the config copy succeeds, then models.yaml's temp file fails mid-write
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(atomic_module.os, "fsync", failing_fsync)
    with pytest.raises(
        RegistryError, match=r"models\.yaml: could not write .*No space left on device.*unchanged"
    ):
        add_entry("new/model", 1, [extra], registry_dir)
    assert snapshot(registry_dir) == before  # no temp file left, the copied config removed again


def test_atomic_write_replaces_in_one_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "file.yaml"
    target.write_text("old\n")
    target.chmod(0o640)
    atomic_module.atomic_write_text(target, "new\n")
    assert target.read_text() == "new\n" and (target.stat().st_mode & 0o777) == 0o640

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("rename failed")

    monkeypatch.setattr(atomic_module.os, "replace", broken_replace)
    with pytest.raises(OSError, match="rename failed"):
        atomic_module.atomic_write_text(target, "newer\n")
    assert target.read_text() == "new\n"
    assert [p.name for p in tmp_path.iterdir()] == ["file.yaml"]


@pytest.mark.parametrize(
    ("n_params", "world_size"),
    [
        (1, 1),
        (135_000_000, 1),
        (1_999_999_999, 1),
        (2_000_000_000, 2),
        (8_000_000_000, 2),
        (15_000_000_000, 2),
        (15_000_000_001, 4),
        (80_000_000_000, 4),
        (80_000_000_001, 8),
        (405_000_000_000, 8),
    ],
)
def test_world_size_for_params_boundaries(n_params: int, world_size: int) -> None:
    assert world_size_for_params(n_params) == world_size


def test_world_size_for_params_rejects_non_positive_counts() -> None:
    with pytest.raises(RegistryError, match="must be positive"):
        world_size_for_params(0)


@pytest.mark.parametrize(
    ("text", "count"),
    [("135M", 135_000_000), ("1.7B", 1_700_000_000), ("8e9", 8_000_000_000), ("70b", 70 * 10**9)],
)
def test_parse_param_count(text: str, count: int) -> None:
    assert parse_param_count(text) == count


def test_parse_param_count_rejects_garbage() -> None:
    with pytest.raises(RegistryError, match="not a parameter count"):
        parse_param_count("lots")
