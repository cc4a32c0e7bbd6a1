"""Export to other runtimes. GGUF (llama.cpp's format, architecture `gpt2`) so a gptgen model also runs
in llama.cpp / llama-server; the weight names and the GPT-2 vocabulary are mapped here and nowhere else.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from gptgen.checkpoint import (
    ModelFileError,
    atomic_path,
    atomic_write,
    check_depth,
    fsync_dir,
    given_name,
    load_model_file,
    naming_the_target,
    new_file,
    parents_made,
    read_config,
    read_safetensors,
    refuse_nonfinite,
    save_model,
    training_info,
    user_mode,
    write_safetensors,
)
from gptgen.config import GPTConfig, GptgenError
from gptgen.quantize import SCALE, dequantize_rows
from gptgen.tokenizer import EOT, EOT_ID, get_tokenizer

log = logging.getLogger(__name__)
GGUF_TYPES = ("f16", "q8_0")


def _gguf_names(n_layer: int) -> dict[str, str]:
    names = {"transformer.wte.weight": "token_embd.weight", "transformer.wpe.weight": "position_embd.weight",
             "transformer.ln_f.weight": "output_norm.weight", "transformer.ln_f.bias": "output_norm.bias"}
    ours = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
            "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
    for i in range(n_layer):
        for src, dst in ours.items():
            for kind in ("weight", "bias"):
                names[f"transformer.h.{i}.{src}.{kind}"] = f"blk.{i}.{dst}.{kind}"
    return names


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters, used by its vocab and merges files."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = (b for b in range(256) if b not in printable)
    return {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(extra)}


def gpt2_tokens() -> list[str]:
    """GPT-2's tokens in its text form (vocab.json's), by id."""
    enc, to_text = get_tokenizer(), _byte_to_unicode()
    return ["".join(to_text[b] for b in enc.decode_single_token_bytes(i)) for i in range(EOT_ID)] + [EOT]


def gpt2_vocab() -> tuple[list[str], list[str]]:
    """(tokens, merges) in GPT-2's text form, derived from the BPE ranks: each merge is the last step of BPE
    on a token using only the ranks below its own."""
    enc = get_tokenizer()
    to_text = _byte_to_unicode()
    ranks = {enc.decode_single_token_bytes(i): i for i in range(EOT_ID)}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            pairs = [(ranks.get(a + b, rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:], strict=False))]
            best, i = min(pairs)
            if best >= rank:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) == 2:
            merges.append(" ".join("".join(to_text[b] for b in p) for p in parts))
    return gpt2_tokens(), merges


def _float_tensors(path: str | os.PathLike) -> tuple:
    """The file's config and float32 tensors (an int8 model is dequantized)."""
    config, tensors, metadata = load_model_file(path)
    out = {}
    for name, t in tensors.items():
        if name.endswith(SCALE):
            continue
        if t.dtype == torch.int8:
            t = dequantize_rows(t, tensors[name + SCALE])
        out[name] = t.float()
    return config, out, metadata


def _gpt2_layout(model_path: str | os.PathLike, target: str, exact_vocab: bool) -> GPTConfig:
    """The model's config (from the file's header) if it has the layout of llama.cpp's and transformers' GPT-2:
    biases, and GPT-2's tokens (exactly its 50,257 for llama.cpp's token list; at least them for transformers')."""
    config = read_config(model_path)
    if not config.bias or config.vocab_size < VOCAB or (exact_vocab and config.vocab_size != VOCAB):
        tokens = f"{VOCAB:,}" if exact_vocab else f"at least {VOCAB:,}"
        has = "no biases" if not config.bias else f"{config.vocab_size:,} tokens"
        raise GptgenError(f"{str(model_path)!r}: {target} export takes GPT-2's layout (biases, {tokens} tokens); "
                          f"this model has {has}")
    return config


