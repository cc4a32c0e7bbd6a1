import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gptgen.config import TrainConfig
from gptgen.data import load_corpus
from tests.conftest import BUNDLED, ROOT


def gptgen(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "gptgen", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)  # a hang fails, not waits


FAST = ["--preset", "tiny", "--batch-size", "2", "--block-size", "16", "--compile", "off", "--dtype", "float32"]


def test_train_then_eval_json(small_text, tmp_path):
    run = tmp_path / "run"
    r = gptgen("train", "--data", small_text, "--out", run, "--steps", "4", "--eval-interval", "2", *FAST)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["steps"] == 4
    r = gptgen("eval", run / "model.safetensors", "--data", small_text, "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    best = min((row for row in rows if "val_nats_per_token" in row), key=lambda row: row["val_nats_per_token"])
    assert report["block_size"] == 16  # the block it was trained with
    assert report["val_nats_per_token"] == pytest.approx(best["val_nats_per_token"], rel=1e-6)
    assert report["val_tokens"] == best["val_tokens"]
    corpus = load_corpus(small_text, 0.1)
    assert report["unseen_val_tokens"] == np.isin(corpus.val, corpus.train, invert=True).sum() > 0
    assert 0 < report["unseen_nats_per_char"] < report["val_nats_per_char"]
    r = gptgen("eval", run, "--data", small_text)  # a run's folder stands for its model.safetensors
    assert "nats/char" in r.stdout and "perplexity" in r.stdout and "never occur in the train split" in r.stdout
    assert f"{report['val_nats_per_char']:.4f} nats/char" in r.stdout


def test_train_quantize_generate_without_the_server_packages(small_text, tmp_path):
    """A GPU machine may have torch and no web stack: only `gptgen serve` needs gradio/fastapi."""
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\nfor m in ('fastapi', 'gradio', 'uvicorn', 'starlette', 'gguf'):\n    sys.modules[m] = None\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}

    def run(*args):
        return subprocess.run([sys.executable, "-m", "gptgen", *map(str, args)], capture_output=True, text=True,
                              env=env)

    blocked = subprocess.run([sys.executable, "-c", "import gradio"], capture_output=True, text=True, env=env)
    assert "import of gradio halted" in blocked.stderr  # the block works
    r = run("train", "--data", small_text, "--out", tmp_path / "run", "--steps", "2", *FAST)
    assert r.returncode == 0, r.stderr
    assert run("quantize", tmp_path / "run" / "model.safetensors", tmp_path / "q.safetensors").returncode == 0
    r = run("generate", tmp_path / "q.safetensors", "Hello", "--max-new-tokens", "3", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["new_tokens"] == 3, r.stderr


def bad_inputs(tmp_path, small_text):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "bin.dat").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "latin1.txt").write_bytes("naïve café".encode("latin-1") * 50)
    (tmp_path / "short.txt").write_text("Just a few words.")
    ro = tmp_path / "ro"
    ro.write_text("a file, so nothing can be created under it")
    ok = ["--data", small_text, "--steps", "2"]
    return {
        "missing data": (["--data", tmp_path / "nope.txt", "--steps", "2"], "does not exist"),
        "empty data": (["--data", tmp_path / "empty.txt", "--steps", "2"], "empty"),
        "binary data": (["--data", tmp_path / "bin.dat", "--steps", "2"], "binary"),
        "not utf-8": (["--data", tmp_path / "latin1.txt", "--steps", "2"], "UTF-8"),
        "too short": (["--data", tmp_path / "short.txt", "--steps", "2"], "fewer than one block"),
        "held out": ([*ok, "--val-fraction", "0.999"], "a smaller --val-fraction (it holds out 0.999 of the text)"),
        "unknown preset": ([*ok, "--preset", "gpt5"], "unknown preset"),
        "block above context": ([*ok, "--block-size", "5000"], "context"),
        "zero lr": ([*ok, "--lr", "0"], "--lr"),
        "negative steps": (["--data", small_text, "--steps", "-3"], "--steps"),
        "unwritable out": ([*ok], "cannot write"),
    }


CASES = ["missing data", "empty data", "binary data", "not utf-8", "too short", "held out", "unknown preset",
         "block above context", "zero lr", "negative steps", "unwritable out"]


@pytest.mark.parametrize("case", CASES)
def test_bad_train_input_is_one_clear_line(case, small_text, tmp_path):
    args, message = bad_inputs(tmp_path, small_text)[case]
    out = tmp_path / "ro" / "run" if case == "unwritable out" else tmp_path / "run"
    fast = [a for a in FAST if a != "--preset" and a != "tiny"] if "--preset" in args else FAST
    r = gptgen("train", *fast, *args, "--out", out)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("gptgen: error:") and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()


def test_eval_refuses_a_missing_text_before_it_loads_the_model(capsys, monkeypatch, tmp_path):
    import gptgen.checkpoint

    monkeypatch.setattr(gptgen.checkpoint, "load_model", lambda *_: pytest.fail("loaded first"))
    status, _, err = run_main(capsys, "eval", "you/not-fetched", "--data", tmp_path / "none.txt")
    assert status == 2 and "data file" in err and "does not exist" in err, err


