"""Training tokens/s: gptgen against Hugging Face transformers' GPT2LMHeadModel, same config, batch and block.

Both run the same loop (gptgen.train.optimizer_step) on random tokens with 2 threads. gptgen uses its
defaults (bf16 autocast where the CPU has bf16, torch.compile for micro-batches >= 512 tokens, fused
AdamW). transformers runs as a user would write it (fp32, torch AdamW defaults), and also with the same
bf16 autocast and fused AdamW as gptgen, so the ratio to the strongest peer setting is shown too; the
gptgen-muon row is gptgen with `--optimizer muon`, for the price of its orthogonalization. All rows
run in a process that keeps its freed memory, as `gptgen train`'s does (`gptgen.device.keep_freed_memory`),
so the ratios compare the models and loops, not the allocator.

    python benchmarks/train.py [--steps 6] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import time

import torch
from report import emit, hf_gpt2

from gptgen.config import GPTConfig, TrainConfig
from gptgen.device import allow_tf32, autocast_for, keep_freed_memory
from gptgen.model import GPT
from gptgen.optim import make_optimizer
from gptgen.train import RegionalCompile, optimizer_step, use_compile

CASES = [("small", 8, 256), ("gpt2", 4, 32)]  # (preset, batch, block): a 6-layer preset, and the seed's recipe


class HFAdapter(torch.nn.Module):
    """transformers' model behind gptgen's (logits, loss) = model(x, y) call."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.hf = hf_gpt2(config, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)

    def forward(self, x, y):
        out = self.hf(input_ids=x, labels=x)  # as users call it: transformers shifts the labels itself
        return out.logits, out.loss


def measure(system: str, preset: str, batch: int, block: int, steps: int, grad_checkpoint: bool = False,
            device: str = "cpu", vocab: int | None = None) -> dict:
    """Median seconds per optimizer step (and, on CUDA, the peak of allocated GPU memory). vocab: the tokens
    drawn from the first this many ids and gptgen's head trimmed to them, as --trim-vocab trims it on a text
    that has as many (default: the whole vocabulary, untrimmed)."""
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

    t = time.perf_counter()
    step()
    step()  # compile and allocator warm-up
    warmup = time.perf_counter() - t
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    median = statistics.median(times)
    row = {"system": system, "preset": preset, "batch": batch, "block": block, "device": str(device),
           "params": sum(p.numel() for p in model.parameters()), "s_per_step": median,
           "tokens_per_s": batch * block / median, "warmup_s": warmup, "vocab": high}
    if device.type == "cuda":
        row["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6, help="timed steps per row (median reported)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    rows = [measure(system, *case, args.steps) for case in CASES
            for system in ("gptgen", "gptgen-muon", "transformers-fp32", "transformers-bf16")]
    print(f"training throughput, {args.threads} threads, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}")
    print(f"{'preset':8} {'batch x block':>13} {'system':20} {'s/step':>8} {'tokens/s':>9} {'vs HF fp32':>10} "
          f"{'vs HF bf16':>10}")
    for row in rows:
        same = {r["system"]: r for r in rows if (r["preset"], r["block"]) == (row["preset"], row["block"])}
        row["ratio_vs_hf_fp32"] = row["tokens_per_s"] / same["transformers-fp32"]["tokens_per_s"]
        row["ratio_vs_hf_bf16"] = row["tokens_per_s"] / same["transformers-bf16"]["tokens_per_s"]
        print(f"{row['preset']:8} {row['batch']:>5} x {row['block']:<5} {row['system']:20} {row['s_per_step']:8.3f} "
              f"{row['tokens_per_s']:9.0f} {row['ratio_vs_hf_fp32']:9.2f}x {row['ratio_vs_hf_bf16']:9.2f}x")
    emit(rows, args.json)


if __name__ == "__main__":
    main()
