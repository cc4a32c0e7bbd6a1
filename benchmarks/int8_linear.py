"""One-token linear layer, 768 -> 3072 (GPT-2's MLP up-projection), on CPU: which int8 path is fastest?

Rows: float baselines, the int8 kernels PyTorch offers, and the one gptgen uses (fbgemm's dynamic
int8 linear over a weight packed once), also called the plain way, through `torch.ops` with PyTorch's
`__torch_function__` checks on (see `gptgen.quantize._linear_dynamic`). oneDNN's int8 linear takes
activations already quantized, so its row includes quantizing them per call in eager ops.
Relative output error is against the fp32 result.

With --device cuda (for a session with a GPU; nothing here needs one): the float baselines, the int8
path gptgen takes off CPU (the int8 weight converted per call, then scaled), `_weight_int8pack_mm`, and
bf16 and that int8 path each compiled by inductor (which fuses the conversion into the matmul).

    python benchmarks/int8_linear.py [--threads 2] [--device cpu|cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.nn.functional as F
from report import emit

from gptgen.quantize import Int8Linear, quantize_rows


def bench(fn, x, reps: int = 2000) -> float:
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)  # GPU calls return before the work is done
    for _ in range(50):
        fn(x)
    times = []
    for _ in range(5):
        sync()
        t = time.perf_counter()
        for _ in range(reps // 5):
            fn(x)
        sync()
        times.append((time.perf_counter() - t) / (reps // 5))
    return sorted(times)[2] * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lin = torch.nn.Linear(768, 3072)
    w, b = lin.weight.detach(), lin.bias.detach()
    q, scale = quantize_rows(w)
    x = torch.randn(1, 768)
    if args.device == "cuda":
        rows = run_paths(cuda_paths(w.cuda(), b.cuda(), q.cuda(), scale.cuda()), x.cuda(), F.linear(x, w, b).cuda())
        report(rows, f"on {torch.cuda.get_device_name()}", args.json)
        return
    w_bf16, b_bf16 = w.to(torch.bfloat16), b.to(torch.bfloat16)
    ours = Int8Linear(q, scale, b)
    ours.pack()
    plain_fbgemm = torch.ops.quantized.linear_dynamic
    onednn_w = torch.ops.onednn.qlinear_prepack(q, [1, 768])
    zero_points = torch.zeros(3072, dtype=torch.int32)

    def onednn(x: torch.Tensor) -> torch.Tensor:
        lo, hi = float(x.min().clamp(max=0)), float(x.max().clamp(min=0))
        s = (hi - lo) / 255 or 1.0
        zp = round(-lo / s)
        qx = torch.clamp(torch.round(x / s) + zp, 0, 255).to(torch.uint8)
        return torch.ops.onednn.qlinear_pointwise(qx, s, zp, onednn_w, scale, zero_points, b, 1.0, 0,
                                                  torch.float32, "none", [], "")

    paths = {
        "fp32 F.linear": lambda x: F.linear(x, w, b),
        "bf16 F.linear": lambda x: F.linear(x.to(torch.bfloat16), w_bf16, b_bf16).float(),
        "int8 dequantize, then fp32 linear": lambda x: F.linear(x, q.float() * scale[:, None], b),
        "int8 aten._weight_int8pack_mm": lambda x: torch.ops.aten._weight_int8pack_mm(x, q, scale) + b,
        "int8 oneDNN qlinear (+ quantize x)": onednn,
        "int8 fbgemm, plain torch.ops call": lambda x: torch.addcmul(b, plain_fbgemm(x, ours._packed), scale),
        "int8 fbgemm linear_dynamic (gptgen)": ours,
    }
    report(run_paths(paths, x, F.linear(x, w, b)), f"{args.threads} threads", args.json)


def cuda_paths(w, b, q, scale) -> dict:
    w_bf16, b_bf16 = w.to(torch.bfloat16), b.to(torch.bfloat16)
    ours = Int8Linear(q, scale, b)  # not packed: the path gptgen takes on GPUs

    def bf16(x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(torch.bfloat16), w_bf16, b_bf16)

    def int8_bf16(x: torch.Tensor) -> torch.Tensor:
        return ours(x.to(torch.bfloat16))

    return {
        "fp32 F.linear": lambda x: F.linear(x, w, b),
        "bf16 F.linear": bf16,
        "int8 converted per call (gptgen, bf16)": int8_bf16,
        "int8 aten._weight_int8pack_mm": lambda x: torch.ops.aten._weight_int8pack_mm(x, q, scale) + b,
        "bf16 F.linear, compiled": torch.compile(bf16, mode="max-autotune-no-cudagraphs"),
        "int8 (gptgen, bf16), compiled": torch.compile(int8_bf16, mode="max-autotune-no-cudagraphs"),
    }


def run_paths(paths: dict, x: torch.Tensor, ref: torch.Tensor) -> list[dict]:
    rows = []
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, fn in paths.items():
            try:
                err = ((fn(x).float() - ref).norm() / ref.norm()).item()
                rows.append({"path": name, "us": bench(fn, x), "rel_error": err})
            except RuntimeError as e:  # a kernel this torch build lacks
                rows.append({"path": name, "error": str(e).splitlines()[0][:80]})
    return rows


def report(rows: list[dict], where: str, json_path: str | None) -> None:
    base = rows[0]["us"]
    print(f"768x3072 linear, one token, {where}, torch {torch.__version__}")
    print(f"{'path':38} {'µs':>8} {'vs fp32':>8} {'rel. error':>11}")
    for r in rows:
        if "error" in r:
            print(f"{r['path']:38} not available: {r['error']}")
        else:
            print(f"{r['path']:38} {r['us']:8.1f} {base / r['us']:7.2f}x {r['rel_error']:11.2e}")
    emit(rows, json_path)


if __name__ == "__main__":
    main()
