import errno
import json
import os
import pickle
import re
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gptgen.checkpoint import (
    RECORD_FIELDS,
    TIED,
    ModelFileError,
    atomic_path,
    atomic_write,
    load_model,
    load_model_file,
    load_optimizer,
    save_model,
    save_optimizer,
    training_info,
)
from gptgen.config import GPTConfig, GptgenError
from gptgen.quantize import quantize_state_dict
from tests.test_model import tiny_model


@pytest.fixture
def model_file(tmp_path):
    model = tiny_model()
    path = tmp_path / "m.safetensors"
    save_model(path, model.state_dict(), model.config, training={"steps": 3})
    return model, path


def test_round_trip_keeps_weights_config_and_tie(model_file):
    model, path = model_file
    loaded, metadata = load_model(path)
    assert loaded.config == model.config
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    for name, t in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], t, rtol=0, atol=0)
    assert metadata["format"] == "gptgen/1" and metadata["quantization"] == "none"
    assert metadata["tokenizer"] == "gpt2" and json.loads(metadata["training"]) == {"steps": 3}


def test_tied_weight_is_stored_once(model_file):
    _, path = model_file
    _, tensors, _ = load_model_file(path)
    assert "lm_head.weight" not in tensors and "transformer.wte.weight" in tensors


def _corrupt(path, how):
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "pickle":
        path.write_bytes(pickle.dumps({"weight": [1.0, 2.0]}))
    elif how == "garbage":
        path.write_bytes(b"\x89PNG\r\n" + b"\x00" * 100)
    elif how == "header":
        n = struct.unpack("<Q", data[:8])[0]
        path.write_bytes(data[:8] + b"{" * n + data[8 + n:])


@pytest.mark.parametrize("how", ["truncated", "pickle", "garbage", "header"])
def test_corrupt_files_give_a_clear_error(model_file, how):
    _, path = model_file
    _corrupt(path, how)
    with pytest.raises(ModelFileError, match="not a readable safetensors file"):
        load_model(path)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("int8", [False, True])
def test_a_model_holding_nan_or_inf_is_refused_by_tensor(model_file, tmp_path, value, int8):
    """Sampling from one raised inside torch.multinomial (at temperature 0 it gave some token)."""
    from gptgen.quantize import quantize_state_dict

    model, path = model_file
    _, tensors, _ = load_model_file(path)
    if int8:
        tensors = quantize_state_dict(tensors)
    name = "transformer.h.1.mlp.c_fc.weight.scale" if int8 else "transformer.h.1.mlp.c_fc.weight"
    tensors[name].view(-1)[7] = value
    bad = tmp_path / "bad.safetensors"
    save_model(bad, tensors, model.config, quantization="int8" if int8 else "none")
    with pytest.raises(ModelFileError, match=f"tensor {re.escape(name)} holds NaN or infinite values"):
        load_model(bad)


def test_a_half_precision_model_whose_weights_sum_past_float16s_range_loads(tmp_path):
    """The NaN check summed in float16, whose largest number is 65,504: finite weights were refused."""
    model = tiny_model().half()
    with torch.no_grad():
        model.transformer.wte.weight.fill_(0.5)  # 0.5 x 50,257 x 32 = 804,112
    save_model(tmp_path / "m.safetensors", model.state_dict(), model.config)
    assert torch.equal(load_model(tmp_path / "m.safetensors")[0].transformer.wte.weight, model.transformer.wte.weight)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_a_float8_tensor_is_a_clear_error(model_file, tmp_path, dtype):
    """It passed as a float, then the NaN check's sum raised NotImplementedError: a traceback."""
    model, path = model_file
    tensors = {**load_model_file(path)[1], "transformer.h.0.ln_1.weight": torch.ones(32, dtype=dtype)}
    save_model(tmp_path / "f8.safetensors", tensors, model.config)
    with pytest.raises(ModelFileError, match=f"tensor transformer.h.0.ln_1.weight is {dtype}; gptgen reads float32"):
        load_model(tmp_path / "f8.safetensors")


