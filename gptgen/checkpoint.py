"""Model files and training state: safetensors only (nothing is ever unpickled), every write atomic."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import struct
import tempfile
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from gptgen.config import OPENAI_GPT2, ConfigError, GPTConfig, GptgenError, bundled_names

FORMAT = "gptgen/1"
TIED = "lm_head.weight"  # the head shares wte's tensor; files store it once, as transformer.wte.weight
# the temporary files an unfinished write leaves beside its target: atomic_path's, and safetensors' own (0.8
# writes a `.tmpXXXXXX` beside the file it is given, then renames it)
PARTIAL_WRITES = (".*.tmp", ".tmp??????")


class ModelFileError(GptgenError):
    """A model file is missing, corrupt or not a gptgen model."""


def new_file(out: str | os.PathLike, suffix: str) -> Path:
    """Where a command writes its new file: never over an existing one, and with the suffix that tools look
    for (`serve --models` lists .safetensors files). Checked before the work starts; `atomic_path(new=True)`
    checks again as it publishes the file."""
    out = Path(out)
    if out.exists():
        _taken(out)
    if out.suffix != suffix:
        raise GptgenError(f"{str(out)!r}: give the new file a name ending in {suffix}")
    return out


def _taken(out: Path) -> NoReturn:
    kind = "is a directory" if out.is_dir() else "exists"
    raise GptgenError(f"{str(out)!r} {kind}; give a new file name (nothing was overwritten)")


def user_mode(mode: int) -> int:
    """mode as the user's umask leaves it (0o666 -> 0o644 under the usual umask 022). Linux shows the umask in
    /proc; elsewhere reading it means setting it for a moment, which can race with a thread creating a file."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return mode & ~int(line.split()[1], 8)
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


@contextlib.contextmanager
def naming_the_target(path: Path) -> Iterator[None]:
    """A failure to create the temporary file beside `path` names `path`, which the user gave, not the temporary."""
    try:
        yield
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None


@contextlib.contextmanager
def parents_made(path: Path) -> Iterator[None]:
    """Makes the missing folders above `path`; if the block fails (a full disk, a bad input), removes those it
    made, so a failed write leaves nothing behind."""
    missing = [p for p in path.parents if not p.exists()]  # the deepest first, the order to remove them in
    with naming_the_target(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        for folder in missing:
            with contextlib.suppress(OSError):  # not empty: something else wrote there meanwhile; keep it
                folder.rmdir()
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, new: bool = False) -> Iterator[Path]:
    """A temporary file beside `path` for the block to write; if the block succeeds it is fsynced, given the
    user's usual mode (mkstemp makes files private) and renamed onto `path`: a kill at any moment leaves
    the old file or the new one, whole. With `new`, a file that appeared at `path` while the block ran is
    kept and the write refused."""
    path = Path(path)
    with parents_made(path):
        with naming_the_target(path):
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            try:
                yield Path(tmp)
            except OSError as e:  # a failed write (a full disk) names no file: it names the one the user gave
                if e.filename is not None:
                    raise
                raise OSError(e.errno, e.strerror or str(e), str(path)) from None
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, user_mode(0o666))
            if new:
                _publish(Path(tmp), path)
            else:
                os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
    fsync_dir(path.parent)


STALE_WRITE_S = 24 * 3600  # a partial write this old is a killed one's, not one in progress


def remove_stale_writes(folder: Path) -> None:
    """The partial writes (PARTIAL_WRITES) that killed processes left in a folder that several share, such as a
    cache: a write in progress is minutes old, so one a day old goes."""
    for pattern in PARTIAL_WRITES:
        for tmp in folder.glob(pattern):
            try:
                if time.time() - tmp.stat().st_mtime > STALE_WRITE_S:
                    tmp.unlink()
            except OSError:  # another process took it first, or a read-only folder
                pass


