"""gptgen: train a GPT-2 model on any text file, evaluate it honestly, save and resume it safely."""

__version__ = "0.1.0"
