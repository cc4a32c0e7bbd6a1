import contextlib

import pytest
import torch

from gptgen.config import ConfigError
from gptgen.device import allow_tf32, autocast_for, pick_device


def test_auto_prefers_cuda_then_mps_then_cpu():
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert pick_device("auto").type == expected
    assert pick_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("name", ["tpu", "cuda:x"])
def test_unknown_device_is_a_clear_error(name):
    with pytest.raises(ConfigError, match="device"):
        pick_device(name)


def test_float32_means_no_autocast():
    assert isinstance(autocast_for(torch.device("cpu"), "float32"), contextlib.nullcontext)
    assert isinstance(autocast_for(torch.device("cpu"), "bfloat16"), torch.autocast)


def test_tf32_is_for_cuda_only():
    before = torch.get_float32_matmul_precision()
    allow_tf32(torch.device("cpu"))  # a CPU run keeps full float32 matmuls
    assert torch.get_float32_matmul_precision() == before == "highest"
