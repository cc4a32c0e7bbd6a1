"""The soak, short: 32 streaming clients (openai and gradio_client) against a real server for 30 s.

The full form (the `gpt2` preset for 5 minutes) is `python benchmarks/serve_load.py --soak-minutes 5`,
run by `make bench`.
"""

import sys

from tests.conftest import BUNDLED, ROOT, start_server

sys.path.insert(0, str(ROOT / "benchmarks"))
import serve_load  # noqa: E402


def test_32_clients_for_30_seconds_lose_nothing_and_the_page_answers(tmp_path):
    proc, url = start_server(["--model", str(BUNDLED)], tmp_path / "server.log")
    try:
        s = serve_load.soak(url, BUNDLED.stem, proc.pid, clients=32, seconds=30, max_tokens=64, sample_every_s=2)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(s)
    assert s["failed"] == 0, s["errors"]
    assert s["requests"] >= 32 and s["tokens"] > 0
    assert s["page_checks"] >= 5 and s["page_ok"] == s["page_checks"]
    assert s["rss_growth"] < 0.10
