import contextlib
import subprocess
import sys

import pytest
import torch

from gptgen.config import ConfigError
from gptgen.device import allow_tf32, autocast_for, pick_device, use_bf16


@pytest.mark.parametrize("cuda, mps, expected", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_auto_prefers_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert pick_device("auto").type == expected
    assert pick_device("cpu") == torch.device("cpu")


# torch knows meta and xpu (tracebacks, later), and meets None with a TypeError of its own
@pytest.mark.parametrize("name", ["tpu", "cuda:x", "meta", "xpu", None])
def test_unknown_device_is_a_clear_error(name):
    with pytest.raises(ConfigError, match=f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps"):
        pick_device(name)


def test_a_gpu_index_beyond_the_machines_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match=r"device 'cuda:2': this machine has 2 CUDA GPU\(s\), cuda:0 to cuda:1"):
        pick_device("cuda:2")


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


@pytest.mark.parametrize("faster", [True, False])
def test_auto_dtype_autocasts_bf16_on_cuda_and_on_cpus_where_it_measures_faster(monkeypatch, faster):
    """--dtype auto must pick bf16 where it is fast (CUDA, CPUs whose bf16 products time faster) and fp32 elsewhere."""
    import gptgen.device

    monkeypatch.setattr(gptgen.device, "cpu_bf16_is_faster", lambda: faster)
    assert use_bf16(torch.device("cuda"), "auto")
    assert use_bf16(torch.device("cpu"), "auto") == faster
    assert not use_bf16(torch.device("mps"), "auto")
    assert not use_bf16(torch.device("cuda"), "float32")


@pytest.mark.parametrize("native, bf16_ms, expected", [
    (False, 1.0, False),  # no bf16 instructions: not even timed
    (True, 4.0, False),  # an Intel Xeon with AVX512-BF16 and no AMX: twice as slow
    (True, 1.0, True),  # an AMD EPYC (Zen 4): faster
    (True, 1.9, False),  # 5% faster: float32, the reference precision, stays
])
def test_a_cpus_bf16_is_used_when_its_products_time_10_percent_faster(monkeypatch, native, bf16_ms, expected):
    import gptgen.device as device

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    clock, calls = [0.0], []

    def linear(x, w):  # a float32 product takes 2 ms; the first of each kind 100 ms more (a warm-up, not counted)
        bf16 = torch.is_autocast_enabled("cpu")
        clock[0] += (bf16_ms if bf16 else 2.0) / 1000 + 0.1 * (bf16 not in calls)
        calls.append(bf16)

    monkeypatch.setattr(device.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(device.F, "linear", linear)
    device.cpu_bf16_is_faster.cache_clear()
    rng = torch.get_rng_state()
    try:
        assert device.cpu_bf16_is_faster() is expected
        assert device.cpu_bf16_is_faster() is expected
    finally:
        device.cpu_bf16_is_faster.cache_clear()
    assert len(calls) == (8 if native else 0)  # timed once per process
    assert torch.equal(torch.get_rng_state(), rng)  # a resumed run's dropout masks come next from it


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


def test_a_training_process_that_keeps_freed_memory_stops_faulting_it_in_every_step():
    """Each step frees and allocates again the same big buffers (gradients, bf16 copies of the weights); glibc by
    default hands them back to the OS and the next step faults every page in again. In a process of its own:
    malloc's settings are process-wide. The `mini` preset's 51 MB embedding is over glibc's 32 MB mmap cut."""
    script = """
import resource, sys, torch
from gptgen.config import GPTConfig, TrainConfig
from gptgen.device import autocast_for, keep_freed_memory
from gptgen.model import GPT
from gptgen.optim import make_optimizer
from gptgen.train import optimizer_step
kept = sys.argv[1] == "keep" and keep_freed_memory()
torch.manual_seed(0)
model, cpu = GPT(GPTConfig.from_name("mini")), torch.device("cpu")
model.init_weights()
optimizer = make_optimizer(model, TrainConfig(batch_size=2, block_size=16), cpu)
x = torch.randint(0, 50257, (2, 16))
faults = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    optimizer_step(model, optimizer, [(x, x)], device=cpu, autocast=autocast_for(cpu, "auto"), grad_clip=1.0)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(kept, *faults[2:])  # the first two steps allocate what later ones reuse
"""
    runs = {}
    for mode in ("default", "keep"):
        out = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, check=True)
        kept, *faults = out.stdout.split()
        runs[mode] = (kept, [int(f) for f in faults])
    assert runs["default"][0] == "False" and min(runs["default"][1]) > 10_000, runs  # 51 MB is 12,500 pages
    # mostly none: now and then a buffer lands where the freed one does not fit (alignment) and faults in once
    assert runs["keep"][0] == "True" and sum(runs["keep"][1]) < sum(runs["default"][1]) / 4, runs
