"""KV cache manager: allocates the per-layer caches a cached graph takes and checks requests fit.

Per-token caches (keys, values) are ``[max_batch, max_seq, *features]``; state caches (conv, SSM and
delta-rule state, ``CacheSpec.per_token`` False) hold one state per batch row: ``[max_batch, *features]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from onboardlm.errors import OnboardlmError
from onboardlm.transforms.kv_cache import CacheSpec


@dataclass
class KVCache:
    """Zero-initialised caches, one per :class:`CacheSpec` (see the module docstring for the shapes)."""

    max_batch: int
    max_seq: int
    tensors: dict[str, torch.Tensor]

    @classmethod
    def allocate(
        cls, specs: list[CacheSpec], max_batch: int, max_seq: int, device: str | torch.device
    ) -> KVCache:
        tensors = {
            spec.name: torch.zeros(
                max_batch,
                *((max_seq,) if spec.per_token else ()),
                *spec.features,
                dtype=spec.dtype,
                device=device,
            )
            for spec in specs
        }
        return cls(max_batch, max_seq, tensors)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def check_fits(self, prompt_lengths: list[int], max_new_tokens: int) -> None:
        """Raise :class:`OnboardlmError` unless the prompts plus ``max_new_tokens`` fit this cache."""
        check_fits(prompt_lengths, max_new_tokens, self.max_batch, self.max_seq)


def check_fits(prompt_lengths: list[int], max_new_tokens: int, max_batch: int, max_seq: int) -> None:
    """Raise :class:`OnboardlmError` unless a batch of these prompts fits ``max_batch`` x ``max_seq``."""
    if len(prompt_lengths) > max_batch:
        raise OnboardlmError(
            f"batch of {len(prompt_lengths)} prompts",
            f"larger than the cache allows (max_batch_size {max_batch})",
            "raise max_batch_size or pass fewer prompts",
        )
    for i, length in enumerate(prompt_lengths):
        if length + max_new_tokens > max_seq:
            raise OnboardlmError(
                f"prompt {i} ({length} tokens)",
                f"longer than the cache allows: {length} + max_new_tokens {max_new_tokens} "
                f"> max_seq_len {max_seq}",
                "shorten the prompt, lower max_new_tokens or raise max_seq_len",
            )
