"""Run directories: a finished run is never overwritten; an unfinished one is resumed or refused.

Two files mark a run's life: `config.yaml` is written once every check has passed (a run started here),
`metrics.json` is written last, atomically (the run finished). Nothing else is needed to decide what a
new command may do with the folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from mode.errors import ModeError

STARTED_MARKER = "config.yaml"
FINISHED_MARKER = "metrics.json"

NEW, UNFINISHED, FINISHED = "new", "unfinished", "finished"

# What a run writes (Hydra's own .hydra/ record excepted); `force=true` removes these first, the
# finished marker before anything else so that an interrupted removal never looks like a finished run.
RUN_OUTPUTS = (FINISHED_MARKER, "predictions.jsonl", "routing.json", "curves.json", "timings.json", "adapter",
               "checkpoints", "evals", "wandb", "wandb_run_id", "data_stats.json", "provenance.json", STARTED_MARKER)
# A run's light record: everything needed to aggregate, compare and trace it; never weights or checkpoints.
RECORD_FILES = ("config.yaml", "metrics.json", "predictions.jsonl", "routing.json", "curves.json",
                "data_stats.json", "timings.json", "provenance.json")


def run_state(run_dir) -> str:
    run_dir = Path(run_dir)
    if (run_dir / FINISHED_MARKER).exists():
        return FINISHED
    if (run_dir / STARTED_MARKER).exists():
        return UNFINISHED
    return NEW


def plan_run(run_dir, resume: bool, force: bool) -> str:
    """What a training command does with `run_dir`: NEW (start from scratch), UNFINISHED (continue it)
    or FINISHED (report its metrics, train nothing). Reads only; refuses what would lose a result."""
    if resume and force:
        raise ModeError("resume=true and force=true contradict each other: resume continues the run in "
                        "hydra.run.dir, force replaces it")
    state = run_state(run_dir)
    if force or state == NEW:
        return NEW
    if resume:
        return state
    if state == FINISHED:
        raise ModeError(f"{run_dir} already holds a finished run ({FINISHED_MARKER}); choose another "
                        "hydra.run.dir, or pass force=true to replace it")
    raise ModeError(f"{run_dir} holds an unfinished run ({STARTED_MARKER}, no {FINISHED_MARKER}); pass "
                    "resume=true to continue it from its last checkpoint, or force=true to start over")


def clear_run(run_dir) -> None:
    """Remove an earlier run's outputs (only for `force=true`, after every check of the new run passed)."""
    run_dir = Path(run_dir)
    for name in RUN_OUTPUTS:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def finished_metrics(run_dir) -> dict:
    path = Path(run_dir) / FINISHED_MARKER
    try:
        return json.loads(path.read_text())
    except (ValueError, OSError) as err:
        raise ModeError(f"{path}: unreadable ({err}); move the run aside or pass force=true to redo it") from err
