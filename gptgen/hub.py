"""The Hugging Face Hub: pull a model file through huggingface_hub's cache, push a model with its card,
push the app as a Gradio Space. Network errors and offline misses become one plain sentence.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

from gptgen.checkpoint import (
    ModelFileError,
    given_name,
    imported_from,
    load_model_file,
    read_safetensors,
    remove_stale_writes,
    training_info,
)
from gptgen.config import OPENAI_GPT2, GptgenError, bundled_model, cache_dir

log = logging.getLogger(__name__)
MODEL_FILE = "model.safetensors"  # a gptgen model's name in a Hub repository, and a training run's best weights
# owner/name as the Hub takes them: each starts with a letter or digit and ends with one or _, no "--" or ".."
# anywhere, no ".git" at the end (huggingface_hub refuses those with an error of its own, which was a traceback)
_NAME = r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,94}\w)?"
REPO_ID = re.compile(rf"^(?!.*(--|\.\.))(?!.*\.git$){_NAME}/{_NAME}$", re.ASCII)
ROOT = Path(__file__).resolve().parent.parent
NETWORK_LIBRARIES = ("httpx", "httpx2", "requests", "urllib3", "h11", "httpcore")  # what huggingface_hub talks through


def is_hub_id(text: str) -> bool:
    """owner/name, unless it reads as a local path: it exists, ends in .safetensors, or its folder exists here
    (a mistyped `runs/my-model` should say "no such file", not wait on the network)."""
    path = Path(text)
    local = path.exists() or path.suffix == ".safetensors" or (path.parent != Path(".") and path.parent.is_dir())
    return bool(REPO_ID.match(text)) and not local


def hub_id(text: str) -> str | None:
    """The Hub repository a model argument names, or None: owner/name as it is, and OpenAI's GPT-2 by its bare
    name (gpt2 is openai-community/gpt2) when nothing here has that name."""
    if text in OPENAI_GPT2 and not Path(text).exists():
        return OPENAI_GPT2[text]
    return text if is_hub_id(text) else None


def check_hub_id(repo_id: str) -> str:
    """A repository that push or pull names: owner/name, whatever this folder holds (a `you/` folder here makes
    `you/my-model` a path for a model argument, not for these)."""
    if not REPO_ID.match(repo_id):
        raise ModelFileError(f"{repo_id!r} is not a Hub repository id (owner/name: letters, digits, '-', '_', '.'; "
                             "each starting with a letter or digit, ending with one or '_', no '--' or '..')")
    return repo_id


@contextlib.contextmanager
def _hub_call(repo_id: str):
    """A call to the Hub with its failures in one plain sentence: a refusal (with a hint when it is the login),
    or the network (huggingface_hub lets its HTTP library's errors through)."""
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    try:
        yield
    except HFValidationError as e:  # a name or revision the Hub would not take, said before asking it
        raise ModelFileError(f"{repo_id}: {str(e).splitlines()[0]}") from None
    except HfHubHTTPError as e:
        login = " (log in: `hf auth login`, or set HF_TOKEN)" if getattr(e.response, "status_code", None) in (
            401, 403) else ""
        raise ModelFileError(f"the Hub refused {repo_id}: {str(e).splitlines()[0]}{login}") from None
    except Exception as e:
        if not isinstance(e, OSError) and type(e).__module__.split(".")[0] not in NETWORK_LIBRARIES:
            raise
        raise ModelFileError(f"could not reach the Hugging Face Hub for {repo_id}: {e}") from None


def _no_network() -> bool:
    """The Hub's name does not resolve here, and no proxy would resolve it instead: without a network,
    huggingface_hub retries for ~25 s (5 warnings) before it looks in its cache; this asks the cache at once."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:  # asked for: no lookup (where DNS packets are dropped, each waited ~10 s)
        return True
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return False
    try:
        socket.getaddrinfo(urlparse(constants.ENDPOINT).hostname, 443)
    except (socket.gaierror, UnicodeError):
        return True
    return False


def _fetch(download, repo_id: str, revision: str | None, **kwargs) -> Path:
    """A huggingface_hub download (its cache, HF_HUB_OFFLINE honoured) with its failures in one plain sentence."""
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    check_hub_id(repo_id)
    with _hub_call(repo_id):
        try:
            return Path(download(repo_id, revision=revision, library_name="gptgen", local_files_only=_no_network(),
                                 **kwargs))
        except LocalEntryNotFoundError:
            raise ModelFileError(f"{repo_id}{'@' + revision if revision else ''} is not in the Hugging Face cache "
                                 "and cannot be downloaded (offline, or HF_HUB_OFFLINE=1)") from None
        except EntryNotFoundError:
            raise ModelFileError(f"{repo_id} has no {kwargs.get('filename')}; is it a gptgen model repository?"
                                 ) from None


def pull(repo_id: str, revision: str | None = None) -> Path:
    """The model file of a Hub repository (a bare GPT-2 name too), from the local cache or downloaded into it. A
    transformers GPT-2 repository's weights (openai-community/gpt2's, say) are converted into a gptgen file once,
    in gptgen's cache, and that file is the model."""
    from huggingface_hub import hf_hub_download

    repo_id = check_hub_id(OPENAI_GPT2.get(repo_id, repo_id))  # gpt2 is OpenAI's, whatever folder is here
    try:
        path = _fetch(hf_hub_download, repo_id, revision, filename=MODEL_FILE)
    except ModelFileError as missing:
        from gptgen.interop import HF_INDEX

        try:  # a transformers repository whose weights are in shards has their index instead
            index = _fetch(hf_hub_download, repo_id, revision, filename=HF_INDEX)
        except ModelFileError:
            raise missing from None
        return _converted(repo_id, index)
    return _converted(repo_id, path) if _is_transformers_file(path) else path


