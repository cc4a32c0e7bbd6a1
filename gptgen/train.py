"""The training loop: one process, or one per device under torchrun (PyTorch DDP).

Every LOG_INTERVAL steps the mean train loss goes to metrics.jsonl. Every eval scores the whole val
split, logs a line there too, redraws loss.png, keeps the best weights in model.safetensors and writes
the training state (last weights, optimizer, RNG, data position) so that `--resume` continues exactly
where the run stopped.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime
import json
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from gptgen import checkpoint
from gptgen.config import (
    LENGTH_BUDGET,
    LOG_INTERVAL,
    LOSS_WINDOW,
    STEP_FILES,
    ConfigError,
    GPTConfig,
    GptgenError,
    TrainConfig,
)
from gptgen.data import Corpus, DataError, EpochWindows, check_data_file, load_corpus, sample_batch
from gptgen.device import allow_tf32, autocast_for, pick_device, use_bf16
from gptgen.evaluate import EvalResult, evaluate
from gptgen.generate import TextModel
from gptgen.model import GPT
from gptgen.optim import Optimizer, make_optimizer
from gptgen.plot import plot_losses
from gptgen.signals import sigint_noted

log = logging.getLogger(__name__)
T = TypeVar("T")
STATE = "state.json"
MODEL = "model.safetensors"
METRICS = "metrics.jsonl"
LOCK = ".train.lock"
WRITE_TEST = ".write-test-"  # check_writable's probe, named by the process; a kill may leave one
RUN_FILES = (STATE, MODEL, METRICS, "loss.png", LOCK, *STEP_FILES,
             *checkpoint.PARTIAL_WRITES, f"{WRITE_TEST}*")  # what a run writes in its directory
BAR_INTERVAL_S = 1.0  # the bar's loss is read at most this often between metrics lines (each read is a host sync)
EPOCH_LINE_INTERVAL_S = 10  # short epochs (a small text) share one line: "epochs 12-19 done ..."
NOT_RECIPE = ("data", "out", "device", "sample_tokens", "sample_prompt")  # knobs that do not shape the model
WARMUP_TIME_FRACTION = 0.25  # of a --minutes budget after the first step: the default warmup's time limit


@dataclass
class Progress:
    """What the run has done so far; saved in state.json."""

    step: int = 0
    tokens_seen: int = 0
    elapsed_s: float = 0.0
    best_val: float = math.inf
    best_step: int = 0
    recent_losses: list[float] = dataclasses.field(default_factory=list)  # the last LOSS_WINDOW steps' losses
    first_step_s: float = 0.0  # the first step's time (compiling, mostly), which a timed warmup leaves out
    epoch_loss: list[float] = dataclasses.field(default_factory=lambda: [0.0, 0])  # [sum, steps] of the epoch under way
    unprinted_loss: list[float] = dataclasses.field(default_factory=lambda: [0.0, 0])  # ... of finished epochs
    epochs_unprinted: int = 0  # finished epochs that await their line, which unprinted_loss covers
    unprinted_step: int = 0  # the step that finished the last of them
    target_reached: dict | None = None
    # --dtype auto's choice, {"device": "cpu", "bf16": False}: a resume on that kind of device keeps it, since each
    # process times the CPU's bf16 anew, and on a CPU where it is about as fast a run could switch precision midway
    precision: dict | None = None
    # the warmup's share and the cosine's share that the schedule has reached (lr_at's `reached`)
    schedule: list[float] = dataclasses.field(default_factory=lambda: [0.0, 0.0])


def max_steps(cfg: TrainConfig, steps_per_epoch: float) -> int | None:
    """The step budget: --steps or --epochs, whichever is fewer (None: only time bounds the run)."""
    limits = [cfg.steps] if cfg.steps is not None else []
    if cfg.epochs is not None:
        limits.append(max(1, math.ceil(cfg.epochs * steps_per_epoch)))
    return min(limits) if limits else None


def lr_at(cfg: TrainConfig, step: int, elapsed_s: float, total_steps: int | None = None,
          first_step_s: float = 0.0, reached: list[float] | None = None) -> float:
    """Linear warmup, then cosine to min_lr over the step horizon or the time budget, whichever is nearer.

    The default warmup is 5% of the step schedule, at most 200 steps (100 when only --minutes bounds the run);
    with --minutes it also ends once a quarter of the time after the first step (which compiles) has passed,
    so that a short timed run of slow steps does not spend itself warming up.

    `reached`, a run's [warmup share, cosine share] so far, is never gone back on, and is updated: a resume with
    another budget goes on from where the run was. It went back up the new budget's cosine (a run stopped by
    --minutes at min_lr, resumed with the --steps the CLI suggests, went on at 10x that) or into a new warmup."""
    horizon = cfg.decay_steps or total_steps or cfg.steps
    budget_s = cfg.minutes * 60 if cfg.minutes else None
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else min(200, (horizon or 2000) // 20)
    warm = (step + 1) / warmup if warmup else 1.0
    if cfg.warmup_steps is None and budget_s:
        warm = max(warm, (elapsed_s - first_step_s) / (WARMUP_TIME_FRACTION * max(1e-9, budget_s - first_step_s)))
    min_lr = cfg.min_lr if cfg.min_lr is not None else cfg.lr / 10
    done = (step - warmup) / max(1, horizon - warmup) if horizon else 0.0
    if budget_s:
        done = max(done, elapsed_s / budget_s)
    done = min(1.0, max(0.0, done))
    if reached is not None:
        reached[:] = warm, done = max(warm, reached[0]), max(done, reached[1])
    cosine = min_lr + 0.5 * (1 + math.cos(math.pi * done)) * (cfg.lr - min_lr)
    if warm >= 1:
        return cosine
    # warming up towards the cosine, not the peak: the time's cosine has gone on meanwhile, and a warmup that
    # ended on the peak dropped at once to it (by 18% at a quarter of the time). Before the cosine has begun,
    # cfg.lr itself: the cosine's formula at 0 may be an ulp off it
    return (cosine if done else cfg.lr) * warm


class RunDir:
    """The files of one run. Only rank 0 writes; every write is atomic."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._lock = None

    def lock(self) -> None:
        """Holds the folder for this process until unlock(): a second `train` on it (the --resume command typed
        in another terminal) deleted the files that the first one's state named, and both appended to
        metrics.jsonl. A lock, not a pid file: the kernel drops it with the process, however that ends. A folder
        not made yet has nothing to hold."""
        try:
            import fcntl
        except ImportError:  # Windows: no lock
            return
        if not self.path.is_dir():
            return
        f = open(self.path / LOCK, "a+")  # noqa: SIM115 - held open until unlock()
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            f.close()
            raise ConfigError(f"--out {str(self.path)!r} is in use by another gptgen train (process {holder}); let "
                              "it finish, or stop it first") from None
        except OSError as e:  # a file system without locks (NFS without its lock daemon: ENOLCK): train unlocked
            f.close()
            log.warning("--out %r cannot be locked (%s): nothing stops another gptgen train from using it at the "
                        "same time", str(self.path), e.strerror or e)
            return
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
        self._lock = f

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def check_writable(self, keep: bool = True) -> None:
        """Makes the run's folder, or refuses an --out that cannot be written; `keep=False` removes what it made (a
        check before the rest of the setup, which may yet refuse the run: a refused run leaves nothing)."""
        made = [p for p in (self.path, *self.path.parents) if not p.exists()]  # the deepest first
        error = None
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / f"{WRITE_TEST}{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            error = e
        for folder in made if error or not keep else []:
            with contextlib.suppress(OSError):  # not empty: something else wrote there meanwhile; keep it
                folder.rmdir()
        if error:
            raise ConfigError(f"cannot write to --out {str(self.path)!r} ({error.strerror}); choose a writable "
                              "directory")

    def refuse_if_taken(self) -> None:
        """A new run's --out must hold no run, and no files that are not a run's."""
        if self.state() is not None:
            raise ConfigError(f"--out {str(self.path)!r} already holds a run; continue it with --resume {self.path} "
                              "or choose another --out")
        foreign = self.foreign_files()
        if foreign:
            raise ConfigError(f"--out {str(self.path)!r} holds files that are not a training run's "
                              f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); choose a new or "
                              "empty directory")

    def foreign_files(self) -> list[str]:
        """Names here that no run writes (a new run would overwrite or delete some of its own names only). A run
        locks the folder before it writes anything else, so in a folder without the lock file every name is
        another tool's: a new run would have emptied its metrics.jsonl, replaced its loss.png and deleted its
        last-*.safetensors."""
        if not self.path.is_dir():
            return []
        names = {f.name for f in self.path.iterdir()}
        own = RUN_FILES if LOCK in names else (f"{WRITE_TEST}*",)  # a write check's, killed midway
        foreign = {name for name in names if not any(fnmatch(name, pattern) for pattern in own)}
        if MODEL in names and METRICS not in names:  # a model put here, not one a run wrote (its first eval logs)
            foreign.add(MODEL)
        return sorted(foreign)

    def state(self) -> dict | None:
        """The saved state.json (None: no run here); one that a run did not write (it writes atomically) is refused."""
        f = self.path / STATE
        if not f.is_file():
            return None
        try:
            state = json.loads(f.read_text())
            TrainConfig(**state["train_config"])  # what resuming reads from it
            Progress(**state["progress"])
            missing = [k for k in ("weights", "optimizer", "world_size", "rng") if k not in state]
            if missing:
                raise KeyError(missing[0])
        except (ValueError, TypeError, KeyError) as e:
            raise ConfigError(f"{str(f)!r} is not a gptgen run's state ({type(e).__name__}: {e}); it was changed "
                              "or copied in by hand: restore it, or train with a new --out") from None
        return state

    def save_state(self, model: GPT, optimizer: Optimizer, state: dict, ema: GPT | None = None) -> None:
        """Weights, optimizer (and --ema's average) under step-numbered names, then state.json naming them: the
        commit point."""
        step = state["progress"]["step"]
        files = {"weights": f"last-{step:07d}.safetensors", "optimizer": f"optim-{step:07d}.safetensors"}
        checkpoint.save_model(self.path / files["weights"], model.state_dict(), model.config)
        checkpoint.save_optimizer(self.path / files["optimizer"], optimizer)
        if ema is not None:
            files["ema"] = f"ema-{step:07d}.safetensors"
            checkpoint.save_model(self.path / files["ema"], ema.state_dict(), ema.config)
        checkpoint.atomic_write(self.path / STATE, json.dumps({**state, **files}, indent=1).encode())
        for old in (f for pattern in STEP_FILES for f in self.path.glob(pattern)):
            if old.name not in files.values():
                old.unlink(missing_ok=True)

    def log_metrics(self, row: dict, durable: bool = True) -> None:
        """Append a line; an eval's is fsynced (the state saved next refers to it), a train loss's is not."""
        try:
            with open(self.path / METRICS, "a") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()
                if durable:
                    os.fsync(f.fileno())
        except OSError as e:  # a full disk or a directory gone read-only: stop cleanly, the last state is kept
            raise _write_error(self.path, e) from None

    def metrics(self) -> list[dict]:
        """Every line, train losses and evals (evals hold `val_nats_per_token`); a line cut by a kill is skipped."""
        f = self.path / METRICS
        rows = []
        for line in f.read_text().splitlines() if f.is_file() else []:
            with contextlib.suppress(ValueError):
                rows.append(json.loads(line))
        return rows

    def partial_writes(self) -> list[Path]:
        """Temporary files of writes that a kill interrupted; the state they were for was never committed."""
        return sorted({f for pattern in checkpoint.PARTIAL_WRITES for f in self.path.glob(pattern)})

    def remove_partial_writes(self) -> None:
        for tmp in self.partial_writes():
            tmp.unlink(missing_ok=True)

    def truncate_metrics(self, step: int) -> None:
        """Drop lines logged after the state a run starts from (the run that wrote them died before saving it)."""
        rows = [r for r in self.metrics() if r["step"] <= step]
        checkpoint.atomic_write(self.path / METRICS, "".join(json.dumps(r) + "\n" for r in rows).encode())


