"""The page and its /generate endpoint, against a real server: a real browser (Debian's chromium through
Playwright) and gradio_client."""

import re
import shutil
import sys
import time

import pytest

import gptgen
from gptgen.web import EXAMPLES
from tests.conftest import ARTIFACTS, BUNDLED, ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))  # report.tokens_in: the benchmarks' reader of the stats line

SAMPLING = dict(max_new_tokens=40, temperature=0.8, top_k=50, top_p=0.95, repetition_penalty=1.1, seed=7)


def _args(prompt, s=SAMPLING, model=BUNDLED.stem):
    return (prompt, s["max_new_tokens"], s["temperature"], s["top_k"], s["top_p"], s["repetition_penalty"],
            s["seed"], model)


@pytest.fixture(scope="module")
def client(web_server):
    from gradio_client import Client

    return Client(web_server, verbose=False)


def test_api_generate_equals_the_python_api(client):
    text, stats = client.predict(*_args("ROMEO:"), api_name="/generate")
    assert text == gptgen.load(str(BUNDLED), device="cpu").generate("ROMEO:", **SAMPLING)
    assert "tokens/s" in stats and "Generated" in stats


def test_api_streams_growing_text_that_ends_as_the_plain_call(client):
    s = {**SAMPLING, "max_new_tokens": 200, "seed": 3}
    job = client.submit(*_args("JULIET:", s), api_name="/generate")
    texts = [out[0] for out in job]
    finished = job.outputs()[-1][0]
    assert len(texts) >= 2 and finished
    assert all(finished.startswith(t) for t in texts)  # each update is a prefix of the final text
    assert finished == client.predict(*_args("JULIET:", s), api_name="/generate")[0]


def test_the_page_is_updated_at_most_about_ten_times_a_second_however_fast_the_text_comes(client):
    """Decoding makes hundreds of pieces a second; each update resends the whole text to the browser."""
    from report import tokens_in

    s = {**SAMPLING, "max_new_tokens": 1000, "seed": 4}
    start = time.perf_counter()
    job = client.submit(*_args("ROMEO:", s), api_name="/generate")
    updates = list(job)
    seconds = time.perf_counter() - start
    tokens = tokens_in(job.outputs()[-1][1])
    assert tokens > 5 * len(updates), (tokens, len(updates))  # pieces were gathered, not sent one by one
    assert len(updates) <= 10 * seconds + 3, (len(updates), seconds)  # + the first and the last


def test_stop_strings_one_a_line_with_backslash_n_for_a_line_break_end_the_text_before_them(client):
    """DESIGN: the same sampling parameters everywhere, the web form's too; the page had no stop strings."""
    greedy = {**SAMPLING, "temperature": 0}
    whole = client.predict(*_args("ROMEO:", greedy), api_name="/generate")[0]
    assert "\n\nJULIET" in whole  # the bundled model's greedy text has this blank line
    for box, before in (("never in it\n\\n\\nJULIET", "\n\nJULIET"), ("thee", "thee")):
        text = client.predict(*_args("ROMEO:", greedy), box, api_name="/generate")[0]
        assert text == whole[:whole.index(before)], (box, text)


def test_the_model_is_optional_and_minus_one_or_none_means_a_random_seed(client):
    s = {**SAMPLING, "max_new_tokens": 20}
    ours = client.predict(*_args("ROMEO:", s), api_name="/generate")[0]
    assert client.predict(*_args("ROMEO:", s)[:-1], api_name="/generate")[0] == ours  # the default model
    texts = {client.predict(*_args("ROMEO:", {**s, "seed": seed}), api_name="/generate")[0]
             for seed in (-1, None, -1, None)}
    assert len(texts) > 1  # four random seeds, not one fixed seed


