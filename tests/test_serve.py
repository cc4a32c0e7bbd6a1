import contextlib
import json
import os
import re
import signal
import threading
import time

import pytest

from gptgen.checkpoint import ModelFileError
from gptgen.cli import main
from gptgen.serve import pick_models
from tests.conftest import BUNDLED


def test_pick_models_by_name_or_file(tmp_path):
    files, default = pick_models(BUNDLED.parent, None)
    assert files[BUNDLED.stem] == BUNDLED and default is None
    assert pick_models(BUNDLED.parent, BUNDLED.stem) == (files, BUNDLED.stem)
    other = tmp_path / "mine.safetensors"
    other.write_bytes(BUNDLED.read_bytes())
    files, default = pick_models(BUNDLED.parent, str(other))
    assert files["mine"] == other and default == "mine"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "model.safetensors").write_bytes(BUNDLED.read_bytes())
    files, default = pick_models(BUNDLED.parent, str(tmp_path / "run"))  # a run's folder: its best weights
    assert files["run"] == tmp_path / "run" / "model.safetensors" and default == "run"
    files, default = pick_models(BUNDLED.parent, str(tmp_path / "run" / "model.safetensors"))  # named alike
    assert files["run"] == tmp_path / "run" / "model.safetensors" and default == "run"
    files, default = pick_models(tmp_path, BUNDLED.stem)  # a bundled model by its name, beside another folder's
    assert files == {"mine": other, "run": tmp_path / "run" / "model.safetensors", BUNDLED.stem: BUNDLED}
    assert default == BUNDLED.stem
    for path in (tmp_path / "run", tmp_path / "run" / "model.safetensors"):  # a file of the folder: offered once
        files, default = pick_models(tmp_path, str(path))
        assert files == {"mine": other, "run": tmp_path / "run" / "model.safetensors"} and default == "run"


def test_a_file_named_as_a_folders_model_is_refused_not_served_in_its_place(tmp_path):
    for folder in ("runs", "other"):
        (tmp_path / folder / "my").mkdir(parents=True)
        (tmp_path / folder / "my" / "model.safetensors").write_bytes(BUNDLED.read_bytes())
    with pytest.raises(ModelFileError, match="would be served as 'my', the name of .*runs/my/model.safetensors"):
        pick_models(tmp_path / "runs", str(tmp_path / "other" / "my" / "model.safetensors"))


def test_a_hub_model_is_served_under_the_name_it_was_given(tmp_path, monkeypatch):
    from gptgen import hub

    pulled = []
    monkeypatch.setattr(hub, "pull", lambda repo_id, revision=None: pulled.append(repo_id) or BUNDLED)
    monkeypatch.chdir(tmp_path)
    assert pick_models(tmp_path, "gpt2") == ({"gpt2": BUNDLED}, "gpt2")
    assert pick_models(tmp_path, "owner/m") == ({"owner/m": BUNDLED}, "owner/m")
    assert pulled == ["openai-community/gpt2", "owner/m"]


def test_models_folder_offers_its_run_folders_models_by_name_and_skips_the_rest(tmp_path, caplog):
    """The README's steps (`gptgen train --out runs/my`, then quantize to runs/my/model-int8.safetensors) and
    `gptgen serve --models runs/ --model my-int8`; a run folder itself works as --models too."""
    import torch

    from gptgen.checkpoint import write_safetensors

    runs, my = tmp_path / "runs", tmp_path / "runs" / "my"
    my.mkdir(parents=True)
    for stem in ("model", "model-int8", "best", "last-0000101", "ema-0000101"):  # a resume checkpoint's: model files
        (my / f"{stem}.safetensors").symlink_to(BUNDLED)
    write_safetensors(my / "optim-0000101.safetensors", {"state.0.exp_avg": torch.zeros(2)}, {"param_groups": "[]"})
    (runs / "hf").mkdir()  # a transformers export
    write_safetensors(runs / "hf" / "model.safetensors", {"wte.weight": torch.zeros(2)}, {"format": "pt"})
    (runs / "mine.safetensors").symlink_to(BUNDLED)

    files, default = pick_models(runs, "my-int8")
    assert default == "my-int8" and files == {"mine": runs / "mine.safetensors", "my-best": my / "best.safetensors",
                                              "my": my / "model.safetensors", "my-int8": my / "model-int8.safetensors"}
    hf = runs / "hf" / "model.safetensors"
    assert f"not served: '{hf}' is a safetensors file but not a gptgen model" in caplog.text
    assert all(name not in caplog.text for name in ("optim-", "last-", "ema-"))  # training state: skipped quietly
    assert set(pick_models(my, None)[0]) == {"best", "model", "model-int8"}


