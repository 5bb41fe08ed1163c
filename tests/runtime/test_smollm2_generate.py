"""Real weights: SmolLM2-135M from the shipped GGUF, greedy, 10 default prompts x 32 new tokens.

The cached graph must produce exactly the tokens of transformers' ``generate`` on the same GGUF with
the same chat template, fp32 on CPU. transformers runs the ten prompts as one left-padded batch with
an attention mask; onboardlm runs them as ``onboardlm run`` does (default settings: batches of 8 and
2, right-padded, per-sequence lengths). The GGUF is
dequantised once (by transformers' reader, through the factory) and the transformers model gets the
same tensors with a strict ``load_state_dict``; ``tests/models/test_gguf.py`` checks that loading path
against ``from_pretrained(gguf_file=...)``.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.initialization import no_init_weights

from onboardlm.registry.settings import RunSettings
from onboardlm.runtime.chat import encode_chat_prompt, stop_token_ids
from onboardlm.runtime.prompts import default_prompts
from onboardlm.runtime.runner import Runner

NEW_TOKENS = 32


def _hf_greedy(runner: Runner, prompts: list[list[int]]) -> list[list[int]]:
    with no_init_weights():  # every tensor comes from the checkpoint below
        model = AutoModelForCausalLM.from_config(runner.config, dtype=torch.float32).eval()
    weights = {k: v for k, v in runner.graph.gm.state_dict().items() if "._ad_" not in k}  # no RoPE tables
    model.load_state_dict(weights, strict=True)
    tokenizer = runner.tokenizer
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=pad
        )
    return out[:, width:].tolist()


def _until_stop(tokens: list[int], stops: set[int]) -> list[int]:
    for i, token in enumerate(tokens):
        if token in stops:
            return tokens[:i]
    return tokens


@pytest.mark.slow
def test_greedy_tokens_equal_transformers_generate_for_the_default_prompts() -> None:
    settings = RunSettings(dtype="float32", device="cpu", max_new_tokens=NEW_TOKENS)  # batches of 8 + 2
    runner = Runner.load(None, settings)
    results = runner.run()
    assert [r.prompt for r in results] == default_prompts()
    stops = stop_token_ids(runner.tokenizer)
    encoded = [encode_chat_prompt(runner.tokenizer, text) for text in default_prompts()]
    expected = [_until_stop(row, stops) for row in _hf_greedy(runner, encoded)]
    for result, reference in zip(results, expected, strict=True):
        assert result.new_token_ids == reference, f"[PROMPT {result.index}] differs"
    assert "Reykjav" in results[3].output or "Iceland" in results[3].output
