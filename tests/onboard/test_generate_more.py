"""Dense architectures outside the required list (the generator is generic by features, not by names)
and optional blocks of listed ones; the review's BA1 loads the default config's weights, so a file
generated with an optional block switched on still serves configs without it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from onboardlm.onboard.analyze import analyze
from onboardlm.onboard.generate import generate_model_file
from onboardlm.review import review_model_file
from onboardlm.review.catalog import RULES
from onboardlm.testing import assert_rmse_close, tiny_config, transfer_weights

OTHER_ARCHITECTURES = [
    "glm",  # partial RoPE on interleaved channel pairs
    "glm4",  # four norms per layer under other names
    "helium",
    "exaone4",  # RoPE only on sliding-window layers
    "olmo3",
    "arcee",  # plain relu² MLP
    "seed_oss",
    "ernie4_5",
    "vaultgemma",
    "cwm",
    "olmo",  # LayerNorm without weights and with a hard-coded epsilon
    "hyperclovax",  # MuP multipliers, logits multiplied (Granite divides)
    "jais2",
]
#: Values far from the defaults (1.0), so a multiplier the lean file forgot changes the logits.
TELLING_FIELDS = {"embedding_multiplier": 3.0, "residual_multiplier": 0.5, "logits_scaling": 4.0}


#: Optional blocks switched on by a config flag; the generated file builds them only when it is set.
OPTIONAL_BLOCKS = {"cohere": {"use_qk_norm": True}, "phi": {"qk_layernorm": True}}
CASES = [(model_type, {}) for model_type in OTHER_ARCHITECTURES] + list(OPTIONAL_BLOCKS.items())


@pytest.mark.parametrize(
    ("model_type", "fields"), CASES, ids=[f"{t}{'+' if f else ''}{','.join(f)}" for t, f in CASES]
)
def test_generated_model_matches_transformers(model_type: str, fields: dict, tmp_path: Path) -> None:
    config = AutoConfig.for_model(model_type, **fields)
    path = tmp_path / f"modeling_{model_type}.py"
    path.write_text(generate_model_file(analyze(config)))
    spec = importlib.util.spec_from_file_location(f"generated_{model_type}", path)
    assert spec is not None and spec.loader is not None
    lean_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lean_module)

    tiny = tiny_config(config)
    for name, value in TELLING_FIELDS.items():
        if isinstance(getattr(tiny, name, None), float):
            setattr(tiny, name, value)
    reference = AutoModelForCausalLM.from_config(tiny, attn_implementation="eager").eval()
    model = getattr(lean_module, type(reference).__name__)(tiny).eval()
    transfer_weights(reference, model)
    input_ids, position_ids = torch.randint(0, tiny.vocab_size, (2, 20)), torch.arange(20)[None].expand(2, 20)
    with torch.no_grad():
        expected = reference(input_ids=input_ids, position_ids=position_ids).logits
        actual = model(input_ids=input_ids, position_ids=position_ids).logits
    assert_rmse_close(actual, expected, rmse_ratio_tol=0.05, msg=f"{model_type} logits")

    report = review_model_file(path, None, rule_ids=[rule.id for rule in RULES if not rule.needs_tests])
    assert report.passed, [f"{f.rule_id} {f.location}: {f.reason}" for f in report.failures]
