"""An artifact's tokenizer without transformers: `tokenizers` reading tokenizer.json, and the
chat template rendered with jinja2 the way transformers renders it.

Importing transformers costs a serving process hundreds of MB and seconds; what serving
needs of a tokenizer is encode, decode, ids to token strings, the special token ids and
the chat template. `load_tokenizer` gives a `Tokenizer` with that subset of transformers'
`PreTrainedTokenizerFast` API (same names, same results) when the files describe a
tokenizer transformers would load as a plain `tokenizers` backend, and falls back to
transformers' `AutoTokenizer` when they ask for more (a class with its own rules, bos/eos
insertion set in the config, clean-up of spaces, several named templates...).
`Tokenizer.unsupported_reason` says which; the fallback logs it.

The chat template environment is written by hand after transformers'
`utils.chat_template_utils` (a sandboxed jinja2 environment with `trim_blocks`,
`lstrip_blocks`, loop controls, a `tojson` that does not escape HTML, `raise_exception`,
`strftime_now`, a `generation` block tag), because transformers offers it only behind its
own import.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: tokenizer_class values transformers loads as a plain `tokenizers` backend from
#: tokenizer.json, with no rules of its own.
_PLAIN_CLASSES = frozenset({"TokenizersBackend", "PreTrainedTokenizerFast"})
#: tokenizer_config keys that make transformers change what tokenizer.json says.
_CHANGING_KEYS = ("add_bos_token", "add_eos_token", "add_prefix_space", "extra_special_tokens",
                  "additional_special_tokens", "tokenizer_file", "fix_mistral_regex")  # fmt: skip
#: The special token attributes transformers hands a chat template (`special_tokens_map`).
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                  "mask_token")  # fmt: skip


def _token_text(value: Any) -> str | None:
    """A special token from tokenizer_config: a string or a serialized AddedToken."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def _chat_template(directory: Path, config: Mapping[str, Any]) -> str | list[Any] | None:
    """The template as transformers finds it: chat_template.jinja, chat_template.json, or
    the config's `chat_template` (a list there means named templates)."""
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    from_json = _read_json(directory / "chat_template.json").get("chat_template")
    if from_json is not None:
        return from_json  # type: ignore[no-any-return]
    return config.get("chat_template")  # type: ignore[no-any-return]


