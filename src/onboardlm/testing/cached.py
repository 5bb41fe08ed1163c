"""Drive a cached graph as the runtime does: one prefill, then one-token decode steps."""

from __future__ import annotations

from collections.abc import Callable

import torch

from onboardlm.transforms import INPUT_POS, KV_LEN, LOGIT_INDEX, CachedGraph


def zero_caches(graph: CachedGraph, batch: int, max_seq: int) -> dict[str, torch.Tensor]:
    """Zeroed caches ``[batch, max_seq, ...]`` for every cache input of ``graph``."""
    return {s.name: torch.zeros(batch, max_seq, *s.features, dtype=s.dtype) for s in graph.caches}


def prefill_then_decode(
    run: Callable[..., torch.Tensor],
    caches: dict[str, torch.Tensor],
    input_ids: torch.Tensor,
    prompt_len: int,
) -> torch.Tensor:
    """Last-token logits ``[1 + steps, b, vocab]`` of a prefill of ``input_ids[:, :prompt_len]``, then of
    one decode step per remaining column of ``input_ids`` (every sequence at the same position).

    ``run`` takes the cached graph's keyword inputs (the graph module itself, or a runner of it).
    """
    batch, total = input_ids.shape
    zero = torch.zeros(batch, dtype=torch.long)
    positions = torch.arange(total).expand(batch, total)
    inputs = {INPUT_POS: zero, KV_LEN: prompt_len, LOGIT_INDEX: zero + prompt_len - 1}
    with torch.inference_mode():
        steps = [run(input_ids=input_ids[:, :prompt_len], position_ids=positions[:, :prompt_len],
                     **inputs, **caches)[:, -1]]  # fmt: skip
        for pos in range(prompt_len, total):
            inputs = {INPUT_POS: zero + pos, KV_LEN: pos + 1, LOGIT_INDEX: zero}
            steps.append(run(input_ids=input_ids[:, pos : pos + 1], position_ids=positions[:, pos : pos + 1],
                             **inputs, **caches)[:, -1])  # fmt: skip
    return torch.stack(steps)
