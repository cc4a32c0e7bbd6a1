"""loss.png: train and val loss against tokens seen, redrawn after every eval."""

from __future__ import annotations

import io
import os

from gptgen.checkpoint import atomic_write


def plot_losses(rows: list[dict], path: str | os.PathLike) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, [r["train_loss"] for r in rows], label="train (mean since last eval)", marker=".")
    ax.plot(steps, [r["val_nats_per_token"] for r in rows], label="val (whole split)", marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write(path, buf.getvalue())