class Tokenizer:
    """Encode, decode and chat templates over a `tokenizers.Tokenizer` (see module docstring).

    Thread-safe: `split_special_tokens` flips a flag of the backend, so encodes take a lock
    (decoding does not).
    """

    def __init__(
        self,
        backend: Any,
        *,
        special_tokens: Mapping[str, str],
        chat_template: str | None = None,
    ) -> None:
        self._tok = backend
        self._tok.encode_special_tokens = False
        self._split_lock = threading.Lock()
        #: As transformers' `special_tokens_map`: attribute -> token text.
        self.special_tokens_map = dict(special_tokens)
        self.chat_template = chat_template

    @classmethod
    def from_dir(cls, directory: Path) -> Tokenizer:
        """Read `directory`'s tokenizer.json, tokenizer_config.json and chat template.

        Raises:
            ValueError: the files need transformers (`unsupported_reason` says why).
        """
        from tokenizers import Tokenizer as Backend

        reason = cls.unsupported_reason(directory)
        if reason is not None:
            raise ValueError(f"{directory}: {reason}")
        config = _read_json(directory / "tokenizer_config.json")
        backend = Backend.from_file(str(directory / "tokenizer.json"))
        specials = {k: t for k in SPECIAL_TOKENS if (t := _token_text(config.get(k))) is not None}
        template = _chat_template(directory, config)
        return cls(backend, special_tokens=specials, chat_template=template or None)  # type: ignore[arg-type]

    @staticmethod
    def unsupported_reason(directory: Path) -> str | None:
        """Why these files need transformers to tokenize exactly as it does; None if not."""
        if not (directory / "tokenizer.json").is_file():
            return "no tokenizer.json"
        config = _read_json(directory / "tokenizer_config.json")
        cls = config.get("tokenizer_class")
        if cls not in _PLAIN_CLASSES:
            return f"tokenizer_class {cls!r} has rules of its own in transformers"
        changing = [k for k in _CHANGING_KEYS if k in config]
        if changing:
            return f"tokenizer_config sets {', '.join(changing)}"
        if config.get("clean_up_tokenization_spaces"):
            return "clean_up_tokenization_spaces is set"
        if config.get("split_special_tokens"):
            return "split_special_tokens is set"
        template = _chat_template(directory, config)
        if template is not None and not isinstance(template, str):
            return "several named chat templates"
        spec = _read_json(directory / "tokenizer.json")
        if spec.get("post_processor") is None:
            return "tokenizer.json has no post-processor (transformers builds one)"
        added = {a.get("content") for a in spec.get("added_tokens", [])}
        for key in SPECIAL_TOKENS:
            text = _token_text(config.get(key))
            if text is not None and text not in added:
                return f"{key} {text!r} is not an added token of tokenizer.json"
        return None

    # ---- token ids ----------------------------------------------------------------------
    def token_id(self, key: str) -> int | None:
        text = self.special_tokens_map.get(key)
        return None if text is None else self._tok.token_to_id(text)

    @property
    def eos_token_id(self) -> int | None:
        return self.token_id("eos_token")

    @property
    def bos_token_id(self) -> int | None:
        return self.token_id("bos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self.token_id("pad_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens_map.get("eos_token")

    def __len__(self) -> int:
        """Vocabulary size with added tokens (as `len()` of a transformers tokenizer)."""
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    # ---- encode / decode ----------------------------------------------------------------
    def encode(
        self, text: str, add_special_tokens: bool = True, split_special_tokens: bool = False
    ) -> list[int]:
        """Token ids of `text`; `split_special_tokens` encodes special token text as text."""
        # Every encode holds the lock: the flag is the backend's, so an encode on another
        # thread while it is flipped would split special tokens it should keep.
        with self._split_lock:
            if not split_special_tokens:
                return self._encode(text, add_special_tokens)
            self._tok.encode_special_tokens = True
            try:
                return self._encode(text, add_special_tokens)
            finally:
                self._tok.encode_special_tokens = False

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        # `encode_batch` releases the GIL while it works and `encode` does not: a 1 MB
        # prompt held every other thread of the process (a server's event loop, its
        # engine reader) for ~1 s through `encode`, and for no time through this.
        (encoding,) = self._tok.encode_batch([text], add_special_tokens=add_special_tokens)
        return list(encoding.ids)

    def __call__(
        self, text: str, add_special_tokens: bool = True, split_special_tokens: bool = False
    ) -> dict[str, list[int]]:
        """As a transformers tokenizer called on one string: {"input_ids": [...]}."""
        return {"input_ids": self.encode(text, add_special_tokens, split_special_tokens)}

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str | None]:
        return [self._tok.id_to_token(int(i)) for i in ids]

    # ---- chat ---------------------------------------------------------------------------
    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render the chat template as transformers does; its token ids when `tokenize`
        (special tokens parsed, none added).

        Raises:
            ValueError: the tokenizer has no chat template.
            ImportError: jinja2 is not installed.
            jinja2.TemplateError: the template refused the messages.
        """
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template")
        chat = [{k: v for k, v in dict(m).items() if v is not None} for m in messages]
        text = compile_template(self.chat_template).render(
            messages=chat,
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **{**self.special_tokens_map, **kwargs},
        )
        return self.encode(text, add_special_tokens=False) if tokenize else str(text)


def token_bytes_bound(tok: Any) -> int:
    """Input bytes one token can stand for at most, so that a text of more than
    `limit * token_bytes_bound(tok)` UTF-8 bytes is known to need more than `limit` tokens
    without tokenizing it (a 4 MB prompt is refused at once, not after seconds of work).

    Two upper bounds per entry, the smaller kept: the entry's own spelling in UTF-8 bytes
    (a byte-level entry spells each byte as a character of one byte or more, a
    SentencePiece "▁" of 3 bytes stands for one space, a byte-fallback "<0x0A>" for one
    byte), and its decoded text plus one byte (a byte-level decode is exact but for stray
    bytes of a split character, each becoming a 3-byte U+FFFD; a SentencePiece decode drops
    at most one leading space). A normalizer can shrink the text first (NFKC makes a
    3-byte "Ａ" an "A"), so with one the bound counts characters: times 4, the most bytes of
    one character.
    """
    size = len(tok)
    backend = getattr(tok, "_tok", None) or getattr(tok, "backend_tokenizer", None)
    if backend is None:  # a tokenizer of transformers' own, with rules we cannot see
        spelled = tok.convert_ids_to_tokens(list(range(size)))
        return 4 * max((len(t.encode()) for t in spelled if t), default=1)
    ids = [[i] for i in range(size)]
    spelled = [backend.id_to_token(i) or "" for i in range(size)]
    decoded = backend.decode_batch(ids, skip_special_tokens=False)
    longest = max(
        min(len(a.encode()), len(b.encode()) + 1) for a, b in zip(spelled, decoded, strict=True)
    )
    return max(longest, 1) * (4 if backend.normalizer is not None else 1)


def load_tokenizer(directory: Path) -> Any:
    """A `Tokenizer` for `directory`, or transformers' `AutoTokenizer` where its files need
    transformers (logged with the reason)."""
    reason = Tokenizer.unsupported_reason(directory)
    if reason is None:
        return Tokenizer.from_dir(directory)
    log.info("tokenizer of %s through transformers: %s", directory, reason)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


@functools.lru_cache(maxsize=16)
def compile_template(source: str) -> Any:
    """`source` compiled in the sandboxed environment transformers renders chat templates in."""
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` renders its body (transformers uses it to
        mark assistant tokens, which serving never asks for)."""

        tags = {"generation"}  # noqa: RUF012 - jinja2 declares it a set

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            call = self.call_method("_body")
            return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return str(caller())

    class Namespace(jinja2.utils.Namespace):
        """jinja2's namespace, refusing underscore names (as transformers does)."""

        def __init__(*args: Any, **kwargs: Any) -> None:
            self, rest = args[0], args[1:]
            attrs = dict(*rest, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name: object) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates cannot store underscore attributes on a namespace: {name!r}"
                )

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: Any = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    class TemplateDict:
        """`dict(...)` and `dict.fromkeys(...)` for templates, and no way to the type itself."""

        def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
            return dict(*args, **kwargs)

        def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
            return dict.fromkeys(*args, **kwargs)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = Namespace
    return env.from_string(source)
