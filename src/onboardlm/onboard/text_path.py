"""Does a multimodal model run text alone as its text decoder does? Measured on a tiny config.

Onboarding a multimodal checkpoint's text decoder is right only when the multimodal model, given
text alone, computes what the text decoder computes, and when that decoder is causal. Not all are:
Cohere2-Vision leaves out its decoder's logit scale; PaliGemma's Gemma attends to the whole prompt.
The multimodal model is built on the meta device (its towers cost nothing and never run); the
modules that hold its language model and LM head (found by
:func:`~onboardlm.models.text_weights.measure_prefixes`) are replaced by those of a random tiny text
causal LM, and both models run the same tokens.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from huggingface_hub.errors import StrictDataclassError
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig

from onboardlm.models.multimodal import multimodal_class
from onboardlm.models.text_weights import measure_prefixes
from onboardlm.testing.tiny_config import tiny_config

#: Largest relative error (fp32, the same weights) of a text path that is the text decoder's.
TOLERANCE = 1e-5
_TOKENS = (2, 8)


@dataclass(frozen=True)
class TextPathCheck:
    """The measurement: the relative logits error, or why there is none; and whether the text decoder
    is causal (its logits for a prefix do not change when tokens follow)."""

    relative_error: float | None
    not_measured: str = ""
    causal: bool = True

    @property
    def differs(self) -> bool:
        return self.relative_error is not None and self.relative_error > TOLERANCE


def check_text_path(multimodal: PretrainedConfig, text: PretrainedConfig) -> TextPathCheck:
    """Compare ``multimodal``'s text-only logits with its text decoder's (``text``) on a tiny config."""
    try:
        tiny = tiny_config(text)
    except (ValueError, StrictDataclassError) as err:  # strict: the shrunken fields fail a validator
        return TextPathCheck(None, f"no tiny config: {' '.join(str(err).split())}")
    composite = copy.deepcopy(multimodal)
    fields = [name for name in type(composite).sub_configs if _model_type(composite, name) == text.model_type]
    if len(fields) != 1:
        return TextPathCheck(None, f"{len(fields)} sub-configs of type {text.model_type}")
    setattr(composite, fields[0], tiny)
    torch.manual_seed(0)
    try:
        # transformers' default attention: its eager path ignores use_bidirectional_attention (Gemma, 5.25)
        decoder = AutoModelForCausalLM.from_config(tiny, dtype=torch.float32).eval()
        with torch.device("meta"):
            model = multimodal_class(composite)._from_config(composite, dtype=torch.float32)
        _graft(model, decoder)
        ids = _text_tokens(composite, tiny.vocab_size)
        with torch.no_grad():
            expected = decoder(input_ids=ids).logits
            prefix = decoder(input_ids=ids[:, : ids.shape[1] // 2]).logits
            actual = model.eval()(input_ids=ids).logits
    except Exception as err:  # a decoder transformers cannot build, or a forward that needs more than text
        return TextPathCheck(None, f"{type(err).__name__}: {' '.join(str(err).split())[:200]}")
    error = (actual.float() - expected).norm() / expected.norm()
    causal = torch.allclose(prefix, expected[:, : prefix.shape[1]], rtol=1e-4, atol=1e-5)
    return TextPathCheck(float(error), causal=causal)


def _model_type(config: PretrainedConfig, name: str) -> str | None:
    return getattr(getattr(config, name, None), "model_type", None)


def _graft(model: nn.Module, decoder: nn.Module) -> None:
    """Put ``decoder``'s top-level modules where ``model`` keeps its language model and LM head."""
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    template = {name: tuple(t.shape) for name, t in decoder.state_dict().items()}
    for mine, theirs in measure_prefixes(shapes, template, type(model).__name__).pairs:
        model.set_submodule(mine.removesuffix("."), decoder.get_submodule(theirs.removesuffix(".")))


def _text_tokens(config: PretrainedConfig, vocab_size: int) -> torch.Tensor:
    """Random token ids that are none of the config's special (image, audio, ...) token ids."""
    special = {
        value
        for name, value in config.to_dict().items()
        if isinstance(value, int) and name.endswith(("token_id", "token_index"))
    }
    allowed = torch.tensor([i for i in range(vocab_size) if i not in special])
    pick = torch.randint(0, len(allowed), _TOKENS, generator=torch.Generator().manual_seed(0))
    return allowed[pick]
