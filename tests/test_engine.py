"""The engine process: continuous batching, on a tiny model's file."""

import dataclasses
import json
import os
import re
import threading
import time

import pytest

from gptgen.engine import Engine, ServerBusy
from gptgen.generate import Sampling, generate_tokens


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    """A tiny model's file, and the same file loaded here (what generating alone gives)."""
    import gptgen
    from tests.test_model import tiny_model_file

    path = tiny_model_file(tmp_path_factory.mktemp("tiny") / "tiny.safetensors")
    return path, gptgen.load(str(path), device="cpu").model


def _requests(n):
    return [(list(range(10 + i, 13 + 2 * i)), Sampling(max_new_tokens=25 + 5 * i, temperature=0.9 * (i % 2),
                                                         seed=i)) for i in range(n)]


def _engine(tiny_file, **kwargs) -> Engine:
    engine = Engine(device="cpu", **kwargs)
    engine.load("tiny", str(tiny_file[0]))
    return engine


def test_concurrent_requests_decode_together_and_each_gets_its_text_alone(tiny_file):
    # long enough that all six are in before the first ends, however slowly this process sends them
    requests = [(prompt, dataclasses.replace(s, max_new_tokens=10 * s.max_new_tokens)) for prompt, s in _requests(6)]
    alone = [list(generate_tokens(tiny_file[1], *r)) for r in requests]
    engine, got, start = _engine(tiny_file, rows=4), {}, threading.Barrier(6)

    def client(i):
        start.wait()
        got[i] = list(engine.tokens("tiny", *requests[i]))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert [got[i] for i in range(6)] == alone
    assert engine.peak_batch == 4  # six clients, four rows: they did decode together


def test_closed_streams_free_their_rows_and_leave_nothing_behind(tiny_file):
    engine = _engine(tiny_file, rows=1, max_waiting=1)
    for _ in range(20):  # more than rows + max_waiting: a leak would end in "busy"
        endless = engine.tokens("tiny", [1, 2], Sampling(max_new_tokens=4096, temperature=1.0, top_k=0, seed=0))
        assert len([next(endless) for _ in range(3)]) == 3
        endless.close()
    assert not engine._replies
    for _ in range(20):  # closed before its first token was read (a client gone at once): cancelled too
        engine.tokens("tiny", [1, 2], Sampling(max_new_tokens=4096, temperature=1.0, top_k=0, seed=0)).close()
    assert not engine._replies
    prompt, s = _requests(1)[0]
    got = []  # uncancelled, the 40 closed requests would hold the row for minutes: wait a bounded time
    reader = threading.Thread(target=lambda: got.append(list(engine.tokens("tiny", prompt, s))), daemon=True)
    reader.start()
    reader.join(timeout=60)
    assert got == [list(generate_tokens(tiny_file[1], prompt, s))], "the closed requests still hold the row"


def test_a_stream_waiting_for_a_row_ends_when_stopped_from_another_thread(tiny_file):
    """The page's Stop, for a run still waiting for a free row: its reader was blocked until a token came, which
    took as long as the run holding the row (the Stop did nothing for minutes)."""
    from gptgen.generate import TextModel

    engine = _engine(tiny_file, rows=1)
    endless = engine.tokens("tiny", [1, 2], Sampling(max_new_tokens=4096, temperature=1.0, top_k=0, seed=0))
    next(endless)  # it holds the only row
    s = Sampling(max_new_tokens=5, seed=0)
    waiting, _ = TextModel.text(engine.tokens("tiny", [3, 4], s), s, 2)
    read = []
    reader = threading.Thread(target=lambda: read.extend(waiting), daemon=True)
    reader.start()
    reader.join(timeout=1.0)
    assert reader.is_alive() and not read  # waiting for the row
    waiting.stop()
    reader.join(timeout=5)
    assert not reader.is_alive() and not read
    assert len([next(endless) for _ in range(3)]) == 3  # the other request goes on
    endless.close()
    assert not engine._replies


