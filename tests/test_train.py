import contextlib
import dataclasses
import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gptgen.checkpoint import load_model
from gptgen.config import LOSS_WINDOW, ConfigError, GptgenError, TrainConfig
from gptgen.data import DataError, load_corpus
from gptgen.evaluate import evaluate
from gptgen.train import RunDir, _count, epoch_of, lr_at, max_steps, optimizer_step, resume_config, train
from tests.conftest import CORPUS, ROOT, sigint_as_usual
from tests.test_model import tiny_model


def evals(run) -> list[dict]:
    """metrics.jsonl's eval lines (the others are train losses every LOG_INTERVAL steps)."""
    return [r for r in RunDir(run).metrics() if "val_nats_per_token" in r]


def _base(data, out, **overrides) -> dict:
    base = dict(data=str(data), out=str(out), preset="tiny", batch_size=4, block_size=32, lr=3e-3, steps=30,
                eval_interval=10, compile="off", dtype="float32", device="cpu")
    return {**base, **overrides}


def config(data, out, **overrides) -> TrainConfig:
    return TrainConfig(**_base(data, out, **overrides))


def cli_flags(data, out, **overrides) -> list[str]:
    """config()'s run as `gptgen train` flags, for runs in a process of their own."""
    return [arg for k, v in _base(data, out, **overrides).items() for arg in (f"--{k.replace('_', '-')}", str(v))]


@pytest.mark.parametrize("grad_checkpoint, trim", [(False, False), (True, False), (False, True)])
def test_compiled_regions_give_the_eager_loss_and_gradients(grad_checkpoint, trim):
    """The same loss and gradients as eager, from graphs that torch.compile really built."""
    from torch._dynamo.utils import counters

    from gptgen.config import GPTConfig
    from gptgen.model import GPT
    from gptgen.train import RegionalCompile

    torch._dynamo.reset()  # compile afresh, counted from zero, whatever earlier tests compiled
    counters.clear()
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("tiny", block_size=32))
    model.init_weights()
    model.grad_checkpoint = grad_checkpoint
    x, y = torch.randint(0, 50257, (2, 16)), torch.randint(0, 50257, (2, 16))
    if trim:
        model.trim_vocab(torch.cat((x.flatten(), y.flatten())))
    results = []
    for step_model in (model, RegionalCompile(model)):
        model.zero_grad()
        _, loss = step_model(x, y)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (eager_loss, eager_grads), (loss, grads) = results
    assert torch.allclose(loss, eager_loss, atol=1e-5)
    assert all(torch.allclose(grads[n], eager_grads[n], atol=1e-5, rtol=1e-4) for n in grads)
    assert counters["stats"]["unique_graphs"] == 2  # the blocks' (the first compiles, the others reuse it), the head's


def _sgd_step(batches, grad_clip=0.0):
    """A tiny model after one optimizer_step with plain SGD at lr 1: its weights move by exactly the gradient."""
    model = tiny_model(vocab_size=256)
    optimizer_step(model, torch.optim.SGD(model.parameters(), lr=1.0), batches, device=torch.device("cpu"),
                   autocast=contextlib.nullcontext(), grad_clip=grad_clip)
    return model


