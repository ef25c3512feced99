"""User-facing errors: one clear line naming the file, key or value at fault, never a traceback wall."""

from __future__ import annotations

import functools
import sys


class ModeError(Exception):
    """A problem with the user's input (config, files, data) rather than a bug in `mode`."""


def exit_on_user_error(fn):
    """Run a CLI entry point; a ModeError prints `error: <message>` to stderr and exits with status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ModeError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapper
