"""`slimserve bench compare`: registry versions side by side, measured in one run.

Each version is measured by ``slimserve.compression.evaluate.evaluate`` against its own
parent (the manifest's ``parent``, loaded in float32): perplexity in domain (the held-out
split) and out of domain (CPython's LICENSE.txt), each with the ratio to the parent's, and
for instruct models the agreement with the parent on its held-out teacher generations (when
the registry holds them; compare only looks, it never generates). Speed and size are
compared with the first version listed.

Imports the registry and ``slimserve.compression`` inside ``measure``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from slimserve.compression.evaluate import EvaluateConfig, Generations
    from slimserve.registry.store import Artifact, Registry

_NAN = float("nan")


def measure(
    registry: Registry,
    refs: Sequence[str],
    config: EvaluateConfig,
    *,
    text: Path | None = None,
    device: str = "cpu",
) -> list[dict[str, Any]]:
    """One row of metrics per ``NAME@REF`` in `refs`, measured as `config` says, every
    version and parent on `device` (each version in its stored dtype, parents in float32).

    Besides ``evaluate``'s keys a row holds ``model`` (the ref), ``parent`` (its ref or
    None) and, when an instruct model's parent has no teacher text yet, ``agreement_note``.

    Raises:
        ModelNotFoundError: a ref (or a parent) the registry does not hold.
        IntegrityError: a version fails its checksums.
    """
    from slimserve.compression.evaluate import evaluate
    from slimserve.registry.artifact import load_model

    parents: dict[str, tuple[Artifact, Any]] = {}  # parent ref -> (artifact, float32 model)
    rows = []
    for ref in refs:
        art = _get(registry, ref)
        model, tok = load_model(art, device=device)
        parent = _parent(registry, art, parents, device)
        row: dict[str, Any] = {"model": art.ref, "parent": art.manifest.parent}
        gens = None
        if parent is not None:
            gens, note = _generations(registry, parent[0], tok, config)
            if note:
                row["agreement_note"] = note
        size = sum(int(f["size"]) for r, f in art.files.items() if r.endswith(".safetensors"))
        row |= evaluate(
            model,
            tok,
            config,
            text=text,
            model_bytes=size,
            parent=None if parent is None else parent[1],
            generations=gens,
        )
        rows.append(row)
    return rows


def _get(registry: Registry, ref: str) -> Artifact:
    from slimserve.registry.store import parse_model_ref

    return registry.get(*parse_model_ref(ref))


def _parent(
    registry: Registry, art: Artifact, cache: dict[str, tuple[Artifact, Any]], device: str
) -> tuple[Artifact, Any] | None:
    """The version's parent artifact and its float32 model, loaded once per run."""
    import torch

    from slimserve.registry.artifact import load_model

    ref = art.manifest.parent
    if not ref:
        return None
    if ref not in cache:
        parent = _get(registry, ref)
        cache[ref] = (parent, load_model(parent, device=device, dtype=torch.float32)[0])
    return cache[ref]


def _generations(
    registry: Registry, parent: Artifact, tokenizer: Any, config: EvaluateConfig
) -> tuple[Generations | None, str]:
    """The parent's held-out teacher generations (or None) and why there are none."""
    from slimserve.compression.evaluate import generations_of, is_instruct
    from slimserve.compression.teacher_data import (
        TeacherTextConfig,
        find_teacher_text,
        load_teacher_text,
    )

    if not config.agreement_rows or not is_instruct(tokenizer):
        return None, ""
    found = find_teacher_text(registry, parent, TeacherTextConfig(split="heldout"))
    if found is None:
        return None, (
            f"no teacher text of {parent.ref} yet (a recipe that distills or evaluates makes it)"
        )
    return generations_of(load_teacher_text(found), config), ""


def _ratio(value: float, base: float) -> float:
    return value / base if base and math.isfinite(base) else _NAN


def markdown(rows: list[dict[str, Any]]) -> str:
    """One row per version. "×parent": perplexity over the parent's on the same text (in
    domain: the held-out split; OOD: CPython's LICENSE.txt); "served": as the serving
    backend computes it (llama.cpp runs a GGUF re-encode of the weights); top-1 and KL:
    agreement with the parent on its held-out generations; speed against the first row."""
    base_speed = rows[0].get("decode_tokens_per_s", _NAN)
    lines = [
        "| model | parent | ppl | ×parent | OOD ppl | ×parent | served ppl | served OOD "
        "| top-1 | KL | params M | MB | decode tok/s | ×first | TTFT ms | backend |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        speed = r.get("decode_tokens_per_s", _NAN)
        cells = [
            r["model"],
            r.get("parent") or "—",
            f"{r['perplexity']:.2f}",
            f"{r.get('perplexity_ratio', _NAN):.3f}×",
            f"{r.get('ood_perplexity', _NAN):.2f}",
            f"{r.get('ood_perplexity_ratio', _NAN):.3f}×",
            f"{r.get('served_perplexity', _NAN):.2f}",
            f"{r.get('ood_served_perplexity', _NAN):.2f}",
            f"{r.get('agreement_top1', _NAN):.3f}",
            f"{r.get('agreement_kl', _NAN):.4f}",
            f"{r['parameters'] / 1e6:.1f}",
            f"{r.get('bytes', 0) / 1e6:.0f}",
            f"{speed:.1f}",
            f"{_ratio(speed, base_speed):.2f}×",
            f"{r.get('ttft_ms', _NAN):.0f}",
            r.get("backend", ""),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"{r['model']}: {r['agreement_note']}" for r in rows if r.get("agreement_note")]
    return "\n".join([*lines, "", *notes] if notes else lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Perplexity (in domain: dots; out of domain: crosses) against decode speed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        speed = r.get("decode_tokens_per_s", 0)
        (dot,) = ax.plot([speed], [r["perplexity"]], "o", ms=8)
        if "ood_perplexity" in r:
            ax.plot([speed], [r["ood_perplexity"]], "x", ms=8, color=dot.get_color())
        ax.annotate(r["model"], (speed, r["perplexity"]),
                    textcoords="offset points", xytext=(5, 5), fontsize=8)  # fmt: skip
    ax.set_xlabel("decode tokens/s (batch 1, serving engine)")
    ax.set_ylabel("perplexity (lower is better; o in domain, x out of domain)")
    ax.set_yscale("log")
    ax.set_title("quality against speed")
    ax.margins(x=0.25, y=0.1)  # room for the labels
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
