"""The text decoder's weights out of a full multimodal checkpoint, by key prefix.

A multimodal checkpoint stores its language model under a prefix of its own (``language_model.model.``
and ``language_model.lm_head.`` in transformers' hub layout, ``model.language_model.`` and
``lm_head.`` in its module layout) beside the vision and audio towers. The prefixes are measured, not
named: every checkpoint key is split at each dot into prefix + rest, and the prefix under which the
most of the text model's own names occur with the same shapes wins, once for the text model's base
module (``model.``) and once for each of its other top-level modules (``lm_head.``). Keys under a
winning prefix are loaded with the text model's prefix in its place (strictly: a key there that the
text model lacks is an error); every other key (a tower) is left unread.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig

from onboardlm.errors import WeightsError
from onboardlm.models.checkpoint import (
    StateDict,
    checkpoint_shapes,
    read_converted_state_dict,
    read_state_dict,
)
from onboardlm.models.multimodal import multimodal_class
from onboardlm.models.source import WeightsLocation

Shapes = Mapping[str, tuple[int, ...]]


@dataclass(frozen=True)
class PrefixMap:
    """Checkpoint key prefix -> text model key prefix, for each top-level module of the text model."""

    pairs: tuple[tuple[str, str], ...]  # longest checkpoint prefix first

    def rename(self, key: str) -> str | None:
        """The text model's name for checkpoint ``key``, or None for a key outside the text decoder."""
        for checkpoint_prefix, model_prefix in self.pairs:
            if key.startswith(checkpoint_prefix):
                return model_prefix + key[len(checkpoint_prefix) :]
        return None

    def describe(self) -> str:
        return ", ".join(f"{a or '(root)'} -> {b}" for a, b in self.pairs if a != b) or "keys as they are"


def measure_prefixes(checkpoint: Shapes, model: Shapes, subject: str) -> PrefixMap:
    """Where the text model's keys (``model``: name -> shape) sit in ``checkpoint`` (the same).

    The text model's base module (its top-level module with the most tensors, the decoder) may sit
    under any checkpoint prefix; another top-level module keeps its name under the prefix
    (``lm_head.`` may become ``language_model.lm_head.``). A module whose keys all miss is left out
    (a tied LM head); two prefixes that fit equally well are an error naming both.
    """
    tops: dict[str, list[str]] = {}
    for key in model:
        tops.setdefault(key.partition(".")[0], []).append(key)
    base = max(tops, key=lambda top: len(tops[top]))
    pairs = []
    for top, keys in tops.items():
        # the base module is found by its keys below it, another module by its own name too
        names = {key.partition(".")[2] if top == base else key: model[key] for key in keys}
        found = _best_prefix(checkpoint, names, subject, top)
        if found is not None:
            pairs.append((found if top == base else f"{found}{top}.", f"{top}."))
    pairs.sort(key=lambda pair: len(pair[0]), reverse=True)
    return PrefixMap(tuple(pairs))


def _best_prefix(checkpoint: Shapes, names: Shapes, subject: str, module: str) -> str | None:
    """The checkpoint prefix under which the most of ``names`` occur with their shapes."""
    counts: Counter[str] = Counter()
    for key, shape in checkpoint.items():
        for cut in [0] + [i + 1 for i, char in enumerate(key) if char == "."]:
            if names.get(key[cut:]) == shape:
                counts[key[:cut]] += 1
    if not counts:
        return None
    ranked = counts.most_common()
    if len(ranked) > 1 and ranked[1][1] == ranked[0][1]:
        raise WeightsError(
            subject,
            f"the text decoder's {module!r} weights fit two checkpoint prefixes equally well: "
            f"{ranked[0][0]!r} and {ranked[1][0]!r}",
        )
    return ranked[0][0]


@dataclass(frozen=True)
class TextWeights:
    """The text decoder's state dict, and what was left out of the checkpoint."""

    state_dict: StateDict
    prefixes: PrefixMap
    left_out: int  # tensors of the checkpoint not read (the towers)
    left_out_modules: tuple[str, ...]

    @property
    def note(self) -> str:
        towers = f" ({', '.join(self.left_out_modules)})" if self.left_out_modules else ""
        return (
            f"text decoder weights of a multimodal checkpoint ({self.prefixes.describe()}); "
            f"{self.left_out} vision/audio tower tensor(s) not loaded{towers}"
        )


def read_text_weights(
    weights: WeightsLocation,
    model: nn.Module,
    dtype: torch.dtype | None = None,
    keep_fp32: re.Pattern[str] | None = None,
) -> TextWeights:
    """Read the tensors of ``model`` (the text decoder) out of the multimodal checkpoint ``weights``."""
    subject = ", ".join(str(f) for f in weights.files)
    shapes = checkpoint_shapes(weights)
    template = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    prefixes = measure_prefixes(shapes, template, subject)
    state_dict = read_state_dict(weights, model.config, dtype, keep_fp32, rename=prefixes.rename)
    left_out = sorted(key for key in shapes if prefixes.rename(key) is None)
    return TextWeights(state_dict, prefixes, len(left_out), _modules(left_out))


def read_converted_text_weights(
    weights: WeightsLocation, multimodal: PretrainedConfig, model: nn.Module, dtype: torch.dtype | None = None
) -> TextWeights:
    """The text decoder's tensors out of the multimodal model as transformers loads it whole (its
    conversion mapping applied: renamed modules, packed experts), cut out by measured prefixes.

    The fallback for checkpoints whose text part is not the text model's layout under a prefix.
    """
    full = read_converted_state_dict(
        weights, multimodal, dtype, multimodal_class(multimodal), refuse_unexpected=True
    )
    subject = ", ".join(str(f) for f in weights.files)
    template = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    prefixes = measure_prefixes({key: tuple(t.shape) for key, t in full.items()}, template, subject)
    state_dict = {name: tensor for key, tensor in full.items() if (name := prefixes.rename(key)) is not None}
    left_out = sorted(key for key in full if prefixes.rename(key) is None)
    return TextWeights(state_dict, prefixes, len(left_out), _modules(left_out))


def _modules(keys: list[str]) -> tuple[str, ...]:
    """The top-level modules ``keys`` belong to (two levels under a ``model.`` wrapper)."""
    tops = []
    for key in keys:
        parts = key.split(".")
        depth = 2 if parts[0] == "model" and len(parts) > 2 else 1
        tops.append(".".join(parts[:depth]))
    return tuple(dict.fromkeys(tops))