def test_eval_and_export_refuse_bad_text_or_a_taken_output_before_a_download(capsys, monkeypatch, tmp_path):
    """A Hub model is fetched (and a transformers one converted) by resolve(): a text that cannot be read, or an
    output that cannot be written, must be said before it, not after minutes of download."""
    import gptgen.hub

    monkeypatch.setattr(gptgen.hub, "resolve", lambda *_: pytest.fail("downloaded first"))
    utf16 = tmp_path / "utf16.txt"
    utf16.write_bytes("\ufeffsome text".encode("utf-16-le"))
    status, _, err = run_main(capsys, "eval", "you/not-fetched", "--data", utf16)
    assert status == 2 and "is UTF-16 text" in err, err
    (tmp_path / "taken.gguf").write_bytes(b"mine")
    status, _, err = run_main(capsys, "export", "you/not-fetched", tmp_path / "taken.gguf")
    assert status == 2 and "taken.gguf" in err and (tmp_path / "taken.gguf").read_bytes() == b"mine", err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    status, _, err = run_main(capsys, "export", "you/not-fetched", tmp_path / "busy", "--format", "hf")
    assert status == 2 and "not an empty directory" in err, err


def test_bad_eval_input(tmp_path, small_text):
    fake = tmp_path / "model.safetensors"
    fake.write_bytes(b"\x80\x04\x95" + b"pickle" * 20)
    r = gptgen("eval", fake, "--data", small_text)
    assert r.returncode == 2 and "not a readable safetensors file" in r.stderr and "Traceback" not in r.stderr
    r = gptgen("eval", tmp_path / "none.safetensors", "--data", small_text)
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_resume_takes_only_a_new_budget(tmp_path):
    r = gptgen("train", "--resume", tmp_path, "--lr", "1")
    assert r.returncode == 2 and "only --steps" in r.stderr
    r = gptgen("train", "--resume", tmp_path / "none")
    assert r.returncode == 2 and "no state.json" in r.stderr


def test_train_help_describes_every_flag():
    """Each flag, the hand-written ones too, has its own line of help, and a knob with a default says it."""
    from gptgen.cli import parser

    train = parser().parse_args(["train"]).subparser
    helps = {a.option_strings[0]: a.help for a in train._actions if a.dest != "help"}
    assert {f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(TrainConfig)} | {"--resume"} <= set(helps)
    for flag, help_text in helps.items():
        assert isinstance(help_text, str) and help_text.strip() and help_text != argparse.SUPPRESS, flag
    r = subprocess.run([sys.executable, "-m", "gptgen", "train", "--help"], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "10000"})  # no wrapping
    assert r.returncode == 0, r.stderr
    text = r.stdout
    assert "default: None" not in text
    for field in dataclasses.fields(TrainConfig):
        flag = f"--{field.name.replace('_', '-')}"
        assert flag in text
        if field.metadata:
            assert field.metadata["help"] in text
            assert field.default is None or "default" in field.metadata["help"] or f"(default: {field.default})" in text


def test_quantize_generate_and_export(tmp_path):
    from tests.test_model import tiny_model_file

    f32, i8 = tiny_model_file(tmp_path / "f32.safetensors"), tmp_path / "i8.safetensors"
    r = gptgen("quantize", f32, i8)
    assert r.returncode == 0, r.stderr
    assert i8.stat().st_size < 0.5 * f32.stat().st_size
    r = gptgen("generate", i8, "The king", "--max-new-tokens", "5", "--temperature", "0", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["new_tokens"] == 5 and report["prompt_tokens"] == 2 and isinstance(report["text"], str)
    r = gptgen("generate", f32, "The king", "--max-new-tokens", "4", "--seed", "3")
    assert r.returncode == 0 and r.stdout.endswith("\n")
    compiled = gptgen("generate", f32, "The king", "--max-new-tokens", "4", "--seed", "3", "--compile",
                      "--device", "cpu")
    assert compiled.stdout == r.stdout and "--compile acts on CUDA only" in compiled.stderr  # said, not ignored
    bf16 = gptgen("generate", f32, "The king", "--max-new-tokens", "4", "--dtype", "bfloat16", "--json")
    assert bf16.returncode == 0 and json.loads(bf16.stdout)["new_tokens"] == 4, bf16.stderr
    assert gptgen("generate", f32, "x", "--dtype", "fp8").returncode == 2  # argparse names the choices
    r = gptgen("export", f32, tmp_path / "m.gguf", "--type", "q8_0")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "m.gguf").read_bytes()[:4] == b"GGUF"  # llama.cpp's own test is in test_interop


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "-1"], "--temperature must be"), (["--temperature", "nan"], "--temperature must be"),
    (["--top-k", "-2"], "--top-k must be"), (["--top-p", "0"], "--top-p must be"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be"), (["--max-new-tokens", "100000"], "--max-new-tokens must"),
    (["--stop", "x" * 1001], "--stop takes at most 16 strings of at most 1,000 characters each, got 1, the longest"),
])
def test_generate_rejects_bad_parameters(tmp_path, flags, message):
    r = gptgen("generate", tmp_path / "unused.safetensors", "hi", *flags)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_generate_refuses_a_prompt_file_too_long_before_it_loads_the_model(tmp_path):
    (tmp_path / "long.txt").write_text("a " * 50_001)
    r = gptgen("generate", tmp_path / "unused.safetensors", "--prompt-file", tmp_path / "long.txt")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "prompt is 100,002 characters; the limit is 100,000" in r.stderr  # not "unused.safetensors does not exist"


