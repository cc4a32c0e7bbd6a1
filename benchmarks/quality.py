"""Quality per wall-clock minute: train with gptgen's recommended CPU recipe for a time budget on the
reference corpus and report val nats/char over the whole val split (comparable to character-level
models such as nanoGPT's), and the share of it spent on val tokens that the train split never holds: a
model trained on that split cannot tell them apart, and a character-level model has none.

    python benchmarks/quality.py --minutes 1.5        # the 90-second recipe
    python benchmarks/quality.py --minutes 30         # the 30-minute recipe
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from report import CORPUS, emit

from gptgen.checkpoint import load_model
from gptgen.data import load_corpus
from gptgen.device import autocast_for
from gptgen.evaluate import evaluate_corpus

# Chosen by measurement (README, "Quality per minute"): the 50,257-way head dominates small models,
# so short budgets want the narrowest model that still learns, with the head trimmed to the text's tokens (twice
# the steps in 90 s); longer ones a wider model with dropout and the heavy weight decay that a corpus seen 12
# times wants, untrimmed: trimmed, its extra steps only overfitted (README, "--trim-vocab over 30 minutes").
RECIPES = {
    "short": ["--preset", "tiny", "--batch-size", "16", "--block-size", "64", "--lr", "3e-3", "--trim-vocab"],
    "long": ["--preset", "small", "--batch-size", "16", "--block-size", "128", "--lr", "1e-3", "--dropout", "0.2",
             "--weight-decay", "1.0"],
}
GOALS = {"short": (1.5, 1.886), "long": (30, 1.47)}  # from the issue: (minutes, nats/char to beat)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=1.5)
    p.add_argument("--recipe", choices=RECIPES, help="default: short under 10 minutes, else long")
    p.add_argument("--data", default=str(CORPUS))
    p.add_argument("--out", help="run directory (default: a temporary one)")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args()
    recipe = args.recipe or ("short" if args.minutes < 10 else "long")
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or str(Path(tmp) / "run")
        eval_interval = "100000" if recipe == "short" else "200"
        cmd = [sys.executable, "-m", "gptgen", "train", "--data", args.data, "--out", out, "--minutes",
               str(args.minutes), "--eval-interval", eval_interval, *RECIPES[recipe]]
        r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if r.returncode != 0:
            sys.exit(f"training failed:\n{r.stderr[-2000:]}")
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
        rows = [r for r in rows if "val_nats_per_token" in r]  # the evals, not the train-loss lines
        unseen = unseen_tokens_share(Path(out) / "model.safetensors", args.data)  # the best eval's weights
    best = min(rows, key=lambda r: r["val_nats_per_char"])
    result = {"recipe": recipe, "flags": " ".join(RECIPES[recipe]), "minutes": args.minutes,
              "steps": rows[-1]["step"], "tokens_seen": rows[-1]["tokens_seen"],
              "train_wall_s": rows[-1]["elapsed_s"], "best_val_nats_per_char": best["val_nats_per_char"],
              "best_val_nats_per_token": best["val_nats_per_token"], "best_at_step": best["step"],
              "final_val_nats_per_char": rows[-1]["val_nats_per_char"], **unseen}
    print(f"{'recipe':8} {'budget':>8} {'steps':>7} {'tokens':>10} {'best val nats/char':>19} {'at step':>8}")
    print(f"{recipe:8} {args.minutes:6.1f}m {result['steps']:7d} {result['tokens_seen']:10,d} "
          f"{result['best_val_nats_per_char']:19.4f} {result['best_at_step']:8d}")
    print(f"val tokens the train split lacks: {unseen['unseen_val_tokens']:,} of {unseen['val_tokens']:,}, "
          f"{unseen['unseen_mean_nats']:.2f} nats each: {unseen['unseen_nats_per_char']:.4f} nats/char of the "
          f"best's {unseen['unseen_nats_per_char'] + unseen['seen_nats_per_char']:.4f}; at least "
          f"{unseen['unseen_floor_nats_per_char']:.4f} for any model trained on that split alone")
    goal_minutes, goal = GOALS[recipe]
    if args.minutes <= goal_minutes:
        verdict = "meets" if result["best_val_nats_per_char"] < goal else "misses"
        print(f"goal for {goal_minutes:g} min: < {goal} nats/char -> {verdict}")
    emit(result, args.json)


def unseen_tokens_share(model_path: Path, data: str) -> dict:
    """The best model's val loss, and the part of it on tokens that the train split never holds; scored as the
    training's evals scored it (bf16 autocast where the CPU has it, as --dtype auto), so that the two parts add
    up to the best val figure printed beside them."""
    model, _ = load_model(model_path)
    corpus = load_corpus(data)
    result, unseen = evaluate_corpus(model, corpus, block_size=model.config.block_size,
                                     autocast=autocast_for(torch.device("cpu"), "auto"))
    return {"val_tokens": result.tokens, **unseen,
            "seen_nats_per_char": result.nats_per_char - unseen["unseen_nats_per_char"]}


if __name__ == "__main__":
    main()
