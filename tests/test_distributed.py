"""Distributed training without code changes: `torchrun` with 2 CPU processes (gloo) and the default
`train.device=auto` forms one process group, both ranks end with the same adapter, the result equals a
single process with the same global batch, and only rank 0 writes the run directory and logs.

"Equals" is bit for bit here: both layouts compute the same two micro-batches (mode.training.distributed.micro_batches),
the loss is normalised by the global batch's answer tokens, and the world-size factor and DDP's average
are exact powers of two, so the only difference, the order of one sum, does not change a bit."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, needs_stories
from safetensors.torch import load_file

ARGS = ["model=stories260k", "data.tasks=[task001_add_numbers,task002_echo_word]", "data.max_instances_per_task=16",
        "adapter=mode", "adapter.block_rank=2", "train.max_steps=4", "train.batch_size=4", "train.micro_batch_size=2",
        "train.lr=1e-2", "train.save_every=2", "train.log_every=1", "eval.max_instances_per_task=2",
        "eval.max_new_tokens=3", "logger=wandb"]


def launch(prefix: list[str], dump, run, sni, env) -> subprocess.CompletedProcess:
    cmd = [*prefix, str(REPO / "tests" / "rank_dump.py"), str(dump), "--", *ARGS, f"data.sni_dir={sni}",
           f"hydra.run.dir={run}"]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)


@pytest.mark.slow  # minutes of subprocesses: CI runs it (make test-all)
@needs_stories
def test_two_processes_train_like_one_and_only_rank_0_writes(sni_fixture, tmp_path, monkeypatch):
    import os

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch)}
    env.pop("RANK", None)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    two = launch(torchrun, tmp_path / "dump2", tmp_path / "two", sni_fixture, env)
    assert two.returncode == 0, two.stderr[-4000:]
    one = launch([sys.executable], tmp_path / "dump1", tmp_path / "one", sni_fixture, env)
    assert one.returncode == 0, one.stderr[-4000:]

    rank0, rank1 = (load_file(str(tmp_path / "dump2" / f"rank{r}.safetensors")) for r in (0, 1))
    single = load_file(str(tmp_path / "dump1" / "rank0.safetensors"))
    assert rank0.keys() == rank1.keys() == single.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key                    # DDP: one model on both ranks
        assert torch.equal(rank0[key], single[key]), key  # = one process, same global batch (see the docstring)
    assert not torch.equal(single["model.layers.0.self_attn.q_proj.lora_B"],
                           torch.zeros_like(single["model.layers.0.self_attn.q_proj.lora_B"]))  # it trained
    saved = load_file(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(saved[k], rank0[k]) for k in saved)

    run = tmp_path / "two"
    one_metrics = json.loads((tmp_path / "one" / "metrics.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["num_instances"] == one_metrics["num_instances"] == 4  # evaluation sharded, then gathered
    assert metrics["train_loss"] == pytest.approx(one_metrics["train_loss"], rel=1e-4)
    # Only rank 0 wrote: one Hydra record, each log line once, one W&B run, one result line; the other
    # rank's Hydra scratch folder is gone.
    assert len(list((run / ".hydra").iterdir())) == 1
    log = (run / "train.log").read_text()
    assert log.count("trainable adapter parameters") == 1 and "[rank 1]" not in log
    assert len(list((run / "wandb").glob("offline-run-*"))) == 1
    assert two.stdout.count("ROUGE-L") == 1
    assert not (run / "checkpoints").exists() and sorted(p.name for p in run.iterdir()) == sorted(
        p.name for p in (tmp_path / "one").iterdir())
    assert list(scratch.glob("mode-rank*")) == []