def test_a_float_model_of_mixed_dtypes_runs_in_float32(model_file, tmp_path):
    """`gptgen eval` (load_model, no cast after it) failed in the forward: "mixed dtype"."""
    model, path = model_file
    tensors = load_model_file(path)[1]
    tensors["transformer.ln_f.weight"] = tensors["transformer.ln_f.weight"].double()
    save_model(tmp_path / "mixed.safetensors", tensors, model.config)
    mixed = load_model(tmp_path / "mixed.safetensors")[0]
    assert {p.dtype for p in mixed.parameters()} == {torch.float32}
    idx = torch.tensor([[1, 2, 3]])
    assert torch.allclose(mixed(idx)[0], model.eval()(idx)[0], atol=1e-6)


@pytest.mark.parametrize("value", [0.0, -0.02, 1e38])
def test_an_int8_scale_that_is_not_positive_or_overflows_is_refused(model_file, tmp_path, value):
    """A negative one loaded, its row's weights flipped; 127 x 1e38 is infinite, and sampling raised later."""
    model, path = model_file
    tensors = quantize_state_dict(load_model_file(path)[1])
    tensors["transformer.h.0.attn.c_attn.weight.scale"][5] = value
    save_model(tmp_path / "bad.safetensors", tensors, model.config, quantization="int8")
    with pytest.raises(ModelFileError, match="c_attn.weight.scale holds scales that are not positive or overflow"):
        load_model(tmp_path / "bad.safetensors")


def test_a_models_state_dict_quantizes_to_a_file_that_loads(model_file, tmp_path):
    """quantize_state_dict(model.state_dict()) gave lm_head.weight.scale too, which every load refused."""
    model, _ = model_file
    save_model(tmp_path / "q.safetensors", quantize_state_dict(model.state_dict()), model.config, quantization="int8")
    assert load_model(tmp_path / "q.safetensors")[1]["quantization"] == "int8"


def test_missing_file_and_foreign_safetensors(tmp_path):
    with pytest.raises(ModelFileError, match="does not exist"):
        load_model(tmp_path / "nope.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(ModelFileError, match="not a gptgen model"):
        load_model(tmp_path / "other.safetensors")
    save_file({"w": torch.zeros(2)}, tmp_path / "hf.safetensors", metadata={"format": "pt"})  # transformers' own
    with pytest.raises(ModelFileError, match="format 'pt'.*gptgen import"):
        load_model(tmp_path / "hf.safetensors")
    (tmp_path / "run").mkdir()
    with pytest.raises(ModelFileError, match="is a directory, not a .safetensors file$"):
        load_model(tmp_path / "run")
    (tmp_path / "run" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelFileError, match="did you mean .*model.safetensors"):
        load_model(tmp_path / "run")
    save_file({"state.0.exp_avg": torch.zeros(2)}, tmp_path / "run" / "optim-0000040.safetensors",
              metadata={"param_groups": "[]"})  # as save_optimizer writes it: not a model, and not an import
    with pytest.raises(ModelFileError, match="is a training run's optimizer state, not a model; the run's model is "
                                             ".*run/model.safetensors'$"):
        load_model(tmp_path / "run" / "optim-0000040.safetensors")
    save_file({"w": torch.zeros(2)}, tmp_path / "v2.safetensors", metadata={"format": "gptgen/2"})
    with pytest.raises(ModelFileError, match="gptgen/2"):
        load_model(tmp_path / "v2.safetensors")


def test_tensors_that_do_not_match_the_config(model_file, tmp_path):
    model, _ = model_file
    bigger = GPTConfig(n_layer=3, n_head=2, n_embd=32, block_size=16)
    save_model(tmp_path / "x.safetensors", model.state_dict(), bigger)
    with pytest.raises(ModelFileError, match="does not match its config: n_layer 3, weights of 2 layers"):
        load_model(tmp_path / "x.safetensors")
    wider = GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=16)
    save_model(tmp_path / "y.safetensors", model.state_dict(), wider)
    with pytest.raises(ModelFileError, match="tensor .* expected"):
        load_model(tmp_path / "y.safetensors")


