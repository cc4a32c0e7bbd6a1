"""Hub pull through a Hugging Face cache laid out as huggingface_hub lays it (offline), and push checked at
the HfApi call boundary (the exact repositories, files and commits it would send)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptgen import hub
from gptgen.checkpoint import ModelFileError, load_model_file, training_info
from tests.conftest import BUNDLED, ROOT

COMMITS = {"main": "a" * 40, "v1": "b" * 40}


def cache_repo(cache: Path, repo_id: str, ref: str, commit: str, files: dict[str, bytes]) -> None:
    """A repository's files at one commit in a Hugging Face cache, laid out as huggingface_hub lays it."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for i, (name, data) in enumerate(files.items()):
        blob = repo / "blobs" / f"{commit[:-1]}{i}"
        blob.parent.mkdir(exist_ok=True)
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))


@pytest.fixture
def hf_cache(tmp_path):
    """owner/tiny-shakespeare in a cache: `main` holds the bundled model, tag `v1` a file of another size."""
    for ref, commit in COMMITS.items():
        data = BUNDLED.read_bytes() if ref == "main" else b"not a model"
        cache_repo(tmp_path / "hub", "owner/tiny-shakespeare", ref, commit, {hub.MODEL_FILE: data})
    return tmp_path / "hub"


def gptgen_offline(cache, *args, **env):
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, "-m", "gptgen", *args], capture_output=True, text=True, env=env, timeout=300)


def test_pull_and_generate_by_hub_id_offline_with_revision_pinning(hf_cache):
    r = gptgen_offline(hf_cache, "pull", "owner/tiny-shakespeare")
    assert r.returncode == 0, r.stderr
    path = r.stdout.strip()
    assert COMMITS["main"] in path and open(path, "rb").read() == BUNDLED.read_bytes()
    r = gptgen_offline(hf_cache, "pull", "owner/tiny-shakespeare", "--revision", "v1")
    assert COMMITS["v1"] in r.stdout and open(r.stdout.strip(), "rb").read() == b"not a model"
    r = gptgen_offline(hf_cache, "generate", "owner/tiny-shakespeare", "ROMEO:", "--max-new-tokens", "8",
                       "--seed", "1")
    by_path = gptgen_offline(hf_cache, "generate", str(BUNDLED), "ROMEO:", "--max-new-tokens", "8", "--seed", "1")
    assert r.returncode == 0 and r.stdout.strip() and r.stdout == by_path.stdout, r.stderr  # the same model


@pytest.mark.parametrize("command, expect", [
    (["eval", "owner/tiny-shakespeare", "--data", "{text}"], "val loss"),
    (["quantize", "owner/tiny-shakespeare", "{tmp}/q.safetensors"], "is already quantized (int8)"),
    (["export", "owner/tiny-shakespeare", "{tmp}/m.gguf", "--type", "q8_0"], "wrote"),
])
def test_every_command_that_reads_a_model_takes_a_hub_id(hf_cache, small_text, tmp_path, command, expect):
    """eval, quantize and export said "does not exist" for a Hub id, although their help offered it."""
    r = gptgen_offline(hf_cache, *(a.format(text=small_text, tmp=tmp_path) for a in command))
    assert expect in r.stdout + r.stderr and "does not exist" not in r.stderr, r.stderr


def test_a_model_path_may_be_a_path_object_and_a_miss_says_it_is_no_local_file_either(hf_cache, tmp_path):
    assert hub.resolve(BUNDLED) == BUNDLED
    assert hub.resolve(BUNDLED.parent) == BUNDLED.parent  # a folder without a run's model file stays as it is
    with pytest.raises(TypeError, match="a model is a file path or a Hub id"):
        hub.resolve(None)
    with pytest.raises(ModelFileError, match="the model is empty"):  # was "model file '.' is a directory"
        hub.resolve("")
    with pytest.raises(ModelFileError, match="is a local path; a revision .'v1'. names a Hub commit"):
        hub.resolve(BUNDLED, revision="v1")
    r = gptgen_offline(hf_cache, "generate", "nothere/model", "hi")
    assert r.returncode == 2 and "not in the Hugging Face cache" in r.stderr and "nor is it a local file" in r.stderr
    r = gptgen_offline(hf_cache, "import", "nothere/hf", tmp_path / "x.safetensors")  # a mistyped folder too
    assert r.returncode == 2 and "not in the Hugging Face cache" in r.stderr and "nor is it a local folder" in r.stderr


