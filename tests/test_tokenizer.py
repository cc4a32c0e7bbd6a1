import tiktoken

from gptgen.tokenizer import EOT, EOT_ID, get_tokenizer
from tests.conftest import CORPUS


def test_matches_tiktoken_gpt2_on_the_whole_reference_corpus():
    text = CORPUS.read_text(encoding="utf-8")
    ours = get_tokenizer().encode_ordinary(text)
    assert len(ours) == 338_025
    assert ours == tiktoken.get_encoding("gpt2").encode_ordinary(text)


def test_round_trip_and_special_token():
    enc = get_tokenizer()
    text = "Hello, wörld! 你好 👋🏽 e\u0301"
    assert enc.decode(enc.encode_ordinary(text)) == text
    assert enc.n_vocab == 50257
    assert enc.encode(EOT, allowed_special="all") == [EOT_ID]
    assert EOT_ID not in enc.encode_ordinary(EOT)  # in training text it is just characters


def test_matches_tiktoken_gpt2_on_unicode_and_whitespace():
    """The corpus above is ASCII: letters and digits of other scripts, contractions, combining marks and runs of
    every kind of whitespace, at the end of a text too, where the two patterns could differ."""
    text = ("It's 3½ o'clock — ¿qué? Ĳ ǅ Ⅻ ٣ 你好,世界 👋🏽 e\u0301 \u00a0\u2003x\u3000 y\t\t\n\n z\x1c\x85 "
            "don'T WE'LL ’re  \r\n \n  \u205f")
    reference = tiktoken.get_encoding("gpt2")
    for end in range(len(text) + 1):
        assert get_tokenizer().encode_ordinary(text[:end]) == reference.encode_ordinary(text[:end]), text[:end]
