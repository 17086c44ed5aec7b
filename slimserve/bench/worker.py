"""In-process baselines for `slimserve bench serve`, each run in its own process.

    python -m slimserve.bench.worker SYSTEM --registry DIR --model NAME@REF --threads N

reads one JSON request per line on stdin (`{"new_tokens": 128, "prompts": [...]}`) and
answers one JSON line per request with raw timings and each prompt's generated token ids
and text (or `{"error": ...}`), so the orchestrator can interleave systems without
reloading models. Every generated token gets its own arrival time, so a step that yields
several tokens counts them all. Systems:

- `hf_generate`: transformers `generate()` on the artifact's weights, streamed through a
  `TextIteratorStreamer` at concurrency 1 (what a user would write); at higher concurrency a
  left-padded batch (the streamer only takes batch 1), timed per step.
- `engine`: slimserve's own engine called in-process, without gRPC (the streaming overhead
  is slimserve's figure over this one), on the plan `serve` qualified on this machine
  (`slimserve.bench.served`), so it differs from the server by the serving alone.
- `engine_nopool`: the same without llama.cpp's persistent threadpools and threads by
  phase (`--no-ggml-threadpool`: every pass on all threads, a pool per call).
- `engine_ipc`: the same engine and plan in its own engine process, driven over the pipe
  as the server drives it, without gRPC: its figure over `engine` is the IPC's cost.
- `llama_cpp`: llama.cpp through llama-cpp-python on a GGUF file (optional dependency).
- `llama_cpp_python_chat`: llama-cpp-python's high-level `Llama` on the GGUF slimserve
  serves, with the artifact's chat template; answers `{"chat_probe": n}` only (the
  one-token chat probe's in-process peer, `LlamaCppChat`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any


class _StepTimes:
    """A generate() streamer that records when each decode step's tokens arrive."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._first = True

    def put(self, value: Any) -> None:
        if self._first:  # generate() first puts the prompt
            self._first = False
            return
        self.times.append(time.perf_counter())

    def end(self) -> None: ...


def record(
    t0: float, times: list[float], token_ids: list[int] | None = None, text: str = ""
) -> dict[str, Any]:
    """One request's figures from `times`, the arrival of each generated token (tokens
    that arrive together share a time: their inter-token latency is 0)."""
    itl = [(b - a) * 1e3 for a, b in itertools.pairwise(times)]
    return {
        "ttft_ms": (times[0] - t0) * 1e3 if times else None,
        "itl_ms": itl,
        "e2e_ms": (times[-1] - t0) * 1e3 if times else None,
        "tokens": len(times),
        "token_ids": token_ids or [],
        "text": text,
    }


