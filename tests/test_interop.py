import json
import os
import re

import pytest
import torch

from gptgen.checkpoint import load_model, save_model, user_mode
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


@pytest.mark.parametrize("gguf_type, matrices, file_type",
                         [("f16", "F16", "MOSTLY_F16"), ("q8_0", "Q8_0", "MOSTLY_Q8_0")])
def test_export_is_a_gguf_file_of_its_type(trained, tmp_path, gguf_type, matrices, file_type):
    """llama.cpp reports general.file_type as the file's type; position_embd stays F16 in a q8_0 file, as gptgen's
    own int8 file keeps the position embedding float (a lookup, not a matrix product: nothing to gain)."""
    import gguf

    export_gguf(trained, tmp_path / "q.gguf", gguf_type)
    reader = gguf.GGUFReader(tmp_path / "q.gguf")
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_qkv.weight"] == gguf.GGMLQuantizationType[matrices]
    assert types["position_embd.weight"] == gguf.GGMLQuantizationType.F16
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType[file_type]
    assert reader.fields["general.name"].contents() == "run"  # runs/NAME/model.safetensors is NAME, as served
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert (tmp_path / "q.gguf").stat().st_mode & 0o777 == user_mode(0o666)  # readable as the user's files are


def test_int8_model_exports_dequantized(tmp_path):
    from tests.test_model import tiny_model
    from tests.test_quantize import float_and_int8_files

    model = tiny_model()
    i8 = float_and_int8_files(model, tmp_path)[1]
    export_gguf(i8, tmp_path / "q.gguf", "f16")
    import gguf

    reader = gguf.GGUFReader(tmp_path / "q.gguf")
    exported = {t.name: t for t in reader.tensors}["blk.0.ffn_up.weight"]
    want = model.transformer.h[0].mlp.c_fc.weight.detach()
    got = torch.from_numpy(exported.data.astype("float32")).reshape(want.shape)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=0)


# transformers as the oracle for its own format: a small random GPT2LMHeadModel saved locally.

def _hf_random(tmp_path, vocab_size=50257):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=64, resid_pdrop=0.0,
                                    embd_pdrop=0.0, attn_pdrop=0.0, vocab_size=vocab_size)).eval()
    hf.save_pretrained(tmp_path / "hf")
    return hf, tmp_path / "hf"


def _float_gptgen(path):
    """gptgen's float model of a file (an int8 file's weights dequantized), for logit comparisons."""
    from gptgen.interop import _float_tensors
    from gptgen.model import GPT

    config, tensors, _ = _float_tensors(path)
    model = GPT(config)
    model.load_state_dict({**tensors, "lm_head.weight": tensors["transformer.wte.weight"]})
    return model.eval()


IDS = torch.tensor([[464, 3290, 318, 257, 1332, 13, 50256, 15496, 11, 995]])


@torch.no_grad()
def test_import_from_transformers_gives_the_same_logits_and_round_trips(tmp_path):
    from gptgen.interop import export_hf, import_hf

    hf, folder = _hf_random(tmp_path)
    import_hf(folder, tmp_path / "imported.safetensors")
    ours = _float_gptgen(tmp_path / "imported.safetensors")
    assert torch.allclose(ours(IDS)[0], hf(IDS).logits, atol=1e-4)
    export_hf(tmp_path / "imported.safetensors", tmp_path / "back")
    import_hf(tmp_path / "back", tmp_path / "again.safetensors")
    assert torch.equal(_float_gptgen(tmp_path / "again.safetensors")(IDS)[0], ours(IDS)[0])


@torch.no_grad()
@pytest.mark.parametrize("which", ["random", "bundled"])
def test_export_loads_in_transformers_with_the_same_logits_and_tokens(tmp_path, which):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from gptgen.interop import export_hf
    from tests.conftest import BUNDLED
    from tests.test_model import tiny_model_file

    source = tiny_model_file(tmp_path / "m.safetensors") if which == "random" else BUNDLED  # int8: dequantized
    export_hf(source, tmp_path / "hf")
    assert (tmp_path / "hf").stat().st_mode & 0o777 == user_mode(0o777)  # not mkdtemp's private 0o700
    assert (tmp_path / "hf" / "model.safetensors").stat().st_mode & 0o777 == user_mode(0o666)  # as config.json
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    ids = IDS[:, :8]
    assert torch.allclose(hf(ids).logits, _float_gptgen(source)(ids)[0], atol=1e-4)
    text = "Wherefore art thou, Romeo? 🎭 naïve — 東京\n\n  indented"
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").encode(text) == get_tokenizer().encode_ordinary(text)


