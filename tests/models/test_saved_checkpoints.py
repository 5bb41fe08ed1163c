"""Every shipped lean model loads a checkpoint that transformers itself saved, and gives its logits.

transformers saves some architectures in their original hub layout (Mixtral's
``block_sparse_moe.experts.N.w1``, per-expert MoE keys, ...), which differs from its own module tree;
``save_pretrained`` writes exactly what users download. Each case saves a tiny random transformers
model and loads the folder with the factory.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from onboardlm.errors import WeightsError
from onboardlm.models.config_completion import complete_default_config
from onboardlm.models.factory import AutoModelForCausalLMFactory
from onboardlm.testing import tiny_config
from onboardlm.testing.reference import installed_model_type, reference_params

MODEL_TYPES = sorted(
    installed_model_type(stem) or stem
    for stem in (
        path.stem.removeprefix("modeling_")
        for path in (Path(__file__).parents[2] / "src/onboardlm/models/custom").glob("modeling_*.py")
    )
)


@pytest.mark.parametrize("model_type", reference_params(MODEL_TYPES))
def test_lean_model_loads_a_transformers_saved_checkpoint(model_type: str, tmp_path: Path) -> None:
    default = AutoConfig.for_model(model_type)
    complete_default_config(default)  # as a real checkpoint's config would be (HunYuan's head_dim)
    config = tiny_config(default)
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    reference.save_pretrained(tmp_path)
    model, report = AutoModelForCausalLMFactory(str(tmp_path)).build_and_load(dtype=torch.float32)
    assert report.is_custom, f"{model_type}: the lean class was not used"
    ids = torch.randint(0, config.vocab_size, (2, 12))
    positions = torch.arange(12).expand(2, 12)
    with torch.no_grad():
        expected = reference(input_ids=ids, position_ids=positions, use_cache=False).logits
        got = model(input_ids=ids, position_ids=positions).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("suffix", "why"),
    [
        ("experts.1.w2.weight", "transformers cannot load"),  # a packed expert tensor comes out short
        ("block_sparse_moe.gate.weight", "unfilled"),  # transformers would fill the router at random
    ],
)
def test_a_hub_layout_checkpoint_with_a_tensor_missing_is_refused(
    tmp_path: Path, suffix: str, why: str
) -> None:
    config = tiny_config(AutoConfig.for_model("mixtral"))
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    tensors = load_file(file)
    dropped = next(key for key in tensors if key.endswith(suffix))
    save_file({k: v for k, v in tensors.items() if k != dropped}, file, metadata={"format": "pt"})
    with pytest.raises(WeightsError, match="checkpoint keys do not match the model") as caught:
        AutoModelForCausalLMFactory(str(tmp_path)).build_and_load(dtype=torch.float32)
    assert why in str(caught.value.__cause__)