def test_a_bundled_model_by_the_name_the_page_shows_unless_a_local_path_has_it(tmp_path, monkeypatch):
    """An installed wheel's models folder is no path to type: `gptgen generate shakespeare-mini-int8 "ROMEO:"`."""
    monkeypatch.chdir(tmp_path)
    assert hub.resolve(BUNDLED.stem) == BUNDLED
    assert hub.resolve("nope") == Path("nope")
    (tmp_path / BUNDLED.stem).mkdir()  # anything here of that name is what the user means
    assert hub.resolve(BUNDLED.stem) == Path(BUNDLED.stem)
    assert hub.resolve(f"./{BUNDLED.stem}") == Path(BUNDLED.stem)


def test_openais_gpt2_by_its_bare_name_is_converted_once_and_then_is_a_model_like_any(tmp_path):
    """`gptgen generate gpt2 "..."`, as nanoGPT's `init_from='gpt2'`: openai-community/gpt2 holds transformers'
    files (config.json, Conv1D weights), made here by exporting the bundled model, its weights then laid out as
    OpenAI's are there: GPT2Model's names (no `transformer.` prefix, no head) and each layer's causal mask."""
    from safetensors.torch import load_file, save_file

    from gptgen.interop import export_hf

    export_hf(BUNDLED, tmp_path / "hf")
    weights = {k.removeprefix("transformer."): v for k, v in load_file(tmp_path / "hf" / hub.MODEL_FILE).items()
               if k != "lm_head.weight"}
    for i in range(4):
        weights[f"h.{i}.attn.bias"] = torch.ones(1, 1, 128, 128).tril()
    save_file(weights, tmp_path / "hf" / hub.MODEL_FILE, metadata={"format": "pt"})
    commit, cache, ours = "c" * 40, tmp_path / "hub", tmp_path / "gptgen-cache"
    cache_repo(cache, "openai-community/gpt2", "main", commit,
               {name: (tmp_path / "hf" / name).read_bytes() for name in ("config.json", hub.MODEL_FILE)})
    greedy = ["ROMEO:", "--max-new-tokens", "8", "--temperature", "0"]
    r = gptgen_offline(cache, "generate", "gpt2", *greedy, GPTGEN_CACHE_DIR=str(ours))
    converted = ours / "hub" / "openai-community--gpt2" / commit / "gpt2.safetensors"
    assert r.returncode == 0 and f"converting openai-community/gpt2 (transformers GPT-2) to a gptgen model file, " \
        f"once: {converted}" in r.stderr, r.stderr
    r2 = gptgen_offline(cache, "import", str(tmp_path / "hf"), str(tmp_path / "imported.safetensors"))
    assert r2.returncode == 0, r2.stderr
    reference = gptgen_offline(cache, "generate", str(tmp_path / "imported.safetensors"), *greedy)
    assert r.stdout == reference.stdout and r.stdout.strip()  # the same weights: the same greedy text
    made = converted.stat().st_mtime_ns
    for args in (["generate", "gpt2", *greedy], ["pull", "gpt2"], ["import", "gpt2", str(tmp_path / "i.safetensors")]):
        r = gptgen_offline(cache, *args, GPTGEN_CACHE_DIR=str(ours))
        assert r.returncode == 0 and "converting" not in r.stderr, r.stderr
    assert converted.stat().st_mtime_ns == made
    assert gptgen_offline(cache, "pull", "gpt2", GPTGEN_CACHE_DIR=str(ours)).stdout.strip() == str(converted)
    imported, ours = (load_model_file(p)[1] for p in (tmp_path / "i.safetensors", converted))
    assert imported.keys() == ours.keys() and all(torch.equal(imported[k], ours[k]) for k in ours)
    assert training_info(load_model_file(converted)[2]) == {"imported_from": f"openai-community/gpt2@{commit}"}


