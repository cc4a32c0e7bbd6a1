"""The page against the model it serves: how much of `model.stream`'s speed reaches a browser and a client.

Starts the real server (`gptgen serve`) on the bundled model and on a random `gpt2`-size int8 model, and
measures: start to ready (process start until the page answers), click to first streamed text on the
page (timed inside the browser), end-to-end tokens/s on the page, through `gradio_client`, and of
`model.stream` in this process on the same file and prompt (never at the same time). Median of --runs.

    python benchmarks/app.py [--runs 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from report import emit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import BUNDLED, start_server, write_random_int8_model  # noqa: E402

PROMPT = "ROMEO:\nBut soft, what light"
GOALS = {"ready_s": 10.0, "first_token_page_s": 0.5, "page_loss": 0.10}

# Click Generate and time, inside the page, the first streamed update and the end (the stats line changes).
CLICK_AND_TIME = """async () => {
  const stats = () => document.querySelector('#stats [data-testid="markdown"]').innerText;
  const before = stats();
  const t0 = performance.now();
  document.querySelector('#generate').click();
  const tick = () => new Promise(r => setTimeout(r, 2));
  while (stats() === before) await tick();  // the first update brings the first text and "Generating…"
  const first = performance.now() - t0;
  while (!stats().startsWith('Generated')) await tick();
  return {first_ms: first, total_ms: performance.now() - t0, stats: stats()};
}"""


def tokens_in(stats: str) -> int:
    return int(stats.split("**" if "**" in stats else "Generated")[1].split("tokens")[0].strip(" *"))


def direct(path: Path, sampling: dict, runs: int) -> dict:
    import gptgen

    model = gptgen.load(str(path), device="cpu")
    model.generate("", max_new_tokens=2, seed=0)  # the server warms up the same way before serving
    rates = []
    for i in range(runs):
        start = time.perf_counter()
        for _ in model.stream(PROMPT, **{**sampling, "seed": i}):
            pass
        rates.append(model.last.new_tokens / (time.perf_counter() - start))
    return {"tokens_per_s": statistics.median(rates)}


def through_client(url: str, sampling: dict, runs: int) -> dict:
    from gradio_client import Client

    client = Client(url, verbose=False)
    rates, firsts = [], []
    for i in range(runs):
        start = time.perf_counter()
        job = client.submit(PROMPT, sampling["max_new_tokens"], sampling["temperature"], sampling["top_k"], 1.0,
                            1.0, i, api_name="/generate")
        first = None
        for _ in job:
            first = first or time.perf_counter() - start
        text, stats = job.outputs()[-1]
        rates.append(tokens_in(stats) / (time.perf_counter() - start))
        firsts.append(first)
    return {"tokens_per_s": statistics.median(rates), "first_update_s": statistics.median(firsts)}


def through_page(url: str, model_name: str, sampling: dict, runs: int) -> dict:
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
        rates, firsts = [], []
        for i in range(runs):
            page.fill("#seed input", str(i))
            r = page.evaluate(CLICK_AND_TIME)
            rates.append(tokens_in(r["stats"]) / (r["total_ms"] / 1000))
            firsts.append(r["first_ms"] / 1000)
        browser.close()
    return {"tokens_per_s": statistics.median(rates), "first_token_s": statistics.median(firsts)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gptgen-app-bench-"))
    models = work / "models"
    models.mkdir()
    (models / BUNDLED.name).symlink_to(BUNDLED)
    write_random_int8_model(models / "random-gpt2-int8.safetensors", "gpt2")
    cases = [(BUNDLED.stem, 256), ("random-gpt2-int8", 256)]
    rows = []
    for name, n in cases:
        sampling = {"max_new_tokens": n, "temperature": 0.8, "top_k": 50}
        start = time.perf_counter()
        proc, url = start_server(["--models", str(models), "--model", name], work / f"{name}.log")
        ready_s = time.perf_counter() - start
        try:
            page = through_page(url, name, sampling, args.runs)
            client = through_client(url, sampling, args.runs)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        alone = direct(models / f"{name}.safetensors", sampling, args.runs)
        rows.append({"model": name, "new_tokens": n, "ready_s": ready_s, "first_token_page_s": page["first_token_s"],
                     "page_tokens_per_s": page["tokens_per_s"], "client_tokens_per_s": client["tokens_per_s"],
                     "client_first_update_s": client["first_update_s"],
                     "stream_tokens_per_s": alone["tokens_per_s"],
                     "page_vs_stream": page["tokens_per_s"] / alone["tokens_per_s"],
                     "client_vs_stream": client["tokens_per_s"] / alone["tokens_per_s"]})
    print(f"{'model':<22}{'ready s':>9}{'1st token page s':>18}{'page tok/s':>12}{'client tok/s':>14}"
          f"{'stream tok/s':>14}{'page/stream':>13}{'client/stream':>15}")
    for r in rows:
        print(f"{r['model']:<22}{r['ready_s']:>9.2f}{r['first_token_page_s']:>18.3f}{r['page_tokens_per_s']:>12.1f}"
              f"{r['client_tokens_per_s']:>14.1f}{r['stream_tokens_per_s']:>14.1f}{r['page_vs_stream']:>13.3f}"
              f"{r['client_vs_stream']:>15.3f}")
    print(f"goals: ready <= {GOALS['ready_s']} s, first token on the page <= {GOALS['first_token_page_s']} s, "
          f"page loses <= {GOALS['page_loss']:.0%} of model.stream's tokens/s")
    emit({"benchmark": "app", "runs": args.runs, "rows": rows, "goals": GOALS}, args.json)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