def export_gguf(model_path: str | os.PathLike, out: str | os.PathLike, gguf_type: str = "f16") -> None:
    import gguf

    if gguf_type not in GGUF_TYPES:
        raise GptgenError(f"--type must be one of {', '.join(GGUF_TYPES)}, got {gguf_type!r}")
    out = new_file(out, ".gguf")
    config = _gpt2_layout(model_path, "GGUF", exact_vocab=True)
    if gguf_type == "q8_0" and config.n_embd % 32:
        raise GptgenError(f"--type q8_0 stores a scale per 32 weights of a row, and this model's rows are "
                          f"{config.n_embd} wide; use --type f16")
    config, tensors, metadata = _float_tensors(model_path)
    names = _gguf_names(config.n_layer)
    with atomic_path(out, new=True) as tmp:
        w = gguf.GGUFWriter(tmp, "gpt2")
        w.add_name(given_name(model_path))  # a run's model.safetensors by its run folder's name
        w.add_context_length(config.block_size)
        w.add_embedding_length(config.n_embd)
        w.add_feed_forward_length(4 * config.n_embd)
        w.add_block_count(config.n_layer)
        w.add_head_count(config.n_head)
        w.add_layer_norm_eps(1e-5)
        w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if gguf_type == "q8_0" else gguf.LlamaFileType.MOSTLY_F16)
        tokens, merges = gpt2_vocab()
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")
        w.add_token_list(tokens)
        w.add_token_types([gguf.TokenType.NORMAL] * EOT_ID + [gguf.TokenType.CONTROL])
        w.add_token_merges(merges)
        for special in (w.add_bos_token_id, w.add_eos_token_id):
            special(EOT_ID)
        for name, t in tensors.items():
            if name not in names:
                raise ModelFileError(f"{str(model_path)!r}: no GGUF name for tensor {name}")
            array = t.numpy()
            if array.ndim == 1:
                w.add_tensor(names[name], array.astype(np.float32))
            elif gguf_type == "q8_0" and name != "transformer.wpe.weight":
                q8 = gguf.quants.quantize(array.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
                w.add_tensor(names[name], q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            else:
                w.add_tensor(names[name], array.astype(np.float16))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()


# transformers' GPT-2 keeps these four weights in Conv1D layout (in, out); gptgen uses nn.Linear's (out, in).
HF_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
HF_GELU = ("gelu_new", "gelu_pytorch_tanh")  # the tanh approximation gptgen's MLP uses
HF_AS_GPTGEN = {"tie_word_embeddings": True, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                "layer_norm_epsilon": 1e-5}  # transformers' GPT-2 options that change the maths, as gptgen computes
HF_DEFAULTS = {"n_layer": 12, "n_head": 12, "n_embd": 768, "n_positions": 1024, "vocab_size": 50257}  # GPT2Config's
# ... and the other names GPT2Config takes for them (its attribute_map), which a config.json may use instead
HF_ALIASES = {"num_hidden_layers": "n_layer", "num_attention_heads": "n_head", "hidden_size": "n_embd",
              "max_position_embeddings": "n_positions"}
VOCAB = EOT_ID + 1  # GPT-2's BPE: 50,257 tokens
EXPORT_TMP = ".gptgen-export-"  # how an export's temporary folder's name starts
EXPORT_STALE_S = 3600  # one this old is a killed export's; a younger one may be another export's, under way
HF_WEIGHTS, HF_INDEX = "model.safetensors", "model.safetensors.index.json"  # shards: model-00001-of-00002...


def refuse_taken_dir(out: str | os.PathLike) -> None:
    """`export --format hf` fills a new or empty directory only (an export's stale temporary folder aside)."""
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir() or any(not p.name.startswith(EXPORT_TMP) for p in out.iterdir()):
        raise GptgenError(f"{str(out)!r} exists and is not an empty directory; choose a new one (nothing was "
                          "overwritten)")
    if live := [p.name for p in out.iterdir() if time.time() - p.stat().st_mtime < EXPORT_STALE_S]:
        raise GptgenError(f"another export is writing into {str(out)!r} ({live[0]}); wait for it to end, or remove "
                          "that folder if its export was killed")


@contextlib.contextmanager
def _fresh_dir(out: Path) -> Iterator[Path]:
    """A temporary directory for the block to fill, out being new or empty: beside a new out, renamed onto it; inside
    an empty one, whose files then move out of it, as out's parent may be another filesystem (a container's bind
    mount) or not writable. Removed, with any folders made above it, if the block fails; one that a killed export
    left inside out is removed by the next once an hour old (younger, it may be another export's, under way)."""
    refuse_taken_dir(out)
    with parents_made(out):
        for stale in out.glob(f"{EXPORT_TMP}*") if out.is_dir() else ():  # all stale, refuse_taken_dir saw
            shutil.rmtree(stale, ignore_errors=True)
        with naming_the_target(out):
            tmp = Path(tempfile.mkdtemp(dir=out if out.is_dir() else out.parent, prefix=EXPORT_TMP, suffix=".tmp"))
        try:
            os.chmod(tmp, user_mode(0o777))  # mkdtemp makes directories private
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def export_hf(model_path: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """A directory that transformers loads (GPT2LMHeadModel, AutoTokenizer); int8 weights are dequantized."""
    out = Path(os.path.abspath(out_dir))  # "." too: its temporary folder goes beside it, not inside
    _gpt2_layout(model_path, "transformers", exact_vocab=False)  # its GPT-2 has every bias, and GPT-2's tokens
    config, tensors, metadata = _float_tensors(model_path)
    with _fresh_dir(out) as tmp:
        hf = {k: (t.t().contiguous() if k.endswith(HF_CONV1D) else t.contiguous()) for k, t in tensors.items()}
        write_safetensors(tmp / "model.safetensors", hf, {"format": "pt"})  # the user's usual mode, as the rest
        tokens, merges = gpt2_vocab()
        files = {
            "config.json": {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
                            "vocab_size": config.vocab_size, "n_positions": config.block_size,
                            "n_ctx": config.block_size, "n_embd": config.n_embd, "n_layer": config.n_layer,
                            "n_head": config.n_head, "n_inner": None, "activation_function": "gelu_new",
                            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "layer_norm_epsilon": 1e-5,
                            "initializer_range": 0.02, "bos_token_id": EOT_ID, "eos_token_id": EOT_ID,
                            "tie_word_embeddings": True, "torch_dtype": "float32"},
            "generation_config.json": {"bos_token_id": EOT_ID, "eos_token_id": EOT_ID, "do_sample": True,
                                       "temperature": 0.8, "top_k": 50},
            "tokenizer_config.json": {"tokenizer_class": "GPT2Tokenizer", "model_max_length": config.block_size,
                                      "bos_token": EOT, "eos_token": EOT, "unk_token": EOT,
                                      "add_prefix_space": False},
            "special_tokens_map.json": {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT},
            "gptgen.json": {"source": Path(model_path).name, "quantization": metadata.get("quantization", "none"),
                            "training": training_info(metadata)},
            "vocab.json": {t: i for i, t in enumerate(tokens)},
            "merges.txt": "\n".join(["#version: 0.2", *merges]),
        }
        for name, content in files.items():  # each written whole and synced, as the weights are, before the rename
            text = content + "\n" if isinstance(content, str) else json.dumps(content, indent=1, ensure_ascii=False)
            atomic_write(tmp / name, text.encode())  # UTF-8 whatever the locale: GPT-2's Ġ, ¡ ... are not ASCII
        if tmp.parent == out:  # an empty folder the user made (their current one, say): filled, not replaced
            for f in tmp.iterdir():
                os.replace(f, out / f.name)
            fsync_dir(out)
        else:
            os.replace(tmp, out)
            fsync_dir(out.parent)


def _hf_folder(source: str | os.PathLike) -> Path:
    from gptgen.hub import hub_id, snapshot

    repo_id = hub_id(str(source))
    if not repo_id:
        return Path(source)
    try:
        return snapshot(repo_id)
    except ModelFileError as e:  # `mydir/hf` mistyped reads as a Hub id too, as `gptgen generate` says
        raise ModelFileError(f"{e} (nor is it a local folder)") from None


def _refuse_another_tokenizer(folder: Path) -> None:
    """A GPT-2 with a vocabulary of its own (a BPE made for another language) imported would run with GPT-2's
    tokenizer, every gptgen command's, and write nonsense: its vocab.json or tokenizer.json, where the folder has
    one, must give GPT-2's tokens GPT-2's ids (tokens added after them, a pad token say, are dropped at import)."""
    ours = None
    for name in ("vocab.json", "tokenizer.json"):
        if not (folder / name).is_file():
            continue
        try:
            vocab = json.loads((folder / name).read_text(encoding="utf-8"))
            vocab = vocab["model"]["vocab"] if name == "tokenizer.json" else vocab
        except (ValueError, OSError, KeyError, TypeError) as e:
            raise ModelFileError(f"{str(folder / name)!r} is not a readable tokenizer ({e})") from None
        ours = ours or gpt2_tokens()
        other = [token for i, token in enumerate(ours) if not isinstance(vocab, dict) or vocab.get(token) != i]
        if other:
            raise ModelFileError(f"{str(folder)!r} has a tokenizer of its own ({name}: {len(other):,} of GPT-2's "
                                 f"{VOCAB:,} tokens missing or at other ids, {other[0]!r} first); gptgen runs every "
                                 "model with GPT-2's, with which this one would write nonsense")


def read_hf(source: str | os.PathLike):
    """(GPTConfig, float tensors by gptgen's names) from a transformers GPT-2 directory or Hub id (safetensors
    only)."""
    from gptgen.config import GPTConfig
    from gptgen.model import GPT

    folder = _hf_folder(source)
    if folder.is_file():
        raise ModelFileError(f"{str(folder)!r} is a file: give the transformers model's directory (or a Hub id)")
    if not folder.is_dir():
        raise ModelFileError(f"{str(folder)!r} does not exist: give a transformers model directory or a Hub id")
    if not (folder / "config.json").is_file():
        raise ModelFileError(f"{str(folder)!r} has no config.json: not a transformers model directory")
    try:
        hf = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise ModelFileError(f"{str(folder / 'config.json')!r} is not readable JSON ({e})") from None
    if not isinstance(hf, dict):
        raise ModelFileError(f"{str(folder / 'config.json')!r} is not a JSON object of settings")
    for alias, name in HF_ALIASES.items():  # read under gptgen's names only, n_head given as num_attention_heads
        if alias in hf:  # imported as 12 heads, without a word: the head count changes no tensor's shape
            if name in hf and hf[name] != hf[alias]:
                raise ModelFileError(f"{str(folder / 'config.json')!r} sets {name} {hf[name]!r} and {alias} "
                                     f"{hf[alias]!r}, two names of one setting")
            hf[name] = hf.pop(alias)
    hf = {**HF_DEFAULTS, **hf}
    sizes = {k: hf[k] for k in HF_DEFAULTS if isinstance(hf[k], bool) or not isinstance(hf[k], int) or hf[k] < 1}
    if sizes:
        raise ModelFileError(f"{str(folder / 'config.json')!r} sets sizes that are not positive whole numbers: "
                             f"{json.dumps(sizes)}")
    if hf.get("model_type") != "gpt2":
        raise ModelFileError(f"{str(folder)!r} holds a {hf.get('model_type')!r} model; gptgen imports GPT-2 only")
    if hf.get("activation_function", "gelu_new") not in HF_GELU or hf.get("n_inner") not in (None, 4 * hf["n_embd"]):
        raise ModelFileError(f"{str(folder)!r}: only GPT-2's own MLP (tanh GELU, 4x width) can be imported")
    other = {k: hf[k] for k, ours in HF_AS_GPTGEN.items() if hf.get(k, ours) != ours}
    if other:  # imported anyway, it would compute something else than the model it came from
        raise ModelFileError(f"{str(folder)!r} sets {json.dumps(other)}; gptgen's GPT-2 has {json.dumps(HF_AS_GPTGEN)}")
    if hf["vocab_size"] < VOCAB:
        raise ModelFileError(f"{str(folder)!r} has a vocabulary of {hf['vocab_size']:,} tokens; gptgen's tokenizer "
                             f"is GPT-2's, of {VOCAB:,}")
    _refuse_another_tokenizer(folder)
    config = GPTConfig(n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
                       block_size=hf["n_positions"], vocab_size=hf["vocab_size"])
    weights = _hf_weights(folder)
    tensors = {}
    for path in weights:
        for key, t in read_safetensors(path, what="weights file")[0].items():
            name = key if key.startswith(("transformer.", "lm_head.")) else f"transformer.{key}"
            if name.endswith((".attn.bias", ".attn.masked_bias")) or name == "lm_head.weight":
                continue  # causal-mask buffers; the head is tied to wte
            refuse_nonfinite(path, key, t)  # else written, then refused by every load
            t = t.float()
            tensors[name] = t.t().contiguous() if name.endswith(HF_CONV1D) else t
    check_depth(config.n_layer, tensors, f"{str(folder)!r} does not match its config.json")
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in GPT(config).state_dict().items() if k != "lm_head.weight"}
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ModelFileError(f"{str(folder)!r} does not match its config.json: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ModelFileError(f"{str(folder)!r}: tensor {name} is {tuple(tensors[name].shape)}, expected {shape}")
    if config.vocab_size > VOCAB:  # nanoGPT's padding to 50,304, or an added pad token: ids no text is tokenized to
        log.warning("%s: keeping the first %s of its %s token embeddings, GPT-2's tokens (the others are ids its "
                    "tokenizer never gives)", folder, f"{VOCAB:,}", f"{config.vocab_size:,}")
        tensors["transformer.wte.weight"] = tensors["transformer.wte.weight"][:VOCAB].clone()
        config = dataclasses.replace(config, vocab_size=VOCAB)
    return config, tensors


def _hf_weights(folder: Path) -> list[Path]:
    """The weights files transformers wrote: model.safetensors, or the shards its index names. Not any other
    safetensors file the folder holds (a gptgen file saved beside them, say), whose tensors would be taken in."""
    index = folder / HF_INDEX
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
            names = [Path(name) for name in shards]
        except (ValueError, OSError, KeyError, TypeError, AttributeError) as e:
            raise ModelFileError(f"{str(index)!r} is not a transformers index of weights files ({e!r})") from None
        if outside := sorted(str(n) for n in names if n.is_absolute() or ".." in n.parts):  # by name: a Hub
            raise ModelFileError(f"{str(index)!r} names weights files outside its folder: {', '.join(outside)}")
        return sorted(folder / name for name in names)  # snapshot's files are links to blobs elsewhere
    if (folder / HF_WEIGHTS).is_file():
        return [folder / HF_WEIGHTS]
    found = ", ".join(sorted(p.name for p in folder.iterdir()))
    raise ModelFileError(f"{str(folder)!r} has no {HF_WEIGHTS} (nor {HF_INDEX}) (found: {found}); gptgen never "
                         "unpickles .bin files")


def import_hf(source: str | os.PathLike, out: str | os.PathLike, origin: str | None = None) -> None:
    """A transformers GPT-2 as a new gptgen model file; `origin` is the source its record names (default: source)."""
    out = new_file(out, ".safetensors")
    folder = _hf_folder(source)
    config, tensors = read_hf(folder)
    training, made_by_gptgen = {}, folder / "gptgen.json"  # an export of a gptgen model: keep how it was trained
    if made_by_gptgen.is_file():
        try:
            training = dict(json.loads(made_by_gptgen.read_text(encoding="utf-8"))["training"])
        except (ValueError, KeyError, TypeError) as e:
            raise ModelFileError(f"{str(made_by_gptgen)!r} is not the gptgen.json that an export writes ({e!r}); "
                                 "remove it to import the weights alone") from None
    save_model(out, tensors, config, training={**training, "imported_from": origin or str(source)}, new=True)