def _is_transformers_file(path: Path) -> bool:
    """A readable safetensors file that is not gptgen's: transformers writes {"format": "pt"} (a file that cannot be
    read at all is left for the command to report)."""
    try:
        metadata = read_safetensors(path, with_tensors=False)[1]
    except ModelFileError:
        return False
    return not metadata.get("format", "").startswith("gptgen/")


def _converted(repo_id: str, pulled: Path) -> Path:
    """gptgen's file of a transformers GPT-2 repository at the commit its pulled weights come from (the Hub cache
    keeps them in a folder named by it), converted on first use."""
    from gptgen.interop import import_hf

    commit = pulled.parent.name
    out = cache_dir() / "hub" / repo_id.replace("/", "--") / commit / f"{repo_id.split('/')[1]}.safetensors"
    if not out.is_file():
        log.info("converting %s (transformers GPT-2) to a gptgen model file, once: %s", repo_id, out)
        remove_stale_writes(out.parent)  # a killed conversion's partial file (gpt2-xl's: 1.6 GB); none if no folder
        try:
            import_hf(snapshot(repo_id, commit), out, origin=f"{repo_id}@{commit}")  # config.json beside the weights
        except GptgenError:  # ModelFileError, or the "exists" of a file published meanwhile
            if not out.is_file():
                raise
            # another process converted it meanwhile (two servers started at once): the same file, kept
    return out


def snapshot(repo_id: str, revision: str | None = None) -> Path:
    """A transformers model repository's config and safetensors weights, through the Hugging Face cache."""
    from huggingface_hub import snapshot_download

    return _fetch(snapshot_download, repo_id, revision,
                  allow_patterns=["config.json", "model.safetensors", "model.safetensors.index.json",
                                  "model-*-of-*.safetensors", "gptgen.json", "vocab.json",
                                  "tokenizer.json"])  # what import reads, no more


