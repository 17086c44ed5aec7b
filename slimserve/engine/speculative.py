"""Exact speculative decoding: drafters that propose tokens, and the rule that accepts them.

Each step a drafter proposes up to `k` tokens per sequence; the target model runs the last
token and the proposal in one pass (`SpeculativeBackend.extend`), and `accept` keeps the
longest prefix the target agrees with, plus one token of the target's own. Greedy
requests keep a draft token only when it is the target's argmax, so their output is the
output of decoding without a draft, as far as the backend's logits do not depend on how
its cache is laid out (llama.cpp's unified cache reuses freed cells across streams, which
can reorder a stream's attention sum: see README, "Speculative decoding"). Sampled
requests use the standard rejection rule (Leviathan et al. 2023; Chen et al. 2023): a
draft token x drawn from q is kept with probability min(1, p(x) / q(x)), else the token
is drawn from norm(max(0, p - q)); every emitted token is then distributed exactly as p,
the target's warped distribution.

Two drafters:
- `NgramDrafter`: model-free prompt lookup. The latest earlier occurrence of the context's
  last n tokens (n from `max_n` down to `min_n`) proposes what followed it. Costs no forward pass;
  pays off on text that repeats the prompt or itself (extraction, editing, code, and the
  loops small models fall into).
- `ModelDrafter`: a smaller model sharing the tokenizer (e.g. one the compression toolkit
  pruned and distilled from the target), decoding `k` tokens ahead in its own slots.

Imports torch and engine modules only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from slimserve.engine.backends.base import SpeculativeBackend
from slimserve.engine.sampling import warp
from slimserve.engine.types import SamplingParams


@dataclass(frozen=True, slots=True)
class Proposal:
    """Draft tokens for one sequence, and the draft's distributions they came from."""

    tokens: list[int]
    #: Per token, the draft's warped probabilities (vocab,) it was drawn from; None: the
    #: tokens were chosen deterministically (q is one-hot on each).
    probs: list[torch.Tensor] | None = None


NO_PROPOSAL = Proposal([])


@dataclass(frozen=True, slots=True)
class DraftRequest:
    """What a drafter is told about one sequence it may draft for this step."""

    slot: int
    #: Every committed token: the prompt and what was generated (the last is not yet in
    #: the target's cache).
    context: Sequence[int]
    #: How many tokens it may propose (> 0).
    k: int
    sampling: SamplingParams
    generator: torch.Generator | None


class Drafter(Protocol):
    """Proposes tokens; owns whatever state it keeps per slot."""

    #: Shown in GetModelInfo and each response's timings ("ngram", "draft-model@3").
    name: str
    #: Proposals cost no forward pass (`spec_policy`: propose, then choose how many to
    #: verify) rather than one per token (choose, then propose).
    free_proposals: bool

    def begin(self, slot: int, prompt_ids: Sequence[int]) -> None:
        """A sequence starts in `slot` with this prompt."""
        ...

    def propose(self, requests: list[DraftRequest]) -> list[Proposal]:
        """Up to `k` tokens per request, in the same order (an empty proposal is fine)."""
        ...

    def accept(self, slot: int, committed: int) -> None:
        """The target kept `committed` tokens of context for `slot` (prompt + generated, the
        newest one included); anything drafted beyond them is stale."""
        ...

    def release(self, slot: int) -> None:
        """The sequence in `slot` ended."""
        ...

    #: Whether `move` works (the engine keeps slots packed only if it does).
    can_move: bool

    def move(self, src: int, dst: int) -> None:
        """The sequence in `src` now runs in the free slot `dst`."""
        ...


# ---- the acceptance rule ---------------------------------------------------------------


