"""LlamaCppBackend against the torch LlamaBackend on a tiny model exported as float32 GGUF.

Skipped where llama-cpp-python is not installed (it is an optional extra that compiles).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from slimserve.engine.backends import llamacpp
from slimserve.engine.backends.llama import LlamaBackend
from tests.helpers import tiny_model, tiny_tokenizer

pytestmark = pytest.mark.skipif(not llamacpp.available(), reason="llama-cpp-python not installed")

ATOL = 2e-4  # float32 weights and cache in both; llama.cpp sums in a different order


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[LlamaBackend, llamacpp.LlamaCppBackend]:
    tok = tiny_tokenizer()
    model = tiny_model(len(tok), seed=3)
    out = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(out)
    return _backends(model, out, slots=3)


def _backends(
    model: Any, tokenizer_dir: Path, slots: int
) -> tuple[LlamaBackend, llamacpp.LlamaCppBackend]:
    """The torch reference and llama.cpp (f32, one pool of cells) over the same weights,
    64-token slots."""
    ref = LlamaBackend.from_model(model, max_slots=slots, max_seq_len=64, pack_weights=False)
    cpp = llamacpp.LlamaCppBackend(
        model.config, model.state_dict(), tokenizer_dir / "tokenizer.json",
        max_slots=slots, max_seq_len=64, threads=1, weight_type="f32", kv_layout="unified",
    )  # fmt: skip
    return ref, cpp


def _ids(n: int, seed: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def test_prefill_and_decode_match_the_torch_backend(
    pair: tuple[LlamaBackend, llamacpp.LlamaCppBackend],
) -> None:
    ref, cpp = pair
    prompt = _ids(9, 0, ref.vocab_size)
    torch.testing.assert_close(cpp.prefill(0, prompt), ref.prefill(0, prompt), atol=ATOL, rtol=0)
    for tok in _ids(6, 1, ref.vocab_size):
        torch.testing.assert_close(
            cpp.decode([0], [tok]), ref.decode([0], [tok]), atol=ATOL, rtol=0
        )
    ref.release(0)
    cpp.release(0)


def test_slots_joining_and_leaving_mid_batch_match_each_alone(
    pair: tuple[LlamaBackend, llamacpp.LlamaCppBackend],
) -> None:
    ref, cpp = pair
    v = ref.vocab_size
    a, b, c = _ids(5, 2, v), _ids(11, 3, v), _ids(3, 4, v)
    cpp.prefill(0, a)
    cpp.prefill(1, b)
    first = cpp.decode([0, 1], [7, 8])
    cpp.release(0)  # leaves; a new sequence takes slot 2, another reuses slot 0
    cpp.prefill(2, c)
    cpp.prefill(0, c)
    second = cpp.decode([1, 2, 0], [9, 10, 10])
    for s in (0, 1, 2):
        cpp.release(s)

    def alone(prompt: list[int], steps: list[int]) -> torch.Tensor:
        ref.prefill(0, prompt)
        out = torch.empty(0)
        for tok in steps:
            out = ref.decode([0], [tok])[0]
        ref.release(0)
        return out

    torch.testing.assert_close(first[0], alone(a, [7]), atol=ATOL, rtol=0)
    torch.testing.assert_close(first[1], alone(b, [8]), atol=ATOL, rtol=0)
    torch.testing.assert_close(second[0], alone(b, [8, 9]), atol=ATOL, rtol=0)
    torch.testing.assert_close(second[1], alone(c, [10]), atol=ATOL, rtol=0)
    torch.testing.assert_close(second[2], second[1], atol=1e-6, rtol=0)  # same history


def test_score_batch_matches_the_torch_backend(
    pair: tuple[LlamaBackend, llamacpp.LlamaCppBackend],
) -> None:
    ref, cpp = pair
    v = ref.vocab_size
    jobs = [(_ids(6 + i, 10 + i, v), [[5], [6, 7], [], _ids(3, 20 + i, v)]) for i in range(11)]
    got = cpp.score_batch(jobs)  # 11 jobs x 3 distinct rows: more than SCORE_ROWS per call
    want = ref.score_batch(jobs)
    assert [len(g) for g in got] == [4] * 11 and all(g[2] == 0.0 for g in got)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-2, rtol=0)
    # Scoring never touches a slot that is generating.
    cpp.prefill(1, jobs[0][0])
    before = cpp.decode([1], [5])
    cpp.score_batch(jobs[:3])
    cpp.release(1)
    cpp.prefill(1, jobs[0][0])
    torch.testing.assert_close(cpp.decode([1], [5]), before, atol=1e-6, rtol=0)
    cpp.release(1)


def test_batched_prefill_and_view_decode_match_one_by_one(
    pair: tuple[LlamaBackend, llamacpp.LlamaCppBackend],
) -> None:
    ref, cpp = pair
    v = ref.vocab_size
    prompts = [_ids(7, 30, v), _ids(2, 31, v), _ids(12, 32, v)]
    cpp.prefill(1, _ids(4, 33, v))  # stale content the batch must drop
    rows = cpp.prefill_batch([2, 0, 1], prompts)
    assert len(rows) == 3
    for s, (row, prompt) in enumerate(zip(rows, prompts, strict=True)):
        torch.testing.assert_close(row, ref.prefill(0, prompt), atol=ATOL, rtol=0)
        ref.release(0)
        assert row.data_ptr() != rows[(s + 1) % 3].data_ptr()
    view = cpp.decode_view([2, 0, 1], [5, 6, 7])
    assert view.shape == (3, v)
    want = []
    for prompt, tok in zip(prompts, [5, 6, 7], strict=True):
        ref.prefill(0, prompt)
        want.append(ref.decode([0], [tok])[0])
        ref.release(0)
    torch.testing.assert_close(view, torch.stack(want), atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="token ids"):  # checked before any prompt runs
        cpp.prefill_batch([0, 1], [[1, 2], [v]])
    with pytest.raises(ValueError, match="distinct"):
        cpp.prefill_batch([0, 0], [[1], [2]])
    for s in range(3):
        cpp.release(s)


def test_the_split_layout_serves_alike(
    pair: tuple[LlamaBackend, llamacpp.LlamaCppBackend], tmp_path: Path
) -> None:
    ref, unified = pair
    tok = tiny_tokenizer()
    tok.save_pretrained(tmp_path)
    model = tiny_model(len(tok), seed=3)  # the pair's weights

    def build(layout: str, pool: int | None) -> llamacpp.LlamaCppBackend:
        return llamacpp.LlamaCppBackend(
            model.config, model.state_dict(), tmp_path / "tokenizer.json", max_slots=3,
            max_seq_len=64, threads=1, weight_type="f32", kv_pool_bytes=pool, kv_layout=layout,
        )  # fmt: skip

    assert unified.kv_layout == "unified"
    split = build("split", None)
    assert split.kv_pool_tokens == 3 * 64
    v = ref.vocab_size
    prompts = [_ids(64 - 6, 40, v), _ids(5, 41, v), _ids(9, 42, v)]  # one fills its slot
    rows = split.prefill_batch([0, 1, 2], prompts)
    steps = [split.decode([0, 1, 2], [t, t + 1, t + 2]) for t in range(3, 8)]
    for s, prompt in enumerate(prompts):
        want = [ref.prefill(0, prompt)] + [ref.decode([0], [t + s])[0] for t in range(3, 8)]
        ref.release(0)
        got = [rows[s]] + [step[s] for step in steps]
        torch.testing.assert_close(torch.stack(got), torch.stack(want), atol=ATOL, rtol=0)
    split.decode([0, 1, 2], [5] * 3)  # slot 0 now holds 64 tokens: its own cells, no more
    with pytest.raises(ValueError, match="full"):
        split.decode([0], [5])
    jobs = [(_ids(6 + i, 50 + i, v), [[5], [6, 7]]) for i in range(10)]
    torch.testing.assert_close(
        torch.tensor(split.score_batch(jobs)), torch.tensor(ref.score_batch(jobs)), atol=1e-2,
        rtol=0,
    )  # fmt: skip
    with pytest.raises(ValueError, match="kv_layout"):
        build("paged", None)
    # auto: split while (3 slots + the Score rows + the held Score prompt) x 64 cells fit
    # the budget, else the pool
    per_token = (
        2
        * model.config.num_hidden_layers
        * model.config.num_key_value_heads
        * (model.config.hidden_size // model.config.num_attention_heads)
        * 4
    )
    cells = (3 + llamacpp.SCORE_ROWS + 1) * 64
    assert build("auto", cells * per_token).kv_layout == "split"
    assert build("auto", cells * per_token - 1).kv_layout == "unified"


@pytest.mark.parametrize("layout", ["split", "unified"])
def test_a_moved_sequence_decodes_as_if_it_had_never_moved(
    pair: tuple[LlamaBackend, llamacpp.LlamaCppBackend], tmp_path: Path, layout: str
) -> None:
    ref, _ = pair
    tok = tiny_tokenizer()
    tok.save_pretrained(tmp_path)
    model = tiny_model(len(tok), seed=3)  # the pair's weights
    cpp = llamacpp.LlamaCppBackend(
        model.config, model.state_dict(), tmp_path / "tokenizer.json", max_slots=3,
        max_seq_len=64, threads=1, weight_type="f32", kv_layout=layout,
    )  # fmt: skip
    assert cpp.packed_slots == (layout == "split")
    v = ref.vocab_size
    a, b = _ids(7, 60, v), _ids(11, 61, v)
    cpp.prefill_batch([0, 2], [a, b])
    cpp.decode([0, 2], [3, 4])
    cpp.release(0)
    cpp.move(2, 0)  # b's cache: from slot 2 to slot 0
    cpp.prefill(2, a)  # slot 2 reused at once, in the same pass as the copy
    got = torch.stack([cpp.decode([0, 2], [t, t])[0].clone() for t in (5, 6, 7)])
    ref.prefill(0, b)
    ref.decode([0], [4])
    want = [ref.decode([0], [t])[0].clone() for t in (5, 6, 7)]
    ref.release(0)
    torch.testing.assert_close(got, torch.stack(want), atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="cannot move"):
        cpp.move(1, 0)  # from a free slot
    with pytest.raises(ValueError, match="cannot move"):
        cpp.move(2, 0)  # onto a full one
    for s in (0, 2):
        cpp.release(s)


def test_bad_calls_are_refused(pair: tuple[LlamaBackend, llamacpp.LlamaCppBackend]) -> None:
    _, cpp = pair
    with pytest.raises(ValueError, match="out of range"):
        cpp.prefill(3, [1, 2])
    with pytest.raises(ValueError, match="max_seq_len"):
        cpp.prefill(0, [1] * 65)
    with pytest.raises(ValueError, match="token ids"):
        cpp.prefill(0, [cpp.vocab_size])
    with pytest.raises(ValueError, match="free"):
        cpp.decode([2], [1])
    with pytest.raises(ValueError, match="repeat"):
        cpp.decode([0, 0], [1, 1])
    with pytest.raises(ValueError, match="non-empty prompt"):
        cpp.score([], [[1]])


def test_kv_bytes(pair: tuple[LlamaBackend, llamacpp.LlamaCppBackend]) -> None:
    ref, cpp = pair
    assert cpp.kv_bytes_per_slot() == ref.kv_bytes_per_slot()  # both float32


def test_long_score_rows_are_split_to_fit_the_reserved_cells(
    pair: tuple[LlamaBackend, llamacpp.LlamaCppBackend],
) -> None:
    ref, cpp = pair
    cpp._score_cells = 100  # three 60-token rows cannot share one llama_decode call
    try:
        jobs = [(_ids(59, 40 + i, ref.vocab_size), [[5, 6]]) for i in range(3)]
        got, want = cpp.score_batch(jobs), ref.score_batch(jobs)
    finally:
        cpp._score_cells = max(cpp.max_seq_len, llamacpp._SCORE_CELLS)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-2, rtol=0)


def test_a_score_group_larger_than_one_batch_matches_each_label_alone(tmp_path: Path) -> None:
    tok = tiny_tokenizer()
    model = tiny_model(len(tok), seed=5, max_position_embeddings=8192)
    tok.save_pretrained(tmp_path)
    cpp = llamacpp.LlamaCppBackend(
        model.config, model.state_dict(), tmp_path / "tokenizer.json",
        max_slots=1, max_seq_len=8192, threads=1, weight_type="f32",
    )  # fmt: skip
    try:
        v = cpp.vocab_size
        prompt = _ids(600, 50, v)
        labels = [_ids(2 + i, 60 + i, v) for i in range(8)]  # 8 distinct rows: one group
        rows = sum(len(prompt) + len(label) - 1 for label in labels)
        assert rows > llamacpp._BATCH_TOKENS  # the group needs two llama_decode calls
        together = cpp.score(prompt, labels)
        alone = [cpp.score(prompt, [label])[0] for label in labels]
        with pytest.raises(ValueError, match="llama_decode"):  # never past the ctypes batch
            cpp._run([(5, p, 1, False) for p in range(llamacpp._BATCH_TOKENS + 1)])
    finally:
        cpp.close()
    assert all(s < 0 for s in together)
    torch.testing.assert_close(torch.tensor(together), torch.tensor(alone), atol=1e-4, rtol=0)


def test_a_width_and_depth_pruned_model_serves_alike_on_both_backends(tmp_path: Path) -> None:
    from slimserve.compression.prune import PruneConfig, prune_

    tok = tiny_tokenizer()
    model = tiny_model(len(tok), seed=5, num_hidden_layers=4)
    calibration = torch.tensor([_ids(32, s, len(tok)) for s in range(4)])
    config = PruneConfig(
        mlp_ratio=0.25, head_ratio=0.5, layers_removed=2, calibration_samples=4, seq_len=32
    )
    prune_(model, config, calibration)
    assert model.config.num_hidden_layers == 2 and model.config.num_attention_heads == 2
    tok.save_pretrained(tmp_path)
    ref, cpp = _backends(model, tmp_path, slots=1)
    prompt = _ids(7, 9, len(tok))
    with torch.no_grad():
        hf = model(input_ids=torch.tensor([prompt])).logits[0, -1]
    torch.testing.assert_close(ref.prefill(0, prompt), hf, atol=ATOL, rtol=0)
    torch.testing.assert_close(cpp.prefill(0, prompt), hf, atol=ATOL, rtol=0)
    step = _ids(1, 10, len(tok))
    torch.testing.assert_close(cpp.decode([0], step), ref.decode([0], step), atol=ATOL, rtol=0)


def test_odd_pruned_widths_serve_in_f32_and_are_refused_in_q8_0(tmp_path: Path) -> None:
    from slimserve.engine.backends.select import build_backend
    from slimserve.engine.config import ModelConfig

    tok = tiny_tokenizer()
    model = tiny_model(len(tok), seed=6, intermediate_size=100)  # as a pruned MLP may be
    tok.save_pretrained(tmp_path)
    tokenizer_json = tmp_path / "tokenizer.json"

    auto = build_backend(model, ModelConfig.of(device="cpu", max_batch=1), 64, tokenizer_json)
    assert auto.name == "llama.cpp-f32"
    prompt = _ids(5, 11, len(tok))
    with torch.no_grad():
        hf = model(input_ids=torch.tensor([prompt])).logits[0, -1]
    torch.testing.assert_close(auto.prefill(0, prompt), hf, atol=ATOL, rtol=0)

    q8 = ModelConfig.of(device="cpu", max_batch=1, backend="llamacpp", gguf_type="q8_0")
    with pytest.raises(ValueError, match=r"q8_0 needs .* multiples of 32.*\(64, 100, 64\)"):
        build_backend(model, q8, 64, tokenizer_json)


@pytest.mark.parametrize("extra_buffers", [True, False], ids=["extra-on", "extra-off"])
def test_q8_0_multi_slot_decode_prefill_and_score_match_the_torch_backend(
    tmp_path: Path, extra_buffers: bool
) -> None:
    # The shapes that crashed llama.cpp's repacked/AMX kernels (builds miscompiled by GCC 12):
    # multi-token prefill, every slot decoding at once and a Score group, on q8_0 weights.
    tok = tiny_tokenizer()
    model = tiny_model(len(tok), seed=5)
    tok.save_pretrained(tmp_path)
    ref = LlamaBackend.from_model(model, max_slots=4, max_seq_len=64, pack_weights=False)
    cpp = llamacpp.LlamaCppBackend(
        model.config, model.state_dict(), tmp_path / "tokenizer.json",
        max_slots=4, max_seq_len=64, threads=2, weight_type="q8_0",
        extra_buffers=extra_buffers,
    )  # fmt: skip
    assert cpp.extra_buffers is extra_buffers

    def close(a: torch.Tensor, b: torch.Tensor) -> None:
        # q8_0 rounds each weight: distributions agree, single logits move a little.
        torch.testing.assert_close(
            torch.log_softmax(a, -1), torch.log_softmax(b, -1), atol=0.05, rtol=0
        )

    prompts = [_ids(12 + 3 * s, 10 + s, ref.vocab_size) for s in range(4)]
    for s, p in enumerate(prompts):
        close(cpp.prefill(s, p), ref.prefill(s, p))
    for step in range(4):
        toks = _ids(4, 20 + step, ref.vocab_size)
        close(cpp.decode([0, 1, 2, 3], toks), ref.decode([0, 1, 2, 3], toks))
    labels = [_ids(2, 30 + k, ref.vocab_size) for k in range(9)]
    got = cpp.score_batch([(prompts[0], labels)])[0]
    want = ref.score_batch([(prompts[0], labels)])[0]
    assert got == pytest.approx(want, abs=0.1)
    cpp.close()


def test_prompt_logprobs_match_the_torch_backend_and_its_scores(
    pair: tuple[LlamaBackend, llamacpp.LlamaCppBackend],
) -> None:
    ref, cpp = pair
    prompt = _ids(20, 7, ref.vocab_size)
    want = ref.prompt_logprobs(prompt, 3)
    got = cpp.prompt_logprobs(prompt, 3)
    assert [lp.token_id for lp in got] == prompt[1:] == [lp.token_id for lp in want]
    for g, w in zip(got, want, strict=True):
        assert g.logprob == pytest.approx(w.logprob, abs=1e-3)
        assert [t for t, _ in g.top] == [t for t, _ in w.top]
    # The same figures a Score gives: the continuation's sum is the sum of its tokens.
    (total,) = ref.score(prompt[:5], [prompt[5:]])
    assert total == pytest.approx(sum(lp.logprob for lp in want[4:]), abs=1e-3)


def test_prompt_logprobs_in_parts_equal_them_whole_and_leave_nothing_behind(
    pair: tuple[LlamaBackend, llamacpp.LlamaCppBackend],
) -> None:
    ref, cpp = pair
    prompt = _ids(40, 8, ref.vocab_size)
    whole = cpp.prompt_logprobs(prompt, 2)
    parts = []
    for start, end in ((0, 1), (1, 13), (13, 39), (39, 40)):  # the last gives no entry
        parts += cpp.prompt_logprobs_part(prompt, start, end, 2)
    assert [lp.token_id for lp in parts] == prompt[1:]
    for p, w in zip(parts, whole, strict=True):
        assert p.logprob == pytest.approx(w.logprob, abs=1e-4)
        assert [t for t, _ in p.top] == [t for t, _ in w.top]
    with pytest.raises(ValueError, match="fed"):
        cpp.prompt_logprobs_part(prompt, 5, 10, 0)  # not where the last part ended
    # A prompt left part-way, then emptied: a Score after it scores as if it never ran.
    labels = [prompt[30:33], prompt[30:31]]
    before = cpp.score(prompt[:30], labels)
    cpp.prompt_logprobs_part(prompt, 0, 25, 0)
    cpp.prompt_logprobs_reset()
    assert cpp.score(prompt[:30], labels) == pytest.approx(before, abs=1e-5)
    # A new prompt from 0 starts afresh even over one left part-way.
    cpp.prompt_logprobs_part(prompt, 0, 17, 0)
    other = _ids(12, 9, ref.vocab_size)
    again = cpp.prompt_logprobs_part(other, 0, 12, 1)
    for p, w in zip(again, cpp.prompt_logprobs(other, 1), strict=True):
        assert p.logprob == pytest.approx(w.logprob, abs=1e-4)


@pytest.mark.parametrize("layout", ["unified", "split"])
def test_a_held_score_prompt_gives_the_scores_of_whole_rows(
    pair: tuple[LlamaBackend, llamacpp.LlamaCppBackend], layout: str, tmp_path: Path
) -> None:
    # Rows that start with the held prompt start from a copy of its KV (pooled: shared
    # cells; split: a copied stream) and feed only their own tokens; the figures are the
    # torch reference's either way. Mutation: feeding held rows from position 0 over the
    # copy (llama.cpp refuses it), or copying without skipping, fails here.
    ref, pooled = pair
    if layout == "unified":
        cpp = pooled
    else:
        tok = tiny_tokenizer()
        tok.save_pretrained(tmp_path)
        cpp = llamacpp.LlamaCppBackend(
            tiny_model(len(tok), seed=3).config, tiny_model(len(tok), seed=3).state_dict(),
            tmp_path / "tokenizer.json", max_slots=3, max_seq_len=64, threads=1,
            weight_type="f32", kv_layout="split",
        )  # fmt: skip
    prompt = _ids(30, 11, ref.vocab_size)
    labels = [[5, 6, 7], [9, 6], [5, 8], [12]]
    other = (_ids(20, 12, ref.vocab_size), [[5, 6], [7]])  # not held: whole rows
    want = ref.score_batch([(prompt, labels), other])
    for start, end in ((0, 10), (10, 29)):
        cpp.score_prompt_part(prompt, start, end)
    with pytest.raises(ValueError, match="fed"):
        cpp.score_prompt_part(prompt, 5, 10)  # not where the last part ended
    got = cpp.score_batch([(prompt, labels), other])
    for g, w in zip(got, want, strict=True):
        assert g == pytest.approx(w, abs=1e-3)
    # The hold stays for the next chunk of the same Score, and goes on reset.
    assert cpp.score(prompt, labels[:2]) == pytest.approx(want[0][:2], abs=1e-3)
    cpp.score_prompt_reset()
    assert cpp.lc.llama_memory_seq_pos_max(cpp._mem, cpp._prompt_seq) == -1
    assert cpp.score(prompt, labels) == pytest.approx(want[0], abs=1e-3)
    if cpp is not pooled:
        cpp.close()


def test_split_passes_follow_llamacpps_equal_split() -> None:
    split = llamacpp.split_passes
    assert split([1] * 16, 512) == [16]  # a plain step: one pass
    assert split([5] * 16, 512) == [80]  # equal drafts: one pass
    # Drafts for slots 0 and 1 only: one token from all 16, then the run of two.
    assert split([5, 5] + [1] * 14, 512) == [16, 8]
    # A slot without drafts between two with: the run breaks, a pass each.
    assert split([3, 1, 3, 1], 512) == [4, 2, 2]
    assert split([100] * 8, 512) == [512, 288]  # at most a ubatch a pass
    assert split([], 512) == []