def test_a_failed_step_fails_every_request_in_it_even_one_it_finished(tiny_file, monkeypatch):
    """A step that raised after finishing a request (its last token) sent that request nothing: its client waited
    for ever."""
    import multiprocessing
    from dataclasses import asdict

    import torch

    from gptgen.engine import _engine_main
    from gptgen.generate import Batch

    free_rows = Batch._free_rows

    def failing_free_rows(batch):  # moving a row into request 1's, once it has its last token, raises (CUDA, say)
        before = len(batch.active)
        free_rows(batch)
        if before == 2 and len(batch.active) == 1:
            raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(Batch, "_free_rows", failing_free_rows)
    ours, theirs = multiprocessing.Pipe()
    ours.send_bytes(json.dumps({"op": "load", "name": "tiny", "path": str(tiny_file[0]), "id": 0}).encode())
    for rid, n in [(1, 3), (2, 50)]:  # sent before the engine starts, so both join its first step
        s = Sampling(max_new_tokens=n, seed=0)
        ours.send_bytes(json.dumps({"op": "generate", "name": "tiny", "prompt": [1, 2], "sampling": asdict(s),
                                    "id": rid}).encode())
    engine = threading.Thread(target=_engine_main, args=(theirs, 4, "cpu", torch.get_num_threads()), daemon=True)
    engine.start()
    assert json.loads(ours.recv_bytes()) == {"op": "done", "id": 0}
    failed = {}
    while len(failed) < 2 and ours.poll(30):
        message = json.loads(ours.recv_bytes())
        if message["op"] == "failed":
            failed[message["id"]] = message["error"]
    ours.close()
    engine.join(timeout=30)
    assert failed == {1: "RuntimeError: CUDA error: out of memory", 2: "RuntimeError: CUDA error: out of memory"}


def test_a_stream_closed_on_its_last_token_leaves_the_reader_thread_running():
    """The reader put a request's last token, its client closed the stream at once (dropping the request), and the
    reader's own `del` of it raised KeyError: the thread died and every later request waited for ever."""
    import queue
    from types import SimpleNamespace

    engine = Engine.__new__(Engine)  # the reader alone, no process

    class ClosedAtOnce(queue.Queue):
        def put(self, item, *args):
            super().put(item, *args)
            engine._replies.pop(7, None)  # what the client's close does, between the reader's two lines

    messages = [json.dumps({"op": "step", "batch": 1, "events": [[7, 42, True]]}).encode()]
    engine._replies, engine.peak_batch, stops = {7: ClosedAtOnce()}, 0, []
    engine._restart = stops.append

    def recv_bytes():
        if not messages:
            raise EOFError
        return messages.pop()

    engine._receive(SimpleNamespace(recv_bytes=recv_bytes), SimpleNamespace(join=lambda timeout: None, exitcode=0))
    assert stops == ["the engine process stopped (exit code 0)"]  # it read on until the pipe closed


def test_a_full_queue_is_refused_at_once_and_the_engine_goes_on(tiny_file):
    engine = _engine(tiny_file, rows=1, max_waiting=2)
    long = Sampling(max_new_tokens=4096, temperature=0)  # ~9 s: none ends and frees its place during the loop
    accepted, refused = [], []
    for _ in range(8):
        try:
            accepted.append(engine.tokens("tiny", [5, 6], long))
        except ServerBusy as e:
            refused.append(str(e))
    assert len(accepted) == 3 and len(refused) == 5 and "retry" in refused[0]
    for stream in accepted:  # each decodes in turn once the one before has left the row
        assert len([next(stream) for _ in range(3)]) == 3
        stream.close()
    prompt, s = _requests(1)[0]
    assert list(engine.tokens("tiny", prompt, s)) == list(generate_tokens(tiny_file[1], prompt, s))