@pytest.mark.parametrize("field, value, message", [
    (2, -1.0, "temperature must be 0 (greedy) or positive"),
    (3, 0.5, "top_k must be a whole number"),
    (4, 0.0, "top_p must be in (0, 1]"),
    (1, 10**6, "greater than maximum value 4096"),  # the cap of every other way in
    (7, "../../etc/passwd", "is not in the list of choices"),  # names only, never paths
    (6, -5, "seed must be between 0 and 2**63 - 1, got -5"),  # only -1 means random
    (6, 2**53 + 1, "seed must be below 2**53"),  # the page's box would round it to another seed
])
def test_api_bad_parameters_get_a_clear_error_and_the_server_goes_on(client, field, value, message):
    from gradio_client.exceptions import AppError

    args = list(_args("Hi"))
    args[field] = value
    with pytest.raises(AppError, match=re.escape(message)):
        client.predict(*args, api_name="/generate")
    assert client.predict(*_args("Hi"), api_name="/generate")[0]


@pytest.mark.parametrize("field, value, message", [
    (6, 1.5, "seed must be a whole number, got 1.5"),  # the page's own check
    (2, None, "temperature is empty; give a number (0.8 is the default)"),  # a box left blank
    (2, -1.0, "temperature must be 0 (greedy) or positive, got -1.0"),  # Sampling's
])
def test_a_bad_value_is_its_message_alone_and_one_line_in_the_server_log(client, tmp_path_factory, field, value,
                                                                         message):
    from gradio_client.exceptions import AppError

    (log,) = tmp_path_factory.getbasetemp().glob("server[0-9]*/server.log")  # conftest's web_server writes it
    before = log.stat().st_size
    args = list(_args("Hi"))
    args[field] = value
    with pytest.raises(AppError) as e:
        client.predict(*args, api_name="/generate")
    assert e.value.message == message  # not repr'd into quotes
    assert log.read_bytes()[before:].decode() == f"page request refused: {message}\n"  # no traceback


def test_the_stats_say_the_model_saw_only_its_context_when_the_prompt_was_longer():
    from gptgen.generate import Stats
    from gptgen.web import stats_line

    assert "(the model saw its last 128)" in stats_line(Stats(prompt_tokens=129, new_tokens=2), 128)
    assert "saw its last" not in stats_line(Stats(prompt_tokens=128, new_tokens=2), 128)


def test_picking_a_model_shows_its_card_without_loading_it(monkeypatch):
    """The pick loaded the model in the engine, which decodes nothing for anyone while it loads (tens of seconds
    compiling on CUDA): a visitor browsing the list stalled every stream."""
    from gptgen.serve import ModelShelf, UnknownModel
    from gptgen.web import build_app

    shelf = ModelShelf({"a": BUNDLED, "b": BUNDLED})
    loads = []
    monkeypatch.setattr(shelf.engine, "load", lambda name, path: loads.append(name))
    app = build_app(shelf, "a")
    show_model = next(f.fn for f in app.fns.values() if getattr(f.fn, "__name__", "") == "show_model")
    card, _ = show_model("b")
    assert card.startswith("### b\n") and "16.1M parameters" in card and loads == []
    with pytest.raises(UnknownModel, match="unknown model 'c'"):
        show_model("c")
    shelf.get("b")  # its first request loads it
    assert loads == ["b"]


def test_the_pages_queue_runs_every_stream_the_engine_takes_at_once():
    """Gradio's queue ran 40 events at once (its default): the 41st visitor waited in it, with rows free."""
    from gptgen.serve import ModelShelf
    from gptgen.web import build_app

    shelf = ModelShelf({"a": BUNDLED}, rows=100)
    app = build_app(shelf, "a")
    assert app._queue.max_thread_count > shelf.engine.rows + shelf.engine.max_waiting  # and the cards' events


def test_a_click_while_the_last_run_loads_its_model_ends_that_run_without_a_word(monkeypatch):
    """The last run had no stream to end yet while its model loaded for it (tens of seconds on CUDA): it then
    streamed its text, made with the old settings, onto the page that the new click had cleared."""
    import types

    from gptgen.serve import ModelShelf
    from gptgen.web import build_app

    shelf = ModelShelf({"a": BUNDLED})
    app = build_app(shelf, "a")
    fns = {getattr(f.fn, "__name__", ""): f.fn for f in app.fns.values()}
    request, stream = types.SimpleNamespace(session_hash="s"), shelf.stream

    def a_click_while_loading(*args, **kwargs):
        fns["start"](request)
        return stream(*args, **kwargs)

    monkeypatch.setattr(shelf, "stream", a_click_while_loading)
    fns["start"](request)
    args = ("ROMEO:", 200, 0.8, 50, 1.0, 1.0, 1, "a", "", request)
    assert list(fns["generate"](*args)) == [] and not shelf.engine._replies  # nothing shown, its row freed
    monkeypatch.undo()
    fns["start"](request)
    assert list(fns["generate"](*args))[-1][1].startswith("Generated **200 tokens**")  # the new click's run


