import ast
import dataclasses
import importlib.metadata
import math
import re
import shutil
import subprocess
import sys

import pytest

from gptgen.config import PRESETS, ConfigError, GPTConfig, TrainConfig
from tests.conftest import ROOT


def test_gpt2_preset_is_the_reference_shape():
    c = GPTConfig.from_name("gpt2")
    assert (c.n_layer, c.n_head, c.n_embd, c.block_size, c.vocab_size) == (12, 12, 768, 1024, 50257)


def test_overrides_and_json_round_trip():
    c = GPTConfig.from_name("tiny", dropout=0.1)
    assert c.dropout == 0.1 and c.n_embd == PRESETS["tiny"].n_embd
    assert GPTConfig.from_json(c.to_json()) == c


@pytest.mark.parametrize("bad", [dict(n_embd=100, n_head=3), dict(n_layer=0), dict(dropout=1.0), dict(dropout=-0.1),
                                 dict(n_layer=2.5)])
def test_invalid_model_config(bad):
    with pytest.raises(ConfigError):
        GPTConfig(**bad)


def test_a_model_config_with_unknown_fields_is_refused_by_name():
    """A model file from a newer version or another tool must fail with a clear error, not a TypeError."""
    with pytest.raises(ConfigError, match="rope"):
        GPTConfig.from_json('{"n_layer": 2, "rope": true}')


def test_unknown_preset_names_the_choices():
    with pytest.raises(ConfigError, match="gpt2"):
        GPTConfig.from_name("gpt5")


@pytest.mark.parametrize("change, message", [
    (dict(lr=0), "--lr"), (dict(lr=-1e-3), "--lr"), (dict(steps=0), "--steps"), (dict(minutes=-1), "--minutes"),
    (dict(steps=None), "budget"), (dict(block_size=2048), "context"), (dict(batch_size=0), "--batch-size"),
    (dict(val_fraction=1.0), "--val-fraction"), (dict(val_fraction=-0.1), "--val-fraction must be at least 0"),
    (dict(dtype="fp8"), "--dtype"), (dict(windows="all"), "--windows"),
    (dict(minutes=math.inf), "--minutes must be a finite"), (dict(lr=math.nan), "--lr must be a finite"),
    (dict(epochs=math.inf), "--epochs"), (dict(beta1=2.0), "--beta1"), (dict(beta2=1.0), "--beta2"),
    (dict(weight_decay=-1.0), "--weight-decay"), (dict(seed=-1), "--seed"), (dict(dropout=1.5), "--dropout"),
    (dict(min_lr=2e-3), "--min-lr"), (dict(decay_steps=0), "--decay-steps"), (dict(warmup_steps=-1), "--warmup-steps"),
    (dict(target_loss=0.0), "--target-loss"), (dict(grad_clip=-1.0), "--grad-clip"), (dict(epochs=0.0), "--epochs"),
    (dict(epochs=1e308), "--epochs must be positive and at most 1e9"),  # an overflow in the step count
    (dict(minutes=1e307), "--minutes must be positive and at most 1e7"),  # ... in the time left
    (dict(block_size=0), "--block-size"), (dict(compile="yes"), "--compile"),
    (dict(eval_interval=0), "--eval-interval"), (dict(sample_tokens=-1), "--sample-tokens"),
    (dict(trim_vocab=True, init="gpt2"), "--trim-vocab"),
    (dict(ema=1.0), "--ema"), (dict(ema=-0.5), "--ema"), (dict(optimizer="sgd"), "--optimizer"),
    (dict(sample_prompt="a" * 100_001), "--sample-prompt: prompt is 100,001 characters"),  # was found at step 250
])
def test_train_config_validation(change, message):
    cfg = dataclasses.replace(TrainConfig(steps=10), **change)
    with pytest.raises(ConfigError, match=message):
        cfg.validate(GPTConfig.from_name("gpt2"))


