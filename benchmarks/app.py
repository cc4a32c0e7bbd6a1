"""The page against the model it serves: how much of `model.stream`'s speed reaches a browser and a client.

Starts the real server (`gptgen serve`) on the bundled model and on a random `gpt2`-size int8 model, and
measures: start to ready (process start until the page answers; one start per model, polled every 20 ms),
click to first streamed text on the page (timed inside the browser), end-to-end tokens/s on the page,
through `gradio_client`, and of `model.stream` in this process on the same file and prompt (taking turns,
never at the same time). Median of --runs.

    python benchmarks/app.py [--runs 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from report import emit, tokens_in

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import BUNDLED, start_server, write_random_int8_model  # noqa: E402

PROMPT = "ROMEO:\nBut soft, what light"
GOALS = {"ready_s": 10.0, "first_token_page_s": 0.5, "page_loss": 0.10}

# Click Generate and time, inside the page, the first streamed update and the end. A MutationObserver
# wakes on DOM changes only, so the measuring adds no layout work of its own.
CLICK_AND_TIME = """() => new Promise((resolve, reject) => {
  const stats = document.querySelector('#stats');
  const text = () => stats.querySelector('[data-testid="markdown"]').textContent.trim();
  const before = text();  // the last run's line, until the click clears it
  let first = null, cleared = false;
  const t0 = performance.now();
  const observer = new MutationObserver(() => {
    const now = text();
    cleared = cleared || now !== before;
    if (!cleared) return;
    const done = now.startsWith('Generated') || now.startsWith('Ended');  // Ended: no tokens
    // the first text comes with "Generating…" (the click's own clearing of the line is no text yet)
    if (first === null && (now.startsWith('Generating') || done)) first = performance.now() - t0;
    if (done) {
      observer.disconnect();
      resolve({first_ms: first, total_ms: performance.now() - t0, stats: now});
    }
  });
  observer.observe(stats, {subtree: true, childList: true, characterData: true});
  document.querySelector('#generate').click();
  setTimeout(() => reject(new Error('no finished run after 60 s: ' + text())), 60000);
})"""


# Each way of generating is a function once(seed) -> (tokens, seconds to the last, seconds to the first)


@contextlib.contextmanager
def streamed(path: Path, sampling: dict):
    """model.stream in this process, on the server's file."""
    import gptgen

    model = gptgen.load(str(path), device="cpu")
    model.generate("", max_new_tokens=2, seed=0)  # the server warms up the same way before serving

    def once(seed: int) -> tuple[int, float, float]:
        start = time.perf_counter()
        for _ in model.stream(PROMPT, **{**sampling, "seed": seed}):
            pass
        s = model.last
        return s.new_tokens, time.perf_counter() - start, s.first_token_s

    yield once


@contextlib.contextmanager
def through_client(url: str, sampling: dict):
    from gradio_client import Client

    client = Client(url, verbose=False)

    def once(seed: int) -> tuple[int, float, float]:
        start = time.perf_counter()
        job = client.submit(PROMPT, sampling["max_new_tokens"], sampling["temperature"], sampling["top_k"], 1.0,
                            1.0, seed, api_name="/generate")
        first = None
        for _ in job:
            first = first or time.perf_counter() - start
        return tokens_in(job.outputs()[-1][1]), time.perf_counter() - start, first

    yield once


@contextlib.contextmanager
def through_page(url: str, model_name: str, sampling: dict):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(url)
        page.wait_for_selector("#prompt textarea")
        if model_name not in page.input_value("#model input"):
            page.locator("#model input").click()
            page.locator("[role=option]", has_text=model_name).click()
            page.wait_for_selector(f"#model-card:has-text('{model_name}')")
        page.fill("#prompt textarea", PROMPT)
        max_tokens = page.locator("#max_new_tokens input[type=number]")
        max_tokens.fill(str(sampling["max_new_tokens"]))
        max_tokens.press("Enter")

        def once(seed: int) -> tuple[int, float, float]:
            page.fill("#seed input", str(seed))
            r = page.evaluate(CLICK_AND_TIME)
            return tokens_in(r["stats"]), r["total_ms"] / 1000, r["first_ms"] / 1000

        yield once
        browser.close()