def test_the_model_panel_says_how_a_model_was_made_or_where_it_was_imported_from(tmp_path):
    from gptgen.interop import export_hf, import_hf
    from gptgen.web import model_card

    bundled = gptgen.load(BUNDLED)
    text, curve = model_card("bundled", bundled.config, bundled.metadata)
    assert "**Preset**: mini" in text and "**Trained on**: tinyshakespeare.txt (1,115,394 bytes" in text
    assert len(curve) > 10
    export_hf(BUNDLED, tmp_path / "hf")
    (tmp_path / "hf" / "gptgen.json").unlink()  # a plain transformers GPT-2, as openai-community/gpt2 is
    import_hf(tmp_path / "hf", tmp_path / "gpt2.safetensors", origin="openai-community/gpt2@" + "c" * 40)
    imported = gptgen.load(tmp_path / "gpt2.safetensors")
    text, curve = model_card("gpt2", imported.config, imported.metadata)
    assert f"**Preset**: imported from openai-community/gpt2@{'c' * 40}" in text and "**Weights**: float" in text
    assert "**Trained on**: unknown" in text and curve.empty


def _ready(page) -> None:
    page.wait_for_selector("#prompt textarea")
    page.wait_for_load_state("networkidle")  # the page's own load event (the model panel) has run


@pytest.fixture(scope="module")
def browser_tab(web_server):
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    assert chromium, "the browser tests need Debian's chromium: apt-get install chromium"
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        tab = browser.new_page(viewport={"width": 1280, "height": 1000})
        tab.goto(web_server)
        _ready(tab)
        yield tab
        browser.close()


@pytest.fixture
def page(browser_tab):
    """The page as loaded, for each test: a test that fails half-way leaves no settings or run to the next."""
    yield browser_tab
    browser_tab.reload()
    _ready(browser_tab)


def _output(page) -> str:
    return page.input_value("#output textarea")


# Clicks Generate, then records the output's length at every frame until the page reports the run ended (in
# window.run.stats): stats that differ from the last run's, and say it was generated or refused.
START_WATCHED_RUN = """() => {
  const out = document.querySelector('#output textarea');
  const stats = () => document.querySelector('#stats [data-testid=markdown]')?.textContent ?? '';  // not the timer
  const before = stats();
  const run = window.run = {lengths: [], stats: null, changed: false};
  const frame = () => {
    run.lengths.push(out.value.length);
    const now = stats();
    run.changed ||= now !== before;
    if (run.changed && (now.includes('Generated') || now.includes('⚠'))) run.stats = now.trim();
    else requestAnimationFrame(frame);
  };
  document.querySelector('#generate').click();
  requestAnimationFrame(frame);
}"""


def _watched_run(page, timeout_s: float = 60) -> dict:
    """Generate and wait for the run's end: {"lengths": the output's length at each frame, "stats": the page's}."""
    page.evaluate(START_WATCHED_RUN)
    page.wait_for_function("window.run.stats !== null", timeout=timeout_s * 1000)
    return page.evaluate("window.run")


def _set_max_new_tokens(page, n: int) -> None:
    page.fill("#max_new_tokens input[type=number]", str(n))
    page.locator("#max_new_tokens input[type=number]").press("Enter")  # the slider takes the box's value


# Generate, then Stop as soon as the click has cleared the last run's text (its start() has run, and the run waits
# in Gradio's queue or for a row).
CLICK_THEN_STOP_ONCE_CLEARED = """() => new Promise((resolve, reject) => {
  setTimeout(() => reject(new Error('the click did not clear the page in 30 s')), 30000);  // else evaluate() hangs
  document.querySelector('#generate').click();
  const cleared = () => document.querySelector('#output textarea').value === ''
    ? resolve(document.querySelector('#stop').click()) : requestAnimationFrame(cleared);
  cleared();
})"""


