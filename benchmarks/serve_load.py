"""Many users at once: a real `gptgen serve` driven by real clients (`openai` and `gradio_client`).

Starts the server on a random-weight `gpt2`-preset int8 model (or --model FILE), then, for each client
count, runs that many clients for --seconds, each streaming one request after another, through the
OpenAI-compatible API and the Gradio API in turn (client i starts with the one at i % 2): every client count,
one included, runs the same half-and-half mix, so the ratio to one client compares like with like (with one
client on OpenAI's API alone, it compared a mix against the lighter client). Reports aggregate and per-client
tokens/s, p50/p95 time to first token, and failed requests, with the aggregate's ratio to one client.
--soak-minutes then runs 32 streaming clients for that long, sampling the server's memory (PSS) and asking for
the page every few seconds.

    python benchmarks/serve_load.py [--clients 1,4,8,32] [--seconds 30] [--soak-minutes 5] [--json out.json]

The clients run in this process, on the same cores as the server: their own work is in the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import gradio_client
import openai
from report import emit, status_mib, tokens_in

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import start_server, write_random_int8_model  # noqa: E402

PROMPT = "ROMEO:\nBut soft, what light through yonder window breaks? It is the east, and"  # 21 tokens
SAMPLING = {"temperature": 0.8, "top_k": 50}
KINDS = ["openai", "gradio"]  # client i's request j uses KINDS[(i + j) % len(KINDS)]
GOALS = {"speedup_at_8": 3.0, "per_client_tok_s_at_8": 10.0}


def openai_request(url: str, model: str, max_tokens: int) -> tuple[float | None, int]:
    """(seconds to the first streamed text, tokens) of one streaming completion."""
    client = openai.OpenAI(base_url=f"{url}v1", api_key="-", max_retries=0, timeout=600)
    start, first, text, finish = time.perf_counter(), None, "", None
    stream = client.completions.create(model=model, prompt=PROMPT, max_tokens=max_tokens, stream=True,
                                       temperature=SAMPLING["temperature"], extra_body={"top_k": SAMPLING["top_k"]})
    for chunk in stream:
        piece = chunk.choices[0].text
        if piece and first is None:
            first = time.perf_counter() - start
        text += piece
        finish = chunk.choices[0].finish_reason or finish
    return first, max_tokens if finish == "length" else _count(text)


def gradio_request(client, model: str, max_tokens: int) -> tuple[float | None, int]:
    start, first = time.perf_counter(), None
    job = client.submit(PROMPT, max_tokens, SAMPLING["temperature"], SAMPLING["top_k"], 1.0, 1.0, -1, model,
                        api_name="/generate")
    for text, _ in job:
        if text and first is None:
            first = time.perf_counter() - start
    return first, tokens_in(job.outputs()[-1][1])


def _count(text: str) -> int:
    from gptgen.tokenizer import get_tokenizer

    return len(get_tokenizer().encode_ordinary(text))


def is_busy(error: Exception) -> bool:
    """The clear "queue full, retry" answers: a 429 from the API, Gradio's queue-full or our busy message."""
    message = str(error).lower()
    return getattr(error, "status_code", None) == 429 or "busy" in message or "queue is full" in message


class Client(threading.Thread):
    """One user: streaming requests back to back until the deadline, through each API in turn from `first`
    (an index in KINDS); records each request."""

    def __init__(self, first: int, url: str, model: str, max_tokens: int, deadline: float) -> None:
        super().__init__(daemon=True)
        self.first, self.url, self.model, self.max_tokens, self.deadline = first, url, model, max_tokens, deadline
        self.done: list[tuple[float | None, float, int]] = []  # (first text s, or None if none came; request s, tokens)
        self.busy = self.failed = 0
        self.errors: list[str] = []

    def run(self) -> None:
        gradio = None
        for j in itertools.count(self.first):
            if time.perf_counter() >= self.deadline:
                break
            start = time.perf_counter()
            try:
                if KINDS[j % len(KINDS)] == "openai":
                    first, tokens = openai_request(self.url, self.model, self.max_tokens)
                else:
                    gradio = gradio or gradio_client.Client(self.url, verbose=False)
                    first, tokens = gradio_request(gradio, self.model, self.max_tokens)
                self.done.append((first, time.perf_counter() - start, tokens))
            except Exception as e:  # counted, never raised: the run goes on
                if is_busy(e):
                    self.busy += 1
                    time.sleep(1.0)
                else:
                    self.failed += 1
                    self.errors.append(f"{type(e).__name__}: {str(e)[:200]}")
                    time.sleep(1.0)

    @property
    def tokens(self) -> int:
        return sum(tokens for _, _, tokens in self.done)


