import torch

from gptgen.checkpoint import load_optimizer, save_optimizer
from gptgen.config import TrainConfig
from gptgen.optim import MuonAdamW, make_optimizer
from tests.test_model import tiny_model

CPU = torch.device("cpu")


def step(model, optimizer, seed):
    """One optimizer step on a random batch drawn from seed."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, model.config.vocab_size, (8, 16), generator=g)  # 128 tokens: full-rank gradients
    model(x, x.roll(-1, 1))[1].backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def test_adamw_decays_matrices_only():
    model = tiny_model()
    opt = make_optimizer(model, TrainConfig(weight_decay=0.5), CPU)
    assert isinstance(opt, torch.optim.AdamW)
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.5 and all(p.dim() == 2 for p in decayed["params"])
    assert plain["weight_decay"] == 0.0 and all(p.dim() == 1 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = tiny_model()
    opt = make_optimizer(model, TrainConfig(optimizer="muon", weight_decay=0.5), CPU)
    adamw, muon = opt.optimizers
    names = {id(p): n for n, p in model.named_parameters()}
    to_muon = sorted(names[id(p)] for g in muon.param_groups for p in g["params"])
    assert to_muon == sorted(n for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2)
    to_adamw = [names[id(p)] for g in adamw.param_groups for p in g["params"]]
    assert "transformer.wte.weight" in to_adamw and "transformer.wpe.weight" in to_adamw  # the embeddings, tied head
    assert sorted(to_muon + to_adamw) == sorted(names.values())  # every parameter, once
    assert [g["weight_decay"] for g in opt.param_groups] == [0.5, 0.0, 0.5]


def update_singular_values(optimizer_name: str, lr: float) -> torch.Tensor:
    """The singular values of one step's change to a block's 128 x 32 matrix, but its smallest: the matrix's input
    is layer-normed (zero mean), so its gradient has rank 31."""
    model = tiny_model()
    opt = make_optimizer(model, TrainConfig(optimizer=optimizer_name, lr=lr, weight_decay=0.0), CPU)
    w = model.transformer.h[0].mlp.c_fc.weight
    before = w.detach().clone()
    step(model, opt, seed=0)
    return torch.linalg.svdvals(before - w.detach())[:-1]


def test_a_muon_update_is_orthogonalized():
    """Muon moves a matrix by its gradient's momentum with the singular values flattened towards 1 (five
    Newton-Schulz steps), scaled to AdamW's update size: 0.2 * lr * sqrt(the longer side) (match_rms_adamw)."""
    lr = 1e-2
    s = update_singular_values("muon", lr) / (0.2 * lr * 128 ** 0.5)
    assert s.min() > 0.5 and s.max() < 1.3, s
    assert s.max() / s.min() < 2
    adamw = update_singular_values("adamw", lr)
    assert adamw.max() / adamw.min() > 3, adamw  # AdamW's first update, lr * sign(gradient), is not flat


def test_muon_adamw_state_round_trips_through_the_checkpoint_file(tmp_path):
    """Saved after two steps and loaded into a fresh optimizer, it steps on exactly as the original does."""
    model = tiny_model()
    opt = make_optimizer(model, TrainConfig(optimizer="muon", lr=1e-2, weight_decay=0.1), CPU)
    assert isinstance(opt, MuonAdamW)
    for seed in (1, 2):
        step(model, opt, seed)
    save_optimizer(tmp_path / "o.safetensors", opt)
    twin = tiny_model()
    twin.load_state_dict(model.state_dict())
    opt2 = make_optimizer(twin, TrainConfig(optimizer="muon", lr=5.0, weight_decay=0.0), CPU)
    load_optimizer(tmp_path / "o.safetensors", opt2)
    assert [g["lr"] for g in opt2.param_groups] == [1e-2] * 3
    for seed in (3, 4):
        step(model, opt, seed)
        step(twin, opt2, seed)
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
