"""The engine: one process that holds the served models and decodes every request in a batch per model
(continuous batching: requests join and leave between decoding steps).

Why a process of its own. Decoding runs thousands of short torch ops a second, each a point where the
thread gives up the GIL; in the server process the HTTP, Gradio and streaming threads take it in
between, and the engine waits. And OpenMP's threads spin between ops, so anything else running on
their cores stalls them: on 2 cores, 0.4 of a core of other work cut batched decoding by 38% with 2
torch threads and not at all with 1. So the engine runs in its own process with its own GIL, on all
cores but one, and the server's threads and the clients have the last one.

The server side (`Engine`) talks to it through a pipe, in JSON: load a model, generate (prompt token
ids and sampling parameters), cancel; the engine answers with the tokens of each step. If the process
dies (out of memory, killed), its requests fail with a clear message and a new one starts with the
same models.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import itertools
import json
import logging
import multiprocessing
import queue
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict

from gptgen.config import GptgenError
from gptgen.generate import ClosingIterator, Sampling

log = logging.getLogger(__name__)
BATCH_ROWS = 32  # sequences decoded together per model (each holds a KV cache row of the model's context)
MAX_WAITING = 64  # the engine holds BATCH_ROWS + this many requests (all models); more are refused with ServerBusy
STOPPED = "the engine has been stopped"  # Engine.close()'s, as requests read it
MAX_RESTARTS = 3  # engine processes started again within a minute; more means something is wrong each time


def _reason(e: Exception) -> str:
    """A failure as the client reads it: a user's error in its own words, anything else with its type."""
    return str(e) if isinstance(e, GptgenError) else f"{type(e).__name__}: {e}"


class ServerBusy(GptgenError):
    """Too many requests are already waiting for a batch row; the client should retry shortly."""


class EngineError(GptgenError):
    """The engine could not load a model or finish a request (its message says why)."""


def default_threads() -> int:
    """All cores but one for the engine's torch ops (at least one)."""
    from gptgen.device import available_cpus

    return max(1, available_cpus() - 1)


