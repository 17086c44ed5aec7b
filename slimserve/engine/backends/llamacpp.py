"""A backend that runs the forward passes in llama.cpp (through llama-cpp-python).

On CPUs without AVX-512, PyTorch's quantized matrix-vector kernels are compute-bound (int8
`_weight_int8pack_mm` barely beats fp32 on SmolLM2's shapes; the int4 one is slower still),
while llama.cpp's hand-tuned Q8_0/Q4_1 dot products read each weight byte once. This backend
gives the engine those kernels and keeps everything else slimserve's: the scheduler,
sampling, stop handling, detokenization, the registry's provenance and checksums, the API.

The model comes from a published artifact, verified and loaded as usual, and converted in
memory to a private GGUF file (`slimserve.engine.backends.gguf_export`) in a fresh temporary
directory. llama.cpp maps it, and the file is deleted at once, so no GGUF ever outlives the
load or comes from outside the registry.

Slots are llama.cpp sequence ids. Scoring uses extra sequence ids after the slots, so a
Score never disturbs a running generation's cache.

Threads by phase (`ggml_threads.ContextThreads`): a one-token pass (one sequence decoding)
runs on `decode_threads`, what qualification measured fastest for it on this machine, and
every larger pass (prefill, batched decode, Score rows) on all `threads`, each on a
persistent ggml threadpool whose workers sleep between passes.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimserve.engine import spec
from slimserve.engine.backends.base import (
    LOGPROB_ROWS,
    Feed,
    ScorePlan,
    check_copy_prefix,
    check_decode,
    check_extend,
    check_feeds,
    check_ids,
    check_slot,
    check_truncate,
    prompt_logprobs_from,
)
from slimserve.engine.backends.ggml_threads import ContextThreads, unavailable_reason
from slimserve.engine.backends.gguf_export import GgufType, export_gguf
from slimserve.engine.config import KV_LAYOUTS
from slimserve.engine.types import TokenLogprob

log = logging.getLogger(__name__)

#: Sequence ids reserved for Score rows, run together in one llama_decode call.
SCORE_ROWS = 8
_BATCH_TOKENS = 4096
_UBATCH_TOKENS = 512
#: Cache cells reserved for Score rows (at least max_seq_len, so any one row fits).
_SCORE_CELLS = 1024


@functools.cache
def available() -> bool:
    """Whether llama-cpp-python is installed (it is an optional extra that compiles)."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


