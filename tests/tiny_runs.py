"""A tiny training run (random 2-layer Llama, 6 steps, dropout on) shared by the reliability tests.

Dropout makes the run depend on the RNG stream, so a resume that failed to restore RNG states would
end with different adapter bits; checkpoints every 2 steps, 2 kept.
"""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO

from mode.run.config import compose

TINY = [
    "model=tiny_random", "data.tasks=[task001_add_numbers,task002_echo_word]", "data.max_instances_per_task=12",
    "train.max_steps=6", "train.batch_size=4", "train.micro_batch_size=2", "train.log_every=2",
    "train.save_every=2", "train.keep_checkpoints=2", "adapter.rank=4", "adapter.dropout=0.1",
    "eval.max_instances_per_task=3", "eval.max_new_tokens=4", "eval.batch_size=8",
]


def tiny_overrides(sni_dir, *extra: str) -> list[str]:
    return [f"data.sni_dir={sni_dir}", *TINY, *extra]


def tiny_cfg(sni_dir, *extra: str):
    return compose("train", tiny_overrides(sni_dir, *extra))


def adapter_bytes(run_dir) -> bytes:
    return (run_dir / "adapter" / "adapter_model.safetensors").read_bytes()


def run_with_fault(fault: str, step: int, args: list[str], when: str | None = None) -> subprocess.CompletedProcess:
    """`mode-train args` in a subprocess with tests/faults.py's fault injected."""
    cmd = [sys.executable, str(REPO / "tests" / "faults.py"), fault, str(step)]
    cmd += ["--when", when] if when else []
    return subprocess.run([*cmd, "--", *args], cwd=REPO, capture_output=True, text=True)


def mode_train(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mode.train", *args], cwd=REPO, capture_output=True, text=True)
