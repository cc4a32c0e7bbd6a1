"""Loss over the whole validation split, every token scored once: the number a user can trust."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from gptgen.data import Corpus, eval_windows


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
        """exp(nats/token), infinite past a float's range (a diverged model's loss of 710+ nats/token)."""
        return math.exp(self.nats_per_token) if self.nats_per_token < 709 else math.inf

    def as_dict(self) -> dict:
        """For JSON (--json, metrics.jsonl, a model's record): an infinite perplexity is null, as strict JSON has
        no Infinity (jq and JavaScript refused the line)."""
        perplexity = self.perplexity if math.isfinite(self.perplexity) else None
        return {"val_nats_per_token": self.nats_per_token, "val_perplexity": perplexity,
                "val_nats_per_char": self.nats_per_char, "val_tokens": self.tokens, "val_chars": self.chars}

    @classmethod
    def of(cls, losses: torch.Tensor, chars: int) -> EvalResult:
        """From token_losses()."""
        return cls(nats=losses.double().sum().item(), tokens=len(losses), chars=chars)


def evaluate(model: torch.nn.Module, tokens: np.ndarray, chars: int, *, block_size: int, batch_size: int = 8,
             device: torch.device | str = "cpu", autocast: contextlib.AbstractContextManager | None = None,
             progress: bool = False) -> EvalResult:
    """The loss summed over the split (token_losses()), with what it is per token and per character."""
    return EvalResult.of(token_losses(model, tokens, block_size=block_size, batch_size=batch_size, device=device,
                                      autocast=autocast, progress=progress), chars)


@torch.no_grad()
def token_losses(model: torch.nn.Module, tokens: np.ndarray, *, block_size: int, batch_size: int = 8,
                 device: torch.device | str = "cpu", autocast: contextlib.AbstractContextManager | None = None,
                 progress: bool = False) -> torch.Tensor:
    """Each token's loss over eval_windows(), in the split's order (so that a benchmark can sum them by kind of
    token); under torch.distributed each rank scores every world-th batch and all get the whole. `progress`
    shows a bar on a terminal: a long text's val split takes minutes on a CPU (`small`: ~2,300 tokens/s on 2
    cores in bf16), and the training bar stands still meanwhile."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    was_training = model.training
    model.eval()
    windows = eval_windows(tokens, block_size)
    full = sum(len(x) == block_size for x, _ in windows)
    # (first window, end): windows are consecutive, so a batch's targets are too
    batches = [(i, min(i + batch_size, full)) for i in range(0, full, batch_size)]
    if len(windows) > full:  # a shorter last window, alone
        batches.append((full, len(windows)))
    losses = torch.zeros(len(tokens), device=device)
    mine = batches[rank::world]  # stacked one at a time: all at once held 16 bytes a val token (200 MB: a 500 MB text)
    bar = tqdm(total=sum(len(y) for first, end in mine for _, y in windows[first:end]), desc="evaluating",
               unit="tok", unit_scale=True, leave=False, mininterval=1.0, disable=None if progress else True)
    for first, end in mine:
        x, y = (torch.stack(part).to(device) for part in zip(*windows[first:end], strict=True))
        at = first * block_size
        with autocast or contextlib.nullcontext():
            logits, _ = model(x)
        losses[at:at + y.numel()] = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="none")
        bar.update(y.numel())
    bar.close()
    if world > 1:
        dist.all_reduce(losses)
    model.train(was_training)
    return losses.cpu()


def unseen_tokens(losses: torch.Tensor, val: np.ndarray, train: np.ndarray, chars: int, vocab_size: int) -> dict:
    """The part of the val loss on tokens that the train split never holds. Never a target in training, those
    kinds cannot be ranked against each other by a model trained on that split, so each such token costs it
    about log(how many kinds the split lacks), what it pays when it spreads them evenly (a given model lands a
    little above or below by chance): a price that no training lowers, and that a character-level model (every
    val character in its train split, as a rule) does not pay."""
    lacking = np.bincount(train, minlength=vocab_size) == 0
    unseen = lacking[val]
    nats = losses.double().numpy()[unseen]
    return {"unseen_val_tokens": int(unseen.sum()), "unseen_mean_nats": float(nats.mean()) if len(nats) else 0.0,
            "unseen_nats_per_char": float(nats.sum() / chars),
            "unseen_floor_nats_per_char": float(len(nats) * np.log(max(1, lacking.sum())) / chars)}


def held_out(info: dict) -> float | None:
    """The part of its text that a model's training held out, from its file's training record (`info`)."""
    fraction = info.get("val_fraction")
    return fraction if isinstance(fraction, int | float) and 0 <= fraction < 1 else None


def trained_share(info: dict, corpus: Corpus, val_fraction: float) -> float:
    """The part of the text (0 to val_fraction) scored as val that the model trained on: its file's training record
    (`info`) names this very text, with less of it held out. A loss on that part is optimistic."""
    if info.get("corpus_sha256") != corpus.sha256 or (fraction := held_out(info)) is None:
        return 0.0
    return max(0.0, val_fraction - fraction)


def evaluate_corpus(model: torch.nn.Module, corpus: Corpus, *, block_size: int, batch_size: int = 8,
                    device: torch.device | str = "cpu", autocast: contextlib.AbstractContextManager | None = None,
                    progress: bool = False) -> tuple[EvalResult, dict]:
    """The val split's loss and its unseen_tokens() part, from one pass over it."""
    losses = token_losses(model, corpus.val, block_size=block_size, batch_size=batch_size, device=device,
                          autocast=autocast, progress=progress)
    return (EvalResult.of(losses, corpus.val_chars),
            unseen_tokens(losses, corpus.val, corpus.train, corpus.val_chars, model.config.vocab_size))
