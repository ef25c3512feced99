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


def held_in_eval_count(n: int, fraction: float) -> int:
    """How many of a task's n instances held_in evaluates: round(n·f), at least one, and never all of them."""
    return min(n - 1, max(1, round(n * fraction))) if n > 1 else 0


def held_in_split(task: Task, eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, eval) instances of one task: a seeded shuffle, then the first round(n·f) go to eval.

    Caps are applied afterwards by the caller (first k of each part), so capping training never
    changes which instances are evaluated.
    """
    order = list(range(len(task.instances)))
    random.Random(stable_seed("held_in", seed, task.name)).shuffle(order)
    n_eval = held_in_eval_count(len(order), eval_fraction)
    eval_part = [task.instances[i] for i in order[:n_eval]]
    train_part = [task.instances[i] for i in order[n_eval:]]
    return train_part, eval_part


def held_out_train(task: Task, cap: int | None, seed: int) -> list[dict]:
    """Tk-Instruct training instances: a seeded shuffle, then at most `cap` of them."""
    instances = list(task.instances)
    random.Random(stable_seed("held_out", seed, task.name)).shuffle(instances)
    return instances if cap is None else instances[:cap]


def held_out_eval(task: Task, pool: int | None, cap: int | None, seed: int) -> list[dict]:
    """Tk-Instruct evaluation instances: `Instances[:pool]` (upstream pre-selected and label-balanced the
    first 100); with a smaller `cap`, a seeded sample of the pool (Tk-Instruct shuffles, then caps), kept in
    file order. The sample depends on (seed, task) only."""
    instances = list(task.instances) if pool is None else list(task.instances[:pool])
    if cap is None or cap >= len(instances):
        return instances
    order = list(range(len(instances)))
    random.Random(stable_seed("held_out_eval", seed, task.name)).shuffle(order)
    return [instances[i] for i in sorted(order[:cap])]
