import math

import pytest
import torch

from gptgen.config import GPTConfig
from gptgen.model import GPT


def tiny_model(**overrides) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16, **overrides}))
    model.init_weights()
    return model


def lively_model(**overrides):
    """tiny_model with its matrices 10x: at init scale its greedy text is one token repeated whatever the context
    (so a wrong context went unseen); these weights' greedy choices depend on what they see."""
    model = tiny_model(**overrides).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(10)
    return model


def tiny_model_file(path, **save_options):
    """tiny_model() written to a model file at path (save_model's options, such as training=...); the path."""
    from gptgen.checkpoint import save_model

    m = tiny_model()
    save_model(path, m.state_dict(), m.config, **save_options)
    return path


def test_gpt2_preset_has_exactly_124_439_808_parameters():
    with torch.device("meta"):
        model = GPT(GPTConfig.from_name("gpt2"))
    assert model.num_params() == 124_439_808


def test_head_is_tied_to_the_embedding():
    model = tiny_model()
    assert model.lm_head.weight is model.transformer.wte.weight


def test_initial_loss_is_near_uniform():
    model = tiny_model()
    x = torch.randint(0, 50257, (2, 16))
    logits, loss = model(x, torch.randint(0, 50257, (2, 16)))
    assert logits.shape == (2, 16, 50257)
    assert abs(loss.item() - math.log(50257)) < 0.1


def test_attention_is_causal():
    model = tiny_model().eval()
    x = torch.randint(0, 50257, (1, 16))
    y = x.clone()
    y[0, 10:] = (y[0, 10:] + 1) % 50257
    lx, _ = model(x)
    ly, _ = model(y)
    torch.testing.assert_close(lx[0, :10], ly[0, :10])
    assert not torch.allclose(lx[0, 10:], ly[0, 10:])


def test_longer_than_context_is_refused():
    model = tiny_model()
    try:
        model(torch.zeros(1, 17, dtype=torch.long))
    except ValueError as e:
        assert "context" in str(e)
    else:
        raise AssertionError("expected a ValueError")


def test_grad_checkpointing_gives_the_same_loss_and_gradients():
    """With dropout too: the recomputed forward must draw the same dropout masks (checkpoint replays the RNG)."""
    model = tiny_model(dropout=0.3).train()
    idx = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(1))
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.grad_checkpoint = ckpt
        torch.manual_seed(2)
        _, loss = model(idx, idx)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.equal(grads[0][0], grads[1][0])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads[0][1], grads[1][1], strict=True))


def test_dropout_acts_in_training_only():
    idx = torch.randint(0, 100, (2, 8))
    model = tiny_model(vocab_size=100, dropout=0.5)
    model.train()
    assert not torch.equal(model(idx)[0], model(idx)[0])  # a new mask each call
    model.eval()
    assert torch.equal(model(idx)[0], model(idx)[0])
    no_dropout = tiny_model(vocab_size=100)
    no_dropout.train()
    assert torch.equal(no_dropout(idx)[0], no_dropout(idx)[0])
    assert torch.equal(no_dropout(idx)[0], model(idx)[0])  # same weights: eval with dropout = no dropout


