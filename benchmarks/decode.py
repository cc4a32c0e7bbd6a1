"""Decoding speed at batch 1 on CPU: gptgen fp32 / bf16 / int8 against transformers and llama.cpp, same weights.

The `gpt2` preset with random weights (seeded) is saved once; gptgen's int8 file and GGUF exports are
made from it by gptgen itself, and transformers gets the same tensors. Each row runs in its own process
(so peak RSS is that system's own), 2 threads, 16-token prompt, 256 new tokens, top-k 50. The systems
take turns, one process each per round, in an order rotated each round, and each figure is the median
over the rounds (5 by default): this machine is shared, and a slow minute then falls on every system
instead of one.

    python benchmarks/decode.py [--runs 5] [--systems gptgen-int8,llama.cpp-q8_0] [--json out.json]
    python benchmarks/decode.py --device cuda   # gptgen bf16 and int8, eager and compiled (CUDA graphs)

llama.cpp rows need `llama-cpp-python` (pip builds it from source, ~10 minutes); without it they are
reported as not run. A "-compiled" row decodes through `gptgen.load(..., compile=True)`; its warm-up
call compiles, untimed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import emit, failure, status_mib

PROMPT_TOKENS, NEW_TOKENS, PREFILL_TOKENS, TOP_K = 16, 256, 512, 50
SYSTEMS = ["gptgen-fp32", "gptgen-bf16", "gptgen-int8", "transformers-fp32", "llama.cpp-q8_0", "llama.cpp-f16"]
CUDA_SYSTEMS = ["gptgen-bf16", "gptgen-bf16-compiled", "gptgen-int8", "gptgen-int8-compiled"]


def make_files(workdir: Path, gguf: bool = True, hf: bool = True) -> dict[str, Path]:
    import torch

    from gptgen.checkpoint import save_model
    from gptgen.config import GPTConfig
    from gptgen.model import GPT

    files = {"fp32": workdir / "gpt2-f32.safetensors", "int8": workdir / "gpt2-int8.safetensors",
             "f16": workdir / "gpt2-f16.gguf", "q8_0": workdir / "gpt2-q8_0.gguf", "hf": workdir / "gpt2-hf"}
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("gpt2"))
    model.init_weights()
    save_model(files["fp32"], model.state_dict(), model.config)
    cli = [sys.executable, "-m", "gptgen"]
    subprocess.run([*cli, "quantize", files["fp32"], files["int8"]], check=True, stdout=subprocess.DEVNULL)
    for kind in ("f16", "q8_0") if gguf else ():
        subprocess.run([*cli, "export", files["fp32"], files[kind], "--type", kind], check=True,
                       stdout=subprocess.DEVNULL)
    if hf:  # transformers loads its own format, as its users do
        subprocess.run([*cli, "export", files["fp32"], files["hf"], "--format", "hf"], check=True,
                       stdout=subprocess.DEVNULL)
    return files


def prompts(n: int) -> list[int]:
    """n token ids, the same for every system (and without torch: llama.cpp's process does not load it, so its
    peak RSS is llama.cpp's own; importing torch alone took 208 MiB)."""
    return random.Random(n).choices(range(50000), k=n)


def run_gptgen(path: Path, dtype: str, device: str, compile: bool):
    import gptgen
    from gptgen.generate import Sampling, generate_tokens

    tm = gptgen.load(str(path), device=device, dtype=dtype, compile=compile)

    def once(prompt: list[int], n: int) -> tuple[float, float, int]:
        start = time.perf_counter()
        first, count = 0.0, 0
        for _ in generate_tokens(tm.model, prompt, Sampling(max_new_tokens=n, temperature=1.0, top_k=TOP_K, seed=1)):
            count += 1
            if count == 1:
                first = time.perf_counter() - start
        return first, time.perf_counter() - start, count

    return once


def run_transformers(folder: Path):
    import torch
    from transformers import AutoTokenizer, GPT2LMHeadModel
    from transformers.generation.streamers import BaseStreamer

    # from_pretrained, as its users load it: no randomly initialised copy beside the weights (building one and
    # loading into it held both, and its peak RSS was ~the file's size above what users see)
    hf = GPT2LMHeadModel.from_pretrained(folder).eval()
    # and its tokenizer, held as every system here holds one (gptgen.load's; llama.cpp's vocabulary, from the GGUF):
    # the timed calls take token ids, but a program that generates text holds its tokenizer (14 MiB here)
    tokenizer = AutoTokenizer.from_pretrained(folder)

    class Clock(BaseStreamer):
        def __init__(self):
            self.calls, self.first = 0, None

        def put(self, value):
            self.calls += 1
            if self.calls == 2:  # the first call carries the prompt
                self.first = time.perf_counter()

        def end(self):
            pass

    def once(prompt: list[int], n: int) -> tuple[float, float, int]:
        clock = Clock()
        ids = torch.tensor([prompt])
        start = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=True,
                              temperature=1.0, top_k=TOP_K, streamer=clock, pad_token_id=50256)  # not the export's 0.8
        total = time.perf_counter() - start
        return clock.first - start, total, out.shape[1] - len(prompt)

    once.tokenizer = tokenizer
    return once


