"""Phase 0a: resolve MODEL into a config, a tokenizer location and a weights location.

MODEL is a hub id (local HuggingFace cache first; the network only when allowed), a local directory
with config.json, a ``.gguf`` file, or a bare transformers ``model_type`` (default config, random
weights). Only decoder-only causal LMs are accepted: encoder-only models with an LM head and
encoder-decoder models are refused here, before any work is done, and so is a checkpoint whose files
do not open (a truncated safetensors file, a ``.bin`` pickle that is not a plain state dict).
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
)

from onboardlm.errors import ModelSourceError
from onboardlm.models.checkpoint import check_readable
from onboardlm.models.source import ModelSource, resolve_model_source


@dataclass(frozen=True)
class ResolveResult:
    """Where the model's pieces are; ``source`` is what later phases build from."""

    source: ModelSource
    model_type: str
    config_class: str
    causal_lm_class: str
    has_tokenizer: bool
    weights: str  # "gguf: path", "safetensors: N file(s)", or "none (random weights)"

    @property
    def name(self) -> str:
        return self.source.name


def resolve(model: str, *, offline: bool = True, allow_remote_code: bool = False) -> ResolveResult:
    """Resolve ``model`` or raise :class:`ModelSourceError` naming it."""
    source = resolve_model_source(model, allow_remote_code=allow_remote_code, offline=offline)
    config = source.config
    model_type = config.model_type
    check_decoder_only(model, model_type, bool(getattr(config, "is_encoder_decoder", False)))
    if source.weights is not None:  # a damaged checkpoint is bad input: refuse it before any work
        check_readable(source.weights)
    return ResolveResult(
        source=source,
        model_type=model_type,
        config_class=type(config).__name__,
        causal_lm_class=MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type],
        has_tokenizer=source.has_tokenizer,
        weights=_describe_weights(source),
    )


def check_decoder_only(model: str, model_type: str, is_encoder_decoder: bool) -> None:
    """Refuse model types that are not decoder-only causal LMs."""
    if is_encoder_decoder or model_type in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES:
        raise ModelSourceError(
            model, f"{model_type} is an encoder-decoder (seq2seq) model", "onboardlm handles decoder-only LMs"
        )
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        raise ModelSourceError(
            model, f"{model_type} is an encoder-only model", "onboardlm handles decoder-only causal LMs"
        )
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelSourceError(
            model,
            f"{model_type} has no causal-LM class in transformers",
            "onboardlm handles decoder-only causal LMs",
        )


def _describe_weights(source: ModelSource) -> str:
    if source.weights is None:
        return "none (random weights)"
    files = source.weights.files
    if source.weights.format == "gguf":
        return f"gguf: {files[0]}"
    return f"{source.weights.format}: {len(files)} file(s) in {source.directory}"