def test_requests_arriving_together_cannot_overshoot_the_cap(tiny_file, monkeypatch):
    """The count was read before the request was made: threads that all read it first all got in."""
    engine = _engine(tiny_file, rows=1, max_waiting=2)
    make = engine._request
    monkeypatch.setattr(engine, "_request", lambda message: time.sleep(0.1) or make(message))  # a thread switch
    long = Sampling(max_new_tokens=4096, temperature=1.0, top_k=0, seed=0)  # outlasts the threads' 0.1 s anywhere
    start, accepted, refused = threading.Barrier(8), [], []

    def ask() -> None:
        start.wait()
        try:
            accepted.append(engine.tokens("tiny", [5, 6], long))
        except ServerBusy:
            refused.append(True)

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert (len(accepted), len(refused)) == (3, 5)
    for stream in accepted:
        stream.close()


def test_the_request_cap_counts_every_models_requests_together(tiny_file):
    """The models share the cores, so a second model adds no room (README: --max-batch + 64 in all)."""
    engine = _engine(tiny_file, rows=1, max_waiting=1)
    engine.load("tiny-again", str(tiny_file[0]))
    long = Sampling(max_new_tokens=300, temperature=0)
    held = [engine.tokens("tiny", [5, 6], long), engine.tokens("tiny-again", [5, 6], long)]
    with pytest.raises(ServerBusy, match="2 requests in progress"):
        engine.tokens("tiny-again", [5, 6], long)
    assert [len(list(stream)) for stream in held] == [300, 300]


def test_a_killed_engine_fails_its_requests_clearly_and_a_new_one_serves_the_next(tiny_file):
    import os
    import signal

    from gptgen.engine import EngineError

    engine = _engine(tiny_file, rows=2)
    stream = engine.tokens("tiny", [1, 2], Sampling(max_new_tokens=4096, temperature=1.0, top_k=0, seed=0))
    next(stream)
    os.kill(engine._process.pid, signal.SIGKILL)
    with pytest.raises(EngineError, match="engine process stopped .* send it again"):
        list(stream)
    prompt, s = _requests(1)[0]
    assert list(engine.tokens("tiny", prompt, s)) == list(generate_tokens(tiny_file[1], prompt, s))  # reloaded


def test_a_model_whose_load_stopped_the_engine_is_refused_and_the_others_go_on(tiny_file, tmp_path):
    """Loaded again by the new process and by each retry, it stopped the engine each time (every stream of the
    other models lost), then for good after MAX_RESTARTS."""
    import signal

    from gptgen.engine import EngineError
    from tests.conftest import write_random_int8_model

    big = write_random_int8_model(tmp_path / "big.safetensors", "gpt2")  # seconds to load and warm up
    engine = _engine(tiny_file, rows=2)
    old, errors = engine._process.pid, []

    def load_big() -> None:
        try:
            engine.load("big", str(big))
        except EngineError as e:
            errors.append(str(e))

    loading = threading.Thread(target=load_big)
    loading.start()
    deadline = time.monotonic() + 60
    while "big" not in engine._loading and time.monotonic() < deadline:  # asked for; its load takes seconds
        time.sleep(0.001)
    os.kill(old, signal.SIGKILL)  # as the kernel's out-of-memory killer does
    loading.join(timeout=60)
    assert len(errors) == 1 and re.fullmatch(r"the engine process stopped \(exit code -9\) while loading model 'big' "
                                             r"\(out of memory\?\); it is not loaded again until the server "
                                             r"restarts", errors[0]), errors
    with pytest.raises(EngineError, match="not loaded again"):
        engine.load("big", str(big))
    assert engine._process.pid != old and list(engine._models) == ["tiny"]
    prompt, s = _requests(1)[0]
    assert list(engine.tokens("tiny", prompt, s)) == list(generate_tokens(tiny_file[1], prompt, s))