def run_clients(url: str, model: str, n: int, seconds: float, max_tokens: int) -> tuple[list[Client], float]:
    deadline = time.perf_counter() + seconds
    clients = [Client(i % len(KINDS), url, model, max_tokens, deadline) for i in range(n)]
    start = time.perf_counter()
    for c in clients:
        c.start()
    for c in clients:
        c.join()
    return clients, time.perf_counter() - start  # past the deadline: the last requests finish


def percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))] if values else float("nan")


def process_tree(pid: int) -> Iterator[int]:
    """pid and all its descendants (the server and its engine process)."""
    yield pid
    with contextlib.suppress(FileNotFoundError):  # a process or thread that ended meanwhile (anyio's idle workers)
        for task in list(Path(f"/proc/{pid}/task").iterdir()):
            with contextlib.suppress(FileNotFoundError):
                for child in (task / "children").read_text().split():
                    yield from process_tree(int(child))


def cpu_s(pid: int, children: bool = True) -> float:
    """User + system CPU seconds of a process (and its descendants) so far."""
    def own(p: int) -> float:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):  # a child that ended since it was listed
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    return sum(own(p) for p in process_tree(pid)) if children else own(pid)


def level(url: str, model: str, n: int, seconds: float, max_tokens: int, pid: int) -> dict:
    server0, client0 = cpu_s(pid), cpu_s(os.getpid(), children=False)
    clients, wall = run_clients(url, model, n, seconds, max_tokens)
    server_cores = (cpu_s(pid) - server0) / wall
    client_cores = (cpu_s(os.getpid(), children=False) - client0) / wall
    firsts = [first for c in clients for first, _, _ in c.done if first is not None]
    per_client = [c.tokens / wall for c in clients]
    return {"clients": n, "requests": sum(len(c.done) for c in clients), "tokens": sum(c.tokens for c in clients),
            "wall_s": wall, "aggregate_tok_s": sum(c.tokens for c in clients) / wall,
            "per_client_min_tok_s": min(per_client), "per_client_median_tok_s": statistics.median(per_client),
            "ttft_p50_s": percentile(firsts, 50), "ttft_p95_s": percentile(firsts, 95),
            "busy": sum(c.busy for c in clients), "failed": sum(c.failed for c in clients),
            "server_cores": server_cores, "client_cores": client_cores,
            "errors": [e for c in clients for e in c.errors][:5]}


def pss_mib(pid: int) -> float:
    """Memory of a process and its descendants (the server, its engine, multiprocessing's resource tracker): their
    PSS, which shares each page they share (torch's libraries, mapped by server and engine) among them. Their RSS
    summed, which the soak read before 2026-11-29, counted such pages once per process."""
    return sum(status_mib("Pss", p, "smaps_rollup") for p in process_tree(pid))


def soak(url: str, model: str, pid: int, clients: int, seconds: float, max_tokens: int,
         sample_every_s: float = 5.0) -> dict:
    """`clients` streaming clients for `seconds`; memory (PSS) and a page request every sample_every_s.

    Memory growth is from the first sample after the first fifth of the run (the KV cache rows are touched
    as sequences first reach each length) to the last sample.
    """
    import httpx

    samples, page = [], []
    stop = threading.Event()

    start = time.perf_counter()
    samples.append((0.0, pss_mib(pid)))  # a soak shorter than one interval still has a reading

    def watch() -> None:
        while not stop.wait(sample_every_s):
            t = time.perf_counter()
            try:
                ok = httpx.get(url, timeout=30).status_code == 200
            except httpx.HTTPError:
                ok = False
            page.append((ok, time.perf_counter() - t))
            samples.append((time.perf_counter() - start, pss_mib(pid)))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    result = level(url, model, clients, seconds, max_tokens, pid)
    stop.set()
    watcher.join()
    warm = [pss for t, pss in samples if t >= seconds / 5] or [samples[-1][1]]
    return {**result, "pss_start_mib": warm[0], "pss_end_mib": warm[-1], "pss_growth": warm[-1] / warm[0] - 1,
            "pss_samples": len(samples), "page_checks": len(page), "page_ok": sum(ok for ok, _ in page),
            "page_max_s": max((s for _, s in page), default=float("nan"))}


