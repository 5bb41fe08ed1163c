"""Streaming detokenization: text deltas as tokens arrive, cut at the first stop string.

Each new token re-decodes the output so far (``skip_special_tokens``) and hands out only text that
cannot change any more: a trailing incomplete UTF-8 character (decoded as U+FFFD) and a tail that could
still grow into a stop string are held back until the next token settles them. The deltas therefore
concatenate to the final text, and a stop string never reaches the client.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

_INCOMPLETE = "\ufffd"


class TextStream:
    """Output text of one request, handed out in deltas."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.token_ids: list[int] = []
        self.sent = 0  # characters handed out so far

    def _text(self) -> str:
        return self.tokenizer.decode(self.token_ids, skip_special_tokens=True)

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a token; returns the new settled text and whether a stop string ended the output."""
        self.token_ids.append(token_id)
        text = self._text()
        hits = [i for s in self.stop if (i := text.find(s, max(0, self.sent - len(s) + 1))) >= 0]
        if hits:
            end = max(min(hits), self.sent)
            delta, self.sent = text[self.sent : end], end
            return delta, True
        safe = len(text.rstrip(_INCOMPLETE))
        held = max((_partial_stop(text[:safe], s) for s in self.stop), default=0)
        safe = max(safe - held, self.sent)
        delta, self.sent = text[self.sent : safe], safe
        return delta, False

    def flush(self) -> str:
        """The text still held back (the output ended without a stop string)."""
        text = self._text()
        delta, self.sent = text[self.sent :], len(text)
        return delta


def _partial_stop(text: str, stop: str) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of ``stop``."""
    for k in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:k]):
            return k
    return 0
