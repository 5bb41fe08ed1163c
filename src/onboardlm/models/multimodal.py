"""The text decoder of a multimodal config (gemma3, llama4, mistral3, ...): the config to onboard.

A multimodal config holds its language model's config (``config.get_text_config(decoder=True)``).
When that model type is a causal LM of its own in transformers, onboardlm onboards it in place of
the multimodal model; the vision and audio towers stay out of scope. The weights come out of the
full checkpoint by key prefix (:mod:`onboardlm.models.text_weights`). A text decoder without a
causal-LM class of its own (mllama's, qwen2_vl's) is refused, naming its type.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import transformers
from transformers import PretrainedConfig
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES,
)

from onboardlm.errors import ModelSourceError, UnsupportedFeature

#: What an onboarding of a multimodal checkpoint leaves out.
TOWERS_NOT_ONBOARDED = "vision/audio towers not onboarded"


@dataclass(frozen=True)
class TextDecoder:
    """A multimodal config's text decoder: a private copy of its config, and what it came from."""

    config: PretrainedConfig
    multimodal: PretrainedConfig

    @property
    def note(self) -> str:
        return f"text decoder of {self.multimodal.model_type}; {TOWERS_NOT_ONBOARDED}"


def text_decoder_of(config: PretrainedConfig, subject: str) -> TextDecoder | None:
    """The text decoder of ``config``, or None when ``config`` is not a multimodal (composite) config.

    Raises :class:`ModelSourceError` when the text decoder's type has no causal-LM class in
    transformers. The copy ties its word embeddings as the multimodal model does (its own
    ``tie_word_embeddings``, which decides how the checkpoint stores the LM head).
    """
    if getattr(config, "is_encoder_decoder", False):
        return None  # resolve refuses seq2seq models as they are
    text = config.get_text_config(decoder=True)
    if text is config or text.model_type == config.model_type:
        _check_text_only(config)
        return None
    if text.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelSourceError(
            subject,
            f"{config.model_type} is multimodal and its text decoder {text.model_type} has no causal-LM "
            "class in transformers",
            "onboardlm onboards a multimodal model's text decoder only when it is a causal LM",
        )
    text = copy.deepcopy(text)
    tie = getattr(config, "tie_word_embeddings", None)
    if isinstance(tie, bool):
        text.tie_word_embeddings = tie
    return TextDecoder(config=text, multimodal=config)


def _check_text_only(config: PretrainedConfig) -> None:
    """Refuse a multimodal model whose towers hang off its own config, with no text config to onboard
    (phi4_multimodal: its causal LM builds the vision and audio embedders into the decoder)."""
    towers = [name for name in type(config).sub_configs if getattr(config, name, None) is not None]
    multimodal = config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    multimodal = multimodal or config.model_type in MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES
    if towers and multimodal:
        raise UnsupportedFeature(
            type(config).__name__,
            f"{config.model_type} is multimodal with no text decoder config of its own (its config holds "
            f"{', '.join(towers)}); transformers has no text-only causal LM to onboard",
        )


def multimodal_class(config: PretrainedConfig) -> type[transformers.PreTrainedModel]:
    """transformers' class of the multimodal model: the checkpoint's own architecture when transformers
    has it, else the image-text-to-text, multimodal-LM or causal-LM class of its type."""
    names = [*(config.architectures or [])]
    for mapping in (
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
        MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES,
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    ):
        names.append(mapping.get(config.model_type, ""))
    found = next(
        (getattr(transformers, name) for name in names if name and hasattr(transformers, name)), None
    )
    if found is None:
        raise UnsupportedFeature(
            type(config).__name__, f"transformers has no model class for {config.model_type}"
        )
    return found