def test_a_transformers_repository_with_sharded_weights_is_a_model_id_too(tmp_path):
    """`gptgen import` read shards by their index, but as a model id such a repository "has no model.safetensors"."""
    import json

    from safetensors.torch import load_file, save_file

    from gptgen.interop import HF_INDEX, export_hf, import_hf

    export_hf(BUNDLED, tmp_path / "hf")
    weights = load_file(tmp_path / "hf" / hub.MODEL_FILE)
    names = sorted(weights)
    shards = {f"model-0000{i + 1}-of-00002.safetensors": names[i::2] for i in range(2)}
    weight_map = {name: shard for shard, shard_names in shards.items() for name in shard_names}
    files = {"config.json": (tmp_path / "hf" / "config.json").read_bytes(),
             HF_INDEX: json.dumps({"metadata": {}, "weight_map": weight_map}).encode()}
    for shard, shard_names in shards.items():
        save_file({n: weights[n] for n in shard_names}, tmp_path / shard, metadata={"format": "pt"})
        files[shard] = (tmp_path / shard).read_bytes()
    commit, cache, ours = "d" * 40, tmp_path / "hub", tmp_path / "gptgen-cache"
    cache_repo(cache, "owner/sharded", "main", commit, files)
    r = gptgen_offline(cache, "pull", "owner/sharded", GPTGEN_CACHE_DIR=str(ours))
    assert r.returncode == 0 and "converting owner/sharded" in r.stderr, r.stderr
    import_hf(tmp_path / "hf", tmp_path / "direct.safetensors")
    pulled, direct = (load_model_file(p)[1] for p in (r.stdout.strip(), tmp_path / "direct.safetensors"))
    assert pulled.keys() == direct.keys() and all(torch.equal(pulled[k], direct[k]) for k in direct)