def _write_error(path: Path, e: OSError) -> GptgenError:
    return GptgenError(f"training stopped: could not write to {str(path)!r} ({e.strerror or e}); the last complete "
                       f"state there is kept. Free space, then: gptgen train --resume {path}")


def _rng_bytes(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _rng_tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def _gather(obj):
    """Every rank's object, in rank order (a one-item list outside torchrun)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _setup_distributed(device_name: str) -> tuple[int, int]:
    if "RANK" not in os.environ or dist.is_initialized():
        return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if device_name.startswith("cuda:"):  # every process would train on that one GPU
        raise ConfigError(f"--device {device_name}: under torchrun each process takes the GPU of its LOCAL_RANK; "
                          "give --device cuda (or auto), and CUDA_VISIBLE_DEVICES to choose the GPUs")
    use_nccl = torch.cuda.is_available() and device_name in ("auto", "cuda")
    # NCCL carries CUDA tensors only: the loop's stop flag and all_gather_object's buffers are CPU tensors (gloo)
    dist.init_process_group(backend="cpu:gloo,cuda:nccl" if use_nccl else "gloo")
    if use_nccl:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist.get_rank(), dist.get_world_size()


def load_corpus_once_per_machine(cfg: TrainConfig, rank: int) -> Corpus:
    """The text's token ids; under torchrun each machine's first process tokenizes it into the token cache while
    the others wait, then they read the cache: N processes tokenizing one text at once took N times the memory
    (a 500 MB text: 2.3 GB each). Should the first fail, the others try, and fail alike (or tokenize themselves
    where the cache is read-only)."""
    leader = not dist.is_initialized() or int(os.environ.get("LOCAL_RANK", 0)) == 0
    if not leader:
        dist.barrier()
    try:
        return load_corpus(cfg.data, cfg.val_fraction, progress=rank == 0)
    finally:
        if leader and dist.is_initialized():
            dist.barrier()


def resume_config(run_dir: str | os.PathLike, **budget) -> TrainConfig:
    """The saved config of a run, with a new budget where one is given. A new --steps, --minutes or --epochs
    replaces all three saved ones: a saved limit left in place may be the one already spent, which would
    stop the resumed run at once (a run stopped by --minutes and resumed with more --steps)."""
    state = RunDir(run_dir).state()
    if state is None:
        raise ConfigError(f"--resume {str(run_dir)!r}: no {STATE} there, so no run to resume; start one with --out")
    cfg = dataclasses.replace(TrainConfig(**state["train_config"]), out=str(run_dir))  # moved or copied: here
    given = {k: v for k, v in budget.items() if v is not None}
    if given.keys() & set(LENGTH_BUDGET):
        cfg = dataclasses.replace(cfg, **dict.fromkeys(LENGTH_BUDGET))
    return dataclasses.replace(cfg, **given)


def train(cfg: TrainConfig, *, resume: bool = False) -> dict:
    """Run (or resume) training; returns the final summary that the CLI prints."""
    rank, world = _setup_distributed(cfg.device)
    run = RunDir(cfg.out)
    try:
        return _train(cfg, run, resume=resume, rank=rank, world=world)
    finally:
        run.unlock()
        if dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, run: RunDir, *, resume: bool, rank: int, world: int) -> dict:
    # Rank 0 alone looks at --out, and tells the others (a collective, whatever their file systems show them): a
    # rank that listed it while rank 0's write check made and removed it failed alone, and left rank 0 waiting.
    # These come before --init's download and tokenizing, which a wrong --out wastes.
    _on_rank_0(rank, world, run.lock if resume else run.refuse_if_taken)
    saved = run.state() if resume else None  # the run's state.json, read once (held: no other train changes it now)
    if resume and not Path(cfg.data).is_file():
        raise ConfigError(f"the run's text {cfg.data!r} is gone; if it moved, give its new place: gptgen train "
                          f"--resume {cfg.out} --data NEW_PATH")
    cfg.validate(None)  # these, --data, --out and --device before --init's download and tokenizing, which a
    check_data_file(cfg.data)  # mistake wastes
    device = pick_device(cfg.device)
    _on_rank_0(rank, world, lambda: run.check_writable(keep=False))
    pretrained = None
    if cfg.init and resume:  # the weights come from the state: the --init source may have moved, or be offline
        base = checkpoint.read_config(run.path / saved["weights"])
    elif cfg.init:
        from gptgen.interop import read_hf

        base, pretrained = _on_every_rank(rank, world, lambda: read_hf(cfg.init))  # a download may fail on one
    else:
        base = GPTConfig.from_name(cfg.preset)
    cfg.validate(base)
    model_config = dataclasses.replace(base, dropout=cfg.dropout)
    cfg.block_size = cfg.block_size or model_config.block_size
    allow_tf32(device)
    corpus = _on_every_rank(rank, world, lambda: load_corpus_once_per_machine(cfg, rank))
    if len(set(_gather(corpus.sha256))) > 1:  # changed between the ranks' reads, or another copy on another machine
        raise DataError(f"the processes read different texts from {cfg.data!r} (was it being written?); give every "
                        "process the same text, then start again")
    if resume and saved.get("corpus_sha256", corpus.sha256) != corpus.sha256:
        raise ConfigError(f"{cfg.data!r} is not the text the run was trained on (its sha256 differs); resume on "
                          "that text, or start a new run with --out")
    if len(corpus.train) <= cfg.block_size:
        held = f", a smaller --val-fraction (it holds out {cfg.val_fraction:g} of the text)" * (cfg.val_fraction > 0)
        raise DataError(f"the training text has {len(corpus.train)} tokens, fewer than one block of "
                        f"{cfg.block_size} + 1; use a longer text{held} or a smaller --block-size")

    def hold_the_folder() -> None:
        run.check_writable()
        if not resume:
            run.lock()
            if (run.path / STATE).is_file():  # started in the same folder while this one tokenized
                raise ConfigError(f"--out {cfg.out!r}: another gptgen train started a run there meanwhile")

    _on_rank_0(rank, world, hold_the_folder)

    torch.manual_seed(cfg.seed)
    model = GPT(model_config).to(device)
    model.init_weights()
    if pretrained is not None:
        model.load_state_dict({**pretrained, checkpoint.TIED: pretrained["transformer.wte.weight"]})
    model.grad_checkpoint = cfg.grad_checkpoint
    if cfg.trim_vocab:
        model.trim_vocab(torch.from_numpy(np.unique(corpus.train).astype(np.int64)).to(device))  # uint16: 2 B/token
    optimizer = make_optimizer(model, cfg, device)
    # --ema: the average is the model that is evaluated and saved; training goes on from the weights themselves
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema)) if cfg.ema else None
    data_rng = np.random.default_rng([cfg.seed, rank])
    # the same weights on every rank (seeded above), then dropout masks of each rank's own
    torch.manual_seed(int(np.random.SeedSequence([cfg.seed, rank]).generate_state(1)[0]))
    progress = Progress()
    if resume:
        progress = _on_every_rank(rank, world,
                                  lambda: _restore(run, saved, model, optimizer, data_rng, rank, world, device, ema))
        if cfg.target_loss != saved["train_config"]["target_loss"]:
            progress.target_reached = None  # a new target: the old one's step is not this one's
    # what a killed run wrote after its last saved state (or, new here, before its first)
    _on_rank_0(rank, world, lambda: (run.remove_partial_writes(), run.truncate_metrics(progress.step)))
    if cfg.dtype == "auto" and progress.precision is not None and progress.precision["device"] == device.type:
        bf16 = progress.precision["bf16"]
    else:  # every process alike (each times the CPU's bf16 itself): one that measured it slower makes all use float32
        bf16 = all(_gather(use_bf16(device, cfg.dtype)))
    progress.precision = {"device": device.type, "bf16": bf16}
    autocast = autocast_for(device, "bfloat16" if bf16 else "float32")
    step_model = RegionalCompile(model) if use_compile(cfg, device) else model
    if world > 1:
        step_model = torch.nn.parallel.DistributedDataParallel(
            step_model, device_ids=[device.index] if device.type == "cuda" else None)

    windows = None
    if cfg.windows == "epoch":
        windows = EpochWindows(corpus.train, cfg.block_size, cfg.batch_size, cfg.seed, rank, world)
    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum * world
    # an epoch of --windows epoch is its whole windows' tokens (what they leave waits for another epoch's offset)
    epoch_tokens = windows.count * cfg.block_size if windows is not None else len(corpus.train)
    steps_per_epoch = epoch_tokens / tokens_per_step
    total = max_steps(cfg, steps_per_epoch)
    if resume and _should_stop(cfg, progress, total)[0]:
        by = _stopped_by(cfg, progress, total)
        more = "a lower --target-loss" if by == "target_loss" else "a larger --steps, --epochs or --minutes"
        raise ConfigError(f"{cfg.out} already stopped by its --{by.replace('_', '-')} at step {progress.step:,}; to "
                          f"go on, give {more}")
    if rank == 0:
        log.info("training %s (%s params) on %s in %s, %s train / %s val tokens, %s tokens per step, %s steps "
                 "per epoch", _model_name(cfg), f"{model.num_params():,}", device,
                 "bf16 autocast" if bf16 else "float32", f"{len(corpus.train):,}",
                 f"{len(corpus.val):,}", f"{tokens_per_step:,}", _count(steps_per_epoch))
        if not len(corpus.val):
            log.info("no val split (--val-fraction 0): the whole text trains, and each eval saves the latest weights "
                     "without scoring them")
        elif len(corpus.val) < cfg.block_size:
            log.warning("the val split has only %d tokens, less than one block: its loss says little; use a "
                        "larger --val-fraction or a longer text", len(corpus.val))
    bar = tqdm(total=total, initial=progress.step, disable=rank != 0, unit="step", dynamic_ncols=True,
               mininterval=1.0)
    start = time.perf_counter() - progress.elapsed_s
    loss_sum, loss_count, last_val = torch.zeros((), device=device), 0, None  # train loss since the last eval
    recent_sum, recent_count = torch.zeros((), device=device), 0  # ... and since the last bar update
    session_tokens, session_start = 0, time.perf_counter()
    shown_at = session_start  # when the bar's loss was last updated
    epoch_loss = EpochLoss(device)
    # A Ctrl-C, or a SIGTERM (what `timeout`, SLURM and Kubernetes send), stops the run at the end of a step,
    # evaluated and saved (the RNG, the optimizer and the files then agree on one step, so resuming is exact), and
    # under torchrun every process at the same step: it reaches them at slightly different moments, and processes
    # that stop at different steps wait for each other forever. A second one stops at once, keeping the last save.
    # The bar is closed also when an error stops the run, before its message.
    with sigint_noted((signal.SIGINT, signal.SIGTERM), again_raises=True) as ctrl_c, bar:
        while True:
            lr = lr_at(cfg, progress.step, progress.elapsed_s, total, progress.first_step_s, progress.schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if windows is None:
                batches = [sample_batch(corpus.train, cfg.batch_size, cfg.block_size, data_rng)
                           for _ in range(cfg.grad_accum)]
            else:
                batches = windows.batches(progress.step, cfg.grad_accum)
            loss = optimizer_step(step_model, optimizer, batches, device=device, autocast=autocast,
                                  grad_clip=cfg.grad_clip)
            if ema is not None:
                ema.update_parameters(model)
            loss_sum += loss
            recent_sum += loss
            loss_count += cfg.grad_accum
            recent_count += cfg.grad_accum
            progress.step += 1
            progress.tokens_seen += tokens_per_step
            session_tokens += tokens_per_step
            progress.elapsed_s = time.perf_counter() - start
            if progress.step == 1:
                progress.first_step_s = progress.elapsed_s
            _track_epochs_and_target(cfg, progress, loss / cfg.grad_accum, epoch_loss, steps_per_epoch, total, bar,
                                     world)
            bar.update(1)
            done, interrupted = _should_stop(cfg, progress, total, ctrl_c())
            # a metrics line every LOG_INTERVAL steps, and at this session's first step and its last; the bar's
            # loss between them too where steps are slow (a large model on a CPU takes seconds a step)
            log_row = progress.step % LOG_INTERVAL == 0 or session_tokens == tokens_per_step or done or interrupted
            if log_row or time.perf_counter() - shown_at >= BAR_INTERVAL_S:
                shown_at = time.perf_counter()
                rate = session_tokens / (shown_at - session_start)
                # a metrics line's loss is the mean over ranks (all reach that line); the bar's between lines, rank 0's
                recent = (_rank_mean(recent_sum, world) if log_row else recent_sum).item() / recent_count
                bar.set_postfix_str(_postfix(recent, last_val, rate, cfg, progress))
            if log_row:
                _stop_if_diverged(run, cfg, progress, world, train_loss=recent)
                row = _metrics_row(progress, epoch_tokens, lr, recent)
                if done and progress.target_reached is not None and not len(corpus.val):
                    row["target_reached"] = progress.target_reached  # with a val split, on the eval's line
                _on_rank_0(rank, world, lambda: run.log_metrics(row, durable=False))  # noqa: B023 - called at once
                recent_sum.zero_()
                recent_count = 0
            if interrupted and not done:
                _say(bar, f"stopping at step {progress.step:,}: evaluating and saving (press Ctrl-C again to stop "
                          "at once; the run then keeps its last save)")
            if progress.step % cfg.eval_interval == 0 or done or interrupted:
                epoch_loss.fold(progress, world)
                train_row = _metrics_row(progress, epoch_tokens, lr, _rank_mean(loss_sum, world).item() / loss_count)
                last_val, sample = _eval_and_save(cfg, run, model, optimizer, corpus, progress, train_row, data_rng,
                                                  device, autocast, rank, world, ema)
                if sample is not None:
                    _say(bar, f"sample at step {progress.step:,}:\n{cfg.sample_prompt}{sample}")
                bar.set_postfix_str(_postfix(recent, last_val, rate, cfg, progress))  # the new val, at once
                loss_sum.zero_()
                loss_count = 0
                if not (done or interrupted):  # a stop during this eval (minutes on a CPU): its save is the stop's,
                    interrupted = _should_stop(cfg, progress, total, ctrl_c())[1]  # not one more step and eval
                    if interrupted:
                        _say(bar, f"stopping at step {progress.step:,}: saved")
            if done or interrupted:
                interrupted = interrupted and not done  # a Ctrl-C on the last step: the run is complete anyway
                break
        if progress.epochs_unprinted:  # the last short epochs, which waited for their line
            epoch_loss.print_line(progress, steps_per_epoch, bar)
    scored = math.isfinite(progress.best_val)  # not with --val-fraction 0
    summary = {"run_dir": str(run.path), "steps": progress.step, "epochs": round(progress.step / steps_per_epoch, 3),
               "tokens_seen": progress.tokens_seen, "wall_time_s": round(progress.elapsed_s, 1),
               "best_val_nats_per_token": progress.best_val if scored else None,
               "best_step": progress.best_step if scored else None, "model": str(run.path / MODEL),
               # the step model.safetensors holds: the latest with a target (the text fitted) or without a val split
               "model_step": progress.best_step if scored and cfg.target_loss is None else progress.step,
               "interrupted": interrupted}
    if cfg.target_loss is not None:
        summary["target_loss"] = cfg.target_loss
        summary["target_reached"] = progress.target_reached
        summary["last_window_loss"] = _window_mean(progress) if progress.recent_losses else None
    if not interrupted:
        summary["stopped_by"] = _stopped_by(cfg, progress, total)
    return summary


def _window_mean(progress: Progress) -> float:
    return sum(progress.recent_losses) / len(progress.recent_losses)


class EpochLoss:
    """The train loss summed on the device between host reads (an epoch's end, a save), so a run without
    --target-loss syncs no more often than the bar already does."""

    def __init__(self, device: torch.device) -> None:
        self.sum, self.steps = torch.zeros((), device=device), 0
        self.printed_at = -math.inf  # time.perf_counter() of the last epoch line

    def print_line(self, progress: Progress, steps_per_epoch: float, bar: tqdm) -> None:
        """The finished epochs not yet printed, on one line with their mean loss."""
        last = int(progress.unprinted_step // steps_per_epoch)  # 1-based: the epoch that step ended
        mean = progress.unprinted_loss[0] / max(1, progress.unprinted_loss[1])
        first = last + 1 - progress.epochs_unprinted
        _say(bar, f"{f'epoch {last}' if first == last else f'epochs {first}-{last}'} done at step "
                  f"{progress.unprinted_step:,}: mean train loss {mean:.4f}")
        progress.unprinted_loss, progress.epochs_unprinted = [0.0, 0], 0
        self.printed_at = time.perf_counter()

    def add(self, loss: torch.Tensor) -> None:
        self.sum += loss
        self.steps += 1

    def fold(self, progress: Progress, world: int) -> None:
        """Into progress.epoch_loss, which state.json keeps for resume; under DDP the mean over ranks."""
        progress.epoch_loss = [progress.epoch_loss[0] + _rank_mean(self.sum, world).item(),
                               progress.epoch_loss[1] + self.steps]
        self.sum.zero_()
        self.steps = 0

    def finish(self, progress: Progress, epochs: int, world: int) -> None:
        """This step ended `epochs` epochs (several on a short text): their loss awaits its line, and the loss
        read from here on is the next epoch's (a run that ends mid-epoch leaves it out of that line)."""
        self.fold(progress, world)
        progress.unprinted_loss = [a + b for a, b in zip(progress.unprinted_loss, progress.epoch_loss, strict=True)]
        progress.epoch_loss = [0.0, 0]
        progress.epochs_unprinted += epochs
        progress.unprinted_step = progress.step


def _count(steps: float) -> str:
    """Steps per epoch as a user reads them: 2,641, but 1.3 (not 1) for a text that fills few steps."""
    return f"{steps:,.0f}" if steps >= 100 else f"{steps:.1f}"


def epoch_of(step: int, steps_per_epoch: float) -> int:
    """The epoch (1-based) that a step (1-based) begins in; the last step's is the run's count of epochs (--epochs
    3 at 10.46 steps an epoch is 32 steps, the last of them in epoch 3: the bar said "epoch 3/4")."""
    return int((step - 1) // steps_per_epoch) + 1


def _rank_mean(t: torch.Tensor, world: int) -> torch.Tensor:
    """t's mean over the ranks (a copy; t itself outside torchrun): every rank calls it at the same step."""
    if world > 1:
        t = t.clone()
        dist.all_reduce(t)
        t /= world
    return t


def _track_epochs_and_target(cfg: TrainConfig, progress: Progress, loss: torch.Tensor, epoch_loss: EpochLoss,
                             steps_per_epoch: float, total: int | None, bar: tqdm, world: int) -> None:
    """Epoch bookkeeping for the bar and the log, and the --target-loss check.

    With a target the loss is read every step (one host sync; under DDP the mean over ranks, so all ranks
    agree); without one, only at an epoch's end."""
    epoch = epoch_of(progress.step, steps_per_epoch)
    epochs = epoch_of(total, steps_per_epoch) if total else "?"
    bar.set_description_str(f"epoch {epoch}/{epochs} ({_count(steps_per_epoch)} steps each)", refresh=False)
    epoch_loss.add(loss)
    finished = epoch_of(progress.step + 1, steps_per_epoch) - epoch  # epochs this step ended (several: a short text)
    if finished:
        epoch_loss.finish(progress, finished, world)
        if time.perf_counter() - epoch_loss.printed_at >= EPOCH_LINE_INTERVAL_S:
            epoch_loss.print_line(progress, steps_per_epoch, bar)
    if cfg.target_loss is None:
        return
    progress.recent_losses = (progress.recent_losses + [_rank_mean(loss, world).item()])[-LOSS_WINDOW:]
    window = _window_mean(progress)
    if len(progress.recent_losses) == LOSS_WINDOW and window < cfg.target_loss and progress.target_reached is None:
        progress.target_reached = {"step": progress.step, "epoch": round(progress.step / steps_per_epoch, 3),
                                   "tokens_seen": progress.tokens_seen, "wall_time_s": round(progress.elapsed_s, 1),
                                   "window_loss": window}
        _say(bar, f"target train loss {cfg.target_loss} reached at step {progress.step:,} (epoch "
                  f"{progress.target_reached['epoch']}, {progress.tokens_seen:,} tokens, "
                  f"{progress.elapsed_s:.1f} s): mean of the last {LOSS_WINDOW} steps {window:.4f}")


def _say(bar: tqdm, text: str) -> None:
    """A line above the bar on stderr (stdout is for the summary), from rank 0 only (tqdm.write prints even for a
    disabled bar)."""
    if not bar.disable:
        bar.write(text, file=sys.stderr)


def _stopped_by(cfg: TrainConfig, progress: Progress, total: int | None) -> str:
    if progress.target_reached is not None:
        return "target_loss"
    if total is not None and progress.step >= total:
        return "epochs" if cfg.steps is None or total < cfg.steps else "steps"
    return "minutes"


def optimizer_step(model: torch.nn.Module, optimizer: Optimizer,
                   batches: list[tuple[torch.Tensor, torch.Tensor]], *, device: torch.device,
                   autocast: contextlib.AbstractContextManager, grad_clip: float) -> torch.Tensor:
    """One optimizer step over gradient-accumulation micro-batches; returns their summed loss (detached).

    Under DDP, gradients are all-reduced only on the last micro-batch.
    """
    total = torch.zeros((), device=device)
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    for i, (x, y) in enumerate(batches):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        sync = not ddp or i == len(batches) - 1
        with (contextlib.nullcontext() if sync else model.no_sync()), autocast:
            _, loss = model(x, y)
        (loss / len(batches)).backward()
        total += loss.detach()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


class RegionalCompile(nn.Module):
    """The training forward with torch.compile by region: each block on its own (the blocks are alike, so the
    first compiles and the others reuse it) and the head with the loss (fused, they made CPU steps 1.7-2x
    faster). On 2 cores, compile caches off, the first step (compiling) took 13.8-14.4 s instead of 25.1 s
    for the whole gpt2 preset at batch 1 x 512 (13.2 instead of 20.0 s for `small` at 8 x 256), later steps
    the same (1.03-1.06 vs 1.02-1.03 s; 0.89 vs 0.91 s). On an H200 at 16 x 1024 too (38.1 vs 37.2 ms, 14.5 vs
    24.5 s to compile), but at 8 x 1024 launching the regions bound the step (32.8 vs 22.8 ms): a GPU wants
    batches that keep it busy (README). `model` itself stays eager: evaluation and generation use it."""

    def __init__(self, model: GPT) -> None:
        super().__init__()
        self.model = model
        self.blocks = [torch.compile(block) for block in model.transformer.h]  # a list: the model holds the weights
        self.head = torch.compile(model.head)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.model.embed(idx, torch.arange(idx.size(1), device=idx.device))
        return self.head(self.model.run_blocks(x, self.blocks), targets)


def use_compile(cfg: TrainConfig, device: torch.device) -> bool:
    """'auto' compiles on CUDA, and on CPU when a micro-batch has >= 512 tokens: there the fused loss and
    head made steps 1.7-2x faster; smaller batches are optimizer-bound and gained nothing (README)."""
    if cfg.compile != "auto":
        return cfg.compile == "on"
    return device.type == "cuda" or (device.type == "cpu" and cfg.batch_size * cfg.block_size >= 512)


def _should_stop(cfg: TrainConfig, progress: Progress, total: int | None, ctrl_c: bool = False) -> tuple[bool, bool]:
    """(budget spent, Ctrl-C pressed), the same on every rank: a Ctrl-C may reach one rank only, or each at a
    different step. Under DDP the ranks' clocks differ too: each takes the slowest's elapsed time (and first
    step), so that with --minutes they also agree on the learning rate, which is set from the time."""
    if dist.is_initialized():
        flags = torch.tensor([float(ctrl_c), progress.elapsed_s, progress.first_step_s], dtype=torch.float64)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        ctrl_c, progress.elapsed_s, progress.first_step_s = bool(flags[0]), flags[1].item(), flags[2].item()
    done = progress.target_reached is not None or (total is not None and progress.step >= total)
    return done or (cfg.minutes is not None and progress.elapsed_s >= cfg.minutes * 60), ctrl_c


def _postfix(train_loss: float, val: float | None, rate: float, cfg: TrainConfig, progress: Progress) -> str:
    parts = [f"loss {train_loss:.3f}", f"val {val:.3f}" if val is not None else "val -", f"{rate:,.0f} tok/s"]
    if cfg.minutes is not None:
        left = max(0.0, cfg.minutes * 60 - progress.elapsed_s)
        parts.append(f"{int(left // 60)}:{int(left % 60):02d} left")
    return ", ".join(parts)


def _metrics_row(progress: Progress, epoch_tokens: int, lr: float, train_loss: float) -> dict:
    """A metrics.jsonl line's common part: where the run is, and its mean train loss since the line before."""
    return {"step": progress.step, "tokens_seen": progress.tokens_seen, "elapsed_s": round(progress.elapsed_s, 2),
            "epoch": round(progress.tokens_seen / epoch_tokens, 3), "lr": lr, "train_loss": train_loss}


def _eval_and_save(cfg: TrainConfig, run: RunDir, model: GPT, optimizer: Optimizer, corpus: Corpus,
                   progress: Progress, train_row: dict, data_rng: np.random.Generator,
                   device: torch.device, autocast, rank: int, world: int, ema: AveragedModel | None
                   ) -> tuple[float | None, str | None]:
    """The val loss (None with --val-fraction 0), and on rank 0 the model's sample (None without --sample-tokens).
    train_row: the eval line's _metrics_row()."""
    average = None if ema is None else ema.module
    judged = model if average is None else average  # --ema: the average is the model evaluated and saved
    model.share_rows()  # --trim-vocab's: the weights are whole for evaluation and saving
    if average is not None:
        average.share_rows()
    result = None if not len(corpus.val) else evaluate(
        judged, corpus.val, corpus.val_chars, block_size=cfg.block_size, batch_size=cfg.eval_batch_size,
        device=device, autocast=autocast, progress=rank == 0)
    _stop_if_diverged(run, cfg, progress, world, train_loss=train_row["train_loss"],
                      **({"val_loss": result.nats_per_token} if result is not None else {}))
    improved = result is not None and result.nats_per_token < progress.best_val
    keep = improved or result is None or cfg.target_loss is not None  # fitting the text: the latest is the model
    if improved:
        progress.best_val, progress.best_step = result.nats_per_token, progress.step
    rngs = _gather({"data": data_rng.bit_generator.state, "torch": _rng_bytes(torch.get_rng_state()),
                    # the run's own GPU's generator (dropout's masks), not the current one's (cuda:0's for cuda:1)
                    "cuda": _rng_bytes(torch.cuda.get_rng_state(device)) if device.type == "cuda" else None,
                    "mps": _rng_bytes(torch.mps.get_rng_state()) if device.type == "mps" else None})
    sample = None

    def save() -> None:
        nonlocal sample
        sample = _sample(judged, cfg) if cfg.sample_tokens else None
        if result is not None:  # an eval's line is its val loss's (metrics.jsonl's readers tell them by it)
            row = {**train_row, **result.as_dict()}
            if sample is not None:
                row["sample"] = sample
            if progress.recent_losses:
                row["window_loss"] = _window_mean(progress)
            if progress.target_reached is not None:
                row["target_reached"] = progress.target_reached
            run.log_metrics(row)
        state = {"train_config": dataclasses.asdict(cfg), "progress": dataclasses.asdict(progress),
                 "world_size": world, "rng": rngs, "corpus_sha256": corpus.sha256}
        metrics = run.metrics()
        try:
            if keep:
                checkpoint.save_model(run.path / MODEL, *_as_trained(judged, cfg),
                                      training=_provenance(cfg, corpus, progress, result, metrics))
            run.save_state(model, optimizer, state, average)
            plot_losses(metrics, run.path / "loss.png")
        except OSError as e:  # a full disk or a directory gone read-only: every write is atomic, so stop cleanly
            raise _write_error(run.path, e) from None

    _on_rank_0(rank, world, save)  # and the other ranks wait for it
    return (None if result is None else result.nats_per_token), sample


def _on_rank_0(rank: int, world: int, work: Callable[[], object]) -> None:
    """Rank 0's own work on the run's folder (checks, writes, the sample), which the others wait for."""
    _on_every_rank(rank, world, work if rank == 0 else lambda: None)


def _on_every_rank(rank: int, world: int, work: Callable[[], T]) -> T:
    """work(), then, under DDP, every rank learns whether it failed on any, and stops with it. A rank that failed
    alone used to leave the others waiting in their next collective for a process that had gone; they then
    printed gloo's "Connection closed by peer" traceback, and the reason was lost (the CLI prints rank 0's
    errors only): rank 0 now raises the first failed rank's message."""
    error = result = None
    try:
        result = work()
    except Exception as e:  # not only GptgenError: an OSError, a bug, must not leave the others waiting either
        error = e
    if not _on_any_rank(error is not None, world):
        return result
    messages = _gather(None if error is None else str(error) or type(error).__name__)
    if rank == 0 and error is None:
        failed = next(k for k, message in enumerate(messages) if message is not None)
        raise GptgenError(f"process {failed} of {world} stopped the run: {messages[failed]}")
    raise error or GptgenError("another process stopped the run; rank 0 says why")


def _on_any_rank(true: bool, world: int) -> bool:
    """Whether `true` holds on any rank (a collective under DDP: every rank calls it at the same point)."""
    if world == 1:
        return true
    flag = torch.tensor(float(true))
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _stop_if_diverged(run: RunDir, cfg: TrainConfig, progress: Progress, world: int, **losses: float) -> None:
    """Stops a run whose loss is no longer a number (NaN or inf: a learning rate too high, mostly) before it logs,
    samples or saves it, so its files keep their last save. Under DDP every rank stops at the same step."""
    # a rank's own loss may be the one that is not a number
    if _on_any_rank(not all(map(math.isfinite, losses.values())), world):
        saved = run.state()
        kept = (f"the run's files keep step {saved['progress']['step']:,}, its last save" if saved
                else "nothing was saved")
        figures = ", ".join(f"{name.replace('_', ' ')} {value:.4g}" for name, value in losses.items())
        raise GptgenError(f"training diverged at step {progress.step:,} ({figures}); {kept}. Start again with a lower "
                          f"--lr (this run's is {cfg.lr:g}) or a longer --warmup-steps")


def _sample(model: GPT, cfg: TrainConfig) -> str:
    """The model's continuation of --sample-prompt, with the run's seed at every eval (two evals' samples differ
    by the weights alone), within the training window (positions past it are untrained)."""
    text_model = TextModel(model, {})
    room = cfg.block_size - max(1, len(text_model.tokenizer.encode_ordinary(cfg.sample_prompt)))
    was_training = model.training
    model.eval()
    try:
        return text_model.generate(cfg.sample_prompt, max_new_tokens=max(1, min(cfg.sample_tokens, room)),
                                   seed=cfg.seed)
    finally:
        model.train(was_training)


def _as_trained(model: GPT, cfg: TrainConfig) -> tuple[dict[str, torch.Tensor], GPTConfig]:
    """The model file's weights and config, its context the --block-size it was trained at: trained from scratch,
    the positions past it never were (their embeddings stay random), and generating there cost 0.4-0.7 nats a
    token (measured on the bundled model). A fine-tuned model keeps its pretrained positions."""
    state = model.state_dict()
    if cfg.init or cfg.block_size == model.config.block_size:
        return state, model.config
    state["transformer.wpe.weight"] = state["transformer.wpe.weight"][:cfg.block_size]
    return state, dataclasses.replace(model.config, block_size=cfg.block_size)


def _model_name(cfg: TrainConfig) -> str:
    return f"from {cfg.init}" if cfg.init else cfg.preset


def _provenance(cfg: TrainConfig, corpus: Corpus, progress: Progress, result: EvalResult | None,
                metrics: list[dict]) -> dict:
    """What the model file says of its making; `curve` is [step, train loss, val loss] per eval (the page plots it)."""
    return {"corpus": os.path.basename(cfg.data), "corpus_sha256": corpus.sha256, "corpus_bytes": corpus.size_bytes,
            "preset": _model_name(cfg), "steps": progress.step, "tokens_seen": progress.tokens_seen,
            "wall_time_s": round(progress.elapsed_s, 1), "date": datetime.datetime.now(datetime.UTC).isoformat(
                timespec="seconds"), "val_fraction": cfg.val_fraction,
            **(result.as_dict() if result is not None else {}),
            "recipe": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_RECIPE},
            "target_loss": cfg.target_loss, "target_reached": progress.target_reached,
            "curve": [[m["step"], round(m["train_loss"], 4), round(m["val_nats_per_token"], 4)] for m in metrics
                      if "val_nats_per_token" in m]}


def _load_weights(model: GPT, path: Path) -> None:
    _, weights, _ = checkpoint.load_model_file(path)
    weights[checkpoint.TIED] = weights["transformer.wte.weight"]
    model.load_state_dict(weights)


def _restore(run: RunDir, state: dict, model: GPT, optimizer: Optimizer, data_rng: np.random.Generator,
             rank: int, world: int, device: torch.device, ema: AveragedModel | None) -> Progress:
    if state["world_size"] != world:
        raise ConfigError(f"the run was saved with {state['world_size']} processes; resume it with the same number")
    _load_weights(model, run.path / state["weights"])
    if ema is not None:
        _load_weights(ema.module, run.path / state["ema"])
        ema.n_averaged.fill_(state["progress"]["step"])  # its updates so far (0 would restart it from the weights)
    checkpoint.load_optimizer(run.path / state["optimizer"], optimizer)
    rng = state["rng"][rank]
    data_rng.bit_generator.state = rng["data"]
    torch.set_rng_state(_rng_tensor(rng["torch"]))
    if rng["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(_rng_tensor(rng["cuda"]), device)
    if rng.get("mps") is not None and device.type == "mps":  # absent from the state an earlier gptgen saved
        torch.mps.set_rng_state(_rng_tensor(rng["mps"]))
    return Progress(**state["progress"])
