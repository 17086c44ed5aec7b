"""In-process baselines for `slimserve bench serve`, each run in its own process.

    python -m slimserve.bench.worker SYSTEM --registry DIR --model NAME@REF --threads N

reads one JSON request per line on stdin (`{"concurrency": 4, "new_tokens": 128,
"prompts": [...]}`) and answers one JSON line per request with raw timings, so the
orchestrator can interleave systems without reloading models. Systems:

- `hf_generate`: transformers `generate()` on the artifact's weights, streamed through a
  `TextIteratorStreamer` at concurrency 1 (what a user would write); at higher concurrency a
  left-padded batch (the streamer only takes batch 1), timed per step.
- `engine`: slimserve's own engine called in-process, without gRPC (the streaming overhead
  is slimserve's figure over this one).
- `llama_cpp`: llama.cpp through llama-cpp-python on a GGUF file (optional dependency).
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


def peak_rss_mb() -> float:
    """Peak resident set size of this process (VmHWM), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


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


def _record(t0: float, times: list[float], tokens: int) -> dict[str, Any]:
    itl = [(b - a) * 1e3 for a, b in itertools.pairwise(times)]
    return {
        "ttft_ms": (times[0] - t0) * 1e3 if times else None,
        "itl_ms": itl,
        "e2e_ms": (times[-1] - t0) * 1e3 if times else None,
        "tokens": tokens,
    }


class HFGenerate:
    def __init__(self, registry: Path, ref: str) -> None:
        from slimserve.compression.artifact import load_model
        from slimserve.compression.registry import Registry, parse_model_ref

        loaded, self.tok = load_model(Registry(registry).get(*parse_model_ref(ref)))
        self.model: Any = loaded
        self.tok.padding_side = "left"
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token

    def run(self, prompts: list[str], new_tokens: int) -> dict[str, Any]:
        import torch
        from transformers import TextIteratorStreamer

        enc = self.tok(prompts, return_tensors="pt", padding=True)
        kwargs = dict(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        t0 = time.perf_counter()
        if len(prompts) == 1:
            streamer = TextIteratorStreamer(self.tok, skip_prompt=True)
            times: list[float] = []
            orig_put = streamer.put

            def put(value: Any) -> None:  # the token's arrival, before text buffering
                if streamer.next_tokens_are_prompt is False:
                    times.append(time.perf_counter())
                orig_put(value)  # type: ignore[no-untyped-call]

            streamer.put = put  # type: ignore[method-assign]
            thread = threading.Thread(
                target=lambda: self.model.generate(**kwargs, streamer=streamer)
            )
            with torch.inference_mode():
                thread.start()
                for _ in streamer:
                    pass
                thread.join()
            runs = [_record(t0, times, len(times))]
        else:
            steps = _StepTimes()
            with torch.inference_mode():
                self.model.generate(**kwargs, streamer=steps)
            runs = [_record(t0, steps.times, len(steps.times)) for _ in prompts]
        return {"runs": runs, "wall_s": time.perf_counter() - t0}


class InProcessEngine:
    def __init__(self, registry: Path, model: str, max_batch: int) -> None:
        from slimserve.compression.registry import Registry, parse_model_ref
        from slimserve.service.config import ModelConfig
        from slimserve.service.models import load

        name, ref = parse_model_ref(model)
        cfg = ModelConfig(device="cpu", max_batch=max_batch, max_seq_len=1024)
        self.loaded = load(Registry(registry).get(name, ref), cfg)

    def run(self, prompts: list[str], new_tokens: int) -> dict[str, Any]:
        from slimserve.service.types import GenerationRequest, SamplingParams, StopParams

        done = threading.Barrier(len(prompts) + 1)
        times: list[list[float]] = [[] for _ in prompts]

        def sink(i: int) -> Any:
            def on_event(ev: Any) -> None:
                if ev.token_ids:
                    times[i].append(time.perf_counter())
                if ev.finish is not None or ev.error is not None:
                    done.wait()

            return on_event

        t0 = time.perf_counter()
        for i, p in enumerate(prompts):
            ids = tuple(self.loaded.tokenizer(p)["input_ids"])
            req = GenerationRequest(
                request_id=str(i),
                prompt_ids=ids,
                sampling=SamplingParams(),
                stopping=StopParams(max_new_tokens=new_tokens, ignore_eos=True),
            )
            self.loaded.engine.submit(req, sink(i))
        done.wait()
        return {
            "runs": [_record(t0, t, len(t)) for t in times],
            "wall_s": time.perf_counter() - t0,
        }


class LlamaCpp:
    def __init__(self, gguf: Path, threads: int) -> None:
        from llama_cpp import Llama

        self.llm = Llama(
            model_path=str(gguf), n_threads=threads, n_ctx=1024, n_batch=512, verbose=False
        )

    def run(self, prompts: list[str], new_tokens: int) -> dict[str, Any]:
        if len(prompts) != 1:
            return {"error": "llama-cpp-python's high-level API decodes one sequence at a time"}
        t0 = time.perf_counter()
        times = []
        for _ in self.llm.create_completion(
            prompts[0], max_tokens=new_tokens, temperature=0.0, stream=True
        ):
            times.append(time.perf_counter())
        return {"runs": [_record(t0, times, len(times))], "wall_s": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m slimserve.bench.worker")
    p.add_argument("system", choices=["hf_generate", "engine", "llama_cpp"])
    p.add_argument("--registry", type=Path, required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--gguf", type=Path, help="llama_cpp: the GGUF file")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    runner: Any
    if args.system == "hf_generate":
        runner = HFGenerate(args.registry, args.model)
    elif args.system == "engine":
        runner = InProcessEngine(args.registry, args.model, args.max_batch)
    else:
        runner = LlamaCpp(args.gguf, args.threads)
    print(json.dumps({"ready": True, "peak_rss_mb": peak_rss_mb()}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        out = runner.run(req["prompts"], req["new_tokens"])
        out["peak_rss_mb"] = peak_rss_mb()
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
