"""The optimisation loop: `fit(session, stop, curve_point)` takes the run from its current step to the last.

One step = one global batch (a pure function of seed and step, so the step number is the whole data
position), cut into length-grouped micro-batches dealt over processes; the loss is normalised by the
global batch's answer tokens, so one process and N processes take the same step. A stop signal
checkpoints after the current step; a non-finite loss stops with the last good checkpoint kept.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from mode.errors import ModeError, TrainingInterrupted
from mode.training.curves import curve_steps
from mode.training.distributed import micro_batches
from mode.training.preemption import StopRequest
from mode.training.session import Session


def fit(s: Session, stop: StopRequest, curve_point: Callable[[], dict] | None = None) -> None:
    """Train from `s.progress.step` to train.max_steps; `curve_point()` scores the learning-curve subset."""
    cfg, acc, progress = s.cfg, s.accelerator, s.progress
    max_steps = cfg.train.max_steps
    answer_tokens = [n - p for n, p in zip(s.data.train.column("length"), s.data.train.column("prompt_length"))]
    curve_at = set(curve_steps(max_steps, cfg.eval.curve_points)) if curve_point else set()
    s.loss_module.train()
    bar = tqdm(total=max_steps, initial=progress.step, desc="training", unit="step", disable=not s.is_main)
    window = Window()
    train_start = time.perf_counter() - progress.train_time_s  # earlier attempts of a resumed run count
    stop.listen()  # SIGTERM/SIGINT: checkpoint after the current step, then stop
    for step in range(progress.step, max_steps):
        loss = train_step(s, step, answer_tokens)
        window.add(loss)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{s.scheduler.get_last_lr()[0]:.2e}")
        if (step + 1) % cfg.train.log_every == 0 or step + 1 == max_steps:
            log_window(s, step + 1, window)
        if step + 1 in curve_at:
            point = curve_point()
            progress.curves["eval"].append({"step": step + 1, **point})
            s.logger.log({f"curve/{k}": v for k, v in point.items()}, step=step + 1)
            window.start = time.perf_counter()  # the window's step time counts training only
        progress.step, progress.last_loss = step + 1, loss
        progress.train_time_s = time.perf_counter() - train_start
        signum = stop.requested(acc)
        if s.checkpointer.due(step + 1, max_steps) or signum:
            s.checkpointer.save(step + 1)
        if signum:
            bar.close()
            s.logger.finish()
            raise TrainingInterrupted(f"stopped after step {step + 1} of {max_steps}; checkpoint {s.checkpointer.last}; "
                                      f"continue with resume=true hydra.run.dir={s.run_dir}", signum)
    stop.restore()
    bar.close()


def train_step(s: Session, step: int, answer_tokens: list[int]) -> float:
    """One optimizer step on global batch `step`; returns its loss per answer token (all processes)."""
    acc, cfg = s.accelerator, s.cfg
    indices = s.sampler.indices(step)
    n_tokens = sum(answer_tokens[i] for i in indices)  # global batch: known to every rank, no all-reduce
    step_loss = torch.zeros((), device=acc.device)
    groups = micro_batches(s.data.train, indices, acc.process_index, acc.num_processes, s.accum, s.micro)
    for k, group in enumerate(groups):
        batch = s.collate([s.data.train[i] for i in group], s.tokenizer.pad_token_id)
        batch = {key: value.to(acc.device) for key, value in batch.items()}
        sync = k == len(groups) - 1
        with acc.no_sync(s.loss_module) if not sync else contextlib.nullcontext():
            loss_sum = s.loss_module(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["task_ids"])
            # DDP averages gradients over processes, hence the world-size factor.
            acc.backward(loss_sum * acc.num_processes / n_tokens)
        step_loss += loss_sum.detach()
    if cfg.train.max_grad_norm:
        acc.clip_grad_norm_(s.trainable, cfg.train.max_grad_norm)
    s.optimizer.step()
    s.scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)
    loss = acc.reduce(step_loss, reduction="sum").item() / n_tokens
    if not math.isfinite(loss):
        raise ModeError(f"training loss became {loss} at step {step + 1}; {s.checkpointer.describe_last()}; "
                        "lower train.lr or check the data, and start a new run")
    return loss


class Window:
    """Losses and wall time since the last log line."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.loss, self.steps, self.start = 0.0, 0, time.perf_counter()

    def add(self, loss: float) -> None:
        self.loss += loss
        self.steps += 1


def log_window(s: Session, step: int, window: Window) -> None:
    """Loss, lr, step time and routing statistics of the window to the logger and to curves.json."""
    elapsed = time.perf_counter() - window.start
    scalars = {"train/loss": window.loss / window.steps, "train/lr": s.scheduler.get_last_lr()[0],
               "train/step_time_s": elapsed / window.steps, **s.diagnostics.scalars(s.reduce)}
    s.logger.log(scalars, step=step)
    s.progress.curves["train"].append({"step": step, **{k: v for k, v in scalars.items() if k.count("/") == 1}})
    window.reset()
