"""Greedy decoding on an eager lean model (reference path: recomputes the prefix every step)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Generation:
    """Tokens produced for one prompt and why decoding stopped."""

    prompt_ids: list[int]
    new_ids: list[int]
    stopped_on_eos: bool


@torch.no_grad()
def greedy_generate(
    model: nn.Module, prompt_ids: list[int], *, max_new_tokens: int, stop_ids: Iterable[int] = ()
) -> Generation:
    """Append the arg-max token until a stop token or ``max_new_tokens``.

    Each step runs the whole sequence (no KV cache): simple and exact, for checking models.
    """
    stops = set(stop_ids)
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], device=device)
    new_ids: list[int] = []
    for _ in range(max_new_tokens):
        position_ids = torch.arange(ids.shape[1], device=device)[None]
        logits = model(input_ids=ids, position_ids=position_ids).logits
        token = int(logits[0, -1].argmax())
        if token in stops:
            return Generation(prompt_ids, new_ids, stopped_on_eos=True)
        new_ids.append(token)
        ids = torch.cat([ids, ids.new_tensor([[token]])], dim=1)
    return Generation(prompt_ids, new_ids, stopped_on_eos=False)
