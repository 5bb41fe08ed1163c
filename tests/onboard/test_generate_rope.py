"""RoPE variants of generated files against transformers: scaled types, dynamic NTK and longrope on
both sides of the original context, per-layer-type tables, partial and interleaved rotation."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from onboardlm.onboard.analyze import analyze
from onboardlm.onboard.generate import generate_model_file
from onboardlm.testing import assert_rmse_close, tiny_config, transfer_weights

LONGROPE_PAIRS = 48  # rotary dim / 2 of the default Phi-3 config
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama_yarn": (
        "llama",
        {
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 32,
            }
        },
    ),
    "llama_dynamic": (
        "llama",
        {
            "max_position_embeddings": 16,
            "rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0},
        },
    ),
    "phi3_longrope": (
        "phi3",
        {
            "max_position_embeddings": 64,
            "original_max_position_embeddings": 16,
            "rope_parameters": {
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "short_factor": [1.0 + 0.05 * i for i in range(LONGROPE_PAIRS)],
                "long_factor": [1.0 + 0.5 * i for i in range(LONGROPE_PAIRS)],
                "original_max_position_embeddings": 16,
            },
        },
    ),
    "gemma3_linear_global": (
        "gemma3_text",
        {
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 8.0},
            }
        },
    ),
    "glm_partial_interleaved": ("glm", {}),
    "helium_interleaved": ("helium", {}),
}


def import_file(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"generated_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("seq", [10, 30], ids=["short", "long"])  # long: past a 16-token original context
def test_rope_variant_logits(variant: str, seq: int, tmp_path: Path) -> None:
    model_type, fields = VARIANTS[variant]
    config = AutoConfig.for_model(model_type, **fields)
    path = tmp_path / f"modeling_{variant}.py"
    path.write_text(generate_model_file(analyze(config)))
    tiny = tiny_config(config)
    reference = AutoModelForCausalLM.from_config(tiny, attn_implementation="eager").eval()
    model = getattr(import_file(path), type(reference).__name__)(tiny).eval()
    transfer_weights(reference, model)
    input_ids = torch.randint(0, tiny.vocab_size, (2, seq))
    position_ids = torch.arange(seq)[None].expand(2, seq)
    with torch.no_grad():
        expected = reference(input_ids=input_ids, position_ids=position_ids).logits
        actual = model(input_ids=input_ids, position_ids=position_ids).logits
    assert_rmse_close(actual, expected, rmse_ratio_tol=0.05, msg=f"{variant} logits, {seq} tokens")


def test_interleaved_tables_follow_the_transformers_rotary_module(tmp_path: Path) -> None:
    """Cohere's rotary module repeats each angle for a channel pair; the lean module returns the same."""
    config = AutoConfig.for_model("cohere")
    path = tmp_path / "modeling_cohere.py"
    path.write_text(generate_model_file(analyze(config)))
    tiny = tiny_config(config)
    reference = AutoModelForCausalLM.from_config(tiny).model.rotary_emb
    lean = import_file(path).CohereRotaryEmbedding(tiny)
    x, position_ids = torch.randn(2, 7, tiny.hidden_size), torch.arange(7)[None].expand(2, 7) + 5
    for got, want in zip(lean(x, position_ids), reference(x, position_ids), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["llama_dynamic", "phi3_longrope"])
def test_sequence_dependent_rope_file_serves_default_configs(variant: str, tmp_path: Path) -> None:
    """A file generated for dynamic / longrope RoPE still runs the architecture's default RoPE."""
    model_type, fields = VARIANTS[variant]
    path = tmp_path / f"modeling_{variant}.py"
    path.write_text(generate_model_file(analyze(AutoConfig.for_model(model_type, **fields))))
    tiny = tiny_config(AutoConfig.for_model(model_type))
    reference = AutoModelForCausalLM.from_config(tiny, attn_implementation="eager").eval()
    model = getattr(import_file(path), type(reference).__name__)(tiny).eval()
    transfer_weights(reference, model)
    input_ids, position_ids = torch.randint(0, tiny.vocab_size, (1, 12)), torch.arange(12)[None]
    with torch.no_grad():
        expected = reference(input_ids=input_ids, position_ids=position_ids).logits
        actual = model(input_ids=input_ids, position_ids=position_ids).logits
    assert_rmse_close(actual, expected, rmse_ratio_tol=0.05, msg=f"{variant} file on the default config")
