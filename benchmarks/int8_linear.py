"""One-token linear layer, 768 -> 3072 (GPT-2's MLP up-projection), on CPU: which int8 path is fastest?

Rows: float baselines, the int8 kernels PyTorch offers, and the one gptgen uses (fbgemm's dynamic
int8 linear over a weight packed once), also called the plain way, through `torch.ops` with PyTorch's
`__torch_function__` checks on (see `gptgen.quantize._linear_dynamic`). oneDNN's int8 linear takes
activations already quantized, so its row includes quantizing them per call in eager ops, as does the row
of `torch._int_mm` (oneDNN's int8 x int8 -> int32 product on CPUs with AVX-512 VNNI) over the plain int8 rows.
Relative output error is against the fp32 result.

With --device cuda (for a session with a GPU; nothing here needs one), or --all-layers on CPU, one layer
would only time kernel launches, so a call is a token through all of GPT-2's 49 linear layers (12 blocks'
four and the 50,257-row head: 124M weights, 248 MB in bf16, 124 MB in int8), one after another: bf16 and
gptgen's int8 layers (bf16 activations), eager (the int8 weight converted per call, then the matmul) and
compiled as gptgen's decoding step is (on CUDA with CUDA graphs), where one row's int8 linear becomes one
kernel reading the int8 weight (see `Int8Linear.forward`); and `_weight_int8pack_mm`.

    python benchmarks/int8_linear.py [--threads 2] [--device cpu|cuda] [--all-layers] [--json out.json]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from report import emit

from gptgen.generate import CompiledDecoder
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
    return statistics.median(times) * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--all-layers", action="store_true", help="a token through GPT-2's 49 linears (always on CUDA)")
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lin = torch.nn.Linear(768, 3072)
    w, b = lin.weight.detach(), lin.bias.detach()
    q, scale = quantize_rows(w)
    x = torch.randn(1, 768)
    if args.device == "cuda" or args.all_layers:
        rows = run_paths(*gpt2_linears(args.device), reps=200)
        where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {args.threads} threads"
        report(rows, f"one token through GPT-2's 49 linear layers, {where}", args.json)
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

    def int_mm(x: torch.Tensor) -> torch.Tensor:
        s = x.abs().amax().clamp(min=1e-12) / 127  # symmetric, one scale per call
        return torch._int_mm(torch.round(x / s).to(torch.int8), q.t()) * (s * scale) + b

    paths = {
        "fp32 F.linear": lambda x: F.linear(x, w, b),
        "bf16 F.linear": lambda x: F.linear(x.to(torch.bfloat16), w_bf16, b_bf16).float(),
        "int8 dequantize, then fp32 linear": lambda x: F.linear(x, q.float() * scale[:, None], b),
        "int8 aten._weight_int8pack_mm": lambda x: torch.ops.aten._weight_int8pack_mm(x, q, scale) + b,
        "int8 oneDNN qlinear (+ quantize x)": onednn,
        "int8 torch._int_mm, plain rows (+ quantize x)": int_mm,
        "int8 fbgemm, plain torch.ops call":  # in gptgen's activation range
            lambda x: torch.addcmul(b, plain_fbgemm(x, ours._packed, ours._reduce_range), scale),
        "int8 fbgemm linear_dynamic (gptgen)": ours,
    }
    report(run_paths(paths, x, F.linear(x, w, b)), f"768x3072 linear, one token, {args.threads} threads", args.json)


def gpt2_linears(device: str) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """(paths, input, fp32 reference) for one token through GPT-2's 49 linear layers in turn.

    Each layer takes the activation row of its input width (768 or 3072) and returns its output; the
    outputs are concatenated. The weights are random (N(0, 0.02)), and the same for every path.
    """
    torch.manual_seed(0)
    shapes = [(2304, 768), (768, 768), (3072, 768), (768, 3072)] * 12 + [(50257, 768)]
    weights = [torch.randn(n, k) * 0.02 for n, k in shapes]
    biases = [torch.zeros(n) if n != 50257 else None for n, _ in shapes]
    x = torch.randn(1, 3072, device=device)
    int8 = [Int8Linear(*quantize_rows(w), b).to(device) for w, b in zip(weights, biases, strict=True)]  # not packed
    bf16 = [(w.to(device, torch.bfloat16), None if b is None else b.to(device, torch.bfloat16))
            for w, b in zip(weights, biases, strict=True)]
    fp32 = [(w.to(device), None if b is None else b.to(device)) for w, b in zip(weights, biases, strict=True)]

    def run(layers, x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The layers in the path's own activation dtype: one cast in and one out, not one per layer (which
        cost a bf16 path 98 kernels a token that the fp32 path did not pay)."""
        x = x.to(dtype)
        return torch.cat([layer(x[:, :k]) for layer, (_, k) in zip(layers, shapes, strict=True)], dim=-1).float()

    def float_layers(params):
        return [lambda x, w=w, b=b: F.linear(x, w, b) for w, b in params]

    paths = {
        "fp32 F.linear": lambda x: run(float_layers(fp32), x),
        "bf16 F.linear": lambda x: run(float_layers(bf16), x, torch.bfloat16),
        "int8 Int8Linear (gptgen, bf16)": lambda x: run(int8, x, torch.bfloat16),
        "int8 aten._weight_int8pack_mm (fp32 activations)": lambda x: run(
            [lambda x, m=m: torch.ops.aten._weight_int8pack_mm(x, m.weight, m.scale) for m in int8], x),
    }
    for name in ("bf16 F.linear", "int8 Int8Linear (gptgen, bf16)"):
        # compiled as gptgen's decoding step is: CUDA graphs and coordinate-descent tuning on CUDA
        compiled = torch.compile(paths[name], fullgraph=True, options=CompiledDecoder.CUDA_OPTIONS if x.is_cuda else {})
        paths[name + ", compiled"] = lambda x, f=compiled: f(x).clone()  # CUDA graph outputs live until the next call
    return paths, x, paths["fp32 F.linear"](x)


def run_paths(paths: dict, x: torch.Tensor, ref: torch.Tensor, reps: int = 2000) -> list[dict]:
    rows = []
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, fn in paths.items():
            try:
                err = ((fn(x).float() - ref).norm() / ref.norm()).item()
                rows.append({"path": name, "us": bench(fn, x, reps), "rel_error": err})
            except RuntimeError as e:  # a kernel this torch build lacks
                rows.append({"path": name, "error": str(e).splitlines()[0][:80]})
    return rows


def report(rows: list[dict], title: str, json_path: str | None) -> None:
    base = rows[0]["us"]
    print(f"{title}, torch {torch.__version__}")
    print(f"{'path':48} {'µs':>8} {'vs fp32':>8} {'rel. error':>11}")
    for r in rows:
        if "error" in r:
            print(f"{r['path']:48} not available: {r['error']}")
        else:
            r["vs_fp32"] = base / r["us"]
            print(f"{r['path']:48} {r['us']:8.1f} {r['vs_fp32']:7.2f}x {r['rel_error']:11.2e}")
    emit(rows, json_path)


if __name__ == "__main__":
    main()
