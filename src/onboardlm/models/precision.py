"""Tensors transformers keeps in fp32 when a model runs in 16-bit, kept so in the lean model too.

An architecture's transformers class lists them: ``_keep_in_fp32_modules_strict`` for fp16 and bf16
(DeepSeek-V3's and GLM-4-MoE's router ``gate.weight`` and ``e_score_correction_bias``, where a bf16
weight can flip a near-tie in the top-k choice), ``_keep_in_fp32_modules`` for fp16 only. A name is
kept when it contains one of the listed patterns (``*`` matches anything), as transformers matches
them while loading.
"""

from __future__ import annotations

import re

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig


def fp32_pattern(config: PretrainedConfig, dtype: torch.dtype | None) -> re.Pattern[str] | None:
    """What transformers keeps in fp32 for ``config``'s architecture at ``dtype``; None when nothing."""
    if dtype not in (torch.float16, torch.bfloat16):
        return None
    try:
        cls = AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError:  # not a transformers architecture (remote code): it declares nothing
        return None
    names = set(getattr(cls, "_keep_in_fp32_modules_strict", None) or ())
    if dtype == torch.float16:
        names |= set(getattr(cls, "_keep_in_fp32_modules", None) or ())
    if not names:
        return None
    return re.compile("|".join(re.escape(name).replace(r"\*", ".*") for name in sorted(names)))


def keep_in_fp32(model: nn.Module, pattern: re.Pattern[str] | None) -> list[str]:
    """Turn ``model``'s floating parameters and buffers whose names match ``pattern`` to fp32.

    Returns the names changed.
    """
    if pattern is None:
        return []
    changed = []
    for module_name, module in model.named_modules():
        for store in (module._parameters, module._buffers):
            for name, tensor in store.items():
                full = f"{module_name}.{name}" if module_name else name
                if tensor is None or not tensor.is_floating_point() or not pattern.search(full):
                    continue
                if tensor.dtype != torch.float32:
                    upcast = tensor.detach().float()
                    is_param = isinstance(tensor, nn.Parameter)
                    store[name] = nn.Parameter(upcast, tensor.requires_grad) if is_param else upcast
                    changed.append(full)
    return changed