def accept(
    logits: torch.Tensor,
    proposal: Proposal,
    params: SamplingParams,
    generator: torch.Generator | None,
) -> list[int]:
    """The tokens to emit after verifying `proposal` against the target's `logits`
    (k + 1, vocab): row j is the target's prediction after the j-th draft token (row 0
    after the last committed token). Returns 1..k+1 tokens: the accepted drafts and one
    token of the target's (a correction, or a bonus when every draft was accepted)."""
    k = len(proposal.tokens)
    if logits.shape[0] != k + 1:
        raise ValueError(f"need {k + 1} rows of logits for {k} draft tokens, got {logits.shape}")
    if not params.do_sample:
        picks = logits.argmax(dim=-1).tolist()  # one call for every row
        out = []
        for j, tok in enumerate(proposal.tokens):
            if picks[j] != tok:
                break
            out.append(tok)
        out.append(picks[len(out)])
        return out
    logits = logits.float().cpu()  # the request's generator is a CPU one (`sampling.select`)
    out = []
    for j, tok in enumerate(proposal.tokens):
        p = torch.softmax(warp(logits[j].float(), params), dim=-1)
        q = proposal.probs[j] if proposal.probs is not None else None
        q_tok = float(q[tok]) if q is not None else 1.0
        u = float(torch.rand((), generator=generator))
        if q_tok > 0 and u * q_tok < float(p[tok]):  # u < p(x) / q(x), without dividing
            out.append(tok)
            continue
        if q is None:
            residual = p.clone()
            residual[tok] = 0.0
        else:
            residual = (p - q).clamp_(min=0.0)
        if float(residual.sum()) <= 0.0:  # p == q: the residual is empty, p itself holds
            residual = p
        out.append(int(torch.multinomial(residual, 1, generator=generator)))
        return out
    p = torch.softmax(warp(logits[k].float(), params), dim=-1)
    out.append(int(torch.multinomial(p, 1, generator=generator)))
    return out


# ---- drafters --------------------------------------------------------------------------


class NgramDrafter:
    """Prompt-lookup drafting (see module docstring): an index per slot from each n-gram
    to where it last ended, updated as tokens are committed.

    Hand-written: a dict per n is all it takes (vLLM's proposer searches with numpy each
    step; the index makes a lookup O(1) and an update O(new tokens))."""

    #: min_n 2 by default: on SmolLM2's greedy answers to everyday prompts a one-token
    #: match is right 15-20% of the time and a two-token one 35-55% (replaying recorded
    #: outputs), while a verify pass costs more than a decode: single-token guesses lose.
    def __init__(self, max_n: int = 3, min_n: int = 2) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.name = "ngram"
        self.free_proposals = True
        self.can_move = True
        self.max_n, self.min_n = max_n, min_n
        #: slot -> (n -> gram -> the position right after its latest indexed occurrence)
        self._index: dict[int, dict[int, dict[tuple[int, ...], int]]] = {}
        #: slot -> grams ending before this position are indexed
        self._done: dict[int, int] = {}

    def begin(self, slot: int, prompt_ids: Sequence[int]) -> None:
        self._index[slot] = {n: {} for n in range(self.min_n, self.max_n + 1)}
        self._done[slot] = 0

    def _update(self, slot: int, context: Sequence[int]) -> dict[int, dict[tuple[int, ...], int]]:
        index = self._index[slot]
        # Index the grams that end at `end`, for every end that has a following token: the
        # context's own suffix is never indexed, so a lookup never finds itself.
        for end in range(max(self._done[slot], self.min_n), len(context)):
            for n in range(self.min_n, min(self.max_n, end) + 1):
                index[n][tuple(context[end - n : end])] = end
        self._done[slot] = max(self._done[slot], len(context))
        return index

    def propose(self, requests: list[DraftRequest]) -> list[Proposal]:
        out = []
        for r in requests:
            index = self._update(r.slot, r.context)
            found = NO_PROPOSAL
            for n in range(min(self.max_n, len(r.context)), self.min_n - 1, -1):
                at = index[n].get(tuple(r.context[-n:]))
                if at is not None:
                    found = Proposal(list(r.context[at : at + r.k]))
                    break
            out.append(found)
        return out

    def accept(self, slot: int, committed: int) -> None:
        """Nothing drafted is ever indexed: only committed context is."""

    def release(self, slot: int) -> None:
        self._index.pop(slot, None)
        self._done.pop(slot, None)

    def move(self, src: int, dst: int) -> None:
        if src in self._index:
            self._index[dst] = self._index.pop(src)
            self._done[dst] = self._done.pop(src)