def test_a_prompt_piped_without_end_is_refused_once_past_the_limit(tmp_path):
    """--prompt-file read the whole stream before it counted: an endless pipe (or /dev/zero) until memory ran out."""
    proc = subprocess.Popen([sys.executable, "-m", "gptgen", "generate", str(tmp_path / "unused.safetensors"),
                             "--prompt-file", "-"], stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=False)
    try:
        proc.stdin.write(b"a" * 400_005)  # more bytes than 100,000 characters take in any encoding; the pipe stays open
        proc.stdin.flush()
        assert proc.wait(timeout=60) == 2
        err = proc.stderr.read().decode()
        assert "holds more than 100,000 characters, the limit of a prompt" in err and "Traceback" not in err, err
    finally:
        proc.kill()
        proc.stdin.close()


def test_generated_text_that_stdouts_encoding_cannot_hold_is_written_as_utf8(monkeypatch):
    """Redirected on Windows, stdout is cp1252: a CJK or emoji piece ended `gptgen generate` with a traceback."""
    import io

    import gptgen
    from gptgen.cli import main
    from gptgen.generate import Stats

    class Model:
        model, last = object(), Stats()

        def stream(self, prompt, **sampling):
            yield from ["的", "😀"]

    monkeypatch.setattr(gptgen, "load", lambda *args, **kwargs: Model())
    out = io.TextIOWrapper(io.BytesIO(), encoding="cp1252")
    monkeypatch.setattr(sys, "stdout", out)
    assert main(["generate", "m.safetensors", "hi"]) == 0
    out.flush()
    assert out.buffer.getvalue().decode("utf-8") == "的😀\n"


def test_a_closed_stdin_or_stdout_is_a_clear_error(capsys, monkeypatch):
    """`--prompt-file - <&-` and `>&-` ended with a traceback (sys.stdin / sys.stdout are None then)."""
    monkeypatch.setattr(sys, "stdin", None)
    status, _, err = run_main(capsys, "generate", BUNDLED, "--prompt-file", "-")
    assert status == 2 and "--prompt-file -: standard input is closed" in err, err
    monkeypatch.setattr(sys, "stdout", None)
    status, _, err = run_main(capsys, "generate", BUNDLED, "ROMEO:")
    assert status == 2 and "standard output is closed" in err, err


def test_every_command_writes_any_file_name_to_a_redirected_stdout(tmp_path, monkeypatch):
    """Redirected on Windows, stdout is cp1252: `quantize m 模型.safetensors > log` wrote the file, then failed with a
    traceback printing its name."""
    import io

    from gptgen.cli import main
    from tests.test_model import tiny_model_file

    out = io.TextIOWrapper(io.BytesIO(), encoding="cp1252")
    monkeypatch.setattr(sys, "stdout", out)
    target = tmp_path / "模型-int8.safetensors"
    assert main(["quantize", str(tiny_model_file(tmp_path / "m.safetensors")), str(target)]) == 0
    out.flush()
    assert f"wrote {target}:" in out.buffer.getvalue().decode("utf-8")


def test_generate_rejects_a_pickle_renamed_safetensors(tmp_path):
    import pickle

    fake = tmp_path / "model.safetensors"
    fake.write_bytes(pickle.dumps({"a": 1}))
    r = gptgen("generate", fake, "hi")
    assert r.returncode == 2 and "not a readable safetensors file" in r.stderr


def test_generate_takes_a_bundled_model_by_name_and_a_prompt_given_as_the_model_names_them(capsys):
    status, out, _ = run_main(capsys, "generate", "shakespeare-mini-int8", "ROMEO:", "--max-new-tokens", "4", "--json")
    assert status == 0 and json.loads(out)["new_tokens"] == 4
    status, _, err = run_main(capsys, "generate", "ROMEO:")  # the model left out
    assert status == 2 and err.strip() == ("gptgen: error: model file 'ROMEO:' does not exist (bundled models, by "
                                           "name: shakespeare-mini-int8; OpenAI's GPT-2: gpt2, gpt2-medium, "
                                           "gpt2-large, gpt2-xl, distilgpt2)")


def test_target_not_reached_says_so_plainly(small_text, tmp_path):
    r = gptgen("train", "--data", small_text, "--out", tmp_path / "run", "--steps", 3, "--target-loss", 0.1, *FAST)
    err = r.stderr
    assert r.returncode == 0 and "--steps budget ran out at step 3 before the train loss reached 0.1" in err
    assert "epoch 1/" in err  # the bar counts epochs


def test_quantize_never_overwrites(tmp_path):
    from tests.test_model import tiny_model_file

    f32, taken = tiny_model_file(tmp_path / "f32.safetensors"), tmp_path / "taken.safetensors"
    taken.write_bytes(b"keep me")
    for out, kind in ((taken, "exists"), (f32, "exists"), (tmp_path, "is a directory")):  # the input too
        r = gptgen("quantize", f32, out)
        assert r.returncode == 2 and f"{kind}; give a new file name" in r.stderr, r.stderr
    assert taken.read_bytes() == b"keep me"


def test_quantize_keeps_a_file_that_appears_at_its_output_while_it_works(capsys, tiny_file, tmp_path, monkeypatch):
    """The output is checked before the work; another program can create it during the work."""
    import gptgen.quantize

    out, quantize = tmp_path / "i8.safetensors", gptgen.quantize.quantize_state_dict
    monkeypatch.setattr(gptgen.quantize, "quantize_state_dict",
                        lambda tensors: (out.write_bytes(b"another program's"), quantize(tensors))[1])
    status, _, err = run_main(capsys, "quantize", tiny_file, out)
    assert status == 2 and "i8.safetensors' exists; give a new file name" in err, err
    assert out.read_bytes() == b"another program's" and not list(tmp_path.glob(".*.tmp"))


