"""Turn user prompts into token ids with the tokenizer's chat template."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


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


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Token ids that end an answer: EOS and, for chat models, the end-of-turn token."""
    stops = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for token in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|endoftext|>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            stops.add(token_id)
    return stops