def test_a_conversion_that_another_process_finished_meanwhile_is_taken(tmp_path, monkeypatch):
    """Two servers started at once on `gpt2`: the second's conversion found the first's file at its end, and
    failed with "exists; give a new file name"."""
    import gptgen.interop

    monkeypatch.setenv("GPTGEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(hub, "snapshot", lambda repo_id, commit: tmp_path / "snapshot")
    pulled = tmp_path / ("c" * 40) / hub.MODEL_FILE

    def the_other_one_wrote_it(source, out, origin):  # as import_hf ends then: publishing finds the name taken
        from gptgen.checkpoint import new_file

        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_bytes(b"the other process's file")
        new_file(out, ".safetensors")

    monkeypatch.setattr(gptgen.interop, "import_hf", the_other_one_wrote_it)
    out = hub._converted("openai-community/gpt2", pulled)
    assert out.read_bytes() == b"the other process's file"
    out.unlink()

    def failed(source, out, origin):
        raise ModelFileError("config.json: not a GPT-2")

    monkeypatch.setattr(gptgen.interop, "import_hf", failed)
    with pytest.raises(ModelFileError, match="not a GPT-2"):
        hub._converted("openai-community/gpt2", pulled)


def test_a_conversion_killed_half_way_leaves_no_file_behind_once_it_is_stale(tmp_path, monkeypatch):
    import time

    import gptgen.interop
    from gptgen.checkpoint import STALE_WRITE_S

    monkeypatch.setenv("GPTGEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(hub, "snapshot", lambda repo_id, commit: tmp_path / "snapshot")
    monkeypatch.setattr(gptgen.interop, "import_hf", lambda source, out, origin: Path(out).write_bytes(b"model"))
    folder = tmp_path / "hub" / "openai-community--gpt2" / ("c" * 40)
    folder.mkdir(parents=True)
    killed, writing = folder / ".gpt2.safetensors.k1ll3d.tmp", folder / ".gpt2.safetensors.wr1t1n.tmp"  # atomic_path's
    for partial in (killed, writing):
        partial.write_bytes(b"half")
    os.utime(killed, (time.time() - STALE_WRITE_S - 60,) * 2)
    assert hub._converted("openai-community/gpt2", tmp_path / ("c" * 40) / hub.MODEL_FILE).read_bytes() == b"model"
    assert not killed.exists() and writing.exists()


def test_a_bare_gpt2_name_is_a_local_path_when_one_has_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert [hub.hub_id(n) for n in ("gpt2", "gpt2-xl", "distilgpt2", "owner/m", "gpt3")] == [
        "openai-community/gpt2", "openai-community/gpt2-xl", "distilbert/distilgpt2", "owner/m", None]
    (tmp_path / "gpt2").write_bytes(b"")
    assert hub.hub_id("gpt2") is None and hub.resolve("gpt2") == Path("gpt2")


@pytest.mark.parametrize("repo_id, message", [
    ("owner/not-cached", "not in the Hugging Face cache"),
    ("owner/a/b", "not a Hub repository id"),
    ("../etc", "not a Hub repository id"),
])
def test_pull_errors_are_one_clear_line(hf_cache, repo_id, message):
    r = gptgen_offline(hf_cache, "pull", repo_id)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


class FakeApi:
    """Records what gptgen asks the Hub to do."""

    def __init__(self):
        self.calls, self.files = [], []  # files: what the repository holds already
        self.private = {}  # the repositories that exist: private or not

    def list_repo_files(self, repo_id, **kwargs):
        return self.files

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        self.private.setdefault(repo_id, kwargs["private"])  # exist_ok: an existing one is left as it is
        return f"https://huggingface.co/{repo_id}"

    def repo_info(self, repo_id, **kwargs):
        from types import SimpleNamespace

        return SimpleNamespace(private=self.private[repo_id])

    def create_commit(self, repo_id, operations, **kwargs):
        self.calls.append(("create_commit", repo_id,  # a deletion as None
                           {op.path_in_repo: getattr(op, "path_or_fileobj", None) for op in operations}, kwargs))


@pytest.fixture
def api(monkeypatch):
    fake = FakeApi()
    monkeypatch.setattr(hub, "_api", lambda: fake)
    return fake


def test_push_sends_the_model_and_a_card_in_one_commit(api):
    url = hub.push(BUNDLED, "owner/tiny-shakespeare")
    assert url == "https://huggingface.co/owner/tiny-shakespeare"
    (_, _, repo_kwargs), (_, repo_id, files, commit_kwargs) = api.calls
    assert repo_kwargs == {"private": False, "exist_ok": True} and repo_id == "owner/tiny-shakespeare"
    assert files[hub.MODEL_FILE] == str(BUNDLED)
    card = files["README.md"].decode()
    assert card.startswith("---\nlicense: mit\nlibrary_name: gptgen\n")
    assert "name: val nats/token, value: 4." in card and "tinyshakespeare.txt" in card
    assert 'gptgen.load("owner/tiny-shakespeare")' in card


def test_the_card_gives_the_recipe_as_flags_the_cli_takes(tmp_path):
    from tests.test_model import tiny_model_file

    recipe = {"steps": 10, "grad_checkpoint": False, "compile": "auto", "dropout": 0.0, "min_lr": None}
    tiny_model_file(tmp_path / "m.safetensors", training={"recipe": recipe})
    card = hub.model_card(tmp_path / "m.safetensors", "owner/m")
    recipe_line = next(line for line in card.splitlines() if "Recipe:" in line)
    assert recipe_line == "- Recipe: `gptgen train --compile auto --dropout 0.0 --no-grad-checkpoint --steps 10`"


def test_the_card_of_an_imported_model_says_where_it_came_from_and_no_training(tmp_path):
    from tests.test_model import tiny_model_file

    tiny_model_file(tmp_path / "m.safetensors", training={"imported_from": "openai-community/gpt2@" + "c" * 40})
    card = hub.model_card(tmp_path / "m.safetensors", "owner/gpt2-int8")
    assert f"imported into gptgen from `openai-community/gpt2@{'c' * 40}`; weights: none." in card
    assert "Steps:" not in card and "Recipe:" not in card and "model-index" not in card


def test_push_space_sends_app_package_requirements_header_and_model(api):
    hub.push_space(BUNDLED, "owner/gptgen-demo")
    (_, _, repo_kwargs), (_, _, files, commit_kwargs) = api.calls
    assert repo_kwargs["repo_type"] == "space" and repo_kwargs["space_sdk"] == "gradio"
    assert commit_kwargs["repo_type"] == "space"
    assert {"app.py", "requirements.txt", "gptgen/web.py", "gptgen/serve.py", "gptgen/assets/gpt2.tiktoken",
            f"models/{BUNDLED.name}"} <= set(files)
    readme = files["README.md"].decode()
    assert readme.startswith("---\n") and "sdk: gradio" in readme and "app_file: app.py" in readme
    assert 'short_description: "A GPT-2 trained by gptgen on tinyshakespeare.txt, int8"' in readme
    assert "pyproject.toml" not in files  # the Space imports the package from its folder
    assert files["requirements.txt"] == hub.CPU_TORCH + (ROOT / "requirements.txt").read_bytes()


def test_a_space_pushed_again_with_another_model_keeps_only_the_new_one(api):
    """An earlier push's model stayed in the Space, which then offered both (and opened on the first by name)."""
    api.files = [".gitattributes", "README.md", "app.py", "models/old-model.safetensors", "gptgen/removed.py",
                 "gptgen/model.py", f"models/{BUNDLED.name}", "notes/mine.md"]
    hub.push_space(BUNDLED, "owner/space")
    files = api.calls[-1][2]
    assert {path for path, data in files.items() if data is None} == {"models/old-model.safetensors",
                                                                      "gptgen/removed.py"}
    assert files[f"models/{BUNDLED.name}"] == str(BUNDLED) and "notes/mine.md" not in files  # not gptgen's: kept


def test_a_space_names_a_run_folders_model_as_serve_does_and_says_what_it_learned(api, tmp_path, monkeypatch):
    """runs/my/model-int8.safetensors was served in the Space as `model-int8`, described as tiny shakespeare."""
    from tests.test_model import tiny_model_file

    run = tmp_path / "runs" / "my"
    run.mkdir(parents=True)
    tiny_model_file(run / "model-int8.safetensors", training={"corpus": "texts/poems.txt"})
    files = hub.space_files(run / "model-int8.safetensors")
    assert "models/my-int8.safetensors" in files
    assert 'short_description: "A GPT-2 trained by gptgen on poems.txt"' in files["README.md"].decode()
    monkeypatch.setattr(hub, "ROOT", tmp_path)  # an installed wheel: no app.py beside the package
    with pytest.raises(ModelFileError, match="run it from a clone"):
        hub.space_files(BUNDLED)


def test_a_model_from_the_hub_cache_is_named_by_its_repository(api, tmp_path, monkeypatch):
    """The cache's model.safetensors is a link to blobs/SHA256: the Space's file and the GGUF name were that hash."""
    import gguf

    from gptgen.checkpoint import given_name
    from gptgen.interop import export_gguf
    from tests.test_model import tiny_model_file

    repo = tmp_path / "hub" / "models--you--my-model"
    for folder in ("blobs", "snapshots/c0ffee"):
        (repo / folder).mkdir(parents=True)
    blob = tiny_model_file(repo / "blobs" / ("ab" * 32), training={"corpus": "poems.txt"})
    (repo / "snapshots" / "c0ffee" / "model.safetensors").symlink_to(blob)
    cached = repo / "snapshots" / "c0ffee" / "model.safetensors"
    assert "models/my-model.safetensors" in hub.space_files(cached)
    export_gguf(cached, tmp_path / "m.gguf", "f16")
    assert gguf.GGUFReader(tmp_path / "m.gguf").fields["general.name"].contents() == "my-model"
    (tmp_path / "runs" / "my").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "runs" / "my")  # given in its run folder, by its bare name
    assert given_name("model-int8.safetensors") == "my-int8"


def test_push_takes_a_repository_id_that_a_local_folder_shares_its_owner_with(api, tmp_path, monkeypatch):
    """With a `you/` folder here, `push MODEL you/my-model` was "not a Hub repository id"."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "you").mkdir()
    assert hub.push(BUNDLED, "you/my-model") == "https://huggingface.co/you/my-model"
    with pytest.raises(ModelFileError, match="not a Hub repository id"):
        hub.push(BUNDLED, "you/../x")


def test_push_takes_a_run_folder_as_its_model(api, tmp_path, capsys):
    from gptgen.cli import main

    run = tmp_path / "my"
    run.mkdir()
    (run / "model.safetensors").write_bytes(BUNDLED.read_bytes())
    assert main(["push", str(run), "owner/my"]) == 0
    assert api.calls[-1][2][hub.MODEL_FILE] == str(run / "model.safetensors")
    assert main(["push", "--space", str(run), "owner/space"]) == 0
    assert "models/my.safetensors" in api.calls[-1][2]  # named as `serve --models` names it


def test_private_pushes_create_private_repositories(api):
    """`gptgen push --private` must never publish a model or a Space for everyone to see."""
    hub.push(BUNDLED, "owner/model", private=True)
    hub.push_space(BUNDLED, "owner/space", private=True)
    assert [kwargs["private"] for call, _, kwargs, *_ in api.calls if call == "create_repo"] == [True, True]


@pytest.mark.parametrize("space", [False, True])
def test_a_private_push_to_a_public_repository_is_refused_before_the_upload(api, space):
    """create_repo leaves an existing repository as it is: `--private` on a public one published the model."""
    api.private["owner/public"] = False
    with pytest.raises(ModelFileError, match="owner/public exists and is public"):
        (hub.push_space if space else hub.push)(BUNDLED, "owner/public", private=True)
    assert not [call for call in api.calls if call[0] == "create_commit"]
    (hub.push_space if space else hub.push)(BUNDLED, "owner/public")  # without --private: it stays public
    assert api.calls[-1][0] == "create_commit"


@pytest.mark.parametrize("status, hint", [(401, True), (403, True), (404, False)])
def test_a_hub_refusal_is_one_sentence_with_a_login_hint_when_it_is_the_login(status, hint):
    """A push without a token should tell the user to log in, and only then."""
    from types import SimpleNamespace

    from huggingface_hub.errors import HfHubHTTPError

    with pytest.raises(ModelFileError, match="the Hub refused owner/x: nope") as e, hub._hub_call("owner/x"):
        raise HfHubHTTPError("nope\ndetails", response=SimpleNamespace(status_code=status, headers={},
                                                                request=None))
    assert ("hf auth login" in str(e.value)) == hint


def test_a_connection_failure_is_one_sentence_and_other_errors_pass_through():
    """No network is the user's to fix (one line); a bug elsewhere must keep its traceback."""
    with pytest.raises(ModelFileError, match="could not reach the Hugging Face Hub for owner/x"), \
            hub._hub_call("owner/x"):
        raise ConnectionRefusedError("refused")
    with pytest.raises(KeyError), hub._hub_call("owner/x"):
        raise KeyError("a bug")


def test_without_a_network_the_cache_is_asked_at_once_without_retries(hf_cache, monkeypatch, caplog):
    """No DNS (offline): huggingface_hub retried for ~25 s, with five warnings, before its cache was asked."""
    import logging
    import socket

    from huggingface_hub import constants

    def no_dns(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_cache))
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    # gptgen's main() stops huggingface_hub's records reaching the root logger, and so caplog, for the process
    monkeypatch.setattr(logging.getLogger("huggingface_hub"), "propagate", True)
    assert hub.pull("owner/tiny-shakespeare").read_bytes() == BUNDLED.read_bytes()
    with pytest.raises(ModelFileError, match="nobody/nothing-here is not in the Hugging Face cache"):
        hub.pull("nobody/nothing-here")
    assert not [r for r in caplog.records if "Retry" in r.getMessage()]


