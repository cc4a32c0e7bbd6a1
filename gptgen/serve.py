"""The server: the Gradio page and its API for a shelf of models, bound to 127.0.0.1 unless told otherwise."""

from __future__ import annotations

import logging
from pathlib import Path

from gptgen.checkpoint import ModelFileError

log = logging.getLogger(__name__)
BUNDLED_MODELS = Path(__file__).resolve().parent.parent / "models"  # the repo's models/ (a Space's too)


def pick_models(models_dir: str | Path, model: str | None) -> tuple[list[Path], str | None]:
    """The files to serve and the one shown first: `model` is a name in the folder or a path to a file."""
    folder = Path(models_dir)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if model is None:
        return files, None
    if model in {f.stem for f in files}:
        return files, model
    path = Path(model)
    if not path.is_file():
        names = ", ".join(f.stem for f in files) or "none"
        raise ModelFileError(f"--model {model!r} is neither a file nor a model in {str(folder)!r} (it has: {names})")
    return [f for f in files if f.stem != path.stem] + [path], path.stem


def serve(models_dir: str | Path, model: str | None = None, host: str = "127.0.0.1", port: int = 7860,
          device: str = "auto", block: bool = True):
    """Load the first model (so the page is ready when the URL is printed) and serve the page."""
    from gptgen.web import ModelShelf, build_app

    files, default = pick_models(models_dir, model)
    app = build_app(ModelShelf(files, device), default)
    if host in ("0.0.0.0", "::"):
        log.warning("serving on %s: anyone who can reach this machine can use the page", host)
    app.launch(server_name=host, server_port=port, prevent_thread_lock=not block, footer_links=["api"])
    return app
