import pytest

from gptgen.checkpoint import ModelFileError
from gptgen.cli import main
from gptgen.serve import pick_models
from tests.conftest import BUNDLED


def test_pick_models_by_name_or_file(tmp_path):
    files, default = pick_models(BUNDLED.parent, None)
    assert BUNDLED in files and default is None
    assert pick_models(BUNDLED.parent, BUNDLED.stem) == (files, BUNDLED.stem)
    other = tmp_path / "mine.safetensors"
    other.write_bytes(BUNDLED.read_bytes())
    files, default = pick_models(BUNDLED.parent, str(other))
    assert files[-1] == other and default == "mine"


def test_unknown_model_names_what_is_there(capsys):
    with pytest.raises(ModelFileError, match="shakespeare-mini-int8"):
        pick_models(BUNDLED.parent, "nope")
    assert main(["serve", "--model", "nope"]) == 2
    assert "neither a file nor a model" in capsys.readouterr().err


def test_empty_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["serve", "--models", str(tmp_path)]) == 2
    assert "no models to serve" in capsys.readouterr().err