CTRL_C_IN_THE_IMPORTS = """
import signal, sys

class CtrlCWhileImporting:  # a Ctrl-C that lands while the command line's modules load
    def find_spec(self, name, path=None, target=None):
        if name == "gptgen.config":
            signal.raise_signal(signal.SIGINT)

sys.meta_path.insert(0, CtrlCWhileImporting())
from gptgen.__main__ import run
sys.exit(run())
"""


def test_a_ctrl_c_while_the_command_line_loads_exits_130_without_a_traceback():
    from tests.conftest import sigint_as_usual

    r = subprocess.run([sys.executable, "-c", CTRL_C_IN_THE_IMPORTS, "--help"], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120, preexec_fn=sigint_as_usual)
    assert r.returncode == 130 and r.stderr == "\ngptgen: interrupted\n", r.stderr[-2000:]


def test_a_reader_that_leaves_or_ctrl_c_ends_generate_without_a_traceback(tmp_path):
    import fcntl
    import signal

    from tests.conftest import sigint_as_usual
    from tests.test_model import tiny_model_file

    tiny_model_file(tmp_path / "m.safetensors")
    cmd = [sys.executable, "-m", "gptgen", "generate", str(tmp_path / "m.safetensors"), "x", "--max-new-tokens", "4000",
           "--seed", "1"]  # a seed whose 4,000 tokens hold no <|endoftext|>, which would end the text before the signal
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # While starting, a Ctrl-C lands in gptgen's imports or torch's: one that hit torch's C initialisation (~0.2-0.3
    # s in, here) was swallowed (exit 0, the whole text), became an ImportError (exit 1) or killed the process.
    # Timed from the moment libtorch is mapped, not from the start: a loaded machine starts Python slowly, and a
    # Ctrl-C before Python has a handler ends any program by SIGINT.
    starting = [f"SIGINT {s} s after torch's load began" for s in (0.0, 0.03, 0.06, 0.08, 0.1, 0.15)]
    for ending in ("pipe closed", "SIGINT", *starting):
        # A one-page pipe: the text (~25 KB) cannot all be written before the signal, even when this process is
        # slow to send it (in a full test run, the whole text once fitted a default 64 KB pipe: exit 0).
        read_end, write_end = os.pipe()
        fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)
        proc = subprocess.Popen(cmd, stdout=write_end, stderr=subprocess.PIPE, env=env, preexec_fn=sigint_as_usual)
        os.close(write_end)
        stdout = os.fdopen(read_end, "rb")
        if ending in starting:
            maps, deadline = Path(f"/proc/{proc.pid}/maps"), time.monotonic() + 60
            while "libtorch" not in maps.read_text() and time.monotonic() < deadline:
                time.sleep(0.002)
            time.sleep(float(ending.split()[1]))
        else:
            stdout.read(20)  # generation is under way
        if ending == "pipe closed":  # `gptgen generate ... | head`
            stdout.close()
        else:
            proc.send_signal(signal.SIGINT)
            stdout.read()  # what it still writes, to its end: a full pipe would keep it from exiting
            stdout.close()
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=60) == (141 if ending == "pipe closed" else 130), (ending, err[-2000:])
        assert "Traceback" not in err and "Error" not in err, err


def test_a_ctrl_c_that_left_an_exec_still_exits_130(tmp_path):
    """CPython ends a `python -m` process by SIGINT (-2) once a KeyboardInterrupt has left an exec() of a string,
    even one caught later: dataclasses build their methods with exec, and a Ctrl-C during start-up's imports
    ended `gptgen: interrupted` with -2 about once in 50. Here the Ctrl-C lands inside an exec every time."""
    from tests.conftest import sigint_as_usual

    (tmp_path / "entry").mkdir()
    (tmp_path / "entry" / "__main__.py").write_text(
        "import sys\n"
        "from gptgen import cli\n"
        "cli.cmd_data = lambda args: exec('import signal; signal.raise_signal(signal.SIGINT)')\n"
        "sys.exit(cli.main(['data', 'shakespeare']))\n")
    r = subprocess.run([sys.executable, "-m", "entry"], capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, preexec_fn=sigint_as_usual, timeout=120)
    assert (r.returncode, r.stderr.strip()) == (130, "gptgen: interrupted")


@pytest.mark.parametrize("args, message", [
    (["serve", "--port", "99999"], "port number from 0 to 65535"),
    (["train", "--data", "x.txt", "--out", "r", "--init", "gpt2", "--preset", "tiny"], "--preset or --init"),
    (["train", "--data", "x.txt", "--out", "r", "--minutes", "inf"], "--minutes must be a finite number"),
    (["train", "--data", "x.txt", "--out", "r", "--steps", "1", "--seed", "-1"], "--seed must be between 0 and"),
    (["train", "--data", "x.txt", "--out", "r", "--steps", "1", "--seed", str(2**63)], "--seed must be between 0"),
    (["train", "--data", "x.txt", "--out", "r", "--steps", "1", "--dropout", "1.5"], "--dropout must be in"),
    (["eval", "m.safetensors", "--data", "x.txt", "--block-size", "0"], "--block-size: must be a whole number"),
])
def test_bad_flags_are_one_line_errors(args, message):
    r = gptgen(*args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_train_refuses_an_out_directory_of_other_files(small_text, tmp_path):
    """A transformers export (config.json, model.safetensors) was overwritten by a run's files."""
    out = tmp_path / "export"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"the export's weights")
    r = gptgen("train", "--data", small_text, "--out", out, "--steps", "2", *FAST)
    assert r.returncode == 2 and "not a training run's (config.json, model.safetensors)" in r.stderr, r.stderr
    assert (out / "model.safetensors").read_bytes() == b"the export's weights"