def medians(runs: list[tuple[int, float, float]]) -> dict:
    """End to end: tokens / (click or call to the last token); steady: tokens after the first / time after it."""
    return {"tokens_per_s": statistics.median(n / total for n, total, _ in runs),
            "steady_tokens_per_s": statistics.median((n - 1) / (total - first) for n, total, first in runs),
            "first_s": statistics.median(first for _, _, first in runs)}


def measure(work: Path, runs: int) -> list[dict]:
    """Each model: the server started, then the page, gradio_client and model.stream in this process take turns
    (one generation each, the order rotated each round, never two at once): a slow minute on this shared
    machine then falls on all three."""
    models = work / "models"
    models.mkdir()
    (models / BUNDLED.name).symlink_to(BUNDLED)
    write_random_int8_model(models / "random-gpt2-int8.safetensors", "gpt2")
    rows = []
    for name, n in [(BUNDLED.stem, 256), ("random-gpt2-int8", 256)]:
        sampling = {"max_new_tokens": n, "temperature": 0.8, "top_k": 50}
        start = time.perf_counter()
        proc, url = start_server(["--models", str(models), "--model", name], work / f"{name}.log", poll_s=0.02)
        ready_s = time.perf_counter() - start
        try:
            with (through_page(url, name, sampling) as page, through_client(url, sampling) as client,
                  streamed(models / f"{name}.safetensors", sampling) as stream):
                ways = {"page": page, "client": client, "stream": stream}
                done = {way: [] for way in ways}
                for i in range(runs):
                    order = list(ways)[i % 3:] + list(ways)[:i % 3]
                    for way in order:
                        done[way].append(ways[way](i))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        page, client, alone = (medians(done[way]) for way in ways)
        rows.append({"model": name, "new_tokens": n, "ready_s": ready_s, "first_token_page_s": page["first_s"],
                     "client_first_update_s": client["first_s"], "page": page, "client": client, "stream": alone})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="gptgen-app-bench-") as tmp:
        rows = measure(Path(tmp), args.runs)
    print("end to end = tokens / (click or call to the last token); steady = tokens after the first / time after it")
    print(f"{'model':<22}{'ready s':>8}{'1st token':>10}  {'tokens/s end to end: page':>26}{'client':>8}"
          f"{'stream':>8}  {'steady: page':>13}{'client':>8}{'stream':>8}{'page/stream':>12}{'client/stream':>14}")
    for r in rows:
        p, c, d = r["page"], r["client"], r["stream"]
        r["steady_page_vs_stream"] = p["steady_tokens_per_s"] / d["steady_tokens_per_s"]
        r["steady_client_vs_stream"] = c["steady_tokens_per_s"] / d["steady_tokens_per_s"]
        print(f"{r['model']:<22}{r['ready_s']:>8.2f}{r['first_token_page_s']:>9.3f}s  {p['tokens_per_s']:>26.1f}"
              f"{c['tokens_per_s']:>8.1f}{d['tokens_per_s']:>8.1f}  {p['steady_tokens_per_s']:>13.1f}"
              f"{c['steady_tokens_per_s']:>8.1f}{d['steady_tokens_per_s']:>8.1f}{r['steady_page_vs_stream']:>12.3f}"
              f"{r['steady_client_vs_stream']:>14.3f}")
    print(f"goals: ready <= {GOALS['ready_s']} s, first token on the page <= {GOALS['first_token_page_s']} s, "
          f"page loses <= {GOALS['page_loss']:.0%} of model.stream's tokens/s")
    emit({"benchmark": "app", "runs": args.runs, "rows": rows, "goals": GOALS}, args.json)


if __name__ == "__main__":
    main()
