"""Builders shared by tests: a tiny tokenizer and Llama, and a real server in a thread."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Multi-byte characters on purpose: streamed pieces must stay valid UTF-8.
_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "café naïve façade jalapeño über straße",
    "日本語のテキストと中文文本 🙂🚀 emoji",
    "def main(): return 42  # python code",
    "hello world, hello again; numbers 0123456789",
] * 20


def tiny_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=360,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_model(vocab_size: int, seed: int = 0, **overrides: Any) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        eos_token_id=2,
        bos_token_id=1,
        pad_token_id=0,
    )
    cfg.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    model.eval()
    return model


def publish_tiny(registry_root: Path, name: str = "tiny", seed: int = 0, **overrides: Any) -> Any:
    from slimserve.registry.artifact import publish_model
    from slimserve.registry.store import Registry

    tok = tiny_tokenizer()
    model = tiny_model(len(tok), seed=seed, **overrides)
    model.generation_config.eos_token_id = tok.eos_token_id
    return publish_model(Registry(registry_root), name, model, tok, source={"kind": "test"})


class Collector:
    """An engine sink that gathers events until the finish (or an error)."""

    def __init__(self) -> None:
        self.events: queue.Queue[Any] = queue.Queue()

    def __call__(self, event: Any) -> None:
        self.events.put(event)

    def wait(self, timeout: float = 60.0) -> list[Any]:
        out = []
        while True:
            ev = self.events.get(timeout=timeout)
            out.append(ev)
            if ev.finish is not None or ev.error is not None:
                return out


class ServerThread:
    """A real grpc.aio server on 127.0.0.1:0, run on its own event loop thread."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: Any = None
        self.port = 0

    def run(self, coro: Any, timeout: float = 600.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self, wait_ready: bool = True) -> ServerThread:
        from slimserve.server.app import build_server

        self.thread.start()
        self.server, self.port = self.run(build_server(self.config))
        if wait_ready:
            self.wait_ready()
        return self

    def wait_ready(self) -> None:
        async def _wait() -> None:
            await asyncio.shield(self.server.ready)

        self.run(_wait())

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        # A test that drained the server itself (`server.stop(grace)`) has stopped it.
        if self.server is not None and not self.server.in_flight.closing:
            self.run(self.server.stop(0), 60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def wait_until(cond: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll `cond` until it holds; fail naming `what` after `timeout` seconds (an upper
    bound for a hung server, never a window a test relies on)."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def openai_client(server: ServerThread, timeout: float = 60, api_key: str = "-") -> Any:
    """The openai SDK's client for `server`'s OpenAI door (no retries: a test sees each
    answer)."""
    import openai

    url = f"http://127.0.0.1:{server.server.http.port}/v1"
    return openai.OpenAI(base_url=url, api_key=api_key, max_retries=0, timeout=timeout)
