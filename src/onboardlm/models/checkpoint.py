"""Read checkpoints into state dicts keyed by the HuggingFace parameter names.

Safetensors (single file or sharded with an index), GGUF (dequantised by transformers' GGUF
support, which also maps llama.cpp tensor names to HuggingFace names) and PyTorch ``.bin`` files
(read with ``weights_only=True``; arbitrary pickles are never executed).

Some hub checkpoints keep an older layout than transformers' modules (Mixtral's
``block_sparse_moe.experts.N.w1``, for one); transformers converts them while loading.
:func:`read_converted_state_dict` lets it do so and returns its model's state dict.
"""

from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig

from onboardlm.errors import WeightsError
from onboardlm.models.source import WeightsLocation

StateDict = dict[str, torch.Tensor]
#: Checkpoint key -> the key it loads under, or None to leave the tensor out.
Rename = Callable[[str], str | None]


def read_state_dict(
    weights: WeightsLocation,
    config: PretrainedConfig,
    dtype: torch.dtype | None = None,
    keep_fp32: re.Pattern[str] | None = None,
    rename: Rename | None = None,
) -> StateDict:
    """Read every tensor of ``weights`` on CPU, cast to ``dtype`` when given (but to fp32 where
    ``keep_fp32`` matches the name: see :mod:`onboardlm.models.precision`).

    ``rename`` (safetensors and PyTorch files) maps each checkpoint key to the key it is loaded
    under, or to None for a tensor not to read (safetensors files then skip it unread).
    """
    if weights.format == "safetensors":
        state_dict = _read_safetensors(weights.files, rename)
    elif weights.format == "gguf":
        state_dict = _read_gguf(weights.files[0], config, dtype)
    else:
        state_dict = _renamed(_read_pytorch(weights.files), rename)
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
    weights: WeightsLocation,
    config: PretrainedConfig,
    dtype: torch.dtype | None = None,
    model_class: type[Any] = AutoModelForCausalLM,
    refuse_unexpected: bool = False,
) -> StateDict:
    """The checkpoint as transformers loads it: its conversion mapping applied, keys of its own modules.

    Holds a transformers copy of the model (``model_class``: the causal LM, or a multimodal model's
    class) on the CPU while reading (twice the host memory of a direct read), so it is the fallback
    for checkpoints whose keys the lean model does not take. Keys transformers leaves unfilled are an
    error; so are checkpoint keys it does not use, with ``refuse_unexpected``.
    """
    directory = weights.files[0].parent
    try:
        with _transformers_quiet():  # its load report would repeat, in a table, what we raise below
            model, info = model_class.from_pretrained(
                directory,
                config=config,
                dtype=dtype or "auto",
                use_safetensors=weights.format == "safetensors",
                output_loading_info=True,
            )
    except Exception as err:  # transformers raises assorted errors on checkpoints it cannot read
        raise WeightsError(str(directory), f"transformers cannot load this checkpoint either: {err}") from err
    # transformers fills what the checkpoint lacks with random values; that is no load
    kinds = ("missing_keys", "mismatched_keys", *(("unexpected_keys",) if refuse_unexpected else ()))
    gaps = {k: sorted(info.get(k) or []) for k in kinds}
    if any(gaps.values()):
        raise WeightsError(str(directory), f"transformers' conversion leaves keys unfilled: {gaps}")
    return dict(model.state_dict())


def check_readable(weights: WeightsLocation) -> None:
    """Raise :class:`WeightsError` unless every file of a safetensors or PyTorch checkpoint opens.

    Cheap: safetensors headers are read (they cover the whole file, so truncation shows), and
    PyTorch zip files are memory-mapped, not read. GGUF files are checked when their config is read.
    """
    for file in weights.files:
        if weights.format == "safetensors":
            with _safetensors_errors(file), safe_open(file, "pt") as handle:
                handle.keys()
        elif weights.format == "pytorch":
            _load_pytorch_file(file)