@pytest.mark.parametrize("args", [["export", BUNDLED.stem, "{out}/x.gguf"], ["export", BUNDLED.stem, "--format", "hf",
                                                                            "{out}/x"]])
def test_an_output_that_cannot_be_written_is_one_line_naming_it(tmp_path, args):
    """A folder that cannot hold files (a file in its place) gave a traceback naming a temporary file."""
    (tmp_path / "file").write_text("not a folder")
    out = str(tmp_path / "file")
    r = gptgen(*[a.format(out=out) for a in args])
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith(f"gptgen: error: '{out}/x"), r.stderr


def test_train_refuses_an_out_directory_holding_only_a_model(small_text, tmp_path):
    """A folder with a model.safetensors and nothing else is a model (serve and generate take it so), not a run."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"my model's weights")
    r = gptgen("train", "--data", small_text, "--out", out, "--steps", "2", *FAST)
    assert r.returncode == 2 and "not a training run's (model.safetensors)" in r.stderr, r.stderr
    assert (out / "model.safetensors").read_bytes() == b"my model's weights"


def test_train_refuses_an_out_directory_of_another_tools_files_named_as_a_runs(small_text, tmp_path):
    """metrics.jsonl, loss.png, last-*.safetensors: names a run writes, but no run wrote these (no run's lock file);
    a new run emptied the first (or failed on its lines with a traceback), replaced the second, deleted the last."""
    out = tmp_path / "other-tool"
    out.mkdir()
    files = {"metrics.jsonl": b'{"epoch": 1, "loss": 2.3}\n', "loss.png": b"my plot", "last-good.safetensors": b"w"}
    for name, data in files.items():
        (out / name).write_bytes(data)
    r = gptgen("train", "--data", small_text, "--out", out, "--steps", "2", *FAST)
    assert r.returncode == 2 and "not a training run's (last-good.safetensors, loss.png, metrics.jsonl)" in r.stderr
    assert "Traceback" not in r.stderr and {f.name: f.read_bytes() for f in out.iterdir()} == files


def test_prompt_file_and_stdin_give_the_same_text_as_the_argument(tmp_path):
    from tests.test_model import tiny_model_file

    model = tiny_model_file(tmp_path / "m.safetensors")
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("The king 👑 said\n")
    flags = ["--max-new-tokens", "6", "--seed", "1", "--json"]
    by_arg = json.loads(gptgen("generate", model, "The king 👑 said\n", *flags).stdout)
    by_file = json.loads(gptgen("generate", model, "--prompt-file", prompt, *flags).stdout)
    piped = subprocess.run([sys.executable, "-m", "gptgen", "generate", str(model), "--prompt-file", "-", *flags],
                           input="The king 👑 said\n", capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert by_arg == {**by_file, **{k: by_arg[k] for k in ("first_token_s", "total_s", "tokens_per_s")}}
    assert json.loads(piped.stdout)["text"] == by_arg["text"] and by_arg["prompt_tokens"] > 3
    r = gptgen("generate", model, "--prompt-file", tmp_path / "none.txt")
    assert r.returncode == 2 and "cannot read --prompt-file" in r.stderr and "No such file" in r.stderr


def test_a_prompt_file_is_read_as_a_training_text_is(capsys, tmp_path):
    """It kept a UTF-8 byte order mark (3 tokens the model never saw) and turned \\r\\n into \\n, which a model
    trained on a Windows text (training keeps both as they are) never saw either."""
    from tests.test_model import tiny_model_file

    model = tiny_model_file(tmp_path / "m.safetensors")
    prompt = tmp_path / "prompt.txt"
    prompt.write_bytes(b"\xef\xbb\xbfROMEO:\r\nI")
    flags = ["--max-new-tokens", 4, "--seed", 1, "--json"]
    by_file = json.loads(run_main(capsys, "generate", model, "--prompt-file", prompt, *flags)[1])
    by_arg = json.loads(run_main(capsys, "generate", model, "ROMEO:\r\nI", *flags)[1])
    assert (by_file["text"], by_file["prompt_tokens"]) == (by_arg["text"], by_arg["prompt_tokens"])
    prompt.write_bytes("ROMEO".encode("utf-16"))
    status, _, err = run_main(capsys, "generate", model, "--prompt-file", prompt)
    assert status == 2 and f"--prompt-file {str(prompt)!r} is UTF-16 text" in err, err


@pytest.mark.parametrize("args", [["quantize", "{model}", "{out}/q.safetensors"],
                                  ["export", "{model}", "{out}/hf", "--format", "hf"],
                                  ["export", "{model}", "{out}/m.gguf"]])
def test_quantize_and_export_refuse_a_file_that_load_refuses(capsys, tmp_path, args):
    """A file missing a layer's weight was quantized and exported (transformers then filled it in at random)."""
    from gptgen.checkpoint import TIED, save_model
    from tests.test_model import tiny_model

    m = tiny_model()
    state = {k: v for k, v in m.state_dict().items() if k not in (TIED, "transformer.h.1.mlp.c_proj.weight")}
    save_model(tmp_path / "m.safetensors", state, m.config)
    status, _, err = run_main(capsys, *(a.format(model=tmp_path / "m.safetensors", out=tmp_path) for a in args))
    assert status == 2 and "does not match its config: missing ['transformer.h.1.mlp.c_proj.weight']" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_export_refuses_a_gguf_type_for_a_transformers_export(tmp_path):
    r = gptgen("export", tmp_path / "unused.safetensors", tmp_path / "hf", "--format", "hf", "--type", "q8_0")
    assert r.returncode == 2 and "--type is for --format gguf" in r.stderr and not (tmp_path / "hf").exists()


def test_a_server_error_of_the_users_making_is_one_plain_line():
    """`serve --device cuda:99`, a GPU no machine here has: the engine's ConfigError, without its class name."""
    r = gptgen("serve", "--device", "cuda:99", "--port", 0)
    assert r.returncode == 2 and "ConfigError" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("gptgen: error: device 'cuda:99'"), r.stderr


def test_a_mistyped_flag_gets_its_commands_usage_and_the_nearest_flag():
    r = gptgen("train", "--stpes", "3")
    assert r.returncode == 2 and "usage: gptgen train" in r.stderr, r.stderr
    assert "unrecognized arguments: --stpes 3 (did you mean --steps?)" in r.stderr


def test_a_flag_not_close_to_any_gets_no_suggestion():
    r = gptgen("train", "--bogus", "3")
    assert r.returncode == 2 and "unrecognized arguments: --bogus 3\n" in r.stderr, r.stderr


def test_flags_must_be_spelled_out():
    r = gptgen("generate", "m.safetensors", "x", "--max-new", "3")
    assert r.returncode == 2 and "unrecognized arguments: --max-new 3 (did you mean --max-new-tokens?)" in r.stderr


def run_main(capsys, *args):
    """`gptgen ARGS` in this process (no interpreter and torch to start): (exit status, stdout, stderr)."""
    from gptgen.cli import main

    status = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture
def fake_train(monkeypatch):
    """gptgen.train.train replaced: it records the TrainConfig the CLI built and returns seen["summary"]."""
    import gptgen.device
    import gptgen.train

    seen = {"summary": {"steps": 3, "interrupted": False, "stopped_by": "steps", "last_window_loss": 5.0}}

    def train(cfg, *, resume=False):
        seen["cfg"] = cfg
        return seen["summary"]

    monkeypatch.setattr(gptgen.train, "train", train)
    # recorded, not run: it would change malloc for the rest of this test process
    monkeypatch.setattr(gptgen.device, "keep_freed_memory", lambda: seen.setdefault("kept_freed_memory", True))
    return seen


def test_train_without_a_budget_runs_the_default_steps_and_any_budget_replaces_them(
        capsys, fake_train, small_text, tmp_path):
    """`gptgen train --data --out` alone must stop (after 2000 steps), and --minutes or --epochs alone is the limit."""
    assert run_main(capsys, "train", "--data", small_text, "--out", tmp_path / "run")[0] == 0
    assert fake_train["cfg"].steps == 2000
    assert fake_train["kept_freed_memory"]  # a training process keeps its freed memory (gptgen.device)
    for budget in (["--minutes", "1.5"], ["--epochs", "2"]):
        assert run_main(capsys, "train", "--data", small_text, "--out", tmp_path / "run", *budget)[0] == 0
        assert fake_train["cfg"].steps is None, budget


def test_eval_keeps_its_freed_memory_as_training_does(capsys, monkeypatch, small_text):
    """A process that only evaluates gains as training does (gptgen.device.keep_freed_memory): the bundled model's
    eval of the reference corpus took 5.7 s instead of 15."""
    import gptgen.device
    from gptgen.config import BUNDLED_MODELS

    calls = []
    monkeypatch.setattr(gptgen.device, "keep_freed_memory", lambda: calls.append(True))  # recorded, not run
    status, out, _ = run_main(capsys, "eval", BUNDLED_MODELS / "shakespeare-mini-int8.safetensors", "--data",
                              small_text, "--json")
    assert status == 0 and json.loads(out)["val_tokens"] > 0 and calls == [True]


def test_an_interrupted_training_exits_130_and_says_how_to_continue(capsys, fake_train, small_text, tmp_path):
    """Ctrl-C saves the run: scripts see 130 (not success) and the user gets the resume command."""
    fake_train["summary"] = {**fake_train["summary"], "interrupted": True}
    status, out, err = run_main(capsys, "train", "--data", small_text, "--out", tmp_path / "run", "--steps", 9)
    assert status == 130 and json.loads(out)["interrupted"] is True
    assert f"interrupted at step 3; continue with: gptgen train --resume {tmp_path / 'run'}" in err


def test_a_minutes_budget_ending_before_the_steps_says_so(capsys, fake_train, small_text, tmp_path):
    """With both --steps and --minutes, a run cut short by time tells the user it did not reach its steps."""
    fake_train["summary"] = {**fake_train["summary"], "stopped_by": "minutes"}
    status, _, err = run_main(capsys, "train", "--data", small_text, "--out", tmp_path / "run", "--steps", 10,
                              "--minutes", 1)
    assert status == 0 and (f"the --minutes budget ran out at step 3 of 10; continue with: gptgen train --resume "
                            f"{tmp_path / 'run'} --steps 10") in err, err


def test_a_minutes_budget_ending_before_the_epochs_says_so(capsys, fake_train, small_text, tmp_path):
    """With --epochs and --minutes, a run cut short by time said nothing of the epochs it did not reach."""
    fake_train["summary"] = {**fake_train["summary"], "stopped_by": "minutes", "epochs": 0.25}
    status, _, err = run_main(capsys, "train", "--data", small_text, "--out", tmp_path / "run", "--epochs", 2,
                              "--minutes", 1)
    assert status == 0 and (f"the --minutes budget ran out at epoch 0.25 of 2 (step 3); continue with: gptgen "
                            f"train --resume {tmp_path / 'run'} --epochs 2") in err, err


def test_resume_may_move_a_run_to_another_device(capsys, tmp_path):
    """--device is one of the flags --resume accepts (a run started on a GPU may go on on the CPU)."""
    status, _, err = run_main(capsys, "train", "--resume", tmp_path / "none", "--device", "cpu")
    assert status == 2 and "no state.json" in err and "only --steps" not in err, err


@pytest.mark.parametrize("fraction", ["0", "1", "1.5"])
def test_eval_refuses_a_val_fraction_outside_0_to_1(capsys, small_text, tmp_path, fraction):
    """A val split of all (or none) of the text would score nothing, or score the training text."""
    status, _, err = run_main(capsys, "eval", tmp_path / "unused.safetensors", "--data", small_text,
                              "--val-fraction", fraction)
    assert status == 2 and "--val-fraction must be between 0 and 1" in err, err


@pytest.fixture
def tiny_file(tmp_path):
    """A float model file of tests.test_model's tiny GPT (16-token context)."""
    from tests.test_model import tiny_model_file

    return tiny_model_file(tmp_path / "f32.safetensors")


def test_eval_refuses_a_block_longer_than_the_models_context(capsys, small_text, tiny_file):
    """The model has no position embeddings past its context: a plain error, not a crash mid-evaluation."""
    status, _, err = run_main(capsys, "eval", tiny_file, "--data", small_text, "--block-size", 17)
    assert status == 2 and "--block-size must be between 1 and the model's context (16)" in err, err


@pytest.mark.parametrize("training, block", [({"recipe": {"block_size": 8}}, 8), ({"recipe": {"block_size": "8"}}, 16),
                                             ({"recipe": [8]}, 16), ([8], 16)])
def test_eval_scores_in_the_trained_block_when_the_record_gives_a_whole_one(capsys, small_text, tmp_path, training,
                                                                             block):
    """A record that gave it as text (edited by hand) was a TypeError."""
    from tests.test_model import tiny_model_file

    model = tiny_model_file(tmp_path / "m.safetensors", training=training)
    status, out, err = run_main(capsys, "eval", model, "--data", small_text, "--json")
    assert status == 0 and json.loads(out)["block_size"] == block, err


def test_quantize_refuses_an_int8_model(capsys, tiny_file, tmp_path):
    """Quantizing int8 weights again would write a broken (or pointless) file; the user is told instead."""
    assert run_main(capsys, "quantize", tiny_file, tmp_path / "i8.safetensors")[0] == 0
    status, _, err = run_main(capsys, "quantize", tmp_path / "i8.safetensors", tmp_path / "again.safetensors")
    assert status == 2 and "is already quantized (int8)" in err and not (tmp_path / "again.safetensors").exists()


def test_generate_refuses_a_prompt_and_a_prompt_file_together(capsys, tmp_path):
    """One of the two would be silently ignored."""
    (tmp_path / "p.txt").write_text("from the file")
    status, _, err = run_main(capsys, "generate", tmp_path / "unused.safetensors", "from the argument",
                              "--prompt-file", tmp_path / "p.txt")
    assert status == 2 and "not both" in err, err


def test_under_torchrun_only_each_machines_first_process_prints_an_error(capsys, monkeypatch, tmp_path):
    """Eight processes finding the same bad input print one line, not eight; all of them exit 2."""
    args = ["eval", tmp_path / "unused.safetensors", "--data", tmp_path / "x.txt", "--val-fraction", "2"]
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert run_main(capsys, *args)[::2] == (2, "")
    monkeypatch.setenv("LOCAL_RANK", "0")
    status, _, err = run_main(capsys, *args)
    assert status == 2 and err.startswith("gptgen: error: --val-fraction"), err


@pytest.fixture
def hub_calls(monkeypatch):
    """gptgen.hub's push, push_space and pull replaced by recorders: the calls the CLI made."""
    from gptgen import hub

    calls = []
    for name in ("push", "push_space", "pull"):
        monkeypatch.setattr(hub, name, lambda *a, _name=name, **kw: calls.append((_name, a, kw)) or "done")
    return calls


def test_push_sends_the_model_with_its_privacy_and_space_defaults_to_the_bundled_model(capsys, hub_calls):
    """`push --private` must not publish the model; `push --space REPO` serves the bundled model."""
    from gptgen.config import BUNDLED_MODELS

    assert run_main(capsys, "push", "m.safetensors", "owner/m", "--private") == (0, "done\n", "")
    assert run_main(capsys, "push", "owner/demo", "--space")[0] == 0
    assert hub_calls == [("push", (Path("m.safetensors"), "owner/m"), {"private": True}),
                         ("push_space", (BUNDLED_MODELS / "shakespeare-mini-int8.safetensors", "owner/demo"),
                          {"private": False})]


def test_push_without_a_model_file_is_refused(capsys, hub_calls):
    """Only --space has a default model; a plain push of nothing would fail deep in the Hub client."""
    status, _, err = run_main(capsys, "push", "owner/m")
    assert status == 2 and "give the model file to push" in err and hub_calls == []


def test_pull_passes_the_revision(capsys, hub_calls):
    """`pull --revision v1` must fetch that tag, not main."""
    assert run_main(capsys, "pull", "owner/m", "--revision", "v1")[0] == 0
    assert hub_calls == [("pull", ("owner/m", "v1"), {})]


def test_serve_passes_every_flag_to_the_server(capsys, monkeypatch):
    """Each of serve's flags reaches the server (a dropped --threads or --max-batch is silently ignored)."""
    import types

    seen = []
    monkeypatch.setitem(sys.modules, "gptgen.serve",
                        types.SimpleNamespace(serve=lambda *a, **kw: seen.append((a, kw))))
    assert run_main(capsys, "serve", "--models", "ms", "--model", "m", "--host", "0.0.0.0", "--port", 8000,
                    "--device", "cpu", "--max-batch", 3, "--threads", 5)[0] == 0
    assert seen == [(("ms", "m"), {"host": "0.0.0.0", "port": 8000, "device": "cpu", "max_batch": 3, "threads": 5})]


def test_export_writes_f16_gguf_unless_a_type_is_given(capsys, monkeypatch, tmp_path):
    """The help promises f16 by default: a lossier q8_0 must be asked for."""
    import gptgen.interop

    seen = []
    monkeypatch.setattr(gptgen.interop, "export_gguf", lambda model, out, kind: seen.append(kind))
    assert run_main(capsys, "export", tmp_path / "m.safetensors", tmp_path / "m.gguf") == (
        0, f"wrote {tmp_path / 'm.gguf'} (GGUF f16)\n", "")
    assert run_main(capsys, "export", tmp_path / "m.safetensors", tmp_path / "q.gguf", "--type", "q8_0")[0] == 0
    assert seen == ["f16", "q8_0"]


@pytest.mark.parametrize("held_out, flag, scored, trained", [
    (0.2, None, 0.2, 0.0),  # the split the model was trained with, by default
    (0.2, "0.5", 0.5, 0.3),  # more than was held out: said, and counted
    (0.0, None, 0.1, 0.1),  # trained on the whole text: every part scored was trained on
])
def test_eval_scores_the_part_held_out_in_training_and_says_when_it_scores_trained_text(
        capsys, caplog, small_text, tmp_path, held_out, flag, scored, trained):
    import hashlib

    from tests.test_model import tiny_model_file

    sha = hashlib.sha256(open(small_text, "rb").read()).hexdigest()
    model = tiny_model_file(tmp_path / "m.safetensors", training={"val_fraction": held_out, "corpus_sha256": sha})
    status, out, err = run_main(capsys, "eval", model, "--data", small_text, "--json",
                                *(["--val-fraction", flag] if flag else []))
    report = json.loads(out)
    assert status == 0 and report["val_fraction"] == scored
    assert report["trained_on_scored_text"] == pytest.approx(trained)
    assert ("the loss is lower than on text it never saw" in caplog.text) == (trained > 0), caplog.text
    assert ("--val-fraction 0.2 scores only the part it did not" in caplog.text) == (flag is not None), caplog.text
    caplog.clear()
    other = tiny_model_file(tmp_path / "other.safetensors", training={"val_fraction": 0.0, "corpus_sha256": "0" * 64})
    status, out, err = run_main(capsys, "eval", other, "--data", small_text, "--json")  # trained on another text
    assert status == 0 and json.loads(out)["trained_on_scored_text"] == 0 and "warning" not in caplog.text


def test_generate_stop_ends_the_text_before_the_first_stop_string_given(capsys):
    """--stop, repeatable: the output is the text up to the earliest of them, without it."""
    from tests.conftest import BUNDLED

    flags = ["--seed", "2", "--max-new-tokens", "60", "--json"]
    full = json.loads(run_main(capsys, "generate", BUNDLED, "ROMEO:", *flags)[1])["text"]
    words = full.split()
    first, later = words[2], words[-1]
    status, out, _ = run_main(capsys, "generate", BUNDLED, "ROMEO:", *flags, "--stop", later, "--stop", first)
    report = json.loads(out)
    assert report["text"] == full[:min(full.index(first), full.index(later))], (full, report)
    assert status == 0 and report["new_tokens"] < 60 and report["stopped_by_string"]
    unmet = json.loads(run_main(capsys, "generate", BUNDLED, "ROMEO:", *flags, "--stop", "@")[1])  # not in the text
    assert unmet["text"] == full and not unmet["stopped_by_string"]
    # \\n stands for a line break, as in the page's stop box
    assert "\n" in full
    status, out, _ = run_main(capsys, "generate", BUNDLED, "ROMEO:", *flags, "--stop", "\\n")
    assert status == 0 and json.loads(out)["text"] == full[:full.index("\n")]
