"""Learning curves: when to evaluate during training, and on which fixed subset of the evaluation data."""

from __future__ import annotations


def curve_steps(max_steps: int, points: int) -> list[int]:
    """`points` evaluation steps evenly inside the run (the final evaluation closes the curve)."""
    return sorted({round(max_steps * (k + 1) / (points + 1)) for k in range(points)} - {0, max_steps})


def curve_subset(examples, per_task: int) -> list[dict]:
    """The first `per_task` evaluation instances of each task: a fixed subset, the same at every point."""
    taken: dict[str, int] = {}
    rows = []
    for e in examples:
        if taken.get(e["task"], 0) < per_task:
            taken[e["task"]] = taken.get(e["task"], 0) + 1
            rows.append(e)
    return rows


CURVE_KEYS = ("rougeL", "exact_match", "num_instances")


CURVE_KEYS = ("rougeL", "exact_match", "num_instances")