def test_unknown_model_names_what_is_there(capsys):
    with pytest.raises(ModelFileError, match="shakespeare-mini-int8"):
        pick_models(BUNDLED.parent, "nope")
    assert main(["serve", "--model", "nope"]) == 2
    assert "neither a file, a Hub id, nor a model" in capsys.readouterr().err


def test_the_spaces_entry_point_serves_the_bundled_model(tmp_path):
    """`python app.py`, as Spaces runs it (the engine process re-imports it, so it must not serve twice); with
    port 0 it prints the port the system gave it, and that address answers."""
    import httpx

    from tests.conftest import start_server

    proc, url = start_server([], tmp_path / "app.log", spaces_entry=True)
    try:
        answer = httpx.post(f"{url}v1/completions", json={"prompt": "Hi", "max_tokens": 3}, timeout=30)
        assert answer.status_code == 200, (tmp_path / "app.log").read_text()
        assert answer.json()["model"] == BUNDLED.stem
        assert not url.endswith(":0/")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_folder_without_models_is_a_clear_error(tmp_path, capsys):
    import torch

    from gptgen.checkpoint import write_safetensors

    write_safetensors(tmp_path / "optim-0000101.safetensors", {"state.0.exp_avg": torch.zeros(2)}, {})
    assert main(["serve", "--models", str(tmp_path)]) == 2
    assert f"no models to serve: '{tmp_path}' has no gptgen model files" in capsys.readouterr().err
    assert main(["serve", "--models", str(tmp_path / "runs")]) == 2
    assert f"the --models folder '{tmp_path / 'runs'}' does not exist" in capsys.readouterr().err


