"""Instance splits: MoDE's held-in protocol (per-task 90/10) and Tk-Instruct's held-out protocol.

Every shuffle is seeded from (split seed, task name) through SHA-256, so a split is identical across
runs, processes and machines, and independent of which other tasks are selected or of the training seed.
"""

from __future__ import annotations

import hashlib
import random

from mode.data.sni import Task


def stable_seed(*parts) -> int:
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def held_in_split(task: Task, eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, eval) instances of one task: a seeded shuffle, then the first round(n·f) go to eval.

    Caps are applied afterwards by the caller (first k of each part), so capping training never
    changes which instances are evaluated.
    """
    order = list(range(len(task.instances)))
    random.Random(stable_seed("held_in", seed, task.name)).shuffle(order)
    n = len(order)
    n_eval = min(n - 1, max(1, round(n * eval_fraction))) if n > 1 else 0
    eval_part = [task.instances[i] for i in order[:n_eval]]
    train_part = [task.instances[i] for i in order[n_eval:]]
    return train_part, eval_part


def held_out_train(task: Task, cap: int | None, seed: int) -> list[dict]:
    """Tk-Instruct training instances: a seeded shuffle, then at most `cap` of them."""
    instances = list(task.instances)
    random.Random(stable_seed("held_out", seed, task.name)).shuffle(instances)
    return instances if cap is None else instances[:cap]


def held_out_eval(task: Task, cap: int | None) -> list[dict]:
    """Tk-Instruct evaluation instances: `Instances[:cap]` in file order (upstream pre-selected them)."""
    return list(task.instances) if cap is None else list(task.instances[:cap])