def test_a_model_whose_reload_failed_after_a_restart_is_loaded_by_its_next_request(tiny_file, tmp_path):
    """The restarted engine's reload of a file being replaced (or out of memory again) failed unseen, and every
    later request for the model failed with "model 'm' is not loaded" until the server restarted."""
    import shutil
    import signal

    from gptgen.engine import EngineError

    path = tmp_path / "m.safetensors"
    shutil.copy(tiny_file[0], path)
    engine = Engine(device="cpu", rows=2)
    engine.load("m", str(path))
    path.rename(tmp_path / "away")
    old = engine._process.pid
    os.kill(old, signal.SIGKILL)

    def reloaded() -> bool:  # the new engine has answered its reload (a failure: the file is away)
        with engine._lock:  # held while a restart starts the process and asks for the reload
            return engine._process.pid != old and not engine._replies

    deadline = time.monotonic() + 120
    while not reloaded() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert reloaded()
    with pytest.raises(EngineError, match="does not exist"):  # while the file is away, each request says why
        list(engine.tokens("m", [1, 2], Sampling(max_new_tokens=2)))
    (tmp_path / "away").rename(path)
    prompt, s = _requests(1)[0]
    assert list(engine.tokens("m", prompt, s)) == list(generate_tokens(tiny_file[1], prompt, s))


def test_close_ends_the_engine_and_starts_no_other(tiny_file):
    from gptgen.engine import EngineError

    engine = _engine(tiny_file, rows=1)
    endless = engine.tokens("tiny", [1, 2], Sampling(max_new_tokens=4096, temperature=1.0, top_k=0, seed=0))
    next(endless)
    process = engine._process
    engine.close()
    assert process.exitcode == 0  # it ended when told, not killed
    with pytest.raises(EngineError, match="the engine has been stopped"):
        list(endless)
    with pytest.raises(EngineError, match="the engine has been stopped"):
        engine.tokens("tiny", [1, 2], Sampling(max_new_tokens=2))
    time.sleep(0.5)
    assert engine._process is process  # its reader saw the pipe close, and started none
    engine.close()  # twice: nothing more to do


def test_a_close_after_one_cut_short_still_ends_the_engine(tiny_file):
    """A Ctrl+C could cut close() short after it marked the engine stopped and before it told the process: the
    close() at exit then returned at once, and the process, which ignores SIGTERM, held the exit."""
    from gptgen.engine import STOPPED

    engine = _engine(tiny_file, rows=1)
    engine._stopped = STOPPED  # where the first call was cut short
    engine.close()
    assert not engine._process.is_alive()


def test_a_sigterm_to_the_servers_process_group_leaves_the_engine_to_the_server(tiny_file):
    """systemd's stop (KillMode=control-group) and `kill -TERM -- -PGID` reach every process of the group; the
    engine ended at once, its streams failed before their grace period, and the server started another."""
    import signal

    engine = _engine(tiny_file, rows=1)
    process = engine._process
    os.kill(process.pid, signal.SIGTERM)
    prompt, s = _requests(1)[0]
    assert list(engine.tokens("tiny", prompt, s)) == list(generate_tokens(tiny_file[1], prompt, s))
    assert engine._process is process and process.is_alive()


def test_a_restart_while_a_request_is_cancelled_fails_the_others_and_starts_a_new_engine():
    """A cancel() (a client gone) takes its reply from another thread while a restart fails them all: its
    KeyError killed the reader thread, so no engine started and the other requests waited for ever."""
    import queue

    engine = Engine.__new__(Engine)  # the restart bookkeeping alone, no process
    engine._lock, engine._restarts, engine._stopped, starts = threading.RLock(), [], None, []
    engine._loading, engine._start = {}, lambda: starts.append(1)

    class CancelledMeanwhile(queue.Queue):
        def put(self, item, *args, **kwargs):
            engine._replies.pop(2, None)  # request 2's cancel(), between the restart's list and its pop
            super().put(item, *args, **kwargs)

    first, third = CancelledMeanwhile(), queue.Queue()
    engine._replies = {1: first, 2: queue.Queue(), 3: third}
    engine._restart("the engine process stopped (exit code -9)")
    assert starts == [1] and first.get_nowait()[0] == third.get_nowait()[0] == "failed" and not engine._replies