def test_a_taken_port_is_one_clear_line_before_any_address():
    import socket
    import subprocess
    import sys

    from tests.conftest import ROOT

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        run = subprocess.run([sys.executable, "-m", "gptgen", "serve", "--port", str(port)], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert (run.stdout + run.stderr).splitlines() == [
        f"gptgen: error: port {port} is already in use on 127.0.0.1; choose another with --port"]


def test_a_port_that_another_server_holds_while_loading_is_taken():
    """Each server binds its port before loading its model; two that bound the same port both printed it."""
    from gptgen import serve
    from gptgen.config import GptgenError

    with serve.bound_socket("127.0.0.1", 0) as first:
        port = first.getsockname()[1]
        with pytest.raises(GptgenError, match=f"port {port} is already in use"):
            serve.bound_socket("127.0.0.1", port)


@pytest.fixture(scope="module")
def openai_client(web_server):
    import openai

    return openai.OpenAI(base_url=f"{web_server}v1", api_key="not-needed")


def test_openai_models_lists_the_shelf(openai_client):
    assert sorted(m.id for m in openai_client.models.list()) == ["random-gpt2-int8", BUNDLED.stem]


def test_openai_completion_equals_the_python_api(openai_client):
    import gptgen

    out = openai_client.completions.create(model=BUNDLED.stem, prompt="ROMEO:", max_tokens=30, temperature=0.7,
                                           top_p=0.9, seed=11, stop=["\n\n"], user="reader-7")  # changes no text
    expected = gptgen.load(str(BUNDLED), device="cpu").generate("ROMEO:", max_new_tokens=30, temperature=0.7,
                                                                  top_p=0.9, top_k=0, seed=11, stop=["\n\n"])
    assert out.choices[0].text == expected
    assert out.choices[0].finish_reason in ("stop", "length") and out.usage.prompt_tokens == 3
    assert out.usage.completion_tokens >= 1
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_concurrent_openai_clients_each_get_their_text_alone(openai_client):
    """Eight clients at once through the real server: each text equals the Python API's batch of one. (That the
    engine really decodes them together is checked on the engine itself, where its batch size can be seen.)"""
    from concurrent.futures import ThreadPoolExecutor

    import gptgen

    model = gptgen.load(str(BUNDLED), device="cpu")
    prompts = ["ROMEO:", "JULIET:", "First Citizen:", "KING RICHARD III:", "MENENIUS:", "", "O", "What"]
    jobs = [dict(prompt=p, max_tokens=30 + 4 * i, temperature=0 if i % 2 else 0.8, seed=i)
            for i, p in enumerate(prompts)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        texts = list(pool.map(lambda job: openai_client.completions.create(model=BUNDLED.stem, **job).choices[0].text,
                              jobs))
    for job, text in zip(jobs, texts, strict=True):
        assert text == model.generate(job["prompt"], max_new_tokens=job["max_tokens"], temperature=job["temperature"],
                                      top_k=0, seed=job["seed"])


def test_openai_streaming_pieces_join_to_the_plain_answer(openai_client):
    kwargs = dict(model=BUNDLED.stem, prompt="JULIET:", max_tokens=40, temperature=0.8, seed=5)
    pieces = [c.choices[0].text for c in openai_client.completions.create(stream=True, **kwargs)]
    assert len(pieces) > 2 and "".join(pieces) == openai_client.completions.create(**kwargs).choices[0].text


def _close_a_stream(client):
    stream = client.completions.create(model="gpt2", prompt="A", max_tokens=4096, stream=True, temperature=0)
    assert len([next(stream) for _ in range(3)]) == 3
    stream.close()


def _give_up_on_a_plain_request(client):
    import openai

    with pytest.raises(openai.APITimeoutError):
        client.with_options(timeout=1).completions.create(model="gpt2", prompt="A", max_tokens=4096, temperature=0)


def _give_up_on_a_plain_request_waiting_for_the_row(client):
    """The gone request leaves while it waits for the row that the stream below holds."""
    holder = client.completions.create(model="gpt2", prompt="A", max_tokens=4096, stream=True, temperature=0)
    next(holder)  # it holds the one row
    _give_up_on_a_plain_request(client)
    holder.close()


@pytest.mark.parametrize("leave", [_close_a_stream, _give_up_on_a_plain_request,
                                   _give_up_on_a_plain_request_waiting_for_the_row])
def test_a_client_that_leaves_frees_its_row_at_once(tmp_path, leave):
    """One row, and a client that leaves a 4,096-token request: it closes the stream after 3 chunks, or gives up on
    a plain request after 1 s, running or waiting for the row (the gpt2-size model decodes ~120 tokens/s on 2
    cores, so the rest would take ~30 s).
    The next request must get the row at once. Before, a closed stream decoded on until the garbage collector freed
    it (seconds, longer each time as the server's heap grew: hence 3 rounds), a plain request to its end. Greedy:
    sampling from random weights can draw <|endoftext|> and end a request early (seen once in CI)."""
    import time

    import openai

    from tests.conftest import start_server, write_random_int8_model

    model = write_random_int8_model(tmp_path / "gpt2.safetensors", "gpt2")
    proc, url = start_server(["--model", str(model), "--max-batch", "1"], tmp_path / "server.log")
    try:
        client = openai.OpenAI(base_url=f"{url}v1", api_key="not-needed", timeout=10, max_retries=0)
        one_token = dict(model="gpt2", prompt="A", max_tokens=1, temperature=0)  # greedy: sampled, it drew the end
        assert client.completions.create(**one_token).usage.completion_tokens == 1
        for _ in range(3):
            leave(client)
            start = time.monotonic()
            assert client.completions.create(**one_token).usage.completion_tokens == 1
            assert time.monotonic() - start < 10  # ~0.02 s alone; a row left held is ~30 s
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_clients_that_leave_while_waiting_for_the_row_give_their_places_back_at_once(tmp_path):
    """A stream holds the one row, and the 64 waiting places are taken by streams whose clients then leave (timed
    out, to retry, say). Their requests waited on, in thread reads that no cancel reached, until each had taken the
    row for a token: meanwhile every new client was refused (429) for the minute that the first stream ran."""
    import openai

    from gptgen.engine import MAX_WAITING
    from tests.conftest import start_server, write_random_int8_model

    model = write_random_int8_model(tmp_path / "gpt2.safetensors", "gpt2")
    proc, url = start_server(["--model", str(model), "--max-batch", "1"], tmp_path / "server.log")
    client = openai.OpenAI(base_url=f"{url}v1", api_key="not-needed", timeout=10, max_retries=0)
    request = dict(model="gpt2", prompt="A", max_tokens=4096, stream=True, temperature=0)
    try:
        holder = client.completions.create(**request)
        next(holder)  # it has the row, for a minute
        waiting = [client.completions.create(**request) for _ in range(MAX_WAITING)]  # answered: in the queue
        with pytest.raises(openai.RateLimitError):
            client.completions.create(**request)
        for stream in waiting:
            stream.close()
        deadline, admitted = time.monotonic() + 10, None
        while admitted is None and time.monotonic() < deadline:
            with contextlib.suppress(openai.RateLimitError):
                admitted = client.completions.create(**request)
            time.sleep(0.1)
        assert admitted is not None, "the places of the clients that left were not given back"
        admitted.close()
        holder.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_page_and_the_api_answer_with_more_streams_open_than_default_threads(tmp_path):
    """Each stream holds a worker thread while it waits for a token, and 40 (anyio's default) held them all: with 45
    streams open (one decoding, 44 waiting for the row) /v1/models, the page and new requests hung. And a stop
    then ends the server in seconds, each stream with an error event."""
    import socket
    import time
    import urllib.request

    from tests.conftest import start_server, write_random_int8_model

    model = write_random_int8_model(tmp_path / "gpt2.safetensors", "gpt2")  # ~30 s for 4,096 tokens on 2 cores
    proc, url = start_server(["--model", str(model), "--max-batch", "1"], tmp_path / "server.log")
    port, streams = int(url.rsplit(":", 1)[1].strip("/")), []
    # greedy: no <|endoftext|> drawn from the random weights ends the stream before the stop
    body = json.dumps({"prompt": "A", "max_tokens": 4096, "stream": True, "temperature": 0}).encode()
    try:
        for _ in range(45):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            streams.append(s)
        for s in streams:  # each has its answer's head: its stream is being read, holding a worker thread
            s.settimeout(30)
            assert s.recv(12) == b"HTTP/1.1 200"
        for path in ("v1/models", ""):
            with urllib.request.urlopen(url + path, timeout=10) as r:
                assert r.status == 200
        start = time.monotonic()
        proc.terminate()  # with the 45 streams still open: the server waited for all of them to end (minutes)
        proc.wait(timeout=60)
        assert time.monotonic() - start < 30  # the 5 s grace, then the engine stops; it used to be minutes
        for s in streams:  # each ends with an error event: cut by uvicorn, they ended like whole texts
            received = b""
            while chunk := s.recv(65536):
                received += chunk
            assert b"the server is stopping; this text was cut off" in received, received[-500:]
    finally:
        for s in streams:
            s.close()
        proc.kill()
        proc.wait(timeout=30)


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_sent_to_the_servers_group_stops_the_server_gracefully_not_its_engine(tmp_path, stop):
    """A terminal's Ctrl+C goes to every process of the command's group, and so do `systemctl stop`'s SIGTERM and
    `kill -TERM -- -PGID`. The engine took it as the server gone and ended at once: the open stream got "the engine
    process stopped", and the server started a new engine (loading its models again) while it was stopping. The
    engine, which now ignores both, still ends with the server."""
    import socket
    import time

    from tests.conftest import start_server, write_random_int8_model

    model = write_random_int8_model(tmp_path / "gpt2.safetensors", "gpt2")  # ~30 s for 4,096 tokens on 2 cores
    log = tmp_path / "server.log"
    proc, url = start_server(["--model", str(model)], log, own_group=True)
    port = int(url.rsplit(":", 1)[1].strip("/"))
    # greedy: no <|endoftext|> drawn from the random weights ends the stream before the stop
    body = json.dumps({"prompt": "A", "max_tokens": 4096, "stream": True, "temperature": 0}).encode()
    with socket.create_connection(("127.0.0.1", port)) as s:
        try:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            s.settimeout(30)
            received = s.recv(65536)
            while b"data: {" not in received:  # the stream has its first token
                received += s.recv(65536)
            start = time.monotonic()
            os.killpg(proc.pid, stop)
            proc.wait(timeout=60)
            assert time.monotonic() - start < 30
            while chunk := s.recv(65536):
                received += chunk
            deadline = time.monotonic() + 10  # multiprocessing's resource tracker ends when it sees the server gone
            with pytest.raises(ProcessLookupError):  # no process of the group is left: the engine ended too
                while time.monotonic() < deadline:
                    os.killpg(proc.pid, 0)
                    time.sleep(0.1)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert b"the server is stopping; this text was cut off" in received, received[-500:]
    assert "engine process stopped" not in log.read_text(), log.read_text()[-2000:]


def test_openai_stream_usage_comes_last_when_asked(openai_client):
    """stream_options={"include_usage": true}, as OpenAI answers it: usage null in every chunk, then one chunk
    with no choices and the counts."""
    kwargs = dict(model=BUNDLED.stem, prompt="JULIET:", max_tokens=12, temperature=0.8, seed=5)
    *chunks, last = openai_client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs)
    assert all(c.usage is None and len(c.choices) == 1 for c in chunks) and last.choices == []
    assert last.usage == openai_client.completions.create(**kwargs).usage


def test_openai_null_fields_mean_their_defaults(web_server):
    """Clients send null for "not given" (OpenAI reads it so): the answer is the one without those fields."""
    import httpx

    import gptgen

    optional = ["model", "max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "stop", "n", "best_of",
                "echo", "logprobs", "suffix", "frequency_penalty", "presence_penalty", "logit_bias", "stream",
                "stream_options", "user"]
    answers = [httpx.post(f"{web_server}v1/completions", json={"prompt": "ROMEO:", "seed": 3, **nulls}, timeout=60)
               for nulls in ({}, dict.fromkeys(optional))]
    assert [r.status_code for r in answers] == [200, 200], answers[1].text
    assert answers[0].json()["choices"] == answers[1].json()["choices"]
    # OpenAI's defaults, where they differ from gptgen's: 16 tokens, temperature 1, no top-k
    assert answers[0].json()["choices"][0]["text"] == gptgen.load(str(BUNDLED), device="cpu").generate(
        "ROMEO:", max_new_tokens=16, temperature=1.0, top_k=0, seed=3)


DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("raw", [DEEP, f'{{"prompt": "hi", "n": {DEEP}}}'])
def test_deeply_nested_json_is_a_400(web_server, raw):
    """json's parser recurses per level: too deep a body is the client's error, not a 500 with a traceback."""
    import httpx

    r = httpx.post(f"{web_server}v1/completions", content=raw, headers={"content-type": "application/json"},
                   timeout=60)
    assert r.status_code == 400 and r.json()["error"]["message"] == "the body's JSON is nested too deeply"


@pytest.mark.parametrize("kwargs, message, param", [
    (dict(temperature=-1), "temperature must be 0 (greedy) or positive", "temperature"),
    (dict(max_tokens=0), "max_tokens must be between 1", "max_tokens"),  # the body's name, not the API's
    (dict(extra_body={"top_k": 1.5}), "top_k must be an integer", "top_k"),
    (dict(n=2), "n=2 is not supported", "n"),
    (dict(n=True), "n=true is not supported", "n"),  # true == 1 in Python
    (dict(extra_body={"echo": 0}), "echo=0 is not supported", "echo"),  # and 0 == false
    (dict(extra_body={"user": [[1]]}), "user must be a string", "user"),
    (dict(logprobs=1), "logprobs=1 is not supported", "logprobs"),
    (dict(logit_bias={"262": 100}), 'logit_bias={"262": 100} is not supported', "logit_bias"),
    (dict(stream_options={"include_usage": True}), "stream_options is only allowed when stream is true",
     "stream_options"),
    (dict(extra_body={"foo": 1}), "Unrecognized request argument supplied: foo", "foo"),  # OpenAI's words
    (dict(extra_body={"max_new_tokens": 5}), "Unrecognized request argument supplied: max_new_tokens",
     "max_new_tokens"),  # the Python API's name is not the body's
    (dict(prompt=["Hi", "Ho"]), "prompt must be a string", "prompt"),
    (dict(extra_body={"stream": "yes"}), "stream must be true or false", "stream"),
    (dict(model="../etc/passwd"), "unknown model", "model"),
    (dict(model=0), "model must be a string", "model"),  # not the default model's text
    (dict(model=False), "model must be a string", "model"),
])
def test_openai_errors_are_openai_shaped(openai_client, kwargs, message, param):
    import openai

    with pytest.raises((openai.BadRequestError, openai.NotFoundError), match=re.escape(message)) as e:
        openai_client.completions.create(**{"model": BUNDLED.stem, "prompt": "Hi", **kwargs})
    assert e.value.body["type"] == "invalid_request_error" and e.value.body["param"] == param
    assert e.value.status_code == (404 if message == "unknown model" else 400)  # 404 only for a model not there


def test_other_v1_routes_get_openai_errors_that_say_what_is_offered(openai_client, web_server):
    import httpx
    import openai

    offered = ("GET /v1/models", "POST /v1/completions")
    with pytest.raises(openai.NotFoundError) as e:  # a chat client pointed at this server
        openai_client.chat.completions.create(model=BUNDLED.stem, messages=[{"role": "user", "content": "Hi"}])
    assert e.value.body["type"] == "invalid_request_error" and e.value.body["param"] is None
    assert "no /v1/chat/completions" in e.value.body["message"] and all(o in e.value.body["message"] for o in offered)
    for method in ("HEAD", "OPTIONS", "GET"):
        r = httpx.request(method, f"{web_server}v1/completions")
        assert r.status_code == 405 and r.headers["allow"] == "POST", method
    assert r.json()["error"]["type"] == "invalid_request_error" and all(o in r.json()["error"]["message"]
                                                                         for o in offered)
    r = httpx.head(f"{web_server}v1/models")
    assert r.status_code == 405 and r.headers["allow"] == "GET"
    r = httpx.delete(f"{web_server}v1/models/{BUNDLED.stem}")  # OpenAI's delete-model: a 404 that named it offered
    assert r.status_code == 405 and r.headers["allow"] == "GET" and "takes GET, not DELETE" in r.text
    r = httpx.get(f"{web_server}v1")  # the API's root, not the page's
    assert r.status_code == 404 and all(o in r.json()["error"]["message"] for o in offered)
    assert httpx.get(web_server).status_code == 200 and httpx.get(f"{web_server}config").status_code == 200  # the page


def test_one_model_by_id_as_openais_models_retrieve_asks(openai_client):
    import openai

    assert openai_client.models.retrieve(BUNDLED.stem).id == BUNDLED.stem
    with pytest.raises(openai.NotFoundError, match="the model 'nope' does not exist; this server has: "):
        openai_client.models.retrieve("nope")


def test_a_body_over_the_cap_is_a_413_before_it_is_parsed(web_server):
    import httpx

    raw = json.dumps({"prompt": "Hi", "max_tokens": 1, "user": "x" * (4 * 2**20)})
    r = httpx.post(f"{web_server}v1/completions", content=raw, headers={"content-type": "application/json"},
                   timeout=60)
    assert r.status_code == 413 and r.json()["error"]["message"] == "the body is over 4 MiB"


@pytest.mark.parametrize("raw, why", [('{"prompt": "Hi",}', "Expecting property name"),
                                      ('{"max_tokens": %s}' % ("9" * 5000), "Exceeds the limit")])
def test_a_body_that_is_not_json_is_a_400_that_says_where(web_server, raw, why):
    import httpx

    r = httpx.post(f"{web_server}v1/completions", content=raw, headers={"content-type": "application/json"},
                   timeout=60)
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("the body is not valid JSON (")
    assert why in r.json()["error"]["message"]


def test_a_field_name_that_is_no_unicode_text_is_a_400_that_shows_it_escaped(web_server):
    """A lone surrogate in an unknown field's name made the error response itself fail: a 500."""
    import httpx

    r = httpx.post(f"{web_server}v1/completions", content='{"\\ud800": 1}',
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 400 and r.json()["error"] == {
        "message": "Unrecognized request argument supplied: \\ud800", "type": "invalid_request_error",
        "param": "\\ud800", "code": None}


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

JSON_VALUE = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats()
                          | st.text(max_size=20), lambda inner: st.lists(inner, max_size=3), max_leaves=5)
FIELDS = ["prompt", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "n", "stream", "model",
          "repetition_penalty", "echo", "logit_bias", "stream_options", "user"]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(FIELDS), JSON_VALUE, max_size=6) | JSON_VALUE)
