"""Typed configuration: the model's shape (travels inside every model file) and a training run's knobs."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path


class GptgenError(ValueError):
    """Something the user gave (a flag, a file) cannot be used; the message says what and what to do."""


class ConfigError(GptgenError):
    """A configuration value is invalid."""


@dataclass(frozen=True)
class GPTConfig:
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024  # context length: positions the model has embeddings for
    vocab_size: int = 50257
    dropout: float = 0.0
    bias: bool = True

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_name(cls, name: str, **overrides) -> GPTConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> GPTConfig:
        fields = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(fields) - known
        if unknown:
            raise ConfigError(f"unknown model config fields: {sorted(unknown)}")
        return cls(**fields)


# The CPU presets keep GPT-2's tokenizer and shape rules; sizes were chosen with
# benchmarks/quality.py (val nats/char reached per minute on 2 cores, see README).
PRESETS: dict[str, GPTConfig] = {
    "gpt2": GPTConfig(),
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024),
    "small": GPTConfig(n_layer=6, n_head=6, n_embd=384, block_size=256),
    "mini": GPTConfig(n_layer=4, n_head=4, n_embd=256, block_size=256),
    "tiny": GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=256),
}


DEVICE_HELP = "auto (CUDA, then Apple MPS, then CPU), cpu, cuda, cuda:N or mps"
LENGTH_BUDGET = ("steps", "minutes", "epochs")  # how long a run goes; each counts from its start, not a resume
LOG_INTERVAL = 10  # steps between train-loss lines in metrics.jsonl (and progress bar updates)
LOSS_WINDOW = 50  # --target-loss compares the mean train loss of this many latest steps
# a run's saved state, NAME-STEP.safetensors: its weights, optimizer, --ema average (resume state, not models to offer)
STEP_FILES = tuple(f"{name}-*.safetensors" for name in ("last", "optim", "ema"))


def _knob(default, text: str):
    """A training knob's default and the one line that `gptgen train --help` shows for it."""
    return dataclasses.field(default=default, metadata={"help": text})


