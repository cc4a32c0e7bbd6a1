import json
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import gptgen.quantize
from gptgen.checkpoint import ModelFileError, load_model, load_model_file, save_model
from gptgen.generate import Batch, Sampling, generate_tokens
from gptgen.quantize import Int8Linear, _scripted_decode_step, int8_decoder, quantize_rows, quantize_state_dict
from tests.conftest import ROOT
from tests.test_model import lively_model, tiny_model


@pytest.fixture(params=[False, True], ids=["8-bit activations", "7-bit activations"])
def saturating(request, monkeypatch):
    """Both of fbgemm's activation ranges, whatever this CPU is: the full one, and the 7-bit one that a CPU
    without VNNI gets (fbgemm_saturates)."""
    monkeypatch.setattr(gptgen.quantize, "fbgemm_saturates", lambda: request.param)
    return request.param


def test_rows_round_trip_within_half_a_step():
    w = torch.randn(64, 32)
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and scale.shape == (64,)
    err = (q.float() * scale[:, None] - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-6).all()
    assert q.abs().amax(dim=1).eq(127).all()


@torch.no_grad()
def test_int8_linear_is_close_to_float(saturating):
    """Plain, and packed for fbgemm with the activation range `saturating` gives it: one sequence (fbgemm's own
    call) and several (sequence by sequence)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(768, 3072)
    q, scale = quantize_rows(lin.weight)
    plain, packed = Int8Linear(q, scale, lin.bias.detach()), Int8Linear(q, scale, lin.bias.detach())
    packed.pack()
    assert packed._packed is not None and packed._reduce_range == saturating
    for x in (torch.randn(3, 768), torch.randn(2, 3, 768)):
        ref = lin(x)
        for layer in (plain, packed):
            assert (layer(x) - ref).norm() / ref.norm() < 0.02


def float_and_int8_files(model, tmp_path):
    """(fp32 file, int8 file) of model, the int8 one made from the fp32 one as `gptgen quantize` does."""
    f32, i8 = tmp_path / "f32.safetensors", tmp_path / "i8.safetensors"
    save_model(f32, model.state_dict(), model.config, training={"steps": 1})
    save_model(i8, quantize_state_dict(load_model_file(f32)[1]), model.config, quantization="int8")
    return f32, i8


@pytest.fixture
def files(tmp_path):
    model = tiny_model()
    return model, *float_and_int8_files(model, tmp_path)


def test_int8_file_stays_int8_in_memory(files):
    _, _, i8 = files
    model, metadata = load_model(i8)
    assert metadata["quantization"] == "int8"
    assert model.lm_head.int8_weight().dtype == torch.int8
    every = torch.arange(model.config.vocab_size)
    if model.lm_head._packed is not None and hasattr(os, "pread"):  # fbgemm (x86), and not Windows
        # the tied pair: the head keeps fbgemm's copy alone; the embedding reads its rows from the file
        assert model.lm_head.weight is None
        assert torch.equal(model.transformer.wte.file_rows[every], model.lm_head.int8_weight())
    assert torch.equal(model.transformer.wte(every[None, :5])[0],
                       model.lm_head.int8_weight()[:5].float() * model.lm_head.scale[:5, None])
    linears = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert len(linears) == 1 + 4 * model.config.n_layer
    assert all(m.int8_weight().dtype == torch.int8 for m in linears)
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())


def test_int8_logits_and_greedy_text_are_close_to_float(tmp_path, saturating):
    model = lively_model()  # at init scale, tiny_model's greedy text ignores its context: a wrong cache went unseen
    _, i8 = float_and_int8_files(model, tmp_path)
    q, _ = load_model(i8)
    x = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        ref, _ = model.eval()(x)
        got, _ = q(x)
    assert ((got - ref).norm() / ref.norm()) < 0.05
    s = Sampling(max_new_tokens=8, temperature=0)
    text = list(generate_tokens(model, [1, 2, 3], s))
    assert len(set(text)) > 1 and text != list(generate_tokens(model, [9, 8, 7, 6], s))  # the context counts
    assert list(generate_tokens(q, [1, 2, 3], s)) == text  # int8's cached step


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_model_quantizes_to_an_int8_file_that_runs(tmp_path, dtype):
    """Its norms and biases went into the int8 file as they were, and fbgemm's layers refused them (mixed dtype)."""
    model = tiny_model()
    _, i8 = float_and_int8_files(model.to(dtype), tmp_path)
    tensors = load_model_file(i8)[1]
    assert {t.dtype for t in tensors.values()} == {torch.int8, torch.float32}
    s = Sampling(max_new_tokens=4, temperature=0)
    assert len(list(generate_tokens(load_model(i8)[0], [1, 2, 3], s))) == 4
    halves = {k: v.to(dtype) if v.dtype == torch.float32 and not k.endswith(".scale") else v  # a hand-made file
              for k, v in tensors.items()}
    save_model(tmp_path / "halves.safetensors", halves, model.config, quantization="int8")
    assert list(generate_tokens(load_model(tmp_path / "halves.safetensors")[0], [1, 2, 3], s)) == \
        list(generate_tokens(load_model(i8)[0], [1, 2, 3], s))