def test_any_json_body_gets_an_answer_or_a_clear_400_and_the_server_goes_on(web_server, body):
    import httpx

    if isinstance(body, dict) and isinstance(body.get("max_tokens"), int):
        body["max_tokens"] = min(abs(body["max_tokens"]) or 1, 8)  # keep the valid cases short
    raw = json.dumps(body)  # NaN and Infinity included, as Python clients send them
    r = httpx.post(f"{web_server}v1/completions", content=raw, headers={"content-type": "application/json"},
                   timeout=60)
    assert r.status_code in (200, 400, 404), (body, r.status_code, r.text[:300])
    if r.status_code != 200:
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and error["message"]
    health = httpx.post(f"{web_server}v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=60)
    assert health.status_code == 200


def test_an_engine_that_fails_mid_request_is_an_openai_error_not_a_500_page_or_a_silent_end():
    """An EngineError raised while the text was read (the engine process died, a decoding step failed) gave a
    plain-text 500, or a 200 stream that just stopped, without an error or [DONE]."""
    import os
    import signal
    import time

    from fastapi.testclient import TestClient

    from gptgen.serve import ModelShelf, build_server

    shelf = ModelShelf({BUNDLED.stem: BUNDLED}, device="cpu", rows=1)
    long = {"prompt": "Hi", "max_tokens": 4096, "temperature": 1.0, "seed": 1}
    with TestClient(build_server(shelf)) as client:
        with client.stream("POST", "/v1/completions", json={**long, "stream": True}) as r:
            lines = iter(line for line in r.iter_lines() if line)
            assert json.loads(next(lines)[6:])["choices"][0]["text"] is not None
            os.kill(shelf.engine._process.pid, signal.SIGKILL)
            rest = list(lines)
        error = json.loads(rest[-1][6:])["error"]
        assert error["type"] == "server_error" and "send it again" in error["message"], rest[-3:]
        shelf.engine._restarts.clear()  # the same test again, without counting towards the restart limit
        # a whole request first: the restarted engine has then loaded its model (a reload is a request too, which
        # the kill below must not take for this one)
        assert client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1}).status_code == 200
        before = set(shelf.engine._replies)

        def kill_once_it_runs() -> None:  # not after a fixed time: the request may not have reached it yet
            deadline = time.monotonic() + 60
            while not set(shelf.engine._replies) - before and time.monotonic() < deadline:
                time.sleep(0.01)
            os.kill(shelf.engine._process.pid, signal.SIGKILL)

        threading.Thread(target=kill_once_it_runs, daemon=True).start()
        r = client.post("/v1/completions", json=long)
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error", r.text