def test_a_header_of_a_hundred_million_layers_is_refused_at_once(model_file, tmp_path):
    """The shapes were checked against a GPT built from the header's config (~1 ms a layer): a 300-byte file that
    said 100,000,000 layers hung every command that read it."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    model, _ = model_file
    huge = GPTConfig(n_layer=100_000_000, n_head=2, n_embd=32, block_size=16)
    save_model(tmp_path / "huge.safetensors", {"transformer.wpe.weight": model.transformer.wpe.weight}, huge)
    r = subprocess.run([sys.executable, "-m", "gptgen", "generate", str(tmp_path / "huge.safetensors"), "hi"],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 2 and "n_layer 100,000,000, weights of 0 layers" in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("fails", ["mid-write", "at fsync"])
def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch, fails):
    """A disk that fills up part-way through the data, or whose fsync reports a lost write: the old file stays
    whole and no temporary file is left."""
    path = tmp_path / "f.bin"
    atomic_write(path, b"old")

    def full_disk(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    if fails == "mid-write":
        def write_bytes(self, data):
            self.open("wb").write(data[:2])
            full_disk()

        monkeypatch.setattr(Path, "write_bytes", write_bytes)
    else:
        monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        atomic_write(path, b"new data")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_a_failed_write_removes_the_folders_it_made_and_keeps_what_others_wrote(tmp_path, monkeypatch):
    """A full disk while writing into new folders: the folders it made go, unless something else wrote in them."""
    def full_disk(fd):
        (tmp_path / "a" / "other.txt").write_text("another program's")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        atomic_write(tmp_path / "a" / "b" / "c" / "f.bin", b"data")
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["a", "a/other.txt"]


def test_atomic_write_fsyncs_the_directory_after_the_rename(tmp_path, monkeypatch):
    """The rename lives in the directory's data: unsynced, a power cut after "saved" can bring back the old file."""
    events, real_replace, real_fsync = [], os.replace, os.fsync
    monkeypatch.setattr(os, "replace", lambda *args: (real_replace(*args), events.append("replace"))[0])
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(os.fstat(fd).st_ino), real_fsync(fd))[1])
    atomic_write(tmp_path / "f.bin", b"new")
    assert events == [(tmp_path / "f.bin").stat().st_ino, "replace", tmp_path.stat().st_ino]


def test_on_windows_a_write_does_not_open_its_folder(tmp_path, monkeypatch):
    """Windows opens no folder as a file (PermissionError): every save failed after its rename."""
    real_open = os.open

    def as_windows(path, flags, *args):
        if os.path.isdir(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)

    import types

    import gptgen.checkpoint

    # os.name for gptgen's writes alone: pathlib makes WindowsPaths where it is "nt"
    windows = types.SimpleNamespace(**{**vars(os), "name": "nt", "open": as_windows})
    monkeypatch.setattr(gptgen.checkpoint, "os", windows)
    atomic_write(tmp_path / "f.bin", b"new")
    assert (tmp_path / "f.bin").read_bytes() == b"new"


