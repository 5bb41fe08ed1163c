"""Tiny checkpoints on disk for tests: a random Llama with a tokenizer, saved as transformers saves it."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from onboardlm.models.source import default_model_path


def word_tokenizer(vocab: Mapping[str, int], eos: str | None = "</s>") -> PreTrainedTokenizerFast:
    """A whitespace-split word-level tokenizer over ``vocab`` (which must hold ``<unk>`` and ``<s>``);
    built in milliseconds, unlike a real one."""
    backend = Tokenizer(WordLevel(dict(vocab), unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token=eos
    )


def smollm2_tokenizer() -> PreTrainedTokenizerBase:
    """The tokenizer of the shipped SmolLM2 GGUF (a few seconds to read)."""
    gguf = default_model_path()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def save_tiny_llama(directory: Path, tokenizer: PreTrainedTokenizerBase | None = None, **config: Any) -> Path:
    """Save a 2-layer random Llama (hidden 32, 4 heads, 2 KV heads, tied embeddings) and ``tokenizer``
    (default: SmolLM2's) into ``directory``; ``config`` overrides LlamaConfig fields. Returns ``directory``."""
    tokenizer = tokenizer or smollm2_tokenizer()
    tokenizer.save_pretrained(directory)
    fields: dict[str, Any] = {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": len(tokenizer), "max_position_embeddings": 256,
        "tie_word_embeddings": True,
    }  # fmt: skip
    AutoModelForCausalLM.from_config(LlamaConfig(**{**fields, **config})).save_pretrained(directory)
    return directory
