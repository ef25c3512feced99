"""Run directories: never overwrite a finished run."""

from __future__ import annotations

from pathlib import Path

from mode.errors import ModeError

FINISHED_MARKER = "metrics.json"


def check_run_dir_is_new(run_dir) -> None:
    if (Path(run_dir) / FINISHED_MARKER).exists():
        raise ModeError(f"{run_dir} already holds a finished run ({FINISHED_MARKER}); choose another hydra.run.dir")
