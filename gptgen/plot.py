"""loss.png: train and val loss against steps, redrawn after every eval."""

from __future__ import annotations

import io
import os

from gptgen.checkpoint import atomic_write
from gptgen.config import LOG_INTERVAL


def plot_losses(rows: list[dict], path: str | os.PathLike) -> None:
    """rows: metrics.jsonl's lines; the train curve is its train-loss lines, each the mean since the one before."""
    from matplotlib.figure import Figure  # not pyplot: its backend is the process's (a notebook's), not ours to set

    evals = [r for r in rows if "val_nats_per_token" in r]
    train = [r for r in rows if "val_nats_per_token" not in r]
    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.subplots()
    ax.plot([r["step"] for r in train], [r["train_loss"] for r in train], label=f"train (mean of {LOG_INTERVAL} steps)",
            linewidth=1)
    if evals:  # none with --val-fraction 0
        ax.plot([r["step"] for r in evals], [r["val_nats_per_token"] for r in evals], label="val (whole split)",
                marker=".")
    losses = [r["train_loss"] for r in train] + [r["val_nats_per_token"] for r in evals]
    if max(losses) > 10 * min(losses):  # a run to a small target loss: its end is only readable on a log scale
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")  # a Figure of its own is freed with it: nothing for pyplot to close
    atomic_write(path, buf.getvalue())
