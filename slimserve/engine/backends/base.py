"""The contract between the scheduler and whatever runs the model's forward passes.

The engine's scheduler owns requests, sampling and detokenization; a backend owns weights
and KV-cache memory. Memory is organised in *slots*: one slot holds one sequence's cache.
A backend never sees a request, a tokenizer or protobuf.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from slimserve.engine.types import TokenLogprob

ScoreJobs = list[tuple[list[int], list[list[int]]]]


def check_slot(slot: int, max_slots: int) -> None:
    """Refuse a slot outside 0..max_slots-1 (every backend's bounds check)."""
    if not 0 <= slot < max_slots:
        raise ValueError(f"slot {slot} is out of range 0..{max_slots - 1}")


def check_ids(token_ids: list[int], vocab_size: int) -> None:
    """Refuse token ids outside the vocabulary before they reach a kernel."""
    if token_ids and not 0 <= min(token_ids) <= max(token_ids) < vocab_size:
        raise ValueError(f"token ids must lie in 0..{vocab_size - 1}")


#: Positions whose log-softmax is taken at once (a (rows, vocab) float32 block: 12 MB at 64
#: rows of SmolLM2's 49,152-token vocabulary).
LOGPROB_ROWS = 64


def prompt_logprobs_from(
    logits_of: Callable[[int, int], torch.Tensor], targets: list[int], top_n: int
) -> list[TokenLogprob]:
    """Each target's log-probability and the `top_n` best at its position.

    `logits_of(a, b)` returns the float logits of positions a..b-1, shape (b - a, vocab), the
    position i predicting `targets[i]`; they are taken `LOGPROB_ROWS` at a time so a long
    prompt never holds a (T, vocab) block.
    """
    out: list[TokenLogprob] = []
    for a in range(0, len(targets), LOGPROB_ROWS):
        b = min(a + LOGPROB_ROWS, len(targets))
        logp = torch.log_softmax(logits_of(a, b).float(), dim=-1)
        picked = logp.gather(1, torch.tensor(targets[a:b], device=logp.device)[:, None])[:, 0]
        if top_n:
            values, ids = logp.topk(top_n, dim=-1)
            tops = [
                tuple(zip(i.tolist(), v.tolist(), strict=True))
                for i, v in zip(ids, values, strict=True)
            ]
        else:
            tops = [()] * (b - a)
        out += [
            TokenLogprob(t, float(lp), top)
            for t, lp, top in zip(targets[a:b], picked.tolist(), tops, strict=True)
        ]
    return out


def check_decode(
    slots: list[int], token_ids: list[int], lengths: list[int], max_seq_len: int, vocab: int
) -> None:
    """Refuse a decode step a backend cannot take: one token per distinct, prefilled slot
    that has room, and every token in the vocabulary (every backend's checks)."""
    if len(slots) != len(token_ids) or not slots:
        raise ValueError(f"need one token per slot, got {len(slots)} slots, {len(token_ids)}")
    if len(set(slots)) != len(slots):
        raise ValueError(f"slots repeat in one decode step: {slots}")
    check_ids(token_ids, vocab)
    for slot in slots:
        check_slot(slot, len(lengths))
        if lengths[slot] == 0:
            raise ValueError(f"slot {slot} is free: prefill it before decoding")
        if lengths[slot] >= max_seq_len:
            raise ValueError(f"slot {slot} is full ({max_seq_len} tokens)")


def check_extend(
    slots: list[int], token_ids: list[list[int]], lengths: list[int], max_seq_len: int, vocab: int
) -> None:
    """Refuse an extend step a backend cannot take: at least one token per distinct,
    prefilled slot, all of them fitting the slot, and every token in the vocabulary."""
    if len(slots) != len(token_ids) or not slots or not all(token_ids):
        raise ValueError(f"need tokens for each of {len(slots)} slots, got {len(token_ids)}")
    if len(set(slots)) != len(slots):
        raise ValueError(f"slots repeat in one extend step: {slots}")
    for slot, toks in zip(slots, token_ids, strict=True):
        check_ids(toks, vocab)
        check_slot(slot, len(lengths))
        if lengths[slot] == 0:
            raise ValueError(f"slot {slot} is free: prefill it before extending")
        if lengths[slot] + len(toks) > max_seq_len:
            raise ValueError(
                f"slot {slot} holds {lengths[slot]} tokens; {len(toks)} more exceed {max_seq_len}"
            )


def check_truncate(slot: int, length: int, lengths: list[int]) -> None:
    """Refuse keeping more tokens than `slot` holds, or none (that is `release`)."""
    check_slot(slot, len(lengths))
    if not 0 < length <= lengths[slot]:
        raise ValueError(f"slot {slot} holds {lengths[slot]} tokens; cannot keep {length}")


@dataclass(frozen=True, slots=True)
class ScorePlan:
    """What a batch of Score jobs needs computed, shared by every backend's `score_batch`.

    A continuation's last token is never an input (the position before it predicts it), so
    each row is prompt + continuation[:-1], and identical rows run once: for single-token
    labels every row of a job is just its prompt.
    """

    #: Distinct input rows.
    rows: list[list[int]]
    #: Per scored token: (row, position whose logits predict it, target id, continuation).
    tokens: list[tuple[int, int, int, int]]
    #: Continuations over all jobs (flat index order).
    n_continuations: int

    @classmethod
    def of(cls, jobs: ScoreJobs, check_ids: Callable[[list[int]], None]) -> ScorePlan:
        """Raises ValueError for an empty prompt or (through `check_ids`) a bad token id."""
        rows: list[list[int]] = []
        row_of: dict[tuple[int, ...], int] = {}
        tokens: list[tuple[int, int, int, int]] = []
        n = 0
        for prompt_ids, continuations in jobs:
            if not prompt_ids:
                raise ValueError("score needs a non-empty prompt (at least a BOS token)")
            check_ids(prompt_ids)
            for c in continuations:
                check_ids(c)
                inputs = tuple(prompt_ids + c[:-1])
                if c and inputs not in row_of:
                    row_of[inputs] = len(rows)
                    rows.append(list(inputs))
                for j, tok in enumerate(c):
                    tokens.append((row_of[inputs], len(prompt_ids) - 1 + j, tok, n))
                n += 1
        return cls(rows, tokens, n)

    @staticmethod
    def by_job(sums: list[float], jobs: ScoreJobs) -> list[list[float]]:
        """Flat per-continuation sums back into one list per job."""
        out, at = [], 0
        for _, continuations in jobs:
            out.append(sums[at : at + len(continuations)])
            at += len(continuations)
        return out


class Backend(Protocol):
    """Forward passes over slot-addressed KV caches.

    Every method is called from the engine's single worker thread, never concurrently.
    """

    #: Name recorded in `GetModelInfo` (e.g. "hf-eager", "llama-static-cache").
    name: str
    #: How many sequences can hold a cache at once.
    max_slots: int
    #: Longest sequence (prompt + generated) one slot can hold, in tokens.
    max_seq_len: int
    vocab_size: int
    device: torch.device

    def prefill(self, slot: int, token_ids: list[int]) -> torch.Tensor:
        """Start `slot` afresh with `token_ids` (its previous content is dropped).

        Returns the float32 logits of the last position, shape (vocab,).
        """
        ...

    def decode(self, slots: list[int], token_ids: list[int]) -> torch.Tensor:
        """Append one token to each of `slots` (same order) and run one step.

        Returns float32 logits, shape (len(slots), vocab).
        """
        ...

    def release(self, slot: int) -> None:
        """Forget `slot`'s cache; the slot may be prefilled again later."""
        ...

    def score(self, prompt_ids: list[int], continuations: list[list[int]]) -> list[float]:
        """Sum of log-probabilities of each continuation's tokens after `prompt_ids`.

        One batched forward pass over all continuations; touches no slot.
        """
        ...

    def score_batch(self, jobs: list[tuple[list[int], list[list[int]]]]) -> list[list[float]]:
        """`score` for several (prompt, continuations) jobs, in as few passes as it can."""
        ...

    def prompt_logprobs(self, prompt_ids: list[int], top_n: int) -> list[TokenLogprob]:
        """Each prompt token after the first with its log-probability given the ones before,
        and the `top_n` most likely tokens at its position; one forward, touches no slot."""
        ...

    def kv_bytes_per_slot(self) -> int:
        """Bytes of KV cache one slot can occupy at `max_seq_len`."""
        ...


@dataclass(frozen=True, slots=True)
class Feed:
    """Tokens appended to one slot in a step: a decode token, or a chunk of a prompt (a
    new sequence's first chunk starts at its empty slot)."""

    slot: int
    tokens: list[int]
    #: Whether the step returns the logits at the feed's last position.
    logits: bool


def check_feeds(feeds: list[Feed], lengths: list[int], max_seq_len: int, vocab: int) -> None:
    """Refuse a step a backend cannot take: distinct slots, tokens in the vocabulary, every
    feed fitting its slot."""
    if not feeds or len({f.slot for f in feeds}) != len(feeds):
        raise ValueError(f"need distinct slots, one feed each: {[f.slot for f in feeds]}")
    for f in feeds:
        check_slot(f.slot, len(lengths))
        if not f.tokens:
            raise ValueError(f"feed for slot {f.slot} has no tokens")
        check_ids(f.tokens, vocab)
        if lengths[f.slot] + len(f.tokens) > max_seq_len:
            raise ValueError(
                f"slot {f.slot} holds {lengths[f.slot]} tokens; {len(f.tokens)} more exceed "
                f"{max_seq_len}"
            )


class BatchingBackend(Backend, Protocol):
    """A backend with the engine's fast paths (each optional; see `Engine`)."""

    #: The most tokens one `forward` takes.
    max_step_tokens: int

    def forward(self, feeds: list[Feed]) -> torch.Tensor:
        """Append each feed's tokens to its slot, every feed in one step (one pass where
        the backend can: decode tokens and prompt chunks of other sequences together);
        returns the logits at the last position of each feed that wants them, one row
        each in feed order, (n, vocab), possibly a view valid until the next call. What
        chunked prefill runs on.
        """
        ...

    def decode_view(self, slots: list[int], token_ids: list[int]) -> torch.Tensor:
        """`decode`, the logits possibly a view that is valid only until the next call."""
        ...

    def prefill_batch(self, slots: list[int], prompts: list[list[int]]) -> list[torch.Tensor]:
        """`prefill` for several slots at once; each slot's last-position logits (vocab,)."""
        ...


class PackingBackend(Backend, Protocol):
    """A backend that runs consecutive slots fastest (llama.cpp's cache split per sequence)
    and can move a sequence to another slot, so the engine keeps running slots packed."""

    #: Whether the engine should keep the running slots consecutive (from 0).
    packed_slots: bool

    def move(self, src: int, dst: int) -> None:
        """Move the sequence cached in `src` to the free slot `dst`; `src` is then free."""
        ...


def wants_packing(backend: object) -> bool:
    """Whether `backend` asks for packed slots and can move sequences (`PackingBackend`)."""
    return bool(getattr(backend, "packed_slots", False)) and callable(
        getattr(backend, "move", None)
    )


class SpeculativeBackend(Backend, Protocol):
    """A backend that can verify drafts: several tokens into a slot at once, and back."""

    def extend(self, slots: list[int], token_ids: list[list[int]]) -> list[torch.Tensor]:
        """Append `token_ids[i]` to `slots[i]` (each already prefilled) in one pass.

        Returns, per slot, the float32 logits at every appended position, (T_i, vocab); they
        may be views that are valid only until the backend's next call.
        """
        ...

    def truncate(self, slot: int, length: int) -> None:
        """Keep only the first `length` (> 0) cached tokens of `slot`."""
        ...


class PrefixBackend(Backend, Protocol):
    """A backend that can start a sequence from cached KV (`slimserve.engine.prefix`):
    keep a slot's first tokens, or copy another slot's."""

    def truncate(self, slot: int, length: int) -> None:
        """Keep only the first `length` (> 0) cached tokens of `slot`."""
        ...

    def copy_prefix(self, src: int, dst: int, length: int) -> None:
        """Make `dst` hold the KV of `src`'s first `length` tokens (whatever `dst` held is
        dropped); `src` keeps its cache."""
        ...


class LogprobPartsBackend(Backend, Protocol):
    """A backend that keeps a prompt's KV across steps in scratch sequences of its own: it
    gives a prompt's log-probabilities in parts, so a long `echo` runs a step's budget at a
    time beside the streams instead of whole between two of their tokens, and it holds a
    Score prompt fed in parts, so every label of that Score costs only its own tokens."""

    def prompt_logprobs_part(
        self, prompt_ids: list[int], start: int, end: int, top_n: int
    ) -> list[TokenLogprob]:
        """Feed `prompt_ids[start:end]` after the `start` tokens fed by the parts before
        (`start` 0 begins afresh) and return `prompt_logprobs`' entries for the targets
        `prompt_ids[start + 1 : end + 1]`; the scratch is emptied when `end` is the
        prompt's length, or when a part fails.

        Raises:
            ValueError: `start` is not where the previous part ended, or bad ids.
        """
        ...

    def prompt_logprobs_reset(self) -> None:
        """Forget a prompt left part-way (its caller gave up)."""
        ...

    def score_prompt_part(self, prompt_ids: list[int], start: int, end: int) -> None:
        """Feed `prompt_ids[start:end]` after the `start` tokens fed by the parts before
        (`start` 0 begins afresh) into the Score prompt the backend holds; `score_batch`
        then feeds a row that starts with the held tokens from their KV. The hold is
        emptied when a part fails.

        Raises:
            ValueError: `start` is not where the previous part ended, or bad ids, or the
                held prompt would leave no room for a continuation.
        """
        ...

    def score_prompt_reset(self) -> None:
        """Forget the held Score prompt (its job ended, or its caller gave up)."""
        ...


def can_score_in_parts(backend: object) -> bool:
    """Whether `backend` implements `LogprobPartsBackend`."""
    names = ("prompt_logprobs_part", "prompt_logprobs_reset")
    return all(callable(getattr(backend, n, None)) for n in (*names, *_SCORE_PROMPT))


_SCORE_PROMPT = ("score_prompt_part", "score_prompt_reset")


def can_reuse_prefix(backend: object) -> bool:
    """Whether `backend` implements `PrefixBackend`."""
    return callable(getattr(backend, "copy_prefix", None)) and callable(
        getattr(backend, "truncate", None)
    )


def check_copy_prefix(src: int, dst: int, length: int, lengths: list[int]) -> None:
    check_slot(src, len(lengths))
    check_slot(dst, len(lengths))
    if src == dst:
        raise ValueError(f"cannot copy slot {src} onto itself")
    if not 0 < length <= lengths[src]:
        raise ValueError(f"slot {src} holds {lengths[src]} tokens; cannot copy {length}")


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a backend can do beyond `Backend`, resolved once when an engine starts (the
    scheduler calls these handles, never probes the backend in its loop)."""

    #: One decode step; the logits possibly a view (`BatchingBackend.decode_view`).
    decode: Callable[[list[int], list[int]], torch.Tensor]
    #: Several prompts prefilled at once, or None.
    prefill_batch: Callable[[list[int], list[list[int]]], list[torch.Tensor]] | None
    #: Decode tokens and prompt chunks in one step (chunked prefill), or None: prompts are
    #: then prefilled whole between steps.
    forward: Callable[[list[Feed]], torch.Tensor] | None
    #: The most tokens one `forward` takes.
    step_tokens: int
    #: Verifies drafts (extend, truncate), or None.
    speculative: SpeculativeBackend | None
    #: Keeps its running slots packed (move), or None.
    packing: PackingBackend | None
    #: Cells one pooled KV cache holds for every slot together, or None (a cache per slot).
    pool_tokens: int | None
    #: Starts a sequence from cached KV (truncate, copy_prefix), or None.
    prefix: PrefixBackend | None = None
    #: Gives a prompt's log-probabilities in parts, or None: they run whole.
    logprob_parts: LogprobPartsBackend | None = None

    @classmethod
    def of(cls, backend: Backend) -> Capabilities:
        decode_view = getattr(backend, "decode_view", None)
        return cls(
            decode=decode_view if callable(decode_view) else backend.decode,
            prefill_batch=_method(backend, "prefill_batch"),
            forward=_method(backend, "forward"),
            step_tokens=int(getattr(backend, "max_step_tokens", 2048)),
            speculative=backend if can_speculate(backend) else None,  # type: ignore[arg-type]
            packing=backend if wants_packing(backend) else None,  # type: ignore[arg-type]
            pool_tokens=getattr(backend, "kv_pool_tokens", None),
            prefix=backend if can_reuse_prefix(backend) else None,  # type: ignore[arg-type]
            logprob_parts=backend if can_score_in_parts(backend) else None,  # type: ignore[arg-type]
        )


def _method(backend: object, name: str) -> Any:
    method = getattr(backend, name, None)
    return method if callable(method) else None


def can_speculate(backend: object) -> bool:
    """Whether `backend` implements `SpeculativeBackend`'s extend and truncate."""
    return callable(getattr(backend, "extend", None)) and callable(
        getattr(backend, "truncate", None)
    )