def test_offline_the_hub_is_not_looked_up(monkeypatch):
    """HF_HUB_OFFLINE=1: where DNS packets are dropped, each lookup waited out the resolver's timeout."""
    import socket

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: pytest.fail("looked the Hub's name up"))
    assert hub._no_network()


def test_push_refuses_bad_ids_and_non_models_before_any_call(api, tmp_path):
    with pytest.raises(ModelFileError, match="not a Hub repository id"):
        hub.push(BUNDLED, "no-owner")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"junk")
    with pytest.raises(ModelFileError):
        hub.push(junk, "owner/x")
    assert api.calls == []


def test_a_path_that_reads_as_local_is_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    """A mistyped `runs/my-model` used to wait ~25 s on the network before "not in the Hugging Face cache"."""
    monkeypatch.chdir(tmp_path)
    assert hub.is_hub_id("owner/name")
    (tmp_path / "runs").mkdir()
    assert not hub.is_hub_id("runs/model-int8") and not hub.is_hub_id("other/model.safetensors")
    r = gptgen_offline(tmp_path / "empty-cache", "generate", "runs/model-int8", "hi")
    assert r.returncode == 2 and "'runs/model-int8' does not exist" in r.stderr, r.stderr


@pytest.mark.parametrize("args", [["push", str(BUNDLED), "you/model"], ["push", "--space", "you/space"]])
def test_push_without_a_network_is_one_clear_line(args):
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": "hf_test", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "gptgen", *args], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "could not reach the Hugging Face Hub for you/" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_an_id_the_hub_would_refuse_is_not_a_hub_id(tmp_path, monkeypatch):
    """The Hub refuses `..` in names, and an id is also a path in the cache: `owner/x..` never reaches the Hub. It
    also refuses `--`, a name ending in `-` or `.`, and `.git` at the end, with an error of huggingface_hub's own
    that came out of push and pull as a traceback."""
    monkeypatch.chdir(tmp_path)
    for repo_id in ("owner/name..x", "own..er/name", "you/model-", "you/model.", "a--b/c", "you/m--x", "you/m.git"):
        assert not hub.is_hub_id(repo_id), repo_id
        with pytest.raises(ModelFileError, match="not a Hub repository id"):
            hub.check_hub_id(repo_id)
    for repo_id in ("you/model-", "a--b/c"):
        r = gptgen_offline(tmp_path / "hub", "pull", repo_id)
        assert r.returncode == 2 and "not a Hub repository id" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert hub.is_hub_id("you/model_") and hub.is_hub_id("o/a.b-c_d")


