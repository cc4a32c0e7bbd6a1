import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gptgen.data import DataError, EpochWindows, cache_dir, encode, eval_windows, load_corpus, pieces, sample_batch
from gptgen.tokenizer import get_tokenizer
from tests.conftest import CORPUS


def test_reference_split_matches_nanogpt():
    corpus = load_corpus(CORPUS)
    assert (len(corpus.train), len(corpus.val)) == (301_966, 36_059)
    assert corpus.val_chars == 1_115_394 - int(1_115_394 * 0.9)
    assert corpus.train.dtype == np.uint16


# Where GPT-2's split is delicate: whitespace of every kind (Python's \s takes \x1c-\x1f, tiktoken's does not),
# contractions, digits, punctuation, a combining mark, CJK and an emoji; and where letters, numbers and
# punctuation meet without whitespace: _ (a word character to Python, punctuation to tiktoken), numbers that are no
# digits (², Ⅻ, and 一, a letter with a numeric value), Arabic-Indic digits, a soft hyphen, CJK and full-width
# punctuation, and a letter newer than Python's Unicode tables (CJK extension H: a letter to tiktoken).
_PARTS = ["a", "Zb", " ", "  ", "\n", "\n\n", "\t", "\r\n", "\x0b", "\x0c", "\x1c", "\x1f", "\x85", "\xa0", "\u3000",
          "\u200b", "'s", "'ll", "'t", "'", "1", "23", ".", "!?", "e\u0301", "\u0301", "日本", "😀", "_", "²", "Ⅻ",
          "一", "\u0661", "\xad", "\xaa", "ß", "。", "、", "「", "」", "—", "·", "$", "%", "＿", "（", "\U00031350"]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(_PARTS), max_size=40), st.integers(1, 8))
def test_pieces_tokenize_as_the_whole_text(parts, size):
    text = "".join(parts)
    cut = pieces(text, size)
    assert "".join(cut) == text and all(len(p) >= size for p in cut[:-1])
    tokenizer = get_tokenizer()
    assert [t for p in cut for t in tokenizer.encode_ordinary(p)] == tokenizer.encode_ordinary(text)


def test_a_text_without_whitespace_is_cut_at_its_punctuation():
    text = "吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。" * 2000  # one line, 64,000 characters
    cut = pieces(text, 1000)
    assert len(cut) >= 60 and "".join(cut) == text and all(p.startswith("。") for p in cut[1:])
    tokenizer = get_tokenizer()
    assert [t for p in cut for t in tokenizer.encode_ordinary(p)] == tokenizer.encode_ordinary(text)


def test_a_text_of_many_pieces_is_tokenized_as_one():
    text = CORPUS.read_text(encoding="utf-8") * 3  # 3.3M characters: four pieces, encoded in parallel
    assert len(pieces(text)) == 4
    assert encode(text).tolist() == get_tokenizer().encode_ordinary(text)


def test_tokens_are_cached_by_content(tmp_path, monkeypatch):
    import gptgen.data

    text = "To be, or not to be, that is the question. " * 3
    first = encode(text)
    cached = list((cache_dir() / "tokens").glob("*.u16"))
    assert any(p.stat().st_size == 2 * len(first) + 8 for p in cached)  # the ids, then their count
    # the same content under another file name reuses the cache entry
    (tmp_path / "a.txt").write_text(text * 10 + "x")
    (tmp_path / "b.txt").write_text(text * 10 + "x")
    before = set((cache_dir() / "tokens").glob("*.u16"))
    load_corpus(tmp_path / "a.txt")
    mid = set((cache_dir() / "tokens").glob("*.u16"))
    load_corpus(tmp_path / "b.txt")
    assert len(mid - before) == 2 and set((cache_dir() / "tokens").glob("*.u16")) == mid
    monkeypatch.setattr(gptgen.data, "get_tokenizer", lambda: pytest.fail("tokenized again"))  # read from the cache
    np.testing.assert_array_equal(encode(text), first)
    load_corpus(tmp_path / "b.txt")


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"), (b"", "empty"), (b"  \n ", "empty"), (b"\xef\xbb\xbf\n", "empty"),
    (b"abc\x00def", "binary"), (b"caf\xe9 au lait", "not valid UTF-8.*iconv -f cp1252 -t utf-8"),
    ("\ufeff日本語のテキストです".encode("utf-16-le"), "is UTF-16 text.*iconv -f utf-16 -t utf-8"),  # no NUL byte
    ("\ufeff日本語".encode("utf-16-be"), "is UTF-16 text"),
    ("\ufeffhello".encode("utf-32-le"), "is UTF-32 text.*iconv -f utf-32 -t utf-8"),  # starts as UTF-16-LE's
    ("\ufeffhello".encode("utf-32-be"), "is UTF-32 text"),
])
def test_bad_data_files(tmp_path, content, message):
    path = tmp_path / "data.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_corpus(path)