def add_ratios(rows: list[dict]) -> None:
    """Each level's aggregate against one client's (None without a one-client level that made tokens)."""
    one = next((r["aggregate_tok_s"] for r in rows if r["clients"] == 1), 0)
    for r in rows:
        r["vs_one_client"] = r["aggregate_tok_s"] / one if one else None


def print_levels(rows: list[dict]) -> None:
    print(f"{'clients':>7} {'requests':>8} {'agg tok/s':>9} {'vs 1':>6} {'client min':>10} {'client med':>10} "
          f"{'TTFT p50':>8} {'TTFT p95':>8} {'busy':>5} {'failed':>6} {'server CPU':>10} {'client CPU':>10}")
    for r in rows:
        print(f"{r['clients']:>7} {r['requests']:>8} {r['aggregate_tok_s']:>9.1f} {_times(r['vs_one_client']):>6} "
              f"{r['per_client_min_tok_s']:>10.1f} {r['per_client_median_tok_s']:>10.1f} {r['ttft_p50_s']:>7.2f}s "
              f"{r['ttft_p95_s']:>7.2f}s {r['busy']:>5} {r['failed']:>6} {r['server_cores']:>9.2f}c "
              f"{r['client_cores']:>9.2f}c")
        for e in r["errors"]:
            print(f"        error: {e}")


def _times(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.2f}x"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", default="1,4,8,32")
    p.add_argument("--seconds", type=float, default=30.0, help="per client count")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens per request")
    p.add_argument("--soak-minutes", type=float, default=0.0, help="then 32 clients for this long (0 = no soak)")
    p.add_argument("--model", help="a model file (default: a random-weight gpt2-preset int8 model)")
    p.add_argument("--threads", type=int, help="the server's engine threads (default: its own choice)")
    p.add_argument("--json")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.model) if args.model else write_random_int8_model(Path(tmp) / "gpt2-int8.safetensors", "gpt2")
        threads = ["--threads", str(args.threads)] if args.threads else []
        proc, url = start_server(["--model", str(path), *threads], Path(tmp) / "server.log")
        try:
            rows = [level(url, path.stem, int(n), args.seconds, args.max_tokens, proc.pid)
                    for n in args.clients.split(",")]
            add_ratios(rows)
            result = {"model": path.stem, "max_tokens": args.max_tokens, "levels": rows}
            print(f"{path.stem}, {args.max_tokens} tokens a request, {args.seconds:.0f} s per client count, "
                  f"each client alternating openai and gradio_client")
            print_levels(rows)
            at8 = next((r for r in rows if r["clients"] == 8), None)
            if at8:
                print(f"at 8 clients: aggregate {_times(at8['vs_one_client'])} one client "
                      f"(goal >= {GOALS['speedup_at_8']}x), slowest client {at8['per_client_min_tok_s']:.1f} tok/s "
                      f"(goal >= {GOALS['per_client_tok_s_at_8']})")
            if args.soak_minutes:
                s = soak(url, path.stem, proc.pid, 32, args.soak_minutes * 60, args.max_tokens)
                result["soak"] = s
                print(f"soak: 32 clients for {args.soak_minutes:g} min: {s['requests']} requests, {s['failed']} "
                      f"failed, {s['busy']} busy; PSS {s['pss_start_mib']:.0f} -> {s['pss_end_mib']:.0f} MiB "
                      f"({s['pss_growth']:+.1%}); page answered {s['page_ok']}/{s['page_checks']} "
                      f"(slowest {s['page_max_s']:.2f} s)")
            emit(result, args.json)
        finally:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
