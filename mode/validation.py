"""Config checks that run before any work: each failure names the key and the value at fault.

`validate_config` is cheap and needs no model or data; the checks that do (target modules against the
model, task files, the model path) run while loading, still before the run directory gets any file.
`check_resumable` guards `resume=true`: continuing a run with other settings would give a run that
matches neither its config.yaml nor the new command.
"""

from __future__ import annotations

import math
from pathlib import Path

from omegaconf import OmegaConf

from mode.errors import ModeError

# train.precision -> accelerate's mixed_precision
PRECISIONS = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}

# Keys that may differ when resuming: where things are, how often to checkpoint or log, not what is trained.
# (data.sni_dir may move; the checkpoint's fingerprint of the encoded training data guards its content.)
RESUMABLE_CHANGES = ("resume", "force", "logger", "paths", "data.sni_dir", "train.save_every",
                     "train.keep_checkpoints", "train.log_every")
# Keys added after runs may have started: a run's config.yaml without one ran with this value.
ADDED_KEYS = {"train.compile": False, "eval.curve_points": 0, "eval.curve_instances_per_task": 5}


def _integer(cfg, key: str, minimum: int, allow_none: bool = False) -> None:
    value = OmegaConf.select(cfg, key)
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ModeError(f"{key}={value!r} must be an integer >= {minimum}" + (" or null" if allow_none else ""))


def validate_config(cfg) -> None:
    """Cheap checks before any model or data is loaded."""
    from mode.adapters import AdapterConfig

    AdapterConfig.from_mapping(cfg.adapter)
    _integer(cfg, "seed", 0)
    _integer(cfg, "train.max_steps", 0)
    for key in ("batch_size", "micro_batch_size", "log_every", "keep_checkpoints"):
        _integer(cfg, f"train.{key}", 1)
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
    if cfg.train.device not in ("auto", "cpu"):
        raise ModeError(f"train.device={cfg.train.device!r} is not one of ['auto', 'cpu']")
    if not Path(str(cfg.data.sni_dir)).is_dir():
        raise ModeError(f"data.sni_dir={str(cfg.data.sni_dir)!r}: no such folder")
    tasks = cfg.data.get("tasks")
    if tasks is not None and len(tasks) == 0:
        raise ModeError("data.tasks=[] is empty: list at least one task, or set data.tasks=null to use "
                        "data.task_list_file")


def _flatten(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: node}


def config_differences(resolved: dict, saved: dict) -> list[tuple[str, object, object]]:
    """(key, now, then) for every key that changes what is trained or evaluated, sorted by key."""
    old, new = {**ADDED_KEYS, **_flatten(saved)}, {**ADDED_KEYS, **_flatten(resolved)}
    out = []
    for key in sorted(set(old) | set(new)):
        if any(key == k or key.startswith(k + ".") for k in RESUMABLE_CHANGES):
            continue
        if old.get(key, _MISSING) != new.get(key, _MISSING):
            out.append((key, new.get(key, "<absent>"), old.get(key, "<absent>")))
    return out


_MISSING = object()


def check_resumable(resolved: dict, run_dir, finished: bool = False) -> None:
    """Refuse `resume=true` when this command's config differs from the run's config.yaml in a key
    that changes what is trained or evaluated: continuing it would give a run that matches neither, and
    reporting a finished one would pass off its old result as this command's. The message names the first
    such key with both values, and every other differing key."""
    path = Path(run_dir) / "config.yaml"
    try:
        saved = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as err:
        raise ModeError(f"{path}: unreadable ({err}); cannot check that resuming keeps the run's settings") from err
    differ = config_differences(resolved, saved)
    if not differ:
        return
    key, now, then = differ[0]
    others = f" (also {', '.join(k for k, _, _ in differ[1:])})" if len(differ) > 1 else ""
    advice = ("that run is finished with other settings: choose another hydra.run.dir (or paths.runs_dir for "
              "a sweep), or force=true to replace it" if finished else
              "resume with the run's own settings, or start a new run")
    raise ModeError(f"resume=true but {key}={now!r} differs from the run's {path} ({then!r}){others}; {advice}")