def resolve(path_or_id: str | os.PathLike, revision: str | None = None) -> Path:
    """A local model file as it is, a training run's folder as its model.safetensors (the best weights), a
    bundled model's name (as the page shows it) as its file, when nothing here has that name, and a Hub id
    (`owner/name`, or a bare GPT-2 name) through the Hub cache."""
    if not isinstance(path_or_id, (str, os.PathLike)):
        raise TypeError(f"a model is a file path or a Hub id (owner/name), got {type(path_or_id).__name__}")
    path_or_id = os.fspath(path_or_id)
    if not path_or_id:
        raise ModelFileError("the model is empty: give a model file, a run folder, a bundled model's name or a Hub "
                             "id (owner/name)")
    repo_id = hub_id(path_or_id)
    if repo_id is None:
        if revision is not None:  # silently ignored, it would give another model than the one asked for
            raise ModelFileError(f"{path_or_id!r} is a local path; a revision ({revision!r}) names a Hub commit")
        path = Path(path_or_id)
        if (path / MODEL_FILE).is_file():
            return path / MODEL_FILE
        return bundled_model(path_or_id) or path
    try:
        return pull(repo_id, revision)
    except ModelFileError as e:  # `runs/nope` with no runs/ folder here reads as a Hub id too
        raise ModelFileError(f"{e} (nor is it a local file)") from None


def _flag(name: str, value) -> str:
    """A recipe entry as `gptgen train` takes it: --steps 2000, and --grad-checkpoint / --no-grad-checkpoint
    for a switch (not `--grad-checkpoint False`, which the CLI refuses)."""
    flag = name.replace("_", "-")
    if isinstance(value, bool):
        return f"--{'' if value else 'no-'}{flag}"
    return f"--{flag} {value}"


def model_card(model_path: str | os.PathLike, repo_id: str) -> str:
    """README.md for a model repository: YAML metadata the Hub indexes, then how it was made and how to run it."""
    config, _, metadata = load_model_file(model_path)
    info = training_info(metadata)
    corpus = info.get("corpus", "unknown")
    yaml = ["---", "license: mit", "library_name: gptgen", "pipeline_tag: text-generation",
            "tags:", "- gptgen", "- gpt2", "- text-generation", f"- {metadata.get('quantization', 'none')}"]
    scored = info.keys() >= {"val_nats_per_token", "val_nats_per_char"}  # not with --val-fraction 0
    if scored:
        yaml += ["model-index:", f"- name: {repo_id.split('/')[-1]}", "  results:",
                 "  - task: {type: text-generation}", f"    dataset: {{name: {json.dumps(corpus)}, type: text}}",
                 "    metrics:",
                 f"    - {{type: loss, name: val nats/token, value: {info['val_nats_per_token']:.4f}}}",
                 f"    - {{type: loss, name: val nats/char, value: {info['val_nats_per_char']:.4f}}}"]
    yaml.append("---")
    if origin := imported_from(info):
        made, facts = f"imported into gptgen from `{origin}`", []  # nothing more to say of it
    else:
        made = (f"trained with gptgen on `{corpus}`\n({info.get('corpus_bytes', '?')} bytes, sha256 "
                f"`{info.get('corpus_sha256', '?')}`)")
        facts = [f"- Steps: {info.get('steps', '?')}, tokens seen: {info.get('tokens_seen', '?')}"]
        if scored:
            facts.append(f"- Val loss: {info['val_nats_per_token']} nats/token, {info['val_nats_per_char']} nats/char")
        recipe = " ".join(_flag(k, v) for k, v in info.get("recipe", {}).items() if v is not None)
        facts.append(f"- Recipe: `gptgen train {recipe}`")
    facts_md = "\n".join(facts)
    body = f"""
# {repo_id.split('/')[-1]}

A GPT-2 model ({config.n_layer} layers, {config.n_head} heads, {config.n_embd} dims, context
{config.block_size}, GPT-2 BPE) {made}; weights: {metadata.get('quantization', 'none')}.

{facts_md}

```python
import gptgen
model = gptgen.load("{repo_id}")
print(model.generate("ROMEO:", max_new_tokens=100))
```
"""
    return "\n".join(yaml) + "\n" + body


def _api():
    from huggingface_hub import HfApi

    return HfApi(library_name="gptgen")


def _create_repo(api, repo_id: str, private: bool, **kwargs) -> str:
    """The repository, made if new. create_repo leaves an existing one's visibility as it is, so --private on
    a public one uploaded for everyone to see: refused, before the upload."""
    url = api.create_repo(repo_id, private=private, exist_ok=True, **kwargs)
    if private and not api.repo_info(repo_id, repo_type=kwargs.get("repo_type")).private:
        raise ModelFileError(f"{repo_id} exists and is public, and --private does not change that: make it private "
                             "in its settings on the Hub first, or push without --private")
    return url


