"""The seed's job: the `gpt2` preset trained on the reference corpus until the train loss is below 0.1.

Each row in its own process (so peak memory is that row's own): training tokens/s and peak memory of
gptgen's step at the seed's batch 4 x block 32, and at batch 8 x block 1024 with and without gradient
checkpointing, then the first two with --trim-vocab's head (the reference text's 11,234 tokens); on CPU
(2 threads, peak RSS) or with --device cuda (peak allocated GPU memory). With --run on a CUDA machine it
also runs the job itself (`gptgen train --target-loss`) and reports the time to the
target and the card.

    python benchmarks/memorize.py [--steps 3] [--json out.json]
    python benchmarks/memorize.py --device cuda --run [--minutes 5] [--data tinyshakespeare.txt]
    python benchmarks/memorize.py --device cuda --run --no-rows --recipe-args "--lr 2e-3"   # a variant of the job
    python benchmarks/memorize.py --device cuda --run --no-rows --recipe-args "--optimizer muon --epochs 150"
    python benchmarks/memorize.py --proxy [--seeds 1,2,3]   # on CPU: steps to the target, random vs epoch windows
    python benchmarks/memorize.py --proxy --seeds 1 --variants "--steps 600" "--steps 600 --batch-size 16"

On a GPU machine that has no ../shared beside the checkout, copy the corpus next to the command and pass
--data. --proxy is a stand-in small enough for 2 CPU cores, to choose the job's flags by measurement: the
tiny preset memorizing the corpus's first 12,000 characters (3,071 train tokens, 6 steps an epoch at batch
8 x 64), per seed once with each variant's flags (default: nanoGPT's random windows, then each epoch's
windows once); a run takes a few hundred to ~1,300 steps, 2-5 minutes.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from report import CORPUS, emit, failure, status_mib

# (batch, block, gradient checkpointing, --trim-vocab); trimmed to the reference corpus's train split's tokens
TEXT_VOCAB = 11_234
ROWS = [(4, 32, False, False), (8, 1024, False, False), (8, 1024, True, False), (4, 32, False, True),
        (8, 1024, False, True)]
# The job's flags (`gptgen train ... --target-loss 0.1`): no dropout, no val split needed beyond the default.
# Batch 16 x 1024: on an H200 it reached the target in 1,933 steps and 93.2 s, batch 8 in 3,868 steps and 137.2 s
# (both at epoch ~105; a 16 x 1024 step took 38 ms, an 8 x 1024 one 33 ms: the small step is bound by launching
# kernels, the large one by the GPU). No weight decay: it pulls against fitting the text.
# No evaluation (and save) before the end: each save of model and optimizer took ~9 s on an H200 machine.
# Each epoch's windows once (--windows epoch): on --proxy, 13% fewer steps to the target than random windows with
# long cosines, and near the edge where the recipe runs the target was reached for as many seeds or more (4 of 6
# against 2 of 6 with a 100-epoch cosine, 5 of 6 each with 150) in about the same steps.
# The cosine ends at epoch 200: the text is memorized as the learning rate anneals, and a cosine cut too short
# misses (on --proxy, one 10% short of the shortest that works missed; one 1.5x longer took ~1.1x its steps). On
# --proxy batch 16 needed ~1.35x the epochs of batch 8 near that edge, so 200 = 150 x 1.35; on the H200 the target
# fell at epoch 104.9, half way, which leaves room for other seeds and cards. In epochs, not --minutes, so that
# every card runs the same schedule.
# Not yet --optimizer muon: on --proxy at batch 16 it took 0.69x AdamW's steps (150-epoch cosine against 200, 6 seeds
# of 6), but its step's cost on a GPU is not measured; it pays if below ~1.45x (the docstring's muon line checks it).
RECIPE = ["--preset", "gpt2", "--batch-size", "16", "--block-size", "1024", "--lr", "1e-3", "--dropout", "0",
          "--weight-decay", "0", "--warmup-steps", "50", "--eval-interval", "5000", "--windows", "epoch",
          "--target-loss", "0.1", "--epochs", "200"]
PROXY = ["--preset", "tiny", "--batch-size", "8", "--block-size", "64", "--lr", "3e-3", "--dropout", "0",
         "--weight-decay", "0", "--warmup-steps", "20", "--eval-interval", "100000", "--target-loss", "0.1",
         "--steps", "4000", "--compile", "off", "--device", "cpu"]
PROXY_CHARS = 12_000


def one_row(batch: int, block: int, ckpt: bool, trim: bool, steps: int, device: str, glibc_default: bool) -> dict:
    from train import measure

    from gptgen.device import keep_freed_memory

    torch.set_num_threads(2)
    if not glibc_default:
        keep_freed_memory()  # as `gptgen train` does
    row = measure("gptgen", "gpt2", batch, block, steps, grad_checkpoint=ckpt, device=device,
                  vocab=TEXT_VOCAB if trim else None)
    row["grad_checkpoint"], row["trim_vocab"] = ckpt, trim
    row["peak_rss_mib"] = status_mib("VmHWM")
    return row


def run_job(data: str, recipe: list[str]) -> dict:
    """A job: time to the target as `gptgen train` reports it (compile included). Its progress and log pass
    through as they come, so a run cut short still shows how far it got."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "gptgen", "train", "--data", data, "--out", f"{out}/run", *recipe]
        lines = []
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as p:
            for line in p.stdout:
                print(line, end="", flush=True)
                lines.append(line)
        if p.returncode:
            sys.exit(f"gptgen train exited with status {p.returncode}")
        stdout = "".join(lines)
        summary = json.loads(stdout[stdout.index("{"):])
    return {"recipe": " ".join(recipe), **summary}


