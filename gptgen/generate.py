"""Sampling and streaming: pure logits processors, a token generator over the KV cache, and text pieces
that never split a UTF-8 character and stop before a stop string.

When prompt + output reach the context, the most recent 3/4 of the context is kept and the cache is
rebuilt from it (one prefill), so generation can run past the context window; a prompt longer than
the context keeps its last tokens. Generation ends early when the model emits <|endoftext|>.
"""

from __future__ import annotations

import codecs
import contextlib
import math
import numbers
import threading
import time
import warnings
from collections.abc import Generator, Iterator
from dataclasses import dataclass, fields

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from gptgen.checkpoint import ModelFileError
from gptgen.config import GptgenError
from gptgen.quantize import int8_decoder
from gptgen.tokenizer import EOT_ID, get_tokenizer

MAX_NEW_TOKENS = 4096  # a cap per request, so one call cannot hold a server for ever
MAX_PROMPT_CHARS = 100_000  # checked before tokenizing; the model sees only its context's worth anyway
NESTED_WAIT_S = 2.0  # a stream waiting for its turn, while the running one has not moved, before it is an error
MAX_STOPS, MAX_STOP_CHARS = 16, 1000  # stop strings a call takes, and their length: they are looked for every token


@dataclass(frozen=True)
class Sampling:
    """The sampling parameters, with the same names in the CLI, the Python API and the web form."""

    max_new_tokens: int = 200
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 50  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off
    stop: tuple[str, ...] = ()  # a string or strings (None: none); the text ends before the first one found
    seed: int | None = None

    def __post_init__(self) -> None:
        def number(name, value, integer=False):
            """Python's and numpy's numbers alike (np.int64(10) is an integer), stored as Python's."""
            ok = isinstance(value, numbers.Integral if integer else numbers.Real)
            if isinstance(value, bool) or not ok:
                raise ValueError(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}")
            try:
                finite = integer or math.isfinite(value)
            except OverflowError:  # an integer too large for a float
                finite = False
            if not finite:
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            object.__setattr__(self, name, int(value) if integer else float(value))

        number("max_new_tokens", self.max_new_tokens, integer=True)
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise ValueError(f"max_new_tokens must be between 1 and {MAX_NEW_TOKENS}, got {self.max_new_tokens}")
        number("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"temperature must be 0 (greedy) or positive, got {self.temperature}")
        number("top_k", self.top_k, integer=True)
        if self.top_k < 0:
            raise ValueError(f"top_k must be 0 (off) or positive, got {self.top_k}")
        number("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        number("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be positive (1 = off), got {self.repetition_penalty}")
        stop = () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (tuple, list)) or not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop must be a string or a list of non-empty strings, got {self.stop!r}")
        if len(stop) > MAX_STOPS or max(map(len, stop), default=0) > MAX_STOP_CHARS:
            raise ValueError(f"stop takes at most {MAX_STOPS} strings of at most {MAX_STOP_CHARS:,} characters each, "
                             f"got {len(stop)}, the longest of {max(map(len, stop)):,}")
        object.__setattr__(self, "stop", tuple(stop))
        if self.seed is not None:
            number("seed", self.seed, integer=True)
            if not 0 <= self.seed < 2**63:  # what torch.Generator takes
                raise ValueError(f"seed must be between 0 and 2**63 - 1, got {self.seed}")


SAMPLING_PARAMS = tuple(f.name for f in fields(Sampling))


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty: logits of tokens already present are divided by it when positive, multiplied when negative
    (a zero stays: with a penalty beyond float32's range, 0 x inf was NaN, which greedy decoding then picked)."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    picked = logits.gather(-1, seen)
    finite = torch.finfo(logits.dtype)  # a tiny penalty would make inf, and then the softmax NaN
    penalized = torch.where(picked > 0, picked / penalty, torch.where(picked < 0, picked * penalty, picked))
    return logits.scatter(-1, seen, penalized.clamp(finite.min, finite.max))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches p (always at least the top one)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    drop = cumulative - sorted_logits.softmax(-1) >= p  # mass before this token already reaches p
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def next_token(logits: torch.Tensor, seen: torch.Tensor, s: Sampling, generator: torch.Generator) -> int:
    """One token id from the logits (vocab,) of the last position.

    Top-k first narrows the vocabulary to k candidates, so temperature, top-p and the draw work on k
    values instead of 50,257 (the full-vocabulary draw cost ~0.75 ms a token on 2 cores).
    """
    logits = apply_repetition_penalty(logits.float(), seen, s.repetition_penalty)
    if s.temperature == 0:
        return int(logits.argmax())
    if 0 < s.top_k < logits.size(-1):
        values, candidates = torch.topk(logits, s.top_k)
    else:
        values, candidates = logits, None
    # From the top, in float64: a tiny temperature then gives -inf and 0, never inf - inf = NaN in the softmax.
    values = apply_top_p((values.double() - values.max()) / s.temperature, s.top_p)
    choice = int(torch.multinomial(values.softmax(-1), 1, generator=generator))
    return choice if candidates is None else int(candidates[choice])


def attention_backends():
    """Every attention backend but cuDNN's, which builds a plan for each new shape (tens of ms on an H200), and
    decoding brings a new key length every token: eager bf16 decoding of the gpt2 preset there measured
    17.8 tok/s with it, 284.8 without. The others choose per call; on a CPU this changes nothing."""
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


@dataclass(eq=False)
class Sequence:
    """One text being generated in a Batch: its tokens as the cache holds them, and how to sample the next."""

    tokens: list[int]
    sampling: Sampling
    generator: torch.Generator
    cached: int = 0  # tokens[:cached] are in the cache
    new_tokens: int = 0
    done: bool = False  # ended (end of text, max_new_tokens) or cancelled; its row is freed at the next step
    logits: torch.Tensor | None = None  # for the next token


class Batch:
    """Sequences decoded together, one KV cache row each; they join (add) and leave (done) between steps.

    `active[i]` holds cache row i. Decoding at batch 1 is memory-bound, so one step for n sequences
    costs little more than for one. With int8 linears on a CPU a sequence gets the same numbers batched as
    alone: they quantize each sequence on its own, attention runs per row over the row's own keys, and
    prefill runs one sequence at a time. Float linears (int8 ones on CUDA run as float) take the batch in one
    matrix product, whose sums may round otherwise than one row's (~1e-5 of a logit): a near-tie may go the
    other way. Running them row by row would read the weights once per row, which is what batching saves.
    """

    def __init__(self, model, rows: int, max_len: int | None = None) -> None:
        self.model = model
        self.rows = rows
        self.context = model.config.block_size
        self.device = model.transformer.wpe.weight.device
        self.active: list[Sequence] = []
        self.pending = 0  # rows 0..pending-1 sampled a token that the cache does not hold yet
        compiled = getattr(model, "compiled_decoder", None)  # see compile_decoding(): its shapes never change
        model.setup_caches(batch=rows, max_len=None if compiled else max_len, static=compiled is not None)
        self.decoder = int8_decoder(model) or compiled  # a compiled step (TorchScript for int8 on CPU), or None

    def add(self, prompt: list[int], s: Sampling) -> Sequence:
        """Start a sequence in the next free row (one prefill of its prompt); the next step samples its first token."""
        if len(self.active) == self.rows:
            raise RuntimeError("no free row in the batch")
        generator = torch.Generator(device="cpu")
        if s.seed is not None:
            generator.manual_seed(s.seed)
        else:
            generator.seed()  # a fresh seed of its own: torch.seed() would reseed the caller's global generator
        seq = Sequence(list(prompt[-self.context:]) or [EOT_ID], s, generator)
        self.active.append(seq)
        try:
            seq.logits = self._prefill(seq, len(self.active) - 1, seq.tokens)
        except BaseException:  # a row left without logits would fail every later step of the batch
            self.active.pop()
            raise
        return seq

    @torch.inference_mode()
    @attention_backends()
    def _prefill(self, seq: Sequence, row: int, tokens: list[int]) -> torch.Tensor:
        """Write tokens to cache row `row` from position 0; the logits after the last of them."""
        seq.cached = len(tokens)
        if not tokens:  # a context of 1 keeps only the token about to be decoded
            return None
        return self.model(torch.tensor([tokens], device=self.device), row=row, last_only=True)[0][0, -1]

    @torch.inference_mode()
    def step(self) -> list[tuple[Sequence, int | None]]:
        """A token for every active sequence: (sequence, token), token None where the text ended.

        The forward for the tokens the last step handed out runs at the start of this one, so a token goes out
        as soon as it is sampled: a lone sequence's first token costs its prefill, not its prefill and a step.
        """
        self._forward()
        self._free_rows()
        out = []
        for seq in self.active:
            s = seq.sampling
            seen = torch.tensor(seq.tokens) if s.repetition_penalty != 1.0 else torch.empty(0, dtype=torch.long)
            token = next_token(seq.logits.cpu(), seen, s, seq.generator)
            if token == EOT_ID:  # the model ended the text
                seq.done = True
                out.append((seq, None))
                continue
            seq.tokens.append(token)
            seq.new_tokens += 1
            seq.done = seq.new_tokens == s.max_new_tokens
            out.append((seq, token))
        self._free_rows()
        self.pending = len(self.active)
        return out

    def _forward(self) -> None:
        """Logits for the last token of rows 0..pending-1 (the rows that sampled one; rows added since hold their
        prefill's). A row cancelled since is forwarded too: freeing it first could move an added row among them."""
        batch, self.pending = self.active[:self.pending], 0
        for row, seq in enumerate(batch):
            if len(seq.tokens) > self.context:  # cache full: keep the most recent 3/4, rebuild the cache from them
                seq.tokens = seq.tokens[-(1 if seq.done else max(1, 3 * self.context // 4)):]  # no one reads a
                self._prefill(seq, row, seq.tokens[:-1])  # cancelled one's: its forward needs only a free position
        if not batch:
            return
        tokens, positions = [seq.tokens[-1] for seq in batch], [seq.cached for seq in batch]
        logits = self.decoder(tokens, positions) if self.decoder else eager_step(self.model, tokens, positions)
        for i, seq in enumerate(batch):
            seq.logits = logits[i]
            seq.cached += 1

    def _free_rows(self) -> None:
        """Drop finished sequences; the last active row moves into each freed one, so rows stay 0..n-1."""
        while (row := next((i for i, s in enumerate(self.active) if s.done), None)) is not None:
            last = self.active.pop()
            if row < len(self.active):
                for block in self.model.transformer.h:
                    block.attn.cache.move(len(self.active), row, last.cached)
                self.active[row] = last


class CompiledDecoder:
    """One sequence's decoding step compiled by inductor over static shapes (the whole cache, masked): on CUDA
    with CUDA graphs, so that a token is one graph replay instead of ~400 kernel launches, and each of an
    int8 model's linear layers is one kernel that reads its int8 weight (see `Int8Linear.forward`). Steps
    of several sequences run eagerly. If compiling fails, it warns and decodes eagerly.
    """

    CUDA_OPTIONS = {"triton.cudagraphs": True, "coordinate_descent_tuning": True}  # as gpt-fast decodes

    def __init__(self, model, options: dict | None = None) -> None:
        self.model = model
        self.device = model.transformer.wpe.weight.device
        options = self.CUDA_OPTIONS if options is None else options
        self.compiled = torch.compile(self._step, fullgraph=True, options=options)
        self.failed = False

    def _step(self, idx: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.model(idx, pos=pos, last_only=True, static=True)[0][:, -1]

    def __call__(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        if len(tokens) == 1 and not self.failed:
            idx, pos = torch.tensor([tokens], device=self.device), torch.tensor(positions, device=self.device)
            try:  # a CUDA graph's output is overwritten by its next replay, hence the clone
                return self.compiled(idx, pos).clone()
            except Exception as e:  # noqa: BLE001 - a compiler that cannot build this only costs speed
                self.failed = True
                warnings.warn(f"compiled decoding failed ({type(e).__name__}: {e}); decoding eagerly", stacklevel=2)
        return eager_step(self.model, tokens, positions)


@attention_backends()
def eager_step(model, tokens: list[int], positions: list[int]) -> torch.Tensor:
    """GPT.forward for one new token of each sequence in cache rows 0..B-1 (tokens[b] at positions[b]): the
    logits, (B, vocab). Each row attends over its own length, so a sequence's numbers do not depend on the
    others'."""
    device = model.transformer.wpe.weight.device
    idx = torch.tensor([[t] for t in tokens], device=device)
    pos = positions[0] if len(tokens) == 1 else torch.tensor(positions, device=device)  # an int: fewer ops
    return model(idx, pos=pos, last_only=True)[0][:, -1]


def compile_decoding(model) -> None:
    """Decode one sequence at a time through a CompiledDecoder if the model is on CUDA (elsewhere: no change).

    The first step compiles (tens of seconds), so this is for a model that generates a lot: the server
    does it on CUDA, `gptgen.load(..., compile=True)` and `gptgen generate --compile` ask for it. The
    caches then span the whole context and stay allocated between calls, so the shapes never change.
    """
    if model.transformer.wpe.weight.is_cuda:
        model.compiled_decoder = CompiledDecoder(model)


def generate_tokens(model, prompt: list[int], s: Sampling) -> Iterator[int]:
    """Token ids after the prompt, one at a time: a batch of one sequence."""
    batch = Batch(model, rows=1, max_len=min(model.config.block_size, len(prompt) + s.max_new_tokens))
    try:
        seq = batch.add(prompt, s)
        while not seq.done:
            for _, token in batch.step():
                if token is not None:
                    yield token
    finally:
        if getattr(model, "compiled_decoder", None) is None:  # a compiled step keeps its cache tensors
            model.clear_caches()


def line_breaks(stop: str) -> str:
    """A stop string as typed on the page or the command line: `\\n` stands for a line break (`\\n\\n`: a blank
    line)."""
    return stop.replace("\\n", "\n")


def check_prompt(prompt: str) -> None:
    """A clear error (for the CLI too, before it loads a model) for a prompt that is not text or is too long:
    the length is capped before tokenizing, so work cannot grow without bound."""
    if not isinstance(prompt, str):
        raise GptgenError(f"prompt must be a string, got {type(prompt).__name__}")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise GptgenError(f"prompt is {len(prompt):,} characters; the limit is {MAX_PROMPT_CHARS:,} (a model reads "
                          "only its context's worth of the end anyway)")


def _stop_prefix(text: str, stop: tuple[str, ...]) -> int:
    """The length of the longest end of `text` that begins a stop string (not a whole one: that is a hit). Only
    the places where a stop string's first character stands are tried, each once: 16 stop strings of 1,000
    characters cost 2.9 ms a token when every length was tried."""
    longest = 0
    for s in stop:
        i = text.find(s[0], max(len(text) - len(s) + 1, 0))
        while 0 <= i < len(text) - longest:  # the first start that fits is this stop string's longest
            if s.startswith(text[i:]):
                longest = len(text) - i
                break
            i = text.find(s[0], i + 1)
    return longest


def stream_text(token_ids: Iterator[int], stop: tuple[str, ...] = ()) -> Generator[str, None, bool]:
    """Text pieces from token ids: whole UTF-8 characters only, ending before the first stop string.

    Text that could be the start of a stop string is held back until it is known not to be one. Returns
    whether a stop string ended the text (it may complete on the very last token allowed).
    """
    enc = get_tokenizer()
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending = ""
    for token in token_ids:
        pending += decoder.decode(enc.decode_single_token_bytes(token))
        hits = [i for i in (pending.find(s) for s in stop) if i >= 0]
        if hits:
            if min(hits):
                yield pending[:min(hits)]
            return True
        hold = _stop_prefix(pending, stop)
        if len(pending) > hold:
            yield pending[:len(pending) - hold]
            pending = pending[len(pending) - hold:]
    pending += decoder.decode(b"", final=True)
    if pending:
        yield pending
    return False


@dataclass
class Stats:
    """Counts and timings of the last call, for the CLI's --json and the web page."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    first_token_s: float = 0.0
    total_s: float = 0.0
    stopped_by_string: bool = False  # a stop string ended the text (OpenAI's finish_reason "stop")

    @property
    def tokens_per_s(self) -> float:
        decode_s = self.total_s - self.first_token_s
        return (self.new_tokens - 1) / decode_s if self.new_tokens > 1 and decode_s > 0 else 0.0


class ClosingIterator:
    """An iterator whose close() also runs `on_close`, whether it was read or not: a generator closed before
    its first next() skips its own `finally` (a client gone before the first token left its request decoding
    to the end). close() belongs to the thread that reads; stop() may come from any other (the page's Stop): it
    ends the source (`on_stop`), and the reader then comes to the end by itself, also from a wait for the first
    token. (Python cannot close a generator that another thread is running.)"""

    def __init__(self, items: Iterator, on_close, on_stop=None) -> None:
        self._items, self._on_close, self._on_stop = items, on_close, on_stop

    def __iter__(self) -> ClosingIterator:
        return self

    def __next__(self):
        return next(self._items)

    def close(self) -> None:
        self._items.close()
        self._on_close()

    def stop(self) -> None:
        if self._on_stop is None:
            raise TypeError("this iterator's source cannot be stopped from another thread; close() it in its own")
        self._on_stop()


class TextModel:
    """A loaded model with its tokenizer: what gptgen.load() returns.

    The server's side holds one without weights (model None: the engine process has them) for its
    metadata, tokenizer and text streaming.
    """

    def __init__(self, model, metadata: dict[str, str], config=None) -> None:
        self.model = model
        self.metadata = metadata
        self.config = config or model.config
        self.tokenizer = get_tokenizer()
        if self.config.vocab_size != self.tokenizer.n_vocab:  # its ids would not all be text, or its input ids
            raise ModelFileError(f"this model has {self.config.vocab_size:,} tokens and gptgen's tokenizer (GPT-2's) "
                                 f"{self.tokenizer.n_vocab:,}: it cannot read or write text (`gptgen import` "
                                 "fits a transformers model's padded vocabulary)")
        self.last = Stats()
        self._busy = threading.Lock()  # the model's KV caches serve one generation at a time
        self._read: tuple | None = None  # (thread, token count) of its last token's read, or of the next's ask

    def stream(self, prompt: str, **sampling) -> Iterator[str]:
        """generate()'s text in pieces as they are made (whole characters; close() it to stop early)."""
        pieces, self.last = self.stream_with_stats(prompt, **sampling)
        return pieces

    def stream_with_stats(self, prompt: str, **sampling) -> tuple[Iterator[str], Stats]:
        """stream() and the Stats it fills in, for callers that share the model across threads (they take
        turns: one generation at a time)."""
        ids, s = self.prepare(prompt, **sampling)
        return self.text(self._one_at_a_time(generate_tokens(self.model, ids, s)), s, len(ids))

    def _one_at_a_time(self, tokens: Iterator[int]) -> Iterator[int]:
        """Two generations at once would write the same KV cache rows and silently corrupt each other's
        text: another waits for its turn. A second stream started by the thread that reads the first (inside
        its loop) would wait for ever: it is an error once the first has not moved for NESTED_WAIT_S since that
        thread read from it. Not at once: a thread pool (a web framework's, iterating a stream) moves a stream
        between its threads, so the thread that read the first's last token may start the next stream, which
        must then wait while another thread reads the first (refused at once, it failed there). A thread that
        asks the first for its next token is noted at once, not when the token comes: a token slower than
        NESTED_WAIT_S (a large model on a CPU) made a pool's second stream fail too."""
        me, seen = threading.get_ident(), self._read
        while not self._busy.acquire(timeout=NESTED_WAIT_S):
            if self._read == seen and seen is not None and seen[0] == me:
                raise RuntimeError("this model is already generating in this thread: finish or close() the first "
                                   "stream before starting another (or gptgen.load the model twice)")
            seen = self._read
        try:
            for count, token in enumerate(tokens, 1):
                self._read = (threading.get_ident(), count)  # the thread reading it now
                yield token
                self._read = (threading.get_ident(), count, "asks for the next")
        finally:
            self._read = None
            self._busy.release()

    def prepare(self, prompt: str, **sampling) -> tuple[list[int], Sampling]:
        """(prompt token ids, Sampling); ValueError names a bad parameter."""
        check_prompt(prompt)
        unknown = sorted(sampling.keys() - set(SAMPLING_PARAMS))
        if unknown:  # Sampling.__init__'s own TypeError names a class the caller never saw, and not the valid names
            raise TypeError(f"unknown sampling parameter {', '.join(map(repr, unknown))}; they are: "
                            f"{', '.join(SAMPLING_PARAMS)}")
        s = Sampling(**sampling)
        return self.tokenizer.encode_ordinary(prompt), s

    @staticmethod
    def text(tokens: Iterator[int], s: Sampling, prompt_tokens: int) -> tuple[Iterator[str], Stats]:
        """(text pieces of the token ids, the Stats they fill in as they are read); closing the pieces closes
        the tokens (which cancels a server request)."""
        stats = Stats(prompt_tokens=prompt_tokens)
        start = time.perf_counter()

        def counted() -> Iterator[int]:
            with contextlib.closing(tokens):
                for token in tokens:
                    stats.new_tokens += 1
                    stats.total_s = time.perf_counter() - start  # before the yield: a stop string reads no further
                    if stats.new_tokens == 1:
                        stats.first_token_s = stats.total_s
                    yield token

        def pieces() -> Iterator[str]:
            with contextlib.closing(counted()) as ids:
                stats.stopped_by_string = yield from stream_text(ids, s.stop)

        return ClosingIterator(pieces(), tokens.close, getattr(tokens, "stop", None)), stats

    def generate(self, prompt: str, **sampling) -> str:
        """The prompt's continuation. Sampling keywords, as in the CLI and on the page: max_new_tokens=200 (at
        most 4096), temperature=0.8 (0: greedy), top_k=50 (0: off), top_p=1.0, repetition_penalty=1.0 (1: off),
        stop=() (a string or strings: the text ends before the first), seed=None (the same seed, the same text).
        A bad one is a ValueError that names it; the call's counts and timings are in .last afterwards."""
        return "".join(self.stream(prompt, **sampling))