def test_int8_file_is_checked_like_any_other(files, tmp_path):
    model, f32, _ = files
    _, tensors, _ = load_model_file(f32)
    save_model(tmp_path / "bad.safetensors", tensors, model.config, quantization="int8")  # float, not int8
    with pytest.raises(ModelFileError, match="expected"):
        load_model(tmp_path / "bad.safetensors")


def test_the_non_fbgemm_path_matches_fbgemm():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 96)
    q, scale = quantize_rows(lin.weight)
    packed, plain = Int8Linear(q, scale, lin.bias.detach()), Int8Linear(q, scale, lin.bias.detach())
    packed.pack()
    x = torch.randn(4, 64)
    assert packed._packed is not None and plain._packed is None
    torch.testing.assert_close(plain(x), packed(x), atol=0.05, rtol=0.05)
    torch.testing.assert_close(plain(x), F.linear(x, q.float() * scale[:, None], lin.bias), atol=1e-5, rtol=1e-5)


def test_a_compiled_one_row_int8_linear_reads_the_int8_weight_in_one_kernel():
    """Compiled for one row (a decoding step, as CompiledDecoder compiles it on GPUs), the int8 linear is one
    fused kernel over the int8 weight: no float copy of the weight, no matmul call on one (inductor on CPU
    here, the same graph Triton gets on CUDA)."""
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    q, scale = quantize_rows(torch.randn(96, 64))
    layer = Int8Linear(q, scale, torch.randn(96))
    x = torch.randn(1, 1, 64)
    y, (code,) = run_and_get_code(torch.compile(layer, fullgraph=True), x)
    torch.testing.assert_close(y, layer(x), rtol=1e-5, atol=1e-5)
    assert re.findall(r"^ +(cpp_fused_\w+)\(", code, re.M) == ["cpp_fused__to_copy_add_mul_sum_unsqueeze_0"]
    assert not re.search(r"empty_strided_cpu\(\(96, 64\)", code) and not re.search(r"extern_kernels\.\w+\(", code)


def _packed_linear(k: int, n: int, bias: bool) -> Int8Linear:
    torch.manual_seed(0)
    q, scale = quantize_rows(torch.randn(n, k) * 0.02)
    layer = Int8Linear(q, scale, torch.randn(n) if bias else None)
    layer.pack()
    return layer


@pytest.mark.parametrize("k, n, bias", [(768, 2304, True), (3072, 768, True), (768, 50257, False),
                                        (1, 16, True)])  # n_embd=1: its one range row lost the top of the range
def test_a_batch_gives_each_sequence_exactly_its_own_output(k, n, bias, saturating):
    """fbgemm quantizes a call's activations with one scale; batched, each sequence still gets bit for bit
    the output it gets alone, whatever its range (wide, narrow, all positive, all negative, all zero)."""
    layer = _packed_linear(k, n, bias)
    torch.manual_seed(1)
    x = torch.randn(8, 3, k) * torch.tensor([1, 30, 1e-3, 1, 1, 0, 5, 1]).view(8, 1, 1)
    x[3], x[4] = x[3].abs() + 0.5, -x[4].abs() - 0.5  # all positive, all negative
    x[6] += 40  # far from zero
    with torch.inference_mode():
        batched = layer(x)
        for b in range(8):
            assert torch.equal(batched[b], layer(x[b:b + 1])[0]), f"sequence {b}"
        ref = F.linear(x, layer.int8_weight().float() * layer.scale[:, None], layer.bias)
    assert ((batched - ref).norm() / ref.norm()) < 0.02


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

ROW = st.tuples(st.floats(-8, 4), st.floats(-50, 50), st.integers(0, 2**31 - 1))  # log10 of spread, offset, seed


@settings(max_examples=200, deadline=None)
@given(st.lists(ROW, min_size=2, max_size=5), st.booleans())
def test_any_activation_ranges_batched_equal_alone(rows, saturates):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gptgen.quantize, "fbgemm_saturates", lambda: saturates)
        layer = _packed_linear(64, 96, bias=True)
        x = torch.stack([torch.randn(2, 64, generator=torch.Generator().manual_seed(seed)) * 10**spread + offset
                         for spread, offset, seed in rows])
        with torch.inference_mode():
            batched = layer(x)
            for b in range(len(rows)):
                assert torch.equal(batched[b], layer(x[b:b + 1])[0])


