"""Stop tokens come from the checkpoint (generation config, config, tokenizer); the list of common
end-of-turn tokens is used only for a model that names none."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from gguf import GGUFReader
from transformers import (
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from onboardlm.models.factory import AutoModelForCausalLMFactory
from onboardlm.models.source import default_model_path
from onboardlm.registry.settings import RunSettings
from onboardlm.runtime.chat import stop_token_ids
from onboardlm.runtime.runner import Runner
from onboardlm.testing.checkpoints import word_tokenizer

VOCAB = {"<unk>": 0, "<s>": 1, "</s>": 2, "<|im_end|>": 3, "<|eot_id|>": 4, "hello": 5, "world": 6, "!": 7}


def tiny_tokenizer(eos: str | None = "</s>") -> PreTrainedTokenizerFast:
    return word_tokenizer(VOCAB, eos)


def tiny_checkpoint(directory: Path, config_eos: int | list[int], generation_eos: list[int] | None) -> Path:
    """A 1-layer random Llama with the tiny tokenizer; ``generation_config.json`` written by hand."""
    config = LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=len(VOCAB), max_position_embeddings=64, bos_token_id=1, eos_token_id=config_eos,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(directory)
    (directory / "generation_config.json").unlink(missing_ok=True)
    if generation_eos is not None:
        (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": generation_eos}))
    tiny_tokenizer().save_pretrained(directory)
    return directory


def test_a_list_eos_token_id_in_generation_config_json_gives_every_id(tmp_path: Path) -> None:
    directory = tiny_checkpoint(tmp_path, config_eos=2, generation_eos=[3, 4])
    factory = AutoModelForCausalLMFactory(directory)
    assert factory.generation_config().eos_token_id == [3, 4]
    assert stop_token_ids(factory.tokenizer(), factory.generation_config()) == {2, 3, 4}  # + the tokenizer's


def test_without_generation_config_json_the_configs_list_counts(tmp_path: Path) -> None:
    factory = AutoModelForCausalLMFactory(tiny_checkpoint(tmp_path, config_eos=[2, 4], generation_eos=None))
    assert stop_token_ids(factory.tokenizer(), factory.generation_config()) == {2, 4}


def test_named_end_tokens_leave_the_fallback_list_out() -> None:
    # <|im_end|> (3) and <|eot_id|> (4) are in the vocabulary, but the model says 2 ends an answer
    assert stop_token_ids(tiny_tokenizer(), GenerationConfig(eos_token_id=2)) == {2}
    assert stop_token_ids(tiny_tokenizer(), None) == {2}


def test_fallback_list_only_when_the_model_names_no_end_token() -> None:
    assert stop_token_ids(tiny_tokenizer(eos=None), GenerationConfig()) == {3, 4}  # not <unk> (0)


def test_runner_stops_on_the_checkpoints_end_tokens(tmp_path: Path) -> None:
    directory = tiny_checkpoint(tmp_path, config_eos=2, generation_eos=[3, 4])
    runner = Runner.load(str(directory), RunSettings(device="cpu", dtype="float32", max_new_tokens=2))
    assert runner.stop_ids == {2, 3, 4}


@pytest.mark.slow
def test_shipped_gguf_stops_on_the_eos_id_in_its_metadata() -> None:
    path = default_model_path()
    field = GGUFReader(path).fields["tokenizer.ggml.eos_token_id"]
    eos = int(field.parts[field.data[0]][0])
    factory = AutoModelForCausalLMFactory(path)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert stop_token_ids(tokenizer, factory.generation_config()) == {eos}