def test_hf_export_that_fails_part_way_leaves_no_folder(tmp_path, monkeypatch):
    import errno

    import gptgen.interop
    from tests.conftest import BUNDLED

    def full_disk(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gptgen.interop, "write_safetensors", full_disk)
    with pytest.raises(OSError, match="No space left"):
        gptgen.interop.export_hf(BUNDLED, tmp_path / "new" / "hf")
    assert list(tmp_path.iterdir()) == []


def test_hf_export_fills_an_empty_folder_the_current_one_too(tmp_path, monkeypatch):
    """Into "." it failed ("Invalid argument": its temporary folder was made inside it); an empty folder is now
    filled rather than replaced, so a shell standing in it sees the files."""
    from gptgen.interop import export_hf, import_hf
    from tests.conftest import BUNDLED

    (tmp_path / "hf").mkdir()
    folder = os.stat(tmp_path / "hf").st_ino
    monkeypatch.chdir(tmp_path / "hf")
    export_hf(BUNDLED, ".")
    assert os.stat(".").st_ino == folder and (tmp_path / "hf" / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary folder left beside it
    import_hf(".", tmp_path / "back.safetensors")
    assert torch.equal(_float_gptgen(tmp_path / "back.safetensors")(IDS)[0], _float_gptgen(BUNDLED)(IDS)[0])


def test_hf_export_into_an_empty_folder_works_inside_it(tmp_path, monkeypatch):
    """Its temporary folder went beside it: on another filesystem where the folder is a mount point (a container's
    bind mount: the renames failed with EXDEV), or refused where the parent is not writable. One that a killed
    export left inside it does not make the folder taken, and goes."""
    import tempfile
    import time
    from pathlib import Path

    from gptgen.config import GptgenError
    from gptgen.interop import EXPORT_STALE_S, export_hf
    from tests.conftest import BUNDLED

    out = tmp_path / "mounted"
    (out / ".gptgen-export-killed.tmp").mkdir(parents=True)
    (out / ".gptgen-export-killed.tmp" / "model.safetensors").write_bytes(b"half")
    with pytest.raises(GptgenError, match="another export is writing into .*gptgen-export-killed.tmp"):
        export_hf(BUNDLED, out)  # young: perhaps another export's, under way (it was removed, and that one failed)
    os.utime(out / ".gptgen-export-killed.tmp", (time.time() - EXPORT_STALE_S - 60,) * 2)
    made_in, mkdtemp = [], tempfile.mkdtemp
    monkeypatch.setattr(tempfile, "mkdtemp", lambda **kw: made_in.append(Path(kw["dir"])) or mkdtemp(**kw))
    export_hf(BUNDLED, out)
    assert made_in == [out]
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "gptgen.json", "merges.txt", "model.safetensors",
        "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]


def test_hf_bad_input_is_a_clear_error_and_overwrites_nothing(tmp_path):
    import json

    from gptgen.checkpoint import ModelFileError
    from gptgen.interop import export_hf, import_hf
    from tests.conftest import BUNDLED

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(GptgenError, match="not an empty directory"):
        export_hf(BUNDLED, busy)
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    with pytest.raises(ModelFileError):
        export_hf(tmp_path / "corrupt.safetensors", tmp_path / "new" / "hf")
    assert not (tmp_path / "new").exists()  # no folder made for an export that could not start
    with pytest.raises(ModelFileError, match="'nothere' does not exist"):
        import_hf("nothere", tmp_path / "x.safetensors")
    _, folder = _hf_random(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ModelFileError, match="'llama' model; gptgen imports GPT-2 only"):
        import_hf(folder, tmp_path / "x.safetensors")
    for option in ({"tie_word_embeddings": False}, {"layer_norm_epsilon": 1e-6}, {"scale_attn_weights": False}):
        (folder / "config.json").write_text(json.dumps({**config, **option}))
        with pytest.raises(ModelFileError, match=f"sets {re.escape(json.dumps(option))}; gptgen's GPT-2 has"):
            import_hf(folder, tmp_path / "x.safetensors")
    for n_layer in (3, 100_000_000):  # the second took minutes and gigabytes to say so
        (folder / "config.json").write_text(json.dumps({**config, "n_layer": n_layer}))
        with pytest.raises(ModelFileError, match=f"n_layer {n_layer:,}, weights of 2 layers"):
            import_hf(folder, tmp_path / "x.safetensors")
    with pytest.raises(ModelFileError, match="is a file: give the transformers model's directory"):
        import_hf(folder / "model.safetensors", tmp_path / "x.safetensors")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(ModelFileError, match="never unpickles"):
        import_hf(folder, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_a_broken_transformers_folder_is_a_clear_error(tmp_path):
    """Each of these was a traceback (JSONDecodeError, AttributeError, KeyError, SafetensorError)."""
    import json

    from gptgen.checkpoint import ModelFileError
    from gptgen.interop import import_hf, read_hf

    _, folder = _hf_random(tmp_path)
    config = (folder / "config.json").read_text()
    sizes = "sets sizes that are not positive whole numbers: "
    for text, message in [("{not json", "is not readable JSON"), ("[1]", "is not a JSON object of settings"),
                          (json.dumps({**json.loads(config), "vocab_size": 1000}), "a vocabulary of 1,000 tokens; "),
                          (json.dumps({**json.loads(config), "vocab_size": None}), sizes + '{"vocab_size": null}'),
                          (json.dumps({**json.loads(config), "n_embd": "64"}), sizes + '{"n_embd": "64"}'),
                          (json.dumps({**json.loads(config), "n_layer": True}), sizes + '{"n_layer": true}')]:
        (folder / "config.json").write_text(text)
        with pytest.raises(ModelFileError, match=message):
            import_hf(folder, tmp_path / "x.safetensors")
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))  # transformers' defaults: GPT-2 small
    with pytest.raises(ModelFileError, match="does not match its config.json"):  # ... which these weights are not
        read_hf(folder)
    (folder / "config.json").write_text(config)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelFileError, match="is not a readable safetensors file"):
        import_hf(folder, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


@torch.no_grad()
def test_import_reads_the_weights_transformers_wrote_and_no_other_file(tmp_path):
    """Every *.safetensors file of the folder was read as weights: a gptgen file imported into it (a later one by
    name overwrote the export's tensors). Sharded weights are read by their index."""
    from gptgen.checkpoint import ModelFileError
    from gptgen.interop import import_hf

    hf, folder = _hf_random(tmp_path)
    import_hf(folder, folder / "zz-imported.safetensors")
    import_hf(folder, tmp_path / "again.safetensors")
    assert torch.allclose(_float_gptgen(tmp_path / "again.safetensors")(IDS)[0], hf(IDS).logits, atol=1e-4)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    assert len(list((tmp_path / "sharded").glob("model-*-of-*.safetensors"))) > 1
    import_hf(tmp_path / "sharded", tmp_path / "from-shards.safetensors")
    assert torch.equal(_float_gptgen(tmp_path / "from-shards.safetensors")(IDS)[0],
                       _float_gptgen(tmp_path / "again.safetensors")(IDS)[0])
    # an index (a Hub repo's, say) that names files outside its folder: another model's weights, read as its own
    index = tmp_path / "sharded" / "model.safetensors.index.json"
    for outside in (str(tmp_path / "again.safetensors"), "../again.safetensors"):
        entries = json.loads(index.read_text())
        entries["weight_map"]["lm_head.weight"] = outside
        index.write_text(json.dumps(entries))
        with pytest.raises(ModelFileError, match=f"names weights files outside its folder: {re.escape(outside)}$"):
            import_hf(tmp_path / "sharded", tmp_path / "escaped.safetensors")


@torch.no_grad()
def test_a_padded_vocabulary_imports_as_gpt2s_tokens(tmp_path):
    """nanoGPT pads GPT-2's 50,257 tokens to 50,304 (and fine-tunes add a pad token): imported as they were, the
    model could draw an id the tokenizer cannot decode (KeyError: '50257' mid-generation)."""
    import gptgen
    from gptgen.interop import import_hf

    hf, folder = _hf_random(tmp_path, vocab_size=50304)
    import_hf(folder, tmp_path / "imported.safetensors")
    ours = _float_gptgen(tmp_path / "imported.safetensors")
    assert ours.config.vocab_size == 50257
    assert torch.allclose(ours(IDS)[0], hf(IDS).logits[..., :50257], atol=1e-4)
    assert gptgen.load(tmp_path / "imported.safetensors").generate("A", max_new_tokens=20, seed=0, top_k=0)


@torch.no_grad()
def test_a_config_naming_sizes_as_gpt2config_also_does_imports_them(tmp_path):
    """GPT2Config also takes num_attention_heads, num_hidden_layers, hidden_size and max_position_embeddings. Read
    under gptgen's names only, a head count given so became 12, without a word: it changes no tensor's shape."""
    import json

    from gptgen.checkpoint import ModelFileError
    from gptgen.interop import import_hf

    hf, folder = _hf_random(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    names = {"n_head": "num_attention_heads", "n_layer": "num_hidden_layers", "n_embd": "hidden_size",
             "n_positions": "max_position_embeddings"}
    (folder / "config.json").write_text(json.dumps({names.get(k, k): v for k, v in config.items()}))
    import_hf(folder, tmp_path / "imported.safetensors")
    assert torch.allclose(_float_gptgen(tmp_path / "imported.safetensors")(IDS)[0], hf(IDS).logits, atol=1e-4)
    (folder / "config.json").write_text(json.dumps({**config, "num_attention_heads": 4}))
    with pytest.raises(ModelFileError, match="sets n_head 2 and num_attention_heads 4, two names of one setting"):
        import_hf(folder, tmp_path / "x.safetensors")


def test_a_gpt2_with_a_tokenizer_of_its_own_is_refused(tmp_path):
    """Every gptgen command runs a model with GPT-2's tokenizer: a GPT-2 made with another BPE imported silently,
    and wrote nonsense. Tokens added after GPT-2's (a pad token) are fine."""
    import json

    from gptgen.checkpoint import ModelFileError
    from gptgen.interop import export_hf, import_hf

    _, folder = _hf_random(tmp_path)
    import_hf(folder, tmp_path / "m.safetensors")
    export_hf(tmp_path / "m.safetensors", tmp_path / "exported")  # with GPT-2's vocab.json
    vocab = json.loads((tmp_path / "exported" / "vocab.json").read_text())
    (tmp_path / "exported" / "vocab.json").write_text(json.dumps({**vocab, "<pad>": 50257}))
    import_hf(tmp_path / "exported", tmp_path / "padded.safetensors")
    other = {**vocab, "Ġthe": vocab["Ġand"], "Ġand": vocab["Ġthe"]}  # two tokens' ids swapped
    for name, content in [("vocab.json", other), ("tokenizer.json", {"model": {"type": "BPE", "vocab": other}})]:
        (tmp_path / "exported" / "vocab.json").write_text(json.dumps(vocab))
        (tmp_path / "exported" / name).write_text(json.dumps(content))
        with pytest.raises(ModelFileError, match=rf"has a tokenizer of its own \({name}: 2 of GPT-2's 50,257 tokens"):
            import_hf(tmp_path / "exported", tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_a_transformers_tensor_of_the_wrong_shape_is_refused_by_name(tmp_path):
    """Imported unchecked, it made a model file that only failed when loaded, far from its cause."""
    from safetensors.torch import load_file, save_file

    from gptgen.checkpoint import ModelFileError
    from gptgen.interop import import_hf

    _, folder = _hf_random(tmp_path)
    tensors = load_file(folder / "model.safetensors")
    tensors["transformer.wpe.weight"] = tensors["transformer.wpe.weight"][:32].clone()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelFileError, match=re.escape("tensor transformer.wpe.weight is (32, 64), expected (64, 64)")):
        import_hf(folder, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_an_exported_gptgen_model_comes_back_with_how_it_was_trained(tmp_path):
    """import kept only {"imported_from": ...}: the page then showed no corpus, val loss or curve."""
    from gptgen.checkpoint import ModelFileError, load_model_file, training_info
    from gptgen.interop import export_hf, import_hf
    from tests.conftest import BUNDLED

    export_hf(BUNDLED, tmp_path / "hf")
    with pytest.raises(GptgenError, match="a name ending in .safetensors"):
        import_hf(tmp_path / "hf", tmp_path / "newdir")
    import_hf(tmp_path / "hf", tmp_path / "back.safetensors")
    before, after = (training_info(load_model_file(p)[2]) for p in (BUNDLED, tmp_path / "back.safetensors"))
    assert after == {**before, "imported_from": str(tmp_path / "hf")} and after["curve"]
    (tmp_path / "hf" / "gptgen.json").write_text("{not json")
    with pytest.raises(ModelFileError, match="is not the gptgen.json that an export writes"):
        import_hf(tmp_path / "hf", tmp_path / "again.safetensors")


def test_a_model_whose_training_record_is_not_json_exports_without_it(tmp_path):
    """export read the record with json.loads itself: a traceback where load, the page and the card go on."""
    from safetensors.torch import save_file

    from gptgen.checkpoint import read_safetensors
    from gptgen.interop import export_hf
    from tests.test_model import tiny_model_file

    tensors, metadata = read_safetensors(tiny_model_file(tmp_path / "m.safetensors"))
    save_file(tensors, tmp_path / "odd.safetensors", metadata={**metadata, "training": "{not json"})
    export_hf(tmp_path / "odd.safetensors", tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "gptgen.json").read_text())["training"] == {}


def test_train_init_fine_tunes_a_transformers_gpt2(small_text, tmp_path):
    from gptgen.checkpoint import training_info

    hf, folder = _hf_random(tmp_path)
    summary = train(config(small_text, tmp_path / "run", init=str(folder), steps=2, lr=1e-9, block_size=32))
    model, metadata = load_model(summary["model"])
    assert training_info(metadata)["preset"] == f"from {folder}"
    with torch.no_grad():
        assert torch.allclose(model(IDS)[0], hf(IDS).logits, atol=1e-3)  # started from the pretrained weights
    assert model.config.block_size == hf.config.n_positions  # its pretrained positions stay, beyond block 32
    folder.rename(tmp_path / "moved")  # resuming reads the weights from the run, not the --init source
    from gptgen.train import resume_config

    assert train(resume_config(tmp_path / "run", steps=4), resume=True)["steps"] == 4


def test_hf_export_writes_utf8_whatever_the_locale(tmp_path):
    """GPT-2's byte-level symbols (Ġ, ¡) in vocab.json and merges.txt made a C locale's (or cp1252's) export fail."""
    import os
    import subprocess
    import sys

    from tests.conftest import BUNDLED

    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    r = subprocess.run([sys.executable, "-m", "gptgen", "export", BUNDLED, tmp_path / "hf", "--format", "hf"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "hf" / "merges.txt").read_text(encoding="utf-8").splitlines()[1] == gpt2_vocab()[1][0]


@pytest.mark.parametrize("overrides, message", [
    (dict(n_embd=48, n_head=2), "rows are 48 wide; use --type f16"),  # Q8_0: a scale per 32 weights
    (dict(bias=False), "has no biases"),  # llama.cpp's gpt2 requires them
])
def test_gguf_export_refuses_what_llama_cpp_cannot_take(tmp_path, overrides, message):
    from tests.test_model import tiny_model

    model = tiny_model(**overrides)
    save_model(tmp_path / "m.safetensors", model.state_dict(), model.config)
    with pytest.raises(GptgenError, match=message):
        export_gguf(tmp_path / "m.safetensors", tmp_path / "m.gguf", "q8_0")
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("overrides, message", [
    (dict(bias=False), "transformers export takes GPT-2's layout .*has no biases"),  # written, 7 biases were missing
    (dict(vocab_size=1000), "has 1,000 tokens"),  # written, its tokenizer gave ids past the model's vocabulary
])
def test_hf_export_refuses_what_transformers_gpt2_cannot_take(tmp_path, overrides, message):
    from gptgen.interop import export_hf
    from tests.test_model import tiny_model

    model = tiny_model(**overrides)
    save_model(tmp_path / "m.safetensors", model.state_dict(), model.config)
    with pytest.raises(GptgenError, match=message):
        export_hf(tmp_path / "m.safetensors", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_a_transformers_model_holding_nan_is_refused_by_tensor_not_imported(tmp_path):
    """Imported, the file was written, then refused by every load (and kept in the Hub conversion cache)."""
    from safetensors.torch import load_file, save_file

    from gptgen.checkpoint import ModelFileError
    from gptgen.interop import import_hf

    _, folder = _hf_random(tmp_path)
    weights = load_file(folder / "model.safetensors")
    weights["transformer.h.0.mlp.c_fc.bias"][3] = float("nan")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelFileError, match="tensor transformer.h.0.mlp.c_fc.bias holds NaN or infinite values"):
        import_hf(folder, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
