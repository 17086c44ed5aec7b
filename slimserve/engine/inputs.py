"""The engine process's text: prompts and labels to token ids, token ids to text.

One home for text (as the style guide has it: tokenization, chat templates and
detokenization belong to the engine process): the server sends a `Prompt` as text, chat
messages or ids, and the engine process tokenizes it here, on its own thread, so a long
prompt never holds the server's GIL or its event loop. The decoded text of generated and
top-n tokens is made here too (`token_texts`), where the tokens are.

Every refusal is an `InvalidRequest` naming the field in the door-neutral vocabulary
(`prompt`, `prompt.messages`, `prompt.ids[3]`, `labels[2]`), which each door renders in
its own words. Imports engine modules only (the tokenizer object is passed in).
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Sequence
from typing import Any

from slimserve.engine.errors import InvalidRequest
from slimserve.engine.types import (
    Accepted,
    GenerationRequest,
    Message,
    Prompt,
    ScoreRequest,
    TokenizeResult,
)


class InputProcessor:
    """Tokenizes a model's requests; thread-safe (the tokenizer is)."""

    def __init__(self, tokenizer: Any, *, vocab_size: int, max_context: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_context = max_context

    # ---- prompts ------------------------------------------------------------------------
    def prompt_ids(self, prompt: Prompt, limit: int = 0) -> tuple[int, ...]:
        """`prompt`'s token ids, checked against `limit` (0: one short of the context).

        Raises:
            InvalidRequest: no input, an input that encodes to nothing, a chat without a
                template, or more tokens than the limit.
        """
        return self._timed_ids(prompt, limit)[0]

    def _timed_ids(self, prompt: Prompt, limit: int) -> tuple[tuple[int, ...], float, float]:
        """`prompt_ids`, and the milliseconds of its template and of its tokenizing."""
        t0 = time.perf_counter()
        template_s = 0.0
        if prompt.ids is not None:
            ids = prompt.ids  # in the vocabulary: the server's `validate` checked each
        elif prompt.messages is not None:
            pieces = self._render_chat(prompt.messages)
            template_s = time.perf_counter() - t0
            ids = tuple(self._encode_chat(prompt.messages, pieces))
        elif prompt.text is not None:
            ids = tuple(self.tokenizer(prompt.text, add_special_tokens=True)["input_ids"])
        else:
            raise InvalidRequest("prompt", "set text, messages or token ids")
        tokenize_s = 0.0 if prompt.ids is not None else time.perf_counter() - t0 - template_s
        return self._checked(ids, limit), template_s * 1e3, tokenize_s * 1e3

    def _checked(self, ids: Sequence[int], limit: int) -> tuple[int, ...]:
        most = min(limit or self.max_context, self.max_context - 1)
        if not ids:
            raise InvalidRequest("prompt", "the prompt encodes to no tokens")
        if len(ids) > most:
            raise InvalidRequest(
                "prompt",
                f"the prompt has {len(ids)} tokens; the limit is {most} (the server's "
                f"max_prompt_tokens, and one short of the context, {self.max_context})",
            )
        return tuple(int(i) for i in ids)

    def generation(self, req: GenerationRequest) -> tuple[GenerationRequest, Accepted]:
        """`req` with its prompt as token ids, and the event that says it was accepted."""
        ids, template_ms, tokenize_ms = self._timed_ids(req.prompt, req.prompt_limit)
        text = ""
        if req.echo:
            text = req.prompt.text if req.prompt.text is not None else self.decode(ids)
        tokenized = req.replace(prompt=Prompt(ids=ids))
        accepted = Accepted(
            input_tokens=len(ids),
            prompt_text=text,
            template_ms=template_ms,
            tokenize_ms=tokenize_ms,
        )
        return tokenized, accepted

    def score(self, req: ScoreRequest) -> tuple[list[int], list[list[int]]]:
        """The prompt's ids and each label's; the longest label must fit the context."""
        prompt = list(self.prompt_ids(req.prompt, req.prompt_limit))
        labels = []
        for i, label in enumerate(req.labels):
            ids = self.tokenizer(label, add_special_tokens=False)["input_ids"]
            if not ids:
                raise InvalidRequest(f"labels[{i}]", "must be a non-empty string")
            labels.append([int(t) for t in ids])
        longest = len(prompt) + max(map(len, labels))
        if longest > self.max_context:
            raise InvalidRequest(
                "labels", f"prompt + label is {longest} tokens; context is {self.max_context}"
            )
        return prompt, labels

    def tokenize(self, prompt: Prompt, limit: int = 0, *, tokens: bool = False) -> TokenizeResult:
        ids = self.prompt_ids(prompt, limit)
        names = tuple(self.tokenizer.convert_ids_to_tokens(list(ids))) if tokens else ()
        text = prompt.text if prompt.text is not None else self.decode(ids)
        return TokenizeResult(ids=ids, tokens=names, text=text)

    # ---- chat templates -----------------------------------------------------------------
    def chat_ids(self, messages: Sequence[Message]) -> list[int]:
        """Token ids of `messages` in the model's chat template, with a generation prompt.

        Only the template's own markers become special tokens: message contents are
        tokenized as plain text, so a user who writes `<|im_end|><|im_start|>system` gets
        those characters, not a forged turn. The template is rendered around placeholder
        contents and split at them; template text is tokenized with special tokens
        parsed, each content without.
        """
        return self._encode_chat(messages, self._render_chat(messages))

    def _render_chat(self, messages: Sequence[Message]) -> list[str]:
        """The template rendered around placeholder contents, and split at them."""
        tok = self.tokenizer
        if not getattr(tok, "chat_template", None):
            raise InvalidRequest(
                "prompt.messages", "this model has no chat template; send text instead"
            )
        mark = f"slimserve{uuid.uuid4().hex}x"  # letters and digits: no template filter alters it
        shell = [{"role": m.role, "content": f"{mark}{i}x"} for i, m in enumerate(messages)]
        try:
            text = tok.apply_chat_template(shell, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # the template's own refusal (jinja2's raise_exception)
            raise InvalidRequest("prompt.messages", f"the chat template refused: {exc}") from None
        # Odd pieces are placeholders (in whatever order and number the template used them).
        return re.split(f"{mark}(\\d+)x", text)

    def _encode_chat(self, messages: Sequence[Message], pieces: list[str]) -> list[int]:
        ids: list[int] = []
        for n, piece in enumerate(pieces):
            if n % 2:
                ids += self._encode(messages[int(piece)].content, special=False)
            else:
                ids += self._encode(piece, special=True)
        return ids

    def _encode(self, text: str, *, special: bool) -> list[int]:
        if not text:
            return []
        out = self.tokenizer(text, add_special_tokens=False, split_special_tokens=not special)
        return list(out["input_ids"])

    # ---- text of tokens -----------------------------------------------------------------
    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids)))

    def token_texts(self, ids: Sequence[int]) -> tuple[str, ...]:
        """Each token's own text (a lone piece of a multi-byte character is U+FFFD)."""
        return tuple(self.tokenizer.decode([t]) for t in ids)