@pytest.mark.parametrize("links", ["hard links", "no hard links (FAT, some FUSE)"])
def test_a_new_file_never_replaces_one_made_while_it_was_written(tmp_path, monkeypatch, links):
    """quantize, import and export check that their output is new before the work, which takes minutes for a
    large model; a file another program makes there meanwhile must survive."""
    if links.startswith("no"):
        def no_links(*args):
            raise OSError(errno.EPERM, "Operation not permitted")

        monkeypatch.setattr(os, "link", no_links)
    taken, new = tmp_path / "taken.bin", tmp_path / "new.bin"
    with pytest.raises(GptgenError, match="taken.bin' exists; give a new file name"):
        with atomic_path(taken, new=True) as tmp:
            tmp.write_bytes(b"ours")
            taken.write_bytes(b"theirs")
    with atomic_path(new, new=True) as tmp:
        tmp.write_bytes(b"ours")
    assert taken.read_bytes() == b"theirs" and new.read_bytes() == b"ours" and new.stat().st_nlink == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.bin", "taken.bin"]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_written_files_get_the_users_usual_mode(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "f.bin", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "f.bin").stat().st_mode & 0o777 == mode  # not mkstemp's private 0o600 only


def test_optimizer_state_round_trip(tmp_path):
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))[1].backward()
    opt.step()
    save_optimizer(tmp_path / "o.safetensors", opt)
    opt2 = torch.optim.AdamW(model.parameters(), lr=5.0)
    load_optimizer(tmp_path / "o.safetensors", opt2)
    assert opt2.param_groups[0]["lr"] == 1e-3
    for p in model.parameters():
        torch.testing.assert_close(opt2.state[p]["exp_avg"], opt.state[p]["exp_avg"], rtol=0, atol=0)


# Hostile files, as property tests: a cut anywhere, a header length that lies, a header that is any JSON.
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def small_file(tmp_path_factory):
    model = tiny_model(vocab_size=256)
    path = tmp_path_factory.mktemp("fuzz") / "m.safetensors"
    save_model(path, model.state_dict(), model.config, training={"steps": 1})
    return path.read_bytes()


def _load_bytes(tmp_path, data: bytes) -> None:
    path = tmp_path / "fuzzed.safetensors"
    path.write_bytes(data)
    with pytest.raises(ModelFileError):
        load_model(path)


@FUZZ
@given(st.data())
def test_a_file_cut_anywhere_is_a_clear_error(small_file, tmp_path, data):
    _load_bytes(tmp_path, small_file[:data.draw(st.integers(0, len(small_file) - 1))])


@FUZZ
@given(st.integers(0, 2**64 - 1))
def test_a_header_length_that_lies_is_a_clear_error(small_file, tmp_path, length):
    true_length = struct.unpack("<Q", small_file[:8])[0]
    if length != true_length:
        _load_bytes(tmp_path, struct.pack("<Q", length) + small_file[8:])


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=10)


@FUZZ
@given(st.dictionaries(st.sampled_from(["format", "config", "quantization", "tokenizer", "training"]),
                       st.one_of(st.text(max_size=30), JSON.map(json.dumps)), min_size=1))
def test_any_metadata_is_loaded_or_a_clear_error(small_file, tmp_path, changes):
    n = struct.unpack("<Q", small_file[:8])[0]
    header = json.loads(small_file[8:8 + n])
    header["__metadata__"] = {**header["__metadata__"], **changes}
    raw = json.dumps(header).encode()
    path = tmp_path / "meta.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + small_file[8 + n:])
    try:
        load_model(path)
    except ModelFileError:
        pass


RECORD = st.dictionaries(st.sampled_from([*RECORD_FIELDS, "date"]), JSON | st.floats(), max_size=8)


@FUZZ
@given(st.one_of(RECORD, JSON))
def test_any_training_record_reaches_the_page_and_the_card_without_an_exception(tmp_path, record):
    """A record that was not an object, or a field of another type, crashed the page's model panel, the Hub card
    and `gptgen eval`: only loading was fuzzed."""
    from gptgen import hub, web

    model = tiny_model(vocab_size=256)
    save_model(tmp_path / "m.safetensors", model.state_dict(), model.config, training=record)
    metadata = load_model_file(tmp_path / "m.safetensors")[2]
    assert isinstance(training_info(metadata), dict)
    assert "### m" in web.model_card("m", model.config, metadata)[0]
    assert "# my-model" in hub.model_card(tmp_path / "m.safetensors", "you/my-model")


