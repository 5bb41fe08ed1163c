"""In 16-bit, the lean model keeps in fp32 exactly what transformers' ``from_pretrained`` keeps in fp32.

The reference is transformers loading the same saved checkpoint at the same dtype: every tensor the
two models share by name must come out in the same dtype, and the logits must agree.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from onboardlm.models.factory import AutoModelForCausalLMFactory
from onboardlm.testing import assert_rmse_close, tiny_config

CASES = [
    ("deepseek_v3", torch.bfloat16),  # router weight and score-correction bias: fp32 in fp16 and bf16
    ("glm4_moe", torch.bfloat16),
    ("gpt_oss", torch.float16),  # norms: fp32 in fp16 only
    ("gpt_oss", torch.bfloat16),
    ("llama", torch.bfloat16),  # nothing kept
]


@pytest.mark.parametrize(("model_type", "dtype"), CASES)
def test_fp32_tensors_and_logits_match_transformers(
    model_type: str, dtype: torch.dtype, tmp_path: Path
) -> None:
    config = tiny_config(AutoConfig.for_model(model_type))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(tmp_path)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype).eval()
    model, _ = AutoModelForCausalLMFactory(str(tmp_path)).build_and_load(dtype=dtype)
    theirs, ours = reference.state_dict(), model.state_dict()
    shared = sorted(set(theirs) & set(ours))
    # the lean MoE files hold experts one module each where transformers packs them; all else is shared
    assert [k for k in theirs if k not in ours and ".experts." not in k] == []
    assert {k: ours[k].dtype for k in shared} == {k: theirs[k].dtype for k in shared}
    kept = {k for k in shared if theirs[k].dtype == torch.float32}
    assert bool(kept) == (model_type != "llama" and (model_type != "gpt_oss" or dtype == torch.float16))
    ids = torch.randint(0, config.vocab_size, (2, 12))
    positions = torch.arange(12).expand(2, 12)
    with torch.no_grad():
        expected = reference(input_ids=ids, position_ids=positions).logits.float()
        got = model(input_ids=ids, position_ids=positions).logits.float()
    assert_rmse_close(got, expected, 0.02)
