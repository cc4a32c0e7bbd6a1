"""Loss over the whole validation split, every token scored once: the number a user can trust."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from gptgen.data import eval_windows


@dataclass(frozen=True)
class EvalResult:
    nats: float  # summed over all scored tokens
    tokens: int
    chars: int

    @property
    def nats_per_token(self) -> float:
        return self.nats / self.tokens

    @property
    def nats_per_char(self) -> float:
        return self.nats / self.chars

    @property
    def perplexity(self) -> float:
        return math.exp(self.nats_per_token)

    def as_dict(self) -> dict:
        return {"val_nats_per_token": self.nats_per_token, "val_perplexity": self.perplexity,
                "val_nats_per_char": self.nats_per_char, "val_tokens": self.tokens, "val_chars": self.chars}


@torch.no_grad()
def evaluate(model: torch.nn.Module, tokens: np.ndarray, chars: int, *, block_size: int, batch_size: int = 8,
             device: torch.device | str = "cpu", autocast: contextlib.AbstractContextManager | None = None,
             ) -> EvalResult:
    """Sum the loss over eval_windows(); under torch.distributed each rank takes every world-th batch."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    was_training = model.training
    model.eval()
    windows = eval_windows(tokens, block_size)
    full = [w for w in windows if len(w[0]) == block_size]
    batches = []
    for i in range(0, len(full), batch_size):
        xs, ys = zip(*full[i:i + batch_size], strict=True)
        batches.append((torch.stack(xs), torch.stack(ys)))
    batches += [(x[None], y[None]) for x, y in windows if len(x) != block_size]
    total = torch.zeros((), dtype=torch.float64, device=device)
    for x, y in batches[rank::world]:
        x, y = x.to(device), y.to(device)
        with autocast or contextlib.nullcontext():
            logits, _ = model(x)
        total += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum").double()
    if world > 1:
        dist.all_reduce(total)
    model.train(was_training)
    return EvalResult(nats=total.item(), tokens=len(tokens), chars=chars)
