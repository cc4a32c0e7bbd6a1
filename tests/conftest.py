import os
from pathlib import Path

import pytest
from hypothesis import settings

# CI (CI=true) tries the same examples on every run, so that its verdict is the code's, not the draw's; a local run
# draws new ones each time, and keeps the failing ones in .hypothesis/
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
CORPUS = SHARED / "data" / "tinyshakespeare.txt"


@pytest.fixture(autouse=True, scope="session")
def _isolated_caches(tmp_path_factory):
    """Token caches go to a fresh directory; tiktoken's reference encoding reads the shared offline cache."""
    os.environ["GPTGEN_CACHE_DIR"] = str(tmp_path_factory.mktemp("gptgen-cache"))
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken_cache"))


@pytest.fixture(autouse=True)
def _engines_closed(monkeypatch):
    """The engine processes a test starts end with it: some twenty (each with torch and a model) stayed until pytest
    exited. A module fixture's engine starts before this fixture does, and ends at exit."""
    from gptgen.engine import Engine

    started, init = [], Engine.__init__

    def tracked(self, *args, **kwargs):
        init(self, *args, **kwargs)
        started.append(self)

    monkeypatch.setattr(Engine, "__init__", tracked)
    yield
    for engine in started:
        engine.close()


@pytest.fixture(scope="session")
def small_text(tmp_path_factory) -> Path:
    """The first 40,000 characters of the reference corpus: ~11k tokens, enough to see a loss fall."""
    path = tmp_path_factory.mktemp("data") / "small.txt"
    path.write_text(CORPUS.read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    return path


@pytest.fixture
def sigint_as_in_a_terminal():
    """Python's own Ctrl-C handler in this process, as a command typed in a terminal has, for a test that raises
    SIGINT in it: a test run started in a script's background ignores SIGINT, which gptgen leaves ignored."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def sigint_as_usual() -> None:
    """A Popen preexec_fn for a child that a test sends Ctrl-C: a test run started in the background (`make test
    &` from a script) ignores SIGINT, children inherit that, and Python then never raises KeyboardInterrupt."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def write_random_int8_model(path: Path, preset: str) -> Path:
    """A randomly initialised int8 model file of a preset (what a server or benchmark needs to load)."""
    import torch

    from gptgen.checkpoint import save_model
    from gptgen.config import GPTConfig
    from gptgen.model import GPT
    from gptgen.quantize import quantize_state_dict

    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name(preset))
    model.init_weights()
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_model(path, quantize_state_dict(state), model.config, quantization="int8",
               training={"preset": preset, "note": "random weights, for tests"})
    return path


BUNDLED = ROOT / "models" / "shakespeare-mini-int8.safetensors"
ARTIFACTS = ROOT / "test-artifacts"  # screenshots of the page, kept after the run


def start_server(args: list[str], log: Path, timeout_s: float = 90.0, spaces_entry: bool = False,
                 poll_s: float = 0.2, own_group: bool = False):
    """`gptgen serve ARGS` (or the Spaces entry point, app.py) in a subprocess on a port the system picks (port
    0: no other test can take it between a check and the bind); returns (process, url) once the printed address
    answers. own_group: in a process group of its own, as a terminal starts a command (for os.killpg)."""
    import contextlib
    import re
    import subprocess
    import sys
    import time
    import urllib.request

    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_SERVER_PORT": "0"}
    command = ["app.py"] if spaces_entry else ["-m", "gptgen", "serve", "--port", "0"]
    proc = subprocess.Popen([sys.executable, *command, *args],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                            start_new_session=own_group)
    deadline, url = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()}")
        url = url or next(iter(re.findall(r"the page is on (http://127\.0\.0\.1:\d+/) ", log.read_text())), None)
        if url:
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return proc, url
        time.sleep(poll_s)
    proc.kill()
    raise RuntimeError(f"server not ready after {timeout_s} s:\n{log.read_text()}")


@pytest.fixture(scope="session")
def web_server(tmp_path_factory):
    """A real `gptgen serve` offering the bundled model (shown first) and a random `gpt2`-size int8 model,
    slow enough on 2 cores (1,024-token context) to watch a stream grow and stop it mid-way."""
    folder = tmp_path_factory.mktemp("models")
    (folder / BUNDLED.name).symlink_to(BUNDLED)
    write_random_int8_model(folder / "random-gpt2-int8.safetensors", "gpt2")
    log = tmp_path_factory.mktemp("server") / "server.log"
    proc, url = start_server(["--models", str(folder), "--model", BUNDLED.stem], log)
    yield url
    proc.terminate()
    proc.wait(timeout=30)