def checkpoint_shapes(weights: WeightsLocation) -> dict[str, tuple[int, ...]]:
    """Every tensor's key and shape; safetensors shapes come from the file headers (nothing read)."""
    if weights.format == "gguf":
        raise WeightsError(
            str(weights.files[0]), "tensor shapes are read from safetensors or PyTorch files only"
        )
    if weights.format == "pytorch":
        return {k: tuple(v.shape) for k, v in _read_pytorch(weights.files).items()}
    shapes: dict[str, tuple[int, ...]] = {}
    for file in weights.files:
        with _safetensors_errors(file), safe_open(file, "pt") as handle:
            names = handle.keys()  # a safetensors handle is not iterable
            shapes.update({key: tuple(handle.get_slice(key).get_shape()) for key in names})
    return shapes


def _read_safetensors(files: tuple[Path, ...], rename: Rename | None = None) -> StateDict:
    state_dict: StateDict = {}
    for file in files:
        with _safetensors_errors(file):
            if rename is None:
                state_dict.update(load_file(file))
                continue
            with safe_open(file, "pt") as handle:
                names = handle.keys()
                for key in names:
                    name = rename(key)
                    if name is not None:
                        state_dict[name] = handle.get_tensor(key)
    return state_dict


def _renamed(state_dict: StateDict, rename: Rename | None) -> StateDict:
    if rename is None:
        return state_dict
    return {name: tensor for key, tensor in state_dict.items() if (name := rename(key)) is not None}


@contextmanager
def _safetensors_errors(file: Path) -> Iterator[None]:
    if not file.is_file():
        raise WeightsError(str(file), "checkpoint shard is missing", "re-download the checkpoint")
    try:
        yield
    except (SafetensorError, OSError) as err:
        raise WeightsError(str(file), f"corrupt or unreadable safetensors file: {err}") from err


def _read_pytorch(files: tuple[Path, ...]) -> StateDict:
    state_dict: StateDict = {}
    for file in files:
        state_dict.update(_load_pytorch_file(file))
    return state_dict


def _load_pytorch_file(file: Path) -> StateDict:
    """One ``.bin`` file as a state dict, read with ``weights_only=True``: a pickle that would build
    anything but tensors and plain containers (or call code) is refused, never run."""
    if not file.is_file():
        raise WeightsError(str(file), "checkpoint shard is missing", "re-download the checkpoint")
    try:
        with warnings.catch_warnings():  # e.g. torch's note on the pickle protocol
            warnings.simplefilter("ignore")
            # only the zip format can be memory-mapped; older files are read whole
            loaded = torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    except pickle.UnpicklingError as err:
        raise WeightsError(str(file), _refusal(str(err)), "convert it to safetensors") from err
    except Exception as err:  # torch.load raises many types on damaged files
        raise WeightsError(
            str(file),
            f"cannot read as a weights-only PyTorch checkpoint: {' '.join(str(err).split())}",
            "convert it to safetensors",
        ) from err
    if not isinstance(loaded, dict):
        problem = f"it holds a {type(loaded).__name__}"
    else:
        key = next((k for k, v in loaded.items() if not isinstance(v, torch.Tensor)), None)
        if key is None:
            return loaded
        problem = f"key {key!r} holds a {type(loaded[key]).__name__}"
    raise WeightsError(str(file), f"not a state dict of tensors: {problem}", "save model.state_dict()")


def _refusal(error: str) -> str:
    """torch's weights-only refusal (a paragraph of advice) as one line naming what the pickle wanted."""
    called = re.search(r"GLOBAL (\S+) was not an allowed global", error)
    if called:
        return f"refused: the pickle calls {called.group(1)}, not a plain state dict; nothing was run"
    reason = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", error, re.DOTALL)
    detail = " ".join(reason.group(1).split()) if reason else "weights-only load failed"
    return f"refused: not a plain state dict ({detail}); nothing was run"


@contextmanager
def _transformers_quiet() -> Iterator[None]:
    """Silence transformers' warnings and progress bars for the block."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


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
