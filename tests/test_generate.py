import math

import pytest
import torch

from gptgen.generate import (
    MAX_NEW_TOKENS,
    Batch,
    CompiledDecoder,
    Sampling,
    TextModel,
    apply_repetition_penalty,
    apply_top_p,
    compile_decoding,
    generate_tokens,
    next_token,
    stream_text,
)
from gptgen.tokenizer import EOT_ID, get_tokenizer
from tests.test_model import lively_model, tiny_model


def test_top_k_draws_only_among_the_k_largest():
    logits = torch.tensor([1.0, 5.0, 3.0, 4.0, 2.0])
    g = torch.Generator().manual_seed(0)
    draws = {next_token(logits, torch.empty(0), Sampling(temperature=5.0, top_k=2), g) for _ in range(200)}
    assert draws == {1, 3}
    draws = {next_token(logits, torch.empty(0), Sampling(temperature=5.0, top_k=0), g) for _ in range(400)}
    assert draws == {0, 1, 2, 3, 4}
    assert next_token(logits, torch.empty(0), Sampling(temperature=0), g) == 1
    assert next_token(logits, torch.empty(0), Sampling(temperature=1.0, top_k=1), g) == 1


@pytest.mark.parametrize("extreme, expected", [
    (dict(temperature=1e-45), {1}), (dict(temperature=1e-320), {1}),  # the limit of a temperature going to 0: greedy
    (dict(temperature=1e300), {0, 1, 2, 3, 4}),  # going to infinity: uniform
    (dict(repetition_penalty=1e-45), {1}),  # the seen token 1 (logit 5) multiplied up beyond all others
    (dict(repetition_penalty=1e300), {0, 1, 2, 3})])  # the seen token 4 (logit -2) multiplied down to nothing
def test_extreme_but_valid_values_sample_without_nan(extreme, expected):
    """temperature=1e-45 overflowed to inf, the softmax gave NaN and multinomial raised (in the server: for every
    request decoding in the same batch)."""
    logits, g = torch.tensor([1.0, 5.0, 3.0, 4.0, -2.0]), torch.Generator().manual_seed(0)
    s = Sampling(**{"temperature": 1.0, "top_k": 0, **extreme})
    assert {next_token(logits, torch.tensor([1, 4]), s, g) for _ in range(200)} == expected


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert torch.isfinite(apply_top_p(logits, 0.7)).tolist() == [True, True, False, False]
    assert torch.isfinite(apply_top_p(logits, 0.8)).tolist() == [True, True, False, False]
    assert torch.isfinite(apply_top_p(logits, 0.81)).tolist() == [True, True, True, False]
    assert torch.isfinite(apply_top_p(logits, 0.1)).tolist() == [True, False, False, False]
    # the boundary, where float sums are exact: the first half of the mass already reaches p = 0.5
    assert torch.isfinite(apply_top_p(torch.zeros(2), 0.5)).sum() == 1


def test_repetition_penalty_pushes_seen_tokens_down():
    logits = torch.tensor([2.0, -2.0, 1.0])
    out = apply_repetition_penalty(logits, torch.tensor([0, 1]), 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]


@pytest.mark.parametrize("penalty", [1e39, 1e-50])  # beyond float32's range: inf and 0 there
def test_a_seen_token_whose_logit_is_zero_keeps_it_under_any_penalty(penalty):
    """0 x inf made its logit NaN: greedy decoding picked it, sampling raised."""
    logits, g = torch.tensor([0.0, 2.0, 1.0, -1.0]), torch.Generator().manual_seed(0)
    out = apply_repetition_penalty(logits, torch.tensor([0, 3]), penalty)
    assert torch.isfinite(out).all() and out[0] == 0 and out[1:3].tolist() == [2.0, 1.0]
    assert next_token(logits, torch.tensor([0, 3]), Sampling(temperature=0, repetition_penalty=penalty), g) == 1
    next_token(logits, torch.tensor([0, 3]), Sampling(temperature=1.0, repetition_penalty=penalty), g)