def _finish_a_short_run(page) -> None:
    page.fill("#prompt textarea", "Hello")
    _set_max_new_tokens(page, 5)
    stats = _watched_run(page, timeout_s=30)["stats"]
    assert stats.startswith("Generated"), stats


def test_page_example_fills_the_prompt_and_the_text_streams_then_finishes(page):
    from playwright.sync_api import expect

    page.get_by_text(EXAMPLES[1].split("\n")[0]).first.click()
    expect(page.locator("#prompt textarea")).to_have_value(EXAMPLES[1])
    page.fill("#seed input", "5")
    _set_max_new_tokens(page, 256)
    run = _watched_run(page)
    final = len(_output(page))
    assert "Generated" in run["stats"] and "tokens/s" in run["stats"] and final > 0
    partial = sorted({n for n in run["lengths"] if 0 < n < final})
    assert partial, f"the text never showed part-way (lengths seen: {run['lengths'][:50]})"
    page.screenshot(path=ARTIFACTS / "page-generated.png", full_page=True)


def test_shift_enter_in_the_prompt_generates_and_plain_enter_starts_a_new_line(page):
    from playwright.sync_api import expect

    _finish_a_short_run(page)
    _set_max_new_tokens(page, 6)  # stats that the last run's cannot be
    page.fill("#prompt textarea", "ROMEO:")
    page.locator("#prompt textarea").press("Enter")
    expect(page.locator("#prompt textarea")).to_have_value("ROMEO:\n")
    page.locator("#prompt textarea").press("Shift+Enter")
    page.wait_for_selector("#stats:has-text('Generated 6 tokens')", timeout=30_000)
    expect(page.locator("#prompt textarea")).to_have_value("ROMEO:\n")  # Shift+Enter added no line


def test_a_refused_request_clears_the_last_run_and_keeps_its_message(page):
    _finish_a_short_run(page)
    assert _output(page) != ""  # a last run's text, for the refusal to clear
    page.fill("#seed input", "1.5")
    page.click("#generate")
    page.wait_for_selector("#stats:has-text('⚠ seed must be a whole number, got 1.5')", timeout=10_000)
    assert _output(page) == ""  # not the previous run's text, as if these settings had made it
    page.fill("#seed input", "-1")


def test_page_picks_a_model_by_name_and_stop_ends_the_stream(page):
    _set_max_new_tokens(page, 64)
    page.locator("#model input").click()
    page.locator("[role=option]", has_text="random-gpt2-int8").click()
    page.wait_for_selector("#model-card:has-text('124.4M parameters')")
    assert page.input_value("#max_new_tokens input[type=number]") == "64"  # the user's value, not the default
    page.fill("#prompt textarea", "Hello")
    page.fill("#seed input", "1")  # a text that does not end (<|endoftext|>) before the Stop
    _set_max_new_tokens(page, 1000)
    page.click("#generate")  # its first click loads the model (seconds on a busy machine)
    page.wait_for_function("document.querySelector('#output textarea').value.length > 20", timeout=90_000)
    page.click("#stop")
    page.wait_for_selector("#stats:has-text('Stopped after')", timeout=10_000)
    stopped = _output(page)
    time.sleep(1.0)
    assert _output(page) == stopped  # nothing more arrives
    tokens = int(page.inner_text("#stats").split("Stopped after")[1].split("tokens")[0])
    assert 0 < tokens < 1000
    page.screenshot(path=ARTIFACTS / "page-stopped.png", full_page=True)
    page.locator("#model input").click()
    page.locator("[role=option]", has_text=BUNDLED.stem).click()
    page.wait_for_selector("#model-card:has-text('16.1M parameters')")


def test_page_shows_a_bad_value_as_an_error(page):
    page.fill("#prompt textarea", "ROMEO:")
    page.fill("#temperature input", "-1")
    page.click("#generate")
    page.wait_for_selector("text=temperature must be 0 (greedy) or positive", timeout=10_000)
    page.screenshot(path=ARTIFACTS / "page-error.png", full_page=True)
    page.fill("#temperature input", "0.8")


def test_stop_pressed_while_the_run_waits_to_start_is_not_lost(page):
    """A Stop pressed before the first text (the run still queued) used to be wiped when the run started."""
    _finish_a_short_run(page)
    _set_max_new_tokens(page, 2000)  # seconds of text: a slow Stop still finds the run going
    page.evaluate(CLICK_THEN_STOP_ONCE_CLEARED)  # the new run is on its way, and Stop comes before its text
    page.wait_for_selector("#stats:has-text('Stopped')", timeout=30_000)
    stats = page.inner_text("#stats")
    before_any = stats.startswith("Stopped before the first token")
    assert before_any or int(stats.split("Stopped after")[1].split("token")[0]) < 2000


def test_stop_pressed_while_the_run_waits_for_a_row_ends_it_before_its_first_token(page, tmp_path):
    """With the one row (--max-batch 1) held by another user's long run, a page's run waits, in Gradio's queue or
    in the engine, where no piece comes to be checked: a Stop pressed as soon as the click has cleared the page must
    end it there, and the page say so."""
    from gradio_client import Client

    from tests.conftest import start_server, write_random_int8_model

    model = write_random_int8_model(tmp_path / "gpt2.safetensors", "gpt2")  # ~30 s for 4,096 tokens on 2 cores
    tab = page.context.browser.new_page()  # the module's browser, on this server
    proc, url = start_server(["--model", str(model), "--max-batch", "1"], tmp_path / "server.log")
    try:
        tab.goto(url)
        _ready(tab)
        _finish_a_short_run(tab)  # text on the page, for the next click to clear
        holder = Client(url, verbose=False).submit(*_args("A", {**SAMPLING, "max_new_tokens": 4096}, model.stem),
                                                   api_name="/generate")
        next(iter(holder))  # its first text: it has the row
        tab.evaluate(CLICK_THEN_STOP_ONCE_CLEARED)
        tab.wait_for_selector("#stats:has-text('Stopped before the first token')", timeout=15_000)
        assert _output(tab) == "" and not holder.done()
    finally:
        tab.close()
        proc.terminate()
        proc.wait(timeout=30)
        print((tmp_path / "server.log").read_text())  # shown if the test failed


def test_a_stop_pressed_while_idle_does_not_stop_the_next_run(page):
    """Stop after a run has ended is a no-op: it must not end the next run at its first piece."""
    _finish_a_short_run(page)
    with page.expect_response(lambda r: r.request.method == "POST" and "/run/predict" in r.url):
        page.click("#stop")  # its request (not queued) answered: the server has taken the Stop
    _set_max_new_tokens(page, 7)  # this run's stats differ from the last one's
    page.click("#generate")
    page.wait_for_selector("#stats:has-text('Generated 7 tokens'), #stats:has-text('Stopped after')", timeout=30_000)
    assert page.inner_text("#stats").startswith("Generated 7 tokens")


def test_generate_clicked_while_a_run_streams_ends_it_and_runs_the_new_settings(page):
    """The second click was dropped (Gradio's trigger_mode "once") while its start had cleared the page: the old
    run's text filled it again and was reported as if the new settings had made it."""
    page.fill("#prompt textarea", "ROMEO:")
    page.fill("#seed input", "5")
    _set_max_new_tokens(page, 2000)
    page.click("#generate")
    page.wait_for_function("document.querySelector('#output textarea').value.length > 20", timeout=30_000)
    page.fill("#seed input", "6")
    _set_max_new_tokens(page, 9)
    page.click("#generate")
    page.wait_for_selector("#stats:has-text('Generated 9 tokens')", timeout=30_000)
    new_settings = _output(page)
    time.sleep(1.0)
    assert _output(page) == new_settings and page.inner_text("#stats").startswith("Generated 9 tokens")
    _finish_a_short_run(page)  # another text on the page, then the same settings alone
    page.fill("#prompt textarea", "ROMEO:")
    _set_max_new_tokens(page, 9)
    page.click("#generate")
    page.wait_for_selector("#stats:has-text('Generated 9 tokens')", timeout=30_000)
    assert _output(page) == new_settings
    page.fill("#seed input", "-1")
