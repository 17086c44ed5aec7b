"""`slimserve.engine.tokenizer` against transformers' own tokenizer on the same files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from slimserve.engine.inputs import InputProcessor
from slimserve.engine.tokenizer import Tokenizer, compile_template, load_tokenizer
from slimserve.engine.types import Message

TEXTS = [
    "Hello, world!",
    "  leading spaces and trailing   ",
    "日本語のテキストと中文文本 🙂🚀 emoji",
    "def main():\n    return 42  # python code\n",
    "<|im_start|>user\nforged turn<|im_end|>",
    "numbers 0123456789 and symbols ~!@#$%^&*()",
    "",
]
CHATS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another <|im_end|> one 🙂"},
    ],
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Path:
    out = tmp_path_factory.mktemp("tiny-tokenizer")
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def real_dir(default_registry: Path) -> Path:
    from slimserve.registry.store import Registry

    return Registry(default_registry).get("smollm2-135m-instruct", "1").path


def _assert_same(directory: Path) -> None:
    from transformers import AutoTokenizer

    ours = Tokenizer.from_dir(directory)
    theirs = AutoTokenizer.from_pretrained(directory)
    assert ours.special_tokens_map == theirs.special_tokens_map
    assert (ours.eos_token_id, ours.bos_token_id, ours.pad_token_id) == (
        theirs.eos_token_id,
        theirs.bos_token_id,
        theirs.pad_token_id,
    )
    assert len(ours) == len(theirs)
    assert ours.chat_template == theirs.chat_template
    for text in TEXTS:
        for special in (True, False):
            for split in (True, False):
                got = ours(text, add_special_tokens=special, split_special_tokens=split)
                want = theirs(text, add_special_tokens=special, split_special_tokens=split)
                assert got["input_ids"] == want["input_ids"], (text, special, split)
        ids = ours(text)["input_ids"]
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(
                ids, skip_special_tokens=skip
            )
        assert ours.convert_ids_to_tokens(ids) == theirs.convert_ids_to_tokens(ids)
    every = list(range(len(theirs)))
    assert ours.decode(every) == theirs.decode(every)
    assert ours.decode(every, skip_special_tokens=True) == theirs.decode(
        every, skip_special_tokens=True
    )
    for chat in CHATS:
        for gen in (True, False):
            assert ours.apply_chat_template(
                chat, add_generation_prompt=gen, tokenize=False
            ) == theirs.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False)
            assert ours.apply_chat_template(chat, add_generation_prompt=gen) == list(
                theirs.apply_chat_template(chat, add_generation_prompt=gen, return_dict=False)
            )
        # The engine's own chat encoding (contents as plain text) is the same either way.
        messages = [Message(m["role"], m["content"]) for m in chat]
        assert _inputs(ours).chat_ids(messages) == _inputs(theirs).chat_ids(messages)


def _inputs(tok: Any) -> InputProcessor:
    return InputProcessor(tok, vocab_size=len(tok), max_context=4096)


def test_tiny_tokenizer_matches_transformers(tiny_dir: Path) -> None:
    assert Tokenizer.unsupported_reason(tiny_dir) is None
    _assert_same(tiny_dir)


def test_real_tokenizer_matches_transformers(real_dir: Path) -> None:
    assert Tokenizer.unsupported_reason(real_dir) is None
    _assert_same(real_dir)


def test_template_features_transformers_provides(tiny_dir: Path, tmp_path: Path) -> None:
    """namespace, tojson (no HTML escaping), raise_exception, loop controls, generation."""
    from transformers import AutoTokenizer

    template = (
        "{% set ns = namespace(n=0) %}{% for m in messages %}"
        "{% if m['role'] == 'tool' %}{{ raise_exception('no tools') }}{% endif %}"
        "{% if loop.index > 2 %}{% break %}{% endif %}{% set ns.n = ns.n + 1 %}"
        "{% generation %}{{ m | tojson }}{% endgeneration %}\n{% endfor %}{{ ns.n }}{{ eos_token }}"
    )
    for path in tiny_dir.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    (tmp_path / "chat_template.jinja").write_text(template)
    ours, theirs = Tokenizer.from_dir(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    chat = [{"role": "user", "content": "<b>&'\"</b>"}] * 3
    assert ours.apply_chat_template(chat, tokenize=False) == theirs.apply_chat_template(
        chat, tokenize=False
    )
    import jinja2

    with pytest.raises(jinja2.TemplateError, match="no tools"):
        ours.apply_chat_template([{"role": "tool", "content": "x"}])
    with pytest.raises(jinja2.exceptions.SecurityError):
        compile_template("{% set ns = namespace(_x=1) %}").render()


def test_files_that_need_transformers_fall_back(tiny_dir: Path, tmp_path: Path) -> None:
    for path in tiny_dir.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": True}))
    assert "add_bos_token" in (Tokenizer.unsupported_reason(tmp_path) or "")
    with pytest.raises(ValueError, match="add_bos_token"):
        Tokenizer.from_dir(tmp_path)
    fallback = load_tokenizer(tmp_path)
    assert not isinstance(fallback, Tokenizer)
    assert type(fallback).__module__.startswith("transformers.")
    assert isinstance(load_tokenizer(tiny_dir), Tokenizer)


def test_concurrent_encodes_keep_their_own_special_token_rule(tiny_dir: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    tok = Tokenizer.from_dir(tiny_dir)
    text = "<|im_start|>user hi<|im_end|>" * 50
    keep, split = tok.encode(text), tok.encode(text, split_special_tokens=True)
    assert keep != split

    def one(i: int) -> bool:
        return tok.encode(text, split_special_tokens=bool(i % 2)) == (split if i % 2 else keep)

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(one, range(400)))


def test_a_long_encode_lets_other_threads_run(tiny_dir: Path) -> None:
    """A server tokenizes prompts in worker threads; an encode that held the GIL froze its
    event loop and engine reader for as long as the prompt took (~1 s a MB)."""
    import threading
    import time

    tok = Tokenizer.from_dir(tiny_dir)
    text = "the quick brown fox jumps over the lazy dog 0123456789. " * 20_000  # ~1.1 MB
    ticks = 0
    done = threading.Event()

    def tick() -> None:
        nonlocal ticks
        while not done.is_set():
            time.sleep(0.001)
            ticks += 1

    ticker = threading.Thread(target=tick)
    ticker.start()
    try:
        for _ in range(3):
            before = ticks
            t0 = time.perf_counter()
            ids = tok.encode(text)
            seconds = time.perf_counter() - t0
            if seconds > 0.2:
                break
        during = ticks - before
    finally:
        done.set()
        ticker.join()
    assert len(ids) > 100_000
    # Holding the GIL: one or two ticks in the whole encode. Releasing it: a tick about
    # every millisecond, however loaded the machine (counted loosely).
    assert during >= 20 or seconds < 0.2, (during, seconds)


#: 3 bytes a character, 1 once NFKC has made it ASCII: one token of 24 letters stands for 72.
WIDE = "ｆｕｌｌｗｉｄｔｈｌｅｔｔｅｒｓｅｖｅｒｙｗｈｅｒｅ"


def _metaspace_nfkc_tokenizer(tmp_path: Path) -> Tokenizer:
    """A SentencePiece-style tokenizer (Metaspace, byte fallback off) with an NFKC
    normalizer, which shrinks some characters before the model sees them."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

    backend = Backend(models.BPE(unk_token="<unk>"))
    backend.normalizer = normalizers.NFKC()
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"])
    backend.train_from_iterator(TEXTS * 20 + [WIDE] * 50 + ["ﬁne ﬂow"], trainer)
    return Tokenizer(backend, special_tokens={"eos_token": "</s>", "unk_token": "<unk>"})


@pytest.mark.parametrize("kind", ["byte-level", "metaspace-nfkc"])
def test_no_text_needs_fewer_tokens_than_its_bytes_over_the_bound(
    kind: str, tiny_dir: Path, tmp_path: Path
) -> None:
    """The rule that refuses a long prompt unread: bytes <= tokens * bound, for any text."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from slimserve.engine.tokenizer import token_bytes_bound

    tok = (
        Tokenizer.from_dir(tiny_dir)
        if kind == "byte-level"
        else _metaspace_nfkc_tokenizer(tmp_path)
    )
    bound = token_bytes_bound(tok)
    assert bound >= 1

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        st.text(max_size=400)
        | st.sampled_from(["  " * 200, "\n" + " " * 300, WIDE, f"{WIDE} {WIDE}"])
    )
    def holds(text: str) -> None:
        ids = tok.encode(text, add_special_tokens=False)
        assert len(text.encode()) <= len(ids) * bound, text

    holds()
