"""The Gradio page and its named API endpoint `/generate`: one streaming handler serves both.

The page names models, never paths (the server's `ModelShelf` maps names to files). Generation goes
through `ModelShelf.stream`, like the OpenAI-compatible routes: the engine process decodes every
request together, and each gets the text `TextModel.stream` (the CLI, the Python API) gives alone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import gradio as gr
import pandas as pd

from gptgen.checkpoint import imported_from, training_info
from gptgen.config import GPTConfig
from gptgen.engine import EngineError
from gptgen.generate import MAX_NEW_TOKENS, ClosingIterator, Sampling, Stats, line_breaks
from gptgen.serve import ModelShelf

log = logging.getLogger(__name__)
UPDATE_INTERVAL_S = 0.1  # at most ~10 page updates a second, however fast decoding runs
QUEUE_SIZE = 64  # waiting requests beyond this are told the queue is full
EXAMPLES = [
    "ROMEO:\nBut soft, what light",
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "KING RICHARD III:\nNow is the winter",
    "JULIET:\nO, swear not by the moon,",
    "MENENIUS:\nI tell you, friends,",
]
DEFAULTS = Sampling()
RANDOM_SEED = -1  # a number box cannot be left blank, so the form says "random" with -1 (the API takes None too)
BROWSER_EXACT = 2**53  # JavaScript's numbers hold every whole number below this, and not all above


def _whole(name: str, value) -> int | None:
    """Gradio sends numbers as floats; a sampling parameter that counts things must still be whole (a ValueError,
    as Sampling's own, for `generate` to report)."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return value  # Sampling reports the wrong type in its own words
    if value != value or value in (float("inf"), float("-inf")) or value != int(value):
        raise ValueError(f"{name} must be a whole number, got {value}")
    return int(value)


def _seed(value) -> int | None:
    value = _whole("seed", value)
    if isinstance(value, int) and value >= BROWSER_EXACT:
        raise ValueError(f"seed must be below 2**53 = {BROWSER_EXACT:,} here (a browser rounds larger numbers, so "
                         f"the text would be another seed's), got {value}")
    return None if value is None or (isinstance(value, int) and value == RANDOM_SEED) else value


def _stops(text: str | None) -> list[str] | None:
    """The page's stop box: one string per line (see line_breaks)."""
    return [line_breaks(line) for line in (text or "").splitlines() if line] or None


def stats_line(s: Stats, context: int, stopped: bool = False) -> str:
    head = "Stopped after" if stopped else "Generated"
    if s.new_tokens == 0:  # stopped while waiting for a free row, or the model ended the text at once
        return f"{'Stopped' if stopped else 'Ended'} before the first token · prompt {_count(s.prompt_tokens, 'token')}"
    rate = f"**{s.tokens_per_s:.1f} tokens/s**" if s.new_tokens > 1 else "one token: no rate"
    seen = f" (the model saw its last {context})" if s.prompt_tokens > context else ""
    return (f"{head} **{_count(s.new_tokens, 'token')}** in {s.total_s:.2f} s · {rate} · "
            f"first token after {s.first_token_s * 1000:.0f} ms · prompt {_count(s.prompt_tokens, 'token')}{seen}")


def _count(n: int, what: str) -> str:
    return f"{n:,} {what}{'' if n == 1 else 's'}"


def model_card(name: str, c: GPTConfig, metadata: dict[str, str]) -> tuple[str, pd.DataFrame]:
    """(markdown, loss-curve rows) for the model panel, from the file's own config and metadata."""
    import torch

    from gptgen.model import GPT

    info = training_info(metadata)
    with torch.device("meta"):
        params = GPT(c).num_params()
    imported = f"imported from {origin}" if (origin := imported_from(info)) else "custom"
    rows = [("Preset", info.get("preset", imported)),
            ("Size", f"{params / 1e6:.1f}M parameters · {c.n_layer} layers · {c.n_head} heads · {c.n_embd} dims · "
                     f"context {c.block_size}"),
            ("Weights", "int8 (per-row scales)" if metadata.get("quantization") == "int8" else "float"),
            ("Trained on", f"{info['corpus']} ({info['corpus_bytes']:,} bytes, sha256 {info['corpus_sha256'][:8]}…)"
                           if info.keys() >= {"corpus", "corpus_bytes", "corpus_sha256"} else "unknown")]
    if info.keys() >= {"steps", "tokens_seen", "wall_time_s"}:
        rows.append(("Training", f"{info['steps']:,} steps · {info['tokens_seen']:,} tokens · "
                                 f"{info['wall_time_s'] / 60:.1f} min"))
    if info.keys() >= {"val_nats_per_token", "val_nats_per_char"}:
        rows.append(("Val loss", f"{info['val_nats_per_token']:.4f} nats/token · "
                                 f"{info['val_nats_per_char']:.4f} nats/char (before quantization)"))
    facts = "\n".join(f"- **{k}**: {v}" for k, v in rows)
    curve = pd.DataFrame([(step, loss, split) for step, train, val in info.get("curve", [])
                          for loss, split in ((train, "train"), (val, "val"))], columns=["step", "loss", "split"])
    return f"### {name}\n{facts}", curve


def build_app(shelf: ModelShelf, default: str | None = None) -> gr.Blocks:
    default = default or shelf.names[0]

    stop_requests: set[str] = set()  # sessions whose Stop was pressed; their stream ends at the next piece
    streams: dict[ClosingIterator, str] = {}  # the streams in progress, by session: Stop or a new click ends them
    latest: dict[str, object] = {}  # each session's last click, until its run ends: an older run ends quietly

    def session_streams(session: str) -> list[ClosingIterator]:
        return [stream for stream, owner in list(streams.items()) if owner == session]

    def start(request: gr.Request) -> tuple[str, str]:
        """On a click, before the queued stream: a run still streaming ends without a word more (the page is the
        new run's), a Stop pressed from now on is this run's (and one pressed while it waits for the queue is not
        lost), and the last run's text and stats leave the page."""
        session = request.session_hash or ""
        latest[session] = object()  # also ends a run that has no stream yet (its model loading for it)
        for stream in session_streams(session):
            streams.pop(stream, None)  # its run may have ended since: its own finally pops it too
            stream.stop()
        stop_requests.discard(session)
        return "", ""

    def generate(prompt, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, model_name, stop,
                 request: gr.Request) -> Iterator[tuple[str, str]]:
        text, shown, session, pieces = "", 0.0, request.session_hash or "", None
        run = latest.get(session)  # None for an API call, which no click ends

        def ended() -> bool:
            """Stop was pressed, or a new click took the page: while this run streams, or before (while it waited in
            Gradio's queue, or for its model to load)."""
            return session in stop_requests or latest.get(session) is not run

        try:
            numbers = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k, "top_p": top_p,
                       "repetition_penalty": repetition_penalty}
            blank = next((name for name, value in numbers.items() if value is None), None)
            if blank:
                raise ValueError(f"{blank} is empty; give a number ({getattr(DEFAULTS, blank)} is the default)")
            pieces, stats = shelf.stream(model_name, prompt, max_new_tokens=_whole("max_new_tokens", max_new_tokens),
                                         temperature=temperature, top_k=_whole("top_k", top_k), top_p=top_p,
                                         repetition_penalty=repetition_penalty, seed=_seed(seed), stop=_stops(stop))
            streams[pieces] = session
            if ended():  # before a row
                pieces.stop()
            for piece in pieces:
                text += piece
                if ended():
                    pieces.close()
                    break
                if time.perf_counter() - shown >= UPDATE_INTERVAL_S:
                    shown = time.perf_counter()
                    yield text, "Generating…"
        except EngineError as e:  # the server's own failure, before or during the text: Gradio prints its traceback
            yield text, f"⚠ {e}"
            raise gr.Error(str(e)) from e
        except ValueError as e:  # a user's bad value, an unknown model or a full queue: one line in the log
            log.info("page request refused: %s", e)
            yield text, f"⚠ {e}"  # the page keeps the message after the toast has gone
            raise gr.Error(str(e), print_exception=False) from None
        finally:
            streams.pop(pieces, None)
            ours = latest.get(session) is run
            if ours:
                latest.pop(session, None)
        if not ours:  # a new click ended this run, and the page is the new run's
            return
        yield text, stats_line(stats, shelf.get(model_name).config.block_size, stopped=session in stop_requests)
        stop_requests.discard(session)

    def stop(request: gr.Request) -> None:
        """A request to end this session's stream cleanly, keeping its text and stats (Gradio's `cancels`
        would drop them and mark the output as an error); stopping the stream ends it also while it waits for a
        free row, where no piece comes to be checked."""
        session = request.session_hash or ""
        stop_requests.add(session)
        for stream in session_streams(session):
            stream.stop()

    def show_model(model_name):
        """The picked model's card and curve."""
        card, curve = model_card(model_name, *shelf.about(model_name))  # not loaded: that waits for a request
        return card, gr.LinePlot(curve, visible=not curve.empty)

    card, curve = model_card(default, *shelf.about(default))
    with gr.Blocks(title="gptgen") as app:
        gr.Markdown("# gptgen\nA small GPT-2 trained by gptgen. Type the start of a text and it continues it. "
                    "Programs can use this server too: *Use via API* below, or the OpenAI-compatible API at `/v1`.")
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(label="Prompt", lines=4, elem_id="prompt",
                                    placeholder="Type a beginning, or pick an example (Shift+Enter generates)")
                gr.Examples(EXAMPLES, inputs=prompt, label="Examples (click one)")
                with gr.Row():
                    go = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop_button = gr.Button("Stop", variant="secondary", elem_id="stop")
                output = gr.Textbox(label="Continuation", lines=12, interactive=False, elem_id="output")
                stats = gr.Markdown(label="Stats", elem_id="stats")
            with gr.Column(scale=2):
                model_name = gr.Dropdown(shelf.names, value=default, label="Model", elem_id="model")
                # The cap of the CLI, the Python and the OpenAI API: generation runs past a model's context,
                # keeping its latest tokens, so a model's context does not bound it.
                max_new_tokens = gr.Slider(1, MAX_NEW_TOKENS, value=DEFAULTS.max_new_tokens, step=1,
                                           label="max_new_tokens", elem_id="max_new_tokens")
                # steps for the arrow keys and the wheel (by 1, they jumped from temperature 0.8 to 1 and the
                # browser marked 0.8 as invalid)
                temperature = gr.Number(DEFAULTS.temperature, label="temperature (0 = greedy)", step=0.1,
                                        elem_id="temperature")
                top_k = gr.Number(DEFAULTS.top_k, label="top_k (0 = off)", elem_id="top_k")
                top_p = gr.Number(DEFAULTS.top_p, label="top_p (1 = off)", step=0.05, elem_id="top_p")
                repetition_penalty = gr.Number(DEFAULTS.repetition_penalty, label="repetition_penalty (1 = off)",
                                               step=0.05, elem_id="repetition_penalty")
                seed = gr.Number(RANDOM_SEED, label="seed (same seed, same text; -1 = random)",
                                 elem_id="seed")
                stop_strings = gr.Textbox("", label="stop (the text ends before any of these; one a line, \\n for a "
                                          "line break)", lines=2, max_lines=4, elem_id="stop-strings")
                with gr.Accordion("About this model", open=True):
                    card_md = gr.Markdown(card, elem_id="model-card")
                    plot = gr.LinePlot(curve, visible=not curve.empty, x="step", y="loss", color="split",
                                       label="Loss (nats/token)", elem_id="loss-curve")
        inputs = [prompt, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, model_name, stop_strings]
        # Gradio runs up to this many streams at once; the engine decodes them together (a batch row each)
        # or keeps them waiting for a row. Beyond that, Gradio's queue holds QUEUE_SIZE more.
        clicked = gr.on([go.click, prompt.submit], start, None, [output, stats], queue=False, api_visibility="private")
        # always_last: a click while a run streams starts its run once that one has ended (start ends it); with
        # Gradio's default ("once") the new run was dropped and the old one's text filled the page
        clicked.then(generate, inputs, [output, stats], api_name="generate", trigger_mode="always_last",
                     concurrency_limit=shelf.engine.capacity, show_progress="hidden")
        stop_button.click(stop, None, None, queue=False, api_visibility="private")
        for event in (app.load, model_name.change):
            event(show_model, [model_name], [card_md, plot], api_visibility="private")
    # Gradio's queue runs at most max_threads events at once (40 by default): the 41st stream waited in it, with
    # rows free in the engine; a few more for the model cards
    app.max_threads = shelf.engine.capacity + 8
    app.queue(max_size=QUEUE_SIZE, default_concurrency_limit=1)
    return app