@pytest.mark.parametrize("change, message", [
    (dict(block_size=0), "--block-size must be at least 1, got 0"),  # was an AttributeError on the missing model
    (dict(block_size=-5), "--block-size must be at least 1, got -5"), (dict(lr=0), "--lr"),
])
def test_train_config_validation_before_the_model_is_known(change, message):
    """train checks its flags before --init downloads the model that the context check needs."""
    cfg = dataclasses.replace(TrainConfig(steps=10), **change)
    with pytest.raises(ConfigError, match=message):
        cfg.validate(None)
    TrainConfig(steps=10, block_size=4096).validate(None)  # the context is checked once the model is known


def test_muon_on_a_torch_without_it_is_a_clear_error(monkeypatch):
    """gptgen takes torch >= 2.4; Muon came in 2.9 (an AttributeError before)."""
    import torch

    monkeypatch.delattr(torch.optim, "Muon")
    with pytest.raises(ConfigError, match="--optimizer muon needs PyTorch 2.9 or newer"):
        TrainConfig(steps=10, optimizer="muon").validate(None)


def test_an_installed_wheel_carries_the_bundled_model_and_serves_it(tmp_path):
    """`pip install .` (not -e) must work offline as a clone does: the model and tokenizer travel in the wheel."""
    src = tmp_path / "src"
    shutil.copytree(ROOT / "gptgen", src / "gptgen", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "models", src / "models")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src)
    pip = [sys.executable, "-m", "pip", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "wheel", src], check=True)
    wheel = next((tmp_path / "wheel").glob("gptgen-*.whl"))
    subprocess.run([*pip, "install", "--no-deps", "--target", tmp_path / "site", wheel], check=True)
    shutil.rmtree(src)  # nothing may come from the source tree

    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path / "site"), "HOME": str(tmp_path)}
    show = "import gptgen.config as c; print(c.__file__); print(c.BUNDLED_MODELS)"
    where = subprocess.run([sys.executable, "-c", show], capture_output=True, text=True, cwd=tmp_path, env=env,
                           check=True).stdout.split()
    assert where == [str(tmp_path / "site/gptgen/config.py"), str(tmp_path / "site/gptgen/models")]
    out = subprocess.run([sys.executable, "-m", "gptgen", "generate", "shakespeare-mini-int8", "ROMEO:",
                          "--max-new-tokens", "8", "--json"],
                         capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    assert '"new_tokens": 8' in out.stdout


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _undeclared(paths: list, extras: set[str]) -> dict[str, list[str] | None]:
    """The third-party modules these files import whose distributions gptgen's metadata does not require (its
    plain dependencies, and those of the extras named)."""
    imported = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
    local = {"gptgen", "tests", "__future__", *(p.stem for p in paths)}  # benchmarks import each other
    third_party = imported - set(sys.stdlib_module_names) - local
    assert {"torch", "numpy"} <= third_party  # the scan sees the imports
    declared = set()
    for requirement in importlib.metadata.requires("gptgen"):
        extra = re.search(r"extra == [\"']([^\"']+)", requirement)
        if extra is None or extra.group(1) in extras:
            declared.add(_canonical(re.match(r"[A-Za-z0-9_.-]+", requirement).group()))
    distributions = importlib.metadata.packages_distributions()
    return {m: distributions.get(m) for m in sorted(third_party)
            if not {_canonical(d) for d in distributions.get(m, [m])} & declared}


def test_every_library_imported_is_a_declared_dependency():
    """Not one that merely arrives with another (fastapi and huggingface_hub come with gradio today): a release
    of gradio that dropped one would break a fresh install of gptgen, far from any change of ours."""
    assert _undeclared([*(ROOT / "gptgen").rglob("*.py"), ROOT / "app.py"], set()) == {}
    assert _undeclared([*(ROOT / "tests").glob("*.py"), *(ROOT / "benchmarks").glob("*.py")], {"test"}) == {}
