"""gptgen: train a GPT-2 model on any text file, squeeze it to int8, and generate text from it."""

from __future__ import annotations

import os

__version__ = "0.2.0"


def load(path: str | os.PathLike, device: str = "auto", dtype: str = "auto", revision: str | None = None,
         compile: bool = False):
    """A model file (float or int8) ready to generate: `gptgen.load(p).generate("prompt", max_new_tokens=50)`.

    `path` is a local file, a training run's folder (its best weights), a bundled model's name or a Hub id
    ("owner/name", or a bare GPT-2 name such as "gpt2", fetched through the Hugging Face cache at `revision`).
    dtype "bfloat16" casts a float model's weights (faster on GPUs and on CPUs with bf16); "auto" (the
    default) is bfloat16 on CUDA, float32 elsewhere. int8 models keep their int8 weights; on CUDA the rest
    of them (norms, biases, scales, and so the activations) follow dtype too, on a CPU it stays float32,
    which fbgemm's int8 layers take.
    compile=True on CUDA decodes through a compiled step with CUDA graphs
    (`gptgen.generate.compile_decoding`): the first call compiles, for tens of seconds.
    """
    from gptgen.checkpoint import load_model
    from gptgen.device import inference_dtype, pick_device
    from gptgen.generate import TextModel, compile_decoding
    from gptgen.hub import resolve

    if not isinstance(compile, bool):  # compile="no" would be true
        raise TypeError(f"compile must be True or False, got {compile!r}")
    device = pick_device(device)
    floats = inference_dtype(device, dtype)
    model, metadata = load_model(resolve(path, revision), device)
    if metadata.get("quantization", "none") == "none" or device.type == "cuda":  # a CPU's int8 layers stay packed
        model = model.to(floats)
    if compile:
        compile_decoding(model)
    return TextModel(model, metadata)