def test_val_fraction_moves_the_split(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("abcdefghij" * 100)
    corpus = load_corpus(path, val_fraction=0.25)
    assert corpus.val_chars == 250
    whole = load_corpus(path, val_fraction=0)  # nothing held out
    assert whole.val_chars == len(whole.val) == 0 and len(whole.train) > len(corpus.train)


def test_batches_are_shifted_windows_of_the_tokens():
    tokens = np.arange(1000, dtype=np.uint16)
    x, y = sample_batch(tokens, 4, 32, np.random.default_rng(0))
    assert x.shape == y.shape == (4, 32)
    assert (y[:, :-1] == x[:, 1:]).all() and (y[:, 0] == x[:, 0] + 1).all()
    x2, _ = sample_batch(tokens, 4, 32, np.random.default_rng(0))
    assert (x == x2).all()


def test_epoch_windows_train_on_every_window_once_an_epoch_across_processes_and_accumulation():
    tokens = np.arange(200, dtype=np.uint16)  # 24 windows of 8 an epoch; 2 processes x 2 batches of 3 = 12 a step
    samplers = [EpochWindows(tokens, 8, 3, seed=5, rank=r, world=2) for r in range(2)]
    epochs = []
    for first_step in (0, 2, 4):  # an epoch is two steps
        starts = []
        for step in (first_step, first_step + 1):
            for sampler in samplers:
                for x, y in sampler.batches(step, grad_accum=2):
                    assert x.shape == y.shape == (3, 8) and (y[:, :-1] == x[:, 1:]).all()
                    starts += x[:, 0].tolist()
        offset = starts[0] % 8
        assert sorted(starts) == [offset + 8 * k for k in range(24)]  # each window once, none overlapping
        epochs.append(starts)
    assert len({tuple(e) for e in epochs}) == 3  # a new order (and offset) each epoch
    again = EpochWindows(tokens, 8, 3, seed=5, rank=1, world=2).batches(3, grad_accum=2)  # as after a resume
    assert all(torch.equal(a[0], b[0]) for a, b in zip(again, samplers[1].batches(3, grad_accum=2), strict=True))


@pytest.mark.parametrize("n", [200, 201, 207, 208])
def test_epoch_windows_leave_fewer_than_a_block_of_targets_an_epoch_and_reach_every_token(n):
    """One window too few left a text's last n % block tokens out of every epoch (142 of the reference corpus's
    train split at block 256)."""
    sampler, targets = EpochWindows(np.arange(n, dtype=np.uint16), 8, 5, seed=0), set()
    for epoch in range(60):
        ends = sampler.starts(epoch) + 8  # a window starting at s has targets s + 1 .. s + 8
        assert ends.max() <= n - 1 and n - 1 - len(ends) * 8 < 8
        targets.update(t for end in ends for t in range(end - 7, end + 1))
    assert targets == set(range(1, n))


@pytest.mark.parametrize("n", [9, 15, 16, 17])
def test_epoch_windows_fit_texts_shorter_than_two_blocks(n):
    sampler = EpochWindows(np.arange(n, dtype=np.uint16), 8, 4, seed=0)
    for step in range(20):
        (x, y), = sampler.batches(step, grad_accum=1)
        assert x.shape == y.shape == (4, 8) and (y == x + 1).all()  # whole windows, inside the text


@pytest.mark.parametrize("n, block", [(100, 32), (96, 32), (95, 32), (5, 32), (1, 8)])
def test_eval_windows_score_every_token_exactly_once(n, block):
    tokens = np.arange(1, n + 1, dtype=np.uint16)
    windows = eval_windows(tokens, block)
    targets = np.concatenate([y.numpy() for _, y in windows])
    np.testing.assert_array_equal(targets, tokens)
    for x, y in windows:
        assert len(x) == len(y) <= block
        assert (x[1:] == y[:-1]).all()
    assert windows[0][0][0] == 50256  # the first token is predicted from <|endoftext|>


def test_random_windows_start_anywhere_from_the_first_token_to_the_last_whole_window():
    tokens = np.arange(35, dtype=np.uint16)  # block 32: a window and its targets fit at starts 0, 1 and 2
    rng = np.random.default_rng(0)
    starts = {int(x[0, 0]) for x, _ in (sample_batch(tokens, 1, 32, rng) for _ in range(100))}
    assert starts == {0, 1, 2}


def test_a_byte_order_mark_is_not_text(tmp_path):
    """Windows editors start UTF-8 files with a BOM: it is no part of the text to learn."""
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbf" + b"abcdefghij" * 20)
    (tmp_path / "plain.txt").write_bytes(b"abcdefghij" * 20)
    with_bom, plain = load_corpus(tmp_path / "bom.txt"), load_corpus(tmp_path / "plain.txt")
    np.testing.assert_array_equal(with_bom.train, plain.train)
    np.testing.assert_array_equal(with_bom.val, plain.val)


@pytest.mark.parametrize("damage", ["cut by a byte", "cut at a block's end", "emptied", "an id past the vocabulary"])
def test_a_cache_entry_that_cannot_be_the_texts_is_tokenized_again_and_replaced(damage):
    """A copied or synced cache folder may hold a cut entry: it must not become the text's tokens. One cut at an
    even length (a block's end, as copies are cut) passed every check, and a run trained on the text's start."""
    text = "A cache entry copied halfway. " * 5
    ids = encode(text)
    entry = next(p for p in (cache_dir() / "tokens").glob("*.u16")
                 if p.read_bytes()[:-8] == ids.astype("<u2").tobytes())  # the last 8 bytes: the count
    good = entry.read_bytes()
    entry.write_bytes({"cut by a byte": good[:-1], "cut at a block's end": good[:-16], "emptied": b"",
                       "an id past the vocabulary": good[:-10] + (60000).to_bytes(2, "little") + good[-8:]}[damage])
    assert encode(text).tolist() == get_tokenizer().encode_ordinary(text)
    assert entry.read_bytes() == good


def test_a_million_whitespace_characters_end_as_tiktoken_ends_them_and_inside_are_a_clear_error():
    """GPT-2's plain pattern overflowed tiktoken's regex engine on such a run at a text's end (tiktoken's own gpt2
    pattern does not); inside a text tiktoken itself fails, and pyo3's panic is no Exception: a traceback."""
    import tiktoken

    text = "hello world" + "\n" * 1_000_000
    assert encode(text).tolist() == tiktoken.get_encoding("gpt2").encode_ordinary(text)
    with pytest.raises(DataError, match="a run of about a million or more whitespace characters"):
        encode("hello" + "\n" * 1_000_000 + "world")


def test_a_cache_write_left_by_a_kill_goes_once_stale_and_one_in_progress_stays():
    import time

    from gptgen.checkpoint import STALE_WRITE_S

    folder = cache_dir() / "tokens"
    folder.mkdir(parents=True, exist_ok=True)
    killed, writing = folder / ".abc.gpt2.u16.x1.tmp", folder / ".def.gpt2.u16.x2.tmp"
    killed.write_bytes(b"half")
    writing.write_bytes(b"half")
    os.utime(killed, (time.time() - STALE_WRITE_S - 60,) * 2)
    encode("A text not tokenized before in this run: 1f3a9c.")
    assert not killed.exists() and writing.exists()
    writing.unlink()


def test_cache_write_failure_is_not_fatal(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    monkeypatch.setenv("GPTGEN_CACHE_DIR", str(ro / "sub"))
    if os.access(ro, os.W_OK):  # root ignores modes; make the cache path a file instead
        monkeypatch.setenv("GPTGEN_CACHE_DIR", str(tmp_path / "file"))
        (tmp_path / "file").write_text("")
    assert list(encode("some text to encode")) == get_tokenizer().encode_ordinary("some text to encode")


def test_download_checks_the_hash_keeps_a_good_copy_and_replaces_no_other_file(tmp_path, monkeypatch):
    import gptgen.data as data

    good = data.DATASETS["shakespeare"]
    monkeypatch.setitem(data.DATASETS, "shakespeare", data.Dataset(CORPUS.as_uri(), good.sha256, good.filename))
    path = data.download("shakespeare", tmp_path)
    assert path.read_bytes() == CORPUS.read_bytes()
    monkeypatch.setitem(data.DATASETS, "shakespeare", data.Dataset("file:///nonexistent", good.sha256, good.filename))
    assert data.download("shakespeare", tmp_path) == path  # a good copy is not fetched again
    path.write_bytes(b"the user's own edit")
    monkeypatch.setitem(data.DATASETS, "shakespeare", data.Dataset(CORPUS.as_uri(), good.sha256, good.filename))
    with pytest.raises(DataError, match="already exists and is not shakespeare as published; nothing was downloaded"):
        data.download("shakespeare", tmp_path)
    assert path.read_bytes() == b"the user's own edit"
    path.unlink()
    path.mkdir()  # a folder of that name
    with pytest.raises(DataError, match="already exists"):
        data.download("shakespeare", tmp_path)
    monkeypatch.setitem(data.DATASETS, "shakespeare", data.Dataset("file:///nonexistent", good.sha256, good.filename))
    other = tmp_path / "other"
    with pytest.raises(DataError, match="could not download"):
        data.download("shakespeare", other)
    monkeypatch.setitem(data.DATASETS, "shakespeare", data.Dataset(CORPUS.as_uri(), "0" * 64, good.filename))
    with pytest.raises(DataError, match="nothing was written"):
        data.download("shakespeare", other)
    assert not other.exists() or not any(other.iterdir())
    import http.client
    import urllib.request

    class CutShort:  # the server closed the connection before Content-Length: a traceback, not an OSError
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def read(self):
            raise http.client.IncompleteRead(b"First Citizen", 1_115_381)

    monkeypatch.setattr(urllib.request, "urlopen", lambda *args, **kwargs: CutShort())
    with pytest.raises(DataError, match="could not download shakespeare .*IncompleteRead"):
        data.download("shakespeare", other)