def test_a_stop_string_on_the_last_allowed_token_is_finish_reason_stop():
    """finish_reason was "length" whenever max_tokens tokens were made, even when a stop string had ended the text
    on the last of them."""
    from fastapi.testclient import TestClient

    from gptgen.serve import ModelShelf, build_server

    shelf = ModelShelf({BUNDLED.stem: BUNDLED}, device="cpu", rows=1)
    greedy = {"prompt": "JULIET:", "max_tokens": 8, "temperature": 0}
    with TestClient(build_server(shelf)) as client:
        whole = client.post("/v1/completions", json=greedy).json()["choices"][0]
        assert whole["text"] == "\nI'll tell thee, my lord" and whole["finish_reason"] == "length"
        cut = client.post("/v1/completions", json={**greedy, "stop": [" lord"]}).json()  # the 8th token is " lord"
        assert cut["choices"][0]["text"] == "\nI'll tell thee, my" and cut["usage"]["completion_tokens"] == 8
        assert cut["choices"][0]["finish_reason"] == "stop"


def test_a_bad_request_for_a_model_not_loaded_yet_does_not_load_it():
    """It was refused only after the model had loaded (pausing every other model's decoding), and kept it loaded:
    bad requests alone could load every model of --models, and a full server loaded it before saying so."""
    from gptgen.engine import MAX_WAITING, ServerBusy
    from gptgen.serve import ModelShelf

    shelf = ModelShelf({"a": BUNDLED, "b": BUNDLED}, device="cpu", rows=1)
    shelf.get("a")
    for bad in (dict(temperature=-1), dict(max_new_tokens=0)):
        with pytest.raises(ValueError):
            shelf.stream("b", "Hi", **bad)
    with pytest.raises(ValueError, match="prompt is 100,001 characters"):
        shelf.stream("b", "x" * 100_001)
    shelf.engine.max_waiting = -1  # full: refused too, before the load
    with pytest.raises(ServerBusy):
        shelf.stream("b", "Hi")
    shelf.engine.max_waiting = MAX_WAITING
    assert list(shelf._loaded) == ["a"] and list(shelf.engine._models) == ["a"]
    pieces, _ = shelf.stream("b", "Hi", max_new_tokens=2, seed=0)
    assert "".join(pieces) and list(shelf._loaded) == ["a", "b"]


