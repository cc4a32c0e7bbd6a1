"""GPT-2: pre-LN transformer blocks, GELU MLP, learned positions, tied embedding/head, SDPA attention.

Parameter names follow GPT-2's (wte, wpe, c_attn, c_proj, ln_f) so that weights map to other
GPT-2 implementations by name plus transposes.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from gptgen.config import GPTConfig


class KVCache(nn.Module):
    """Preallocated keys and values of one layer, a row per sequence, so decoding never re-runs the prompt.

    Keys and values share one tensor (2, rows, nh, max_len, hs): a token's pair is stored with one copy.
    Left uninitialised (untouched pages cost no memory) unless static: only positions already written are
    read, except by static steps, which read the whole cache and mask what is past (0 x NaN would be NaN).
    """

    def __init__(self, batch: int, max_len: int, n_head: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str | None = None, static: bool = False) -> None:
        super().__init__()
        shape = (2, batch, n_head, max_len, head_dim)
        self.static = static
        self.register_buffer("kv", (torch.zeros if static else torch.empty)(shape, dtype=dtype, device=device),
                             persistent=False)

    def update(self, pos: int | torch.Tensor, row: int, kv: torch.Tensor) -> torch.Tensor:
        """Store kv (2, B, nh, T, hs) in rows row..row+B-1; return those rows' keys and values so far.

        pos is an int (all rows write positions pos..pos+T-1; positions up to pos+T-1 are returned) or a
        tensor of one position per row (T = 1; all positions are returned, each row reads its own length).
        """
        B, T = kv.size(1), kv.size(3)
        if isinstance(pos, int):
            self.kv[:, row:row + B, :, pos:pos + T] = kv
            return self.kv[:, row:row + B, :, :pos + T]
        rows = torch.arange(row, row + B, device=kv.device)
        self.kv[:, rows, :, pos] = kv[:, :, :, 0].transpose(0, 1)  # indexed dims go first: (B, 2, nh, hs)
        return self.kv[:, row:row + B]

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy row src's first `length` positions to row dst."""
        self.kv[:, dst, :, :length] = self.kv[:, src, :, :length]