def test_the_umask_is_read_without_being_set(monkeypatch):
    """Setting it to read it (and back) could race with another thread creating a file, which then got mode 666."""
    from gptgen.checkpoint import user_mode

    current = os.umask(0o022)
    os.umask(current)
    monkeypatch.setattr(os, "umask", lambda *args: pytest.fail("os.umask was called"))
    assert user_mode(0o666) == 0o666 & ~current


@pytest.mark.parametrize("dtype", [torch.int8, torch.int64])
def test_a_float_model_tensor_of_another_dtype_is_a_clear_error(tmp_path, dtype):
    """An int8 wpe in a float file reached the meta device ("Cannot copy out of meta tensor"), an int64 one
    load_state_dict's traceback."""

    m = tiny_model()
    state = {**m.state_dict(), "transformer.wpe.weight": m.transformer.wpe.weight.to(dtype)}
    save_model(tmp_path / "m.safetensors", state, m.config)
    with pytest.raises(ModelFileError, match=f"tensor transformer.wpe.weight is {dtype}.*expected float"):
        load_model(tmp_path / "m.safetensors")


def test_a_quantization_this_version_does_not_know_is_refused(model_file, tmp_path):
    model, _ = model_file
    save_model(tmp_path / "q4.safetensors", model.state_dict(), model.config, quantization="int4")
    with pytest.raises(ModelFileError, match="reads none or int8"):
        load_model(tmp_path / "q4.safetensors")


@pytest.mark.parametrize("quantization, name, bad, message", [
    ("none", "transformer.h.0.ln_1.weight", torch.ones(31), "tensor transformer.h.0.ln_1.weight is torch.float32 "
     "(31,), expected float (32,)"),
    ("none", "transformer.h.0.extra.weight", torch.ones(2), "unexpected ['transformer.h.0.extra.weight']"),
    ("int8", "transformer.h.0.mlp.c_fc.weight.scale", torch.ones(128, dtype=torch.float16),
     "tensor transformer.h.0.mlp.c_fc.weight.scale is torch.float16 (128,), expected torch.float32 (128,)"),
])
def test_a_tensor_the_config_does_not_expect_is_refused_by_name(tmp_path, quantization, name, bad, message):
    """A wrong shape, a stray tensor, a float16 int8 scale: refused, naming it, not a crash or wrong maths later."""
    m = tiny_model()
    state = {k: v for k, v in m.state_dict().items() if k != TIED}
    state = quantize_state_dict(state) if quantization == "int8" else state
    save_model(tmp_path / "m.safetensors", {**state, name: bad}, m.config, quantization=quantization)
    with pytest.raises(ModelFileError, match=re.escape(message)):
        load_model(tmp_path / "m.safetensors")


def _int8_file(path, **overrides):
    m = tiny_model(**overrides)
    state = {k: v for k, v in m.state_dict().items() if k != TIED}
    save_model(path, quantize_state_dict(state), m.config, quantization="int8")
    return path


@pytest.mark.parametrize("n_embd", [32, 64])
def test_an_int8_file_replaced_while_it_loads_is_a_clear_error(tmp_path, monkeypatch, n_embd):
    """Packing reads each int8 weight again: a file swapped for another in between (another model, or the next save
    of the same run, whose shapes match) is refused, not mixed into the model."""
    import gptgen.checkpoint as checkpoint

    path = _int8_file(tmp_path / "m.safetensors")
    other = _int8_file(tmp_path / "other.safetensors", n_embd=n_embd)
    checked = checkpoint.load_model_file

    def then_swapped(p):
        out = checked(p)
        os.replace(other, path)
        return out

    monkeypatch.setattr(checkpoint, "load_model_file", then_swapped)
    with pytest.raises(ModelFileError, match="changed while it was being loaded"):
        load_model(path)
    monkeypatch.setattr(checkpoint, "load_model_file", lambda p: (checked(p), os.remove(p))[0])
    with pytest.raises(ModelFileError, match="could not be read again while loading"):
        load_model(path)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS is read from Linux's /proc")