class Engine:
    """The server's handle on the engine process: load models, stream a request's token ids, cancel."""

    def __init__(self, rows: int = BATCH_ROWS, max_waiting: int = MAX_WAITING, device: str = "auto",
                 threads: int | None = None) -> None:
        self.rows, self.max_waiting = rows, max_waiting
        self.peak_batch = 0  # the most sequences one step has decoded together
        self._settings = (rows, device, threads or default_threads())
        self._ids = itertools.count()
        self._replies: dict[int, queue.Queue] = {}
        self._lock = threading.RLock()  # around sends and (re)starting the process
        self._models: dict[str, str] = {}  # name -> path, loaded again in a restarted process
        self._loading: dict[str, queue.Queue] = {}  # the loads sent that load() waits for: their replies
        self._refused: dict[str, str] = {}  # models whose load stopped the process, and why they are not loaded again
        self._restarts: list[float] = []
        self._stopped: str | None = None
        self._start()
        atexit.register(self.close)  # before multiprocessing's own exit hook, which would wait for the process

    @property
    def capacity(self) -> int:
        """Requests held at once, decoding or waiting for a row; more are refused."""
        return self.rows + self.max_waiting

    def _start(self) -> None:
        """A new engine process and its reader thread; the models loaded so far are loaded again first (the
        pipe keeps order, so they are in place before any request that follows)."""
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        process = context.Process(target=_engine_process, args=(child, *self._settings), name="gptgen-engine",
                                  daemon=True)
        process.start()
        child.close()
        self._process = process
        self._reader = threading.Thread(target=self._receive, args=(self._conn, process), name="gptgen-engine-reader",
                                        daemon=True)
        self._reader.start()
        for name, path in list(self._models.items()):  # load() may add one from another thread
            self._request({"op": "load", "name": name, "path": path})

    def load(self, name: str, path: str) -> None:
        """Load a model file in the engine under `name` (and warm it up); returns when it is ready. A model whose
        load stopped the process (out of memory, say) is refused from then on: loaded again by each retry, it
        ended every other model's requests each time, then the engine for good (MAX_RESTARTS)."""
        with self._lock:  # known before the engine has it: one that restarts meanwhile loads it too
            if name in self._refused:
                raise EngineError(self._refused[name])
            self._models[name] = path
            reply = self._loading[name] = self._request({"op": "load", "name": name, "path": path})[1]
        try:
            kind, message = reply.get()
        finally:
            with self._lock:  # a restart reads them under it
                self._loading.pop(name, None)
        if kind == "failed":
            self._models.pop(name, None)
            raise EngineError(self._refused.get(name, message))

    def refuse_if_full(self) -> None:
        """ServerBusy when rows + max_waiting requests are already in the engine, counted over all models: they
        share the cores, so a second model adds no capacity."""
        if len(self._replies) >= self.capacity:
            raise ServerBusy(f"the server is busy ({len(self._replies)} requests in progress); retry in a few seconds")

    def tokens(self, name: str, prompt: list[int], s: Sampling) -> Iterator[int]:
        """The token ids of one request, decoded in its model's batch; closing the iterator cancels it. A full
        engine raises ServerBusy at once (refuse_if_full)."""
        with self._lock:  # the count and the new request at once: requests arriving together cannot overshoot it
            self.refuse_if_full()
            # with its model's file: an engine that restarted and could not load it then (a file being replaced)
            # loads it for this request, rather than refusing the model for good
            rid, reply = self._request({"op": "generate", "name": name, "path": self._models.get(name),
                                        "prompt": prompt, "sampling": asdict(s)})

        def cancel() -> None:
            """Closed early (Stop, a stop string, a client gone): forget it, free its row, and end a read waiting
            for a token in another thread (a request still waiting for a row). Once the request has ended, its
            reply is gone already and there is nothing to do."""
            if self._replies.pop(rid, None) is not None:
                reply.put(("done", None))
                with contextlib.suppress(EngineError):  # an engine that has stopped has nothing to cancel
                    self._send({"op": "cancel", "id": rid})

        def receive() -> Iterator[int]:
            try:
                while True:
                    kind, value = reply.get()
                    if kind == "token":
                        yield value
                    elif kind == "failed":
                        raise EngineError(value)
                    else:
                        return
            finally:
                cancel()

        return ClosingIterator(receive(), cancel, cancel)  # cancel() from another thread: the read gets "done"

    def _request(self, message: dict) -> tuple[int, queue.Queue]:
        """(request id, the queue its answers arrive in)."""
        with self._lock:
            if self._stopped:
                raise EngineError(self._stopped)
            rid = next(self._ids)
            reply = self._replies[rid] = queue.Queue()
            self._send({**message, "id": rid})
        return rid, reply

    def _send(self, message: dict) -> None:
        with self._lock:
            try:
                self._conn.send_bytes(json.dumps(message).encode())
            except OSError as e:  # the process just died; the reader thread is starting another
                raise EngineError("the engine process stopped; send the request again") from e

    def close(self) -> None:
        """Ends the engine process (its requests fail) for good: it ignores the SIGINT and SIGTERM that reach the
        server's whole process group, so it ends when told to, or when its pipe closes with the server."""
        with self._lock:
            if self._stopped != STOPPED:  # a second call (a Ctrl+C cut the first short) only waits, below
                self._stopped = STOPPED
                self.fail_all(f"{STOPPED}; send the request again later")
                with contextlib.suppress(OSError):  # one that died meanwhile is not restarted now
                    self._conn.send_bytes(json.dumps({"op": "exit"}).encode())
            reader = self._reader
        # The reader thread reaps the process once its pipe closes. Two threads waiting for one process race: the
        # one that lost read no exit code, took the process for alive, and could signal its pid, reused since.
        reader.join(timeout=5)
        if reader.is_alive() or self._process.is_alive():  # in a long load: it reads its pipe between steps only
            self._process.kill()
            reader.join()
            self._process.join()

    def _receive(self, conn, process) -> None:
        """Route one engine process's messages to the waiting requests; if it dies, fail what it had and start
        another (up to MAX_RESTARTS a minute)."""
        try:
            while True:
                message = json.loads(conn.recv_bytes())
                if message["op"] == "step":
                    self.peak_batch = max(self.peak_batch, message["batch"])
                    for rid, token, done in message["events"]:
                        reply = self._replies.get(rid)
                        if reply is None:
                            continue
                        if token is not None:
                            reply.put(("token", token))
                        if done:
                            reply.put(("done", None))
                            self._replies.pop(rid, None)  # its reader may have closed it on the token just put
                elif (reply := self._replies.pop(message["id"], None)) is not None:  # a request's or load's end
                    reply.put((message["op"], message.get("error")))
        except (EOFError, OSError):
            process.join(timeout=5)
            self._restart(f"the engine process stopped (exit code {process.exitcode})")

    def fail_all(self, why: str) -> None:
        """Ends every request in progress with EngineError(why)."""
        with self._lock:
            for rid in list(self._replies):
                if (reply := self._replies.pop(rid, None)) is not None:  # a cancel() may have taken it meanwhile
                    reply.put(("failed", why))

    def _restart(self, what: str) -> None:
        with self._lock:
            for name in [name for name, reply in self._loading.items() if reply.empty()]:  # unanswered when it died
                self._models.pop(name, None)  # not loaded again by the new process
                self._refused[name] = (f"{what} while loading model {name!r} (out of memory?); it is not loaded "
                                       "again until the server restarts")
            self.fail_all(f"{what}; this request was lost, send it again")
            if sys.is_finalizing() or self._stopped == STOPPED:  # close() stops every engine at exit
                return
            now = time.monotonic()
            self._restarts = [t for t in self._restarts if now - t < 60] + [now]
            if len(self._restarts) > MAX_RESTARTS:
                self._stopped = f"{what}, {len(self._restarts)} times in a minute; restart the server"
                log.error(self._stopped)
                return
            log.error("%s; starting a new one", what)
            try:
                self._start()
            except Exception as e:  # out of processes or files, say: later requests say so instead of hanging
                self._stopped = f"{what}, and a new one could not start ({_reason(e)}); restart the server"
                log.error(self._stopped)


