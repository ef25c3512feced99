"""User-facing errors: one clear line naming the file, key or value at fault, never a traceback wall."""

from __future__ import annotations

import functools
import sys


class ModeError(Exception):
    """A problem with the user's input (config, files, data) rather than a bug in `mode`."""


class TrainingInterrupted(Exception):
    """A run stopped on request (SIGTERM/SIGINT) after saving a checkpoint: not a failure of the inputs.

    Exits with the shell's convention for death by that signal (128 + signal number), so schedulers and
    scripts see the job as interrupted, not finished.
    """

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


def exit_on_user_error(fn):
    """Run a CLI entry point; a ModeError prints `error: <message>` to stderr and exits with status 2,
    a TrainingInterrupted prints `interrupted: <message>` and exits with 128 + the signal number."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ModeError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(2)
        except TrainingInterrupted as err:
            print(f"interrupted: {err}", file=sys.stderr, flush=True)
            sys.exit(err.exit_code)

    return wrapper