class LlamaCppBackend:
    """`backends.base.Backend` over one llama.cpp context (see module docstring)."""

    def __init__(
        self,
        config: Any,
        state_dict: Mapping[str, torch.Tensor],
        tokenizer_json: Path,
        *,
        max_slots: int,
        max_seq_len: int,
        threads: int,
        weight_type: GgufType = "q8_0",
        extra_buffers: bool = True,
        kv_pool_bytes: int | None = None,
        kv_layout: str = "auto",
        decode_threads: int = 0,
        threadpool: bool = True,
    ) -> None:
        """Convert the weights, load them into llama.cpp and allocate the KV cache.

        Raises:
            ImportError: llama-cpp-python is not installed.
            ValueError: the model cannot be exported, or llama.cpp refuses it, or
                `kv_pool_bytes` cannot hold one sequence of `max_seq_len`.

        `kv_pool_bytes` caps the cells the slots share (None: max_slots x max_seq_len): the
        engine then admits a request only while the pool can hold what it may grow to.

        `kv_layout` (`KV_LAYOUTS`): "unified", one pool of cells every sequence draws on;
        "split", a fixed max_seq_len of cells per sequence (llama.cpp's per-sequence
        streams), holding (max_slots + SCORE_ROWS + 1) x max_seq_len cells whatever
        `kv_pool_bytes` says; "auto", split when those cells fit `kv_pool_bytes`, else
        unified. Split decodes a run of consecutive slots in one pass, faster than the
        pool, but each break in the run costs another pass (16 streams: 25.1 ms a step
        split, 27.4 unified; 15 with slot 5 free: 49.9 split, 36.1 unified; SmolLM2 q8_0,
        AMD EPYC, 2 threads), so the engine keeps the run unbroken (`move`).

        `decode_threads` (1..threads; 0: threads) run a pass of one token, `threads` every
        larger one; `threadpool` runs them on persistent ggml pools (poll 0), else on
        llama.cpp's pool per call (see module docstring).
        """
        import llama_cpp as lc

        if min(max_slots, max_seq_len, threads) < 1:
            raise ValueError(
                f"max_slots ({max_slots}), max_seq_len ({max_seq_len}) and threads ({threads}) "
                "must be >= 1"
            )
        if not 0 <= decode_threads <= threads:
            raise ValueError(f"decode_threads must be 0..threads ({threads}), not {decode_threads}")
        self.lc = lc
        self.name = f"llama.cpp-{weight_type}"
        #: Repacked / AMX weight buffers: faster kernels, qualified per CPU before serving.
        self.extra_buffers = extra_buffers
        self.weight_type = weight_type
        self.max_slots = max_slots
        self.max_seq_len = max_seq_len
        self.device = torch.device("cpu")
        self._n_layers = int(config.num_hidden_layers)
        self._kv_dim = spec.kv_heads_of(config) * spec.head_dim_of(config)
        lc.llama_backend_init()
        lc.llama_log_set(_log_callback(), ctypes.c_void_p())
        with tempfile.TemporaryDirectory(prefix="slimserve-gguf-") as tmp:
            path = export_gguf(config, state_dict, tokenizer_json, Path(tmp) / "model.gguf",
                               weight_type)  # fmt: skip
            params = lc.llama_model_default_params()
            # Read into memory: the file goes with the directory.
            _set_field(params, "load_mode", lc.LLAMA_LOAD_MODE_NONE)
            _set_field(params, "use_extra_bufts", extra_buffers)
            self._model = lc.llama_model_load_from_file(str(path).encode(), params)
        if not self._model:
            raise ValueError("llama.cpp could not load the exported model")
        self.vocab_size = int(lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self._model)))
        ctx = lc.llama_context_default_params()
        # The slots, the Score rows' scratch sequences, and one that holds a Score prompt's
        # KV across steps (`score_prompt_part`).
        self._n_seqs = max_slots + SCORE_ROWS + 1
        ctx.n_seq_max = self._n_seqs
        # The KV cache in float32 for float32 weights (what the torch backend keeps), else in
        # float16 (llama.cpp's default): an fp32 artifact is then served at fp32 precision.
        self._kv_bytes = 4 if weight_type == "f32" else 2
        self._lay_out_cache(ctx, kv_layout, kv_pool_bytes)
        ctx.n_batch = _BATCH_TOKENS
        ctx.n_ubatch = _UBATCH_TOKENS
        ctx.n_threads = ctx.n_threads_batch = threads
        ctx.no_perf = True
        ctx.type_k = ctx.type_v = lc.GGML_TYPE_F32 if self._kv_bytes == 4 else lc.GGML_TYPE_F16
        if self._kv_bytes == 4:  # flash attention on CPU rounds Q and K to float16
            ctx.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self._ctx = lc.llama_init_from_model(self._model, ctx)
        if not self._ctx:
            raise ValueError("llama.cpp could not create a context (KV cache too large?)")
        self._mem = lc.llama_get_memory(self._ctx)
        self._batch = lc.llama_batch_init(_BATCH_TOKENS, 0, 1)
        self._lengths = [0] * max_slots
        #: Prompt tokens in the first scratch sequence, fed by `prompt_logprobs_part`.
        self._logprob_fed = 0
        #: The Score prompt tokens `_prompt_seq` holds, fed by `score_prompt_part`.
        self._score_prompt: list[int] = []
        why = unavailable_reason() if threadpool else None
        if why is not None:
            log.warning("no persistent ggml threadpool (%s): llama.cpp makes one per call", why)
        #: Threads by phase and their pools.
        self.phase_threads = ContextThreads(
            lc, self._ctx, threads=threads, decode_threads=decode_threads or threads,
            pooled=threadpool and why is None,
        )  # fmt: skip

    def set_decode_threads(self, n: int) -> None:
        """Run one-token passes on `n` threads (1..threads) from the next call on
        (qualification races the counts on one backend)."""
        self.phase_threads.set_decode_threads(n)

    def _lay_out_cache(self, ctx: Any, layout: str, pool_bytes: int | None) -> None:
        """Set `ctx`'s KV cells and layout, and `kv_layout`, `kv_pool_tokens`, `_score_cells`."""
        max_slots, max_seq_len = self.max_slots, self.max_seq_len
        per_token = 2 * self._n_layers * self._kv_dim * self._kv_bytes
        if layout not in KV_LAYOUTS:
            raise ValueError(f"kv_layout={layout!r} is not one of {', '.join(KV_LAYOUTS)}")
        if layout == "auto":
            split_bytes = self._n_seqs * max_seq_len * per_token
            layout = "split" if pool_bytes is None or split_bytes <= pool_bytes else "unified"
        #: "unified" or "split" (what "auto" chose).
        self.kv_layout = layout
        if self.kv_layout == "unified":
            # One pool of cache cells shared by every sequence: max_seq_len per slot, plus
            # room for one batch of Score rows (grouped below to fit it).
            ctx.kv_unified = True
            self._score_cells = max(max_seq_len, _SCORE_CELLS)
            #: Cache cells the slots share (the engine's admission keeps within them).
            self.kv_pool_tokens = pool_cells(max_slots, max_seq_len, per_token, pool_bytes)
            ctx.n_ctx = self.kv_pool_tokens + self._score_cells
        else:
            # llama.cpp gives each sequence n_ctx / n_seq_max cells of its own, and a decode
            # step's attention reads only each stream's cells (in one pool it walks every
            # cell for every query, skipping the masked ones; see __init__ for the cost).
            ctx.kv_unified = False
            self._score_cells = SCORE_ROWS * max_seq_len
            self.kv_pool_tokens = max_slots * max_seq_len
            ctx.n_ctx = self._n_seqs * max_seq_len

    def close(self) -> None:
        if getattr(self, "_ctx", None):
            self.lc.llama_batch_free(self._batch)
            self.lc.llama_free(self._ctx)
            self.lc.llama_model_free(self._model)
            self._ctx = None
            self.phase_threads.close()  # after the context: it points at its last pool

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown: ctypes may be gone
            self.close()

    # ------------------------------------------------------------------ llama.cpp calls

    def _run(self, entries: list[tuple[int, int, int, bool]]) -> int:
        """One llama_decode over (token, position, sequence, wants logits); returns outputs."""
        fill_batch(self._batch, entries, _BATCH_TOKENS)
        rc = self.lc.llama_decode(self._ctx, self._batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed ({rc}): no room in the KV cache?")
        return sum(1 for e in entries if e[3])

    def _logits(self, n: int) -> torch.Tensor:
        """The last decode's `n` output rows as float32 (n, vocab), copied."""
        return self._logits_view(n).clone()

    def _logits_view(self, n: int) -> torch.Tensor:
        """The last decode's `n` output rows where llama.cpp holds them: no copy, valid until
        the next llama_decode (the scheduler reads a step's logits before the next call)."""
        ptr = self.lc.llama_get_logits(self._ctx)
        return torch.from_numpy(np.ctypeslib.as_array(ptr, shape=(n, self.vocab_size)))

    # ------------------------------------------------------------------ Backend protocol

    def prefill(self, slot: int, token_ids: list[int]) -> torch.Tensor:
        self._check_prompt(slot, token_ids)
        t = len(token_ids)
        self.lc.llama_memory_seq_rm(self._mem, slot, -1, -1)
        self._lengths[slot] = 0
        for start in range(0, t, _BATCH_TOKENS):
            chunk = token_ids[start : start + _BATCH_TOKENS]
            self._run([(tok, start + j, slot, start + j == t - 1) for j, tok in enumerate(chunk)])
        self._lengths[slot] = t
        return self._logits(1)[0]

    def prefill_batch(self, slots: list[int], prompts: list[list[int]]) -> list[torch.Tensor]:
        """`prefill` for several slots in as few llama_decode calls as `_BATCH_TOKENS`
        allows (one, for a burst of chat-sized prompts): the matrix products see every
        prompt's tokens at once. Returns each slot's last-position logits (vocab,), copied:
        a later call of the same batch overwrites llama.cpp's buffer.

        Raises:
            ValueError: as `prefill`, for any of the prompts (checked before any runs).
        """
        if len(slots) != len(prompts) or len(set(slots)) != len(slots):
            raise ValueError(f"need distinct slots, one per prompt: {slots}")
        for slot, ids in zip(slots, prompts, strict=True):
            self._check_prompt(slot, ids)
        out: list[torch.Tensor | None] = [None] * len(slots)
        group: list[int] = []  # indices of prompts that go into the next call
        # In slot order: a cache split per stream batches runs of consecutive sequence ids
        # (llama.cpp's split_equal), and out of order each prompt would take passes of its own.
        for i in sorted(range(len(slots)), key=lambda i: slots[i]):
            if len(prompts[i]) > _BATCH_TOKENS:  # takes calls of its own
                out[i] = self.prefill(slots[i], prompts[i])
                continue
            if group and sum(len(prompts[j]) for j in group) + len(prompts[i]) > _BATCH_TOKENS:
                self._prefill_group(group, slots, prompts, out)
                group = []
            group.append(i)
        if group:
            self._prefill_group(group, slots, prompts, out)
        return [row for row in out if row is not None]

    def _prefill_group(
        self,
        group: list[int],
        slots: list[int],
        prompts: list[list[int]],
        out: list[torch.Tensor | None],
    ) -> None:
        entries = []
        for i in group:
            slot, ids = slots[i], prompts[i]
            self.lc.llama_memory_seq_rm(self._mem, slot, -1, -1)
            self._lengths[slot] = 0
            entries += [(tok, j, slot, j == len(ids) - 1) for j, tok in enumerate(ids)]
        rows = self._logits(self._run(entries))  # outputs in entry order: one per prompt
        for row, i in enumerate(group):
            self._lengths[slots[i]] = len(prompts[i])
            out[i] = rows[row]

    #: `BatchingBackend.max_step_tokens`: one llama_batch.
    max_step_tokens = _BATCH_TOKENS

    def forward(self, feeds: list[Feed]) -> torch.Tensor:
        """`BatchingBackend.forward`: decode tokens and prompt chunks in one llama_decode
        (llama.cpp mixes sequences at different positions in one batch); logits are views."""
        check_feeds(feeds, self._lengths, self.max_seq_len, self.vocab_size)
        if sum(len(f.tokens) for f in feeds) > _BATCH_TOKENS:
            raise ValueError(f"a step takes at most {_BATCH_TOKENS} tokens")
        entries = []
        for f in feeds:
            start = self._lengths[f.slot]
            if start == 0:  # a new sequence: nothing of an earlier one may remain
                self.lc.llama_memory_seq_rm(self._mem, f.slot, -1, -1)
            last = len(f.tokens) - 1
            entries += [
                (t, start + j, f.slot, f.logits and j == last) for j, t in enumerate(f.tokens)
            ]
        n = self._run(entries)
        for f in feeds:
            self._lengths[f.slot] += len(f.tokens)
        return self._logits_view(n)

    def decode(self, slots: list[int], token_ids: list[int]) -> torch.Tensor:
        return self.decode_view(slots, token_ids).clone()

    def decode_view(self, slots: list[int], token_ids: list[int]) -> torch.Tensor:
        """`decode` without the copy: the logits where llama.cpp holds them (a view the
        scheduler reads before it makes the backend's next call)."""
        check_decode(slots, token_ids, self._lengths, self.max_seq_len, self.vocab_size)
        n = self._run(
            [(tok, self._lengths[s], s, True) for s, tok in zip(slots, token_ids, strict=True)]
        )
        for slot in slots:
            self._lengths[slot] += 1
        return self._logits_view(n)

    def extend(self, slots: list[int], token_ids: list[list[int]]) -> list[torch.Tensor]:
        """Append several tokens to each slot in one llama_decode (a speculative step's
        verification); returns each slot's logits at every appended position, (T_i, vocab),
        views valid until the next call."""
        check_extend(slots, token_ids, self._lengths, self.max_seq_len, self.vocab_size)
        entries = [
            (tok, self._lengths[s] + j, s, True)
            for s, toks in zip(slots, token_ids, strict=True)
            for j, tok in enumerate(toks)
        ]
        n = self._run(entries)
        block = self._logits_view(n)
        out, at = [], 0
        for s, toks in zip(slots, token_ids, strict=True):
            out.append(block[at : at + len(toks)])
            at += len(toks)
            self._lengths[s] += len(toks)
        return out

    def truncate(self, slot: int, length: int) -> None:
        """Keep the first `length` cached tokens of `slot` (drop rejected draft positions)."""
        check_truncate(slot, length, self._lengths)
        if length < self._lengths[slot]:
            self.lc.llama_memory_seq_rm(self._mem, slot, length, -1)
        self._lengths[slot] = length

    def copy_prefix(self, src: int, dst: int, length: int) -> None:
        """`PrefixBackend.copy_prefix`. Pooled: `dst` is added to the cells of `src`'s
        first `length` positions (no copy; the cells then belong to both). Split:
        llama.cpp copies only whole streams across streams, so `src`'s stream is copied at
        the start of the next pass and `dst` cut back to `length`."""
        check_copy_prefix(src, dst, length, self._lengths)
        self.lc.llama_memory_seq_rm(self._mem, dst, -1, -1)
        if self.kv_layout == "split":
            self.lc.llama_memory_seq_cp(self._mem, src, dst, -1, -1)
            self.lc.llama_memory_seq_rm(self._mem, dst, length, -1)
        else:
            self.lc.llama_memory_seq_cp(self._mem, src, dst, 0, length)
        self._lengths[dst] = length

    def release(self, slot: int) -> None:
        self._check_slot(slot)
        self.lc.llama_memory_seq_rm(self._mem, slot, -1, -1)
        self._lengths[slot] = 0

    def passes(self, counts: list[int]) -> list[int]:
        """Tokens of each pass llama.cpp runs for a step feeding `counts` tokens to
        consecutive slots (in slot order): the pool cuts the batch in ubatches; a split
        cache takes equal counts from a run of consecutive slots per pass
        (`split_passes`), so unequal counts cost several passes."""
        if self.kv_layout == "split":
            return split_passes(counts, _UBATCH_TOKENS)
        total = sum(counts)
        return [min(_UBATCH_TOKENS, total - at) for at in range(0, total, _UBATCH_TOKENS)]

    @property
    def packed_slots(self) -> bool:
        """Split: a step over consecutive slots is one pass, each break in the run another."""
        return self.kv_layout == "split"

    def move(self, src: int, dst: int) -> None:
        """`PackingBackend.move`. Split: llama.cpp copies `src`'s whole stream into `dst`'s
        at the start of the next pass (`llama_memory_seq_cp` across streams); unified: the
        cells change owner, no copy."""
        self._check_slot(src)
        self._check_slot(dst)
        if src == dst or not self._lengths[src] or self._lengths[dst]:
            raise ValueError(f"cannot move slot {src} to {dst}: need a full slot and a free one")
        self.lc.llama_memory_seq_rm(self._mem, dst, -1, -1)
        self.lc.llama_memory_seq_cp(self._mem, src, dst, -1, -1)
        self.lc.llama_memory_seq_rm(self._mem, src, -1, -1)
        self._lengths[dst], self._lengths[src] = self._lengths[src], 0

    def score(self, prompt_ids: list[int], continuations: list[list[int]]) -> list[float]:
        return self.score_batch([(prompt_ids, continuations)])[0]

    def score_batch(self, jobs: list[tuple[list[int], list[list[int]]]]) -> list[list[float]]:
        """Rows are prompt + continuation[:-1], identical rows run once, up to SCORE_ROWS
        rows in one llama_decode call (each in its own scratch sequence). A row that starts
        with the Score prompt `_prompt_seq` holds (`score_prompt_part`) starts from a copy
        of its KV and feeds only the rest: 32 labels of one long prompt cost the prompt
        once, not 32 times."""
        plan = ScorePlan.of(jobs, self._check_ids)
        rows = plan.rows
        longest = max(map(len, rows), default=0)
        if longest + 1 > self.max_seq_len:
            raise ValueError(f"prompt + continuation has {longest + 1} tokens > {self.max_seq_len}")
        held = self._score_prompt
        # Rows that start with the held prompt: positions before `len(held)` are copied.
        skip = [
            len(held) if held and len(r) > len(held) and r[: len(held)] == held else 0 for r in rows
        ]
        need: dict[int, dict[int, list[tuple[int, int]]]] = {}  # row -> pos -> [(tok, cont)]
        for row, pos, tok, cont in plan.tokens:
            need.setdefault(row, {}).setdefault(pos, []).append((tok, cont))
        # Cells for the rows beside the held prompt (pooled: they come from the same cells;
        # a copied prefix shares its cells).
        room = self._score_cells - (len(held) if self.kv_layout == "unified" else 0)
        groups: list[range] = []  # consecutive rows: at most SCORE_ROWS, within the cells
        start, cells = 0, 0
        for r, inputs in enumerate(rows):
            size = len(inputs) - skip[r]
            if r > start and (r - start == SCORE_ROWS or cells + size > room):
                groups.append(range(start, r))
                start, cells = r, 0
            cells += size
        if rows:
            groups.append(range(start, len(rows)))
        sums = [0.0] * plan.n_continuations
        for group in groups:
            entries: list[tuple[int, int, int, bool]] = []
            order: list[tuple[int, int]] = []  # output index -> (row, pos)
            for k, r in enumerate(group):
                seq = self.max_slots + k
                if skip[r]:  # split: the held stream is copied at the start of the pass
                    self.lc.llama_memory_seq_cp(self._mem, self._prompt_seq, seq, -1, -1)
                for pos in range(skip[r], len(rows[r])):
                    want = pos in need.get(r, {})
                    entries.append((rows[r][pos], pos, seq, want))
                    if want:
                        order.append((r, pos))
            targets = [[tok for tok, _ in need[r][pos]] for r, pos in order]
            logprobs: list[list[float]] = []  # output index -> one per target
            try:
                # A group may hold more tokens than one batch (max_seq_len > _BATCH_TOKENS):
                # it runs in chunks, each sequence's cache carrying over between them.
                for at in range(0, len(entries), _BATCH_TOKENS):
                    n = self._run(entries[at : at + _BATCH_TOKENS])
                    if n:
                        done = len(logprobs)
                        logprobs += self._target_logprobs(targets[done : done + n])
            finally:  # scratch sequences are always left empty for the next group
                for k in range(len(group)):
                    self.lc.llama_memory_seq_rm(self._mem, self.max_slots + k, -1, -1)
            for index, (r, pos) in enumerate(order):
                for (_, cont), lp in zip(need[r][pos], logprobs[index], strict=True):
                    sums[cont] += lp
        return ScorePlan.by_job(sums, jobs)

    def score_prompt_part(self, prompt_ids: list[int], start: int, end: int) -> None:
        """`LogprobPartsBackend.score_prompt_part`: feed `prompt_ids[start:end]` into the
        sequence kept for a Score prompt (after the `start` tokens fed before; 0 begins
        afresh); `score_batch` then starts every row that begins with them from their KV."""
        if start == 0:
            self._check_ids(prompt_ids)
            if not 0 < end < min(self.max_seq_len, self._score_cells):
                raise ValueError(f"a held Score prompt of {end} tokens; need 1..max_seq_len - 1")
            self.score_prompt_reset()
        elif start != len(self._score_prompt):
            raise ValueError(f"a part from {start}, but {len(self._score_prompt)} tokens are fed")
        if not start < end <= len(prompt_ids) or end >= self.max_seq_len:
            raise ValueError(f"part {start}..{end} of a {len(prompt_ids)}-token prompt")
        seq = self._prompt_seq
        try:
            for a in range(start, end, _BATCH_TOKENS):
                b = min(a + _BATCH_TOKENS, end)
                self._run([(prompt_ids[p], p, seq, False) for p in range(a, b)])
                self._score_prompt += prompt_ids[a:b]
        except BaseException:
            self.score_prompt_reset()
            raise

    @property
    def _prompt_seq(self) -> int:
        """The sequence that holds a Score prompt (after the slots and the Score rows)."""
        return self.max_slots + SCORE_ROWS

    def score_prompt_reset(self) -> None:
        self.lc.llama_memory_seq_rm(self._mem, self._prompt_seq, -1, -1)
        self._score_prompt = []

    def _target_logprobs(self, targets: list[list[int]]) -> list[list[float]]:
        """Log-probabilities of `targets[i]`'s token ids at the last decode's output row i.

        Read in place from llama.cpp's logits with numpy: no (n, vocab) copy into torch and
        no float64 log_softmax over the vocabulary, only each row's log-sum-exp (exp in
        float32, summed in float64: within ~1e-6 nats of a float64 log_softmax over
        SmolLM2's 49,152 logits) and the wanted entries. No torch op runs here, so a Score
        never wakes torch's intra-op threads to contend with llama.cpp's for the cores.
        """
        rows = np.ctypeslib.as_array(
            self.lc.llama_get_logits(self._ctx), shape=(len(targets), self.vocab_size)
        )  # (n, vocab) float32, llama.cpp's buffer
        top = rows.max(axis=1, keepdims=True)  # NaN stays NaN: the score queue refuses it
        lse = np.log(np.exp(rows - top).sum(axis=1, dtype=np.float64)) + top[:, 0]
        return [[float(rows[i, t]) - float(lse[i]) for t in ids] for i, ids in enumerate(targets)]

    def prompt_logprobs(self, prompt_ids: list[int], top_n: int) -> list[TokenLogprob]:
        return self.prompt_logprobs_part(prompt_ids, 0, len(prompt_ids), top_n)

    def prompt_logprobs_part(
        self, prompt_ids: list[int], start: int, end: int, top_n: int
    ) -> list[TokenLogprob]:
        """`LogprobPartsBackend.prompt_logprobs_part`: in the first scratch sequence, which
        keeps the prompt's KV between parts (`score_batch` runs only when no prompt is
        part-way: the score queue runs a part-way job's parts before any other job);
        `LOGPROB_ROWS` positions a decode call, so the copied logits never exceed a
        (LOGPROB_ROWS, vocab) block."""
        t = len(prompt_ids)
        if start == 0:
            self._check_ids(prompt_ids)
            if not 0 < t <= min(self.max_seq_len, self._score_cells):
                raise ValueError(f"prompt has {t} tokens; need 1..max_seq_len ({self.max_seq_len})")
            self.prompt_logprobs_reset()
        elif start != self._logprob_fed:
            raise ValueError(f"a part from {start}, but {self._logprob_fed} tokens are fed")
        if not start < end <= t:
            raise ValueError(f"part {start}..{end} of a {t}-token prompt")
        seq = self.max_slots
        out: list[TokenLogprob] = []
        try:
            for a in range(start, end, LOGPROB_ROWS):
                b = min(a + LOGPROB_ROWS, end)
                n = self._run([(prompt_ids[p], p, seq, p < t - 1) for p in range(a, b)])
                self._logprob_fed = b
                if n:
                    rows = self._logits(n)
                    targets = prompt_ids[a + 1 : a + 1 + n]
                    out += prompt_logprobs_from(functools.partial(_rows, rows), targets, top_n)
        except BaseException:
            self.prompt_logprobs_reset()
            raise
        if end == t:
            self.prompt_logprobs_reset()
        return out

    def prompt_logprobs_reset(self) -> None:
        self.lc.llama_memory_seq_rm(self._mem, self.max_slots, -1, -1)
        self._logprob_fed = 0

    def kv_bytes_per_slot(self) -> int:
        """K and V (float32 or float16, see __init__) for max_seq_len tokens."""
        return 2 * self._n_layers * self._kv_dim * self.max_seq_len * self._kv_bytes

    # ------------------------------------------------------------------ checks

    def _check_prompt(self, slot: int, token_ids: list[int]) -> None:
        """Refuse a prefill of a bad slot, an empty or too long prompt, or a bad token id."""
        self._check_slot(slot)
        t = len(token_ids)
        if not 0 < t <= self.max_seq_len:
            raise ValueError(f"prompt has {t} tokens; need 1..max_seq_len ({self.max_seq_len})")
        self._check_ids(token_ids)

    def _check_slot(self, slot: int) -> None:
        check_slot(slot, self.max_slots)

    def _check_ids(self, token_ids: list[int]) -> None:
        check_ids(token_ids, self.vocab_size)


_GGML_LOG_ERROR = 4


def pool_cells(max_slots: int, max_seq_len: int, per_token: int, pool_bytes: int | None) -> int:
    """Cells for the slots: one full context each, or fewer when `pool_bytes` caps them.

    Raises:
        ValueError: the cap cannot hold even one sequence of `max_seq_len`.
    """
    cells = max_slots * max_seq_len
    if pool_bytes is None:
        return cells
    cells = min(cells, pool_bytes // per_token)
    if cells < max_seq_len:
        raise ValueError(
            f"a KV pool of {pool_bytes / 2**20:.0f} MiB holds {cells} tokens, less than one "
            f"sequence of {max_seq_len}; raise --kv-cache-mb or lower --max-seq-len"
        )
    return cells


def split_passes(counts: list[int], ubatch: int) -> list[int]:
    """Tokens in each pass of llama.cpp's split cache (`llama_batch_allocr::split_equal`,
    sequential) over per-slot token counts of consecutive slots: each pass takes the same
    number of tokens from every slot of the first unbroken run of slots that have some
    left, at most `ubatch` tokens in all. Hand-written: llama.cpp exposes no dry run."""
    left = list(counts)
    out: list[int] = []
    while True:
        i = next((j for j, n in enumerate(left) if n > 0), None)
        if i is None:
            return out
        j = i
        while j + 1 < len(left) and left[j + 1] > 0:
            j += 1
        width = j - i + 1
        take = max(1, min(*left[i : j + 1], ubatch // width))
        for s in range(i, j + 1):
            left[s] -= take
        out.append(width * take)


def fill_batch(batch: Any, entries: list[tuple[int, int, int, bool]], capacity: int) -> None:
    """Write (token, position, sequence, wants logits) entries into a `llama_batch` made by
    `llama_batch_init(capacity, 0, ...)`, refusing more than it holds: ctypes would write
    past the buffer and corrupt the heap."""
    if len(entries) > capacity:
        raise ValueError(f"{len(entries)} tokens in one llama_decode > {capacity}")
    for i, (tok, pos, seq, want) in enumerate(entries):
        batch.token[i] = tok
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq
        batch.logits[i] = want
    batch.n_tokens = len(entries)


def _rows(block: torch.Tensor, a: int, b: int) -> torch.Tensor:
    return block[a:b]


def _set_field(struct: Any, name: str, value: Any) -> None:
    """Set a ctypes struct field, refusing a name the struct lacks: plain attribute
    assignment on a ctypes Structure creates a Python attribute that llama.cpp never sees."""
    if name not in {f[0] for f in type(struct)._fields_}:
        raise AttributeError(f"{type(struct).__name__} has no field {name!r} in this llama.cpp")
    setattr(struct, name, value)


@functools.cache  # one callback for the process, kept alive: llama.cpp holds the pointer
def _log_callback() -> Any:
    """llama.cpp logs every load at INFO to stderr; keep only its errors, in our log."""
    import llama_cpp as lc

    def forward(level: int, text: bytes, _user: Any) -> None:
        if level == _GGML_LOG_ERROR:
            log.error("llama.cpp: %s", text.decode(errors="replace").rstrip())

    return lc.llama_log_callback(forward)
