import dataclasses
import math

import pytest

from gptgen.config import PRESETS, ConfigError, GPTConfig, TrainConfig


def test_gpt2_preset_is_the_reference_shape():
    c = GPTConfig.from_name("gpt2")
    assert (c.n_layer, c.n_head, c.n_embd, c.block_size, c.vocab_size) == (12, 12, 768, 1024, 50257)


def test_overrides_and_json_round_trip():
    c = GPTConfig.from_name("tiny", dropout=0.1)
    assert c.dropout == 0.1 and c.n_embd == PRESETS["tiny"].n_embd
    assert GPTConfig.from_json(c.to_json()) == c


@pytest.mark.parametrize("bad", [dict(n_embd=100, n_head=3), dict(n_layer=0), dict(dropout=1.0)])
def test_invalid_model_config(bad):
    with pytest.raises(ConfigError):
        GPTConfig(**bad)


def test_unknown_preset_names_the_choices():
    with pytest.raises(ConfigError, match="gpt2"):
        GPTConfig.from_name("gpt5")


@pytest.mark.parametrize("change, message", [
    (dict(lr=0), "--lr"), (dict(lr=-1e-3), "--lr"), (dict(steps=0), "--steps"), (dict(minutes=-1), "--minutes"),
    (dict(steps=None), "budget"), (dict(block_size=2048), "context"), (dict(batch_size=0), "--batch-size"),
    (dict(val_fraction=1.0), "--val-fraction"), (dict(dtype="fp8"), "--dtype"), (dict(windows="all"), "--windows"),
    (dict(minutes=math.inf), "--minutes must be a finite"), (dict(lr=math.nan), "--lr must be a finite"),
    (dict(epochs=math.inf), "--epochs"), (dict(beta1=2.0), "--beta1"), (dict(beta2=1.0), "--beta2"),
    (dict(weight_decay=-1.0), "--weight-decay"), (dict(seed=-1), "--seed"), (dict(dropout=1.5), "--dropout"),
])
def test_train_config_validation(change, message):
    cfg = dataclasses.replace(TrainConfig(steps=10), **change)
    with pytest.raises(ConfigError, match=message):
        cfg.validate(GPTConfig.from_name("gpt2"))
