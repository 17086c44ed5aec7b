from __future__ import annotations

from typing import Any

import pytest

from slimserve.engine.text import IncrementalDetokenizer, StopMatcher


@pytest.mark.parametrize(
    "text",
    ["café naïve façade", "日本語のテキスト 🙂🚀", "hello world, hello again", "über 🚀 straße"],
)
def test_incremental_pieces_are_valid_and_join_to_decode(tokenizer: Any, text: str) -> None:
    prompt = tuple(tokenizer("the quick")["input_ids"])
    ids = tokenizer(text)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, prompt)
    pieces = [detok.push(i) for i in ids] + [detok.flush()]
    for piece in pieces:
        assert "\ufffd" not in piece
        piece.encode("utf-8")  # never a lone surrogate
    assert "".join(pieces) == tokenizer.decode(ids)


def test_byte_tokens_of_one_character_are_held_until_complete(tokenizer: Any) -> None:
    # A 4-byte emoji that the tiny BPE splits into several byte tokens.
    ids = tokenizer("🙂")["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, ())
    pieces = [detok.push(i) for i in ids]
    assert pieces[-1] == "🙂"
    assert all(p == "" for p in pieces[:-1])


def _feed_all(stops: tuple[str, ...], chunks: list[str]) -> tuple[str, str]:
    m = StopMatcher(stops)
    out = "".join(m.feed(c) for c in chunks)
    if not m.matched:
        out += m.remainder()
    return out, m.matched


def test_stop_sequence_straddling_chunks() -> None:
    out, matched = _feed_all(("END",), ["abc E", "N", "D more"])
    assert (out, matched) == ("abc ", "END")


def test_earliest_stop_wins_and_prefix_is_released_when_not_matching() -> None:
    m = StopMatcher(("xyz", "b"))
    assert m.feed("ax") == "a"  # 'x' might start 'xyz'
    assert m.feed("y") == ""
    assert m.feed("q") == "xyq"
    assert m.feed("zzb") == "zz"
    assert m.matched == "b"


def test_no_stop_sequences_passes_everything() -> None:
    assert _feed_all((), ["a", "b"]) == ("ab", "")
