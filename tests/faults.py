"""Run `mode-train` with a fault injected, for the tests that need a real process death.

    python tests/faults.py FAULT STEP [--when KEY=VALUE] -- <mode-train arguments>

FAULT:
  kill-at-step       SIGKILL when step STEP (0-based) is about to start
  term-at-step       SIGTERM to itself when step STEP is about to start (a cluster preemption)
  kill-in-write      SIGKILL half-way through writing optimizer.bin of the checkpoint of step STEP
--when KEY=VALUE injects only into the job whose config has that value (e.g. one job of a sweep);
--when rank=N only into process N of a multi-process run (torchrun sets RANK).
"""

from __future__ import annotations

import io
import os
import signal
import sys


def main() -> None:
    fault, step = sys.argv[1], int(sys.argv[2])
    rest = sys.argv[3:]
    when = None
    if rest[0] == "--when":
        when, rest = rest[1].split("=", 1), rest[2:]
    assert rest[0] == "--", "usage: faults.py FAULT STEP [--when KEY=VALUE] -- <mode-train arguments>"

    import torch
    from omegaconf import OmegaConf

    import mode.data.sampling
    import mode.train
    import mode.training.checkpoint

    armed = {"on": when is None, "saving": None}

    original_setup = mode.train.setup

    def setup(cfg, run_dir):
        value = os.environ.get("RANK", "0") if when and when[0] == "rank" else when and OmegaConf.select(cfg, when[0])
        armed["on"] = when is None or str(value) == when[1]
        return original_setup(cfg, run_dir)

    mode.train.setup = setup

    original_indices = mode.data.sampling.MixtureSampler.indices

    def indices(self, k):
        if armed["on"] and k == step and fault in ("kill-at-step", "term-at-step"):
            os.kill(os.getpid(), signal.SIGKILL if fault == "kill-at-step" else signal.SIGTERM)
        return original_indices(self, k)

    mode.data.sampling.MixtureSampler.indices = indices

    original_save = mode.training.checkpoint.Checkpointer.save

    def save(self, k):
        armed["saving"] = k
        return original_save(self, k)

    mode.training.checkpoint.Checkpointer.save = save

    original_torch_save = torch.save

    def torch_save(obj, f, *args, **kwargs):
        if armed["on"] and fault == "kill-in-write" and armed["saving"] == step and str(f).endswith("optimizer.bin"):
            buffer = io.BytesIO()
            original_torch_save(obj, buffer, *args, **kwargs)
            with open(f, "wb") as handle:
                handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                handle.flush()
                os.fsync(handle.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        return original_torch_save(obj, f, *args, **kwargs)

    torch.save = torch_save

    sys.argv = ["mode-train", *rest[1:]]
    mode.train.main()


if __name__ == "__main__":
    main()