class HFGenerate:
    def __init__(self, registry: Path, ref: str, device: str = "cpu") -> None:
        from slimserve.engine.loader import resolve_device, resolve_dtype
        from slimserve.registry.artifact import load_model
        from slimserve.registry.store import Registry, parse_model_ref

        # The dtype `serve --dtype auto` picks on the device: bfloat16 on CUDA, as slimserve.
        where = resolve_device(device)
        loaded, self.tok = load_model(
            Registry(registry).get(*parse_model_ref(ref)),
            device=where,
            dtype=resolve_dtype("auto", where),
        )
        self.device = where
        self.model: Any = loaded
        self.tok.padding_side = "left"
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token

    def run(self, prompts: list[str], new_tokens: int) -> dict[str, Any]:
        import torch
        from transformers import TextIteratorStreamer

        enc = self.tok(prompts, return_tensors="pt", padding=True).to(self.device)
        kwargs = dict(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        t0 = time.perf_counter()
        if len(prompts) == 1:
            streamer = TextIteratorStreamer(self.tok, skip_prompt=True)
            times: list[float] = []
            ids: list[int] = []
            orig_put = streamer.put

            def put(value: Any) -> None:  # the token's arrival, before text buffering
                if streamer.next_tokens_are_prompt is False:
                    new = value.reshape(-1).tolist()
                    times.extend([time.perf_counter()] * len(new))
                    ids.extend(new)
                orig_put(value)  # type: ignore[no-untyped-call]

            streamer.put = put  # type: ignore[method-assign]
            thread = threading.Thread(
                target=lambda: self.model.generate(**kwargs, streamer=streamer)
            )
            with torch.inference_mode():
                thread.start()
                text = "".join(streamer)
                thread.join()
            runs = [record(t0, times, ids, text)]
        else:
            steps = _StepTimes()
            with torch.inference_mode():
                self.model.generate(**kwargs, streamer=steps)
            runs = [record(t0, steps.times) for _ in prompts]
        return {"runs": runs, "wall_s": time.perf_counter() - t0}


def stream_tokens(new_tokens: int) -> int:
    """Cache cells every benchmarked system holds per stream, alike: llama.cpp's context
    gets max_batch x this (split per sequence, as `llama-server -np 16 -c 4096` gives each
    slot 256) and slimserve `--max-seq-len` this; 256, or room for longer generations."""
    return max(256, -(-(new_tokens + 128) // 256) * 256)


class InProcessEngine:
    def __init__(
        self,
        registry: Path,
        model: str,
        max_batch: int,
        backend: str = "auto",
        gguf_type: str = "auto",
        *,
        process: bool = False,
        max_seq_len: int = 1024,
        kv_layout: str = "auto",
        threadpool: bool = True,
        device: str = "cpu",
        decode_threads: int = 0,
    ) -> None:
        from slimserve.bench.served import served_selection
        from slimserve.engine.config import ModelConfig
        from slimserve.engine.frontend import Frontend
        from slimserve.engine.loader import load
        from slimserve.engine.manager import ModelManager
        from slimserve.registry.store import Registry, parse_model_ref

        name, ref = parse_model_ref(model)
        cfg = ModelConfig.of(
            device=device,
            max_batch=max_batch,
            max_seq_len=max_seq_len,
            kv_layout=kv_layout,
            backend=backend,
            gguf_type=gguf_type,
            engine_process=process,
            decode_threads=decode_threads,  # 0: qualification's choice, as `serve`
        )
        if not threadpool:  # as `serve --no-ggml-threadpool --decode-threads <threads>`
            import torch

            cfg = cfg.replace(ggml_threadpool=False, decode_threads=torch.get_num_threads())
        if process:  # the manager qualifies (or reads the verdicts) as `serve` does
            self.engine: Any = ModelManager(Registry(registry), cfg).load(name, ref).engine
        else:
            artifact, sel = served_selection(registry, model, cfg)
            plan, refused = (sel.plan, sel.refused) if sel is not None else (None, None)
            local = load(artifact, cfg, plan=plan, refused=refused)
            if sel is not None:  # what `serve` reports: qualification's figures
                local.engine.info = local.engine.info.replace(measured=dict(sel.measured))
            self.engine = Frontend.of(local)

    @property
    def served(self) -> str:
        """The serving plan in words (the one `serve` qualified on this machine)."""
        info = self.engine.info
        threads = info.measured.get("decode_threads")
        decode = f", single-sequence decode on {threads:.0f} threads" if threads else ""
        return f"{info.plan} ({info.kernels}{decode})"

    def run(self, prompts: list[str], new_tokens: int) -> dict[str, Any]:
        from slimserve.engine.types import GenerationRequest, Prompt, SamplingParams, StopParams

        # Sinks run on the engine thread: they must never block it.
        done = threading.Event()
        remaining = [len(prompts)]
        lock = threading.Lock()
        times: list[list[float]] = [[] for _ in prompts]
        generated: list[list[int]] = [[] for _ in prompts]
        texts: list[list[str]] = [[] for _ in prompts]
        errors: list[str] = []

        def sink(i: int) -> Any:
            def on_event(ev: Any) -> None:
                if ev.token_ids:
                    times[i].extend([time.perf_counter()] * len(ev.token_ids))
                    generated[i].extend(ev.token_ids)
                texts[i].append(ev.text)
                if ev.error is not None:
                    errors.append(f"{type(ev.error).__name__}: {ev.error}")
                if ev.finish is not None or ev.error is not None:
                    with lock:
                        remaining[0] -= 1
                        if remaining[0] == 0:
                            done.set()

            return on_event

        t0 = time.perf_counter()
        for i, p in enumerate(prompts):
            req = GenerationRequest(
                request_id=str(i),
                prompt=Prompt(text=p),
                sampling=SamplingParams(),
                stopping=StopParams(max_new_tokens=new_tokens, ignore_eos=True),
            )
            self.engine.submit(req, sink(i))
        done.wait()
        wall = time.perf_counter() - t0
        if errors:
            return {"error": errors[0]}
        runs = [
            record(t0, t, g, "".join(x)) for t, g, x in zip(times, generated, texts, strict=True)
        ]
        return {"runs": runs, "wall_s": wall}


class LlamaCpp:
    """llama.cpp through llama-cpp-python's low-level API: one context, up to 16 sequences.

    Prompts are prefilled in one batch and decoded together (llama.cpp's own batched
    decode), greedy with EOS masked so every system generates the same number of tokens.
    """

    def __init__(self, gguf: Path, threads: int, max_seqs: int = 16, seq_tokens: int = 256) -> None:
        import llama_cpp as lc

        self.lc = lc
        lc.llama_backend_init()
        self.model = lc.llama_model_load_from_file(
            str(gguf).encode(), lc.llama_model_default_params()
        )
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        params = lc.llama_context_default_params()
        params.n_ctx = max_seqs * seq_tokens  # kv_unified off: seq_tokens cells per sequence
        params.n_batch = 1024
        params.n_ubatch = 1024
        params.n_seq_max = max_seqs
        params.n_threads = threads
        params.n_threads_batch = threads
        self.ctx = lc.llama_init_from_model(self.model, params)
        self.served = f"llama.cpp on {gguf.name}"
        self.vocab = lc.llama_model_get_vocab(self.model)
        self.n_vocab = lc.llama_vocab_n_tokens(self.vocab)
        self.eos = lc.llama_vocab_eos(self.vocab)
        self.batch_tokens = 1024
        self.batch = lc.llama_batch_init(self.batch_tokens, 0, max_seqs)
        self.run(["warm up"], 4)

    def _tokenize(self, text: str) -> list[int]:

        raw = text.encode()
        buf = (self.lc.llama_token * (len(raw) + 8))()
        n = self.lc.llama_tokenize(self.vocab, raw, len(raw), buf, len(buf), True, False)
        return list(buf[: max(n, 0)])

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        from slimserve.engine.backends.llamacpp import fill_batch

        fill_batch(self.batch, entries, self.batch_tokens)
        if self.lc.llama_decode(self.ctx, self.batch) != 0:
            raise RuntimeError("llama_decode failed")

    def _text(self, ids: list[int]) -> str:
        import ctypes

        buf = (ctypes.c_char * 256)()
        pieces = b""
        for tok in ids:
            n = self.lc.llama_token_to_piece(self.vocab, tok, buf, len(buf), 0, False)
            pieces += buf.raw[: max(n, 0)]
        return pieces.decode(errors="replace")

    def _greedy(self, i: int) -> int:
        import numpy as np

        ptr = self.lc.llama_get_logits_ith(self.ctx, i)
        logits = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()
        logits[self.eos] = -np.inf
        return int(logits.argmax())

    def run(self, prompts: list[str], new_tokens: int) -> dict[str, Any]:
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)
        toks = [self._tokenize(p) for p in prompts]
        t0 = time.perf_counter()
        entries: list[tuple[int, int, int, bool]] = []
        out_index: list[int] = []
        for seq, ids in enumerate(toks):
            for at, tok in enumerate(ids):
                entries.append((tok, at, seq, at == len(ids) - 1))
            out_index.append(len(entries) - 1)
        self._decode(entries)
        now = time.perf_counter()
        last = [self._greedy(i) for i in out_index]
        times: list[list[float]] = [[now] for _ in prompts]
        out: list[list[int]] = [[t] for t in last]
        pos = [len(ids) for ids in toks]
        for _ in range(new_tokens - 1):
            self._decode([(last[s], pos[s], s, True) for s in range(len(prompts))])
            now = time.perf_counter()
            last = [self._greedy(s) for s in range(len(prompts))]
            for s in range(len(prompts)):
                pos[s] += 1
                times[s].append(now)
                out[s].append(last[s])
        wall = time.perf_counter() - t0
        runs = [record(t0, t, o, self._text(o)) for t, o in zip(times, out, strict=True)]
        return {"runs": runs, "wall_s": wall}


class LlamaCppChat:
    """What a llama-cpp-python user writes for a chat completion: `Llama` on a GGUF file,
    `create_chat_completion` with the model's chat template, in this process.

    `Llama` keeps the previous prompt's KV cells and reuses its longest common prefix (the
    chat template's header) by default, as a user gets. The template is the artifact's
    (the exported GGUF carries none), rendered the way `Llama` renders a GGUF's own.
    """

    def __init__(self, gguf: Path, template: Path | None, threads: int, n_ctx: int) -> None:
        import importlib.metadata

        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self.llm = Llama(
            model_path=str(gguf),
            n_ctx=n_ctx,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )
        if template is not None:  # as `Llama` builds the handler from GGUF metadata
            eos, bos = self.llm.token_eos(), self.llm.token_bos()
            self.llm.chat_handler = Jinja2ChatFormatter(
                template=template.read_text(),
                eos_token=self._text(eos),
                bos_token=self._text(bos),
                stop_token_ids=[eos],
            ).to_chat_handler()
        version = importlib.metadata.version("llama_cpp_python")
        self.served = f"llama-cpp-python {version} Llama in-process on {gguf.name}"
        self.prompt_tokens = 0
        self._ask("Hello")  # warm up: the servers have served the race before their probe

    def _text(self, token: int) -> str:
        return "" if token < 0 else self.llm.detokenize([token], special=True).decode()

    def _ask(self, content: str) -> None:
        out: Any = self.llm.create_chat_completion(
            messages=[{"role": "user", "content": content}], max_tokens=1, temperature=0
        )
        self.prompt_tokens = int(out["usage"]["prompt_tokens"])

    def chat_probe(self, n: int) -> dict[str, Any]:
        """`n` one-token chat completions one after another, each a new user message (the
        servers' probe questions), timed in this process: latency percentiles, ms."""
        import asyncio

        from slimserve.bench.http_load import chat_question, timed_probe

        async def one(i: int) -> None:
            self._ask(chat_question(i))

        out: dict[str, Any] = asyncio.run(timed_probe(one, n))
        return {**out, "prompt_tokens": self.prompt_tokens}


def requantize_q8_0(src: Path, dst: Path) -> Path:
    """Re-encode a GGUF file to Q8_0 with llama.cpp (lossless against a 4-bit source)."""
    import ctypes

    import llama_cpp as lc

    if dst.is_file():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    params = lc.llama_model_quantize_default_params()
    params.ftype = lc.LLAMA_FTYPE_MOSTLY_Q8_0
    params.allow_requantize = True
    tmp = dst.with_suffix(".tmp")
    if lc.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize failed for {src}")
    tmp.rename(dst)
    return dst


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m slimserve.bench.worker")
    p.add_argument(
        "system",
        choices=[
            "hf_generate",
            "engine",
            "engine_nopool",
            "engine_ipc",
            "llama_cpp",
            "llama_cpp_q8",
            "llama_cpp_python_chat",
        ],
    )
    p.add_argument("--registry", type=Path, required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--gguf", type=Path, help="llama_cpp, llama_cpp_python_chat: the GGUF file")
    p.add_argument(
        "--chat-template", type=Path, help="llama_cpp_python_chat: the model's chat template"
    )
    p.add_argument("--backend", default="auto", help="engine: slimserve's serving backend")
    p.add_argument("--gguf-type", default="auto", help="engine: llama.cpp backend weights")
    p.add_argument("--stream-tokens", type=int, default=256, help="cache cells per stream")
    p.add_argument("--kv-layout", default="auto", help="engine: serve --kv-layout")
    p.add_argument(
        "--no-ggml-threadpool", action="store_true", help="engine: serve --no-ggml-threadpool"
    )
    p.add_argument("--device", default="cpu", help="hf_generate, engine: cpu, cuda or cuda:N")
    p.add_argument("--decode-threads", type=int, default=0, help="engine: serve --decode-threads")
    args = p.parse_args(argv)
    runner: Any
    if args.system == "llama_cpp_python_chat":  # no torch in its process: llama.cpp's alone
        runner = LlamaCppChat(args.gguf, args.chat_template, args.threads, args.stream_tokens)
        return _serve(runner, args.system)
    import torch

    torch.set_num_threads(args.threads)
    if args.system == "hf_generate":
        runner = HFGenerate(args.registry, args.model, args.device)
    elif args.system in ("engine", "engine_nopool", "engine_ipc"):
        runner = InProcessEngine(
            args.registry,
            args.model,
            args.max_batch,
            args.backend,
            args.gguf_type,
            process=args.system == "engine_ipc",
            max_seq_len=args.stream_tokens,
            kv_layout=args.kv_layout,
            threadpool=not args.no_ggml_threadpool,
            device=args.device,
            decode_threads=args.decode_threads,
        )
    else:
        # llama_cpp_q8 gets the re-encoded file.
        runner = LlamaCpp(args.gguf, args.threads, args.max_batch, args.stream_tokens)
    return _serve(runner, args.system)


def _serve(runner: Any, system: str) -> int:
    """Answer the orchestrator's requests on stdin, one JSON line each: a race's run
    (`prompts`, `new_tokens`) or a chat probe (`chat_probe`: how many requests)."""
    # Memory is measured from outside, by the orchestrator, alike for every system.
    print(json.dumps({"ready": True, "served": getattr(runner, "served", system)}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        try:
            if "chat_probe" in req:
                if not hasattr(runner, "chat_probe"):
                    raise ValueError(f"{system} has no chat probe")
                out = runner.chat_probe(int(req["chat_probe"]))
            elif not hasattr(runner, "run"):
                raise ValueError(f"{system} answers chat probes only")
            else:
                out = runner.run(req["prompts"], req["new_tokens"])
        except Exception as exc:  # reported to the orchestrator as this run's error
            out = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
