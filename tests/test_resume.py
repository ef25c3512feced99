"""Interrupted runs end exactly where uninterrupted ones do.

Real process deaths (SIGKILL at a step, SIGKILL half-way through a checkpoint file, SIGTERM from a
scheduler) run in a subprocess with tests/faults.py; the resumed run must end with the same adapter
bytes and the same metrics.json bytes as an uninterrupted run. Crashes that need no real death run
in-process (an exception nothing in mode catches).
"""

from __future__ import annotations

import json
import re
import signal

import pytest
from conftest import write_sni_fixture
from safetensors import safe_open
from tiny_runs import adapter_bytes, mode_train, run_with_fault, tiny_cfg, tiny_overrides

from mode.errors import ModeError
from mode.train import train
from mode.training.checkpoint import list_checkpoints, verify


class SimulatedCrash(BaseException):
    """Stands for a process death: no `except Exception` in mode catches it."""


@pytest.fixture(scope="module")
def sni(tmp_path_factory):
    return write_sni_fixture(tmp_path_factory.mktemp("data") / "sni")


@pytest.fixture(scope="module")
def reference(sni, tmp_path_factory):
    """The uninterrupted run every interrupted one must reproduce."""
    run = tmp_path_factory.mktemp("reference") / "run"
    train(tiny_cfg(sni), str(run))
    return run


def assert_same_run(run, reference):
    assert adapter_bytes(run) == adapter_bytes(reference)
    assert (run / "metrics.json").read_bytes() == (reference / "metrics.json").read_bytes()
    assert not (run / "checkpoints").exists()  # a finished run drops its checkpoints


def crash_at_step(monkeypatch, step: int):
    from mode.data.sampling import MixtureSampler

    original = MixtureSampler.indices

    def indices(self, k):
        if k == step:
            raise SimulatedCrash
        return original(self, k)

    monkeypatch.setattr(MixtureSampler, "indices", indices)


def crashed_run(monkeypatch, cfg, run, step: int):
    """Train `cfg` into `run` until it crashes at `step` (its checkpoints stay), then undo the crash patch."""
    crash_at_step(monkeypatch, step)
    with pytest.raises(SimulatedCrash):
        train(cfg, str(run))
    monkeypatch.undo()


def test_same_seed_and_config_give_identical_metrics(sni, reference, tmp_path):
    run = tmp_path / "again"
    train(tiny_cfg(sni), str(run))
    assert_same_run(run, reference)
    timings = json.loads((run / "timings.json").read_text())
    assert set(timings) == {"train_time_s", "eval_time_s"}
    assert "train_time_s" not in json.loads((run / "metrics.json").read_text())


@pytest.mark.parametrize("fault,step,checkpoint_left", [
    ("kill-at-step", 3, "step-00000002"),   # killed mid-training, between two checkpoints
    ("kill-in-write", 4, "step-00000002"),  # killed half-way through optimizer.bin of checkpoint 4
])
def test_sigkill_then_resume_is_bit_exact(sni, reference, tmp_path, fault, step, checkpoint_left):
    run = tmp_path / "run"
    proc = run_with_fault(fault, step, tiny_overrides(sni, f"hydra.run.dir={run}"))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == [checkpoint_left]
    if fault == "kill-in-write":
        assert (run / "checkpoints" / ".step-00000004.partial" / "optimizer.bin").exists()  # half a file
    train(tiny_cfg(sni, "resume=true"), str(run))
    assert_same_run(run, reference)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(sni, reference, tmp_path):
    run = tmp_path / "run"
    proc = run_with_fault("term-at-step", 2, tiny_overrides(sni, f"hydra.run.dir={run}"))
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
    assert "interrupted: stopped after step 3 of 6" in proc.stderr and "Traceback" not in proc.stderr
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step-00000002", "step-00000003"]
    checkpoint = run / "checkpoints" / "step-00000003"
    assert verify(checkpoint, 1) is None
    # adapter-only: optimizer, scheduler, progress, RNG and the adapter tensors; never the base model
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl",
        "manifest.json", "optimizer.bin", "random_states_0.pkl"]
    with safe_open(checkpoint / "adapter_model.safetensors", "pt") as saved:
        assert saved.keys() and all(k.endswith((".lora_A", ".lora_B")) for k in saved.keys())
    train(tiny_cfg(sni, "resume=true"), str(run))
    assert_same_run(run, reference)


