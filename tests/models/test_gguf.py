"""GGUF loading: the shipped SmolLM2-135M checkpoint against transformers, and bad GGUF files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from onboardlm.errors import ModelSourceError
from onboardlm.models.factory import AutoModelForCausalLMFactory
from onboardlm.models.source import default_model_path
from onboardlm.runtime.chat import encode_chat_prompt, stop_token_ids
from onboardlm.runtime.generate import greedy_generate
from onboardlm.testing import assert_rmse_close

PROMPT = "What is the capital of France?"


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    return default_model_path()


@pytest.fixture(scope="module")
def lean_smollm2(gguf_path: Path):
    return AutoModelForCausalLMFactory(str(gguf_path)).build_and_load(dtype=torch.float32)


@pytest.fixture(scope="module")
def tokenizer(gguf_path: Path):
    return AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


@pytest.mark.slow
def test_smollm2_loads_into_the_lean_llama_with_strict_keys(lean_smollm2) -> None:
    model, report = lean_smollm2
    assert report.is_custom and report.model_class == "LlamaForCausalLM"
    assert type(model).__module__ == "onboardlm.models.custom.modeling_llama"
    assert report.tied_keys == ["lm_head.weight"]  # SmolLM2 ties its embeddings; nothing else may be missing
    assert report.num_tensors == len(model.state_dict()) - 1


@pytest.mark.slow
def test_smollm2_logits_match_transformers_on_a_chat_prompt(lean_smollm2, gguf_path: Path, tokenizer) -> None:
    model, _ = lean_smollm2
    reference = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    ).eval()
    ids = torch.tensor([encode_chat_prompt(tokenizer, PROMPT)])
    position_ids = torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        actual = model(input_ids=ids, position_ids=position_ids).logits
    assert actual.dtype == torch.float32
    assert_rmse_close(actual, expected, rmse_ratio_tol=0.01, msg="SmolLM2 logits vs transformers")


@pytest.mark.slow
def test_smollm2_answers_the_capital_of_france(lean_smollm2, tokenizer) -> None:
    model, _ = lean_smollm2
    result = greedy_generate(
        model, encode_chat_prompt(tokenizer, PROMPT), max_new_tokens=16, stop_ids=stop_token_ids(tokenizer)
    )
    answer = tokenizer.decode(result.new_ids, skip_special_tokens=True)
    assert "Paris" in answer
    assert result.stopped_on_eos


def _write_gguf(path: Path, architecture: str) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_of_an_unsupported_architecture_names_the_file(tmp_path: Path) -> None:
    file = tmp_path / "toy.gguf"
    _write_gguf(file, "nosucharch")
    with pytest.raises(ModelSourceError, match=rf"{file}: cannot read this GGUF file.*nosucharch"):
        AutoModelForCausalLMFactory(str(file)).build_model()


def test_corrupt_and_missing_gguf_name_the_file(tmp_path: Path) -> None:
    file = tmp_path / "broken.gguf"
    file.write_bytes(b"GGUF" + bytes(range(64)))
    with pytest.raises(ModelSourceError, match=rf"{file}: cannot read this GGUF file"):
        AutoModelForCausalLMFactory(str(file)).build_model()
    with pytest.raises(ModelSourceError, match="GGUF file not found"):
        AutoModelForCausalLMFactory(str(tmp_path / "absent.gguf")).build_model()