def test_pull_gpt2_is_openais_whatever_folder_is_here(tmp_path, monkeypatch):
    """`pull gpt2` with a gpt2/ folder here (a clone of the transformers repository, say) said it was no Hub id."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gpt2").mkdir()
    asked = []
    monkeypatch.setattr(hub, "_fetch", lambda call, repo_id, revision, **kw: asked.append(repo_id) or BUNDLED)
    assert hub.pull("gpt2") == BUNDLED and asked == ["openai-community/gpt2"]


def test_a_spaces_short_description_says_what_the_model_is_in_any_characters(tmp_path):
    """A corpus named in other letters crashed re.sub (json's \\u00e8 read as an escape); an imported model was
    'trained by gptgen'."""
    from tests.test_model import tiny_model_file

    def description(training):
        tiny_model_file(tmp_path / "m.safetensors", training=training)
        readme = hub.space_files(tmp_path / "m.safetensors")["README.md"].decode()
        return next(line for line in readme.splitlines() if line.startswith("short_description: "))

    assert description({"corpus": "data/poèmes.txt"}) == \
        'short_description: "A GPT-2 trained by gptgen on po\\u00e8mes.txt"'
    assert description({"imported_from": "openai-community/gpt2@abc"}) == \
        'short_description: "GPT-2 imported from openai-community/gpt2@abc"'


def test_a_spaces_short_description_is_cut_to_the_hubs_60_characters(tmp_path):
    """The Hub rejects a Space whose short_description is longer than 60 characters (a long corpus name)."""
    from tests.test_model import tiny_model_file

    tiny_model_file(tmp_path / "m.safetensors", training={"corpus": "a" * 80 + ".txt"})
    readme = hub.space_files(tmp_path / "m.safetensors")["README.md"].decode()
    line = next(line for line in readme.splitlines() if line.startswith("short_description: "))
    assert line == f'short_description: "A GPT-2 trained by gptgen on {"a" * 31}"'  # 60 characters
