"""Text file -> token ids (cached by content hash), the train/val split, and the batches drawn from them."""

from __future__ import annotations

import hashlib
import os
import re
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from gptgen.checkpoint import atomic_path, atomic_write, remove_stale_writes
from gptgen.config import GptgenError, cache_dir
from gptgen.device import available_cpus
from gptgen.tokenizer import EOT_ID, get_tokenizer


class DataError(GptgenError):
    """The data file cannot be used."""


def check_data_file(path: str | os.PathLike) -> None:
    if not Path(path).is_file():
        raise DataError(f"data file {str(path)!r} does not exist or is not a file; pass a UTF-8 text file")


def read_text(path: str | os.PathLike) -> tuple[str, bytes]:
    """The file's text and raw bytes, or a DataError that a user can act on."""
    path = Path(path)
    what = f"data file {str(path)!r}"
    check_data_file(path)
    raw = path.read_bytes()
    text = decode_text(raw, what)
    if not text or text.isspace():  # a byte order mark alone is no text either; strip() would copy the text
        raise DataError(f"{what} is empty; pass a UTF-8 text file with some text in it")
    return text, raw


def decode_text(raw: bytes, what: str) -> str:
    """UTF-8 bytes as every text gptgen reads is read (a training text, a prompt file): a byte order mark dropped,
    line ends as they are (a text with \\r\\n trains on them, so its prompts keep them too); or a DataError
    that names `what` and the conversion to run."""
    if raw.startswith((b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")):  # before UTF-16's: UTF-32-LE's starts as it does
        raise DataError(f"{what} is UTF-32 text (it starts with UTF-32's byte order mark); convert it to UTF-8, "
                        "e.g. iconv -f utf-32 -t utf-8")
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):  # a UTF-16 text has NUL bytes only where it is mostly ASCII
        raise DataError(f"{what} is UTF-16 text (it starts with UTF-16's byte order mark); convert it to UTF-8, "
                        "e.g. iconv -f utf-16 -t utf-8")
    if b"\x00" in raw:
        raise DataError(f"{what} looks binary (it contains NUL bytes; UTF-16 text does too: convert it to UTF-8); "
                        "pass a UTF-8 text file")
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise DataError(f"{what} is not valid UTF-8 (bad byte at offset {e.start}); convert it from the encoding "
                        "it was written in, e.g. iconv -f cp1252 -t utf-8 for most Windows texts (latin1 gives "
                        "their quotes and dashes as control characters)") from None


PIECE_CHARS = 1 << 20
# An ASCII space, tab or line break after a character that is no whitespace to Python (Python's \s also takes
# \x1c-\x1f, which tiktoken's does not; every character Python's \S takes is no whitespace to either); or, for
# texts without whitespace (Chinese, Japanese), a common punctuation mark (ASCII, CJK or full-width) after a
# letter or digit. Python's letters and digits (\w but _) are letters and numbers to tiktoken too, and these
# marks are punctuation in every Unicode version (unlike "whatever Python's tables do not call a letter": a
# letter added to Unicode after them is a letter to tiktoken's newer tables).
_CUT = re.compile(r"(?<=\S)[ \t\n\v\f\r]|(?<=[^\W_])[!-/:-@\[-`{-~、。〈-】〔-〟・…—‘’“”！-／：-＠［-｀｛-～]")


def pieces(text: str, size: int = PIECE_CHARS) -> list[str]:
    """The text cut into pieces of about `size` characters whose tokens, joined, are the whole text's.

    Each cut goes just before an ASCII whitespace character that follows a non-whitespace one, or before a
    punctuation mark that follows a letter or digit: no pre-token of GPT-2's split holds both (a word,
    a number or a run of punctuation stops at whitespace and at each other; a run of whitespace holds nothing
    else), and the split looks ahead but never behind, so each side splits as it does in the whole text, and
    BPE never merges across pre-tokens (tested against the whole text).
    """
    out, start = [], 0
    while start + size < len(text) and (cut := _CUT.search(text, start + size)):
        out.append(text[start:cut.start()])
        start = cut.start()
    out.append(text[start:])
    return out


def _sha256(text: str) -> str:
    h = hashlib.sha256()
    for i in range(0, len(text), 16 * PIECE_CHARS):  # UTF-8 a slice at a time: no copy of the whole text
        h.update(text[i:i + 16 * PIECE_CHARS].encode("utf-8"))
    return h.hexdigest()


def encode(text: str, progress: bool = False) -> np.ndarray:
    """Token ids as uint16, cached on disk under the sha256 of the text (a corpus is tokenized once).

    Pieces of the text go to tiktoken on every core, and each piece's ids become uint16 at once: one call's
    Python list of ints took a 500 MB text's process to 6.3 GB (2.3 GB in pieces, and 1.6x faster on 2
    cores). `progress` shows a bar on a terminal.
    """
    path = cache_dir() / "tokens" / f"{_sha256(text)}.gpt2.u16"  # ids, then their count (see _cached)
    if (ids := _cached(path, text)) is not None:
        return ids
    tokenizer, parts = get_tokenizer(), pieces(text)
    bar = tqdm(total=len(text), desc="tokenizing", unit="char", unit_scale=True, leave=False,
               disable=None if progress and len(parts) > 1 else True)

    def encode_piece(piece: str) -> np.ndarray:
        ids = np.array(tokenizer.encode_ordinary(piece), dtype=np.uint16)
        bar.update(len(piece))
        return ids

    with bar, ThreadPoolExecutor(available_cpus()) as pool:  # tiktoken lets go of the GIL while it encodes
        try:
            ids = np.concatenate(list(pool.map(encode_piece, parts)))
        except BaseException as e:  # pyo3's PanicException is no Exception: nothing else would say what happened
            if type(e).__name__ != "PanicException":
                raise
            raise DataError("the tokenizer (tiktoken) failed on this text: a run of about a million or more "
                            "whitespace characters inside it overflows its pattern engine; shorten such runs") from None
    remove_stale_writes(path.parent)  # killed writes' (a 500 MB text's: ~230 MB each)
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:  # written from the array: no copy of it in memory
            ids.astype("<u2", copy=False).tofile(f)
            f.write(struct.pack("<Q", len(ids)))
    except OSError:
        pass  # a read-only cache only costs speed
    return ids


def _cached(path: Path, text: str) -> np.ndarray | None:
    """A cache entry's ids, or None where there is none or it cannot be the text's (gptgen writes entries whole,
    but a copied or synced cache folder may hold a cut one): ids and count that disagree (a copy cut at a block
    boundary had passed every other check, and trained on a prefix of the text), no ids for some text, an id
    past the tokenizer's ordinary tokens. Little-endian whatever the machine, so a shared cache reads alike."""
    try:
        size = path.stat().st_size
        if size < 8 or size % 2:
            return None
        raw = np.fromfile(path, dtype="<u2")
    except OSError:  # none yet, or a cache folder this user may not read
        return None
    ids = raw[:-4].astype(np.uint16, copy=False)  # the last 8 bytes are the count
    if int(raw[-4:].view("<u8")[0]) != len(ids):
        return None
    if (len(ids) == 0) != (len(text) == 0) or (len(ids) and ids.max() >= EOT_ID):
        return None
    return ids


@dataclass(frozen=True)
class Corpus:
    """A text file split by characters: the first (1 - val_fraction) for training, the rest for validation (none
    with val_fraction 0)."""

    train: np.ndarray
    val: np.ndarray
    val_chars: int
    sha256: str
    size_bytes: int


def load_corpus(path: str | os.PathLike, val_fraction: float = 0.1, progress: bool = False) -> Corpus:
    text, raw = read_text(path)
    sha256, size_bytes = hashlib.sha256(raw).hexdigest(), len(raw)
    del raw  # a copy of the text's size, not needed while it is tokenized
    split = int(len(text) * (1 - val_fraction))
    train, val = encode(text[:split], progress), encode(text[split:], progress)
    if len(val) == 0 and val_fraction > 0:
        raise DataError(f"data file {str(path)!r} leaves no validation text; use a longer text or a larger "
                        "--val-fraction")
    return Corpus(train=train, val=val, val_chars=len(text) - split, sha256=sha256, size_bytes=size_bytes)


def sample_batch(tokens: np.ndarray, batch_size: int, block_size: int, rng: np.random.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows: inputs (B, T) and their next-token targets (B, T)."""
    return _windows(tokens, rng.integers(0, len(tokens) - block_size, size=batch_size), block_size)


def _windows(tokens: np.ndarray, starts, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    window = torch.from_numpy(np.stack([tokens[s:s + block_size + 1] for s in starts]).astype(np.int64))
    return window[:, :-1], window[:, 1:]


class EpochWindows:
    """Windows without replacement, for `--windows epoch`: each epoch cuts the tokens into non-overlapping
    windows from an offset drawn for that epoch and visits them in a shuffled order, so every token is
    trained on once an epoch (random windows leave about 1/e of the tokens out of any given epoch).

    The run's windows form one sequence that all processes share: at step s, process `rank` of `world`
    takes the next grad_accum batches of its slot. Window g depends on g alone, so a resumed run draws
    exactly what the uninterrupted one would.
    """

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int, rank: int = 0,
                 world: int = 1) -> None:
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.seed, self.rank, self.world = seed, rank, world
        # windows an epoch, whatever the offset; the offset ranges over what they leave (fewer than block_size
        # targets), so that every token is a target in some epochs (one window fewer left the text's last
        # len % block_size tokens out of every epoch)
        self.count = max(1, (len(tokens) - 1) // block_size)
        self.max_offset = len(tokens) - 1 - block_size * self.count
        self._epoch, self._starts = -1, np.empty(0, dtype=np.int64)

    def starts(self, epoch: int) -> np.ndarray:
        """The start of each window of an epoch, in the order they are visited."""
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, 1, epoch])  # three numbers: apart from the [seed, rank] streams
            offset = rng.integers(0, self.max_offset + 1)
            self._epoch, self._starts = epoch, offset + self.block_size * rng.permutation(self.count)
        return self._starts

    def batches(self, step: int, grad_accum: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This process's grad_accum batches of a step: inputs (B, T) and targets (B, T) each."""
        first = (step * self.world + self.rank) * grad_accum * self.batch_size
        out = []
        for i in range(grad_accum):
            ids = range(first + i * self.batch_size, first + (i + 1) * self.batch_size)
            out.append(_windows(self.tokens, [self.starts(g // self.count)[g % self.count] for g in ids],
                                self.block_size))
        return out


def eval_windows(tokens: np.ndarray, block_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive, non-overlapping windows that score every val token exactly once.

    The split is prefixed with <|endoftext|> so its first token is predicted too. Window i feeds
    tokens [i*T, (i+1)*T) of that sequence and scores the next token of each, so a token sees the
    context of its own window only (0 to T-1 tokens; on average T/2). The last window may be shorter.
    """
    seq = torch.from_numpy(np.concatenate([[EOT_ID], tokens]).astype(np.int64))
    n = len(seq) - 1  # tokens to score
    return [(seq[i:min(i + block_size, n)], seq[i + 1:min(i + block_size, n) + 1])
            for i in range(0, n, block_size)]


@dataclass(frozen=True)
class Dataset:
    url: str
    sha256: str
    filename: str


# Known corpora that `gptgen data NAME` fetches; the hash guards against a changed or truncated download.
DATASETS = {
    "shakespeare": Dataset("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
                           "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed", "tinyshakespeare.txt"),
}


def download(name: str, out_dir: str | os.PathLike = "data") -> Path:
    """Fetch a known corpus into out_dir, checked against its sha256; an existing good copy is kept, and a file of
    that name holding something else (the user's edit, another text) is never replaced."""
    import http.client
    import urllib.request

    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    ds = DATASETS[name]
    path = Path(out_dir) / ds.filename
    if path.exists():
        if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == ds.sha256:
            return path
        raise DataError(f"{path} already exists and is not {name} as published; nothing was downloaded: move it "
                        f"away or give another folder with --out")
    try:
        with urllib.request.urlopen(ds.url, timeout=60) as r:
            raw = r.read()
    except (OSError, http.client.HTTPException) as e:  # IncompleteRead: the connection closed mid-file
        raise DataError(f"could not download {name} from {ds.url}: {e}; if you have a copy, pass it to "
                        f"`gptgen train --data FILE`") from None
    digest = hashlib.sha256(raw).hexdigest()
    if digest != ds.sha256:
        raise DataError(f"the download of {name} from {ds.url} has sha256 {digest}, expected {ds.sha256}; "
                        f"nothing was written")
    atomic_write(path, raw)
    return path
