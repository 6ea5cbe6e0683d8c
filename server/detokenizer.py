"""Incremental detokenization with stop strings, and token strings for logprobs."""
from __future__ import annotations

from functools import lru_cache

_CONTEXT = 6  # prompt tokens decoded with the first output tokens, so a leading space survives


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Decoding token by token loses SentencePiece's leading spaces and splits multi-byte characters, so each
    step decodes a short window of ids and emits what it adds (the approach of TGI and vLLM). Text that could
    be the start of a stop string is held back until it is known not to be.
    """

    def __init__(self, tokenizer, prompt_ids: list[int], stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.stop = tuple(s for s in stop if s)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""      # output text so far, cut at a stop string once one is found
        self.sent = 0       # characters of self.text already handed out
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int) -> str:
        """Appends a token; returns the text of this token (may be '' while a character is incomplete)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        piece = full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self._append(piece)
        return piece

    def _append(self, piece: str) -> None:
        if self.stopped:
            return
        start = max(0, len(self.text) - self.hold)
        self.text += piece
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True

    def take(self, final: bool) -> str:
        """The text that is safe to hand out now (all of it once final)."""
        if final and not self.stopped and self.read_offset < len(self.ids):
            full = self._decode(self.ids[self.prefix_offset:])
            prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
            self._append(full[len(prefix):])
            self.read_offset = len(self.ids)
        end = len(self.text) if final or self.stopped else max(self.sent, len(self.text) - self.hold)
        out, self.sent = self.text[self.sent:end], end
        return out


class TokenStrings:
    """The text of a single token as it reads inside running text (' upon', not 'upon')."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        anchor = tokenizer.encode("a", add_special_tokens=False)
        self.anchor = anchor[-1:] if anchor else []
        self.anchor_text = tokenizer.decode(self.anchor)
        self.get = lru_cache(maxsize=65536)(self._text)

    def _text(self, token_id: int) -> str:
        text = self.tokenizer.decode(self.anchor + [token_id])
        if self.anchor and text.startswith(self.anchor_text):
            return text[len(self.anchor_text):]
        return self.tokenizer.decode([token_id])