def _trimmed(model: GPT, text: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """model trimmed to a text (default: at most 300 of the vocabulary's tokens); a batch of it (inputs, targets)."""
    if text is None:
        text = torch.randint(0, 300, (100,), generator=torch.Generator().manual_seed(3)) * 97
    model.trim_vocab(text)
    return text[:64].view(4, 16), text[1:65].view(4, 16)


def test_a_trimmed_head_trains_the_whole_vocabularys_loss_and_gradients():
    """trim_vocab's head is a shortcut, not another objective: the full head's loss and gradients, the shared
    row taking the sum of the rows that share it, nothing reaching the others."""
    model = tiny_model()
    x, y = _trimmed(model)
    trimmed, results = model.trimmed, []
    for head in (trimmed, None):  # None: the full head over the same weights
        model.trimmed = head
        model.zero_grad()
        logits, loss = model(x, y)
        loss.backward()
        results.append((logits.size(-1), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (width, loss, grads), (full_width, full_loss, full_grads) = results
    assert width == len(trimmed.vocab) + 1 < full_width == 50257
    torch.testing.assert_close(loss, full_loss)
    wte, others = grads.pop("transformer.wte.weight"), trimmed.others
    for name, grad in grads.items():
        torch.testing.assert_close(grad, full_grads[name], rtol=1e-4, atol=1e-5)
    full_wte = full_grads["transformer.wte.weight"]
    torch.testing.assert_close(wte[trimmed.vocab], full_wte[trimmed.vocab], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(wte[others[0]], full_wte[others].sum(0), rtol=1e-4, atol=1e-5)
    assert not wte[others[1:]].any()


def test_a_trimmed_heads_shared_row_reaches_every_token_it_stands_for():
    model = tiny_model()
    x, y = _trimmed(model)
    weight, others = model.transformer.wte.weight, model.trimmed.others
    assert len(others) > 50257 - 300 and torch.equal(weight[others], weight[others[:1]].expand(len(others), -1))
    with torch.no_grad():
        weight[others[0]] += 1.0  # as an optimizer step moves it
    model.share_rows()
    assert torch.equal(weight[others], weight[others[:1]].expand(len(others), -1))
    assert not torch.equal(weight[model.trimmed.vocab[0]], weight[others[0]])
    logits, _ = model.eval()(x, y)
    assert logits.size(-1) == 50257  # evaluation scores the whole vocabulary


def test_a_text_with_every_token_trims_nothing_away():
    model = tiny_model(vocab_size=100)
    x, y = _trimmed(model, torch.randperm(100, generator=torch.Generator().manual_seed(4)).repeat(2))
    logits, loss = model(x, y)
    assert logits.size(-1) == 100 and not len(model.trimmed.others)
    torch.testing.assert_close(loss, model.eval()(x, y)[1])


def test_init_weights_follows_gpt2s_scheme():
    """Training from scratch relies on GPT-2's init: zero biases, unit norms, residual projections scaled by depth."""
    model = tiny_model(n_layer=4, n_embd=64)
    params = dict(model.named_parameters())
    assert all(torch.equal(p, torch.zeros_like(p)) for n, p in params.items() if n.endswith("bias"))
    assert all(torch.equal(p, torch.ones_like(p)) for n, p in params.items() if "ln_" in n and n.endswith("weight"))
    proj = torch.cat([p.flatten() for n, p in params.items() if n.endswith("c_proj.weight")])
    fc = torch.cat([p.flatten() for n, p in params.items() if n.endswith("c_fc.weight")])
    assert abs(proj.std().item() - 0.02 / math.sqrt(2 * 4)) < 0.001
    assert abs(fc.std().item() - 0.02) < 0.001


@torch.no_grad()
@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_a_prompt_fed_in_chunks_onto_the_cache_gives_the_full_forwards_logits(chunk):
    """forward(idx, pos=p) appends to the cache: later chunks must see the cache and each other causally."""
    model = tiny_model().eval()
    idx = torch.randint(0, 50257, (1, 12), generator=torch.Generator().manual_seed(2))
    full, _ = model(idx)
    model.setup_caches(batch=1)
    first, _ = model(idx[:, :5])
    pieces = [first] + [model(idx[:, p:p + chunk], pos=p)[0] for p in range(5, 12, chunk)]
    model.clear_caches()
    torch.testing.assert_close(torch.cat(pieces, dim=1), full)


def test_asking_for_a_static_cache_replaces_an_uninitialised_one():
    """Static steps read the whole cache, so a reused one must be the zeroed static kind, not leftover memory."""
    model = tiny_model()
    model.setup_caches(batch=2)
    model.setup_caches(batch=2, static=True)
    caches = [block.attn.cache for block in model.transformer.h]
    assert all(c.static and not c.kv.any() for c in caches)
    model.setup_caches(batch=2, static=True)
    assert all(block.attn.cache is c for block, c in zip(model.transformer.h, caches, strict=True))  # kept as is
