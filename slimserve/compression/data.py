"""Offline text for calibration, training and evaluation, and its token chunks.

The machines this runs on may have no hub access, so the built-in corpus is the standard
library's ``pydoc_data.topics`` (the Python reference documentation, ~465 k characters),
split by topic key into disjoint ``train`` and ``eval`` parts. User text comes from ``.txt``
(plain text) or ``.jsonl`` (one object a line with a ``text`` field) files.

Every source carries a name and the sha256 of its text, so a manifest can record exactly
which text a perplexity was measured on.
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import torch

Split = Literal["train", "eval"]

# One topic in EVAL_BUCKETS goes to eval: ~10% of the 79 topics of CPython 3.11.
EVAL_BUCKETS = 10
# Text is tokenized in pieces of about this many characters, cut at line ends, so a
# small request does not tokenize the whole corpus.
_PIECE_CHARS = 16_384


class Tokenizer(Protocol):
    """The one tokenizer method used here; every Hugging Face tokenizer has it."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class TextSource:
    """A named text with its sha256 (hex of the UTF-8 bytes)."""

    name: str
    text: str
    digest: str


def text_source(name: str, text: str) -> TextSource:
    """``text`` under ``name``, with its sha256."""
    return TextSource(name=name, text=text, digest=hashlib.sha256(text.encode()).hexdigest())


def _split_of(key: str) -> Split:
    # A hash of the key, not of the order or count of topics: a topic stays on its side
    # when another Python version adds or drops topics.
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % EVAL_BUCKETS
    return "eval" if bucket == 0 else "train"


def pydoc_topic_keys(split: Split) -> tuple[str, ...]:
    """The sorted ``pydoc_data.topics`` keys that belong to ``split``."""
    from pydoc_data.topics import topics

    if split not in ("train", "eval"):
        raise ValueError(f"split={split!r} is not known; use 'train' or 'eval'")
    return tuple(k for k in sorted(topics) if _split_of(k) == split)


def pydoc_topics(split: Split) -> TextSource:
    """The ``train`` or ``eval`` part of the standard library's documentation topics.

    The name records the Python version (the topics change between releases), e.g.
    ``pydoc_data.topics:eval@3.11.7``; topics are joined in key order by blank lines.

    Raises:
        ValueError: ``split`` is neither ``"train"`` nor ``"eval"``.
    """
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in pydoc_topic_keys(split))
    return text_source(f"pydoc_data.topics:{split}@{platform.python_version()}", text)


def load_text_file(path: str | Path) -> TextSource:
    """Read a ``.txt`` file, or the ``text`` fields of a ``.jsonl`` file joined by blank lines.

    Raises:
        ValueError: another suffix, a line that is not a JSON object with a string ``text``,
            or a file with no text.
        OSError: the file cannot be read.
    """
    path = Path(path)
    if path.suffix not in (".txt", ".jsonl"):
        raise ValueError(f"{path}: suffix {path.suffix!r} is not supported; use .txt or .jsonl")
    raw = path.read_text(encoding="utf-8")
    text = raw if path.suffix == ".txt" else "\n\n".join(_jsonl_texts(raw, path))
    if not text.strip():
        raise ValueError(f"{path}: holds no text")
    return text_source(f"file:{path.name}", text)


def _jsonl_texts(raw: str, path: Path) -> list[str]:
    texts = []
    for lineno, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f'{path}:{lineno}: expected an object with a string "text" field')
        texts.append(record["text"])
    return texts


def _pieces(text: str) -> list[str]:
    """Cut ``text`` into pieces of about ``_PIECE_CHARS`` characters at line ends."""
    pieces, start = [], 0
    while start < len(text):
        end = text.find("\n", start + _PIECE_CHARS)
        end = len(text) if end == -1 else end + 1
        pieces.append(text[start:end])
        start = end
    return pieces


def token_chunks(tokenizer: Tokenizer, text: str, seq_len: int, max_chunks: int) -> torch.Tensor:
    """Tokenize ``text`` and cut it into at most ``max_chunks`` non-overlapping chunks.

    No special tokens are added; a trailing partial chunk is dropped. Deterministic for a
    given tokenizer and text.

    Returns:
        Token ids, int64, shape (N, seq_len) with 1 <= N <= max_chunks.

    Raises:
        ValueError: ``seq_len`` or ``max_chunks`` below 1, or text shorter than one chunk.
    """
    if seq_len < 1 or max_chunks < 1:
        raise ValueError(f"seq_len={seq_len} and max_chunks={max_chunks} must both be >= 1")
    wanted = seq_len * max_chunks
    ids: list[int] = []
    for piece in _pieces(text):
        ids.extend(tokenizer.encode(piece, add_special_tokens=False))
        if len(ids) >= wanted:
            break
    n = min(len(ids) // seq_len, max_chunks)
    if n == 0:
        raise ValueError(
            f"text gives {len(ids)} tokens, fewer than one chunk of seq_len={seq_len}; "
            "use a shorter seq_len or more text"
        )
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)