WORST_CASE = """
import json, torch
from gptgen.quantize import Int8Linear, fbgemm_saturates

q = torch.full((4, 768), 127, dtype=torch.int8)  # rows at int8's end, times activations at uint8's: 127 * 255
q[1, ::2] = -127
layer = Int8Linear(q, torch.full((4,), 0.01), None)
layer.pack()
x = torch.full((2, 1, 768), 3.0)
x[1] = torch.randn(1, 768, generator=torch.Generator().manual_seed(0))
ref = torch.nn.functional.linear(x, q.float() * 0.01)
with torch.inference_mode():
    errors = [((y - r).norm() / r.norm()).item() for y, r in ((layer(x[:1]), ref[:1]), (layer(x), ref))]
print(json.dumps({"saturates": fbgemm_saturates(), "errors": errors}))
"""


def test_a_cpu_whose_fbgemm_saturates_gets_7_bit_activations_and_right_products():
    """Without VNNI fbgemm adds pairs of uint8 x int8 products in int16, which saturates: such rows came out
    49% wrong (emulated here as fbgemm allows, by its AVX2 kernels)."""
    env = {**os.environ, "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", WORST_CASE], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["saturates"] and max(out["errors"]) < 1e-3, out  # one sequence (fbgemm's call), and a batch


@pytest.mark.parametrize("bias", [True, False])
def test_the_compiled_decode_step_gives_the_models_logits_bit_for_bit(tmp_path, bias, saturating):
    model = load_model(float_and_int8_files(tiny_model(bias=bias), tmp_path)[1])[0]  # packed for fbgemm
    model.setup_caches(batch=3, max_len=16)  # rows 0 and 1 are the steps'; row 2 must stay untouched
    decoder = int8_decoder(model)
    assert decoder is not None
    tokens = torch.randint(0, 50257, (3, 12), generator=torch.Generator().manual_seed(0)).tolist()
    kv = lambda layer, row, n: layer.attn.cache.kv[:, row, :, :n].clone()  # noqa: E731 - the rest is uninitialised
    with torch.inference_mode():
        for row, n in enumerate((4, 6, 3)):
            model(torch.tensor([tokens[row][:n]]), row=row, last_only=True)
        row2 = kv(model.transformer.h[0], 2, 3)
        for pos in range(4, 10):  # one sequence, at position pos
            fast = decoder([tokens[0][pos]], [pos])
            written = [kv(b, 0, pos + 1) for b in model.transformer.h]
            ref = model(torch.tensor([[tokens[0][pos]]]), pos=pos, last_only=True)[0][:, -1]  # rewrites the same
            assert torch.equal(fast, ref), f"position {pos}"
            assert all(torch.equal(w, kv(b, 0, pos + 1)) for w, b in zip(written, model.transformer.h, strict=True))
        for step in range(2):  # two sequences, at positions 10 and 6 (then 11 and 7): the batched forward's numbers
            positions = [10 + step, 6 + step]
            new = [tokens[0][positions[0]], tokens[1][positions[1]]]
            fast = decoder(new, positions)
            written = [[kv(b, r, p + 1) for r, p in enumerate(positions)] for b in model.transformer.h]
            ref = model(torch.tensor([[t] for t in new]), pos=torch.tensor(positions), last_only=True)[0][:, -1]
            assert fast.shape == (2, 50257) and torch.equal(fast, ref), f"step {step}"
            assert all(torch.equal(w, kv(b, r, p + 1)) for ws, b in zip(written, model.transformer.h, strict=True)
                       for w, (r, p) in zip(ws, enumerate(positions), strict=True))
        assert torch.equal(row2, kv(model.transformer.h[0], 2, 3))
    model.clear_caches()


def test_float_models_and_models_without_caches_get_no_compiled_step(files):
    model, _, i8 = files
    model.setup_caches(batch=1)
    assert int8_decoder(model) is None
    assert int8_decoder(load_model(i8)[0]) is None  # int8, but no caches yet


def test_without_torchscript_decoding_falls_back_to_the_same_tokens(files, monkeypatch):
    _, _, i8 = files
    model = load_model(i8)[0]
    s = Sampling(max_new_tokens=30, temperature=1.0, top_k=20, seed=3)
    assert Batch(model, rows=2).decoder is not None  # generation takes the compiled step
    model.clear_caches()
    compiled = list(generate_tokens(model, [1, 2, 3], s))

    def no_script(fn):
        raise RuntimeError("TorchScript is not available")

    _scripted_decode_step.cache_clear()
    monkeypatch.setattr(torch.jit, "script", no_script)
    try:
        with pytest.warns(UserWarning, match="decoding runs in Python"):
            assert _scripted_decode_step() is None
        assert list(generate_tokens(model, [1, 2, 3], s)) == compiled
    finally:
        _scripted_decode_step.cache_clear()