def test_accumulated_micro_batches_step_as_one_batch_of_their_rows():
    """--grad-accum N must train as one N-times-larger batch; summed micro-batch gradients act as an N-fold lr."""
    x, y = torch.randint(0, 256, (2, 4, 16), generator=torch.Generator().manual_seed(0))
    accumulated, whole = _sgd_step([(x[:2], y[:2]), (x[2:], y[2:])]), _sgd_step([(x, y)])
    for a, b in zip(accumulated.parameters(), whole.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_grad_clip_bounds_the_size_of_a_step():
    """A loss spike must not throw the weights further than --grad-clip allows."""
    x, y = torch.randint(0, 256, (2, 4, 16))
    before, after = tiny_model(vocab_size=256), _sgd_step([(x, y)], grad_clip=1e-3)
    moved = torch.cat([(a - b).flatten() for a, b in zip(after.parameters(), before.parameters(), strict=True)])
    assert moved.norm().item() == pytest.approx(1e-3, rel=1e-3)


def test_loss_falls_and_run_files_are_written(small_text, tmp_path):
    summary = train(config(small_text, tmp_path / "run"))
    run = tmp_path / "run"
    lines = RunDir(run).metrics()
    assert [r["step"] for r in lines if "val_nats_per_token" not in r] == [1, 10, 20, 30]  # train losses
    assert all(r["train_loss"] > 0 and r["lr"] > 0 for r in lines)
    rows = evals(run)
    assert [r["step"] for r in rows] == [10, 20, 30]
    assert rows[-1]["val_nats_per_token"] < rows[0]["val_nats_per_token"] < math.log(50257)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    model, metadata = load_model(run / "model.safetensors")
    training = json.loads(metadata["training"])
    assert training["steps"] == summary["best_step"] == summary["model_step"] == 30
    assert training["tokens_seen"] == 30 * 4 * 32
    assert training["corpus_bytes"] == small_text.stat().st_size and len(training["corpus_sha256"]) == 64
    assert math.isclose(training["val_nats_per_token"], rows[-1]["val_nats_per_token"])
    assert {"val_nats_per_char", "wall_time_s", "date"} <= set(training)
    assert metadata["gptgen_version"]
    assert not RunDir(run).partial_writes()
    # trained at block 32 of the preset's 256: the file's context is 32, the positions it learnt
    assert model.config.block_size == 32 and model.transformer.wpe.weight.shape[0] == 32
    last = load_model(run / "last-0000030.safetensors")[0]
    assert torch.equal(model.transformer.wpe.weight, last.transformer.wpe.weight[:32])  # resume keeps all 256


def test_each_eval_prints_and_logs_a_sample_within_the_training_window(small_text, tmp_path, capsys):
    from gptgen.generate import TextModel

    train(config(small_text, tmp_path / "run", steps=20, block_size=8, sample_tokens=48, sample_prompt="ROMEO:"))
    samples = [r["sample"] for r in evals(tmp_path / "run")]
    last = load_model(tmp_path / "run" / "last-0000020.safetensors")[0]  # the weights the last eval sampled
    prompt = TextModel(last, {}).tokenizer.encode_ordinary("ROMEO:")  # 3 tokens: room for 5 in a window of 8
    assert len(prompt) == 3 and samples[-1] == TextModel(last, {}).generate("ROMEO:", max_new_tokens=5, seed=1337)
    assert len(samples) == 2 and all(samples) and samples[0] != samples[1]
    err = capsys.readouterr().err
    assert f"sample at step 10:\nROMEO:{samples[0]}\n" in err and f"sample at step 20:\nROMEO:{samples[1]}" in err
    train(config(small_text, tmp_path / "quiet", steps=10, sample_tokens=0))
    assert "sample" not in evals(tmp_path / "quiet")[0] and "sample at" not in capsys.readouterr().err


def test_val_fraction_0_trains_on_the_whole_text_and_each_eval_saves_the_latest_weights(small_text, tmp_path):
    """The seed's job fits all of its text (338,025 tokens, 2,640 steps an epoch at 4 x 32): nothing held out."""
    summary = train(config(small_text, tmp_path / "run", val_fraction=0.0, steps=20))
    whole = load_corpus(small_text, val_fraction=0.0)
    assert summary["epochs"] == round(20 * 4 * 32 / len(whole.train), 3) and len(whole.train) > 11_000
    assert summary["best_val_nats_per_token"] is None and summary["best_step"] is None
    assert not evals(tmp_path / "run") and len(RunDir(tmp_path / "run").metrics()) == 3  # steps 1, 10, 20
    model, metadata = load_model(tmp_path / "run" / "model.safetensors")
    last = load_model(tmp_path / "run" / "last-0000020.safetensors")[0]
    assert all(torch.equal(a, b[:len(a)]) for a, b in zip(model.state_dict().values(), last.state_dict().values(),
                                                           strict=True))
    training = json.loads(metadata["training"])
    assert training["steps"] == 20 and training["val_fraction"] == 0 and "val_nats_per_token" not in training
    assert train(resume_config(tmp_path / "run", steps=30), resume=True)["steps"] == 30


@pytest.mark.parametrize("windows, trim_vocab, ema, optimizer", [
    ("random", False, 0.0, "adamw"), ("epoch", False, 0.0, "adamw"), ("random", True, 0.0, "adamw"),
    ("random", True, 0.9, "adamw"), ("random", False, 0.0, "muon")])
def test_stop_and_resume_is_bit_identical_to_one_run(small_text, tmp_path, windows, trim_vocab, ema, optimizer):
    flags = dict(dropout=0.1, windows=windows, trim_vocab=trim_vocab, ema=ema, optimizer=optimizer)
    # stopped on an eval step of the whole run: an eval at another step may be its best, and name the model file
    train(config(small_text, tmp_path / "a", steps=20, decay_steps=30, **flags))
    train(resume_config(tmp_path / "a", steps=30), resume=True)
    train(config(small_text, tmp_path / "b", **flags))
    state_a = json.loads((tmp_path / "a" / "state.json").read_text())
    state_b = json.loads((tmp_path / "b" / "state.json").read_text())
    assert state_a["progress"]["step"] == state_b["progress"]["step"] == 30
    files = ["weights", "ema"] if ema else ["weights"]
    assert ("ema" in state_a) == bool(ema)
    for a, b in [(tmp_path / "a" / state_a[f], tmp_path / "b" / state_b[f]) for f in files] + [
            (tmp_path / "a" / "model.safetensors", tmp_path / "b" / "model.safetensors")]:
        a, b = load_file(a), load_file(b)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k


def test_a_resume_keeps_the_precision_that_dtype_auto_chose(small_text, tmp_path, monkeypatch):
    """Each process times the CPU's bf16 anew; where it came out otherwise on resume (a CPU on the edge), the run
    goes on in the precision it started in, and ends as one uninterrupted run does."""
    import gptgen.train

    flags = dict(dtype="auto", dropout=0.1)
    monkeypatch.setattr(gptgen.train, "use_bf16", lambda device, dtype: True)
    train(config(small_text, tmp_path / "a", steps=4, eval_interval=2, decay_steps=6, **flags))
    train(config(small_text, tmp_path / "b", steps=6, eval_interval=2, **flags))
    monkeypatch.setattr(gptgen.train, "use_bf16", lambda device, dtype: False)
    train(resume_config(tmp_path / "a", steps=6), resume=True)
    a, b = (load_file(tmp_path / run / "model.safetensors") for run in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert json.loads((tmp_path / "a" / "state.json").read_text())["progress"]["precision"] == {
        "device": "cpu", "bf16": True}


def test_ema_evaluates_and_saves_the_average_of_the_weights(small_text, tmp_path, monkeypatch):
    """--ema: after each step the average moves a (1 - decay) share of the way to the weights (the first step's
    weights start it); the evals and the model file are the average's, and training goes on from the weights."""
    decay, seen = 0.8, []
    save_state = RunDir.save_state

    def record(self, model, optimizer, state, ema=None):  # eval_interval 1: every step's weights and average
        seen.append((state["progress"]["step"], model.state_dict()["transformer.h.0.mlp.c_fc.weight"].clone(),
                     ema.state_dict()["transformer.h.0.mlp.c_fc.weight"].clone()))
        save_state(self, model, optimizer, state, ema)

    monkeypatch.setattr(RunDir, "save_state", record)
    run = tmp_path / "run"
    summary = train(config(small_text, run, steps=12, eval_interval=1, lr=1e-2, ema=decay))
    assert [s for s, _, _ in seen] == list(range(1, 13))
    assert torch.equal(seen[0][2], seen[0][1])
    for (_, _, before), (_, weights, average) in itertools.pairwise(seen):
        torch.testing.assert_close(average, decay * before + (1 - decay) * weights)
        assert not torch.allclose(average, weights, atol=1e-4)  # an average, not the weights themselves
    best = summary["best_step"]
    model = load_model(run / "model.safetensors")[0]
    assert torch.equal(model.transformer.h[0].mlp.c_fc.weight.detach(), seen[best - 1][2])
    result = evaluate(model, load_corpus(small_text, 0.1).val, 1, block_size=32)
    assert math.isclose(result.nats_per_token, evals(run)[best - 1]["val_nats_per_token"], rel_tol=1e-6)


def test_a_trimmed_vocab_run_learns_and_saves_an_ordinary_model(small_text, tmp_path):
    """--trim-vocab's run (its loss and gradients are the full head's: test_model) learns, and saves an ordinary
    model file, in which the tokens the text lacks all have the one row that trained for them."""
    train(config(small_text, tmp_path / "run", trim_vocab=True))
    rows = evals(tmp_path / "run")
    assert rows[-1]["val_nats_per_token"] < rows[0]["val_nats_per_token"] < math.log(50257)
    weight = load_model(tmp_path / "run" / "model.safetensors")[0].transformer.wte.weight
    lacking = torch.ones(len(weight), dtype=torch.bool)
    lacking[torch.from_numpy(load_corpus(small_text, 0.1).train.astype("int64"))] = False
    assert 40_000 < lacking.sum() < len(weight)
    assert torch.equal(weight[lacking], weight[lacking][:1].expand(int(lacking.sum()), -1))


def test_existing_run_is_not_overwritten(small_text, tmp_path):
    train(config(small_text, tmp_path / "run", steps=2, eval_interval=2))
    before = (tmp_path / "run" / "state.json").read_bytes()
    with pytest.raises(ConfigError, match="--resume"):
        train(config(small_text, tmp_path / "run", steps=2))
    assert (tmp_path / "run" / "state.json").read_bytes() == before


def test_lr_schedule_warms_up_then_decays_to_min_lr():
    cfg = TrainConfig(lr=1.0, steps=1000, warmup_steps=100)
    assert lr_at(cfg, 0, 0) == pytest.approx(0.01)
    assert lr_at(cfg, 99, 0) == pytest.approx(1.0)
    assert lr_at(cfg, 550, 0) == pytest.approx(0.55)
    assert lr_at(cfg, 1000, 0) == pytest.approx(0.1)
    timed = dataclasses.replace(cfg, steps=None, minutes=1.0)
    assert lr_at(timed, 500, 30.0) == pytest.approx(0.55)


def test_a_resume_with_another_budget_goes_on_from_the_schedule_it_had_reached():
    """Stopped by --minutes at min_lr, then resumed with the --steps that the CLI suggests: the lr went back up
    the steps' cosine, to 10x; a short run resumed with a long budget went back into a warmup."""
    reached = [0.0, 0.0]
    timed, steps = TrainConfig(lr=1.0, steps=2000, minutes=10.0), TrainConfig(lr=1.0, steps=2000)
    lrs = [lr_at(timed, step, elapsed_s=2.0 * (step + 1), reached=reached) for step in range(300)]
    assert lrs[-1] == pytest.approx(0.1) and lr_at(steps, 300, 600.0) > 0.97
    assert lr_at(steps, 300, 600.0, reached=reached) == pytest.approx(0.1)
    short, long = TrainConfig(lr=1.0, steps=100), TrainConfig(lr=1.0, steps=4000)
    reached = [0.0, 0.0]
    last = [lr_at(short, step, 0.0, reached=reached) for step in range(100)][-1]
    assert lr_at(long, 100, 0.0) < 0.6 and lr_at(long, 100, 0.0, reached=reached) == pytest.approx(last)


def test_a_timed_run_warms_up_for_a_quarter_of_its_time_at_most():
    """A 1-minute run of slow steps used to spend all of its ~70 steps in a 100-step warmup."""
    def cosine(done: float) -> float:
        return 0.1 + 0.45 * (1 + math.cos(math.pi * done))

    timed = TrainConfig(lr=1.0, minutes=1.0)
    assert lr_at(timed, 0, 0.0) == pytest.approx(1 / 100)
    # the first step compiled: not counted
    assert lr_at(timed, 1, 4.0, first_step_s=4.0) == pytest.approx(2 / 100 * cosine(4 / 60))
    # half of a quarter of the 56 s left: half of the cosine's lr, which the time has already lowered
    assert lr_at(timed, 8, 11.0, first_step_s=4.0) == pytest.approx(0.5 * cosine(11 / 60))
    assert lr_at(timed, 15, 18.0, first_step_s=4.0) == pytest.approx(cosine(0.3))  # warm: on the cosine
    # no drop where the warmup ends (it ended on the peak, then fell to the cosine's 0.81 at once)
    assert lr_at(timed, 14, 17.9, first_step_s=4.0) == pytest.approx(lr_at(timed, 15, 18.1, first_step_s=4.0), rel=0.01)
    assert lr_at(timed, 60, 57.0, first_step_s=4.0) < 0.2  # and has nearly ended when the time has
    fast = TrainConfig(lr=1.0, minutes=60.0)
    assert lr_at(fast, 98, 10.0) < 0.999
    assert lr_at(fast, 99, 10.0) == pytest.approx(1.0, abs=1e-4)  # 100 steps end it first


def test_steps_per_epoch_read_as_users_count_them():
    """A small text's 1.3 steps an epoch showed as "(1 steps each)" on the bar."""
    assert (_count(1.307), _count(37.06), _count(2640.6)) == ("1.3", "37.1", "2,641")


def test_the_bar_counts_the_epochs_that_the_budget_reaches():
    total = max_steps(TrainConfig(epochs=3), steps_per_epoch=10.46)
    assert total == 32 and epoch_of(total, 10.46) == 3 and epoch_of(31, 10.46) == 3 and epoch_of(1, 10.46) == 1
    assert [epoch_of(s, 10.0) for s in (10, 11, 20, 21)] == [1, 2, 2, 3]


def test_the_cosine_ends_with_the_epochs_budget():
    """The memorize recipe's schedule: --epochs sets the horizon; a --minutes cap only shapes it when nearer."""
    cfg = TrainConfig(lr=1.0, epochs=10, warmup_steps=0)
    total = max_steps(cfg, steps_per_epoch=37.1)
    assert total == 371
    assert lr_at(cfg, 185, 0, total) == pytest.approx(0.55, abs=0.01)
    assert lr_at(cfg, total, 0, total) == pytest.approx(0.1)
    capped = dataclasses.replace(cfg, minutes=10.0)
    assert lr_at(capped, 185, 60.0, total) == lr_at(cfg, 185, 0, total)  # 10% of the time, 50% of the steps
    assert lr_at(capped, 185, 540.0, total) == pytest.approx(lr_at(cfg, 334, 0, total), abs=0.01)  # 90% of the time


def _state_is_whole(run) -> int:
    """The state on disk loads completely (state.json, the weights and optimizer it names); returns its step."""
    from gptgen.checkpoint import load_model_file, read_safetensors

    state = json.loads((run / "state.json").read_text())
    load_model_file(run / state["weights"])
    read_safetensors(run / state["optimizer"], "optimizer state")
    if (run / "model.safetensors").exists():
        load_model(run / "model.safetensors")
    return state["progress"]["step"]


def test_a_run_killed_inside_its_first_writes_starts_again_and_resumes_without_their_leftovers(small_text, tmp_path):
    """safetensors 0.8 writes a `.tmpXXXXXX` of its own beside the file it is given: a kill inside a first save
    left one, which the next start refused as a foreign file, and resumed runs piled them up."""
    run = tmp_path / "run"
    run.mkdir()
    (run / ".train.lock").write_text("12345")  # the dead run's first file: it locks the folder before it writes
    leftovers = [run / ".tmpAb3x9Q", run / ".last-0000001.safetensors.k2j4h1.tmp", run / ".write-test-123"]
    for f in leftovers:
        f.write_bytes(b"half a file")
    (run / "metrics.jsonl").write_text('{"step": 1, "train_loss": 10.9}\n')
    train(config(small_text, run, steps=2, eval_interval=2))
    assert not RunDir(run).partial_writes() and leftovers[2].exists()  # not a partial write: left alone
    assert [r["step"] for r in RunDir(run).metrics()] == [1, 2, 2]  # the first and last steps' lines, the eval's
    assert RunDir(run).metrics()[0]["train_loss"] != 10.9  # the dead start's line is gone
    leftovers[0].write_bytes(b"half a file")
    train(resume_config(run, steps=4), resume=True)
    assert not RunDir(run).partial_writes() and _state_is_whole(run) == 4


def wait_for(proc: subprocess.Popen, ready, timeout_s: float) -> None:
    """Until ready() holds, the process ends or the time is up."""
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None and time.monotonic() < deadline and not ready():
        time.sleep(0.001)


def test_twenty_kills_at_random_moments_then_bit_identical_to_one_run(small_text, tmp_path):
    """SIGKILL 20 times, resuming after each: half at random moments, half while a checkpoint write is under
    way (the run saves every step; a temporary file left behind shows the kill landed inside a write)."""
    import random

    steps, flags = 40, dict(steps=40, decay_steps=40, eval_interval=1, dropout=0.1)
    train(config(small_text, tmp_path / "one", **flags))
    run = tmp_path / "killed"
    cli = [sys.executable, "-m", "gptgen", "train"]
    first = [*cli, *cli_flags(small_text, run, **flags)]
    rng, kills, inside_writes, step = random.Random(0), 0, 0, 0
    err = tmp_path / "stderr.txt"  # the last process's, to say why it ended before its kill
    while kills < 20:
        with open(err, "w") as stderr:
            proc = subprocess.Popen(first if not (run / "state.json").exists() else [*cli, "--resume", str(run)],
                                    stdout=subprocess.DEVNULL, stderr=stderr)
        if kills % 2:  # at a random moment of the steps: the bar is up (start-up takes 2-5 s, with the machine)
            wait_for(proc, lambda: re.search(r"step/s|s/step", err.read_text()), 60)
            time.sleep(rng.uniform(0.0, 1.5))
        else:  # the moment a checkpoint write is under way (its temporary file exists)
            wait_for(proc, lambda: run.exists() and RunDir(run).partial_writes(), 30)
        if proc.poll() is not None:
            break  # ended before this kill
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        inside_writes += bool(RunDir(run).partial_writes()) if run.exists() else 0
        if (run / "state.json").exists():
            new_step = _state_is_whole(run)
            assert new_step >= step  # never goes back
            step = new_step
    print(f"{kills} kills, {inside_writes} of them inside a checkpoint write")
    assert kills == 20 and inside_writes >= 8, (kills, inside_writes, err.read_text()[-2000:])
    assert step < steps, "the run finished before all kills landed; give it more steps"
    train(resume_config(run), resume=True)
    assert _state_is_whole(run) == steps and not RunDir(run).partial_writes()
    assert [r["step"] for r in evals(run)] == list(range(1, steps + 1))  # each eval's line once
    a, b = (json.loads((tmp_path / d / "state.json").read_text())["weights"] for d in ("one", "killed"))
    one, killed = load_file(tmp_path / "one" / a), load_file(run / b)
    assert all(torch.equal(one[k], killed[k]) for k in one)


def test_ctrl_c_at_random_moments_then_resume_is_bit_identical_to_one_run(small_text, tmp_path):
    """A Ctrl-C mid-step saved the RNG that had already drawn the step's batches (the resumed run skipped them:
    weights off by ~5e-3), and one mid-save could leave state.json naming best weights never written. Now it
    lands between steps; each stop's eval is logged once and the model file is the best step's. Half the stops
    are SIGTERMs, which used to kill the run where it stood (losing the steps since its last save)."""
    import random

    flags = dict(steps=80, decay_steps=80, eval_interval=1000, dropout=0.1)
    train(config(small_text, tmp_path / "one", **flags))
    run, rng, stops = tmp_path / "stopped", random.Random(1), 0
    cli = [sys.executable, "-m", "gptgen", "train"]
    while stops < 6:
        args = ["--resume", str(run)] if (run / "state.json").exists() else cli_flags(small_text, run, **flags)
        lines = len(RunDir(run).metrics())
        proc = subprocess.Popen([*cli, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                preexec_fn=sigint_as_usual)
        if stops == 2:  # while starting (1-3 s here): see test_a_ctrl_c_that_left_an_exec_still_exits_130
            time.sleep(rng.uniform(0.3, 1.5))
        else:  # a few steps (~15 a second here) after the session's first step logged its loss
            deadline = time.monotonic() + 60
            while proc.poll() is None and time.monotonic() < deadline and len(RunDir(run).metrics()) == lines:
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGTERM if stops % 2 else signal.SIGINT)  # `timeout`'s, SLURM's: the same stop
        err = proc.stderr.read().decode()
        if proc.wait() == 0:
            break  # finished before this Ctrl-C
        assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
        stops += 1
    assert stops == 6, "the run finished before all Ctrl-Cs landed; give it more steps"
    train(resume_config(run), resume=True)
    steps = [r["step"] for r in evals(run)]
    assert steps == sorted(set(steps)) and steps[-1] == 80  # one eval row per stop, in order
    state = json.loads((run / "state.json").read_text())
    assert json.loads(load_model(run / "model.safetensors")[1]["training"])["steps"] == state["progress"]["best_step"]
    a, b = (json.loads((tmp_path / d / "state.json").read_text())["weights"] for d in ("one", "stopped"))
    one, stopped = load_file(tmp_path / "one" / a), load_file(run / b)
    assert all(torch.equal(one[k], stopped[k]) for k in one)


def test_torchrun_two_processes_with_gloo(small_text, tmp_path):
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "gptgen",
           "train", *cli_flags(small_text, run, target_loss=0.001)]  # never reached: keeps every step's loss
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-12000:]  # rank 1's lines too (a rank's failure shows in the others')
    summary = json.loads(r.stdout)
    assert summary["steps"] == 30  # one summary: rank 0 speaks for all
    assert r.stderr.count("training tiny") == 1
    assert [row["step"] for row in RunDir(run).metrics()] == [1, 10, 10, 20, 20, 30, 30]  # one writer
    rows = evals(run)
    assert rows[-1]["val_nats_per_token"] < rows[0]["val_nats_per_token"]
    assert rows[-1]["tokens_seen"] == 30 * 4 * 32 * 2  # both ranks' batches count
    state = json.loads((run / "state.json").read_text())
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert state["rng"][0]["data"] != state["rng"][1]["data"]  # each rank draws its own batches
    assert state["rng"][0]["torch"] != state["rng"][1]["torch"]  # ... and its own dropout masks
    # the loss lines are the mean over both ranks (the --target-loss window's losses are), not rank 0's
    mean_of_last_10 = sum(state["progress"]["recent_losses"][-10:]) / 10
    assert [r["train_loss"] for r in RunDir(run).metrics()[-2:]] == pytest.approx([mean_of_last_10] * 2, rel=1e-5)
    model, metadata = load_model(run / "model.safetensors")  # with a target, the latest weights are kept
    assert json.loads(metadata["training"])["steps"] == summary["model_step"] == 30
    assert evaluate(model, load_corpus(small_text, 0.1).val, 1, block_size=32).nats_per_token == pytest.approx(
        rows[-1]["val_nats_per_token"], rel=1e-5)  # both ranks' val windows, summed once
    assert (run / "loss.png").stat().st_size > 0
    cmd = [*cmd[:4], "--nproc_per_node=3", "-m", "gptgen", "train", "--resume", str(run), "--steps", "40"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode != 0 and r.stderr.count("resuming") == 1, r.stderr[-3000:]  # each rank said so
    assert r.stderr.count("gptgen: error: the run was saved with 2 processes") == 1


TOKENIZE_ONCE = """
import json, os, sys
import torch.distributed as dist
import gptgen.data
from gptgen.config import TrainConfig
from gptgen.train import load_corpus_once_per_machine

dist.init_process_group("gloo")
tokenize = gptgen.data.pieces  # called on a token-cache miss only: log who tokenizes
def pieces(text):
    with open(sys.argv[2], "a") as f:
        f.write(os.environ["RANK"])
    return tokenize(text)
gptgen.data.pieces = pieces
corpus = load_corpus_once_per_machine(TrainConfig(data=sys.argv[1], out="x", steps=1), dist.get_rank())
with open(f"{sys.argv[2]}-{os.environ['RANK']}.json", "w") as f:  # a file each: their prints could interleave
    json.dump([corpus.train.tolist(), corpus.val.tolist()], f)
dist.destroy_process_group()  # left to exit, gloo's threads sometimes abort the process
"""


def test_under_torchrun_one_process_a_machine_tokenizes_the_text(small_text, tmp_path):
    """Each process used to tokenize the text at once: N times the memory (2.3 GB each for a 500 MB text)."""
    (tmp_path / "child.py").write_text(TOKENIZE_ONCE)
    text = tmp_path / "new.txt"
    text.write_text(small_text.read_text() + "a text no cache has seen\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(tmp_path / "child.py"), str(text), str(tmp_path / "who")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GPTGEN_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "who").read_text() == "00"  # rank 0 only: its train split, then its val split
    first, second = (json.loads((tmp_path / f"who-{rank}.json").read_text()) for rank in (0, 1))
    assert first == second and first[0] == load_corpus(text).train.tolist()
    cmd[-2] = str(tmp_path / "missing.txt")  # the first process fails: the others are not left waiting
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode != 0 and r.stderr.count("DataError: data file") == 2, r.stderr[-3000:]


ONE_CLOCK = """
import json, sys
import torch.distributed as dist
from gptgen.config import TrainConfig
from gptgen.train import Progress, _should_stop, lr_at

dist.init_process_group("gloo")
rank, cfg = dist.get_rank(), TrainConfig(data="x", out="x", minutes=1.0)
progress = Progress(step=50, elapsed_s=20.0 + rank, first_step_s=2.0 + rank)  # the ranks' clocks differ
done, _ = _should_stop(cfg, progress, None)
lr = lr_at(cfg, 50, progress.elapsed_s, None, progress.first_step_s)
with open(f"{sys.argv[1]}/{rank}.json", "w") as f:
    json.dump([done, progress.elapsed_s, progress.first_step_s, lr], f)
dist.destroy_process_group()  # left to exit, gloo's threads sometimes abort the process
"""


def test_under_torchrun_the_ranks_share_one_clock_and_so_one_learning_rate(tmp_path):
    """With --minutes the learning rate follows the time, and each rank took its own: their weights drifted apart."""
    (tmp_path / "child.py").write_text(ONE_CLOCK)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(tmp_path / "child.py"), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    first, second = (json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1))
    assert first == second and first[:3] == [False, 21.0, 3.0]  # the slowest rank's clock


def test_under_torchrun_a_gpu_index_is_refused(monkeypatch):
    """--device cuda:1 put every process on GPU 1, talking over gloo."""
    from gptgen.train import _setup_distributed

    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="each process takes the GPU of its LOCAL_RANK; give --device cuda"):
        _setup_distributed("cuda:1")


