"""mode/training/optim.py: the learning rate of every step under the linear schedule (warmup, then linear
decay to 0), warmup from train.warmup_ratio, and Adafactor as the MoDE paper uses it (a fixed lr, no relative
step, no parameter scaling), each against hand-computed values."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from mode.errors import ModeError
from mode.training.optim import make_optimizer, make_scheduler


def train_cfg(**kw):
    base = {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.0, "adam_betas": [0.9, 0.999],
            "lr_scheduler": "linear", "warmup_steps": None, "warmup_ratio": 0.06, "max_steps": 100}
    return OmegaConf.create({**base, **kw})


def lrs_of_each_step(cfg) -> list[float]:
    """The lr each optimizer step uses, stepping the scheduler after the optimizer as the training loop does."""
    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = make_optimizer([param], cfg)
    scheduler = make_scheduler(optimizer, cfg)
    used = []
    for _ in range(cfg.max_steps):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return used


def test_linear_schedule_values_at_every_step():
    # warmup 4 of 10 steps: lr * s / 4 for s < 4, then lr * (10 - s) / (10 - 4)
    lrs = lrs_of_each_step(train_cfg(max_steps=10, warmup_steps=4))
    expected = [0.0, 0.25e-3, 0.5e-3, 0.75e-3, 1e-3, 5 / 6 * 1e-3, 4 / 6 * 1e-3, 3 / 6 * 1e-3, 2 / 6 * 1e-3, 1 / 6 * 1e-3]
    assert lrs == pytest.approx(expected, abs=1e-12)


def test_warmup_ratio_and_the_default_schedule():
    # train.yaml's defaults: 100 steps, warmup_ratio 0.06 -> 6 warmup steps
    lrs = lrs_of_each_step(train_cfg())
    assert lrs[:7] == pytest.approx([s / 6 * 1e-3 for s in range(7)], abs=1e-12)
    assert lrs[50] == pytest.approx((100 - 50) / 94 * 1e-3) and lrs[99] == pytest.approx(1 / 94 * 1e-3)
    # no warmup: the first step trains at the full rate
    assert lrs_of_each_step(train_cfg(max_steps=4, warmup_ratio=0.0)) == pytest.approx([1e-3, 0.75e-3, 0.5e-3, 0.25e-3])


def test_unknown_optimizer_and_scheduler_are_clear_errors():
    with pytest.raises(ModeError, match="train.optimizer='sgd'"):
        make_optimizer([torch.nn.Parameter(torch.zeros(1))], train_cfg(optimizer="sgd"))
    optimizer = make_optimizer([torch.nn.Parameter(torch.zeros(1))], train_cfg())
    with pytest.raises(ModeError, match="train.lr_scheduler='nope'"):
        make_scheduler(optimizer, train_cfg(lr_scheduler="nope"))


def test_adafactor_takes_fixed_lr_steps_of_the_gradients_sign_on_its_first_step():
    """Step 1 of Adafactor (beta2_1 = 1 - 1^-0.8 = 0): the second-moment estimate is g^2 (+ 1e-30), exactly
    even when factored over rows and columns for a rank-one g = u v^T, so the update is g / |g| = sign(g),
    its RMS is 1 (no clipping at threshold 1), and with a fixed lr the parameter moves by exactly lr."""
    lr = 0.01
    u, v = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([3.0, -1.0, 0.25, 2.0])
    matrix = torch.nn.Parameter(torch.full((3, 4), 0.7))
    vector = torch.nn.Parameter(torch.tensor([0.2, -0.4, 1.5]))
    optimizer = make_optimizer([matrix, vector], train_cfg(optimizer="adafactor", lr=lr))
    assert type(optimizer).__name__ == "Adafactor"
    group = optimizer.param_groups[0]
    assert (group["lr"], group["relative_step"], group["scale_parameter"], group["warmup_init"]) == (lr, False, False, False)
    matrix.grad = torch.outer(u, v)
    vector.grad = torch.tensor([0.3, -5.0, 0.01])
    optimizer.step()
    torch.testing.assert_close(matrix.detach(), 0.7 - lr * torch.sign(torch.outer(u, v)), rtol=0, atol=1e-6)
    torch.testing.assert_close(vector.detach(), torch.tensor([0.2 - lr, -0.4 + lr, 1.5 - lr]), rtol=0, atol=1e-6)


def test_adafactor_follows_the_schedule():
    """The schedule sets Adafactor's lr (relative_step would ignore it): at warmup step 0 the lr is 0, so the
    first step changes nothing; the second moves the parameter by lr / warmup."""
    param = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
    cfg = train_cfg(optimizer="adafactor", lr=0.1, max_steps=10, warmup_steps=2)
    optimizer = make_optimizer([param], cfg)
    scheduler = make_scheduler(optimizer, cfg)
    for expected in ([1.0, 1.0], [0.95, 1.05]):
        param.grad = torch.tensor([1.0, -1.0])
        optimizer.step()
        scheduler.step()
        torch.testing.assert_close(param.detach(), torch.tensor(expected), rtol=0, atol=1e-6)
