"""The optimizers `gptgen train` offers: AdamW, or Muon for the blocks' matrices with AdamW for the rest."""

from __future__ import annotations

import torch

from gptgen.config import TrainConfig
from gptgen.model import GPT


def make_optimizer(model: GPT, cfg: TrainConfig, device: torch.device) -> Optimizer:
    """Weight decay on matrices only (not biases, norms); fused AdamW kernels where the device has them.

    With --optimizer muon, the blocks' weight matrices go to PyTorch's Muon, scaled to AdamW's update size
    (Moonshot's "match_rms_adamw"), so that --lr and --weight-decay mean the same for both; the embeddings
    (the tied head among them), biases and norms stay with AdamW, as Muon's authors use it."""
    muon = cfg.optimizer == "muon"  # cfg.validate() has checked that this torch has Muon
    hidden, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (hidden if muon and p.dim() == 2 and name.startswith("transformer.h.") else rest).append(p)
    groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
    fused = device.type in ("cuda", "cpu", "mps")
    adamw = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)
    if not muon:
        return adamw
    return MuonAdamW(adamw, torch.optim.Muon(hidden, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                             adjust_lr_fn="match_rms_adamw"))


class MuonAdamW:
    """Two optimizers that the training loop, gradient clipping and the checkpoint see as one: their groups in
    one list, their state in one state_dict with the parameters numbered through both (AdamW's first)."""

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]  # live: load_state_dict replaces them

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        state, groups, offset = {}, [], 0
        for opt in self.optimizers:
            sd = opt.state_dict()
            state.update({i + offset: s for i, s in sd["state"].items()})
            groups += [{**g, "params": [i + offset for i in g["params"]]} for g in sd["param_groups"]]
            offset += sum(len(g["params"]) for g in sd["param_groups"])
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, sd: dict) -> None:
        groups, offset = iter(sd["param_groups"]), 0
        for opt in self.optimizers:
            mine = [next(groups) for _ in opt.param_groups]
            ids = [i for g in mine for i in g["params"]]
            opt.load_state_dict({"state": {i - offset: sd["state"][i] for i in ids if i in sd["state"]},
                                 "param_groups": [{**g, "params": [i - offset for i in g["params"]]} for g in mine]})
            offset += len(ids)


Optimizer = torch.optim.AdamW | MuonAdamW  # what make_optimizer returns
