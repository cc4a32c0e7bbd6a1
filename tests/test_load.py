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
    assert s["page_checks"] >= 3 and s["page_ok"] == s["page_checks"]  # ~15 when the machine is idle
    assert s["pss_growth"] < 0.10


def test_the_benchmarks_read_the_token_count_of_every_stats_line_the_page_writes():
    """As markdown (gradio_client gets it) and as the browser shows it: thousands, one token, none."""
    import re

    from report import tokens_in

    from gptgen.generate import Stats
    from gptgen.web import stats_line

    for n in (0, 1, 2, 1234):
        for stopped in (False, True):
            line = stats_line(Stats(prompt_tokens=5, new_tokens=n, first_token_s=0.1, total_s=0.5), 1024, stopped)
            assert tokens_in(line) == n, line
            assert tokens_in(re.sub(r"\*\*", "", line)) == n, line
