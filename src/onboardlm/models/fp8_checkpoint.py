"""FP8 checkpoints: which linears a checkpoint stores in FP8, and how (read from its file headers).

Two layouts are read, both announced by the config's ``quantization_config``:

* transformers' ``quant_method: fp8`` (DeepSeek-V3, Qwen3 FP8 and the like): ``<m>.weight`` in
  ``float8_e4m3fn`` with ``<m>.weight_scale_inv`` (despite the name, the multiplier that dequantises:
  one value per tensor, or one per ``weight_block_size`` block, usually 128 x 128); an
  ``<m>.activation_scale`` when ``activation_scheme`` is ``static``.
* compressed-tensors (``quant_method: compressed-tensors``, float 8-bit weights): ``<m>.weight`` with
  ``<m>.weight_scale`` (per channel ``[N, 1]``, per tensor, or per block) and ``<m>.input_scale``
  for static activations; dynamic activations are per token.

Which linears are quantised is measured, not taken from ignore lists: every ``*.weight`` stored as
``F8_E4M3`` is, with the scale tensors found beside it. The block size the config declares must
match the scale grids. :func:`fp8_specs` returns the per-weight layout that
:func:`onboardlm.transforms.quantize_fp8.quantize_fp8_linears` builds the graph's tensors from.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from safetensors import safe_open
from transformers import PretrainedConfig

from onboardlm.errors import WeightsError
from onboardlm.models.source import WeightsLocation
from onboardlm.ops.quantization import FP8_DTYPE, weight_scheme
from onboardlm.transforms.quantize_fp8 import Fp8LinearSpec

FP8_METHODS = ("fp8", "compressed-tensors")
_SCALE_NAMES = ("weight_scale_inv", "weight_scale")
_INPUT_SCALE_NAMES = ("input_scale", "activation_scale")


def quantization_config(config: PretrainedConfig) -> dict[str, Any] | None:
    """The config's ``quantization_config`` as a dict, or None."""
    found = getattr(config, "quantization_config", None)
    if found is None:
        return None
    if not isinstance(found, Mapping):
        found = found.to_dict() if hasattr(found, "to_dict") else vars(found)
    return dict(found)


def _declared_block(qc: dict[str, Any]) -> tuple[int, int] | None:
    """The block size the config declares (``weight_block_size`` or compressed-tensors' ``block_structure``)."""
    block = qc.get("weight_block_size")
    for group in (qc.get("config_groups") or {}).values():
        weights = (group or {}).get("weights") or {}
        block = block or weights.get("block_structure")
    return (int(block[0]), int(block[1])) if block else None


def _check_method(qc: dict[str, Any], subject: str) -> None:
    method = qc.get("quant_method")
    if method not in FP8_METHODS:
        raise WeightsError(
            subject,
            f"quantization method {method!r} is not supported",
            "use an FP8 checkpoint (quant_method fp8 or compressed-tensors) or a float one",
        )
    if method == "compressed-tensors":
        for name, group in (qc.get("config_groups") or {}).items():
            weights = (group or {}).get("weights") or {}
            if weights and (weights.get("type") != "float" or weights.get("num_bits") != 8):
                raise WeightsError(
                    subject,
                    f"compressed-tensors group {name!r} stores {weights.get('type')} "
                    f"{weights.get('num_bits')}-bit weights; only float 8-bit (FP8) weights load",
                )
            activations = (group or {}).get("input_activations") or {}
            if activations and (activations.get("type") != "float" or activations.get("num_bits") != 8):
                raise WeightsError(
                    subject, f"compressed-tensors group {name!r} quantises activations to non-FP8"
                )


def _headers(weights: WeightsLocation) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every tensor's ``(safetensors dtype, shape)``, from the file headers (nothing read)."""
    found: dict[str, tuple[str, tuple[int, ...]]] = {}
    for file in weights.files:
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118  (a safetensors handle is not iterable)
                lazy = handle.get_slice(key)
                found[key] = (lazy.get_dtype(), tuple(lazy.get_shape()))
    return found


def fp8_specs(config: PretrainedConfig, weights: WeightsLocation | None) -> dict[str, Fp8LinearSpec] | None:
    """The FP8 linears of the checkpoint (weight key -> layout), or None for a checkpoint that is not
    quantised. Raises :class:`WeightsError` for a quantisation this loader does not read."""
    qc = quantization_config(config)
    if qc is None or weights is None:
        return None
    subject = ", ".join(str(f) for f in weights.files)
    _check_method(qc, subject)
    if weights.format != "safetensors":
        raise WeightsError(subject, "FP8 checkpoints are read from safetensors files only")
    headers = _headers(weights)
    declared = _declared_block(qc)
    specs: dict[str, Fp8LinearSpec] = {}
    for key, (dtype, shape) in headers.items():
        if dtype != "F8_E4M3" or not key.endswith(".weight"):
            if dtype.startswith("F8") and dtype != "F8_E4M3":
                raise WeightsError(key, f"is stored as {dtype}; only float8_e4m3fn weights load")
            continue
        prefix = key.removesuffix("weight")
        scale = next((n for n in _SCALE_NAMES if prefix + n in headers), None)
        if scale is None or len(shape) != 2:
            raise WeightsError(key, "is an FP8 weight without a weight_scale or weight_scale_inv beside it")
        scale_shape = headers[prefix + scale][1]
        try:
            kind, block = weight_scheme(
                torch.empty(shape, dtype=FP8_DTYPE, device="meta"), torch.empty(scale_shape)
            )
        except ValueError as err:
            raise WeightsError(prefix + scale, str(err)) from None
        if kind == "block" and declared is not None and block != declared:
            raise WeightsError(
                prefix + scale,
                f"scale grid {list(scale_shape)} does not fit block size {list(declared)} for a {list(shape)} weight",
            )
        input_scale = next((n for n in _INPUT_SCALE_NAMES if prefix + n in headers), None)
        input_shape = headers[prefix + input_scale][1] if input_scale else ()
        if input_scale is not None and len(input_shape) and int(torch.Size(input_shape).numel()) != 1:
            raise WeightsError(
                prefix + input_scale, "only one static activation scale per linear is supported"
            )
        specs[key] = Fp8LinearSpec(tuple(shape), scale, tuple(scale_shape), input_scale, tuple(input_shape))
    if not specs:
        raise WeightsError(
            subject, "the config declares FP8 quantisation but no tensor is stored as float8_e4m3fn"
        )
    return specs
