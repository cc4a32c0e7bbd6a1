"""Hugging Face Spaces entry point: the page on the bundled model(s).

Spaces routes traffic to the address in GRADIO_SERVER_NAME (0.0.0.0 there); run locally, it stays on
127.0.0.1. The `__main__` guard matters: the engine process is started with multiprocessing's spawn,
which imports this file again in the new process.
"""

import os

from gptgen.config import BUNDLED_MODELS
from gptgen.serve import serve

if __name__ == "__main__":
    serve(BUNDLED_MODELS, host=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
          port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
