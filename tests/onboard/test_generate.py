"""Generated lean model files against transformers: full-model logits, review rules, clean source.

For each architecture the transformers default config is analyzed, the model file generated, written
to a temporary folder and imported; the lean and the HF model are built on one tiny config, the HF
weights loaded into the lean model through the real loading path, and the fp32 logits compared.
"""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path
from types import ModuleType

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from onboardlm.onboard.analyze import analyze
from onboardlm.onboard.generate import generate_model_file, ruff_command
from onboardlm.review import review_model_file
from onboardlm.review.catalog import RULES
from onboardlm.testing import assert_rmse_close, tiny_config, transfer_weights
from onboardlm.testing.reference import reference_params

DENSE_ARCHITECTURES = [
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "phi3",
    "granite",
    "olmo2",
    "smollm3",
    "phi",
    "starcoder2",
    "stablelm",
    "cohere",
    "internlm3",
]
#: Values far from the defaults (1.0), so a multiplier the lean file forgot changes the logits.
TELLING_FIELDS = {
    "granite": {
        "embedding_multiplier": 3.0,
        "residual_multiplier": 0.5,
        "logits_scaling": 4.0,
        "attention_multiplier": 0.3,
    },
    "cohere": {"logit_scale": 0.3},
}
MODEL_FILE_RULES = [rule.id for rule in RULES if not rule.needs_tests]


def import_file(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"generated_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_model_file(model_type: str, folder: Path) -> tuple[Path, PretrainedConfig]:
    config = AutoConfig.for_model(model_type)
    path = folder / f"modeling_{model_type}.py"
    path.write_text(generate_model_file(analyze(config)))
    return path, config


def positions(batch: int, seq: int) -> torch.Tensor:
    return torch.arange(seq)[None].expand(batch, seq)


@pytest.mark.parametrize("model_type", reference_params(DENSE_ARCHITECTURES))
def test_generated_model_matches_transformers(model_type: str, tmp_path: Path) -> None:
    path, config = write_model_file(model_type, tmp_path)
    lean_module = import_file(path)
    tiny = tiny_config(config)
    for name, value in TELLING_FIELDS.get(model_type, {}).items():
        setattr(tiny, name, value)
    reference = AutoModelForCausalLM.from_config(tiny, attn_implementation="eager").eval()
    model = getattr(lean_module, type(reference).__name__)(tiny).eval()
    transfer_weights(reference, model)
    input_ids = torch.randint(0, tiny.vocab_size, (2, 20))  # longer than the tiny sliding window (8)
    with torch.no_grad():
        expected = reference(input_ids=input_ids, position_ids=positions(2, 20)).logits
        actual = model(input_ids=input_ids, position_ids=positions(2, 20)).logits
    assert actual.dtype == torch.float32
    assert_rmse_close(actual, expected, rmse_ratio_tol=0.05, msg=f"{model_type} logits")

    report = review_model_file(path, None, rule_ids=MODEL_FILE_RULES)
    assert report.passed, [f"{f.rule_id} {f.location}: {f.reason}" for f in report.failures]


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "phi3", "cohere"])
def test_generated_source_is_clean(model_type: str, tmp_path: Path) -> None:
    path, _ = write_model_file(model_type, tmp_path)
    source = path.read_text()
    for residue in ("{{", "{%", "pass\n", "TODO", "\n\n\n\n"):
        assert residue not in source
    assert (
        source.rstrip().splitlines()[-1].startswith("AutoModelForCausalLMFactory.register_custom_model_cls(")
    )
    ruff = ruff_command()
    assert ruff is not None, "ruff is a dependency of onboardlm (the generator formats with it)"
    for args in (
        ["check", "--isolated", "--select", "E,F,W,I,B,UP,SIM", "--ignore", "E501"],
        ["format", "--check"],
    ):
        done = subprocess.run(
            [*ruff, *args, "--line-length", "110", str(path)], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stdout + done.stderr


def test_regenerated_llama_is_the_packaged_one() -> None:
    """The packaged golden Llama file is the generator's output, byte for byte."""
    packaged = Path(__file__).parents[2] / "src/onboardlm/models/custom/modeling_llama.py"
    assert generate_model_file(analyze(AutoConfig.for_model("llama"))) == packaged.read_text()


def test_formatting_is_skipped_with_a_warning_without_ruff_or_when_ruff_fails(monkeypatch, caplog) -> None:
    from onboardlm.onboard import generate

    unformatted = "import torch\nx=  torch.ones(1)\n"
    assert generate.format_source(unformatted) == "import torch\n\nx = torch.ones(1)\n"  # ruff formats
    with caplog.at_level("WARNING", logger="onboardlm.onboard.generate"):
        assert generate.format_source("def broken(:\n") == "def broken(:\n"
        monkeypatch.setattr(generate, "ruff_command", lambda: None)
        assert generate.format_source(unformatted) == unformatted
    messages = [r.getMessage() for r in caplog.records]
    assert any("failed on the generated file" in m for m in messages)
    assert any("ruff is not installed" in m for m in messages)
