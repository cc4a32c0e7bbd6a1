import pytest
import torch

from gptgen.checkpoint import load_model, save_model
from gptgen.config import GptgenError
from gptgen.generate import Sampling, generate_tokens
from gptgen.interop import export_gguf, gpt2_vocab
from gptgen.tokenizer import get_tokenizer
from gptgen.train import train
from tests.test_train import config


def test_vocab_and_merges_rebuild_gpt2_bpe():
    tokens, merges = gpt2_vocab()
    assert len(tokens) == 50257 and tokens[-1] == "<|endoftext|>"
    assert tokens[0] == "!" and tokens[220] == "Ġ" and tokens[464] == "The"
    assert len(merges) == 50000 and merges[0] == "Ġ t"
    ranks = {t: i for i, t in enumerate(tokens)}
    assert all(ranks["".join(m.split(" "))] == 256 + i for i, m in enumerate(merges[:2000]))


@pytest.fixture(scope="module")
def trained(small_text, tmp_path_factory):
    """A tiny model trained a little: greedy choices with clear margins, as a real model has."""
    out = tmp_path_factory.mktemp("gguf") / "run"
    train(config(small_text, out, steps=60, eval_interval=60, batch_size=8, block_size=64))
    return out / "model.safetensors"


def test_llama_cpp_greedy_equals_gptgen_greedy(trained, tmp_path):
    import llama_cpp  # from requirements-test.txt

    gguf_path = tmp_path / "m.gguf"
    export_gguf(trained, gguf_path, "f16")
    model, _ = load_model(trained)
    prompt = get_tokenizer().encode_ordinary("ROMEO:\nWhat light through yonder window")
    ours = list(generate_tokens(model, prompt, Sampling(max_new_tokens=32, temperature=0)))
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=256, n_threads=2, verbose=False)
    assert llm.tokenize(b"ROMEO:\nWhat light through yonder window", add_bos=False, special=False) == prompt
    theirs = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        theirs.append(token)
        if len(theirs) == 32:
            break
    assert theirs == ours


def test_export_refuses_to_overwrite(trained, tmp_path):
    target = tmp_path / "exists.gguf"
    target.write_bytes(b"keep me")
    with pytest.raises(GptgenError, match="exists"):
        export_gguf(trained, target, "f16")
    assert target.read_bytes() == b"keep me"


def test_q8_0_export_is_a_gguf_file(trained, tmp_path):
    import gguf

    export_gguf(trained, tmp_path / "q.gguf", "q8_0")
    reader = gguf.GGUFReader(tmp_path / "q.gguf")
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_qkv.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_int8_model_exports_dequantized(tmp_path):
    from gptgen.checkpoint import load_model_file
    from gptgen.quantize import quantize_state_dict
    from tests.test_model import tiny_model

    m = tiny_model()
    save_model(tmp_path / "f.safetensors", m.state_dict(), m.config)
    _, tensors, _ = load_model_file(tmp_path / "f.safetensors")
    save_model(tmp_path / "q.safetensors", quantize_state_dict(tensors), m.config, quantization="int8")
    export_gguf(tmp_path / "q.safetensors", tmp_path / "q.gguf", "f16")
    import gguf

    reader = gguf.GGUFReader(tmp_path / "q.gguf")
    exported = {t.name: t for t in reader.tensors}["blk.0.ffn_up.weight"]
    got = torch.from_numpy(exported.data.astype("float32")).reshape(tensors["transformer.h.0.mlp.c_fc.weight"].shape)
    torch.testing.assert_close(got, tensors["transformer.h.0.mlp.c_fc.weight"], atol=2e-3, rtol=0)