def _engine_process(*args) -> None:
    """The engine process's entry point. A terminal's Ctrl+C, and a SIGTERM from `systemctl stop` or `kill -TERM
    -- -PGID`, reach every process of the server's group: they are the server's to stop, giving open streams their
    grace period, and the engine ends when the server closes it (Engine.close) or its pipe. Taken by the engine
    too, they ended it at once, and the server started another while it was stopping."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _engine_main(*args)


def _engine_main(conn, rows: int, device: str, threads: int) -> None:
    """The engine process: models by name, a Batch per model, one decoding step after another."""
    import torch

    import gptgen
    from gptgen.generate import Batch

    torch.set_num_threads(threads)
    models, batches, waiting, owners = {}, {}, collections.deque(), {}

    def send(message: dict) -> None:
        conn.send_bytes(json.dumps(message).encode())

    def load(name: str, path: str | None) -> None:
        if path is None:
            raise EngineError(f"model {name!r} is not loaded")
        model = gptgen.load(path, device=device, compile=True).model  # compiles on CUDA only
        batch = Batch(model, rows)  # the batch its requests will share
        batch.add([], Sampling(max_new_tokens=2, seed=0))
        while batch.active:  # first steps pay one-off setup (scripting, compiling); not the user's
            batch.step()
        models[name], batches[name] = model, batch

    def handle(message: dict) -> None:
        if message["op"] == "exit":  # Engine.close()
            sys.exit()
        rid = message["id"]
        if message["op"] == "load":
            try:
                if message["name"] not in models:
                    load(message["name"], message["path"])
                send({"op": "done", "id": rid})
            except Exception as e:
                send({"op": "failed", "id": rid, "error": _reason(e)})
        elif message["op"] == "generate":
            waiting.append(message)
        elif message["op"] == "cancel":  # its row is freed at the next step
            for seq in [seq for seq, owner in owners.items() if owner == rid]:
                seq.done = True
                del owners[seq]
            for m in [m for m in waiting if m["id"] == rid]:
                waiting.remove(m)

    def admit() -> None:
        for message in list(waiting):
            name = message["name"]
            if name in models and name not in batches:
                batches[name] = Batch(models[name], rows)
            if name in batches and len(batches[name].active) == rows:
                continue  # waits for a free row
            waiting.remove(message)
            try:
                if name not in models:  # its load after a restart failed: tried again, for this request
                    load(name, message["path"])
                owners[batches[name].add(message["prompt"], Sampling(**message["sampling"]))] = message["id"]
            except Exception as e:
                send({"op": "failed", "id": message["id"], "error": _reason(e)})

    def step(name: str, batch: Batch) -> None:
        members = list(batch.active)  # a failed step may have taken out the ones it finished
        try:
            events = batch.step()
        except Exception as e:  # every request in the batch gets the error; the batch starts afresh
            for seq in members:  # a cancelled one has no owner left
                if (rid := owners.pop(seq, None)) is not None:
                    send({"op": "failed", "id": rid, "error": _reason(e)})
            del batches[name]
            return
        send({"op": "step", "batch": len(members), "events": [(owners[seq], token, seq.done) for seq, token in events]})
        for seq, _ in events:
            if seq.done:
                del owners[seq]

    try:
        while True:
            if not (waiting or any(batch.active for batch in batches.values())):
                handle(json.loads(conn.recv_bytes()))  # idle: wait for work
            while conn.poll(0):
                handle(json.loads(conn.recv_bytes()))
            admit()
            for name, batch in list(batches.items()):
                if batch.active:
                    step(name, batch)
    except (EOFError, OSError):  # the server went away
        return
