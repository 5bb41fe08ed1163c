"""Is a causal-LM class really a decoder-only causal LM? Measured on a tiny config, in resolve.

transformers lists some models under its causal-LM classes that are not one: a BERT encoder used as a
decoder (bert-generation), a permutation LM (XLNet), a prompt-prefixed model that attends to its whole
input (CPM-Ant), or the decoder half of an encoder-decoder that cross-attends to an encoder's output
(TrOCR). Two measurements on the model built from a tiny copy of the config, with random weights:

- causal: the logits of a prefix do not change when tokens follow it;
- decoder-only: every module with weights runs on text alone, or those that do not run only on an
  encoder's output (``encoder_hidden_states``), which is cross-attention.

A config that has no tiny copy, or a model transformers cannot build or run on text alone, is not
measured here (later phases say why).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig

from onboardlm.testing.tiny_config import tiny_config

__all__ = ["DecoderCheck", "check_decoder"]

_TOKENS = (2, 8)


@dataclass(frozen=True)
class DecoderCheck:
    """What the measurement found: ``reason`` is None for a decoder-only causal LM (or not measured)."""

    reason: str | None = None
    measured: bool = True


def check_decoder(config: PretrainedConfig) -> DecoderCheck:
    """Measure whether ``config``'s transformers causal LM is causal and decoder-only."""
    try:
        tiny = tiny_config(config)
    except Exception:  # no tiny copy (the analyzer says why): not measured
        return DecoderCheck(measured=False)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, tiny.vocab_size, _TOKENS, generator=generator)
    try:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(tiny, dtype=torch.float32).eval()
        ran: set[str] = set()
        with _recording(model, ran), torch.no_grad():
            full = model(input_ids=ids).logits
            prefix = model(input_ids=ids[:, : _TOKENS[1] // 2]).logits
    except Exception:  # a model that needs more than text, or transformers cannot build: not measured
        return DecoderCheck(measured=False)
    name = config.model_type
    if not torch.allclose(
        prefix.float(), full[:, : prefix.shape[1]].float(), rtol=1e-4, atol=1e-5, equal_nan=True
    ):
        return DecoderCheck(
            f"{name} is not causal: its logits for a prompt change when tokens follow (it attends to the "
            "whole input)"
        )
    idle = _idle_weighted(model, ran)
    if idle:
        cross = _cross_attention(model, tiny, ids, idle)
        if cross:
            return DecoderCheck(
                f"{name} is the decoder of an encoder-decoder: {cross[0]} attends to an encoder's output "
                "(encoder_hidden_states)"
            )
    return DecoderCheck()


class _recording:
    """Forward hooks that add the name of every module that runs to ``ran``."""

    def __init__(self, model: nn.Module, ran: set[str]) -> None:
        self.handles = [
            module.register_forward_hook(lambda m, a, o, n=name: ran.add(n))
            for name, module in model.named_modules()
        ]

    def __enter__(self) -> _recording:
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()


def _idle_weighted(model: nn.Module, ran: set[str]) -> list[str]:
    """Outermost modules with weights that did not run (their parent did)."""
    return [
        name
        for name, module in model.named_modules()
        if name
        and name not in ran
        and (name.rsplit(".", 1)[0] if "." in name else "") in ran
        and any(True for _ in module.parameters())
    ]


def _cross_attention(
    model: nn.Module, tiny: PretrainedConfig, ids: torch.Tensor, idle: list[str]
) -> list[str]:
    """The idle modules that run once the model is given an encoder's output."""
    if "encoder_hidden_states" not in inspect.signature(model.forward).parameters:
        return []
    width = getattr(tiny, "cross_attention_hidden_size", None) or tiny.hidden_size
    encoder = torch.randn(ids.shape[0], 5, width, generator=torch.Generator().manual_seed(1))
    ran: set[str] = set()
    try:
        with _recording(model, ran), torch.no_grad():
            model(input_ids=ids, encoder_hidden_states=encoder)
    except Exception:  # the encoder output is not what it takes: nothing measured
        return []
    return [name for name in idle if name in ran]
