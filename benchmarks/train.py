"""Training tokens/s: gptgen against Hugging Face transformers' GPT2LMHeadModel, same config, batch and block.

Both run the same loop (gptgen.train.optimizer_step) on random tokens with 2 threads. gptgen uses its
defaults (bf16 autocast where the CPU measures it faster, torch.compile for micro-batches >= 512 tokens,
fused AdamW). transformers runs as a user would write it (fp32, torch AdamW defaults), and also with bf16
autocast and fused AdamW, so the ratio to either peer setting is shown too; the
gptgen-muon row is gptgen with `--optimizer muon`, for the price of its orthogonalization. All rows
run in a process that keeps its freed memory, as `gptgen train`'s does (`gptgen.device.keep_freed_memory`),
so the ratios compare the models and loops, not the allocator. Each case's systems are built and warmed up
together, then take turns of a few steps each, in an order rotated each round (`in_turns`); each row is the
median of its timed steps.

    python benchmarks/train.py [--rounds 3] [--steps 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import time
from collections.abc import Callable

import torch
from report import emit, hf_gpt2

from gptgen.config import GPTConfig, TrainConfig
from gptgen.device import allow_tf32, autocast_for, keep_freed_memory
from gptgen.model import GPT
from gptgen.optim import make_optimizer
from gptgen.train import RegionalCompile, optimizer_step, use_compile

CASES = [("small", 8, 256), ("gpt2", 4, 32)]  # (preset, batch, block): a 6-layer preset, and the seed's recipe
SYSTEMS = ["gptgen", "gptgen-muon", "transformers-fp32", "transformers-bf16"]


class HFAdapter(torch.nn.Module):
    """transformers' model behind gptgen's (logits, loss) = model(x, y) call."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.hf = hf_gpt2(config, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)

    def forward(self, x, y):
        out = self.hf(input_ids=x, labels=x)  # as users call it: transformers shifts the labels itself
        return out.logits, out.loss


def prepare(system: str, preset: str, batch: int, block: int, grad_checkpoint: bool = False, device: str = "cpu",
            vocab: int | None = None) -> tuple[Callable[[], None], dict]:
    """A system's optimizer step on random tokens, warmed up (compiled, its memory faulted in), and the fields of
    its row. vocab: the tokens drawn from the first this many ids and gptgen's head trimmed to them, as
    --trim-vocab trims it on a text that has as many (default: the whole vocabulary, untrimmed)."""
    torch.manual_seed(0)
    config = GPTConfig.from_name(preset)
    device = torch.device(device)
    allow_tf32(device)
    cfg = TrainConfig(batch_size=batch, block_size=block, optimizer="muon" if system == "gptgen-muon" else "adamw")
    if system.startswith("gptgen"):
        model = GPT(config).to(device)
        model.init_weights()
        model.grad_checkpoint = grad_checkpoint
        optimizer = make_optimizer(model, cfg, device)
        step_model = RegionalCompile(model) if use_compile(cfg, device) else model
        autocast = autocast_for(device, "auto")
    else:
        model = step_model = HFAdapter(config).to(device)
        if system == "transformers-fp32":
            optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
            autocast = contextlib.nullcontext()
        else:
            optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, fused=True)
            autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    high = vocab or config.vocab_size
    x = torch.randint(0, high, (batch, block), device=device)
    y = torch.randint(0, high, (batch, block), device=device)
    if vocab:
        model.trim_vocab(torch.arange(vocab, device=device))

    def step():
        optimizer_step(step_model, optimizer, [(x, y)], device=device, autocast=autocast, grad_clip=1.0)
        if device.type == "cuda":
            torch.cuda.synchronize()

    warmup = timed(step) + timed(step)  # compile and allocator warm-up
    return step, {"system": system, "preset": preset, "batch": batch, "block": block, "device": str(device),
                  "precision": "bf16" if isinstance(autocast, torch.autocast) else "fp32",
                  "params": sum(p.numel() for p in model.parameters()), "warmup_s": warmup, "vocab": high}


def timed(step: Callable[[], None]) -> float:
    t = time.perf_counter()
    step()
    return time.perf_counter() - t


def row(fields: dict, times: list[float]) -> dict:
    median = statistics.median(times)
    out = {**fields, "s_per_step": median, "tokens_per_s": fields["batch"] * fields["block"] / median}
    if fields["device"].startswith("cuda"):
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated(fields["device"]) / 2**20
    return out


def measure(system: str, preset: str, batch: int, block: int, steps: int, **options) -> dict:
    """One system alone: median seconds per optimizer step (and, on CUDA, the peak of allocated GPU memory);
    options as prepare's."""
    step, fields = prepare(system, preset, batch, block, **options)
    return row(fields, [timed(step) for _ in range(steps)])


def in_turns(systems: list[str], case: tuple[str, int, int], rounds: int, steps: int) -> list[dict]:
    """Every system's row for one case. The systems are built together, then take turns, in an order rotated each
    round: a turn is one untimed step (its memory comes back into the caches after the others' turns) and
    `steps` timed ones, back to back as training runs them. This machine is shared, and a slow minute then
    falls on every system instead of one. (Turns of a single step, tried first, timed every step right after
    another model's: transformers' fp32 steps measured 1,044 tok/s instead of 1,302.)"""
    prepared = {system: prepare(system, *case) for system in systems}
    times = {system: [] for system in systems}
    for r in range(rounds):
        for system in systems[r % len(systems):] + systems[:r % len(systems)]:
            step = prepared[system][0]
            step()
            times[system] += [timed(step) for _ in range(steps)]
    return [row(prepared[system][1], times[system]) for system in systems]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="turns per system (their order rotated each round)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per turn (each row: the median of them all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    rows = [r for case in CASES for r in in_turns(SYSTEMS, case, args.rounds, args.steps)]
    print(f"training throughput, {args.threads} threads, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}")
    print(f"{'preset':8} {'batch x block':>13} {'system':20} {'precision':>9} {'s/step':>8} {'tokens/s':>9} "
          f"{'vs HF fp32':>10} {'vs HF bf16':>10}")
    for row in rows:
        same = {r["system"]: r for r in rows if (r["preset"], r["block"]) == (row["preset"], row["block"])}
        row["ratio_vs_hf_fp32"] = row["tokens_per_s"] / same["transformers-fp32"]["tokens_per_s"]
        row["ratio_vs_hf_bf16"] = row["tokens_per_s"] / same["transformers-bf16"]["tokens_per_s"]
        print(f"{row['preset']:8} {row['batch']:>5} x {row['block']:<5} {row['system']:20} {row['precision']:>9} "
              f"{row['s_per_step']:8.3f} {row['tokens_per_s']:9.0f} {row['ratio_vs_hf_fp32']:9.2f}x "
              f"{row['ratio_vs_hf_bf16']:9.2f}x")
    emit(rows, args.json)


if __name__ == "__main__":
    main()
