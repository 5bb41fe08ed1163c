"""Phase 0a: resolve MODEL into a config, a tokenizer location and a weights location.

MODEL is a hub id (local HuggingFace cache first; the network only when allowed), a local directory
with config.json, a ``.gguf`` file, or a bare transformers ``model_type`` (default config, random
weights). Only decoder-only causal LMs are accepted: encoder-only models with an LM head and
encoder-decoder models are refused here, before any work is done, and so are causal-LM classes
measured on a tiny config to attend to the whole input or to an encoder's output (bert-generation,
XLNet, CPM-Ant, TrOCR: :mod:`onboardlm.onboard.decoder_check`), and a checkpoint whose files
do not open (a truncated safetensors file, a ``.bin`` pickle that is not a plain state dict). A
multimodal model resolves to its text decoder, once measured to run text alone as that decoder does.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PretrainedConfig
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
)

from onboardlm.errors import ModelSourceError, UnsupportedFeature
from onboardlm.models.checkpoint import check_readable
from onboardlm.models.source import ModelSource, resolve_model_source
from onboardlm.onboard.decoder_check import check_decoder
from onboardlm.onboard.text_path import check_text_path


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
    if source.multimodal is not None:
        source.notes.append(_text_path_note(source.multimodal, config))
    else:  # measured: a causal-LM class that attends to the whole input or to an encoder is refused
        refused = check_decoder(config).reason
        if refused is not None:
            raise ModelSourceError(model, refused, "onboardlm handles decoder-only causal LMs")
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


def _text_path_note(multimodal: PretrainedConfig, text: PretrainedConfig) -> str:
    """Measure that ``multimodal`` runs text alone as its text decoder ``text`` does, or refuse it."""
    check = check_text_path(multimodal, text)
    if check.relative_error is None:
        return f"text-only path not measured ({check.not_measured})"
    if not check.causal:
        raise UnsupportedFeature(
            type(multimodal).__name__,
            f"the text decoder of {multimodal.model_type}, {text.model_type}, is not causal: its logits "
            "for a prompt change when tokens follow (bidirectional attention)",
            "onboardlm onboards causal LMs",
        )
    if check.differs:
        raise UnsupportedFeature(
            type(multimodal).__name__,
            f"{multimodal.model_type} runs text alone differently from its text decoder {text.model_type} "
            f"(logits relative error {check.relative_error:.2g} on a tiny config)",
            "its text decoder onboarded alone would not reproduce it",
        )
    return (
        f"text-only path equals {text.model_type}'s (relative error {check.relative_error:.1g}, tiny config)"
    )


def _describe_weights(source: ModelSource) -> str:
    if source.weights is None:
        return "none (random weights)"
    files = source.weights.files
    if source.weights.format == "gguf":
        return f"gguf: {files[0]}"
    return f"{source.weights.format}: {len(files)} file(s) in {source.directory}"
