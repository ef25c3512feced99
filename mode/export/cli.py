"""`mode-export run_dir=<run> format=peft|merged|hub out=<folder> [task=...] [force=true] [push=false] ...`.

key=value arguments (no Hydra: the command writes only `out`). See `mode-export --help`.
"""

from __future__ import annotations

import difflib
import sys

from mode.errors import ModeError, exit_on_user_error

KEYS = {
    "run_dir": "a finished mode-train run directory (required)",
    "format": "peft | merged | hub (required)",
    "out": "the folder to write (required; refused if it exists, unless force=true)",
    "task": "MoRE / adapter.router_input=task: the task to export (index or training-task name)",
    "force": "true: replace an existing out folder (only once the new one is complete)",
    "weights": "format=hub only: peft (default) | merged | mode (mode's own format, any method)",
    "base_model": "the base's Hub id to record (PEFT's base_model_name_or_path, the card's base_model); "
                  "default: the run's model.name_or_path",
    "push": "format=hub: true uploads the folder with huggingface_hub",
    "repo_id": "push=true: <user or org>/<name>",
    "private": "push=true: create the repo private (default true)",
}
BOOLEANS = ("force", "push", "private")


def help_text() -> str:
    lines = ["usage: mode-export run_dir=<run> format=peft|merged|hub out=<folder> [key=value ...]", "", "keys:"]
    lines += [f"  {k:<11}{v}" for k, v in KEYS.items()]
    lines += ["", "peft: a PEFT LoRA folder (PeftModel.from_pretrained, vLLM); merged: a transformers model folder;",
              "hub: either (or mode's own format) plus a model card README.md. Token-routed mixtures (molora,",
              "molora_sd, mode) are no LoRA: share them with format=hub weights=mode. docs/sharing.md has more."]
    return "\n".join(lines)


def parse(argv: list[str]) -> dict:
    args: dict = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise ModeError(f"{arg!r}: arguments are key=value (see mode-export --help)")
        if key not in KEYS:
            close = difflib.get_close_matches(key, list(KEYS), n=1)
            raise ModeError(f"{key} is not a mode-export key" + (f" (did you mean {close[0]}?)" if close
                                                                  else f"; the keys are {', '.join(KEYS)}"))
        if key in BOOLEANS:
            if value.lower() not in ("true", "false"):
                raise ModeError(f"{key}={value!r} must be true or false")
            value = value.lower() == "true"
        elif value in ("", "null", "None"):
            value = None
        args[key] = value
    for key in ("run_dir", "format", "out"):
        if args.get(key) is None:
            raise ModeError(f"mode-export needs {key}=... ({KEYS[key]}); see mode-export --help")
    return args


@exit_on_user_error
def run(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("--help", "-h") for a in argv):
        print(help_text())
        return
    from mode.export.formats import export_run

    args = parse(argv)
    out = export_run(args.pop("run_dir"), args.pop("format"), args.pop("out"), args.pop("task", None), **args)
    print(f"exported -> {out}", flush=True)


def main() -> None:
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run()


if __name__ == "__main__":
    main()