@pytest.mark.parametrize("method", ["molora", "molora_sd", "mode", "more"])
def test_every_adapter_method_resumes_exactly(sni, tmp_path, monkeypatch, method):
    """Routers, selectors and task embeddings are restored with the rest (in-process crash at step 3)."""
    overrides = [f"adapter={method}", "adapter.rank=4"] + (["adapter.experts=2"] if method != "more" else [])
    train(tiny_cfg(sni, *overrides), str(tmp_path / "reference"))
    crashed_run(monkeypatch, tiny_cfg(sni, *overrides), tmp_path / "run", 3)
    train(tiny_cfg(sni, *overrides, "resume=true"), str(tmp_path / "run"))
    assert_same_run(tmp_path / "run", tmp_path / "reference")


def test_crash_during_evaluation_resumes_without_retraining(sni, reference, tmp_path, monkeypatch):
    run = tmp_path / "run"

    def crash(*args, **kwargs):
        raise SimulatedCrash

    monkeypatch.setattr("mode.train.evaluate", crash)
    with pytest.raises(SimulatedCrash):
        train(tiny_cfg(sni), str(run))
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step-00000004", "step-00000006"]
    monkeypatch.undo()
    steps = []
    monkeypatch.setattr("mode.data.sampling.MixtureSampler.indices", lambda self, k: steps.append(k) or [])
    train(tiny_cfg(sni, "resume=true"), str(run))
    assert steps == []  # resumed after the last step: straight to evaluation
    assert_same_run(run, reference)


def test_corrupt_checkpoint_falls_back_to_the_previous_one(sni, reference, tmp_path, monkeypatch, caplog):
    run = tmp_path / "run"
    crashed_run(monkeypatch, tiny_cfg(sni), run, 5)
    damaged = run / "checkpoints" / "step-00000004" / "optimizer.bin"
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit pattern in the middle of the file
    damaged.write_bytes(bytes(data))
    train(tiny_cfg(sni, "resume=true"), str(run))
    assert f"{damaged}: contents differ from the manifest (corrupt)" in caplog.text
    assert_same_run(run, reference)  # restarted from step 2 and still exact


def test_every_checkpoint_corrupt_is_a_clear_error(sni, tmp_path, monkeypatch):
    run = tmp_path / "run"
    crashed_run(monkeypatch, tiny_cfg(sni), run, 5)
    for checkpoint in list_checkpoints(run / "checkpoints"):
        (checkpoint / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModeError, match=r"step-00000004/adapter_model\.safetensors: contents differ") as err:
        train(tiny_cfg(sni, "resume=true"), str(run))
    assert "\n" not in str(err.value)
    assert len(list_checkpoints(run / "checkpoints")) == 2  # nothing renamed or deleted: the user decides


def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(sni, reference, tmp_path, monkeypatch):
    import errno

    import torch

    run = tmp_path / "run"
    original = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if "step-00000004" in str(f):
            with open(f, "wb") as handle:
                handle.write(b"\0" * 100)  # some bytes land, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(ModeError, match=r"could not write checkpoint .*step-00000004: No space left on device; "
                                        r"the last good checkpoint is .*step-00000002"):
        train(tiny_cfg(sni), str(run))
    monkeypatch.undo()
    checkpoints = run / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000002"]  # no partial folder left
    assert verify(checkpoints / "step-00000002", 1) is None
    assert not (run / "metrics.json").exists()
    train(tiny_cfg(sni, "resume=true"), str(run))
    assert_same_run(run, reference)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(sni, tmp_path, monkeypatch):
    import torch

    from mode.training.losses import AnswerLoss

    run = tmp_path / "run"
    calls = {"n": 0}
    original = AnswerLoss.forward

    def forward(self, *args, **kwargs):
        calls["n"] += 1
        loss = original(self, *args, **kwargs)
        return loss * torch.nan if calls["n"] > 8 else loss  # 2 micro-batches per step: step 5 is NaN

    monkeypatch.setattr(AnswerLoss, "forward", forward)
    with pytest.raises(ModeError, match=r"training loss became nan at step 5; the last good checkpoint is "
                                        r".*step-00000004"):
        train(tiny_cfg(sni), str(run))
    assert verify(run / "checkpoints" / "step-00000004", 1) is None
    assert not (run / "metrics.json").exists() and not (run / "adapter").exists()


