"""Paper scale on clusters, exercised on CPU: balanced micro-batch dealing, SLURM's environment and its
timeout signal, and no silent device change."""

from __future__ import annotations

import signal

import pytest
from conftest import write_sni_fixture
from tiny_runs import tiny_cfg

from mode.errors import ModeError, TrainingInterrupted
from mode.training.distributed import first_host, micro_batches, serpentine_owner, slurm_environment, use_cpu


class Rows(list):
    pass


def test_serpentine_dealing_balances_tokens_and_keeps_the_same_micro_batches():
    lengths = list(range(1, 17))  # 16 examples, lengths 1..16
    rows = Rows({"input_ids": [0] * n} for n in lengths)
    indices = list(range(16))
    one = micro_batches(rows, indices, 0, 1, 8, 2)            # one process, 8 micro-batches of 2
    two = [micro_batches(rows, indices, r, 2, 4, 2) for r in range(2)]
    four = [micro_batches(rows, indices, r, 4, 2, 2) for r in range(4)]
    for layout in (two, four):
        assert sorted(g for groups in layout for g in groups) == sorted(one)  # the same micro-batches
        tokens = [sum(lengths[i] for g in groups for i in g) for groups in layout]
        assert max(tokens) - min(tokens) <= 4  # round-robin: the last process would carry 8 (2 proc) / 16 more
    assert [serpentine_owner(k, 3) for k in range(7)] == [0, 1, 2, 2, 1, 0, 0]


def test_slurm_variables_become_the_distributed_environment():
    env = {"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "123",
           "SLURM_JOB_NODELIST": "gpu[012-013]"}
    assert slurm_environment(env) == {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "gpu012",
                                      "MASTER_PORT": "20123"}
    assert slurm_environment({**env, "RANK": "0"}) == {}          # torchrun set them already
    assert slurm_environment({**env, "SLURM_NTASKS": "1"}) == {}  # one task: nothing to form
    assert first_host("node7,node8") == "node7" and first_host("a[1,3-4],b2") == "a1"


def test_a_gpu_device_without_a_gpu_is_refused_and_auto_falls_back(monkeypatch):
    monkeypatch.setattr("mode.training.distributed.gpu_available", lambda: False)
    with pytest.raises(ModeError, match="train.device=cuda: no GPU is visible"):
        use_cpu("cuda")
    with pytest.raises(ModeError, match="train.device=cuda:1: no GPU is visible"):
        use_cpu("cuda:1")
    assert use_cpu("auto") and use_cpu("cpu")


def test_device_values_are_checked_before_any_work(sni_fixture):
    from mode.training.checks import validate_config

    for good in ("auto", "cpu", "cuda", "cuda:3"):
        validate_config(tiny_cfg(sni_fixture, f"train.device={good}"))
    with pytest.raises(ModeError, match=r"train.device='gpu' is not one of \['auto', 'cpu', 'cuda', 'cuda:N'\]"):
        validate_config(tiny_cfg(sni_fixture, "train.device=gpu"))


@pytest.fixture(scope="module")
def sni(tmp_path_factory):
    return write_sni_fixture(tmp_path_factory.mktemp("data") / "sni")


def train_receiving_usr2(sni, run, at_step: int, handler, monkeypatch):
    """A tiny training run that receives SIGUSR2 when batch `at_step` is drawn, `handler` installed before."""
    import os

    from mode.data.sampling import MixtureSampler
    from mode.train import train

    original = MixtureSampler.indices

    def indices(self, k):
        if k == at_step:
            os.kill(os.getpid(), signal.SIGUSR2)
        return original(self, k)

    monkeypatch.setattr(MixtureSampler, "indices", indices)
    previous = signal.signal(signal.SIGUSR2, handler)
    try:
        train(tiny_cfg(sni, "train.save_every=100"), str(run))
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_slurm_timeout_signal_checkpoints_then_hands_over_to_submitit(sni, tmp_path, monkeypatch):
    """submitit sends SIGUSR2 before the time limit and requeues the job from its own USR2 handler: training
    checkpoints after the current step first, then the previous handler runs (here: a stand-in)."""
    from mode.training.checkpoint import list_checkpoints

    run = tmp_path / "run"
    requeued = []

    def submitit_handler(signum, frame):
        requeued.append([p.name for p in list_checkpoints(run / "checkpoints")])
        raise SystemExit(0)  # submitit requeues and exits

    with pytest.raises(SystemExit):
        train_receiving_usr2(sni, run, 3, submitit_handler, monkeypatch)
    assert requeued == [["step-00000004"]]  # the step that was running finished and was saved first


def test_usr2_without_submitit_stops_like_sigterm(sni, tmp_path, monkeypatch):
    with pytest.raises(TrainingInterrupted) as stopped:
        train_receiving_usr2(sni, tmp_path / "run", 2, signal.SIG_DFL, monkeypatch)
    assert stopped.value.exit_code == 128 + signal.SIGUSR2
