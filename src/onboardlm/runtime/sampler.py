"""Next-token choice from logits: greedy, or sampling with temperature, top-k and top-p."""

from __future__ import annotations

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from onboardlm.registry.settings import SamplingSettings


def make_generator(settings: SamplingSettings, device: str | torch.device = "cpu") -> torch.Generator | None:
    """A seeded generator when ``settings.seed`` is set, else None (torch's global RNG)."""
    if settings.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(settings.seed)


def filter_logits(logits: torch.Tensor, settings: SamplingSettings) -> torch.Tensor:
    """``logits / temperature`` with tokens outside the top-k and the top-p nucleus set to ``-inf``:
    transformers' logits warpers, in the order ``generate`` applies them.

    The nucleus is the smallest set of most likely tokens whose probability reaches ``top_p``
    (always at least one token).
    """
    warpers = LogitsProcessorList([TemperatureLogitsWarper(float(settings.temperature))])
    if settings.top_k > 0:
        warpers.append(TopKLogitsWarper(settings.top_k))
    if settings.top_p < 1.0:
        warpers.append(TopPLogitsWarper(settings.top_p))
    return warpers(None, logits.float())


def sample(
    logits: torch.Tensor, settings: SamplingSettings, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One token id per row of ``logits`` ``[b, vocab]``; greedy (arg-max) when the temperature is 0."""
    if settings.temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, settings).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
