"""Phases 0 and 1: resolve (decoder-only check), fit (sizes from a meta build), survey (coverage)."""

from __future__ import annotations

import builtins
import io
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

from onboardlm.errors import ModelSourceError
from onboardlm.onboard.fit import DeviceMemory, count_parameters, fit, host_memory
from onboardlm.onboard.resolve import resolve
from onboardlm.onboard.survey import derived_model_types, family_stem, registry_family, survey


def test_bare_model_type_resolves_to_its_default_config() -> None:
    resolved = resolve("qwen3")
    assert (resolved.model_type, resolved.config_class) == ("qwen3", "Qwen3Config")
    assert resolved.causal_lm_class == "Qwen3ForCausalLM"
    assert resolved.weights == "none (random weights)" and not resolved.has_tokenizer


@pytest.mark.parametrize(
    ("model", "problem"),
    [
        ("bert", "encoder-only"),
        ("t5", "encoder-decoder"),
        ("bart", "encoder-decoder"),
        ("vit", "no causal-LM class"),
        # measured on a tiny config: transformers lists them as causal LMs
        ("bert-generation", "not causal: its logits for a prompt change when tokens follow"),
        ("xlnet", "not causal"),
        ("cpmant", "not causal"),
        (
            "trocr",
            r"decoder of an encoder-decoder: model\.decoder\.layers\.0\.encoder_attn attends to an encoder",
        ),
    ],
)
def test_models_that_are_not_decoder_only_are_refused(model: str, problem: str) -> None:
    with pytest.raises(ModelSourceError, match=f"^{model}: .*{problem}"):
        resolve(model)


def test_hub_id_missing_from_the_cache_fails_fast_offline(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    start = time.perf_counter()
    with pytest.raises(ModelSourceError, match="not in the local HuggingFace cache"):
        resolve("no-such-org/no-such-model", offline=True)
    assert time.perf_counter() - start < 10


def test_directory_without_config_and_unparsable_config(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match="no config.json"):
        resolve(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelSourceError, match="malformed JSON"):
        resolve(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no_such_type_xyz"}))
    with pytest.raises(ModelSourceError, match="cannot load the config"):
        resolve(str(tmp_path))


def test_parameter_count_equals_a_real_build() -> None:
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
        tie_word_embeddings=True,
    )
    real = AutoModelForCausalLM.from_config(config)
    assert count_parameters(config) == sum(p.numel() for p in real.parameters())


@pytest.mark.parametrize(
    ("layers", "world_size"), [(2, 1), (24, 2), (160, 4), (400, 8)], ids=["0.5B", "4B", "27B", "66B+"]
)
def test_world_size_follows_the_parameter_count(layers: int, world_size: int) -> None:
    config = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=layers,
        num_attention_heads=32,
        vocab_size=32000,
    )
    report = fit(config)
    expected = (
        1
        if report.parameters < 2e9
        else 2
        if report.parameters <= 15e9
        else 4
        if report.parameters <= 80e9
        else 8
    )
    assert report.world_size == expected == world_size
    assert report.bytes_per_dtype["bfloat16"] == 2 * report.parameters
    assert report.bytes_per_dtype["float32"] == 4 * report.parameters


def test_fits_compares_bf16_weights_with_free_memory() -> None:
    small = fit(
        LlamaConfig(
            hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=300
        )
    )
    huge = fit(AutoConfig.for_model("deepseek_v3"))
    if torch.cuda.is_available():
        pytest.skip("a run would use the GPU, not the host")
    assert small.fits and not huge.fits


def test_host_memory_is_psutils_figure() -> None:
    memory = host_memory()
    assert memory.total_bytes == psutil.virtual_memory().total
    assert 0 < memory.free_bytes <= memory.total_bytes


def test_fit_works_where_proc_meminfo_cannot_be_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on macOS or Windows: no /proc/meminfo. psutil (faked here) is the only source of host memory."""

    def refuse_meminfo(real: Callable[..., Any]) -> Callable[..., Any]:
        def guarded(file: Any, *args: Any, **kwargs: Any) -> Any:
            if "meminfo" in str(file):
                raise FileNotFoundError(file)
            return real(file, *args, **kwargs)

        return guarded

    for module in (builtins, io, os):
        monkeypatch.setattr(module, "open", refuse_meminfo(module.open))
    gib = 2**30
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=6 * gib, total=8 * gib))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=300
    )
    report = fit(config)
    assert report.devices == [DeviceMemory("host", 6 * gib, 8 * gib)]
    assert report.run_device == DeviceMemory("host", 6 * gib, 8 * gib) and report.fits
    with pytest.raises(FileNotFoundError):  # the guard is live: /proc/meminfo really cannot be read here
        Path("/proc/meminfo").read_text()


@pytest.mark.parametrize(
    ("name", "stem"),
    [
        ("Qwen/Qwen3-8B", "qwen3"),
        ("Qwen/Qwen3-0.6B", "qwen3"),
        ("mistralai/Mixtral-8x7B-v0.1", "mixtral"),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2"),
        ("SmolLM2-135M-Instruct.Q4_1", "smollm2"),
        ("llama", None),
    ],
)
def test_family_stem(name: str, stem: str | None) -> None:
    assert family_stem(name) == stem


def test_registry_family_finds_the_other_sizes() -> None:
    family = registry_family("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert "HuggingFaceTB/SmolLM2-360M-Instruct" in family and "HuggingFaceTB/SmolLM2-135M-Instruct" in family
    assert not any("Llama-3" in name for name in family)


def test_lineage_comes_from_the_modular_file() -> None:
    assert set(derived_model_types("qwen3")) >= {"llama", "qwen2"}
    assert derived_model_types("gpt2") == []  # no modular file


def test_survey_reports_the_shipped_lean_llama() -> None:
    coverage = survey(LlamaConfig(), "meta-llama/Llama-3.1-8B-Instruct")
    assert coverage.already_supported
    assert coverage.custom_class == "onboardlm.models.custom.modeling_llama.LlamaForCausalLM"
    assert "meta-llama/Llama-3.1-8B-Instruct" in coverage.registry_family