@dataclass
class TrainConfig:
    """One training run. Budgets are upper bounds: training stops at the first one reached."""

    data: str = ""
    out: str = ""
    preset: str = "small"
    init: str | None = _knob(None, "start from a transformers GPT-2 (a directory, a Hub id, or gpt2: OpenAI's) "
                                   "instead of a preset")
    batch_size: int = _knob(16, "sequences per micro-batch")
    block_size: int | None = _knob(None, "tokens per training window (default: the model's context)")
    grad_accum: int = _knob(1, "micro-batches per optimizer step")
    lr: float = _knob(1e-3, "peak learning rate, reached after the warmup")
    min_lr: float | None = _knob(None, "learning rate at the end of the cosine (default: --lr / 10)")
    warmup_steps: int | None = _knob(None, "linear warmup steps (default: 5% of the schedule, at most 200; 100 "
                                           "with only --minutes, and at most a quarter of its time)")
    decay_steps: int | None = _knob(None, "cosine horizon in steps, apart from the budget, so that a run resumed "
                                          "with more steps keeps its schedule (default: the --steps/--epochs "
                                          "budget; with --minutes the cosine also ends when the time does, "
                                          "whichever comes first)")
    steps: int | None = None
    minutes: float | None = None
    epochs: float | None = _knob(None, "stop after this many passes over the train split (counted in tokens)")
    target_loss: float | None = _knob(None, f"stop once the mean train loss of the last {LOSS_WINDOW} steps is below "
                                            "this")
    optimizer: str = _knob("adamw", "adamw, or muon: Muon for the blocks' weight matrices (AdamW for the rest), "
                                    "the same --lr and --weight-decay")
    weight_decay: float = _knob(0.1, "weight decay, on matrices only (not biases or norms)")
    beta1: float = _knob(0.9, "AdamW beta1")
    beta2: float = _knob(0.95, "AdamW beta2")
    grad_clip: float = _knob(1.0, "clip the gradients' global norm to this (0 = off)")
    dropout: float = _knob(0.0, "dropout probability in the model")
    ema: float = _knob(0.0, "evaluate and save an exponential moving average of the weights with this decay a "
                            "step (0 = off; 0.99 averages ~100 steps): a better model from a run stopped early")
    seed: int = _knob(1337, "seed of the initial weights and the data order")
    val_fraction: float = _knob(0.1, "the text's last fraction, held out for the eval loss (0: the whole text "
                                     "trains; evals then only save)")
    eval_interval: int = _knob(250, "evaluate on the val split and save every N steps")
    eval_batch_size: int = _knob(8, "sequences per evaluation batch")
    sample_tokens: int = _knob(48, "after each eval, print a sample of this many tokens (0 = none; at most the "
                                   "training window)")
    sample_prompt: str = _knob("", "the samples' start (default: a text's start, <|endoftext|>)")
    device: str = _knob("auto", DEVICE_HELP)
    dtype: str = _knob("auto", "auto (bf16 autocast on CUDA, and on a CPU where it measures faster), float32 or "
                                  "bfloat16")
    compile: str = _knob("auto", "torch.compile: auto (on CUDA, and on CPU for micro-batches of >= 512 tokens), "
                                 "on or off")
    trim_vocab: bool = _knob(False, "train the head over the train split's tokens only, the others sharing one "
                                    "embedding: the same loss, steps 1.6x faster for `small` on a small text")
    grad_checkpoint: bool = _knob(False, "recompute activations in backward: long blocks in little memory")
    windows: str = _knob("random", "random: windows start anywhere, drawn with replacement (nanoGPT's); epoch: "
                                   "each epoch's non-overlapping windows once, shuffled")

    def validate(self, model: GPTConfig | None) -> None:
        """Refuses settings that cannot train; with model None, all but the check against the model's context
        (which --init's model gives only once downloaded): a bad flag is refused before that download."""
        positive = {"batch_size": self.batch_size, "grad_accum": self.grad_accum, "eval_interval": self.eval_interval,
                    "eval_batch_size": self.eval_batch_size}
        for name, value in positive.items():
            if value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        for field in dataclasses.fields(self):  # NaN and inf pass the range checks below
            value = getattr(self, field.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"--{field.name.replace('_', '-')} must be a finite number, got {value}")
        if not self.lr > 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}")
        if self.min_lr is not None and not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"--min-lr must be between 0 and --lr, got {self.min_lr}")
        if self.steps is None and self.minutes is None and self.epochs is None:
            raise ConfigError("give a budget: --steps N, --epochs E and/or --minutes M")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"--steps must be at least 1, got {self.steps}")
        # upper limits far past any run, short of the overflow that a time or step count of 1e308 would be
        if self.minutes is not None and not 0 < self.minutes <= 1e7:
            raise ConfigError(f"--minutes must be positive and at most 1e7 (19 years), got {self.minutes}")
        if self.epochs is not None and not 0 < self.epochs <= 1e9:
            raise ConfigError(f"--epochs must be positive and at most 1e9, got {self.epochs}")
        if self.target_loss is not None and not self.target_loss > 0:
            raise ConfigError(f"--target-loss must be positive, got {self.target_loss}")
        if self.trim_vocab and self.init:
            raise ConfigError("--trim-vocab gives the tokens the text lacks one shared embedding: with --init it "
                              "would throw away their pretrained ones")
        if self.decay_steps is not None and self.decay_steps < 1:
            raise ConfigError(f"--decay-steps must be at least 1, got {self.decay_steps}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ConfigError(f"--warmup-steps must be 0 or more, got {self.warmup_steps}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"--val-fraction must be at least 0 (nothing held out) and below 1, got "
                              f"{self.val_fraction}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"--dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.ema < 1.0:
            raise ConfigError(f"--ema must be in [0, 1) (0 = off), got {self.ema}")
        if self.weight_decay < 0:
            raise ConfigError(f"--weight-decay must be 0 or more, got {self.weight_decay}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"--{name} must be in [0, 1), got {getattr(self, name)}")
        if self.sample_tokens < 0:
            raise ConfigError(f"--sample-tokens must be 0 (none) or more, got {self.sample_tokens}")
        if not 0 <= self.seed < 2**63:  # the samples at each eval seed a torch.Generator, which takes no more
            raise ConfigError(f"--seed must be between 0 and 2**63 - 1, got {self.seed}")
        if self.grad_clip < 0:
            raise ConfigError(f"--grad-clip must be 0 (off) or positive, got {self.grad_clip}")
        if self.block_size is not None and self.block_size < 1:
            raise ConfigError(f"--block-size must be at least 1, got {self.block_size}")
        if self.block_size is not None and model is not None and self.block_size > model.block_size:
            raise ConfigError(f"--block-size {self.block_size} is longer than the model's context "
                              f"({model.block_size}); pick a smaller block or a preset with a longer context")
        for name, value, allowed in (("device", self.device, None), ("dtype", self.dtype, DTYPES),
                                     ("compile", self.compile, ("auto", "on", "off")),
                                     ("windows", self.windows, ("random", "epoch")),
                                     ("optimizer", self.optimizer, ("adamw", "muon"))):
            if allowed is not None and value not in allowed:
                raise ConfigError(f"--{name} must be one of {', '.join(allowed)}, got {value!r}")
        if self.sample_tokens:  # here, not at the first eval: a bad one ended the run there with nothing saved
            from gptgen.generate import check_prompt

            try:
                check_prompt(self.sample_prompt)
            except GptgenError as e:
                raise ConfigError(f"--sample-prompt: {e}") from None
        if self.optimizer == "muon":
            import torch

            if not hasattr(torch.optim, "Muon"):
                raise ConfigError(f"--optimizer muon needs PyTorch 2.9 or newer (torch.optim.Muon); this is "
                                  f"{torch.__version__}")


DTYPES = ("auto", "float32", "bfloat16")
_PACKAGE = Path(__file__).resolve().parent
# gptgen/models in an installed wheel; the repo's models/ in a clone, an editable install or a Space.
BUNDLED_MODELS = _PACKAGE / "models" if (_PACKAGE / "models").is_dir() else _PACKAGE.parent / "models"


# OpenAI's GPT-2 checkpoints by the bare names that nanoGPT and transformers users type; the Hub keeps them here
OPENAI_GPT2 = {**{name: f"openai-community/{name}" for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")},
               "distilgpt2": "distilbert/distilgpt2"}


def bundled_names() -> list[str]:
    """The bundled models' names, as the page shows them."""
    return sorted(p.stem for p in BUNDLED_MODELS.glob("*.safetensors"))


def bundled_model(name: str) -> Path | None:
    """The bundled model a bare name (as the page shows it) stands for, unless something here has that name."""
    path = BUNDLED_MODELS / f"{name}.safetensors"
    return path if Path(name).name == name and not Path(name).exists() and path.is_file() else None


def cache_dir() -> Path:
    """gptgen's own cache (texts' token ids, converted transformers models): GPTGEN_CACHE_DIR, else ~/.cache/gptgen."""
    if "GPTGEN_CACHE_DIR" in os.environ:
        return Path(os.environ["GPTGEN_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gptgen"
