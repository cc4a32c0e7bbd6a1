import math

import numpy as np
import torch
import torch.nn.functional as F

from gptgen.evaluate import EvalResult, evaluate, token_losses, unseen_tokens
from tests.test_model import tiny_model


def test_sum_equals_scoring_each_token_by_hand():
    model = tiny_model().eval()
    tokens = np.random.default_rng(0).integers(0, 50257, size=45).astype(np.uint16)
    result = evaluate(model, tokens, chars=200, block_size=16, batch_size=2)
    seq = torch.tensor([50256, *tokens.tolist()])
    each = []
    with torch.no_grad():
        for start in range(0, 45, 16):
            x = seq[start:min(start + 16, 45)]
            logits, _ = model(x[None])
            each.append(F.cross_entropy(logits[0], seq[start + 1:start + 1 + len(x)], reduction="none"))
    each = torch.cat(each)
    expected = each.sum().item()
    # token by token, in the split's order (batches of 2 windows and a short last one)
    torch.testing.assert_close(token_losses(model, tokens, block_size=16, batch_size=2), each)
    assert math.isclose(result.nats, expected, rel_tol=1e-5)
    assert result.tokens == 45 and result.chars == 200
    assert math.isclose(result.nats_per_char, expected / 200, rel_tol=1e-5)
    assert math.isclose(result.perplexity, math.exp(expected / 45), rel_tol=1e-5)


def test_eval_leaves_training_mode_as_it_was():
    """Scores without dropout (a model in training mode scores as in eval mode, the same each time) and hands
    the model back in the mode it came in."""
    model = tiny_model(dropout=0.5).train()
    tokens = np.arange(40, dtype=np.uint16)
    first = evaluate(model, tokens, chars=40, block_size=16).nats
    assert model.training
    assert evaluate(model, tokens, chars=40, block_size=16).nats == first
    assert evaluate(model.eval(), tokens, chars=40, block_size=16).nats == first
    assert not model.training


def test_the_metrics_row_names_each_figure_as_it_is():
    """as_dict feeds metrics.jsonl, the model card and the page: a figure under another's name goes unseen."""
    r = evaluate(tiny_model().eval(), np.arange(40, dtype=np.uint16), chars=100, block_size=16)
    assert r.as_dict() == {"val_nats_per_token": r.nats / r.tokens, "val_perplexity": math.exp(r.nats / r.tokens),
                           "val_nats_per_char": r.nats / 100, "val_tokens": r.tokens, "val_chars": 100}


def test_unseen_tokens_sums_the_loss_on_kinds_that_the_train_split_lacks():
    losses = torch.tensor([1.0, 2.0, 12.0, 3.0, 14.0])
    val = np.array([5, 6, 7, 5, 9], dtype=np.uint16)  # 7 and 9 are not in the train split
    train = np.array([5, 6, 6, 8], dtype=np.uint16)
    r = unseen_tokens(losses, val, train, chars=10, vocab_size=20)
    assert r["unseen_val_tokens"] == 2 and r["unseen_mean_nats"] == 13.0
    assert math.isclose(r["unseen_nats_per_char"], 26 / 10)
    assert math.isclose(r["unseen_floor_nats_per_char"], 2 * math.log(20 - 3) / 10)  # kinds 5, 6 and 8 seen
    none = unseen_tokens(losses, val, np.arange(20, dtype=np.uint16), chars=10, vocab_size=20)
    assert none["unseen_val_tokens"] == 0 and none["unseen_nats_per_char"] == 0.0


def test_the_held_out_part_is_read_from_the_training_record_only_when_it_is_a_fraction():
    from gptgen.evaluate import held_out

    assert [held_out(info) for info in ({"val_fraction": 0.2}, {"val_fraction": 0}, {})] == [0.2, 0, None]
    assert [held_out({"val_fraction": v}) for v in ("0.2", 1.5, -0.1, None, True)] == [None] * 5


def test_a_loss_past_a_floats_exp_gives_an_infinite_perplexity_not_an_overflow_error():
    """A diverged model's finite loss of 800 nats/token raised OverflowError in `gptgen eval` and in training's save.
    Its JSON then said Infinity, which strict parsers (jq, JavaScript) refuse: it is null there."""
    import json

    assert EvalResult(nats=8000.0, tokens=10, chars=30).perplexity == math.inf
    assert json.loads(json.dumps(EvalResult(nats=8000.0, tokens=10, chars=30).as_dict(), allow_nan=False)
                      )["val_perplexity"] is None
    assert EvalResult(nats=7000.0, tokens=10, chars=30).perplexity == math.exp(700.0)
