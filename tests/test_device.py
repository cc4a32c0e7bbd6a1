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


def test_generation_weights_are_bf16_on_cuda_and_float32_elsewhere_unless_asked():
    from gptgen.device import inference_dtype

    assert inference_dtype(torch.device("cuda"), "auto") == torch.bfloat16
    assert inference_dtype(torch.device("cpu"), "auto") == torch.float32
    assert inference_dtype(torch.device("cuda"), "float32") == torch.float32
    assert inference_dtype(torch.device("cpu"), "bfloat16") == torch.bfloat16
    with pytest.raises(ConfigError, match="dtype must be one of auto, float32, bfloat16"):
        inference_dtype(torch.device("cpu"), "fp16")