def test_loading_an_int8_model_peaks_at_about_the_loaded_models_memory(tmp_path):
    """Each int8 weight leaves memory as it is packed, and the head's 37 MiB packing copies come first: the peak
    RSS while loading `gpt2` is about the RSS once loaded. Packed from the file's one memory map, every weight stayed
    in memory until the last was packed (81 MiB above); with the head packed last, its copies were (58 MiB)."""
    import subprocess
    import sys

    from tests.conftest import write_random_int8_model

    path = write_random_int8_model(tmp_path / "gpt2.safetensors", "gpt2")
    child = f"""
import torch
from safetensors.torch import load_file
from gptgen.checkpoint import load_model
def mib(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":")) / 1024
open("/proc/self/clear_refs", "w").write("5")  # VmHWM starts again from VmRSS
model = load_model({str(path)!r})
print(mib("VmHWM") - mib("VmRSS"))
"""
    above = float(subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True).stdout)
    assert above < 25, f"loading peaked {above:.0f} MiB above the loaded model"


def test_a_write_that_fails_without_naming_a_file_names_the_target(tmp_path):
    """A full disk during a write raises an OSError naming no file (safetensors' and gguf's writers): the CLI
    printed a traceback for it instead of an error naming the file the user gave."""
    import errno

    target = tmp_path / "out.safetensors"
    with pytest.raises(OSError) as failed, atomic_path(target):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert (failed.value.errno, failed.value.filename) == (errno.ENOSPC, str(target))
    assert list(tmp_path.iterdir()) == []  # and the temporary file is gone


@pytest.mark.skipif(not hasattr(os, "pread"), reason="no os.pread (Windows): the rows stay in memory there")
def test_file_rows_read_an_int8_files_rows_and_refuse_ids_past_them(tmp_path):
    """The embedding of a loaded int8 model reads its rows from the file (load and lookups: test_quantize)."""
    from gptgen.checkpoint import FileRows, _identity
    from gptgen.quantize import quantize_state_dict
    from tests.test_model import tiny_model

    model = tiny_model()
    path = tmp_path / "i8.safetensors"
    save_model(path, quantize_state_dict(model.state_dict()), model.config, quantization="int8")
    stored = load_file(path)["transformer.wte.weight"]
    rows = FileRows(path, "transformer.wte.weight", _identity(path))
    ids = torch.tensor([[3, 0, 3], [stored.size(0) - 1, 7, 1]])
    assert torch.equal(rows[ids], stored[ids]) and rows[torch.tensor([], dtype=torch.long)].shape == (0, 32)
    for bad in (stored.size(0), -1):
        with pytest.raises(IndexError, match=f"token id {bad} is out of range for {stored.size(0)} rows"):
            rows[torch.tensor([1, bad])]
    # a copy reads through a descriptor of its own: the original's, closed with it, may be another file's by then
    import copy
    import gc
    import pickle

    twin = copy.deepcopy(rows)
    del rows
    gc.collect()
    with open(tmp_path / "other", "w+b") as other:  # likely given the closed descriptor's number
        other.write(b"x" * 100_000)
        other.flush()
        assert torch.equal(twin[ids], stored[ids])
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(twin)
    identity = _identity(path)
    save_model(path, quantize_state_dict(tiny_model().state_dict()), model.config, quantization="int8")  # a new save
    with pytest.raises(ModelFileError, match=r"^model file .* changed while it was being loaded"):
        FileRows(path, "transformer.wte.weight", identity)
    os.truncate(path, twin.start + 10 * twin.width)  # cut short in place, ten rows left
    cut = FileRows(path, "transformer.wte.weight", _identity(path))
    with pytest.raises(ModelFileError, match="no longer holds its embedding's row 50"):
        cut[torch.tensor([0, 50])]
