"""The GPT-2 BPE, built from the ranks file shipped in the package so it never needs a download."""

from __future__ import annotations

import base64
import functools
from importlib import resources

import tiktoken

EOT = "<|endoftext|>"
EOT_ID = 50256
# GPT-2's pre-tokenizer split, as in tiktoken's own "gpt2" definition (r50k_pat_str): the same splits as GPT-2's
# pattern, written with possessive quantifiers and a rule of its own for whitespace at the end. With the plain
# pattern, a run of ~1M whitespace characters at the end of a text overflowed tiktoken's regex engine.
_GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


@functools.cache
def get_tokenizer(name: str = "gpt2") -> tiktoken.Encoding:
    if name != "gpt2":
        raise ValueError(f"unknown tokenizer {name!r}; gptgen supports 'gpt2'")
    text = resources.files("gptgen").joinpath("assets/gpt2.tiktoken").read_bytes()
    ranks = {}
    for line in text.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return tiktoken.Encoding(name="gpt2", pat_str=_GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={EOT: EOT_ID}, explicit_n_vocab=50257)
