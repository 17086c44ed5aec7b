"""`slimserve bench compare`: registry versions side by side, measured in one run."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def markdown(rows: list[dict[str, Any]]) -> str:
    """One row per version; ratios against the first. "served ppl" is the perplexity the
    serving backend itself computes (llama.cpp runs a GGUF re-encode of the weights)."""
    base = rows[0]
    lines = [
        "| model | perplexity | vs first | served ppl | params M | MB | decode tok/s | speed-up "
        "| TTFT ms | backend |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        speed = r.get("decode_tokens_per_s", float("nan"))
        lines.append(
            f"| {r['model']} | {r['perplexity']:.2f} | {r['perplexity'] / base['perplexity']:.3f}× "
            f"| {r.get('served_perplexity', float('nan')):.2f} | {r['parameters'] / 1e6:.1f} "
            f"| {r.get('bytes', 0) / 1e6:.0f} | {speed:.1f} | "
            f"{speed / base.get('decode_tokens_per_s', float('nan')):.2f}× | "
            f"{r.get('ttft_ms', float('nan')):.0f} | {r.get('backend', '')} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        ax.scatter(r.get("decode_tokens_per_s", 0), r["perplexity"], s=60)
        ax.annotate(r["model"], (r.get("decode_tokens_per_s", 0), r["perplexity"]),
                    textcoords="offset points", xytext=(5, 5), fontsize=8)  # fmt: skip
    ax.set_xlabel("decode tokens/s (batch 1, serving engine)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title("quality against speed")
    ax.margins(x=0.25, y=0.1)  # room for the labels
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
