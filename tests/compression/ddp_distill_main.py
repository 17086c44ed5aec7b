"""Distil a tiny seeded Llama under torchrun; the DDP test launches this script.

    python -m torch.distributed.run --standalone --nproc-per-node 2 \\
        tests/compression/ddp_distill_main.py --out DIR [--steps 6]

Every rank writes ``DIR/rank<R>.json`` (rank, world size, per-step losses); rank 0 also
writes the distilled student to ``DIR/student.safetensors``. The builders here are shared
with test_distill.py so both sides train the very same models on the very same data.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from slimserve.compression.distill import DistillConfig, distill_

VOCAB = 128
SEQ_LEN = 32


def tiny_llama(*, seed: int, layers: int = 2, init_std: float = 0.02) -> LlamaForCausalLM:
    """2-layer (by default) Llama: hidden 64, 4 heads, 2 kv heads, vocab 128, seeded."""
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=init_std,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.train(False)
    return model


def tiny_teacher(seed: int = 1) -> LlamaForCausalLM:
    """3-layer Llama whose lm_head is scaled ×10: peaked logits, far from a fresh student."""
    teacher = tiny_llama(seed=seed, layers=3)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(10.0)
    return teacher


def token_batches(*, seed: int, n: int, seq_len: int = SEQ_LEN) -> torch.Tensor:
    """(n, seq_len) int64: arithmetic progressions mod VOCAB from random starts and strides."""
    gen = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=gen)
    stride = torch.randint(1, 4, (n, 1), generator=gen)
    return (start + stride * torch.arange(seq_len)) % VOCAB


def distill_config(**overrides: Any) -> DistillConfig:
    base: dict[str, Any] = {
        "steps": 30,
        "batch_size": 4,
        "seq_len": SEQ_LEN,
        "grad_accum": 2,
        "lr": 3e-3,
        "warmup_steps": min(3, overrides.get("steps", 30)),
        "temperature": 2.0,
        "alpha": 0.8,
        "checkpoint_every": 5,
        "seed": 7,
        "log_every": 5,
    }
    return DistillConfig(**(base | overrides))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)

    teacher, student = tiny_teacher(), tiny_llama(seed=0)
    batches = token_batches(seed=3, n=64)
    config = distill_config(steps=args.steps, checkpoint_every=args.steps)
    report = distill_(student, teacher, batches, config, checkpoint_dir=args.out / "ckpt")
    rank = report.rank  # distill_ has destroyed the process group it created
    record = {"rank": rank, "world_size": report.world_size, "losses": list(report.losses)}
    (args.out / f"rank{rank}.json").write_text(json.dumps(record))
    if rank == 0:
        from safetensors.torch import save_model

        save_model(student, str(args.out / "student.safetensors"))


if __name__ == "__main__":
    main()
