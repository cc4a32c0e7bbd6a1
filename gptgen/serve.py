"""The server: one FastAPI app with the Gradio page (and its `/generate` API) at `/` and the
OpenAI-compatible `/v1/completions` and `/v1/models`, all generating through one `ModelShelf`.

Binds 127.0.0.1 unless told otherwise. The models run in the engine process (`gptgen.engine`), which
decodes concurrent requests together, up to BATCH_ROWS per model; more wait for a row, up to MAX_WAITING.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import uvicorn
from fastapi import Request  # at module level: FastAPI resolves the routes' annotations here

from gptgen.checkpoint import ModelFileError, config_of, given_name, read_config, read_safetensors, served_name
from gptgen.config import STEP_FILES, GPTConfig, GptgenError, bundled_model
from gptgen.engine import BATCH_ROWS, Engine, EngineError, ServerBusy
from gptgen.generate import SAMPLING_PARAMS, Stats, TextModel

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 4 * 2**20  # a completion request's; the longest prompt, escaped as \uXXXX, is 0.6 MB
GRACEFUL_STOP_S = 5  # how long a stopping server lets requests in progress go on
STOP_MARGIN_S = 0.5  # before uvicorn cuts them, the requests still going are ended with an error


class UnknownModel(GptgenError):
    """A request named a model this server does not have."""


class ModelShelf:
    """Model files by name (a file's name without .safetensors, or a Hub id), each loaded in the engine on first
    use and kept; the server side keeps their metadata and tokenizer."""

    def __init__(self, files: dict[str, Path], device: str = "auto", rows: int = BATCH_ROWS,
                 threads: int | None = None) -> None:
        if not files:
            raise ModelFileError("no models to serve: give --model FILE or a --models folder with gptgen model files "
                                 "(in it or in its run folders)")
        self.paths = dict(files)
        self._metadata = {name: read_safetensors(p, with_tensors=False)[1] for name, p in self.paths.items()}
        self._configs = {name: config_of(self.paths[name], m) for name, m in self._metadata.items()}
        self.engine = Engine(rows, device=device, threads=threads)
        self._loaded: dict[str, TextModel] = {}
        self._lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        return list(self.paths)

    def about(self, name: str) -> tuple[GPTConfig, dict[str, str]]:
        """A model's config and metadata, from its file's header: what the page's card shows, without loading it
        (a load pauses every other model's decoding)."""
        if name not in self.paths:
            raise UnknownModel(f"unknown model {name!r}; this server has: {', '.join(self.paths)}")
        return self._configs[name], self._metadata[name]

    def get(self, name: str) -> TextModel:
        config, metadata = self.about(name)
        if name in self._loaded:  # without waiting behind another model's load
            return self._loaded[name]
        with self._lock:  # one load per model, however many requests ask for it at once
            if name not in self._loaded:
                model = TextModel(None, metadata, config)  # refuses a model it cannot read
                self.engine.load(name, str(self.paths[name]))
                self._loaded[name] = model
        return self._loaded[name]

    def stream(self, name: str, prompt: str, **sampling) -> tuple[Iterator[str], Stats]:
        """(text pieces, the Stats they fill in), decoded in the engine's batch with every other request.

        Bad parameters raise ValueError, and a full queue ServerBusy, here, before any wait: before a model not
        loaded yet loads (pausing every other model's decoding), which a bad or refused request did, and kept it
        loaded.
        """
        config, metadata = self.about(name)
        ids, s = (self._loaded.get(name) or TextModel(None, metadata, config)).prepare(prompt, **sampling)
        self.engine.refuse_if_full()  # checked again as the request goes in
        model = self.get(name)
        # the engine keeps a prompt's last context of tokens: only those cross its pipe, as JSON decoded in its loop
        return model.text(self.engine.tokens(name, ids[-model.config.block_size:], s), s, len(ids))



def find_models(folder: Path) -> dict[str, Path]:
    """The gptgen model files in `folder` and in its subfolders (run folders), by served name, from their headers.

    A run folder also holds training state and a folder may hold other safetensors files (a transformers export):
    those are not offered, and the server still starts.
    """
    files: dict[str, Path] = {}
    for f in [*sorted(folder.glob("*.safetensors")), *sorted(folder.glob("*/*.safetensors"))]:
        if any(f.match(pattern) for pattern in STEP_FILES):
            continue
        try:
            read_config(f)
        except ModelFileError as e:
            log.warning("not served: %s", e)
            continue
        name = served_name(folder, f)
        if name in files:
            log.warning("not served: %r has the same name, %r, as %r", str(f), name, str(files[name]))
            continue
        files[name] = f
    return files


def pick_models(models_dir: str | Path, model: str | None) -> tuple[dict[str, Path], str | None]:
    """The files to serve by name, and the name shown first: `model` is a name in the folder, a path to a
    file or to a run's folder (served under the folder's name), or a Hub id (owner/name or a bare GPT-2 name,
    fetched through the Hugging Face cache)."""
    from gptgen.hub import hub_id, resolve

    folder = Path(models_dir)
    if not folder.is_dir() and model is None:
        problem = "is not a folder (a file goes to --model)" if folder.exists() else "does not exist"
        raise ModelFileError(f"no models to serve: the --models folder {str(folder)!r} {problem}")
    files = find_models(folder) if folder.is_dir() else {}
    if not files and model is None:
        raise ModelFileError(f"no models to serve: {str(folder)!r} has no gptgen model files (in it or in its run "
                             "folders); give --model FILE or another --models folder")
    if model is None or model in files:
        return files, model
    path = resolve(model)
    if hub_id(model):
        return {**files, model: path}, model
    if not path.is_file():
        names = ", ".join(files) or "none"
        raise ModelFileError(f"--model {model!r} is neither a file, a Hub id, nor a model in {str(folder)!r} "
                             f"(it has: {names})")
    offered = next((name for name, p in files.items() if p.resolve() == path.resolve()), None)
    if offered:  # the folder's own file, given by its path: offered once, under the folder's name for it
        return files, offered
    name = model if path == bundled_model(model) else given_name(path)  # a bundled model given by its name keeps it
    if name in files:  # it would have taken the name's place, the folder's model gone from the page and the API
        raise ModelFileError(f"--model {model!r} would be served as {name!r}, the name of {str(files[name])!r} in "
                             f"{str(folder)!r}; rename one of the files, or give another --models folder")
    return {**files, name: path}, name


def _error_body(message: str, param: str | None = None, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def _openai_error(message: str, param: str | None = None, status: int = 400, kind: str = "invalid_request_error"):
    from fastapi.responses import JSONResponse

    return JSONResponse(_error_body(message, param, kind), status_code=status,
                        headers={"Retry-After": "2"} if status == 429 else None)


_OPENAI_NAMES = {"max_new_tokens": "max_tokens"}  # a sampling parameter -> its name in the OpenAI body
_SAMPLING_FIELDS = {_OPENAI_NAMES.get(p, p): p for p in SAMPLING_PARAMS}  # the body's name -> the parameter
_OPENAI_DEFAULTS = {"max_new_tokens": 16, "temperature": 1.0, "top_k": 0}  # OpenAI's, where Sampling's differ
_NEUTRAL = {"n": 1, "best_of": 1, "echo": False, "logprobs": None, "suffix": None, "frequency_penalty": 0,
            "presence_penalty": 0, "logit_bias": {}}  # OpenAI fields accepted only at these values
# The body's other fields, named as they are; `user` (an end-user id for OpenAI's abuse monitoring) changes no text.
_BODY_FIELDS = {"prompt", "model", "stream", "stream_options", "user", *_NEUTRAL}


class UnknownFields(ValueError):
    """Body fields that OpenAI's completions do not have: refused in OpenAI's words, as a misspelt field would
    otherwise be ignored without a word."""

    def __init__(self, names: list[str]) -> None:
        names = [n.encode("utf-8", "backslashreplace").decode() for n in names]  # a lone surrogate cannot be sent
        super().__init__(f"Unrecognized request argument{'s' * (len(names) > 1)} supplied: {', '.join(names)}")
        self.param = names[0]


def _named_as_the_body_names_it(message: str) -> tuple[str, str | None]:
    """(message, param) of a bad request: a field's error starts with the field's name; a sampling parameter is
    named as the client sent it, in the message and as OpenAI's `param`."""
    name = re.match(r"\w*", message).group()
    if name in _BODY_FIELDS:
        return message, name
    if name not in SAMPLING_PARAMS:
        return message, None
    param = _OPENAI_NAMES.get(name, name)
    return message.replace(name, param, 1), param


def _completion_request(body, default: str) -> tuple[str, str, dict, bool, bool]:
    """(model, prompt, sampling, stream, include_usage) from an OpenAI completions body; ValueError says what
    is wrong. A null field is one not given, as OpenAI reads it (clients send null for "the default")."""
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object")
    body = {key: value for key, value in body.items() if value is not None}
    if unknown := sorted(body.keys() - _BODY_FIELDS - _SAMPLING_FIELDS.keys()):
        raise UnknownFields(unknown)
    for key, only in _NEUTRAL.items():  # true == 1 and 0 == false in Python, not in JSON
        if key in body and (body[key] != only or isinstance(body[key], bool) != isinstance(only, bool)):
            raise ValueError(f"{key}={json.dumps(body[key])} is not supported (only {json.dumps(only)})")
    if not isinstance(body.get("user", ""), str):
        raise ValueError("user must be a string")
    prompt = body.get("prompt", "")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ValueError("prompt must be a string (one prompt per request)")
    sampling = {**_OPENAI_DEFAULTS, **{p: body[f] for f, p in _SAMPLING_FIELDS.items() if f in body}}
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ValueError("stream must be true or false")
    options = body.get("stream_options", {})
    if "stream_options" in body and not stream:
        raise ValueError("stream_options is only allowed when stream is true")
    if not (isinstance(options, dict) and options.keys() <= {"include_usage"}
            and isinstance(options.get("include_usage"), bool | None)):
        raise ValueError('stream_options must be {"include_usage": true} or {"include_usage": false}')
    model = default if body.get("model") is None else body["model"]  # 0, false, [] are no names either
    if not isinstance(model, str):
        raise ValueError("model must be a string (GET /v1/models lists them)")
    return model, prompt, sampling, stream, bool(options.get("include_usage"))


async def _pieces_while_connected(request: Request, pieces: Iterator[str]) -> AsyncIterator[str]:
    """The pieces, each read in a thread (the event loop serves others meanwhile), until the client leaves: that
    stops them at once, also while the request waits for a batch row, where no piece comes to be checked. (It
    waited on, holding its place among the waiting, then took the row for a token no one read.)"""
    import anyio
    from starlette.concurrency import run_in_threadpool

    async def stop_when_gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":  # the body has been read: only this comes
            pass
        # In a thread, as the close below: a cancel waits for the engine's lock, which a send holds while the
        # engine's pipe is full (it reads none during a load). Not anyio's threads: the reads waiting for a row
        # may hold every one.
        await asyncio.get_running_loop().run_in_executor(None, pieces.stop)

    watcher = asyncio.ensure_future(stop_when_gone())
    watcher.add_done_callback(_log_failure)
    try:
        while (piece := await run_in_threadpool(next, pieces, None)) is not None:
            yield piece
    finally:
        watcher.cancel()
        with anyio.CancelScope(shield=True):  # a response cancelled (its client gone) still closes them
            await run_in_threadpool(pieces.close)


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("watching a client's connection failed", exc_info=task.exception())


def add_openai_routes(api, shelf: ModelShelf, default: str) -> None:
    from fastapi.responses import Response, StreamingResponse
    from starlette.background import BackgroundTask
    from starlette.concurrency import run_in_threadpool

    started = int(time.time())

    def card(name: str) -> dict:
        return {"id": name, "object": "model", "created": started, "owned_by": "gptgen"}

    @api.get("/v1/models")
    def models():
        return {"object": "list", "data": [card(n) for n in shelf.names]}

    @api.get("/v1/models/{model:path}")  # a Hub id's name has a slash
    def model(model: str):
        if model not in shelf.names:
            return _openai_error(f"the model {model!r} does not exist; this server has: {', '.join(shelf.names)}",
                                 "model", 404)
        return card(model)

    @api.post("/v1/completions")
    async def completions(request: Request):
        raw = bytearray()
        async for part in request.stream():  # read up to the cap: no client gets a huge body parsed into memory
            raw += part
            if len(raw) > MAX_BODY_BYTES:
                return _openai_error(f"the body is over {MAX_BODY_BYTES // 2**20} MiB", status=413)
        try:
            body = json.loads(raw)
        except ValueError as e:  # a syntax error, bytes that are not UTF-8, an integer of over 4,300 digits
            return _openai_error(f"the body is not valid JSON ({e})")
        except RecursionError:  # json's parser recurses once per level of nesting
            return _openai_error("the body's JSON is nested too deeply")
        try:
            name, prompt, sampling, stream, include_usage = _completion_request(body, default)
            # In a thread: a model's first request loads it in the engine (tens of seconds compiling on CUDA), and
            # the event loop serves every other request and the page meanwhile.
            pieces, stats = await run_in_threadpool(shelf.stream, name, prompt, **sampling)
        except UnknownModel as e:
            return _openai_error(str(e), "model", 404)
        except ServerBusy as e:  # the openai client retries these by itself
            return _openai_error(str(e), status=429, kind="server_busy")
        except EngineError as e:
            return _openai_error(str(e), status=500, kind="server_error")
        except UnknownFields as e:
            return _openai_error(str(e), e.param)
        except ValueError as e:
            return _openai_error(*_named_as_the_body_names_it(str(e)))
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text: str, finish: str | None, **rest) -> dict:
            return {"id": cid, "object": "text_completion", "created": created, "model": name,
                    "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}], **rest}

        def finish() -> str:
            ended = stats.stopped_by_string or stats.new_tokens < sampling["max_new_tokens"]
            return "stop" if ended else "length"

        def usage() -> dict:
            return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.new_tokens,
                    "total_tokens": stats.prompt_tokens + stats.new_tokens}

        if stream:
            asked = {"usage": None} if include_usage else {}  # as OpenAI: usage: null in each chunk, when asked

            async def events() -> AsyncIterator[str]:
                try:
                    async for piece in _pieces_while_connected(request, pieces):
                        yield f"data: {json.dumps(chunk(piece, None, **asked))}\n\n"
                except EngineError as e:  # the engine failed mid-stream: an error event, as OpenAI's streams end
                    yield f"data: {json.dumps(_error_body(str(e), kind='server_error'))}\n\n"
                    return
                yield f"data: {json.dumps(chunk('', finish(), **asked))}\n\n"
                if include_usage:  # then one more chunk, with no choices and the counts
                    yield f"data: {json.dumps({**chunk('', None), 'choices': [], 'usage': usage()})}\n\n"
                yield "data: [DONE]\n\n"

            # A client gone ends the response early, and closing the pieces cancels the request in the engine,
            # freeing its row (else it decoded on until garbage collected): events() does, and the background task
            # too, for a response that ended before events() started.
            return StreamingResponse(events(), media_type="text/event-stream", background=BackgroundTask(pieces.close))
        # A client gone (a timeout, a Ctrl-C) cancels the request and frees its row: else the text decoded on to its
        # end, for no one, while others waited for the row.
        text = []
        try:
            async for piece in _pieces_while_connected(request, pieces):
                text.append(piece)
        except EngineError as e:
            return _openai_error(str(e), status=500, kind="server_error")
        if await request.is_disconnected():
            return Response(status_code=499)  # nginx's "client closed request": no one reads it
        return chunk("".join(text), finish(), usage=usage())

    offered = {route.path.replace(":path}", "}"): (method, route) for route in api.routes
               if route.path.startswith("/v1/") for method in getattr(route, "methods", ())}
    routes = " and ".join(f"{method} {path}" for path, (method, _) in offered.items())

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]

    @api.api_route("/v1", methods=methods, include_in_schema=False)  # the API's own root, as any other path
    @api.api_route("/v1/{rest:path}", methods=methods, include_in_schema=False)
    async def elsewhere(request: Request):
        """Other OpenAI routes (chat completions, embeddings, ...) answer as OpenAI does, not as the page's 404."""
        path = request.url.path
        method = next((m for m, route in offered.values() if route.path_regex.match(path)), None)  # /v1/models/x too
        if method is None:
            return _openai_error(f"this server has no {path}; it offers {routes} only", status=404)
        r = _openai_error(f"{path} takes {method}, not {request.method}; this server offers {routes} only", status=405)
        r.headers["Allow"] = method
        return r


def build_server(shelf: ModelShelf, default: str | None = None):
    """The FastAPI app: OpenAI routes, and the Gradio page mounted at /."""
    import gradio as gr
    from fastapi import FastAPI

    from gptgen.web import build_app

    @contextlib.asynccontextmanager
    async def threads_for_every_request(app):
        """Each request the engine has (decoding or waiting for a row) holds a worker thread while it waits for its
        next token (Starlette and Gradio read sync iterators in threads), and anyio's default of 40 threads left
        the page and /v1/models waiting behind 40 streams; the other 40 stay for the rest."""
        import anyio.to_thread

        threads = anyio.to_thread.current_default_thread_limiter()
        threads.total_tokens = shelf.engine.capacity + threads.total_tokens
        yield

    default = default or shelf.names[0]
    shelf.get(default)  # loaded now: the page is ready, or the model's error said, before the address is printed
    api = FastAPI(title="gptgen", lifespan=threads_for_every_request)
    add_openai_routes(api, shelf, default)
    # ssr_mode off: Spaces turn server-side rendering on (GRADIO_SSR_MODE), a Node server that no test here runs
    return gr.mount_gradio_app(api, build_app(shelf, default), path="/", footer_links=["api"], ssr_mode=False)


def bound_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound (as uvicorn binds it) and listening before the model loads, so that a taken port
    is one clear error and the address is printed only once it is ours. Bound alone, it was not: another server
    could bind it too (SO_REUSEADDR lets sockets share an address until one listens), and both printed it."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen()  # a client that connects meanwhile waits for the page instead of being refused
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise GptgenError(f"port {port} is already in use on {host}; choose another with --port") from None
        raise GptgenError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def _loopback(host: str) -> bool:
    """Only this machine can reach the address (127.0.0.1, ::1, localhost)."""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may be any of the machine's addresses
        return False


class _Server(uvicorn.Server):
    """uvicorn's server, whose stop ends the requests still going after the grace period with an error: cut by
    uvicorn, a stream ended like a whole text (no error event, no [DONE]), and an OpenAI client took it for one."""

    def __init__(self, config: uvicorn.Config, engine: Engine) -> None:
        super().__init__(config)
        self.engine = engine

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        asyncio.get_running_loop().call_later(GRACEFUL_STOP_S - STOP_MARGIN_S, self.engine.fail_all,
                                              "the server is stopping; this text was cut off, send it again later")
        await super().shutdown(sockets)


def serve(models_dir: str | Path, model: str | None = None, host: str = "127.0.0.1", port: int = 7860,
          device: str = "auto", max_batch: int = BATCH_ROWS, threads: int | None = None) -> None:
    """Load the first model (so the page is ready when the address is printed), then serve until stopped."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from an offline-first tool
    files, default = pick_models(models_dir, model)
    with bound_socket(host, port) as sock:
        port = sock.getsockname()[1]  # the one the system chose for --port 0
        shelf = ModelShelf(files, device, max_batch, threads)
        try:
            app = build_server(shelf, default)
            if not _loopback(host):
                log.warning("serving on %s: anyone who can reach this machine there can use the page", host)
            shown = f"[{host}]" if ":" in host else host  # an IPv6 address in a URL
            log.info("gptgen: the page is on http://%s:%d/ , the OpenAI-compatible API on http://%s:%d/v1", shown,
                     port, shown, port)
            with contextlib.suppress(KeyboardInterrupt):  # Ctrl+C is how a server is stopped (uvicorn.run does this)
                # a stop (Ctrl+C, SIGTERM) gives open streams a few seconds to end, not as long as their texts take
                config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=GRACEFUL_STOP_S)
                _Server(config, shelf.engine).run(sockets=[sock])
        finally:
            shelf.engine.close()