def test_an_unloadable_model_is_a_clear_error_and_the_engine_goes_on(tiny_file, tmp_path):
    from gptgen.engine import EngineError

    engine = _engine(tiny_file, rows=2)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a model")
    with pytest.raises(EngineError, match="not a readable safetensors file"):
        engine.load("bad", str(bad))
    prompt, s = _requests(1)[0]
    assert list(engine.tokens("tiny", prompt, s)) == list(generate_tokens(tiny_file[1], prompt, s))


def test_a_request_for_a_model_not_loaded_fails_in_plain_words(tiny_file):
    """A client asking for a model the engine never loaded must read why, not a bare KeyError."""
    from gptgen.engine import EngineError

    engine = _engine(tiny_file, rows=1)
    with pytest.raises(EngineError, match=r"^model 'nope' is not loaded$"):
        list(engine.tokens("nope", [1, 2], Sampling(max_new_tokens=2)))


def test_a_decoding_step_that_fails_fails_its_requests_and_the_model_serves_the_next(tiny_file, tmp_path, monkeypatch):
    """A failed step (out of memory, say) ends its batch: kept, its broken rows would fail every later request."""
    from gptgen.engine import EngineError
    from tests.conftest import ROOT

    (tmp_path / "sitecustomize.py").write_text(  # the engine process's steps fail while a seed-12345 row is in
        "from gptgen.generate import Batch\n"
        "step = Batch.step\n"
        "def failing(self):\n"
        "    if any(seq.sampling.seed == 12345 for seq in self.active):\n"
        "        raise RuntimeError('injected step failure')\n"
        "    return step(self)\n"
        "Batch.step = failing\n")
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{ROOT}")
    engine = _engine(tiny_file, rows=2)
    with pytest.raises(EngineError, match="RuntimeError: injected step failure"):
        list(engine.tokens("tiny", [1, 2], Sampling(max_new_tokens=5, seed=12345)))
    prompt, s = _requests(1)[0]
    assert list(engine.tokens("tiny", prompt, s)) == list(generate_tokens(tiny_file[1], prompt, s))


def test_an_engine_that_keeps_dying_stops_being_restarted_and_says_so():
    """An engine that dies at once each time (a bad model, no memory) must not be restarted for ever."""
    from gptgen.engine import MAX_RESTARTS, EngineError

    engine = Engine.__new__(Engine)  # the restart bookkeeping alone, no process
    engine._lock, engine._replies, engine._restarts, engine._stopped, starts = threading.RLock(), {}, [], None, []
    engine._loading, engine._start = {}, lambda: starts.append(1)
    assert MAX_RESTARTS == 3  # the README's "up to 3 restarts a minute"
    for _ in range(MAX_RESTARTS + 1):
        engine._restart("the engine process stopped (exit code -9)")
    assert len(starts) == MAX_RESTARTS
    with pytest.raises(EngineError, match=f"{MAX_RESTARTS + 1} times in a minute; restart the server"):
        engine._request({"op": "generate"})


def test_the_engine_takes_all_cores_but_one(monkeypatch, tmp_path):
    """The server's threads and its clients need the last core, or batched decoding stalls (engine docstring)."""
    import gptgen.device
    from gptgen.engine import default_threads

    monkeypatch.setattr(gptgen.device, "CPU_QUOTA", str(tmp_path / "no-cpu.max"))  # this machine's quota aside
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert default_threads() == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert default_threads() == 1


@pytest.mark.parametrize("quota, threads", [("200000 100000\n", 1), ("150000 100000\n", 1), ("350000 100000\n", 3),
                                            ("max 100000\n", 7), ("garbled\n", 7), (None, 7)])
def test_the_engine_counts_the_cores_a_cpu_quota_leaves_it(monkeypatch, tmp_path, quota, threads):
    """A container limited to 2 CPUs on a 16-core host (a Space) sees all 16 in its affinity: 15 spinning threads."""
    import gptgen.device
    from gptgen.engine import default_threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    if quota is not None:
        (tmp_path / "cpu.max").write_text(quota)
    monkeypatch.setattr(gptgen.device, "CPU_QUOTA", str(tmp_path / "cpu.max"))
    assert default_threads() == threads