def _attend_each(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Attention of each row over its own first lengths[i] keys, one call per row.

    One masked call over the longest row would be fewer calls, but its sums run over a different length,
    so a row's numbers would depend on the others, by ~1e-7: enough to flip an int8 rounding and change
    a greedy text. Per row, a sequence's numbers are the same batched as alone.
    """
    return torch.cat([F.scaled_dot_product_attention(qi, ki[:, :, :n], vi[:, :, :n])
                      for qi, ki, vi, n in zip(q.split(1), k.split(1), v.split(1), lengths, strict=True)])


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.cache: KVCache | None = None

    def forward(self, x: torch.Tensor, pos: int | torch.Tensor = 0, row: int = 0,
                lengths: list[int] | None = None) -> torch.Tensor:
        B, T, C = x.shape
        # (B, T, 3C) -> (3, B, nh, T, hs) in two views: decoding runs this per layer per token
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        q, kv = qkv[0], qkv[1:]
        mask, causal = None, T > 1
        if self.cache is not None:
            kv = self.cache.update(pos, row, kv)
            if lengths is not None:  # rows of different lengths
                y = _attend_each(q, kv[0], kv[1], lengths)
                return self.c_proj(y.transpose(1, 2).reshape(B, T, C))
            if not isinstance(pos, int):  # static shapes: every cache position, those past each row's masked
                mask = torch.arange(kv.size(3), device=x.device) <= pos.view(B, 1, 1, 1)
                causal = False
            elif pos > 0 and T > 1:  # new queries see the whole cache and each other causally
                mask = torch.ones(T, pos + T, dtype=torch.bool, device=x.device).tril(diagonal=pos)
                causal = False
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=mask, is_causal=causal, dropout_p=dropout)
        y = self.c_proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C); no copy when T == 1
        return F.dropout(y, dropout) if dropout else y


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))
        return F.dropout(y, self.dropout) if self.training and self.dropout else y


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, pos: int | torch.Tensor = 0, row: int = 0,
                lengths: list[int] | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), pos, row, lengths)
        return x + self.mlp(self.ln_2(x))


class Trimmed(NamedTuple):
    """The head's training over the tokens a text holds (GPT.trim_vocab)."""

    vocab: torch.Tensor  # the text's token ids, sorted
    rows: torch.Tensor  # the head's rows the loss uses: vocab's and the first other token's
    bias: torch.Tensor  # added to those rows' logits: 0, and log(count of the others) for the last
    others: torch.Tensor  # the ids of the tokens the text lacks


class GPT(nn.Module):
    """GPT-2. A new GPT holds no usable weights until init_weights() or a load (gptgen.load) gives it some."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        # The embeddings start uninitialised (init_weights() or a load always gives a GPT its weights): nn.Embedding's
        # own init, normal_, on the meta device where models are built for loading, cost 0.85 s and 68 MB of RSS
        # (it imports ~800 modules).
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd, _weight=torch.empty(config.vocab_size, config.n_embd)),
            wpe=nn.Embedding(config.block_size, config.n_embd, _weight=torch.empty(config.block_size, config.n_embd)),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied: one tensor serves both
        self.grad_checkpoint = False  # recompute each block in backward: activation memory of one block
        self.trimmed: Trimmed | None = None  # see trim_vocab()

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """GPT-2's init: N(0, 0.02), residual projections scaled down by depth, zero biases."""
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif "ln_" in name:
                nn.init.ones_(p)
            else:
                std = 0.02 / math.sqrt(2 * self.config.n_layer) if name.endswith("c_proj.weight") else 0.02
                nn.init.normal_(p, mean=0.0, std=std, generator=generator)

    def trim_vocab(self, tokens: torch.Tensor) -> None:
        """Train the head over these tokens only (head() says how): on a small text most of the 50,257 never
        occur, and the full head would be most of a small model's step. The others share one embedding, the
        first one's: no gradient reaches the rest, and share_rows() copies it to them before they are used."""
        vocab = torch.unique(tokens)  # sorted
        others = torch.ones(self.config.vocab_size, dtype=torch.bool, device=vocab.device)
        others[vocab] = False
        others = others.nonzero().squeeze(1)
        bias = torch.zeros(len(vocab) + min(1, len(others)), dtype=self.lm_head.weight.dtype, device=vocab.device)
        if len(others):
            bias[-1] = math.log(len(others))
        self.trimmed = Trimmed(vocab, torch.cat((vocab, others[:1])), bias, others)
        self.share_rows()

    def share_rows(self) -> None:
        """After trim_vocab(): the shared row, as training moved it, to every token it stands for."""
        if self.trimmed is not None:
            with torch.no_grad():
                others = self.trimmed.others
                self.transformer.wte.weight[others[1:]] = self.transformer.wte.weight[others[:1]]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # parameters() yields the tied weight once

    def setup_caches(self, batch: int, max_len: int | None = None, static: bool = False) -> None:
        """Allocate a KV cache per layer, in the activations' dtype; forward(idx, pos=...) then appends to it.
        static: for forward(..., static=True), which reads all of it (see KVCache)."""
        max_len = max_len or self.config.block_size
        wpe = self.transformer.wpe.weight  # float in every model, int8 ones included
        dtype, device = wpe.dtype, wpe.device
        want = ((2, batch, self.config.n_head, max_len, self.config.head_dim), dtype, device, static)
        for block in self.transformer.h:
            cache = block.attn.cache  # one already there as wanted is kept: a compiled step's tensors stay put
            if cache is None or (cache.kv.shape, cache.kv.dtype, cache.kv.device, cache.static) != want:
                block.attn.cache = KVCache(batch, max_len, self.config.n_head, self.config.head_dim, dtype, device,
                                           static)

    def clear_caches(self) -> None:
        for block in self.transformer.h:
            block.attn.cache = None

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, pos: int | torch.Tensor = 0,
                row: int = 0, last_only: bool = False,
                static: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits for every position (or the last only); with targets, also the mean cross-entropy in nats/token.

        pos is where idx starts in the sequence; with caches set up, earlier positions come from the cache,
        and idx's sequences use cache rows row, row+1, ... For batched decoding, pos is a tensor with each
        row's own position and idx holds one token per row; each row attends over its own length, or, with
        static=True, over the whole cache with the positions past it masked: the same shapes at every step,
        as torch.compile's CUDA graphs need (the caller keeps the positions inside the context).
        """
        B, T = idx.shape
        lengths = None if isinstance(pos, int) or static else (pos + 1).tolist()
        end = pos + T if isinstance(pos, int) else 0 if static else max(lengths)
        if end > self.config.block_size:
            raise ValueError(f"sequence of {end} tokens exceeds the context of {self.config.block_size}")
        positions = torch.arange(pos, pos + T, device=idx.device) if isinstance(pos, int) else pos.view(B, 1)
        x = self.run_blocks(self.embed(idx, positions), self.transformer.h, pos, row, lengths)
        return self.head(x[:, -1:] if last_only else x, targets)

    def run_blocks(self, x: torch.Tensor, blocks, pos: int | torch.Tensor = 0, row: int = 0,
                   lengths: list[int] | None = None) -> torch.Tensor:
        """x through the blocks: the model's own, or compiled ones over the same weights (training's
        RegionalCompile). With grad_checkpoint, each block's activations are recomputed in backward."""
        for block in blocks:
            if self.grad_checkpoint and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, pos, row, lengths, use_reentrant=False)
            else:
                x = block(x, pos, row, lengths)
        return x

    def embed(self, idx: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.transformer.wte(idx) + self.transformer.wpe(positions)  # (B, T, C)
        return F.dropout(x, self.config.dropout) if self.training and self.config.dropout else x

    def head(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, vocab) and, with targets, their mean cross-entropy in nats/token.

        Training after trim_vocab(), the logits are the text's tokens' and one more for all the others: they
        share one embedding, so one logit, and log(count) added to it weighs them all. The loss is the whole
        vocabulary's, at the cost of the text's tokens only."""
        x = self.transformer.ln_f(x)
        if targets is None or not self.training or self.trimmed is None:
            logits = self.lm_head(x)
        else:
            logits = F.linear(x, self.lm_head.weight[self.trimmed.rows], self.trimmed.bias)
            targets = torch.searchsorted(self.trimmed.vocab, targets.contiguous())
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1))
