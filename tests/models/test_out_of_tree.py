"""Out-of-tree lean models (seed 003): an installed package's ``onboardlm.models`` entry point, or a
``--custom-model-dir`` folder; ``run``, ``review``, ``debug`` and ``registry models`` pick them up.

The package is "installed" as a ``.dist-info`` folder on a temporary ``sys.path`` entry, which is all
``importlib.metadata`` reads.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from typer.testing import CliRunner

import onboardlm.models.custom
from onboardlm.cli import app
from onboardlm.models import plugins
from onboardlm.models.factory import AutoModelForCausalLMFactory
from onboardlm.models.plugins import find_registered, load_custom_model_dir, registered_models
from onboardlm.testing.checkpoints import save_tiny_llama, word_tokenizer

runner = CliRunner()
LEAN_LLAMA = Path(onboardlm.models.custom.__file__).parent / "modeling_llama.py"

TOY_MODEL = """
from transformers import AutoConfig, LlamaConfig

from onboardlm.models.custom.modeling_llama import LlamaForCausalLM
from onboardlm.models.factory import AutoModelForCausalLMFactory


class {name}Config(LlamaConfig):
    model_type = "{model_type}"


AutoConfig.register("{model_type}", {name}Config, exist_ok=True)


class {name}ForCausalLM(LlamaForCausalLM):
    config_class = {name}Config


AutoModelForCausalLMFactory.register_custom_model_cls("{name}Config", {name}ForCausalLM)
"""


@pytest.fixture(autouse=True)
def _forget_configs_and_modules() -> Iterator[None]:
    """Leave the process as it was: the toy configs, modules and entry points (a broken one's warning
    would otherwise be printed by every later command in this test worker)."""
    configs, modules = dict(CONFIG_MAPPING._extra_content), set(sys.modules)
    problems, loaded = list(plugins._problems), set(plugins._loaded_entry_points)
    yield
    plugins._problems[:] = problems
    plugins._loaded_entry_points.clear()
    plugins._loaded_entry_points.update(loaded)
    plugins._scanned_path = None
    CONFIG_MAPPING._extra_content.clear()
    CONFIG_MAPPING._extra_content.update(configs)
    for name in set(sys.modules) - modules:
        if name.startswith(("toy_onboardlm", "onboardlm_custom_")):
            del sys.modules[name]


def _install_package(site: Path, entry_points: str) -> None:
    """A package ``toy_onboardlm`` with a lean model file, and its metadata with ``entry_points``."""
    package = site / "toy_onboardlm"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "modeling_toy.py").write_text(TOY_MODEL.format(name="ToyLlama", model_type="toy_llama"))
    (package / "broken.py").write_text("raise RuntimeError('this plugin is broken')\n")
    dist = site / "toy_onboardlm-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-onboardlm\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[onboardlm.models]\n{entry_points}")


def _tiny_model(folder: Path, model_type: str) -> Path:
    save_tiny_llama(folder, word_tokenizer({"<unk>": 0, "<s>": 1, "</s>": 2, "hi": 3}))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": model_type}))
    return folder


def test_an_entry_point_registers_a_model_that_run_and_the_registry_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _install_package(tmp_path / "site", "toy = toy_onboardlm.modeling_toy\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    model = _tiny_model(tmp_path / "model", "toy_llama")
    result = runner.invoke(app, ["run", "--model", str(model), "-p", "hi", "--max-new-tokens", "2"])
    assert result.exit_code == 0, result.output
    assert "loaded ToyLlamaForCausalLM (lean onboardlm model)" in result.output
    listed = runner.invoke(app, ["registry", "models", "--out-of-tree"])
    assert listed.exit_code == 0, listed.output
    assert "ToyLlamaConfig" in listed.output and "entry point toy (toy-onboardlm)" in listed.output
    found = find_registered("toy_llama")
    assert found is not None and found.source_file == tmp_path / "site" / "toy_onboardlm" / "modeling_toy.py"


def test_an_entry_point_may_name_the_class_and_a_broken_one_is_only_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entries = "cls = toy_onboardlm.modeling_toy:ToyLlamaForCausalLM\nbad = toy_onboardlm.broken\n"
    _install_package(tmp_path / "site", entries)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    result = runner.invoke(app, ["registry", "models", "--out-of-tree"])
    assert result.exit_code == 0, result.output
    assert "warning: entry point bad (toy-onboardlm): toy_onboardlm.broken cannot be imported: RuntimeError: " \
           "this plugin is broken" in " ".join(result.output.split())  # fmt: skip
    origins = {m.config_class: m.origin for m in registered_models()}
    assert origins["ToyLlamaConfig"].startswith("entry point ")
    assert origins["LlamaConfig"] == "shipped"


def test_a_custom_model_dir_serves_run_review_and_the_registry(tmp_path: Path) -> None:
    folder = tmp_path / "my_models"
    folder.mkdir()
    (folder / "modeling_dirtoy.py").write_text(TOY_MODEL.format(name="DirToy", model_type="dir_toy"))
    (folder / "_helpers.py").write_text("raise RuntimeError('not a model file: never imported')\n")
    model = _tiny_model(tmp_path / "model", "dir_toy")
    result = runner.invoke(
        app,
        [
            "run",
            "--model",
            str(model),
            "-p",
            "hi",
            "--max-new-tokens",
            "2",
            "--custom-model-dir",
            str(folder),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "loaded DirToyForCausalLM (lean onboardlm model)" in result.output
    listed = runner.invoke(app, ["registry", "models", "--out-of-tree", "--custom-model-dir", str(folder)])
    assert "custom model dir" in " ".join(listed.output.replace("│", " ").split())
    assert "DirToyConfig" in listed.output
    reviewed = runner.invoke(app, ["review", "dir_toy", "--custom-model-dir", str(folder), "--json"])
    assert reviewed.exit_code in (0, 1), reviewed.output  # a verdict on the folder's file, not bad input
    assert str(folder / "modeling_dirtoy.py") in reviewed.output


def test_a_custom_copy_of_a_shipped_model_replaces_it(tmp_path: Path) -> None:
    folder = tmp_path / "override"
    folder.mkdir()
    (folder / "modeling_llama.py").write_text(LEAN_LLAMA.read_text())
    assert load_custom_model_dir(folder) == ["LlamaConfig"]
    cls = AutoModelForCausalLMFactory._custom_model_mapping["LlamaConfig"]
    assert cls.__module__ == "onboardlm_custom_override_modeling_llama"
    assert find_registered("llama").origin == f"custom model dir {folder}"


def test_custom_model_dir_help_says_it_runs_the_folders_code() -> None:
    for command in (["run"], ["review"], ["debug", "accuracy"], ["registry", "models"], ["viz"]):
        result = runner.invoke(app, [*command, "--help"])
        text = " ".join(result.output.replace("│", " ").split())
        assert "--custom-model-dir" in text and "RUNS THE PYTHON CODE IN THAT FOLDER" in text, command