def run_llama(path: Path):
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=1024, n_threads=2, n_threads_batch=2, n_batch=512, verbose=False,
                seed=1)  # 2 threads for prefill too (its default is every CPU), as gptgen has

    def once(prompt: list[int], n: int) -> tuple[float, float, int]:
        # its token loop, as the other rows take token ids: create_completion(stream=True) decodes the whole text
        # so far at every token, and where a byte token leaves UTF-8 unfinished (random weights make many) retries
        # every prefix of the backlog, which on a tiny model took 1.3-10.5 ms a token against its loop's 1.1
        llm.reset()  # else generate() reuses the cache of an earlier call's prompt (the warm-up's is the same 16 ids),
        start = time.perf_counter()  # and its first token came after 1 of the 16, not all, as the others' do
        first, count = 0.0, 0
        for token in llm.generate(prompt, top_k=TOP_K, top_p=1.0, min_p=0.0, temp=1.0, reset=True):
            if token == llm.token_eos():  # the end of the text, not one of its tokens (gptgen counts it so too)
                break
            count += 1
            if count == 1:
                first = time.perf_counter() - start
            if count == n:
                break
        return first, time.perf_counter() - start, count

    return once


def one(system: str, files: dict[str, str], device: str) -> dict:
    """One measurement of one system, in a process of its own: a warm-up, a decode run, a prefill run."""
    kind = system.split("-")[1]
    if not system.startswith("llama"):
        import torch

        torch.set_num_threads(2)
    if system.startswith("gptgen"):
        path = Path(files["int8" if kind == "int8" else "fp32"])
        dtype = {"fp32": "float32", "bf16": "bfloat16"}.get(kind, "auto")  # int8: bf16 activations on CUDA
        once = run_gptgen(path, dtype, device, system.endswith("-compiled"))
    elif system.startswith("transformers"):
        path = Path(files["hf"]) / "model.safetensors"  # the same weights: `export --format hf` of gptgen's fp32
        once = run_transformers(Path(files["hf"]))
    else:
        path = Path(files[kind])
        once = run_llama(path)
    once(prompts(PROMPT_TOKENS), 8)  # warm-up
    if device == "cuda":  # a first call at a new shape chooses its kernels there: warm the timed 512 prompt's too
        once(prompts(PREFILL_TOKENS), 1)  # (not on CPU: llama.cpp then decoded at half speed here, cause unknown)
    first, total, n = once(prompts(PROMPT_TOKENS), NEW_TOKENS)
    prefill = PREFILL_TOKENS / once(prompts(PREFILL_TOKENS), 1)[0]
    return {"system": system, "decode_tok_s": (n - 1) / (total - first), "first_token_ms": 1000 * first,
            "prefill_tok_s": prefill, "peak_rss_mib": status_mib("VmHWM"), "file_mib": path.stat().st_size / 2**20,
            "new_tokens": n}


def rounds(runs: list[dict]) -> list[float]:
    return [round(r["decode_tok_s"], 1) for r in runs]


