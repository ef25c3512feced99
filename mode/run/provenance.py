"""What produced a run: code commit, machine, software and precision, recorded beside its results.

A number is only worth what can be traced back to the code and machine that made it. Every attempt of a
run (a resumed run may continue on another machine) appends one entry to `<run>/provenance.json`.
"""

from __future__ import annotations

import json
import platform
import subprocess
import time
from pathlib import Path

from mode.run.config import REPO_DIR
from mode.run.fileio import atomic_write_text

PROVENANCE_FILE = "provenance.json"
CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")  # what decides bf16 speed on a CPU


def git_commit(repo: Path = REPO_DIR, ignore: tuple[str, ...] = ()) -> dict:
    """{commit, dirty} of the checkout the code runs from (tracked files only), and when dirty `changed`, the
    changed paths (at most 20), so a reader can tell an edited README from edited code; {} outside git.
    `ignore`: folders whose changes do not make the code dirty (a benchmark's own reports, rewritten as it runs)."""
    def git(*args):
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=20)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return {}
        excluded = [f":(exclude){path}" for path in ignore]
        status = git("status", "--porcelain", "--untracked-files=no", "--", ".", *excluded).stdout
        changed = sorted(line[3:] for line in status.splitlines() if line.strip())
        return {"commit": head.stdout.strip(), "dirty": bool(changed), **({"changed": changed[:20]} if changed else {})}
    except (OSError, subprocess.SubprocessError):
        return {}


def cpu_info() -> dict:
    """CPU model name and the instruction-set features that decide mixed-precision speed (Linux)."""
    info = {"cpu": platform.processor() or platform.machine()}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            info["cpu"] = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
            info["cpu_features"] = [f for f in CPU_FEATURES if f in flags]
            break
    return info


def environment() -> dict:
    import torch
    import transformers

    return {**git_commit(), **cpu_info(), "cpu_count": _cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def _cpu_count() -> int | None:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count()


def record_attempt(run_dir, **details) -> dict:
    """Append this attempt (environment + `details`, e.g. precision, device, processes, first step)."""
    path = Path(run_dir) / PROVENANCE_FILE
    attempts = json.loads(path.read_text())["attempts"] if path.is_file() else []
    entry = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **environment(), **details}
    attempts.append(entry)
    atomic_write_text(path, json.dumps({"attempts": attempts}, indent=2) + "\n")
    return entry
