"""The machine-readable half of every benchmark's output: one JSON line on stdout, optionally a file."""

from __future__ import annotations

import json
from pathlib import Path


def emit(result, path: str | None) -> None:
    print(json.dumps(result))
    if path:
        Path(path).write_text(json.dumps(result, indent=1))
