"""Build causal LMs from a model name: custom lean class when registered, else transformers' class.

``AutoModelForCausalLMFactory.register_custom_model_cls(config_class_name, model_cls)`` is the
registration call every lean model file ends with (the same call TensorRT-LLM AutoDeploy uses).
The factory resolves the model, applies ``model_kwargs`` overrides to its config, builds the model
on a device (``meta`` for sizing) in a dtype, and fills it from safetensors, GGUF or PyTorch
weights with a strict key check, or with random weights.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
import re
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar, Literal

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)
from transformers.initialization import no_init_weights
from transformers.utils import GENERATION_CONFIG_NAME

from onboardlm.errors import ModelSourceError, WeightsError
from onboardlm.models.checkpoint import StateDict, read_converted_state_dict, read_state_dict
from onboardlm.models.precision import fp32_pattern, keep_in_fp32
from onboardlm.models.source import ModelSource, WeightsLocation, resolve_model_source
from onboardlm.models.text_weights import read_converted_text_weights, read_text_weights

logger = logging.getLogger(__name__)

WeightsMode = Literal["auto", "checkpoint", "random"]


@dataclass
class LoadReport:
    """How a model got its weights."""

    model_class: str
    is_custom: bool
    weights_source: str
    num_tensors: int = 0
    tied_keys: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class AutoModelForCausalLMFactory:
    """Builds a causal LM for one model name, with config overrides, device and dtype."""

    _custom_model_mapping: ClassVar[dict[str, type[nn.Module]]] = {}

    def __init__(
        self,
        model: str | os.PathLike[str] | PretrainedConfig,
        model_kwargs: Mapping[str, Any] | None = None,
        *,
        gguf_file: str | None = None,
        allow_remote_code: bool = False,
        offline: bool = True,
    ) -> None:
        self.model = model
        self.model_kwargs = dict(model_kwargs or {})
        self._resolve_options = {
            "gguf_file": gguf_file,
            "allow_remote_code": allow_remote_code,
            "offline": offline,
        }
        self._source: ModelSource | None = None
        self._config: PretrainedConfig | None = None

    # ----------------------------------------------------------------- registration
    @classmethod
    def register_custom_model_cls(cls, config_cls_name: str, custom_model_cls: type[nn.Module]) -> None:
        """Use ``custom_model_cls`` for every config whose class is named ``config_cls_name``.

        The shipped model files register first, so a later user registration replaces theirs.
        """
        import_shipped_models()
        cls._custom_model_mapping[config_cls_name] = custom_model_cls

    @classmethod
    @contextmanager
    def registrations_restored(cls) -> Iterator[None]:
        """Undo, on leaving the block, every registration made in it (importing a model file registers).

        The shipped models are registered before the snapshot, so their first import inside the
        block cannot outlive it either.
        """
        import_shipped_models()
        saved = dict(cls._custom_model_mapping)
        try:
            yield
        finally:
            cls._custom_model_mapping.clear()
            cls._custom_model_mapping.update(saved)

    @classmethod
    def custom_model_cls(cls, config: PretrainedConfig) -> type[nn.Module] | None:
        """The registered lean class for ``config``, importing the shipped model files first."""
        import_shipped_models()
        return cls._custom_model_mapping.get(type(config).__name__)

    # ----------------------------------------------------------------- config
    @property
    def source(self) -> ModelSource:
        if self._source is None:
            self._source = resolve_model_source(self.model, **self._resolve_options)
        return self._source

    @property
    def config(self) -> PretrainedConfig:
        """The model's config with ``model_kwargs`` applied (a private copy)."""
        if self._config is None:
            self._config = apply_config_overrides(
                self.source.config, self.model_kwargs, subject=str(self.model)
            )
        return self._config

    def model_class(self) -> tuple[type[nn.Module] | None, bool]:
        """``(class, is_custom)``; class None means transformers' auto class picks it."""
        custom = self.custom_model_cls(self.config)
        return (custom, True) if custom is not None else (None, False)

    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer stored with the model (GGUF files carry their own)."""
        src = self.source
        if not src.has_tokenizer:
            raise ModelSourceError(
                src.name, "has no tokenizer files", "use a model directory or GGUF with a tokenizer"
            )
        return AutoTokenizer.from_pretrained(src.directory, gguf_file=src.gguf_file)

    def generation_config(self) -> GenerationConfig:
        """The checkpoint's generation settings (end tokens among them): its ``generation_config.json``,
        else the generation fields of its config (a GGUF file's come from its metadata)."""
        src = self.source
        file = src.directory / GENERATION_CONFIG_NAME if src.directory is not None else None
        if src.kind == "gguf" or file is None or not file.is_file():
            return GenerationConfig.from_model_config(src.config)
        try:
            return GenerationConfig.from_pretrained(src.directory)
        except (OSError, ValueError) as err:
            raise ModelSourceError(str(file), f"cannot read the generation config: {err}") from None

    # ----------------------------------------------------------------- building
    def build_model(
        self,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        *,
        init_weights: bool = True,
    ) -> nn.Module:
        """Instantiate the model on ``device`` in ``dtype``; ``meta`` gives a storage-free model."""
        cls, is_custom = self.model_class()
        if not is_custom:
            logger.info(
                "no custom model registered for %s: using the transformers class", type(self.config).__name__
            )
        skip_init = not init_weights or torch.device(device).type == "meta"
        with torch.device(device), default_dtype(dtype), no_init_weights() if skip_init else nullcontext():
            if cls is not None:
                model = cls(self.config)
            else:
                trust = bool(self._resolve_options["allow_remote_code"])
                model = AutoModelForCausalLM.from_config(self.config, trust_remote_code=trust)
        keep_in_fp32(model, self.fp32_pattern(model))
        return model.eval()

    def build_empty(self, dtype: torch.dtype | None = None) -> tuple[nn.Module, dict[str, torch.Tensor]]:
        """The model with every tensor on the meta device (no memory), and its buffers' values (CPU).

        For a tensor-parallel rank that exports and shards the model before reading only its part of
        the checkpoint; the buffers (RoPE tables and the like, often absent from checkpoints) are
        computed here, once, to be put back after sharding.
        """
        with init_empty_weights(include_buffers=False):
            model = self.build_model("cpu", dtype, init_weights=False)
        buffers = {name: buffer.detach().clone() for name, buffer in model.named_buffers()}
        model = model.to("meta")
        if getattr(self.config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
            model.tie_weights()
        return model, buffers

    def fp32_pattern(self, model: nn.Module) -> re.Pattern[str] | None:
        """Names transformers keeps in fp32 at the dtype ``model`` was built in (see ``precision``)."""
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
        return fp32_pattern(self.config, dtype)

    def build_and_load(
        self,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        weights: WeightsMode = "auto",
    ) -> tuple[nn.Module, LoadReport]:
        """Build the model and fill it: from the checkpoint (``auto`` when there is one) or randomly."""
        location = self.source.weights
        if weights == "checkpoint" and location is None:
            raise WeightsError(
                self.source.name, "has no weights", "pass a directory with safetensors or a GGUF file"
            )
        use_checkpoint = location is not None and weights != "random"
        model = self.build_model(device, dtype, init_weights=not use_checkpoint)
        cls_name = type(model).__name__
        is_custom = self.model_class()[1]
        if not use_checkpoint:
            return model, LoadReport(cls_name, is_custom, weights_source="random")
        subject = ", ".join(str(f) for f in location.files)
        state_dict, notes = self.read_checkpoint(location, model, dtype)
        try:
            report = load_checkpoint_into(model, state_dict, subject=subject)
        except WeightsError as direct_error:
            if location.format == "gguf":  # already read through transformers' GGUF mapping
                raise
            logger.info("checkpoint keys differ from the model's; converting through transformers")
            del state_dict
            try:
                converted, notes = self.read_converted(location, model, dtype)
                report = load_checkpoint_into(model, converted, subject=subject)
            except WeightsError as conversion_error:  # the direct error names the keys
                raise direct_error from conversion_error
            notes.append("keys converted by transformers' checkpoint conversion mapping")
        report.model_class, report.is_custom = cls_name, is_custom
        report.notes += notes
        return model, report

    def read_checkpoint(
        self, location: WeightsLocation, model: nn.Module, dtype: torch.dtype | None
    ) -> tuple[StateDict, list[str]]:
        """The checkpoint's tensors for ``model``; of a multimodal checkpoint, its text decoder's only."""
        keep_fp32 = self.fp32_pattern(model)
        if self.source.multimodal is None or location.format == "gguf":
            return read_state_dict(location, self.config, dtype, keep_fp32=keep_fp32), []
        text = read_text_weights(location, model, dtype, keep_fp32)
        return text.state_dict, [text.note]

    def read_converted(
        self, location: WeightsLocation, model: nn.Module, dtype: torch.dtype | None
    ) -> tuple[StateDict, list[str]]:
        """The checkpoint as transformers loads it (a multimodal one whole, then its text decoder cut out)."""
        if self.source.multimodal is None:
            return read_converted_state_dict(location, self.config, dtype), []
        text = read_converted_text_weights(location, self.source.multimodal, model, dtype)
        return text.state_dict, [text.note]


def import_shipped_models() -> None:
    """Import ``onboardlm.models.custom`` (import = registration; a no-op while it is importing), then
    the out-of-tree models of installed packages' ``onboardlm.models`` entry points
    (:mod:`onboardlm.models.plugins`), which may replace shipped ones."""
    import onboardlm.models.custom  # noqa: F401
    from onboardlm.models.plugins import load_entry_point_models

    load_entry_point_models()


def execute_model_file(path: Path, module_name: str) -> ModuleType:
    """Run the lean model file ``path`` as module ``module_name`` (which registers its model).

    The module is put in ``sys.modules`` (dataclasses and transformers look classes' modules up
    there); the caller removes it when done.
    """
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def load_checkpoint_into(model: nn.Module, state_dict: StateDict, *, subject: str) -> LoadReport:
    """Load ``state_dict`` through ``model.load_state_dict`` (hooks run) with a strict key check.

    Keys that the model ties to another parameter (e.g. ``lm_head.weight`` with tied embeddings) may
    be absent. Any other missing or unexpected key, or a shape mismatch, raises :class:`WeightsError`
    naming the keys; the caller must then discard the model.
    """
    tied = _tied_keys(model)
    try:
        result = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as err:  # size mismatches
        raise WeightsError(subject, f"checkpoint does not fit the model: {_size_mismatches(err)}") from err
    missing = [k for k in result.missing_keys if k not in tied]
    deeper = _deeper_layer_keys(model, result.unexpected_keys)  # a run with fewer num_hidden_layers
    unexpected = [k for k in result.unexpected_keys if k not in deeper]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {sorted(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {sorted(unexpected)}")
        raise WeightsError(subject, "checkpoint keys do not match the model: " + "; ".join(parts))
    if tied and hasattr(model, "tie_weights"):
        model.tie_weights()
    return LoadReport(
        model_class=type(model).__name__,
        is_custom=False,
        weights_source=subject,
        num_tensors=len(state_dict),
        tied_keys=sorted(k for k in tied if k in result.missing_keys),
        notes=[f"{len(deeper)} checkpoint tensors of layers beyond num_hidden_layers left out"]
        if deeper
        else [],
    )


_LAYER_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _deeper_layer_keys(model: nn.Module, keys: list[str]) -> set[str]:
    """Checkpoint keys of decoder layers past the model's ``num_hidden_layers`` (a reduced run of a
    deeper checkpoint, where transformers' own loader may not apply: Gemma 4's per-layer table is
    as wide as the checkpoint's layers)."""
    layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if not isinstance(layers, int):
        return set()
    return {key for key in keys if (found := _LAYER_KEY.search(key)) and int(found.group(1)) >= layers}


_SIZE_MISMATCH = re.compile(
    r"size mismatch for (\S+): copying a param with shape torch\.Size\(\[(.*?)\]\) from checkpoint, "
    r"the shape in current model is torch\.Size\(\[(.*?)\]\)"
)


def _size_mismatches(err: RuntimeError) -> str:
    """``load_state_dict``'s multi-line size-mismatch report as one line."""
    found = _SIZE_MISMATCH.findall(str(err))
    if not found:
        return " ".join(str(err).split())
    return "; ".join(
        f"size mismatch for {key}: [{ckpt}] in the checkpoint, [{own}] in the model"
        for key, ckpt, own in found
    )


def _tied_keys(model: nn.Module) -> set[str]:
    config = getattr(model, "config", None)
    if config is None or not getattr(config, "tie_word_embeddings", False):
        return set()
    return set(getattr(model, "all_tied_weights_keys", None) or {})


def apply_config_overrides(
    config: PretrainedConfig, overrides: Mapping[str, Any], *, subject: str
) -> PretrainedConfig:
    """A copy of ``config`` with ``overrides`` set; dict values merge into dict fields.

    Unknown fields are refused (a typo would otherwise pass silently). Reducing
    ``num_hidden_layers`` also truncates per-layer lists such as ``layer_types``.
    """
    config = copy.deepcopy(config)
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise ModelSourceError(
                subject, f"model_kwargs sets unknown config field {key!r}", "check the spelling"
            )
        current = getattr(config, key)
        if isinstance(current, dict) and isinstance(value, Mapping):
            value = {**current, **value}
        setattr(config, key, value)
    layers = overrides.get("num_hidden_layers")
    if layers is not None:
        per_layer = getattr(config, "layer_types", None)
        if isinstance(per_layer, list) and len(per_layer) > layers:
            config.layer_types = per_layer[:layers]
    return config


@contextmanager
def default_dtype(dtype: torch.dtype | None) -> Iterator[None]:
    """Create floating parameters in ``dtype``; buffers created with an explicit dtype keep it."""
    if dtype is None:
        yield
        return
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