def push(model_path: str | os.PathLike, repo_id: str, private: bool = False) -> str:
    """Upload the model file and a generated card in one commit; returns the repository URL."""
    from huggingface_hub import CommitOperationAdd

    check_hub_id(repo_id)
    card = model_card(model_path, repo_id)  # also checks the file is a gptgen model before any upload
    api = _api()
    with _hub_call(repo_id):
        url = _create_repo(api, repo_id, private)
        api.create_commit(repo_id, [CommitOperationAdd(MODEL_FILE, str(model_path)),
                                    CommitOperationAdd("README.md", card.encode())],
                          commit_message=f"gptgen: upload {Path(model_path).name}")
    return str(url)


CPU_TORCH = b"--extra-index-url https://download.pytorch.org/whl/cpu\n"


def space_files(model_path: str | os.PathLike) -> dict[str, Path | bytes]:
    """What a Space needs, by path in the Space: the app, the package, requirements, README header, model.

    The model is named as `gptgen serve --models` names it in its run folder (runs/my/model-int8.safetensors
    is my-int8), and the header's one-line description says what it was trained on."""
    if not (ROOT / "app.py").is_file():
        raise ModelFileError("push --space uploads the gptgen repository's app.py, requirements.txt and README "
                             "header, which an installed wheel does not have: run it from a clone (pip install -e .)")
    # the CPU build of torch: from PyPI alone, pip takes the CUDA one and its nvidia-* packages (gigabytes) into a
    # CPU Space; the repository's own file leaves this line out, for machines that cannot reach that index
    requirements = CPU_TORCH + (ROOT / "requirements.txt").read_bytes()
    files: dict[str, Path | bytes] = {"app.py": ROOT / "app.py", "requirements.txt": requirements}
    package = ROOT / "gptgen"
    for f in sorted(package.rglob("*")):
        if f.is_file() and "__pycache__" not in f.parts:
            files[f"gptgen/{f.relative_to(package).as_posix()}"] = f
    model, name = Path(model_path), given_name(model_path)
    _, metadata = read_safetensors(model, with_tensors=False)
    training = training_info(metadata)
    origin = imported_from(training)
    about = (f"GPT-2 imported from {origin}" if origin else
             f"A GPT-2 trained by gptgen on {Path(training.get('corpus', 'a text')).name}")
    about += ", int8" if metadata.get("quantization") == "int8" else ""
    readme = (ROOT / "README.md").read_text()
    header = readme[:readme.index("\n---\n", 4) + 5] if readme.startswith("---\n") else ""
    description = f"short_description: {json.dumps(about[:60])}"  # a function: the JSON's backslashes stay as they are
    header = re.sub(r"^short_description: .*$", lambda _: description, header, flags=re.M)
    files["README.md"] = (header + "\nThe gptgen page on this model; see the gptgen README for more.\n").encode()
    files[f"models/{name}.safetensors"] = model
    return files


def push_space(model_path: str | os.PathLike, repo_id: str, private: bool = False) -> str:
    """Create or update a Gradio Space that serves the model with gptgen's page. An update also deletes what an
    earlier push left in models/ and gptgen/ (another model, which the page would offer too; a removed module)."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    check_hub_id(repo_id)
    load_model_file(model_path)
    api = _api()
    files = space_files(model_path)
    operations = [CommitOperationAdd(path, data if isinstance(data, bytes) else str(data))
                  for path, data in files.items()]
    with _hub_call(repo_id):
        url = _create_repo(api, repo_id, private, repo_type="space", space_sdk="gradio")
        operations += [CommitOperationDelete(path) for path in api.list_repo_files(repo_id, repo_type="space")
                       if path.startswith(("models/", "gptgen/")) and path not in files]
        api.create_commit(repo_id, operations, repo_type="space", commit_message="gptgen: update the Space")
    return str(url)
