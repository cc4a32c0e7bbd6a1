import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
CORPUS = SHARED / "data" / "tinyshakespeare.txt"


@pytest.fixture(autouse=True, scope="session")
def _isolated_caches(tmp_path_factory):
    """Token caches go to a fresh directory; tiktoken's reference encoding reads the shared offline cache."""
    os.environ["GPTGEN_CACHE_DIR"] = str(tmp_path_factory.mktemp("gptgen-cache"))
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken_cache"))


@pytest.fixture(scope="session")
def small_text(tmp_path_factory) -> Path:
    """The first 40,000 characters of the reference corpus: ~11k tokens, enough to see a loss fall."""
    path = tmp_path_factory.mktemp("data") / "small.txt"
    path.write_text(CORPUS.read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    return path
