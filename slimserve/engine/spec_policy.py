"""When speculation pays: how many draft tokens to verify each step, from what a forward
pass costs on this machine and how often this sequence's drafts are accepted.

A verify pass over n tokens costs what the backend's kernels make it cost, and the curve
differs by machine. llama.cpp's q8_0 kernels on two AMD EPYC (Zen 5) cores take 5.7 ms for
one token (a separate one-row kernel), 14 for two, 22 for five and 28 for sixteen; a GPU
verifies five tokens for about the price of one. A fixed draft length that pays on one
machine loses on another, so the engine asks this module each step (`DraftPolicy.choose`):

- `PassCosts`: seconds of one forward pass by the tokens in it, measured at start on a
  free slot (`probe`) and kept current from every step the engine runs (a moving average).
- Acceptance per sequence: each verified draft position up to the first rejection is a
  Bernoulli trial, pooled with an engine-wide prior (`Acceptance`).
- The cap k on draft tokens per sequence that maximizes expected tokens per second,

      sum_i E(a_i, min(k, L_i)) / (C(1 + min(k, L_1), ...) + D(k)),

  E(a, k) = 1 + a + ... + a^k (the emitted tokens: accepted drafts and the target's own),
  C the step's cost (the sum of its passes': a cache split per sequence runs unequal
  token counts in several passes, `Passes`), D the drafter's own time, and L_i the draft
  room of sequence i (its proposal, for a drafter whose proposals cost nothing). k = 0 is
  a plain decode step.
- Steps a drafter sits out still teach the policy: a free drafter's first proposed token is
  compared with the token the target emits (`Acceptance.check`); a model drafter proposes
  one token after `EXPLORE_EVERY` idle steps.

Pure Python; no engine imports (the scheduler owns the calls).
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Callable

#: Tokens of each forward pass a step over these per-slot token counts (in slot order)
#: takes: one pass of their sum, unless the backend says otherwise (llama.cpp's split
#: cache: `LlamaCppBackend.passes`).
Passes = Callable[[list[int]], list[int]]


def one_pass(counts: list[int]) -> list[int]:
    return [sum(counts)]


#: `draft_policy`: "adaptive" verifies as many draft tokens as pay (this module); "always"
#: verifies every draft token proposed, up to `draft_tokens`.
DRAFT_POLICIES = ("adaptive", "always")
#: A model drafter sitting out this many steps in a row proposes one token, so that its
#: acceptance stays measured.
EXPLORE_EVERY = 16
#: Weight, in draft positions, of the engine-wide acceptance in each sequence's estimate.
_PRIOR_WEIGHT = 4.0
#: Moving-average weight of the newest pass time and drafter time.
_EWMA = 0.2
#: The engine-wide counts decay by this per verified proposal (they follow the workload).
_DECAY = 0.98


class PassCosts:
    """Seconds of one forward pass by the number of tokens in it."""

    def __init__(self) -> None:
        self._s: dict[int, float] = {}
        #: The sizes measured, in order (`cost` runs several times a step: no sort there).
        self._sizes: list[int] = []

    def observe(self, n: int, seconds: float) -> None:
        old = self._s.get(n)
        if old is None:
            bisect.insort(self._sizes, n)
        self._s[n] = seconds if old is None else old + _EWMA * (seconds - old)

    def cost(self, n: int) -> float:
        """Measured, else interpolated between the nearest sizes measured; beyond the
        largest, extended along the last segment (proportionally when only one is known)."""
        s = self._s
        if n in s:
            return s[n]
        known = self._sizes
        if not known:
            return float(n)
        at = bisect.bisect_left(known, n)  # known[at - 1] < n < known[at]
        if 0 < at < len(known):
            a, b = known[at - 1], known[at]
            return s[a] + (s[b] - s[a]) * (n - a) / (b - a)
        if at == 0:  # below the smallest size measured
            return s[known[0]] * n / known[0]
        if len(known) == 1:
            return s[known[0]] * n / known[0]
        a, b = known[-2], known[-1]
        return s[b] + max(0.0, (s[b] - s[a]) / (b - a)) * (n - b)

    def table(self) -> dict[int, float]:
        return {n: self._s[n] for n in self._sizes}

    def describe(self) -> str:
        """E.g. "1:5.7 2:14.1 5:21.8 ms" (the sizes measured, in milliseconds)."""
        return " ".join(f"{n}:{s * 1e3:.1f}" for n, s in self.table().items()) + " ms"


def probe_sizes(max_tokens: int, max_slots: int, max_seq_len: int) -> list[int]:
    """Pass sizes worth measuring before serving: a sequence's verify (1 to k + 1 tokens)
    and a full batch's plain and verify steps; each fits one slot after one token."""
    k1 = max_tokens + 1
    sizes = set(range(1, k1 + 1)) | {2 * k1, max_slots, max_slots * k1}
    return sorted(n for n in sizes if n + 1 <= max_seq_len)


