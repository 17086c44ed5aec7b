"""Incremental detokenization and stop-sequence matching for one sequence.

Written by hand: tokenizers' own streaming decoder works per token, but multi-byte
characters split across byte-level BPE tokens and stop strings that straddle tokens need
the buffered approach below (the one TGI and vLLM use).
"""

from __future__ import annotations

from typing import Protocol

# Prompt tokens kept as left context so the first generated token decodes with the
# spacing it has in context (sentencepiece drops a leading space otherwise).
_CONTEXT_TOKENS = 5


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas that are always valid UTF-8."""

    def __init__(self, tokenizer: Decoder, prompt_ids: tuple[int, ...]) -> None:
        self._tok = tokenizer
        self._ids: list[int] = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._prefix = 0
        self._read = len(self._ids)

    def push(self, token_id: int) -> str:
        """Add a token; return the text it completes (possibly '')."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Text still held back (an incomplete character at the very end)."""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return new_text[len(prefix_text) :]

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True) if ids else ""


class StopMatcher:
    """Holds back text that might start a stop sequence; reports the first full match."""

    def __init__(self, stop_sequences: tuple[str, ...]) -> None:
        self._stops = tuple(s for s in stop_sequences if s)
        self._text = ""
        self._emitted = 0
        self.matched: str = ""

    def feed(self, piece: str) -> str:
        """Add generated text; return what is now safe to emit."""
        self._text += piece
        if not self._stops:
            out = self._text[self._emitted :]
            self._emitted = len(self._text)
            return out
        # Only the new tail can complete a match.
        search_from = max(0, self._emitted - max(map(len, self._stops)) + 1)
        best = -1
        for stop in self._stops:
            at = self._text.find(stop, search_from)
            if at != -1 and (best == -1 or at < best):
                best, self.matched = at, stop
        if best != -1:
            out = self._text[self._emitted : best]
            self._emitted = best
            return out
        safe = len(self._text) - self._held_back()
        out = self._text[self._emitted : safe]
        self._emitted = max(self._emitted, safe)
        return out

    def remainder(self) -> str:
        """At the end without a match: everything not yet emitted."""
        if self.matched:
            return ""
        out = self._text[self._emitted :]
        self._emitted = len(self._text)
        return out

    def _held_back(self) -> int:
        # Longest suffix of the text that is a proper prefix of some stop sequence.
        longest = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(self._text)), longest, -1):
                if self._text.endswith(stop[:n]):
                    longest = n
                    break
        return longest
