"""Which device to run on and in which precision (one decision shared by training and inference), and how a
process that trains keeps its memory."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import os
import time

import torch
import torch.nn.functional as F

from gptgen.config import DTYPES, ConfigError

CPU_QUOTA = "/sys/fs/cgroup/cpu.max"  # cgroup v2: "QUOTA PERIOD" (microseconds), or "max PERIOD" for none


def available_cpus() -> int:
    """The cores this process may use: its affinity, capped by its cgroup's CPU quota, which the affinity does not
    show (a container's --cpus, a Space's vCPUs on a bigger host: threads for every host core would spin on 2)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2
    try:
        with open(CPU_QUOTA) as f:
            quota, period = f.read().split()
        return min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError, ZeroDivisionError):  # no cgroup v2 file (not Linux, v1), or "max": no quota
        return cpus


def pick_device(name: str = "auto") -> torch.device:
    """'auto' takes CUDA (this process's local rank under torchrun), then Apple MPS, then the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):  # TypeError: not a string (None, say)
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):  # torch knows more (meta, xpu): not ours to run
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} was asked for but no CUDA GPU is available; use auto or cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s), cuda:0 "
                          f"to cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {name!r} was asked for but Apple MPS is not available; use auto or cpu")
    return device


def use_bf16(device: torch.device, dtype: str) -> bool:
    """'auto' picks bf16 autocast on CUDA, and on a CPU where it measures faster (`cpu_bf16_is_faster`);
    elsewhere fp32."""
    if dtype != "auto":
        return dtype == "bfloat16"
    if device.type == "cuda":
        return True
    return device.type == "cpu" and cpu_bf16_is_faster()


@functools.cache
def cpu_bf16_is_faster() -> bool:
    """Whether this CPU multiplies faster under bf16 autocast than in float32, timed once (~0.1 s): having bf16
    instructions does not say. On an AMD EPYC (Zen 4, AVX512-BF16) a training step was 1.3-1.8x faster in bf16;
    on an Intel Xeon with AVX512-BF16 and no AMX it was 1.7x slower (`benchmarks/train.py`, 2026-11-29), and a
    512 x 768 x 3072 product took 14 ms in bf16 against 7 in float32 (2 threads). bf16 must win by 10%: float32 is the
    reference precision."""
    if not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
        return False
    # a `small` or `gpt2` MLP layer's product, drawn from a generator of its own: a resumed run times this right
    # after restoring the global one, whose next numbers are the run's dropout masks
    generator = torch.Generator().manual_seed(0)
    x, w = torch.randn(512, 768, generator=generator), torch.randn(3072, 768, generator=generator)
    times = {False: [], True: []}
    for _ in range(4):  # alternating, so that a slow moment falls on both; the first of each warms up
        for bf16 in times:
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                F.linear(x, w)
            times[bf16].append(time.perf_counter() - start)
    return min(times[True][1:]) < 0.9 * min(times[False][1:])


def inference_dtype(device: torch.device, dtype: str) -> torch.dtype:
    """A model's float tensors for generation (an int8 model's on CUDA too). 'auto': bf16 on CUDA (half the
    memory, and faster: eager decoding of the gpt2 preset on an H200 measured 284.8 tok/s in bf16, 252.4 in
    fp32; GPT-2's int8 layers took 175 us a token there with bf16 activations); float32 elsewhere, where
    int8 is the fast path and float32 gives the reference numbers."""
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch.bfloat16 if dtype == "bfloat16" else torch.float32


def autocast_for(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    if use_bf16(device, dtype):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def allow_tf32(device: torch.device) -> None:
    """On CUDA, float32 matmuls (all of them with --dtype float32; those outside bf16 autocast otherwise) run on
    tensor cores as TF32, as nanoGPT trains: ~8x the fp32 rate on Ampere and later, 10-bit mantissas."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the OS, in a process that only
    trains or evaluates. By default each block over 32 MB is a mapping of its own, unmapped when freed, and the
    heap's free top is trimmed: every step then faults its buffers in again a page at a time, zeroed by the
    kernel (bf16 autocast's weight copies, gradients, activations, logits): 130K faults a step for the gpt2
    preset at batch 4 x 32, 1.3M at 8 x 1024. Without them a CPU step took 0.35 s instead of 0.49 and 14.7 s
    instead of 20.2 (2 cores, README), for a peak RSS 3-11% higher (freed blocks do not always fit the next
    ones). False where the C library is not glibc."""
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):  # glibc's name: ValueError, AttributeError or None elsewhere
            return False
        mallopt = ctypes.CDLL(None).mallopt
    except (ValueError, AttributeError, OSError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # from glibc's malloc.h; -1 as a trim threshold turns trimming off
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, -1))