FULL_DISK_ON_RANK_0 = """
import errno, os, sys
import gptgen.train
from gptgen.cli import main

save, saves = gptgen.train.RunDir.save_state, []
def full_disk_at_the_second_save(self, *args, **kwargs):
    saves.append(1)
    if os.environ["RANK"] == "0" and len(saves) == 2:
        raise OSError(errno.ENOSPC, "No space left on device")
    return save(self, *args, **kwargs)
gptgen.train.RunDir.save_state = full_disk_at_the_second_save
sys.exit(main(sys.argv[1:]))
"""


def test_under_torchrun_a_write_that_fails_on_rank_0_stops_every_rank_with_its_message(small_text, tmp_path):
    """Rank 0 alone writes; when a write failed the others waited for it in the next collective, then printed
    gloo's "Connection closed by peer" traceback over its message."""
    (tmp_path / "child.py").write_text(FULL_DISK_ON_RANK_0)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(tmp_path / "child.py"), "train", *cli_flags(small_text, run)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode != 0 and r.stderr.count("gptgen: error: training stopped: could not write to") == 1
    assert "Connection closed by peer" not in r.stderr and "[rank1]: Traceback" not in r.stderr, r.stderr[-3000:]
    assert json.loads((run / "state.json").read_text())["progress"]["step"] == 10  # the last save, kept


