"""A run's light record traces and explains its numbers: curves over training (also across a resume),
the machine and commit that produced it, valid JSON everywhere."""

from __future__ import annotations

import json

import pytest
from conftest import write_sni_fixture
from tiny_runs import adapter_bytes, tiny_cfg

from mode.train import train
from mode.training.curves import curve_steps, curve_subset


class SimulatedCrash(BaseException):
    pass


@pytest.fixture(scope="module")
def sni(tmp_path_factory):
    return write_sni_fixture(tmp_path_factory.mktemp("data") / "sni")


CURVES = ("eval.curve_points=2", "eval.curve_instances_per_task=2")


@pytest.fixture(scope="module")
def curved(sni, tmp_path_factory):
    run = tmp_path_factory.mktemp("curved") / "run"
    train(tiny_cfg(sni, *CURVES), str(run))
    return run


def test_curve_schedule_and_subset():
    assert curve_steps(150, 3) == [38, 75, 112]  # evenly inside; the final evaluation closes the curve
    assert curve_steps(6, 2) == [2, 4] and curve_steps(3, 5) == [1, 2] and curve_steps(10, 0) == []
    rows = [{"id": i, "task": t} for i, t in enumerate("aaabbcaaa")]
    assert [r["id"] for r in curve_subset(rows, 2)] == [0, 1, 3, 4, 5]


def test_curves_record_training_and_subset_evaluation(curved):
    curves = json.loads((curved / "curves.json").read_text())
    assert [p["step"] for p in curves["train"]] == [2, 4, 6]           # train.log_every=2
    assert all(p["train/loss"] > 0 and "train/lr" in p for p in curves["train"])
    assert all("routing/normalized_entropy/" not in k for p in curves["train"] for k in p)  # means only
    assert [p["step"] for p in curves["eval"]] == [2, 4, 6]
    assert all(p["num_instances"] == 4 for p in curves["eval"])       # 2 tasks x 2 instances
    # the last point is the final evaluation restricted to the same subset
    rows = [json.loads(line) for line in (curved / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) > 4


def test_curve_evaluation_changes_nothing_that_was_trained(sni, curved, tmp_path):
    plain = tmp_path / "plain"
    train(tiny_cfg(sni), str(plain))
    assert adapter_bytes(plain) == adapter_bytes(curved)  # evaluating mid-run touches no RNG stream
    a = json.loads((plain / "metrics.json").read_text())
    b = json.loads((curved / "metrics.json").read_text())
    assert a == b


def test_curves_survive_a_resume_exactly(sni, curved, tmp_path, monkeypatch):
    from mode.data.sampling import MixtureSampler

    original = MixtureSampler.indices

    def crash_at_5(self, k):
        if k == 5:
            raise SimulatedCrash
        return original(self, k)

    run = tmp_path / "run"
    monkeypatch.setattr(MixtureSampler, "indices", crash_at_5)
    with pytest.raises(SimulatedCrash):
        train(tiny_cfg(sni, *CURVES), str(run))
    monkeypatch.setattr(MixtureSampler, "indices", original)
    train(tiny_cfg(sni, *CURVES, "resume=true"), str(run))
    assert adapter_bytes(run) == adapter_bytes(curved)

    def drop_times(curves):
        return {part: [{k: v for k, v in p.items() if k != "train/step_time_s"} for p in points]
                for part, points in curves.items()}

    assert drop_times(json.loads((run / "curves.json").read_text())) == drop_times(
        json.loads((curved / "curves.json").read_text()))


def test_provenance_names_commit_machine_and_precision(curved):
    attempts = json.loads((curved / "provenance.json").read_text())["attempts"]
    assert len(attempts) == 1
    first = attempts[0]
    assert first["precision"] == "fp32" and first["from_step"] == 0 and first["processes"] == 1
    assert first["cpu"] and first["torch"] and "cpu_features" in first
    assert len(first.get("commit", "")) == 40  # the tests run from a git checkout


def test_no_training_writes_valid_json_with_a_null_loss(sni, tmp_path):
    run = tmp_path / "zero"
    train(tiny_cfg(sni, "train.max_steps=0"), str(run))
    text = (run / "metrics.json").read_text()
    assert "NaN" not in text and json.loads(text)["train_loss"] is None


def test_a_resumed_run_continues_the_same_wandb_run(tmp_path, monkeypatch):
    """W&B gets the run folder's own id (kept in wandb_run_id) and resume="allow" on every attempt."""
    import sys
    import types

    from omegaconf import OmegaConf

    from mode.run.loggers import make_logger

    calls = []
    fake = types.SimpleNamespace(init=lambda **kw: calls.append(kw) or types.SimpleNamespace(finish=lambda: None))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = OmegaConf.create({"logger": {"name": "wandb", "project": "p", "mode": "offline"}})
    for _ in range(2):
        make_logger(cfg, str(tmp_path), {}, "run").finish()
    assert calls[0]["id"] == calls[1]["id"] == (tmp_path / "wandb_run_id").read_text().strip()
    assert calls[0]["resume"] == "allow"