def _publish(tmp: Path, path: Path) -> None:
    """Gives `tmp` the name `path` only if nothing has it: a hard link fails on an existing name, where a rename
    would replace it. Where links are not supported (FAT, some network and FUSE file systems), a check then a
    rename, which leaves a window of microseconds rather than the whole write's."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        _taken(path)
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EMLINK):
            raise
        if path.exists() or path.is_symlink():
            _taken(path)
        os.replace(tmp, path)


def fsync_dir(path: Path) -> None:
    """Makes a rename in the directory `path` durable: without it, a power cut may undo it. Not on Windows, which
    opens no folder as a file (every save failed after its rename) and whose NTFS journals renames itself."""
    if os.name == "nt":
        return
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                      new: bool = False) -> None:
    """Atomically, written straight to the file: building the bytes in memory first made a checkpoint of the
    gpt2 preset's optimizer (949 MiB) take 1.2-5.6 s instead of 0.2-0.3 s (plus 0.35 s of fsync either way)."""
    with atomic_path(path, new) as tmp:
        try:
            save_file(tensors, tmp, metadata=metadata)
        except SafetensorError as e:  # its failed writes (a full disk) are not OSErrors: make them one
            io = re.search(r"I/O error: (.*) \(os error (\d+)\)", str(e))
            if io is None:
                raise
            raise OSError(int(io.group(2)), io.group(1)) from None


def save_model(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], config: GPTConfig, *,
               quantization: str = "none", training: dict | None = None, new: bool = False) -> None:
    from gptgen import __version__

    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items() if k != TIED}
    metadata = {"format": FORMAT, "config": config.to_json(), "quantization": quantization,
                "tokenizer": "gpt2", "gptgen_version": __version__,
                "training": json.dumps(training or {}, sort_keys=True)}
    write_safetensors(path, tensors, metadata, new)


