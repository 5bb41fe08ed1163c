"""Read checkpoints into state dicts keyed by the HuggingFace parameter names.

Safetensors (single file or sharded with an index), GGUF (dequantised by transformers' GGUF
support, which also maps llama.cpp tensor names to HuggingFace names) and PyTorch ``.bin`` files
(read with ``weights_only=True``; arbitrary pickles are never executed).

Some hub checkpoints keep an older layout than transformers' modules (Mixtral's
``block_sparse_moe.experts.N.w1``, for one); transformers converts them while loading.
:func:`read_converted_state_dict` lets it do so and returns its model's state dict.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig

from onboardlm.errors import WeightsError
from onboardlm.models.source import WeightsLocation

StateDict = dict[str, torch.Tensor]


def read_state_dict(
    weights: WeightsLocation,
    config: PretrainedConfig,
    dtype: torch.dtype | None = None,
    keep_fp32: re.Pattern[str] | None = None,
) -> StateDict:
    """Read every tensor of ``weights`` on CPU, cast to ``dtype`` when given (but to fp32 where
    ``keep_fp32`` matches the name: see :mod:`onboardlm.models.precision`)."""
    if weights.format == "safetensors":
        state_dict = _read_safetensors(weights.files)
    elif weights.format == "gguf":
        state_dict = _read_gguf(weights.files[0], config, dtype)
    else:
        state_dict = _read_pytorch(weights.files)
    if dtype is not None:
        state_dict = {k: _cast(k, v, dtype, keep_fp32) for k, v in state_dict.items()}
    return state_dict


def _cast(
    name: str, tensor: torch.Tensor, dtype: torch.dtype, keep_fp32: re.Pattern[str] | None
) -> torch.Tensor:
    if not tensor.is_floating_point():
        return tensor
    return tensor.float() if keep_fp32 is not None and keep_fp32.search(name) else tensor.to(dtype)


def read_converted_state_dict(
    weights: WeightsLocation, config: PretrainedConfig, dtype: torch.dtype | None = None
) -> StateDict:
    """The checkpoint as transformers loads it: its conversion mapping applied, keys of its own modules.

    Holds a transformers copy of the model on the CPU while reading (twice the host memory of a
    direct read), so it is the fallback for checkpoints whose keys the lean model does not take.
    """
    directory = weights.files[0].parent
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            directory,
            config=config,
            dtype=dtype or "auto",
            use_safetensors=weights.format == "safetensors",
            output_loading_info=True,
        )
    except Exception as err:  # transformers raises assorted errors on checkpoints it cannot read
        raise WeightsError(str(directory), f"transformers cannot load this checkpoint either: {err}") from err
    # transformers fills what the checkpoint lacks with random values; that is no load
    gaps = {k: sorted(info.get(k) or []) for k in ("missing_keys", "mismatched_keys")}
    if any(gaps.values()):
        raise WeightsError(str(directory), f"transformers' conversion leaves keys unfilled: {gaps}")
    return dict(model.state_dict())


def _read_safetensors(files: tuple[Path, ...]) -> StateDict:
    state_dict: StateDict = {}
    for file in files:
        if not file.is_file():
            raise WeightsError(str(file), "checkpoint shard is missing", "re-download the checkpoint")
        try:
            state_dict.update(load_file(file))
        except (SafetensorError, OSError) as err:
            raise WeightsError(str(file), f"corrupt or unreadable safetensors file: {err}") from err
    return state_dict


def _read_pytorch(files: tuple[Path, ...]) -> StateDict:
    state_dict: StateDict = {}
    for file in files:
        if not file.is_file():
            raise WeightsError(str(file), "checkpoint shard is missing", "re-download the checkpoint")
        try:
            state_dict.update(torch.load(file, map_location="cpu", weights_only=True, mmap=True))
        except Exception as err:  # torch.load raises many types on bad or unsafe pickles
            raise WeightsError(
                str(file),
                f"cannot read as a weights-only PyTorch checkpoint: {err}",
                "convert it to safetensors",
            ) from err
    return state_dict


def _read_gguf(file: Path, config: PretrainedConfig, dtype: torch.dtype | None) -> StateDict:
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    # transformers maps GGUF tensor names by walking a model of the same architecture; a meta-device
    # model costs no memory and has the HuggingFace module names the lean model also uses.
    with torch.device("meta"):
        name_template: nn.Module = AutoModelForCausalLM.from_config(config)
    try:
        parsed = load_gguf_checkpoint(
            str(file), return_tensors=True, model_to_load=name_template, torch_dtype=dtype
        )
    except ValueError as err:
        raise WeightsError(str(file), f"unsupported GGUF checkpoint: {err}") from err
    except Exception as err:  # the gguf reader raises assorted errors on truncated files
        raise WeightsError(
            str(file), f"corrupt or unreadable GGUF file ({type(err).__name__}: {err})"
        ) from err
    return parsed["tensors"]