class ModelDrafter:
    """A draft model in its own backend, one slot per target slot (see module docstring).

    Per slot it tracks how many committed tokens its cache holds; each step it first feeds
    the committed tokens it has not seen (one extend call for every slot), then decodes
    `k - 1` more, batched over the slots."""

    def __init__(self, backend: SpeculativeBackend, name: str) -> None:
        self.backend = backend
        self.name = name
        self.free_proposals = False
        self.can_move = callable(getattr(backend, "move", None))
        self._cached: dict[int, int] = {}
        #: slot -> tokens its cache holds beyond the committed ones (drafts in flight)
        self._drafted: dict[int, list[int]] = {}

    def begin(self, slot: int, prompt_ids: Sequence[int]) -> None:
        # The target's prefill gives the first token; the draft only needs the cache. All
        # but the last prompt token: propose feeds at least one token before it drafts.
        if len(prompt_ids) > 1:
            self.backend.prefill(slot, list(prompt_ids[:-1]))
            self._cached[slot] = len(prompt_ids) - 1
        else:
            self._cached[slot] = 0
        self._drafted[slot] = []

    def propose(self, requests: list[DraftRequest]) -> list[Proposal]:
        if not requests:
            return []
        tokens: list[list[int]] = [[] for _ in requests]
        probs: list[list[torch.Tensor]] = [[] for _ in requests]
        fresh = [r for r in requests if self._cached[r.slot] == 0]
        for r in fresh:  # a one-token prompt: the draft's cache starts with it
            self.backend.prefill(r.slot, list(r.context[:1]))
            self._cached[r.slot] = 1
        # `accept` leaves the newest committed token out of the cache, so each slot has at
        # least one token to feed: one extend call brings every slot up to date.
        feed = [list(r.context[self._cached[r.slot] :]) for r in requests]
        out = self.backend.extend([r.slot for r in requests], feed)
        rows = [block[-1] for block in out]  # (vocab,) each: the first draft's logits
        for r, f in zip(requests, feed, strict=True):
            self._cached[r.slot] += len(f)
        active = list(range(len(requests)))
        while active:
            for i in active:
                tok, q = _draw(rows[i], requests[i].sampling, requests[i].generator)
                tokens[i].append(tok)
                if q is not None:
                    probs[i].append(q)
            active = [i for i in active if len(tokens[i]) < requests[i].k]
            if not active:
                break
            logits = self.backend.decode(
                [requests[i].slot for i in active], [tokens[i][-1] for i in active]
            )
            for j, i in enumerate(active):
                rows[i] = logits[j]
        for i, r in enumerate(requests):
            # The cache holds the committed tokens and every draft but the last.
            self._drafted[r.slot] = tokens[i][:-1]
        return [
            Proposal(t, p if r.sampling.do_sample else None)
            for t, p, r in zip(tokens, probs, requests, strict=True)
        ]

    def accept(self, slot: int, committed: int) -> None:
        cached = self._cached[slot]
        held = cached + len(self._drafted.get(slot, []))
        # Accepted drafts already sit in the cache: keep them and drop the rest. The newest
        # committed token (the target's correction or bonus) was never fed to the draft.
        keep = min(held, committed - 1)
        if keep < held:
            self.backend.truncate(slot, keep)
        self._cached[slot] = keep
        self._drafted[slot] = []

    def release(self, slot: int) -> None:
        self._cached.pop(slot, None)
        self._drafted.pop(slot, None)
        self.backend.release(slot)

    def move(self, src: int, dst: int) -> None:
        cached = self._cached.pop(src)
        if cached:  # a one-token prompt's draft cache fills on its first proposal
            self.backend.move(src, dst)  # type: ignore[attr-defined]
        self._cached[dst] = cached
        self._drafted[dst] = self._drafted.pop(src, [])


def _draw(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> tuple[int, torch.Tensor | None]:
    """The draft's next token: its argmax for greedy requests; for sampled ones a draw
    from its warped distribution, returned with it (the acceptance rule needs q)."""
    if not params.do_sample:
        return int(logits.argmax()), None
    q = torch.softmax(warp(logits.float().cpu(), params), dim=-1)  # beside the CPU generator
    return int(torch.multinomial(q, 1, generator=generator)), q
