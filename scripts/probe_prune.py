"""Dev probe: eval perplexity of a model before and after structured pruning.

    .venv/bin/python scripts/probe_prune.py --model /tmp/probe/smol

Calibrates on the pydoc ``train`` split and measures on the disjoint ``eval`` split, so the
numbers are not calibration-set perplexities. Prints one row per (ratios, importance).
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from slimserve.compression.data import pydoc_topics, token_chunks
from slimserve.compression.prune import PruneConfig, prune_


@dataclass(frozen=True, slots=True, kw_only=True)
class ProbeConfig:
    model: str
    eval_chunks: int
    calibration_chunks: int
    seq_len: int
    threads: int


def parse_args() -> ProbeConfig:
    p = argparse.ArgumentParser(description="Eval perplexity before and after pruning.")
    p.add_argument("--model", default="/tmp/probe/smol", help="Hugging Face model directory")
    p.add_argument("--eval-chunks", type=int, default=32)
    p.add_argument("--calibration-chunks", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    return ProbeConfig(
        model=a.model,
        eval_chunks=a.eval_chunks,
        calibration_chunks=a.calibration_chunks,
        seq_len=a.seq_len,
        threads=a.threads,
    )


@torch.no_grad()
def perplexity(model: torch.nn.Module, chunks: torch.Tensor, batch: int = 4) -> float:
    """exp(mean next-token NLL) over every predicted token of ``chunks`` (N, T)."""
    nll, count = 0.0, 0
    for ids in (chunks[i : i + batch] for i in range(0, len(chunks), batch)):
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1]  # (B, T-1, vocab)
        target = ids[:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1), reduction="sum"
        )
        nll += loss.item()
        count += target.numel()
    return math.exp(nll / count)


def load(path: str) -> torch.nn.Module:
    model: torch.nn.Module = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.train(False)
    return model


def row(name: str, params: int, ppl: float, t0: float) -> None:
    seconds = time.perf_counter() - t0
    print(f"{name:<34} params={params / 1e6:6.1f}M ppl={ppl:10.2f}  ({seconds:.0f}s)", flush=True)


def main() -> None:
    cfg = parse_args()
    torch.set_num_threads(cfg.threads)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    held_out, train = pydoc_topics("eval"), pydoc_topics("train")
    eval_ids = token_chunks(tokenizer, held_out.text, cfg.seq_len, cfg.eval_chunks)
    calib_ids = token_chunks(tokenizer, train.text, cfg.seq_len, cfg.calibration_chunks)
    print(f"eval: {held_out.name} sha256={held_out.digest[:12]} chunks={tuple(eval_ids.shape)}")
    print(f"calibration: {train.name} chunks={tuple(calib_ids.shape)}")

    t0 = time.perf_counter()
    base = load(cfg.model)
    n_base = sum(p.numel() for p in base.parameters())
    ppl = perplexity(base, eval_ids)
    row("base", n_base, ppl, t0)
    del base

    settings = [
        ("mlp 20%", 0.2, 0.0),
        ("mlp 20% + heads 9->6", 0.2, 1 / 3),
        ("mlp 50% + heads 9->6", 0.5, 1 / 3),
    ]
    for importance in ("activation", "taylor"):
        for label, mlp, heads in settings:
            t0 = time.perf_counter()
            model = load(cfg.model)
            config = PruneConfig(
                mlp_ratio=mlp,
                head_ratio=heads,
                importance=importance,
                calibration_samples=cfg.calibration_chunks,
                seq_len=cfg.seq_len,
            )
            report = prune_(model, config, calib_ids)
            ppl = perplexity(model, eval_ids)
            row(f"{label} [{importance}]", report.params_after, ppl, t0)


if __name__ == "__main__":
    main()
