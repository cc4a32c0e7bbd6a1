"""The seed's job: the `gpt2` preset trained on the reference corpus until the train loss is below 0.1.

Each row in its own process (so peak memory is that row's own): training tokens/s and peak memory of
gptgen's step at the seed's batch 4 x block 32, and at batch 8 x block 1024 with and without gradient
checkpointing; on CPU (2 threads, peak RSS) or with --device cuda (peak allocated GPU memory). With --run
on a CUDA machine it also runs the job itself (`gptgen train --target-loss`) and reports the time to the
target and the card.

    python benchmarks/memorize.py [--steps 3] [--json out.json]
    python benchmarks/memorize.py --device cuda --run [--minutes 5] [--data tinyshakespeare.txt]

On a GPU machine that has no ../shared beside the checkout, copy the corpus next to the command and pass
--data.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from report import emit

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
ROWS = [(4, 32, False), (8, 1024, False), (8, 1024, True)]  # (batch, block, gradient checkpointing)
# The job's flags (`gptgen train ... --target-loss 0.1`): no dropout, no val split needed beyond the default.
# Small batches: memorizing takes updates more than tokens. No weight decay: it pulls against fitting the text.
# No evaluation (and save) before the end: each save of model and optimizer took ~9 s on an H200 machine.
RECIPE = ["--preset", "gpt2", "--batch-size", "8", "--block-size", "1024", "--lr", "1e-3", "--dropout", "0",
          "--weight-decay", "0", "--warmup-steps", "50", "--eval-interval", "5000", "--target-loss", "0.1"]


def one_row(batch: int, block: int, ckpt: bool, steps: int, device: str) -> dict:
    from train import measure

    torch.set_num_threads(2)
    row = measure("gptgen", "gpt2", batch, block, steps, grad_checkpoint=ckpt, device=device)
    row["grad_checkpoint"] = ckpt
    row["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return row


def run_job(data: str, minutes: float) -> dict:
    """The job itself, on CUDA: time to the target as `gptgen train` reports it (compile included). Its
    progress and log pass through as they come, so a run cut short still shows how far it got."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "gptgen", "train", "--data", data, "--out", f"{out}/run", *RECIPE,
               "--minutes", str(minutes), "--device", "cuda"]
        lines = []
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as p:
            for line in p.stdout:
                print(line, end="", flush=True)
                lines.append(line)
        if p.returncode:
            sys.exit(f"gptgen train exited with status {p.returncode}")
        stdout = "".join(lines)
        summary = json.loads(stdout[stdout.index("{"):])
    return {"card": torch.cuda.get_device_name(), "recipe": " ".join(RECIPE), **summary}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per row (median reported)")
    ap.add_argument("--device", default="cpu", help="where the rows run: cpu (2 threads) or cuda")
    ap.add_argument("--data", default=str(CORPUS), help="the corpus for --run")
    ap.add_argument("--run", action="store_true", help="also run the job to the target (needs CUDA)")
    ap.add_argument("--minutes", type=float, default=10.0, help="time budget of the job")
    ap.add_argument("--row", help=argparse.SUPPRESS)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.row:
        batch, block, ckpt = json.loads(args.row)
        print(json.dumps(one_row(batch, block, ckpt, args.steps, args.device)))
        return
    cuda = args.device.startswith("cuda")
    if (cuda or args.run) and not torch.cuda.is_available():
        sys.exit("--device cuda and --run need a CUDA GPU (on CPU the rows give the rate)")
    job = run_job(args.data, args.minutes) if args.run else None  # first: a cold compile cache, as a user's run
    rows = []
    for batch, block, ckpt in ROWS:
        r = subprocess.run([sys.executable, __file__, "--row", json.dumps([batch, block, ckpt]), "--steps",
                            str(args.steps), "--device", args.device], capture_output=True, text=True, check=True)
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    memory = "peak_gpu_mib" if cuda else "peak_rss_mib"
    print(f"gpt2 preset (124M) training step on {torch.cuda.get_device_name() if cuda else 'CPU, 2 threads'}")
    print(f"{'batch x block':>13} {'checkpointing':>14} {'s/step':>8} {'tokens/s':>9} "
          f"{'peak GPU MiB' if cuda else 'peak RSS MiB':>13}")
    for r in rows:
        print(f"{r['batch']:>5} x {r['block']:<5} {str(r['grad_checkpoint']):>14} {r['s_per_step']:8.2f} "
              f"{r['tokens_per_s']:9.0f} {r[memory]:13.0f}")
    result = {"benchmark": "memorize", "device": args.device, "rows": rows}
    if job:
        result["job"] = job
        reached = job.get("target_reached")
        print(f"job on {job['card']}: " + (f"train loss < 0.1 at step {reached['step']} (epoch {reached['epoch']}), "
                                           f"{reached['wall_time_s']} s" if reached else
                                           f"target not reached in {args.minutes} min ({job['steps']} steps)"))
    emit(result, args.json)


if __name__ == "__main__":
    main()
