"""Optimiser groups and the warm-up schedule of the originals."""
from __future__ import annotations

import torch
from torch import nn

from decision_transformer.errors import UserError


def trainable(params):
    """The parameters of ``params`` that require gradients, as a list."""
    return [p for p in params if p.requires_grad]


def make_optimizer(model: nn.Module, *, lr: float, weight_decay: float, pretrained_lm: bool = False,
                   custom_transformer_decay: bool = False, lm_lr: float | None = None,
                   fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW with the originals' effective groups.

    * no LM: one group, eps 1e-8;
    * LM, no flag: one group, eps 1e-6 (the originals' LM group matched nothing, so this is what ran);
    * ``custom_transformer_decay``: the backbone (``model.transformer``) with wd 0 and lr ``lm_lr or lr``, every other
      trainable parameter with ``weight_decay``; eps 1e-6. A tensor shared by both (``--extend_positions``) is listed
      once, in the transformer group.
    """
    kw = {} if fused is None else {"fused": fused}
    if custom_transformer_decay:
        t_params = trainable(model.transformer.parameters())
        t_ids = {id(p) for p in t_params}
        rest = [p for p in trainable(model.parameters()) if id(p) not in t_ids]
        groups = [{"params": t_params, "lr": lm_lr if lm_lr is not None else lr, "weight_decay": 0.0},
                  {"params": rest, "lr": lr, "weight_decay": weight_decay}]
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, eps=1e-6, **kw)
    eps = 1e-6 if pretrained_lm else 1e-8
    return torch.optim.AdamW(trainable(model.parameters()), lr=lr, weight_decay=weight_decay, eps=eps, **kw)


def optimizer_from_args(model: nn.Module, args, device: torch.device):
    """(AdamW, warm-up schedule, batch generator seeded with ``--seed``) from the scripts' flags; fused AdamW on
    CUDA."""
    if not trainable(model.parameters()):
        frozen = " ".join(f"--{f}" for f in ("frozen", "freeze_subset") if getattr(args, f, None))
        raise UserError(f"{frozen or 'freezing'} leaves no trainable parameter: nothing is left to train")
    # a block-replacement run (--pretrained_block) is a random-init DT with one LM block: the original turned its
    # --pretrained_lm off before building the optimiser, so it gets the no-LM one
    lm_optimizer = bool(args.pretrained_lm) and getattr(args, "pretrained_block", None) is None
    optimizer = make_optimizer(model, lr=args.learning_rate, weight_decay=args.weight_decay,
                               pretrained_lm=lm_optimizer,
                               custom_transformer_decay=args.custom_transformer_decay, lm_lr=args.lm_learning_rate,
                               fused=True if device.type == "cuda" else None)
    generator = torch.Generator(device=device)
    generator.manual_seed(args.seed)
    return optimizer, warmup_schedule(optimizer, args.warmup_steps), generator


def warmup_schedule(optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from lr/warmup to lr over ``warmup_steps`` scheduler steps, then constant."""
    warmup_steps = max(int(warmup_steps), 1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda n: min((n + 1) / warmup_steps, 1.0))


def freeze(model: nn.Module, substrings) -> list[str]:
    """``requires_grad = False`` on every parameter whose name contains one of ``substrings``; returns the names."""
    names = []
    for name, p in model.named_parameters():
        if any(s in name for s in substrings):
            p.requires_grad_(False)
            names.append(name)
    return names


def freeze_from_args(model: nn.Module, args) -> list[str]:
    """``--frozen`` (every ``transformer.h`` parameter) and ``--freeze_subset S ...``; returns the frozen names."""
    names = []
    if getattr(args, "frozen", False):
        names += freeze(model, ["transformer.h."])
    if getattr(args, "freeze_subset", None):
        own = [n for n, _ in model.named_parameters()]
        unmatched = [s for s in args.freeze_subset if not any(s in n for n in own)]
        if unmatched:  # a misspelt name would otherwise train everything without a word
            raise UserError(f"--freeze_subset {unmatched[0]!r} matches no parameter of the model (its names are "
                            f"like {own[0]}, {own[-1]}; see model.named_parameters())")
        names += freeze(model, args.freeze_subset)
    return names
