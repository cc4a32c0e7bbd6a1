"""What the benchmarks share: one JSON line on stdout (optionally a file), memory readings, the page's stats line."""

from __future__ import annotations

import json
import re
from pathlib import Path

CORPUS = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "tinyshakespeare.txt"  # the reference


def emit(result, path: str | None) -> None:
    print(json.dumps(result))
    if path:
        Path(path).write_text(json.dumps(result, indent=1))


def status_mib(field: str, pid: int | str = "self", source: str = "status") -> float:
    """A memory field of /proc/PID/status, or of another such file (smaps_rollup: Pss), in MiB (kB there, KiB in
    fact). VmHWM, the peak, is the process's own: unlike ru_maxrss it is not inherited from the parent across
    exec."""
    for line in Path(f"/proc/{pid}/{source}").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/{pid}/{source}")


def hf_gpt2(config, **settings):
    """The peer: transformers' GPT2LMHeadModel, shaped as a gptgen GPTConfig (random weights)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd,
                                      n_positions=config.block_size, vocab_size=config.vocab_size, **settings))


def failure(run) -> str:
    """What a failed benchmark subprocess (a CompletedProcess) said last, for its row."""
    return run.stderr.strip().splitlines()[-1] if run.stderr.strip() else f"exit {run.returncode}"


def tokens_in(stats: str) -> int:
    """The new tokens that the page's stats line (gptgen.web.stats_line, as markdown or as rendered text) reports."""
    if " before the first token" in stats:
        return 0
    if (m := re.match(r"(?:Generated|Stopped after) \**([\d,]+) tokens?\b", stats)) is None:
        raise ValueError(f"not a stats line: {stats!r}")
    return int(m[1].replace(",", ""))
