import contextlib

import pytest
import torch

from gptgen.config import ConfigError
from gptgen.device import allow_tf32, autocast_for, pick_device, use_bf16


def test_auto_prefers_cuda_then_mps_then_cpu():
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert pick_device("auto").type == expected
    assert pick_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("name", ["tpu", "cuda:x"])
def test_unknown_device_is_a_clear_error(name):
    with pytest.raises(ConfigError, match="device"):
        pick_device(name)


def test_auto_takes_this_processs_gpu_under_torchrun(monkeypatch):
    """Each torchrun worker must train on its own GPU (LOCAL_RANK), not all on GPU 0."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert pick_device("auto") == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert pick_device("auto") == torch.device("cuda", 1)


@pytest.mark.parametrize("name, message", [("cuda", "no CUDA GPU"), ("cuda:1", "no CUDA GPU"), ("mps", "MPS")])
def test_a_device_that_is_not_there_is_a_clear_error(monkeypatch, name, message):
    """--device cuda on a machine without one must say so up front, not fail deep inside torch."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=message):
        pick_device(name)


@pytest.mark.parametrize("native", [True, False])
def test_auto_dtype_autocasts_bf16_on_cuda_and_on_cpus_with_native_bf16(monkeypatch, native):
    """--dtype auto must pick bf16 where it is fast (CUDA, AVX512-BF16/AMX CPUs) and fp32 elsewhere."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert use_bf16(torch.device("cuda"), "auto")
    assert use_bf16(torch.device("cpu"), "auto") == native
    assert not use_bf16(torch.device("mps"), "auto")
    assert not use_bf16(torch.device("cuda"), "float32")


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