def median_row(runs: list[dict]) -> dict:
    """Each figure's median over the rounds, with every round's decode speed beside it."""
    row = {k: statistics.median([r[k] for r in runs])
           for k in ("decode_tok_s", "first_token_ms", "prefill_tok_s", "peak_rss_mib")}
    return {"system": runs[0]["system"], **row, "file_mib": runs[0]["file_mib"],
            "decode_tok_s_rounds": rounds(runs),
            "new_tokens": [r["new_tokens"] for r in runs]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5, help="rounds; each figure is the median over them")
    p.add_argument("--systems", help=f"default: {','.join(SYSTEMS)}; with --device cuda, {','.join(CUDA_SYSTEMS)}")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where gptgen's rows run")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--files", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args.one, json.loads(args.files), args.device)))
        return
    systems = (args.systems or ",".join(CUDA_SYSTEMS if args.device == "cuda" else SYSTEMS)).split(",")
    if args.device == "cpu" and (compiled := [s for s in systems if s.endswith("-compiled")]):
        p.error(f"{', '.join(compiled)}: gptgen compiles its decoding on CUDA only (--device cuda)")
    if args.device == "cuda" and (peers := [s for s in systems if not s.startswith("gptgen")]):
        p.error(f"{', '.join(peers)}: the peers run on the CPU here, so a ratio to gptgen on CUDA would compare "
                "devices; compare them with --device cpu")
    results: dict[str, list[dict]] = {system: [] for system in systems}
    errors: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        files = {k: str(v) for k, v in make_files(Path(tmp), gguf=any(s.startswith("llama") for s in systems),
                                                  hf=any(s.startswith("transformers") for s in systems)).items()}
        for round_ in range(args.runs):  # every system once per round, so drift on a shared machine hits all,
            shift = round_ % len(systems)  # and in a rotated order, so no system always follows the same one
            for system in systems[shift:] + systems[:shift]:
                if system in errors:
                    continue
                cmd = [sys.executable, __file__, "--one", system, "--files", json.dumps(files), "--device", args.device]
                r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
                if r.stderr.strip():  # its warnings (a compiled step that fell back to eager, say) and logs
                    print(f"{system} said:\n{r.stderr.rstrip()}", file=sys.stderr, flush=True)
                if r.returncode != 0:
                    errors[system] = failure(r)
                    continue
                results[system].append(json.loads(r.stdout.strip().splitlines()[-1]))
                print(f"round {round_ + 1}: {system} {results[system][-1]['decode_tok_s']:.1f} tok/s", file=sys.stderr,
                      flush=True)  # as it comes: a run cut short by a time limit still shows its rows
    import torch

    rows = [{"system": s, "error": errors[s], "decode_tok_s_rounds": rounds(results[s])}
            if s in errors else median_row(results[s]) for s in systems]
    where = torch.cuda.get_device_name() if args.device == "cuda" else "2 threads"
    print(f"gpt2 preset (124M), batch 1, {where}, {PROMPT_TOKENS}-token prompt, {NEW_TOKENS} new tokens, "
          f"top-k {TOP_K}, median of {args.runs} rounds; torch {torch.__version__}")
    print(f"{'system':22} {'decode tok/s':>12} {'first token ms':>14} {'prefill 512 tok/s':>17} {'peak RSS MiB':>12} "
          f"{'file MiB':>8}")
    for r in rows:
        if "error" in r:
            done = len(r["decode_tok_s_rounds"])
            print(f"{r['system']:22} {f'failed after {done} rounds' if done else 'not run'}: {r['error'][:90]}")
        else:
            print(f"{r['system']:22} {r['decode_tok_s']:12.1f} {r['first_token_ms']:14.1f} {r['prefill_tok_s']:17.0f} "
                  f"{r['peak_rss_mib']:12.0f} {r['file_mib']:8.1f}")
    ok = {r["system"]: r for r in rows if "error" not in r}
    ratios = {}
    for ours, peer in [("gptgen-int8", "llama.cpp-q8_0"), ("gptgen-int8", "transformers-fp32"),
                       ("gptgen-int8-compiled", "gptgen-bf16-compiled")]:
        if ours in ok and peer in ok:
            ratios[f"{ours} / {peer}"] = r = {k: ok[ours][k] / ok[peer][k]
                                              for k in ("decode_tok_s", "prefill_tok_s", "peak_rss_mib")}
            print(f"{ours} / {peer}: decode {r['decode_tok_s']:.2f}x, prefill {r['prefill_tok_s']:.2f}x, "
                  f"peak RSS {r['peak_rss_mib']:.2f}x")
    emit({"rows": rows, "ratios": ratios}, args.json)


if __name__ == "__main__":
    main()