ONLY_RANK_0_LOOKS = """
import os, sys
import gptgen.train
from gptgen.cli import main

if os.environ["RANK"] != "0":
    def looked(self, *args, **kwargs):
        open(sys.argv[1], "a").close()
        raise AssertionError("rank 1 listed --out")
    gptgen.train.RunDir.foreign_files = gptgen.train.RunDir.state = looked
sys.exit(main(sys.argv[2:]))
"""


def test_under_torchrun_rank_0_alone_looks_at_out_and_refuses_a_taken_one(small_text, tmp_path):
    """Every rank listed --out while rank 0's write check made and removed it: a rank that listed it mid-way
    failed alone, silently, and rank 0 stopped in gloo's "Connection reset by peer" (a CI run, once)."""
    (tmp_path / "child.py").write_text(ONLY_RANK_0_LOOKS)
    run, spy = tmp_path / "run", tmp_path / "rank-1-looked"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(tmp_path / "child.py"), str(spy), "train", *cli_flags(small_text, run)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode != 0 and r.stderr.count("holds files that are not a training run's (notes.txt)") == 1
    assert not spy.exists() and "[rank1]: Traceback" not in r.stderr, r.stderr[-3000:]
    assert [f.name for f in run.iterdir()] == ["notes.txt"]


ONE_RANK_FAILS = """
import dataclasses, os, sys
import gptgen.train
from gptgen.cli import main
from gptgen.data import DataError

mode, rank = sys.argv[1], os.environ["RANK"]
load = gptgen.train.load_corpus
def other_text(*args, **kwargs):
    return dataclasses.replace(load(*args, **kwargs), sha256="0" * 64)
def unreadable(*args, **kwargs):
    raise DataError("cannot read the text here")
def plot_bug(*args, **kwargs):
    raise ValueError("a bug in the plot")
if mode == "texts differ" and rank == "1":
    gptgen.train.load_corpus = other_text
if mode == "setup fails on rank 1" and rank == "1":
    gptgen.train.load_corpus = unreadable
if mode == "a bug in rank 0's save" and rank == "0":
    gptgen.train.plot_losses = plot_bug
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("mode, message", [
    ("setup fails on rank 1", "gptgen: error: process 1 of 2 stopped the run: cannot read the text here"),
    ("texts differ", "gptgen: error: the processes read different texts from"),
    ("a bug in rank 0's save", "ValueError: a bug in the plot")])
def test_under_torchrun_a_failure_on_one_rank_stops_every_rank_and_rank_0_says_why(small_text, tmp_path, mode,
                                                                                    message):
    """A rank that failed alone (set-up on one machine, an error that was not gptgen's own) left the others
    waiting in their next collective: gloo's "Connection closed by peer" traceback, and, from a rank other than
    0, no word of why (the CLI prints rank 0's errors only)."""
    (tmp_path / "child.py").write_text(ONE_RANK_FAILS)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(tmp_path / "child.py"), mode, "train", *cli_flags(small_text, tmp_path / "run")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode != 0 and r.stderr.count(message) == 1, r.stderr[-3000:]
    assert "Connection closed by peer" not in r.stderr and "Connection reset by peer" not in r.stderr
    assert "[rank1]: Traceback" not in r.stderr, r.stderr[-3000:]


def test_torchrun_stops_every_process_at_one_step_when_one_gets_a_ctrl_c(small_text, tmp_path):
    """A Ctrl-C reaches torchrun's processes at different moments, or one only (here: rank 1's). Each used to stop
    at its own next step and save with the others still training: they waited on each other forever. Now they
    agree on the step, save it, and the resumed run ends bit-identical to one uninterrupted run."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "gptgen",
                "train"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    flags = dict(steps=100, eval_interval=20)  # 80 steps (~6 s) after the first eval for the Ctrl-C to land in
    one = subprocess.run([*torchrun, *cli_flags(small_text, tmp_path / "one", **flags)], capture_output=True,
                         text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    run = tmp_path / "stopped"
    proc = subprocess.Popen([*torchrun, *cli_flags(small_text, run, **flags)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, preexec_fn=sigint_as_usual)
    deadline = time.monotonic() + 120
    while not evals(run) and time.monotonic() < deadline:  # the first eval (step 20): both ranks are training
        time.sleep(0.05)
    ranks = sorted(int(pid) for pid in (Path("/proc") / str(proc.pid) / "task" / str(proc.pid) / "children")
                   .read_text().split())
    os.kill(ranks[1], signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the processes hung after a Ctrl-C reached one of them")
    step = json.loads((run / "state.json").read_text())["progress"]["step"]
    assert 20 <= step < 100 and json.loads(out)["interrupted"], err[-3000:]  # 20: it landed in that eval's save
    assert f"interrupted at step {step}; continue with" in err
    r = subprocess.run([*torchrun, "--resume", str(run)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and json.loads(r.stdout)["steps"] == 100, r.stderr[-3000:]
    a, b = (json.loads((tmp_path / d / "state.json").read_text())["weights"] for d in ("one", "stopped"))
    weights_one, weights_stopped = load_file(tmp_path / "one" / a), load_file(run / b)
    assert all(torch.equal(weights_one[k], weights_stopped[k]) for k in weights_one)


def test_without_a_val_split_the_last_steps_and_the_target_are_in_the_metrics(small_text, tmp_path):
    """--val-fraction 0 (the seed's job) has no eval line: the steps after the last 10-step line, and the target
    reached, were written nowhere (nor in loss.png)."""
    budget = train(config(small_text, tmp_path / "budget", val_fraction=0.0, steps=25, eval_interval=100))
    assert [r["step"] for r in RunDir(tmp_path / "budget").metrics()] == [1, 10, 20, 25] and budget["steps"] == 25
    reached = train(config(small_text, tmp_path / "target", val_fraction=0.0, steps=300, eval_interval=1000,
                           target_loss=9.5))
    assert reached["stopped_by"] == "target_loss"
    rows = RunDir(tmp_path / "target").metrics()
    assert rows[-1]["step"] == reached["steps"] and [r for r in rows if "target_reached" in r] == rows[-1:]
    assert rows[-1]["target_reached"] == reached["target_reached"]


def test_an_epoch_of_windows_is_its_whole_windows(small_text, tmp_path):
    """--windows epoch visits (tokens - 1) // block_size windows an epoch; --epochs counted the text's tokens
    instead, so on a text of 2.9 blocks each epoch asked ran 1.45 of them."""
    text = tmp_path / "short.txt"
    text.write_text(small_text.read_text()[:620])
    train_tokens = load_corpus(text, val_fraction=0.0).train
    windows = (len(train_tokens) - 1) // 64
    assert len(train_tokens) - windows * 64 > 32  # a text that is far from whole windows
    summary = train(config(text, tmp_path / "run", val_fraction=0.0, block_size=64, batch_size=1, steps=None,
                           epochs=3, windows="epoch", eval_interval=1000))
    assert summary["steps"] == 3 * windows and summary["epochs"] == 3.0
    assert RunDir(tmp_path / "run").metrics()[-1]["epoch"] == 3.0


def test_resuming_on_another_text_says_so_even_when_that_text_is_short(small_text, tmp_path):
    train(config(small_text, tmp_path / "run", steps=2, eval_interval=2))
    (tmp_path / "short.txt").write_text("Just a few words.")
    with pytest.raises(ConfigError, match="is not the text the run was trained on"):
        train(resume_config(tmp_path / "run", steps=4, data=str(tmp_path / "short.txt")), resume=True)


def _window_target(small_text, tmp_path) -> float:
    """A target a little below where a 120-step run's 50-step mean ends, so the run reaches it near its end."""
    summary = train(config(small_text, tmp_path / "probe", steps=120, decay_steps=300, target_loss=0.001))
    assert summary["stopped_by"] == "steps" and summary["target_reached"] is None
    return summary["last_window_loss"] + 0.05


def test_target_loss_stops_the_run_records_it_and_resumes_to_the_same_step(small_text, tmp_path):
    target = _window_target(small_text, tmp_path)
    common = dict(decay_steps=300, target_loss=target, dropout=0.1)
    one = train(config(small_text, tmp_path / "one", steps=300, **common))
    reached = one["target_reached"]
    assert one["stopped_by"] == "target_loss" and LOSS_WINDOW <= reached["step"] < 300
    assert reached["window_loss"] < target and one["steps"] == reached["step"]
    assert reached["tokens_seen"] == reached["step"] * 4 * 32 and reached["epoch"] > 0
    rows = evals(tmp_path / "one")
    assert rows[-1]["target_reached"] == reached and rows[-1]["step"] == one["steps"]
    _, metadata = load_model(tmp_path / "one" / "model.safetensors")
    assert json.loads(metadata["training"])["target_reached"] == reached  # the model at the target is saved

    # Stopped (as if killed) before the target, then resumed: the same step, the same weights.
    early = train(config(small_text, tmp_path / "two", steps=reached["step"] - 20, **common))
    assert early["stopped_by"] == "steps" and early["target_reached"] is None
    two = train(resume_config(tmp_path / "two", steps=300), resume=True)
    assert two["target_reached"]["step"] == reached["step"]
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("one", "two"))
    assert all(torch.equal(a[k], b[k]) for k in a)

    # A budget that ends at the very step that reaches the target: it counts as reached.
    exact = train(config(small_text, tmp_path / "three", steps=reached["step"], **common))
    assert exact["stopped_by"] == "target_loss" and exact["target_reached"]["step"] == reached["step"]

    # The same target on resume: only a lower one goes on, and the error says so (it asked for more steps).
    with pytest.raises(ConfigError, match="already stopped by its --target-loss at step .*; to go on, give a lower "
                                          "--target-loss$"):
        train(resume_config(tmp_path / "one", steps=reached["step"] + 5), resume=True)

    # A lower target on resume: the run goes on (the old target's step is not the new one's).
    lower = train(resume_config(tmp_path / "one", target_loss=0.001, steps=reached["step"] + 5), resume=True)
    assert lower["steps"] == reached["step"] + 5 and lower["target_reached"] is None  # a new target: a new search


def test_the_target_waits_for_a_full_window_of_losses(small_text, tmp_path):
    """A mean of the first few steps' losses is not the LOSS_WINDOW mean the target means: it stopped runs early."""
    summary = train(config(small_text, tmp_path / "run", steps=LOSS_WINDOW + 5, eval_interval=1000, batch_size=1,
                           block_size=8, target_loss=100.0))
    assert summary["stopped_by"] == "target_loss" and summary["target_reached"]["step"] == LOSS_WINDOW


def test_the_bar_shows_the_val_loss_as_soon_as_an_eval_ran(small_text, tmp_path, capsys):
    """A run shorter than its eval interval ended with "val -" on its bar although it had just scored val."""
    summary = train(config(small_text, tmp_path / "run", steps=3, eval_interval=1000))
    final_bar = re.split(r"[\r\n]", capsys.readouterr().err.strip())[-1]
    assert f"val {summary['best_val_nats_per_token']:.3f}" in final_bar, final_bar


def test_epochs_budget_counts_passes_over_the_train_split(small_text, tmp_path):
    from gptgen.data import load_corpus

    train_tokens = len(load_corpus(str(small_text), 0.1).train)
    summary = train(config(small_text, tmp_path / "run", steps=None, epochs=0.5, eval_interval=1000))
    assert summary["steps"] == math.ceil(0.5 * train_tokens / (4 * 32)) and summary["stopped_by"] == "epochs"
    assert summary["epochs"] == pytest.approx(0.5, abs=0.01)


def test_a_new_length_budget_on_resume_replaces_the_spent_one(small_text, tmp_path):
    """A run stopped by --epochs (or --minutes), resumed with more --steps, goes on to those steps."""
    run = tmp_path / "run"
    first = train(config(small_text, run, steps=None, epochs=0.05, eval_interval=1000))
    assert first["stopped_by"] == "epochs"
    assert resume_config(run, target_loss=0.5).epochs == 0.05  # no new length: the saved one holds
    cfg = resume_config(run, steps=first["steps"] + 3)
    assert (cfg.steps, cfg.epochs, cfg.minutes) == (first["steps"] + 3, None, None)
    second = train(cfg, resume=True)
    assert second["steps"] == first["steps"] + 3 and second["stopped_by"] == "steps"
    lrs = {row["step"]: row["lr"] for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    # the lr goes on from where the epochs' cosine left it: the new budget's, at its step, was twice as high
    assert lrs[first["steps"] + 1] == lrs[first["steps"]] and lrs[first["steps"] + 3] < lrs[first["steps"]]


def test_a_full_disk_stops_with_a_clear_error_and_keeps_the_last_good_state(small_text, tmp_path):
    """The disk fills (simulated as root can't be refused by permissions: a 1 MB file-size limit makes the
    next checkpoint write fail with EFBIG), then space comes back and the run resumes."""
    import resource

    run = tmp_path / "run"
    train(config(small_text, run, steps=4, eval_interval=2))
    before = (run / "state.json").read_bytes()

    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get the error, not the signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))

    r = subprocess.run([sys.executable, "-m", "gptgen", "train", "--resume", str(run), "--steps", "8"],
                       capture_output=True, text=True, preexec_fn=small_disk)
    assert r.returncode == 2 and "could not write" in r.stderr and "--resume" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert (run / "state.json").read_bytes() == before and _state_is_whole(run) == 4
    assert not RunDir(run).partial_writes()
    train(resume_config(run, steps=8), resume=True)
    assert _state_is_whole(run) == 8


def test_resume_checks_the_text_and_takes_it_moved(small_text, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(small_text.read_text())
    run = tmp_path / "run"
    first = train(config(text, run, steps=4))
    text.write_text(small_text.read_text() + "more")
    with pytest.raises(ConfigError, match="not the text the run was trained on"):
        train(resume_config(run, steps=8), resume=True)
    moved = tmp_path / "moved.txt"
    moved.write_text(small_text.read_text())
    text.unlink()
    with pytest.raises(ConfigError, match="is gone; if it moved, give its new place"):
        train(resume_config(run, steps=8), resume=True)
    assert train(resume_config(run, steps=8, data=str(moved)), resume=True)["steps"] == 8
    assert first["steps"] == 4


def test_resuming_a_finished_run_says_its_budget_is_spent(small_text, tmp_path):
    run = tmp_path / "run"
    train(config(small_text, run, steps=4))
    with pytest.raises(ConfigError, match="already stopped by its --steps at step 4; to go on, give a larger "
                                          "--steps, --epochs or --minutes$"):
        train(resume_config(run), resume=True)


def test_short_epochs_share_a_line_at_most_every_10_s(tmp_path, monkeypatch, capsys):
    """A small text's epochs used to print a line each, dozens a minute."""

    import gptgen.train

    class Clock:  # 0.1 s a reading: a few readings a step, ~14 steps an epoch, a few epochs a line
        t = 0.0

        def perf_counter(self):
            self.t += 0.1
            return self.t

    monkeypatch.setattr(gptgen.train, "time", Clock())
    text = tmp_path / "text.txt"
    text.write_text(CORPUS.read_text()[:2500])
    summary = train(config(text, tmp_path / "run", steps=200, eval_interval=1000))
    lines = re.findall(r"epochs? (\d+)(?:-(\d+))? done at step", capsys.readouterr().err)
    ranges = [(int(a), int(b or a)) for a, b in lines]
    assert ranges[0] == (1, 1) and any(b > a for a, b in ranges), ranges
    assert ranges[-1][1] == int(summary["epochs"])  # the last epochs get their line when the run ends
    assert all(nxt[0] == prev[1] + 1 for prev, nxt in itertools.pairwise(ranges)), ranges  # no epoch left out


def test_the_last_epochs_line_leaves_out_the_unfinished_epoch(tmp_path, monkeypatch, capsys):
    """A run that ended mid-epoch folded that epoch's steps into the line of the epochs before, at the last step."""
    import gptgen.train

    steps_run = itertools.count(1)
    monkeypatch.setattr(gptgen.train, "optimizer_step",  # a step's loss is its number: each line's mean is known
                        lambda model, optimizer, batches, **_: torch.tensor(float(next(steps_run)) * len(batches)))
    monkeypatch.setattr(gptgen.train, "EPOCH_LINE_INTERVAL_S", 1e9)  # after the first epoch's, one line at the end
    text = tmp_path / "text.txt"
    text.write_text(CORPUS.read_text()[:2500])  # ~5 steps an epoch at 4 x 32: step 52 is in epoch 11
    summary = train(config(text, tmp_path / "run", steps=52, eval_interval=20))
    lines = re.findall(r"epochs? (\d+)(?:-(\d+))? done at step (\d+): mean train loss ([\d.]+)",
                       capsys.readouterr().err)
    ends = [0] + [int(step) for *_, step, _ in lines]
    assert len(lines) == 2 and int(lines[-1][1]) == int(summary["epochs"]) and ends[-1] < 52, lines
    for (*_, mean), (first, last) in zip(lines, itertools.pairwise(ends), strict=True):  # its own steps' mean
        assert float(mean) == pytest.approx((first + 1 + last) / 2, abs=1e-4), lines


def test_the_bar_shows_the_loss_of_slow_steps_between_metrics_lines(small_text, tmp_path, monkeypatch, capsys):
    """The bar's loss changed only every 10 steps: a minute or more apart for a large model on a CPU."""
    import gptgen.train

    class Clock:  # 0.5 s a reading: over a second a step
        t = 0.0

        def perf_counter(self):
            self.t += 0.5
            return self.t

    steps_run = itertools.count(1)
    monkeypatch.setattr(gptgen.train, "optimizer_step",  # a step's loss is its number
                        lambda model, optimizer, batches, **_: torch.tensor(float(next(steps_run)) * len(batches)))
    monkeypatch.setattr(gptgen.train, "time", Clock())
    train(config(small_text, tmp_path / "run", steps=6, eval_interval=1000))
    shown = re.findall(r"loss (\d+\.\d+), val", capsys.readouterr().err)
    # step 1 has a metrics line; steps 2-5 show the mean since it: 2, 2.5, 3, 3.5; step 6's line too
    assert [float(x) for x in dict.fromkeys(shown)] == [1.0, 2.0, 2.5, 3.0, 3.5, 4.0], shown


def test_a_loss_that_is_no_longer_a_number_stops_the_run_and_keeps_its_last_save(small_text, tmp_path, monkeypatch):
    """A NaN loss crashed the eval's sample (torch.multinomial), or without a sample ended "done" with no model file
    and NaN in metrics.jsonl."""
    import gptgen.train

    steps_run = itertools.count(1)
    monkeypatch.setattr(gptgen.train, "optimizer_step",  # from step 3 the loss is NaN
                        lambda model, optimizer, batches, **_: torch.tensor(1.0 if next(steps_run) < 3 else math.nan))
    run = tmp_path / "run"
    with pytest.raises(GptgenError, match=r"training diverged at step 4 \(train loss nan, val loss \d+\.\d+\); the "
                                          r"run's files keep step 2, its last save\. Start again with a lower --lr "
                                          r"\(this run's is 0\.001\)"):
        train(config(small_text, run, steps=10, eval_interval=2, lr=1e-3))
    rows = [json.loads(line, parse_constant=pytest.fail) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2] and _state_is_whole(run) == 2


def test_a_bad_out_or_data_path_is_refused_before_tokenizing_or_downloading(small_text, tmp_path, monkeypatch):
    """An unwritable --out was found only after the whole text was tokenized (34 s for 500 MB), a missing --data or a
    bad flag after --init's download; no check leaves a folder behind."""
    import gptgen.interop
    import gptgen.train

    monkeypatch.setattr(gptgen.train, "load_corpus_once_per_machine", lambda *_: pytest.fail("tokenized first"))
    monkeypatch.setattr(gptgen.interop, "read_hf", lambda *_: pytest.fail("downloaded first"))
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ConfigError, match="cannot write to --out"):
        train(config(small_text, tmp_path / "a-file" / "run"))
    with pytest.raises(DataError, match="does not exist"):
        train(config(tmp_path / "none.txt", tmp_path / "new" / "run", init="gpt2"))
    with pytest.raises(ConfigError, match="--lr must be positive"):  # a bad flag too
        train(config(small_text, tmp_path / "new" / "run", init="gpt2", lr=0.0))
    with pytest.raises(ConfigError, match="--block-size must be at least 1"):  # was an AttributeError
        train(config(small_text, tmp_path / "new" / "run", init="gpt2", block_size=0))
    with pytest.raises(ConfigError, match="unknown device 'cdua'"):
        train(config(small_text, tmp_path / "new" / "run", init="gpt2", device="cdua"))
    monkeypatch.delattr(torch.optim, "Muon")  # a torch before 2.9
    with pytest.raises(ConfigError, match="--optimizer muon needs PyTorch 2.9 or newer"):
        train(config(small_text, tmp_path / "new" / "run", init="gpt2", optimizer="muon"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


@pytest.mark.usefixtures("sigint_as_in_a_terminal")
def test_a_second_ctrl_c_stops_at_once_and_the_run_keeps_its_last_save(small_text, tmp_path, monkeypatch):
    """The first Ctrl-C's eval scores the whole val split (minutes for a large text on a CPU); a user who will
    not wait presses it again."""
    import gptgen.signals
    import gptgen.train

    step, evaluate = gptgen.train.optimizer_step, gptgen.train.evaluate
    steps = itertools.count(1)

    def ctrl_c_at_step_7(*args, **kwargs):
        if next(steps) == 7:
            signal.raise_signal(signal.SIGINT)
        return step(*args, **kwargs)

    def ctrl_c_again_in_the_eval(*args, **kwargs):
        if (tmp_path / "run" / "state.json").exists():  # the eval at step 5 has saved
            signal.raise_signal(signal.SIGINT)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(gptgen.train, "optimizer_step", ctrl_c_at_step_7)
    monkeypatch.setattr(gptgen.train, "evaluate", ctrl_c_again_in_the_eval)
    monkeypatch.setattr(gptgen.signals, "REPEAT_S", 0.0)  # the second comes at once (test_signals: a repeat)
    with pytest.raises(KeyboardInterrupt):
        train(config(small_text, tmp_path / "run", steps=20, eval_interval=5))
    assert json.loads((tmp_path / "run" / "state.json").read_text())["progress"]["step"] == 5
    monkeypatch.undo()
    assert train(resume_config(tmp_path / "run"), resume=True)["steps"] == 20


def test_a_stop_during_an_eval_ends_the_run_with_that_eval_and_save(small_text, tmp_path, monkeypatch):
    """A stop that came while the run evaluated (minutes on a CPU) ran one more step, then evaluated and saved
    again: twice the wait, and under a 30 s grace period (Kubernetes, torchrun) the second was killed."""
    import gptgen.train

    evals_at, eval_and_save = [], gptgen.train._eval_and_save

    def stopped_meanwhile(cfg, run, model, optimizer, corpus, progress, *args):
        evals_at.append(progress.step)
        if progress.step == 2:
            signal.raise_signal(signal.SIGTERM)  # `kill`, while the bar says evaluating
        return eval_and_save(cfg, run, model, optimizer, corpus, progress, *args)

    monkeypatch.setattr(gptgen.train, "_eval_and_save", stopped_meanwhile)
    summary = train(config(small_text, tmp_path / "run", steps=10, eval_interval=2))
    assert summary["interrupted"] and summary["steps"] == 2 and evals_at == [2]


def test_a_folder_that_cannot_be_locked_trains_with_a_warning(small_text, tmp_path, monkeypatch, caplog):
    """NFS without its lock daemon answers flock with ENOLCK: every train and --resume there ended in a traceback."""
    import errno
    import fcntl

    def no_locks(f, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    run = tmp_path / "run"
    assert train(config(small_text, run, steps=2))["steps"] == 2
    assert train(resume_config(run, steps=4), resume=True)["steps"] == 4
    assert f"--out '{run}' cannot be locked (No locks available)" in caplog.text


def test_a_second_train_in_a_run_folder_in_use_is_refused_and_changes_nothing(small_text, tmp_path, monkeypatch):
    """A --resume typed in another terminal while the run went on deleted the files its state named; two new runs
    started together in one folder both wrote metrics.jsonl."""
    import gptgen.train

    run, new = tmp_path / "run", tmp_path / "new"
    train(config(small_text, run, steps=2))
    files = {f.name: f.read_bytes() for f in run.iterdir()}
    new.mkdir()
    holders = [RunDir(run), RunDir(new)]  # a run in progress in each (another process's lock, as far as flock knows)
    for holder in holders:
        holder.lock()
    in_use = rf"is in use by another gptgen train \(process {os.getpid()}\)"
    with pytest.raises(ConfigError, match=in_use):
        train(resume_config(run, steps=4), resume=True)
    with pytest.raises(ConfigError, match=in_use):
        train(config(small_text, new, steps=2))
    assert {f.name: f.read_bytes() for f in run.iterdir()} == files
    assert [f.name for f in new.iterdir()] == [".train.lock"]
    for holder in holders:
        holder.unlock()
    assert train(resume_config(run, steps=4), resume=True)["steps"] == 4  # the kernel drops a lock with its process
    load = gptgen.train.load_corpus_once_per_machine

    def another_run_starts_meanwhile(cfg, rank):
        (tmp_path / "late" / "state.json").parent.mkdir()
        (tmp_path / "late" / "state.json").write_text("{}")
        return load(cfg, rank)

    monkeypatch.setattr(gptgen.train, "load_corpus_once_per_machine", another_run_starts_meanwhile)
    with pytest.raises(ConfigError, match="another gptgen train started a run there meanwhile"):
        train(config(small_text, tmp_path / "late", steps=2))


def test_a_step_that_ends_several_epochs_counts_them_all(tmp_path, capsys):
    """A text shorter than a step's tokens ends epochs two or more at a time; each step counted one."""
    text = tmp_path / "text.txt"
    text.write_text(CORPUS.read_text()[:1500])  # ~370 train tokens: 0.36 steps an epoch at 8 x 128
    summary = train(config(text, tmp_path / "run", steps=3, batch_size=8, block_size=128, eval_interval=1000))
    lines = re.findall(r"epochs? (\d+)(?:-(\d+))? done at step (\d+)", capsys.readouterr().err)
    assert [(int(a), int(b or a), int(step)) for a, b, step in lines] == [(1, 2, 1), (3, 8, 3)]
    assert int(summary["epochs"]) == 8


def test_a_copied_run_resumes_in_its_own_folder(small_text, tmp_path):
    """--resume used to write into the folder the run was started in (state.json's `out`), not the one given."""
    import shutil

    train(config(small_text, tmp_path / "run", steps=4))
    shutil.copytree(tmp_path / "run", tmp_path / "copy")
    before = sorted(os.listdir(tmp_path / "run"))
    summary = train(resume_config(tmp_path / "copy", steps=6), resume=True)
    assert summary["run_dir"] == str(tmp_path / "copy") and summary["steps"] == 6
    assert sorted(os.listdir(tmp_path / "run")) == before and _state_is_whole(tmp_path / "run") == 4
    assert _state_is_whole(tmp_path / "copy") == 6


@pytest.mark.parametrize("text", ["{not json", '{"train_config": {"nope": 1}}', "[]", '{"train_config": {}}'])
def test_a_state_json_that_no_run_wrote_is_refused_by_name(small_text, tmp_path, text):
    """A run writes it atomically; one edited or copied in by hand ended a new run or a resume in a traceback."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "state.json").write_text(text)
    with pytest.raises(ConfigError, match=r"state.json' is not a gptgen run's state \(\w+"):
        resume_config(run)
    with pytest.raises(ConfigError, match="is not a gptgen run's state"):
        train(config(small_text, run))
    assert [f.name for f in run.iterdir()] == ["state.json"]
