"""The engine's speculative decoding step (a mixin of `scheduler.Engine`).

With a drafter, each decode step asks `spec_policy.DraftPolicy` how many draft tokens pay
(`_propose`: a free drafter proposes first, a model drafter after the choice), runs every
sequence's last token and its drafts through the target in one `extend` (`_verify_step`),
and keeps what the acceptance rule (`speculative.accept`) keeps, rolling the rest out of
the caches. `_measure_passes` times the backend's passes before serving. Imports torch and
engine modules only.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

import torch

from slimserve.engine.backends.base import Backend, Capabilities
from slimserve.engine.sequence import Constraint, SeqState, Sequence
from slimserve.engine.spec_policy import DraftPolicy, one_pass, probe, probe_sizes
from slimserve.engine.speculative import NO_PROPOSAL, Drafter, DraftRequest, Proposal, accept
from slimserve.engine.types import EngineStats

if TYPE_CHECKING:
    from slimserve.engine.config import DraftConfig

log = logging.getLogger(__name__)


class SpeculativeSteps:
    """`Engine`'s speculative decoding methods; the engine supplies the state below."""

    backend: Backend
    caps: Capabilities
    drafter: Drafter | None
    draft: DraftConfig
    _policy: DraftPolicy | None
    _cond: threading.Condition
    _stats: EngineStats
    _phase: dict[str, float]

    if TYPE_CHECKING:  # defined by Engine

        def _fail(self, seq: Sequence, exc: BaseException) -> None: ...

        def _pick(self, seq: Sequence, logits: torch.Tensor) -> int: ...

        def _advance(self, seq: Sequence, token: int | None, logits: torch.Tensor) -> None: ...

    def _draft_room(self, seq: Sequence) -> int:
        """Draft tokens `seq` can take this step: none under a repetition penalty (it
        depends on every token before), else as many as fit its limits after one more."""
        if seq.req.sampling.repetition_penalty != 1.0:
            return 0
        done = len(seq.generated)
        return max(
            0,
            min(
                self.draft.tokens,
                seq.req.stopping.max_new_tokens - done - 1,
                self.backend.max_seq_len - len(seq.req.prompt_ids) - done - 1,
            ),
        )

    def _propose(self, batch: list[Sequence]) -> list[Proposal] | None:
        """A proposal per sequence of `batch`, or None when there is none at all (the step
        is then a plain decode). A drafter that fails is dropped, not the requests."""
        assert self.drafter is not None
        policy = self._policy
        rooms = [self._draft_room(seq) if seq.slot is not None else 0 for seq in batch]
        cap = self.draft.tokens
        if policy is not None and not policy.free_proposals:  # choose, then pay for it
            cap = policy.choose(rooms, [policy.alpha(s.spec) for s in batch])
        asks, where = [], []
        for i, seq in enumerate(batch):
            k = min(rooms[i], cap)
            if k > 0 and seq.slot is not None:
                asks.append(DraftRequest(seq.slot, seq.tokens, k, seq.req.sampling, seq.generator))
                where.append(i)
        if not asks:
            return None
        t = time.perf_counter()
        try:
            got = self.drafter.propose(asks)
        except Exception:
            log.exception("the drafter %s failed; decoding without drafts", self.drafter.name)
            self.drafter = None
            return None
        if policy is not None and not policy.free_proposals:
            policy.observe_draft(time.perf_counter() - t, cap)
        lengths = [0] * len(batch)
        for i, ask, p in zip(where, asks, got, strict=True):
            lengths[i] = min(ask.k, len(p.tokens))  # a drafter may not propose more than asked
        if policy is not None and policy.free_proposals:  # proposed for free: how many pay?
            cap = policy.choose(lengths, [policy.alpha(s.spec) for s in batch])
            if cap == 0:  # sit out; the target's next token tells whether the first was right
                for i, p in zip(where, got, strict=True):
                    if p.tokens:
                        batch[i].spec.guess = p.tokens[0]
                return None
        if not any(lengths):
            return None
        out = [NO_PROPOSAL] * len(batch)
        for i, p in zip(where, got, strict=True):
            k = min(lengths[i], cap)
            matcher = batch[i].matcher
            if matcher is not None:  # structured output: only the draft's allowed prefix
                k = matcher.validate(p.tokens[:k])
            out[i] = Proposal(p.tokens[:k], p.probs[:k] if p.probs is not None else None)
        return out

    def _mask_draft(self, matcher: Constraint, draft: list[int], logits: torch.Tensor) -> None:
        """Mask `logits` (k + 1, vocab) in place: row j by what the grammar allows after
        the first j draft tokens (the draft is the grammar's allowed prefix: `_propose`)."""
        from slimserve.engine.structured import allocate_bitmask, apply_bitmask_

        if not draft:
            matcher.mask_logits_(logits[0])
            return
        bitmask = allocate_bitmask(len(draft) + 1, matcher.vocab_size)
        n = matcher.fill_draft_bitmasks(draft, bitmask)
        apply_bitmask_(logits[: n + 1], bitmask[: n + 1])

    def _measure_passes(self) -> DraftPolicy:
        """Time the backend's passes over the sizes a step may take (`spec_policy.probe`),
        on the last slot (free: the engine has not started)."""
        backend = self.backend
        slot = backend.max_slots - 1
        k = self.draft.tokens
        ids = [1 + j % (backend.vocab_size - 1) for j in range(backend.max_slots * (k + 1))]

        def extend(n: int) -> None:
            backend.prefill(slot, ids[:1])
            assert self.caps.speculative is not None
            self.caps.speculative.extend([slot], [ids[:n]])

        sizes = probe_sizes(k, backend.max_slots, backend.max_seq_len)
        costs = probe(extend, lambda: backend.release(slot), sizes)
        assert self.drafter is not None
        free = self.drafter.free_proposals
        log.info("forward pass by tokens in it (%s): %s", backend.name, costs.describe())
        passes = getattr(backend, "passes", None) or one_pass
        return DraftPolicy(costs, k, free_proposals=free, passes=passes)

    def _verify_step(self, batch: list[Sequence], proposals: list[Proposal]) -> None:
        """Run each sequence's last token and its draft through the target in one pass and
        emit what the acceptance rule keeps (1 to k + 1 tokens each)."""
        assert self.drafter is not None
        drafter = self.drafter
        t0 = time.perf_counter()
        try:
            slots = [s.slot for s in batch if s.slot is not None]
            inputs = [[s.last_token, *p.tokens] for s, p in zip(batch, proposals, strict=True)]
            assert self.caps.speculative is not None  # a drafter needs one (Engine.__init__)
            rows = self.caps.speculative.extend(slots, inputs)
        except Exception as exc:
            for seq in batch:
                self._fail(seq, exc)
            return
        t1 = time.perf_counter()
        # First what each sequence keeps (caches rolled back, counts taken), then the
        # events: a consumer that sees a finish sees the engine's counts include it.
        kept: list[tuple[Sequence, list[int], torch.Tensor]] = []
        proposed = accepted = 0
        for seq, prop, logits in zip(batch, proposals, rows, strict=True):
            try:
                if seq.matcher is not None:  # each position under its grammar mask
                    self._mask_draft(seq.matcher, prop.tokens, logits)
                if prop.tokens:
                    emitted = accept(logits, prop, seq.req.sampling, seq.generator)
                else:
                    emitted = [self._pick(seq, logits[0])]
                committed = len(seq.tokens) + len(emitted)
                assert seq.slot is not None
                if len(emitted) <= len(prop.tokens):  # drop the rejected drafts' cache
                    assert self.caps.speculative is not None
                    self.caps.speculative.truncate(seq.slot, committed - 1)
                drafter.accept(seq.slot, committed)
            except Exception as exc:
                self._fail(seq, exc)
                continue
            seq.draft_proposed += len(prop.tokens)
            seq.draft_accepted += len(emitted) - 1
            if self._policy is not None:
                self._policy.record(seq.spec, len(prop.tokens), len(emitted) - 1)
            proposed += len(prop.tokens)
            accepted += len(emitted) - 1
            kept.append((seq, emitted, logits))
        if self._policy is not None:
            self._policy.observe_step([len(x) for x in inputs], t1 - t0)
        with self._cond:
            self._stats.steps += 1
            self._stats.draft_proposed += proposed
            self._stats.draft_accepted += accepted
        t2 = time.perf_counter()
        for seq, emitted, logits in kept:
            for j, tok in enumerate(emitted):
                self._advance(seq, tok, logits[j])
                if seq.state is SeqState.FINISHED:
                    break
        self._phase["forward"] += t1 - t0
        self._phase["pick"] += t2 - t1
        self._phase["emit"] += time.perf_counter() - t2
