"""Hugging Face Spaces entry point: `gptgen serve` on the bundled model(s), with its address line and errors.

Spaces routes traffic to the address in GRADIO_SERVER_NAME (0.0.0.0 there); run locally, it stays on
127.0.0.1. The `__main__` guard matters: the engine process is started with multiprocessing's spawn,
which imports this file again in the new process.
"""

import os
import sys

from gptgen.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", "--host", os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                   "--port", os.environ.get("GRADIO_SERVER_PORT", "7860")]))