def proxy(seeds: list[int], variants: list[str]) -> list[dict]:
    """The CPU stand-in: each variant (flags after PROXY's) per seed, one run after another (never two at once on
    2 cores); steps to the target, and per seed the ratio to the first variant's."""
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "proxy.txt"
        text.write_text(CORPUS.read_text(encoding="utf-8")[:PROXY_CHARS], encoding="utf-8")
        runs = [{"variant": variant, "seed": seed,
                 **run_job(str(text), [*PROXY, "--seed", str(seed), *shlex.split(variant)])}
                for seed in seeds for variant in variants]
    print(f"tiny preset memorizing {PROXY_CHARS:,} characters of the corpus, CPU, 2 threads: {' '.join(PROXY)}")
    print(f"{'variant':>36} {'seed':>5} {'steps to target':>16} {'epochs':>7} {'wall s':>7} {'vs first':>8}")
    for r in runs:
        reached = r["target_reached"]
        first = next(f for f in runs if f["seed"] == r["seed"])["target_reached"]
        r["steps_vs_first"] = reached["step"] / first["step"] if reached and first else None
        ratio = "" if r["steps_vs_first"] is None else f"{r['steps_vs_first']:.3f}"
        steps = f"{reached['step']:,}" if reached else f"no: {r['last_window_loss']:.3f} at {r['steps']:,}"
        print(f"{r['variant']:>36} {r['seed']:5d} {steps:>16} {reached['epoch'] if reached else '':>7} "
              f"{r['wall_time_s']:7.1f} {ratio:>8}")
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per row (median reported)")
    ap.add_argument("--device", default="cpu", help="where the rows run: cpu (2 threads) or cuda")
    ap.add_argument("--data", default=str(CORPUS), help="the corpus for --run")
    ap.add_argument("--run", action="store_true", help="also run the job to the target (needs CUDA)")
    ap.add_argument("--minutes", type=float, default=10.0, help="a time cap on the job (its schedule follows the "
                    "recipe's epochs while they take less)")
    ap.add_argument("--recipe-args", default="", help="`gptgen train` flags after the recipe's (the later wins)")
    ap.add_argument("--rows", action=argparse.BooleanOptionalAction, default=True, help="time the step's rows")
    ap.add_argument("--proxy", action="store_true", help="run the CPU stand-in for choosing the job's flags")
    ap.add_argument("--seeds", default="1,2", help="the stand-in's seeds")
    ap.add_argument("--variants", nargs="+", default=["--windows random", "--windows epoch"],
                    help="the stand-in's variants, each a string of `gptgen train` flags after its own")
    ap.add_argument("--glibc-default", action="store_true",
                    help="rows with glibc's default allocator, not keeping freed memory as `gptgen train` does")
    ap.add_argument("--row", help=argparse.SUPPRESS)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.row:
        print(json.dumps(one_row(*json.loads(args.row), args.steps, args.device, args.glibc_default)))
        return
    if args.proxy:
        emit({"benchmark": "memorize-proxy", "runs": proxy([int(s) for s in args.seeds.split(",")], args.variants)},
             args.json)
        return
    cuda = args.device.startswith("cuda")
    if (cuda or args.run) and not torch.cuda.is_available():
        sys.exit("--device cuda and --run need a CUDA GPU (on CPU the rows give the rate)")
    # The job first: a cold compile cache, as a user's run has.
    job = None
    if args.run:
        job = run_job(args.data, [*RECIPE, "--minutes", str(args.minutes), "--device", "cuda",
                                  *shlex.split(args.recipe_args)])
        job["card"] = torch.cuda.get_device_name()
    rows = []
    for row in ROWS if args.rows else []:  # a row that fails (out of memory, say) keeps the job's result and the rest
        r = subprocess.run([sys.executable, __file__, "--row", json.dumps(row), "--steps", str(args.steps),
                            "--device", args.device, *["--glibc-default"] * args.glibc_default],
                           capture_output=True, text=True)
        if r.returncode:
            print(r.stderr, file=sys.stderr)
            rows.append({"batch": row[0], "block": row[1], "grad_checkpoint": row[2], "trim_vocab": row[3],
                         "error": failure(r)})
        else:
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    memory = "peak_gpu_mib" if cuda else "peak_rss_mib"
    print(f"gpt2 preset (124M) training step on {torch.cuda.get_device_name() if cuda else 'CPU, 2 threads'}")
    print(f"{'batch x block':>13} {'checkpointing':>14} {'trim-vocab':>10} {'s/step':>8} {'tokens/s':>9} "
          f"{'peak GPU MiB' if cuda else 'peak RSS MiB':>13}")
    for r in rows:
        print(f"{r['batch']:>5} x {r['block']:<5} {str(r['grad_checkpoint']):>14} {str(r['trim_vocab']):>10} "
              + (f"failed: {r['error'][:80]}" if "error" in r else
                 f"{r['s_per_step']:8.2f} {r['tokens_per_s']:9.0f} {r[memory]:13.0f}"))
    result = {"benchmark": "memorize", "device": args.device, "rows": rows}
    if job:
        result["job"] = job
        reached = job.get("target_reached")
        print(f"job on {job['card']}: " + (f"train loss < 0.1 at step {reached['step']} (epoch {reached['epoch']}), "
                                           f"{reached['wall_time_s']} s" if reached else
                                           f"target not reached: the {job['stopped_by']} budget ran out "
                                           f"({job['steps']} steps)"))
    emit(result, args.json)


if __name__ == "__main__":
    main()
