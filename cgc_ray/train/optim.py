"""SGD and its learning-rate schedule, built from ``spec.optim`` with torch's own schedulers.

The schedule steps once per optimiser step (``scheduler_interval="step"`` in
``engine.fit``), so a warm-up and a cosine or one-cycle decay are smooth at any
number of epochs, as in torchvision's classification references:
``LinearLR`` warm-up, then ``MultiStepLR`` (milestones in epochs, as the paper's
"x0.1 every 30 epochs"), ``CosineAnnealingLR`` or ``OneCycleLR``, chained with
``SequentialLR``. Every scheduler here is a torch scheduler, so its
``state_dict`` resumes exactly.
"""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import (
    CosineAnnealingLR,
    LinearLR,
    LRScheduler,
    MultiStepLR,
    OneCycleLR,
    SequentialLR,
)

from cgc_ray.config import ExperimentSpec

HEAD_PREFIX = "fc."


def build_optimizer(spec: ExperimentSpec, model: torch.nn.Module) -> torch.optim.SGD:
    """SGD over two parameter groups: the trunk at ``optim.lr``, the head ``fc`` at ``optim.head_lr`` (or lr)."""
    o = spec.optim
    head = [p for n, p in model.named_parameters() if n.startswith(HEAD_PREFIX)]
    trunk = [p for n, p in model.named_parameters() if not n.startswith(HEAD_PREFIX)]
    groups = [{"params": trunk, "lr": o.lr}, {"params": head, "lr": o.head_lr or o.lr}]
    return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=o.nesterov)


def build_scheduler(spec: ExperimentSpec, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> LRScheduler:
    """The per-step schedule of ``spec.optim``: optional linear warm-up, then step / cosine / one-cycle.

    step: lr x gamma at each milestone epoch (counted from the start of
    training, warm-up included). cosine: from the base lr to ``min_lr`` over
    the steps after warm-up. onecycle: torch's ``OneCycleLR`` with a cosine
    anneal from base lr/25 up to the base lr and down to base lr/25e4, the
    momentum held at ``optim.momentum`` (one-cycle has its own warm-up, so the
    spec refuses ``warmup_epochs`` with it).
    """
    o, s = spec.optim, spec.optim.schedule
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch={steps_per_epoch}: the training loader yields no batch")
    warm = o.warmup_epochs * steps_per_epoch
    total = o.epochs * steps_per_epoch
    if s.name == "onecycle":
        return OneCycleLR(optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=total,
                          pct_start=s.pct_start, anneal_strategy="cos", cycle_momentum=False,
                          div_factor=25.0, final_div_factor=1e4)
    if s.name == "step":
        main: LRScheduler = MultiStepLR(optimizer, milestones=[m * steps_per_epoch - warm for m in s.milestones],
                                        gamma=s.gamma)
    else:
        main = CosineAnnealingLR(optimizer, T_max=max(1, total - warm), eta_min=s.min_lr)
    if warm == 0:
        return main
    warmup = LinearLR(optimizer, start_factor=1.0 / warm, end_factor=1.0, total_iters=warm)
    return SequentialLR(optimizer, [warmup, main], milestones=[warm])
