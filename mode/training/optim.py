"""Optimizers and learning-rate schedules from the `train.*` config."""

from __future__ import annotations

import torch

from mode.errors import ModeError


def make_optimizer(params, train_cfg):
    name = train_cfg.optimizer
    if name == "adamw":
        return torch.optim.AdamW(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay,
                                 betas=tuple(train_cfg.adam_betas))
    if name == "adafactor":  # the MoDE paper's optimizer; fixed lr, no relative step or parameter scaling
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay,
                         scale_parameter=False, relative_step=False, warmup_init=False)
    raise ModeError(f"train.optimizer={name!r} is not one of ['adamw', 'adafactor']")


def make_scheduler(optimizer, train_cfg):
    from transformers import get_scheduler

    warmup = train_cfg.warmup_steps
    if warmup is None:
        warmup = int(round(train_cfg.warmup_ratio * train_cfg.max_steps))
    try:
        return get_scheduler(train_cfg.lr_scheduler, optimizer, num_warmup_steps=warmup,
                             num_training_steps=max(1, train_cfg.max_steps))
    except ValueError as err:
        raise ModeError(f"train.lr_scheduler={train_cfg.lr_scheduler!r}: {err}") from err
