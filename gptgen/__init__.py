"""gptgen: train a GPT-2 model on any text file, squeeze it to int8, and generate text from it."""

from __future__ import annotations

__version__ = "0.2.0"


def load(path: str, device: str = "auto", dtype: str = "float32", revision: str | None = None,
         compile: bool = False):
    """A model file (float or int8) ready to generate: `gptgen.load(p).generate("prompt", max_new_tokens=50)`.

    `path` is a local file or a Hub id ("owner/name", fetched through the Hugging Face cache at `revision`).
    dtype "bfloat16" casts a float model's weights (faster on GPUs and on CPUs with bf16); int8 models
    keep their int8 weights either way. compile=True on CUDA decodes through a compiled step with CUDA
    graphs (`gptgen.generate.compile_decoding`): the first call compiles, for tens of seconds.
    """
    import torch

    from gptgen.checkpoint import load_model
    from gptgen.config import ConfigError
    from gptgen.device import pick_device
    from gptgen.generate import TextModel, compile_decoding

    if dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"dtype must be float32 or bfloat16, got {dtype!r}")
    from gptgen.hub import resolve

    model, metadata = load_model(resolve(path, revision), pick_device(device))
    if dtype == "bfloat16" and metadata.get("quantization") == "none":
        model = model.to(torch.bfloat16)
    if compile:
        compile_decoding(model)
    return TextModel(model, metadata)
