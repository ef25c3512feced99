"""Config checks that run before any work: each failure names the key and the value at fault.

`validate_config` is cheap and needs no model or data; the checks that do (target modules against the
model, task files, the model path) run while loading, still before the run directory gets any file.
(`mode.run.resume` guards `resume=true`.)
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from omegaconf import OmegaConf

from mode.errors import ModeError

# train.precision -> accelerate's mixed_precision
PRECISIONS = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}

def _integer(cfg, key: str, minimum: int, allow_none: bool = False) -> None:
    value = OmegaConf.select(cfg, key)
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ModeError(f"{key}={value!r} must be an integer >= {minimum}" + (" or null" if allow_none else ""))


OPTIMIZERS = ["adamw", "adafactor"]


def _one_of(cfg, key: str, allowed: list[str]) -> None:
    value = OmegaConf.select(cfg, key)
    if value not in allowed:
        raise ModeError(f"{key}={value!r} is not one of {allowed}")


def _scheduler_names() -> list[str]:
    from transformers import SchedulerType

    return [s.value for s in SchedulerType]


def check_context(cfg, max_length: int | None) -> None:
    """Prompt + answer (training) and prompt + generated tokens (evaluation) fit the model's context window:
    past it a model silently computes garbage positions (or crashes deep inside attention)."""
    if max_length is None:
        return
    enc = cfg.data.encoding
    need = {"training": enc.max_source_length + enc.max_target_length,
            "evaluation": enc.max_source_length + cfg.eval.max_new_tokens}
    for what, tokens in need.items():
        if tokens > max_length:
            extra = "data.encoding.max_target_length" if what == "training" else "eval.max_new_tokens"
            raise ModeError(f"data.encoding.max_source_length + {extra} = {tokens} tokens exceed the model's context "
                            f"window (model.max_length={max_length}) in {what}; lower them or use a longer-context model")


def validate_config(cfg) -> None:
    """Cheap checks before any model or data is loaded."""
    from mode.adapters import AdapterConfig
    from mode.data.sampling import STRATEGIES
    from mode.data.tasksets import PROTOCOLS
    from mode.training.distributed import accumulation_steps

    AdapterConfig.from_mapping(cfg.adapter)
    _integer(cfg, "seed", 0)
    _integer(cfg, "train.max_steps", 0)
    for key in ("batch_size", "log_every", "keep_checkpoints"):
        _integer(cfg, f"train.{key}", 1)
    _integer(cfg, "train.micro_batch_size", 1, allow_none=True)
    accumulation_steps(cfg.train, int(os.environ.get("WORLD_SIZE", "1")))  # torchrun / accelerate set it
    _one_of(cfg, "train.optimizer", OPTIMIZERS)
    _one_of(cfg, "train.lr_scheduler", _scheduler_names())
    _one_of(cfg, "data.sampling", list(STRATEGIES))
    _one_of(cfg, "data.protocol", list(PROTOCOLS))
    _integer(cfg, "train.save_every", 0)
    _integer(cfg, "data.max_instances_per_task", 1, allow_none=True)
    _integer(cfg, "eval.max_instances_per_task", 1, allow_none=True)
    _integer(cfg, "eval.curve_points", 0)
    _integer(cfg, "eval.curve_instances_per_task", 1)
    lr = cfg.train.lr
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not math.isfinite(lr) or lr <= 0:
        raise ModeError(f"train.lr={lr!r} must be a positive number")
    if cfg.train.precision not in PRECISIONS:
        raise ModeError(f"train.precision={cfg.train.precision!r} is not one of {list(PRECISIONS)}")
    for key in ("resume", "force", "train.gradient_checkpointing", "train.compile"):
        if not isinstance(OmegaConf.select(cfg, key), bool):
            raise ModeError(f"{key}={OmegaConf.select(cfg, key)!r} must be true or false")
    device = str(cfg.train.device)
    if device not in ("auto", "cpu", "cuda") and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise ModeError(f"train.device={cfg.train.device!r} is not one of ['auto', 'cpu', 'cuda', 'cuda:N']")
    if not Path(str(cfg.data.sni_dir)).is_dir():
        raise ModeError(f"data.sni_dir={str(cfg.data.sni_dir)!r}: no such folder")
    check_context(cfg, cfg.model.get("max_length"))
    tasks = cfg.data.get("tasks")
    if tasks is not None and len(tasks) == 0:
        raise ModeError("data.tasks=[] is empty: list at least one task, or set data.tasks=null to use "
                        "data.task_list_file")