@pytest.mark.parametrize("bad, name", [
    (dict(temperature=-1), "temperature"), (dict(temperature=math.nan), "temperature"),
    (dict(top_k=-1), "top_k"), (dict(top_k=2.5), "top_k"), (dict(top_p=0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(max_new_tokens=MAX_NEW_TOKENS + 1), "max_new_tokens"),
    (dict(max_new_tokens="10"), "max_new_tokens"), (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(stop=[""]), "stop"), (dict(seed="x"), "seed"), (dict(seed=-5), "seed must be between 0"),
    (dict(seed=10**20), "seed must be between 0"), (dict(seed=2**63), "seed must be between 0"),
    (dict(temperature=10**400), "temperature must be a finite number"), (dict(top_p=-10**400), "top_p"),
    (dict(stop=["x"] * 17), "stop takes at most 16 strings"), (dict(stop="x" * 1001), "stop takes at most 16 strings"),
])
def test_bad_sampling_parameters_name_the_parameter(bad, name):
    with pytest.raises(ValueError, match=name):
        Sampling(**bad)


def test_no_stop_strings_may_be_given_as_none_as_seed_may():
    assert Sampling(stop=None).stop == () and Sampling(stop=["a" * 1000] * 16).stop == ("a" * 1000,) * 16


def test_a_model_whose_vocabulary_is_not_the_tokenizers_is_refused():
    """Its ids past the tokenizer's would be no text, and the tokenizer's past its own an IndexError."""
    from gptgen.checkpoint import ModelFileError

    for vocab in (1000, 50304):
        with pytest.raises(ModelFileError, match=f"this model has {vocab:,} tokens and gptgen's tokenizer"):
            TextModel(tiny_model(vocab_size=vocab), {})


def test_the_largest_seed_torch_takes_is_accepted():
    assert Sampling(seed=2**63 - 1).seed == 2**63 - 1


def test_numpy_numbers_are_numbers():
    import numpy as np

    s = Sampling(max_new_tokens=np.int64(10), temperature=np.float32(0.5), top_k=np.int32(3), seed=np.uint8(3))
    assert (s.max_new_tokens, s.temperature, s.top_k, s.seed) == (10, 0.5, 3, 3)
    assert type(s.max_new_tokens) is int and type(s.temperature) is float
    with pytest.raises(ValueError, match="top_k must be an integer"):
        Sampling(top_k=np.float64(3.0))


def greedy_without_cache(model, prompt, n):
    """Greedy tokens, each from a whole forward over the window the README describes: the prompt's last
    context's worth, then, each time the window is full, its most recent 3/4 (at least one token)."""
    context, out = model.config.block_size, []
    window = list(prompt[-context:]) or [EOT_ID]
    for _ in range(n):
        logits, _ = model(torch.tensor([window]))
        out.append(int(logits[0, -1].argmax()))
        window.append(out[-1])
        if len(window) > context:
            window = window[-max(1, 3 * context // 4):]
    return out


def test_kv_cache_matches_full_recompute():
    model = lively_model()  # context 16
    prompt = [464, 3290, 318]
    cached = list(generate_tokens(model, prompt, Sampling(max_new_tokens=10, temperature=0)))
    assert cached == greedy_without_cache(model, prompt, 10)


def test_generation_runs_past_the_context():
    """40 tokens after a prompt longer than the context of 16: the cache is rebuilt from the kept tokens 4 times,
    and every token is the one a whole forward over the same window gives."""
    model = lively_model()
    prompt = list(range(100, 140))
    out = list(generate_tokens(model, prompt, Sampling(max_new_tokens=40, temperature=0)))
    assert out == greedy_without_cache(model, prompt, 40)


def test_same_seed_same_tokens():
    model = tiny_model().eval()
    s = Sampling(max_new_tokens=12, temperature=1.0, top_k=0, seed=7)
    assert list(generate_tokens(model, [1, 2], s)) == list(generate_tokens(model, [1, 2], s))


def run_batch(model, requests, rows, join_every=3, cancel=None):
    """Tokens per request, decoded in one Batch: request i joins at step join_every * i (when a row is free);
    cancel=(i, step) marks request i done at that step."""
    batch, waiting, out, step = Batch(model, rows), list(enumerate(requests)), {}, 0
    try:
        while waiting or batch.active:
            if waiting and len(batch.active) < rows and step >= join_every * waiting[0][0]:
                i, (prompt, s) = waiting.pop(0)
                out[batch.add(prompt, s)] = (i, [])
            if cancel and step == cancel[1]:
                next(seq for seq in batch.active if out[seq][0] == cancel[0]).done = True
            for seq, token in batch.step():
                if token is not None:
                    out[seq][1].append(token)
            step += 1
    finally:
        model.clear_caches()
    return dict(out.values())


def test_batched_sequences_get_their_batch_of_one_tokens(bundled):
    """Greedy and seeded sampling, sequences joining and leaving at different steps, rows moving when
    others finish: every sequence's tokens equal its own run alone (the issue's test is greedy)."""
    enc = get_tokenizer()
    prompts = ["ROMEO:", "First Citizen:\nWe are accounted poor citizens", "", "KING HENRY VI:\nO God!",
               "To be", "MENENIUS:\nI tell you, friends, most charitable care"]
    samplings = [Sampling(max_new_tokens=n, temperature=0) for n in (50, 70, 30, 90, 120, 25)]
    samplings += [Sampling(max_new_tokens=40, temperature=0.9, top_k=40, top_p=0.95, repetition_penalty=1.2, seed=i)
                  for i in range(3)]
    requests = [(enc.encode_ordinary(p), s) for p, s in zip(prompts + prompts[:3], samplings, strict=True)]
    alone = [list(generate_tokens(bundled, prompt, s)) for prompt, s in requests]
    batched = run_batch(bundled, requests, rows=4)
    assert [batched[i] for i in range(len(requests))] == alone
    assert all(len(t) > 10 for t in alone)


def test_a_cancelled_sequence_frees_its_row_and_the_others_go_on_unchanged():
    model = lively_model()  # its greedy text depends on the context, so a wrong row's would show
    requests = [([1, 2, 3], Sampling(max_new_tokens=30, temperature=0)),
                ([4, 5], Sampling(max_new_tokens=30, temperature=0)),
                ([6], Sampling(max_new_tokens=30, temperature=0))]
    got = run_batch(model, requests, rows=2, join_every=0, cancel=(0, 5))
    assert len(got[0]) == 5
    assert got[1] == list(generate_tokens(model, *requests[1]))
    assert got[2] == list(generate_tokens(model, *requests[2]))  # joined in the cancelled one's row
    assert got[1] != got[2] and len(set(got[2])) > 1


def test_a_row_cancelled_as_another_joins_leaves_the_newcomer_its_own_text():
    """A row is cancelled and a sequence joins between two steps: the rows that sampled a token are forwarded
    first, then freed (freed first, the newcomer would move among them and be forwarded with them)."""
    model = lively_model()  # context 16: the newcomer's 14-token prompt rebuilds its cache soon
    requests = [(list(range(100, 100 + n)), Sampling(max_new_tokens=12, temperature=0)) for n in (3, 5, 14)]
    got = run_batch(model, requests, rows=3, join_every=2, cancel=(0, 4))  # at step 4: 2 joins, 0 is cancelled
    alone = [list(generate_tokens(model, *r)) for r in requests]
    assert got[0] == alone[0][:len(got[0])] and len(got[0]) < 12
    assert got[1] == alone[1] and got[2] == alone[2]


def test_a_row_cancelled_at_the_end_of_its_context_is_not_rebuilt():
    """A cancelled row still takes its step's forward (see Batch._forward), but no one reads it: at its context's end
    it rebuilt 3/4 of the context (768 tokens for gpt2), and every stream of the batch waited for that."""
    model = lively_model()  # context 16
    batch = Batch(model, rows=2)
    gone = batch.add(list(range(100, 116)), Sampling(max_new_tokens=8, temperature=0))  # a whole context
    batch.step()  # its 17th token: the next forward needs a rebuild
    gone.done = True
    batch.add([1, 2], Sampling(max_new_tokens=8, temperature=0))
    lengths, forward = [], model.forward
    model.forward = lambda idx, **kwargs: lengths.append(idx.size(1)) or forward(idx, **kwargs)
    batch.step()
    model.clear_caches()
    assert lengths == [1]  # the step's own forward, no prefill


def _model(kind: str):
    import gptgen
    from tests.conftest import BUNDLED

    if kind == "float":
        return tiny_model().eval()
    return gptgen.load(str(BUNDLED), device="cpu").model.to("cpu")  # moved: unpacked, the int8 path GPUs take


@pytest.mark.parametrize("kind", ["float", "int8"])
def test_the_compiled_step_gives_the_eager_logits_over_a_static_cache(kind):
    """CompiledDecoder's step (inductor on CPU here; on CUDA it adds CUDA graphs) attends over the whole cache
    with the unwritten positions masked, so its shapes never change: its logits are the eager step's."""
    model = _model(kind)
    model.setup_caches(batch=1, static=True)  # the whole context, zeroed
    decoder = CompiledDecoder(model, options={})
    tokens = torch.randint(0, 50257, (12,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.inference_mode():
        model(torch.tensor([tokens[:5]]), last_only=True)
        for pos in range(5, 12):
            fast = decoder([tokens[pos]], [pos])
            ref = model(torch.tensor([[tokens[pos]]]), pos=pos, last_only=True)[0][:, -1]  # rewrites the same entry
            torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4)
    assert not decoder.failed
    model.clear_caches()


def test_compiled_decoding_compiles_once_keeps_its_caches_and_gives_the_eager_text():
    model = _model("int8")
    s = Sampling(max_new_tokens=24, temperature=0)
    prompts = [get_tokenizer().encode_ordinary(p) for p in ("ROMEO:", "First Citizen:\nBefore we proceed")]
    eager = [list(generate_tokens(model, p, s)) for p in prompts]
    model.compiled_decoder = CompiledDecoder(model, options={})
    graphs = lambda: torch._dynamo.utils.counters["stats"]["unique_graphs"]  # noqa: E731
    try:
        compiled = [list(generate_tokens(model, prompts[0], s))]
        caches, compiles = [b.attn.cache for b in model.transformer.h], graphs()
        compiled.append(list(generate_tokens(model, prompts[1], s)))  # another prompt length: no new graph
        list(generate_tokens(model, prompts[0], Sampling(max_new_tokens=3, temperature=0)))
        assert compiled == eager and graphs() == compiles
        assert all(c is not None and c.kv.size(3) == model.config.block_size for c in caches)
        assert [b.attn.cache for b in model.transformer.h] == caches  # the same tensors, call after call
    finally:
        del model.compiled_decoder
        model.clear_caches()


def test_an_int8_model_with_bf16_activations_as_cuda_runs_it_gives_the_float32_greedy_text():
    """On CUDA gptgen.load casts an int8 model's float tensors to bf16 (its int8 layers are fast there with bf16
    activations); the same model on a CPU, unpacked as a GPU has it, eager and through the compiled step."""
    greedy = lambda model: list(generate_tokens(model, [1, 2, 3, 4], Sampling(max_new_tokens=24, temperature=0)))  # noqa: E731
    reference = greedy(_model("int8"))
    model = _model("int8").to(torch.bfloat16)
    assert {t.dtype for t in model.state_dict().values()} == {torch.int8, torch.bfloat16}
    assert greedy(model) == reference
    model.compiled_decoder = CompiledDecoder(model, options={})
    assert greedy(model) == reference
    assert not model.compiled_decoder.failed


def test_compiled_decoding_falls_back_to_eager_with_a_warning():
    model = _model("float")
    s = Sampling(max_new_tokens=20, temperature=1.0, top_k=20, seed=2)
    eager = list(generate_tokens(model, [1, 2, 3], s))
    decoder = model.compiled_decoder = CompiledDecoder(model, options={})

    def broken(*args):
        raise RuntimeError("no compiler here")

    decoder.compiled = broken
    try:
        with pytest.warns(UserWarning, match="decoding eagerly"):
            assert list(generate_tokens(model, [1, 2, 3], s)) == eager
        assert decoder.failed
    finally:
        del model.compiled_decoder
        model.clear_caches()


def test_compile_decoding_changes_nothing_off_cuda():
    model = tiny_model()
    compile_decoding(model)
    assert not hasattr(model, "compiled_decoder")


def test_decoding_keeps_cudnn_attention_off_and_restores_it():
    """cuDNN's attention plans per shape; decoding (prefill and steps, one and several rows) runs without it."""
    model = tiny_model().eval()
    seen = []
    forward = model.forward

    def spy(*args, **kwargs):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return forward(*args, **kwargs)

    model.forward = spy
    batch = Batch(model, rows=2)
    batch.add([1, 2, 3], Sampling(max_new_tokens=3, seed=1))
    batch.step()
    batch.add([4, 5], Sampling(max_new_tokens=3, seed=2))
    batch.step()  # the first row's step
    batch.step()  # both rows'
    model.clear_caches()
    assert len(seen) == 4 and not any(seen)
    assert torch.backends.cuda.cudnn_sdp_enabled()


def test_a_token_is_handed_out_before_the_forward_for_it():
    """The first token cost the prompt's prefill and a step's forward; now its prefill, and each later one a
    forward."""
    model = tiny_model().eval()
    calls = []
    forward = model.forward
    model.forward = lambda *args, **kwargs: calls.append(1) or forward(*args, **kwargs)
    tokens = generate_tokens(model, [1, 2, 3], Sampling(max_new_tokens=3, temperature=0))
    assert [len(calls) for _ in tokens] == [1, 2, 3]


@pytest.mark.parametrize("context", [1, 2, 3])
def test_the_smallest_contexts_generate_past_their_end(context):
    """3/4 of a context of 1 kept nothing (tokens[-0:] kept them all) and a context of 2 prefilled no tokens."""
    model = lively_model(block_size=context)
    out = list(generate_tokens(model, [1, 2, 3], Sampling(max_new_tokens=12, temperature=0)))
    assert out == greedy_without_cache(model, [1, 2, 3], 12)


def test_a_prompt_that_fails_its_prefill_leaves_no_row_behind():
    """Its row stayed active without logits, and every later step of the batch failed."""
    model = tiny_model().eval()
    batch = Batch(model, rows=2)
    with pytest.raises(IndexError):
        batch.add([10**6], Sampling(max_new_tokens=4))  # a token id past the vocabulary
    assert batch.active == []
    seq = batch.add([1, 2], Sampling(max_new_tokens=4, temperature=0))
    while not seq.done:
        batch.step()
    model.clear_caches()


def test_batched_sequences_run_past_the_context_as_alone():
    model = lively_model()  # context 16: every sequence rebuilds its cache several times
    requests = [(list(range(100, 100 + n)), Sampling(max_new_tokens=40, temperature=0)) for n in (3, 10, 20)]
    got = run_batch(model, requests, rows=3, join_every=2)
    assert [got[i] for i in range(3)] == [list(generate_tokens(model, *r)) for r in requests]


@pytest.mark.parametrize("text", [
    "Hello 👋🏽 world", "東京は日本の首都です", "e\u0301 a\u0300 n\u0303 Zalgo: Z\u0351\u0357\u0360",
    "flags 🇫🇷 and 😀😃😄",
])
def test_stream_pieces_are_whole_characters(text):
    enc = get_tokenizer()
    ids = enc.encode_ordinary(text)
    assert any(not _valid_utf8(enc.decode_single_token_bytes(t)) for t in ids), "no character split across tokens"
    pieces = list(stream_text(iter(ids)))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def _valid_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_stop_string_spanning_pieces_is_caught():
    enc = get_tokenizer()
    ids = enc.encode_ordinary("ROMEO: hello there\nJULIET: goodbye")
    pieces = list(stream_text(iter(ids), stop=("\nJULIET:",)))
    assert "".join(pieces) == "ROMEO: hello there"
    pieces = list(stream_text(iter(ids), stop=("nothing like this",)))
    assert "".join(pieces) == "ROMEO: hello there\nJULIET: goodbye"


def test_the_earlier_of_two_stop_strings_in_one_piece_ends_the_text():
    ids = get_tokenizer().encode_ordinary("abc")
    assert len(ids) == 1  # both stop strings arrive in the same piece
    assert "".join(stream_text(iter(ids), stop=("c", "b"))) == "a"


def test_generation_ends_at_the_end_of_text_token(monkeypatch):
    """The model ending its text (<|endoftext|>) ends the generation, before max_new_tokens and without the token."""
    import gptgen.generate as gen

    draws = iter([5, 6, EOT_ID, 7, 8, 9])
    monkeypatch.setattr(gen, "next_token", lambda *args: next(draws))
    tm = TextModel(tiny_model().eval(), {})
    assert list(generate_tokens(tm.model, [1, 2], Sampling(max_new_tokens=6))) == [5, 6]
    draws = iter([5, 6, EOT_ID, 7, 8, 9])
    assert tm.generate("x", max_new_tokens=6) == get_tokenizer().decode([5, 6]) and tm.last.new_tokens == 2


def test_a_stop_string_leaves_the_timings_whole(monkeypatch):
    """total_s was taken when the next token was asked for, which a stop string never does: 0 for one token."""
    import gptgen.generate as gen

    draws = iter([5, 6, 7, 8])
    monkeypatch.setattr(gen, "next_token", lambda *args: next(draws))
    tm = TextModel(tiny_model().eval(), {})
    assert tm.generate("x", max_new_tokens=4, stop=get_tokenizer().decode([5])) == ""
    assert tm.last.new_tokens == 1 and tm.last.total_s == tm.last.first_token_s > 0


def test_text_pieces_closed_before_reading_close_their_tokens():
    """A generator closed before its first next() skips its `finally`: the server's request went on decoding."""

    class Tokens:
        closed = False

        def __iter__(self):
            return self

        def __next__(self):
            return 5

        def close(self):
            self.closed = True

    tokens = Tokens()
    pieces, _ = TextModel.text(tokens, Sampling(), 1)
    pieces.close()
    assert tokens.closed


def test_tokens_per_second_counts_the_tokens_after_the_first():
    """The first token's time is the prompt's (time to first token); the rate is of the tokens decoded after it."""
    from gptgen.generate import Stats

    assert Stats(new_tokens=11, first_token_s=1.0, total_s=3.0).tokens_per_s == 5.0
    assert Stats(new_tokens=1, first_token_s=1.0, total_s=1.0).tokens_per_s == 0.0


def test_text_model_generate_and_stream_agree():
    tm = TextModel(lively_model(), {})
    text = tm.generate("The king", max_new_tokens=8, temperature=0)
    assert "".join(tm.stream("The king", max_new_tokens=8, temperature=0)) == text
    assert tm.last.new_tokens == 8 and tm.last.prompt_tokens == 2
    assert tm.generate("", max_new_tokens=3, seed=1) == tm.generate("", max_new_tokens=3, seed=1)
    with pytest.raises(ValueError, match="top_p"):
        tm.stream("x", top_p=2)
    with pytest.raises(TypeError, match="unknown sampling parameter 'max_tokens'; they are: max_new_tokens, "):
        tm.generate("x", max_tokens=3)  # OpenAI's name


def test_threads_sharing_a_model_take_turns_and_get_their_own_text(bundled):
    """Two threads generating on one loaded model wrote the same cache rows: wrong text, no error."""
    import threading

    tm = TextModel(bundled, {})
    prompts = ["ROMEO: hi", "KING: yes sir", "JULIET: O", "First Citizen:"]  # same lengths share a cache shape
    alone = [tm.generate(p, max_new_tokens=40, temperature=0) for p in prompts]
    together = [None] * len(prompts)

    def run(i):
        together[i] = tm.generate(prompts[i], max_new_tokens=40, temperature=0)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone


def test_a_second_stream_in_the_same_thread_is_refused_until_the_first_is_closed(bundled):
    tm = TextModel(bundled, {})
    first = tm.stream("ROMEO: hi", max_new_tokens=40, temperature=0)
    start = next(first)
    with pytest.raises(RuntimeError, match="already generating in this thread: finish or close"):
        tm.generate("KING: yes sir", max_new_tokens=5)
    first.close()
    assert tm.generate("ROMEO: hi", max_new_tokens=40, temperature=0).startswith(start)


def test_a_stream_read_by_a_thread_pool_lets_the_next_one_wait_its_turn(bundled):
    """A web framework reads a stream from a pool of threads: the thread that read the first stream's first piece
    started the second, which was refused as if nested, although another thread went on reading the first."""
    from concurrent.futures import ThreadPoolExecutor

    tm = TextModel(bundled, {})
    alone = [tm.generate(p, max_new_tokens=30, temperature=0) for p in ("ROMEO:", "JULIET:")]
    first, second = (tm.stream(p, max_new_tokens=30, temperature=0) for p in ("ROMEO:", "JULIET:"))
    with ThreadPoolExecutor(1) as pool:  # one thread: it reads the first's first piece, then starts the second
        start = pool.submit(next, first).result()
        waiting = pool.submit(lambda: "".join(second))
        assert start + "".join(first) == alone[0]  # read on here, another thread, meanwhile
        assert waiting.result(timeout=60) == alone[1]


def test_a_stream_read_slowly_by_another_thread_is_not_taken_for_a_nested_one(bundled, monkeypatch):
    """The same with tokens slower than NESTED_WAIT_S (a large model on a CPU): while another thread waited for the
    first stream's next token, the second stream was refused as if nested."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    import gptgen.generate

    tm = TextModel(bundled, {})
    alone = [tm.generate(p, max_new_tokens=4, temperature=0) for p in ("ROMEO:", "JULIET:")]
    monkeypatch.setattr(gptgen.generate, "NESTED_WAIT_S", 0.3)
    tokens = gptgen.generate.generate_tokens

    def slow(*args):
        for token in tokens(*args):
            time.sleep(0.8)
            yield token

    monkeypatch.setattr(gptgen.generate, "generate_tokens", slow)
    first, second = (tm.stream(p, max_new_tokens=4, temperature=0) for p in ("ROMEO:", "JULIET:"))
    with ThreadPoolExecutor(1) as pool:
        start = pool.submit(next, first).result()
        waiting = pool.submit(lambda: "".join(second))
        assert start + "".join(first) == alone[0]
        assert waiting.result(timeout=60) == alone[1]


def test_an_unseeded_generation_leaves_the_callers_random_state_alone():
    tm = TextModel(tiny_model().eval(), {})
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    tm.generate("x", max_new_tokens=3)
    assert torch.equal(torch.rand(3), expected)


def test_load_refuses_a_compile_flag_that_is_not_a_bool():
    import gptgen
    from tests.conftest import BUNDLED

    with pytest.raises(TypeError, match="compile must be True or False, got 'no'"):
        gptgen.load(BUNDLED, compile="no")


def test_load_float_and_int8_files_with_dtype(tmp_path):
    import gptgen
    from gptgen.config import ConfigError
    from tests.test_quantize import float_and_int8_files

    f32, i8 = float_and_int8_files(tiny_model(), tmp_path)
    bf16 = gptgen.load(str(f32), device="cpu", dtype="bfloat16")
    assert bf16.model.transformer.wpe.weight.dtype == torch.bfloat16
    assert len(bf16.generate("Hi", max_new_tokens=4, temperature=0)) > 0
    int8 = gptgen.load(str(i8), device="cpu", dtype="bfloat16")
    assert int8.model.lm_head.int8_weight().dtype == torch.int8 and int8.metadata["quantization"] == "int8"
    assert int8.model.transformer.wpe.weight.dtype == torch.float32  # on a CPU: fbgemm's int8 layers take float32
    with pytest.raises(ConfigError, match="dtype"):
        gptgen.load(str(f32), dtype="fp8")


@pytest.fixture(scope="module")
def bundled():
    import gptgen
    from tests.conftest import BUNDLED

    return gptgen.load(str(BUNDLED), device="cpu").model


def test_bundled_model_generates_shakespeare_offline():
    import json

    import gptgen
    from tests.conftest import BUNDLED

    model = gptgen.load(str(BUNDLED), device="cpu")
    training = json.loads(model.metadata["training"])
    assert model.metadata["quantization"] == "int8" and training["preset"] == "mini"
    assert training["corpus_sha256"] == "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
    text = model.generate("ROMEO:", max_new_tokens=60, seed=1)
    assert text == model.generate("ROMEO:", max_new_tokens=60, seed=1)
    assert ":\n" in text  # it has learned the play's speaker format


# Hostile input, as property tests: every case either works or raises ValueError with a message.
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

ANY_VALUE = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                      st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 5e-324]),  # often, not by chance
                      st.text(max_size=5), st.lists(st.integers(), max_size=2))


@settings(max_examples=300, deadline=None)
@given(st.fixed_dictionaries({}, optional={k: ANY_VALUE for k in ("max_new_tokens", "temperature", "top_k", "top_p",
                                                                   "repetition_penalty", "stop", "seed")}))
def test_any_sampling_values_are_accepted_or_rejected_by_name(params):
    """Accepted values are in range, of the stored type; a refusal starts with the name of a parameter given."""
    try:
        s = Sampling(**params)
    except ValueError as e:
        assert str(e).split()[0] in params, e
        return
    assert type(s.max_new_tokens) is int and 1 <= s.max_new_tokens <= MAX_NEW_TOKENS
    assert type(s.temperature) is float and math.isfinite(s.temperature) and s.temperature >= 0
    assert type(s.top_k) is int and s.top_k >= 0
    assert type(s.top_p) is float and 0 < s.top_p <= 1
    assert type(s.repetition_penalty) is float and math.isfinite(s.repetition_penalty) and s.repetition_penalty > 0
    assert type(s.stop) is tuple and all(type(x) is str and x for x in s.stop)
    assert s.seed is None or (type(s.seed) is int and 0 <= s.seed < 2**63)


@pytest.fixture(scope="module")
def small_model():
    from gptgen.generate import TextModel

    return TextModel(tiny_model().eval(), {})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=300))
def test_any_unicode_prompt_generates_whole_text(small_model, prompt):
    text = small_model.generate(prompt, max_new_tokens=3, seed=0)
    assert isinstance(text, str)
    assert small_model.last.prompt_tokens == len(small_model.tokenizer.encode_ordinary(prompt))


def test_a_megabyte_prompt_is_refused_before_tokenizing(small_model, monkeypatch):
    def tokenize(text):
        raise AssertionError("the prompt was tokenized before its length was checked")

    monkeypatch.setattr(small_model.tokenizer, "encode_ordinary", tokenize)
    with pytest.raises(ValueError, match="the limit is 100,000"):
        small_model.generate("x" * 2**20, max_new_tokens=1)


def test_the_prompt_cap_is_100000_characters(small_model):
    assert len(small_model.prepare("x" * 100_000)[0]) > 0
    with pytest.raises(ValueError, match="prompt is 100,001 characters; the limit is 100,000"):
        small_model.prepare("x" * 100_001)


@settings(max_examples=500, deadline=None)
@given(st.text("ab\n", max_size=12), st.lists(st.text("ab\n", min_size=1, max_size=6), min_size=1, max_size=3))
def test_the_text_held_back_is_the_longest_end_that_begins_a_stop_string(text, stop):
    """Its definition, tried length by length as it was computed before (2.9 ms a token at 16 x 1,000 characters)."""
    from gptgen.generate import _stop_prefix

    longest = max((n for s in stop for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])),
                  default=0)
    assert _stop_prefix(text, tuple(stop)) == longest