def test_of_a_long_prompt_only_the_context_that_a_model_keeps_goes_to_the_engine(monkeypatch):
    """A 100,000-token prompt was 1 MB of JSON for the engine's one decoding loop to read, which kept 128 tokens."""
    import gptgen
    from gptgen.serve import ModelShelf

    shelf = ModelShelf({BUNDLED.stem: BUNDLED}, device="cpu", rows=1)
    sent, tokens = [], shelf.engine.tokens
    monkeypatch.setattr(shelf.engine, "tokens", lambda name, ids, s: sent.append(len(ids)) or tokens(name, ids, s))
    prompt = "To be, or not to be: that is the question. " * 200
    pieces, stats = shelf.stream(BUNDLED.stem, prompt, max_new_tokens=6, temperature=0)
    context = shelf.about(BUNDLED.stem)[0].block_size
    assert "".join(pieces) == gptgen.load(str(BUNDLED)).generate(prompt, max_new_tokens=6, temperature=0)
    assert sent == [context] and stats.prompt_tokens > 10 * context


def test_busy_is_a_429_with_retry_after_for_openai_clients():
    from fastapi.testclient import TestClient

    from gptgen.serve import ModelShelf, build_server

    shelf = ModelShelf({BUNDLED.stem: BUNDLED}, device="cpu", rows=1)
    shelf.engine.max_waiting = -1  # every request finds the queue full
    with TestClient(build_server(shelf)) as client:
        r = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 429 and r.headers["retry-after"]
        assert r.json()["error"]["type"] == "server_busy" and "retry" in r.json()["error"]["message"]
