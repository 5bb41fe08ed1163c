"""Turn user prompts into token ids with the tokenizer's chat template."""

from __future__ import annotations

from transformers import GenerationConfig, PreTrainedTokenizerBase


def encode_chat_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """Token ids of ``prompt`` as one user turn, ready for the assistant's answer.

    Falls back to the plain prompt when the tokenizer has no chat template.
    """
    if tokenizer.chat_template:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        return list(ids)
    return tokenizer.encode(prompt)


#: End-of-turn tokens of common chat formats: stop tokens only for a model that names none itself.
FALLBACK_STOP_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|endoftext|>")


def stop_token_ids(
    tokenizer: PreTrainedTokenizerBase, generation_config: GenerationConfig | None = None
) -> set[int]:
    """Token ids that end an answer, as the model states them: the generation config's
    ``eos_token_id`` (one id or a list) and the tokenizer's EOS. Only when neither names one (a GGUF
    file without them) the :data:`FALLBACK_STOP_TOKENS` that the vocabulary holds."""
    eos = generation_config.eos_token_id if generation_config is not None else None
    stops = set(eos) if isinstance(eos, list) else {eos} if eos is not None else set()
    if tokenizer.eos_token_id is not None:
        stops.add(tokenizer.eos_token_id)
    if stops:
        return stops
    for token in FALLBACK_STOP_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            stops.add(token_id)
    return stops