def test_non_finite_weights_are_never_checkpointed(sni, tmp_path, monkeypatch):
    import torch

    run = tmp_path / "run"
    original, steps = torch.optim.AdamW.step, {"n": 0}

    def step(self, *args, **kwargs):  # a finite loss whose update still breaks the weights (an inf gradient)
        out = original(self, *args, **kwargs)
        steps["n"] += 1
        if steps["n"] == 4:
            self.param_groups[0]["params"][0].data.fill_(torch.inf)
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    with pytest.raises(ModeError, match=r"adapter weights are not finite after step 4 .* the last good checkpoint is "
                                        r".*step-00000002"):
        train(tiny_cfg(sni), str(run))
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step-00000002"]


def test_resume_with_other_settings_is_refused(sni, reference, tmp_path, monkeypatch):
    run = tmp_path / "run"
    crash_at_step(monkeypatch, 3)
    with pytest.raises(SimulatedCrash):
        train(tiny_cfg(sni), str(run))
    run_lr = tiny_cfg(sni).train.lr  # the default may change; the message must quote whatever the run used
    with pytest.raises(ModeError, match=rf"resume=true but train.lr=0.1 differs from the run's .*config.yaml \({re.escape(str(run_lr))}\)"):
        train(tiny_cfg(sni, "resume=true", "train.lr=0.1"), str(run))
    # where things are and how often to checkpoint may change
    monkeypatch.undo()
    train(tiny_cfg(sni, "resume=true", "train.save_every=3", "logger=none"), str(run))
    assert_same_run(run, reference)


def test_resume_on_changed_data_is_refused(sni, tmp_path, monkeypatch):
    run = tmp_path / "run"
    crashed_run(monkeypatch, tiny_cfg(sni), run, 3)
    moved = tmp_path / "sni_copy"
    write_sni_fixture(moved)
    task = moved / "tasks" / "task001_add_numbers.json"
    task.write_text(task.read_text().replace("question number", "query number"))
    with pytest.raises(ModeError, match="the training data differ from those .*step-00000002 was trained on"):
        train(tiny_cfg(moved, "resume=true"), str(run))


def test_interrupted_sweep_reruns_only_unfinished_jobs(sni, tmp_path):
    sweep = tmp_path / "sweep"
    # (job folders named by number: these tests' many overrides would make too long a folder name)
    args = ["-m", *tiny_overrides(sni, "adapter.rank=2,4", f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=job${hydra.job.num}")]
    proc = run_with_fault("kill-at-step", 3, args, when="adapter.rank=4")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    done, killed = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert (done / "metrics.json").exists() and not (killed / "metrics.json").exists()
    finished_at = (done / "metrics.json").stat().st_mtime_ns

    proc = mode_train([*args, "resume=true"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "already finished: ROUGE-L" in proc.stdout
    assert sorted(p for p in sweep.iterdir() if p.is_dir()) == [done, killed]  # same job folders
    assert (done / "metrics.json").stat().st_mtime_ns == finished_at  # not retrained
    assert "resuming from" in proc.stdout + proc.stderr and "step-00000002" in proc.stdout + proc.stderr
    assert (killed / "metrics.json").exists()


@pytest.mark.slow
def test_two_processes_stop_together_and_resume_exactly(sni, tmp_path):
    """torchrun, 2 CPU processes (gloo): only rank 1 gets SIGTERM, both stop after the same step with one
    checkpoint holding both RNG states, and the resumed run equals an uninterrupted 2-process run."""
    import subprocess
    import sys

    from conftest import REPO

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    args = tiny_overrides(sni, "train.device=cpu")

    def launch(*cmd):
        return subprocess.run([*torchrun, *cmd], cwd=REPO, capture_output=True, text=True)

    ref = launch("-m", "mode.train", *args, f"hydra.run.dir={tmp_path / 'ref'}")
    assert ref.returncode == 0, ref.stderr[-3000:]
    run = tmp_path / "run"
    proc = launch(str(REPO / "tests" / "faults.py"), "term-at-step", "2", "--when", "rank=1", "--",
                  *args, f"hydra.run.dir={run}")
    assert proc.returncode != 0 and "interrupted: stopped after step 3 of 6" in proc.stderr, proc.stderr[-3000:]
    checkpoint = run / "checkpoints" / "step-00000003"
    assert verify(checkpoint, 2) is None
    assert (checkpoint / "random_states_0.pkl").exists() and (checkpoint / "random_states_1.pkl").exists()
    resumed = launch("-m", "mode.train", *args, "resume=true", f"hydra.run.dir={run}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(run, tmp_path / "ref")
