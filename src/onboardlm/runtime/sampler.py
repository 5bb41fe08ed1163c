"""Next-token choice from logits: greedy, or sampling with temperature, top-k and top-p."""

from __future__ import annotations

import torch

from onboardlm.registry.settings import SamplingSettings


def make_generator(settings: SamplingSettings, device: str | torch.device = "cpu") -> torch.Generator | None:
    """A seeded generator when ``settings.seed`` is set, else None (torch's global RNG)."""
    if settings.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(settings.seed)


def filter_logits(logits: torch.Tensor, settings: SamplingSettings) -> torch.Tensor:
    """``logits / temperature`` with tokens outside the top-k and the top-p nucleus set to ``-inf``.

    The nucleus is the smallest set of most likely tokens whose probability reaches ``top_p``
    (always at least one token).
    """
    logits = logits.float() / settings.temperature
    if 0 < settings.top_k < logits.shape[-1]:
        kth = torch.topk(logits, settings.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if settings.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability mass of strictly more likely tokens
        drop_sorted = before >= settings.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(
    logits: torch.Tensor, settings: SamplingSettings, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One token id per row of ``logits`` ``[b, vocab]``; greedy (arg-max) when the temperature is 0."""
    if settings.temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, settings).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
