"""Prefix reuse: a new sequence starts from the longest prompt prefix whose KV is cached.

Requests to one model share their beginnings: the chat template's header, a system
prompt, a few-shot block, the earlier turns of a conversation. vLLM (automatic prefix
caching), SGLang (RadixAttention) and llama-server (`cache_prompt`) all keep that KV and
skip its prefill; so does this engine, the way llama-server does it: a finished sequence
leaves its slot's cells in place (its *residue*: the tokens whose KV is complete), and a
new request takes the free slot whose residue shares the longest prefix with its prompt,
keeping that prefix and feeding only the rest. A prefix can also be copied from another
slot (a running sequence's prompt, or one admitted just before with the same header):
llama.cpp tags the same cells with a second sequence in a pooled cache and copies a
stream in a split one; the torch cache copies rows.

Residues live in free slots, so they cost no memory a slot does not already own; in a
pooled cache they hold cells the engine counts (`cells`) and evicts, least recently used
first, when an admission needs them. What is kept is exact: a residue holds only tokens
whose KV a forward pass completed (a cancelled request's fed prompt chunks, never one cut
mid-pass), and reuse is exact up to floating-point order (greedy output with and without
reuse is tested token-identical). Hand-written: the engine's slots and pool are its own,
and no library manages them. Imports numpy only.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two int arrays."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    differs = np.flatnonzero(a[:n] != b[:n])
    return int(differs[0]) if len(differs) else n


def as_tokens(ids: Sequence[int]) -> np.ndarray:
    return np.asarray(ids, dtype=np.int64)


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a new sequence goes: its slot, and the `length` prompt tokens it starts with,
    kept in place (`source` == `slot`), copied from slot `source`, or none (length 0)."""

    slot: int
    source: int | None
    length: int

    @property
    def reused(self) -> bool:
        return self.length > 0


class PrefixCache:
    """The residues of free slots and where to place a new prompt (module docstring).
    Used by the engine's worker thread under its lock."""

    def __init__(self, *, min_tokens: int = 4) -> None:
        """`min_tokens`: a shorter common prefix is not worth a copy (a bare BOS)."""
        self.min_tokens = max(1, min_tokens)
        #: Free slot -> (tokens whose KV it holds, last use).
        self._residue: dict[int, tuple[np.ndarray, int]] = {}
        self._clock = 0
        #: Cells all residues hold.
        self.cells = 0

    def __len__(self) -> int:
        return len(self._residue)

    def holds(self, slot: int) -> bool:
        return slot in self._residue

    def tokens(self, slot: int) -> int:
        """Tokens the residue in `slot` holds (0: none)."""
        r = self._residue.get(slot)
        return len(r[0]) if r is not None else 0

    def keep(self, slot: int, tokens: Sequence[int]) -> None:
        """`slot` was freed with the KV of `tokens` complete in it."""
        self.drop(slot)
        if len(tokens) < self.min_tokens:
            return
        self._clock += 1
        self._residue[slot] = (as_tokens(tokens), self._clock)
        self.cells += len(tokens)

    def drop(self, slot: int) -> bool:
        """Forget `slot`'s residue (taken, or its cells evicted); whether it had one."""
        r = self._residue.pop(slot, None)
        if r is None:
            return False
        self.cells -= len(r[0])
        return True

    def place(
        self,
        prompt: np.ndarray,
        free: Iterable[int],
        donors: Iterable[tuple[int, np.ndarray]] = (),
    ) -> Placement:
        """Where `prompt` should start (`free` slots non-empty): in the free slot whose
        residue shares the longest prefix with it (or from it, into a slot holding no
        residue, when the residue holds more than the prompt shares), else from the
        longest prefix of a `donor` (slot, tokens whose KV is complete) copied into a free
        slot that holds no residue, or failing that the least recently used residue. At
        least the prompt's
        last token is always fed (its logits give the first token)."""
        free = sorted(free)
        cap = len(prompt) - 1
        best, source, stamp = 0, None, -1
        for slot in free:
            r = self._residue.get(slot)
            if r is None:
                continue
            n = min(common_prefix(r[0], prompt), cap)
            if n > best or (n == best and n and r[1] > stamp):
                best, source, stamp = n, slot, r[1]
        for slot, tokens in donors:
            n = min(common_prefix(tokens, prompt), cap)
            if n > best:  # a residue in place wins a tie: no copy
                best, source = n, slot
        if best < self.min_tokens:
            best, source = 0, None
        if source is not None and source in free:
            spare = [s for s in free if s not in self._residue]
            if spare and len(self._residue[source][0]) > best:
                # The residue holds more than this prompt shares (a longer conversation):
                # copy the prefix into a spare slot rather than cut the residue back.
                return Placement(spare[0], source, best)
            return Placement(source, source, best)
        return Placement(self._spare(free), source, best)

    def _spare(self, free: list[int]) -> int:
        """The free slot to start a sequence in without reusing its residue: the lowest
        without one, else the least recently used."""
        for slot in free:
            if slot not in self._residue:
                return slot
        return min(free, key=lambda s: self._residue[s][1])

    def evictable(self, keep: int | None) -> list[int]:
        """Slots with a residue, least recently used first, `keep` left out."""
        slots = [s for s in self._residue if s != keep]
        return sorted(slots, key=lambda s: self._residue[s][1])