def read_safetensors(path: str | os.PathLike, what: str = "model file", with_tensors: bool = True
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors (or, with with_tensors=False, none: the header only) and the metadata of a safetensors file,
    with a plain error for anything else."""
    path = Path(path)
    if path.is_dir():
        inside = path / "model.safetensors"
        hint = f"; did you mean {str(inside)!r}?" if inside.is_file() else ""
        raise ModelFileError(f"{what} {str(path)!r} is a directory, not a .safetensors file{hint}")
    if not path.is_file():
        bundled = bundled_names()
        bare = path.name == str(path) and path.name not in bundled  # a name, perhaps a prompt given as the model
        names = [f"bundled models, by name: {', '.join(bundled)}"] if bundled else []
        names.append(f"OpenAI's GPT-2: {', '.join(OPENAI_GPT2)}")
        hint = f" ({'; '.join(names)})" if bare else ""
        raise ModelFileError(f"{what} {str(path)!r} does not exist{hint}")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()} if with_tensors else {}
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelFileError(f"{what} {str(path)!r} is not a readable safetensors file (corrupt, truncated or "
                             f"another format: {e})") from None
    return tensors, metadata


def load_model_file(path: str | os.PathLike) -> tuple[GPTConfig, dict[str, torch.Tensor], dict[str, str]]:
    """(config, weights, metadata) of a gptgen model file, checked tensor by tensor against its config (so that
    quantize and export refuse what load refuses); the tied head is not in the weights."""
    from gptgen.model import GPT
    from gptgen.quantize import SCALE, is_quantized

    tensors, metadata = read_safetensors(path)
    config = config_of(path, metadata)
    quantization = metadata.get("quantization", "none")
    if quantization not in ("none", "int8"):
        raise ModelFileError(f"{str(path)!r} has quantization {quantization!r}; this gptgen reads none or int8")
    check_depth(config.n_layer, tensors, f"{str(path)!r} does not match its config")
    with torch.device("meta"):
        expected = {k: (tuple(v.shape), None) for k, v in GPT(config).state_dict().items() if k != TIED}
    if quantization == "int8":
        for k, (shape, _) in list(expected.items()):
            if is_quantized(k, shape):
                expected[k] = (shape, torch.int8)
                expected[k + SCALE] = ((shape[0],), torch.float32)
    missing, unexpected = set(expected) - set(tensors), set(tensors) - set(expected)
    if missing or unexpected:
        raise ModelFileError(f"{str(path)!r} does not match its config: missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]}")
    for name, t in tensors.items():
        shape, dtype = expected[name]
        if tuple(t.shape) != shape or (t.dtype != dtype if dtype is not None else not t.is_floating_point()):
            raise ModelFileError(f"{str(path)!r}: tensor {name} is {t.dtype} {tuple(t.shape)}, expected "
                                 f"{dtype or 'float'} {shape}")
        refuse_nonfinite(path, name, t)
        if name.endswith(SCALE) and not bool(((t > 0) & torch.isfinite(t * 127)).all()):  # 127 * scale: a weight
            raise ModelFileError(f"{str(path)!r}: tensor {name} holds scales that are not positive or overflow, so "
                                 "the weights they give are not the quantized ones (gptgen quantize writes none)")
    return config, tensors, metadata


def check_depth(n_layer: int, names, mismatch: str) -> None:
    """Weights named for n_layer blocks, checked before a GPT of that config is built to compare shapes: that
    takes ~1 ms a layer, and a 300-byte file whose header says 100,000,000 layers hung every command."""
    layers = {int(m.group(1)) for name in names if (m := re.match(r"transformer\.h\.(\d+)\.", name))}
    if len(layers) != n_layer:
        raise ModelFileError(f"{mismatch}: n_layer {n_layer:,}, weights of {len(layers):,} layers")


FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)  # what a model's float weights may be


def refuse_nonfinite(path: str | os.PathLike, name: str, t: torch.Tensor) -> None:
    """A ModelFileError for a float tensor holding NaN or infinite values: sampling from such a model raised deep
    inside. A sum is NaN or infinite with any one of its terms, and takes a twentieth of the time isfinite() does
    (124M floats: 21 vs 385 ms; weights never sum to 3e38). It sums in float32 at least: float16's sum overflows
    past 65,504, which an embedding's weights reach. Float8 and float4 weights (no sum, no layers for them here)
    are refused."""
    if not t.is_floating_point():
        return
    if t.dtype not in FLOATS:
        raise ModelFileError(f"{str(path)!r}: tensor {name} is {t.dtype}; gptgen reads float32, bfloat16, float16 "
                             "or float64 weights")
    if not bool(torch.isfinite(t.sum(dtype=torch.promote_types(t.dtype, torch.float32)))):
        raise ModelFileError(f"{str(path)!r}: tensor {name} holds NaN or infinite values, so the model's outputs "
                             "would too (gptgen train stops a run that diverges before it saves)")


def read_config(path: str | os.PathLike) -> GPTConfig:
    """A model file's config from its header alone (no tensors read)."""
    return config_of(path, read_safetensors(path, with_tensors=False)[1])


def imported_from(info: dict) -> str | None:
    """Where a model not trained by gptgen came from (a transformers GPT-2, OpenAI's say); None for one trained
    here, an imported gptgen export included (it brings its training record back)."""
    return info["imported_from"] if "imported_from" in info and "corpus" not in info else None


def config_of(path: str | os.PathLike, metadata: dict[str, str]) -> GPTConfig:
    fmt = metadata.get("format")
    if fmt is None and "param_groups" in metadata:  # a run's optim-STEP.safetensors
        raise ModelFileError(f"{str(path)!r} is a training run's optimizer state, not a model; the run's model is "
                             f"{str(Path(path).parent / 'model.safetensors')!r}")
    if fmt is None or not fmt.startswith("gptgen/"):
        raise ModelFileError(f"{str(path)!r} is a safetensors file but not a gptgen model ("
                             f"{'no format metadata' if fmt is None else f'format {fmt!r}'}); a transformers GPT-2 "
                             f"directory becomes one with: gptgen import {str(Path(path).parent)!r} OUT.safetensors")
    if fmt != FORMAT:
        raise ModelFileError(f"{str(path)!r} has format {fmt!r}; this gptgen reads {FORMAT!r} (upgrade gptgen?)")
    try:
        config = GPTConfig.from_json(metadata["config"])
    except (KeyError, json.JSONDecodeError, TypeError, ConfigError) as e:
        raise ModelFileError(f"{str(path)!r} has a missing or invalid model config: {e}") from None
    return config


def _number(v) -> bool:
    return isinstance(v, int | float)


# The training record's fields by what their readers (the page, the Hub card, `gptgen eval`) take: one that is
# not so (a record edited by hand, or by another tool) is left out, rather than a crash in one of them.
RECORD_FIELDS = {
    **dict.fromkeys(("corpus", "corpus_sha256", "preset", "imported_from"), lambda v: isinstance(v, str)),
    **dict.fromkeys(("corpus_bytes", "steps", "tokens_seen", "wall_time_s", "val_fraction", "val_nats_per_token",
                     "val_nats_per_char"), _number),
    "recipe": lambda v: isinstance(v, dict),
    "curve": lambda v: isinstance(v, list) and all(isinstance(row, list) and len(row) == 3 and all(map(_number, row))
                                                   for row in v),  # [step, train loss, val loss] per eval
}


def training_info(metadata: dict[str, str]) -> dict:
    """The file's training record, as train (or import) wrote it, less the fields RECORD_FIELDS refuses."""
    try:
        info = json.loads(metadata.get("training", "{}"))
    except json.JSONDecodeError:
        return {}
    if not isinstance(info, dict):
        return {}
    return {k: v for k, v in info.items() if k not in RECORD_FIELDS or RECORD_FIELDS[k](v)}


def _identity(file: str | os.PathLike | int) -> tuple[int, ...]:
    """What tells a file from its replacement, by path or by open descriptor."""
    st = os.stat(file)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _read_again_error(path: str | os.PathLike, e: Exception) -> ModelFileError:
    return ModelFileError(f"model file {str(path)!r} could not be read again while loading: {e}")


def _check_unchanged(path: str | os.PathLike, identity: tuple[int, ...], now: tuple[int, ...]) -> None:
    """The file read again must be the one checked (its `identity` then, so its tensors are those checked): a run
    that saves while a server loads the file would otherwise mix two models' layers."""
    if now != identity:
        raise ModelFileError(f"model file {str(path)!r} changed while it was being loaded (a run saving it?); "
                             "load it again")


def _reread(path: str | os.PathLike, name: str, identity: tuple[int, ...]) -> torch.Tensor:
    """A tensor that load_model_file checked, read again through a memory map of its own, which is unmapped (and
    out of this process's memory) as soon as the tensor is dropped."""
    try:
        with safe_open(path, framework="pt") as f:
            t = f.get_tensor(name)
        now = _identity(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise _read_again_error(path, e) from None
    _check_unchanged(path, identity, now)
    return t


class FileRows:
    """Rows of an int8 matrix in a model file, read from the file when asked (os.pread): the tied embedding's few
    rows a token, without its whole table in memory (gpt2's: 37 MiB, the head's fbgemm copy being another). Mapped
    instead, the lookups of a few hundred tokens brought every page of it in (the kernel maps 2 MiB folios). The
    file stays open, so a file replaced meanwhile (a run saving it) does not change the rows read. A copy (a
    model's deepcopy) holds a descriptor of its own; a pickle, which could only hold a number, is refused."""

    def __init__(self, path: str | os.PathLike, name: str, identity: tuple[int, ...]) -> None:
        self.path = str(path)
        try:
            fd = self._own(os.open(path, os.O_RDONLY))
            now = _identity(fd)
            (length,) = struct.unpack("<Q", os.pread(fd, 8, 0))
            entry = json.loads(os.pread(fd, length, 8))[name]  # load_model_file checked the header and this tensor
        except (OSError, ValueError, struct.error) as e:
            raise _read_again_error(path, e) from None
        _check_unchanged(path, identity, now)
        self.fd, self.count, self.width = fd, *entry["shape"]
        self.start = 8 + length + entry["data_offsets"][0]

    def _own(self, fd: int) -> int:
        weakref.finalize(self, os.close, fd)
        return fd

    def __deepcopy__(self, memo: dict) -> FileRows:
        copy = object.__new__(FileRows)
        copy.__dict__.update(self.__dict__)
        copy.fd = copy._own(os.dup(self.fd))  # the original's is closed with it
        return copy

    def __reduce__(self):
        raise TypeError("an int8 model loaded on a CPU reads its embedding's rows from its file, so it cannot be "
                        "pickled; save it with gptgen's safetensors functions instead")

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        """The int8 rows of token ids `idx` (any shape): shape (*idx.shape, width)."""
        ids = idx.reshape(-1).tolist()
        if not ids:  # frombuffer takes no empty buffer
            return torch.empty(*idx.shape, self.width, dtype=torch.int8)
        if not 0 <= min(ids) <= max(ids) < self.count:
            raise IndexError(f"token id {max(ids) if max(ids) >= self.count else min(ids)} is out of range for "
                             f"{self.count} rows")
        out = bytearray(len(ids) * self.width)
        for i, row in enumerate(ids):
            data = os.pread(self.fd, self.width, self.start + row * self.width)
            if len(data) != self.width:  # the file cut short in place since it loaded
                raise ModelFileError(f"model file {self.path!r} no longer holds its embedding's row {row}")
            out[i * self.width:(i + 1) * self.width] = data
        return torch.frombuffer(out, dtype=torch.int8).view(*idx.shape, self.width)


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """(GPT, metadata) from a model file, float or int8, checked tensor by tensor against its config.

    Built on the meta device, so no memory is spent on a throwaway init.
    """
    from gptgen.model import GPT
    from gptgen.quantize import int8_model, pack

    identity = _identity(path) if Path(path).is_file() else None  # (load_model_file says what else it is)
    config, tensors, metadata = load_model_file(path)
    if metadata.get("quantization") == "int8":
        model = int8_model(config, tensors).to(device).eval()
        del tensors
        rows = (lambda name: FileRows(path, name, identity)) if hasattr(os, "pread") else None  # not on Windows
        pack(model, lambda name: _reread(path, name, identity), rows)
        return model, metadata
    if len({t.dtype for t in tensors.values()}) > 1:  # layers of one dtype each: a forward would refuse the mix
        tensors = {k: t.float() for k, t in tensors.items()}
    with torch.device("meta"):
        model = GPT(config)
    model.load_state_dict(tensors, strict=False, assign=True)
    model.lm_head.weight = model.transformer.wte.weight
    return model.to(device).eval(), metadata


def save_optimizer(path: str | os.PathLike, optimizer: torch.optim.Optimizer) -> None:
    """Optimizer state as safetensors: tensors by parameter index, hyperparameters as JSON metadata."""
    sd = optimizer.state_dict()
    tensors = {f"state.{i}.{k}": torch.as_tensor(v).detach().cpu().contiguous()
               for i, s in sd["state"].items() for k, v in s.items()}
    metadata = {"param_groups": json.dumps(sd["param_groups"])}
    write_safetensors(path, tensors, metadata)


def load_optimizer(path: str | os.PathLike, optimizer: torch.optim.Optimizer) -> None:
    """Restore the optimizer in place."""
    tensors, metadata = read_safetensors(path, what="optimizer state")
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = t
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(metadata["param_groups"])})


def served_name(folder: Path, file: Path) -> str:
    """A file's name on the page and in the API: its stem in the folder itself; in a run folder SUB, `model` is
    SUB and `model-REST` is SUB-REST (runs/my/model-int8.safetensors is my-int8), any other STEM SUB-STEM."""
    if file.parent == folder:
        return file.stem
    return file.parent.name if file.stem == "model" else f"{file.parent.name}-{file.stem.removeprefix('model-')}"


def given_name(file: str | os.PathLike) -> str:
    """The name of a model file given by its path: a run's model files by their run folder, as `--models` names them
    (runs/my/model-int8.safetensors is my-int8), one in the Hugging Face cache by its repository's name (not the
    name of the blob its link leads to, nor of the commit's folder), any other file by its stem."""
    file = Path(os.path.abspath(file))  # model.safetensors given in its run folder is named by the folder too
    if file.stem.split("-")[0] != "model":
        return file.stem
    snapshots = file.parent.parent  # the cache's models--OWNER--NAME/snapshots/COMMIT/model.safetensors
    if snapshots.name == "snapshots" and snapshots.parent.name.startswith("models--"):
        file = Path(snapshots.parent.name.split("--")[-1], file.name)
    return served_name(file.parent.parent, file)