def probe(
    extend: Callable[[int], object], reset: Callable[[], None], sizes: list[int]
) -> PassCosts:
    """Time `extend(n)` (one pass of n tokens after a one-token context) for each size,
    the faster of two runs, calling `reset` after each."""
    costs = PassCosts()
    for n in sizes:
        best = math.inf
        for _ in range(2):
            t = time.perf_counter()
            extend(n)
            best = min(best, time.perf_counter() - t)
            reset()
        costs.observe(n, best)
    return costs


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens a verify of k drafts emits when each is accepted with probability alpha
    (independently, until the first rejection): 1 + alpha + ... + alpha^k."""
    if alpha >= 1.0:
        return float(k + 1)
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def break_even(costs: PassCosts, k: int, batch: int = 1, draft_s: float = 0.0) -> float:
    """The acceptance at which verifying k drafts per sequence (each drafted at `draft_s`
    seconds a position) emits tokens as fast as a plain step: above it drafting pays.
    1.0 when not even certain drafts pay."""
    plain = batch / costs.cost(batch)
    seconds = costs.cost(batch * (k + 1)) + draft_s * k
    if batch * (k + 1) / seconds <= plain:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(40):  # bisection: expected tokens grow with acceptance
        mid = (lo + hi) / 2
        if batch * expected_tokens(mid, k) / seconds > plain:
            hi = mid
        else:
            lo = mid
    return hi


class Acceptance:
    """Draft positions accepted and tried, for one sequence."""

    __slots__ = ("guess", "hits", "trials")

    def __init__(self) -> None:
        self.hits = 0.0
        self.trials = 0.0
        #: A free drafter's first token on a step the sequence sat out (checked against the
        #: target's next token).
        self.guess: int | None = None


class DraftPolicy:
    """Chooses each step's draft cap (module docstring)."""

    def __init__(
        self,
        costs: PassCosts,
        max_tokens: int,
        free_proposals: bool,
        passes: Passes = one_pass,
    ) -> None:
        self.costs = costs
        self.passes = passes
        self.max_tokens = max_tokens
        #: Proposals cost nothing (prompt lookup): propose first, then choose how many of
        #: them to verify; else choose first, and pay the drafter for what it proposes.
        self.free_proposals = free_proposals
        self._hits, self._trials = 1.0, 2.0  # engine-wide: a prior of one half
        self._draft_s = 0.0  # a model drafter's seconds per drafted position (all slots)
        self._idle = 0
        self.steps_drafted = 0
        self.steps_plain = 0

    def step_cost(self, counts: list[int]) -> float:
        """Seconds of a step feeding these token counts (slot order): its passes' costs."""
        return sum(self.costs.cost(n) for n in self.passes(counts))

    def observe_step(self, counts: list[int], seconds: float) -> None:
        """A step's time, taken as a pass cost when it was one pass."""
        passes = self.passes(counts)
        if len(passes) == 1:
            self.costs.observe(passes[0], seconds)

    @property
    def acceptance(self) -> float:
        """The engine-wide estimate of a draft position's acceptance."""
        return self._hits / self._trials

    def alpha(self, acc: Acceptance) -> float:
        return (acc.hits + _PRIOR_WEIGHT * self.acceptance) / (acc.trials + _PRIOR_WEIGHT)

    def record(self, acc: Acceptance, proposed: int, accepted: int) -> None:
        """A verified proposal: `accepted` of its `proposed` tokens kept."""
        if proposed <= 0:
            return
        trials = accepted + (1 if accepted < proposed else 0)
        acc.hits += accepted
        acc.trials += trials
        self._hits = self._hits * _DECAY + accepted
        self._trials = self._trials * _DECAY + trials

    def check(self, acc: Acceptance, token: int) -> None:
        """The target emitted `token` where the sequence's unverified guess stood."""
        if acc.guess is not None:
            self.record(acc, 1, int(acc.guess == token))
            acc.guess = None

    def observe_draft(self, seconds: float, positions: int) -> None:
        """A model drafter took `seconds` to draft `positions` tokens ahead."""
        if positions > 0:
            per = seconds / positions
            self._draft_s = (
                per if not self._draft_s else self._draft_s + _EWMA * (per - self._draft_s)
            )

    def choose(self, rooms: list[int], alphas: list[float]) -> int:
        """The draft cap for a step over these sequences (room: the most each may take)."""
        b = len(rooms)
        top = min(self.max_tokens, max(rooms, default=0))
        best_k, best = 0, b / self.step_cost([1] * b)
        for k in range(1, top + 1):
            ks = [min(k, r) for r in rooms]
            tokens = sum(expected_tokens(a, x) for a, x in zip(alphas, ks, strict=True))
            seconds = self.step_cost([1 + x for x in ks])
            if not self.free_proposals:
                seconds += self._draft_s * k
            if tokens / seconds > best:
                best_k, best = k, tokens / seconds
        if best_k == 0 and not self.free_proposals and top > 0:
            self._idle += 1
            if self._idle >= EXPLORE_EVERY:
                best_k = 1
        if best_k:
            self._idle = 0
            self.steps_drafted += 1
        else:
            self.steps_plain += 1
        return best_k
