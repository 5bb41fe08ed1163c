"""Sampling: greedy, temperature, top-k, top-p and seeds, checked against the softmax computed here."""

from __future__ import annotations

import torch

from onboardlm.registry.settings import SamplingSettings
from onboardlm.runtime.sampler import filter_logits, make_generator, sample

LOGITS = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]], dtype=torch.float64)).float()


def _frequencies(settings: SamplingSettings, draws: int = 4000) -> torch.Tensor:
    generator = make_generator(settings)
    tokens = sample(LOGITS.expand(draws, -1), settings, generator)
    return torch.bincount(tokens, minlength=LOGITS.shape[-1]).double() / draws


def test_temperature_zero_is_arg_max_per_row() -> None:
    logits = torch.randn(4, 50)
    assert torch.equal(sample(logits, SamplingSettings()), logits.argmax(-1))


def test_top_k_one_is_greedy_at_any_temperature() -> None:
    logits = torch.randn(4, 50)
    settings = SamplingSettings(temperature=5.0, top_k=1, seed=1)
    assert torch.equal(sample(logits, settings, make_generator(settings)), logits.argmax(-1))


def test_same_seed_same_tokens_other_seed_other_tokens() -> None:
    logits = torch.zeros(64, 1000)
    first = sample(logits, s := SamplingSettings(temperature=1.0, seed=7), make_generator(s))
    again = sample(logits, s, make_generator(s))
    other = sample(logits, o := SamplingSettings(temperature=1.0, seed=8), make_generator(o))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_frequencies_follow_the_tempered_softmax() -> None:
    settings = SamplingSettings(temperature=2.0, seed=0)
    expected = torch.softmax(LOGITS.double() / 2.0, -1)[0]
    assert (_frequencies(settings) - expected).abs().max() < 0.03


def test_top_k_and_top_p_keep_only_their_tokens() -> None:
    # top_k=3 keeps {0, 1, 2}, renormalised.
    kept = torch.tensor([0.5, 0.2, 0.15]) / 0.85
    freq = _frequencies(SamplingSettings(temperature=1.0, top_k=3, seed=0))
    assert freq[3:].sum() == 0 and (freq[:3] - kept.double()).abs().max() < 0.03
    # top_p=0.6: 0.5 alone is below 0.6, so the nucleus is {0, 1} (mass 0.7).
    freq = _frequencies(SamplingSettings(temperature=1.0, top_p=0.6, seed=0))
    assert freq[2:].sum() == 0 and abs(freq[0] - 0.5 / 0.7) < 0.03


def test_top_p_always_keeps_the_most_likely_token() -> None:
    filtered = filter_logits(LOGITS, SamplingSettings(temperature=1.0, top_p=0.01))
    assert torch.isfinite(filtered).tolist() == [[True, False, False, False, False]]
