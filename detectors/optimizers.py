"""Optimizer choices the configs cannot express as one ``_target_``."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch


def sgd_or_adamw(params: Iterable, adamw: bool, lr: float, weight_decay: float, momentum: float = 0.9,
                 nesterov: bool = False, betas: Sequence[float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    """AdamW (``lr``, ``weight_decay``, ``betas``) when ``adamw``, else SGD (``lr``, ``momentum``,
    ``nesterov``, ``weight_decay``): ``configs/optimizer/auto.yaml`` picks by device, SGD on a GPU and
    AdamW on a CPU, whose short from-scratch runs learn faster with it (BENCHMARKS.md, "Training runs").

    params: parameters or param groups, as torch.optim takes them (a group's own keys win).
    """
    if adamw:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas))
    return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
