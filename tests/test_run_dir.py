"""A finished run is never overwritten; an unfinished one is resumed, refused, or (asked explicitly) replaced."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf
from tiny_runs import tiny_cfg

from mode.errors import ModeError
from mode.run.config import to_container
from mode.run.run_dir import FINISHED, NEW, UNFINISHED, plan_run
from mode.train import train


def make_run(tmp_path, *files: str):
    run = tmp_path / "run"
    run.mkdir()
    for name in files:
        (run / name).write_text("{}")
    return run


@pytest.mark.parametrize("files,resume,force,expected", [
    ((), False, False, NEW),
    ((), True, False, NEW),                                        # nothing to resume yet: start
    (("config.yaml",), True, False, UNFINISHED),
    (("config.yaml", "metrics.json"), True, False, FINISHED),      # report, train nothing
    (("config.yaml",), False, True, NEW),
    (("config.yaml", "metrics.json"), False, True, NEW),
])
def test_plan_run(tmp_path, files, resume, force, expected):
    assert plan_run(make_run(tmp_path, *files), resume, force) == expected


@pytest.mark.parametrize("files,message", [
    (("config.yaml", "metrics.json"), "already holds a finished run"),
    (("config.yaml",), "holds an unfinished run .* pass resume=true .* or force=true"),
])
def test_plan_run_refuses_to_overwrite(tmp_path, files, message):
    with pytest.raises(ModeError, match=message):
        plan_run(make_run(tmp_path, *files), resume=False, force=False)


def test_resume_and_force_together_is_an_error(tmp_path):
    with pytest.raises(ModeError, match="resume=true and force=true contradict"):
        plan_run(tmp_path, resume=True, force=True)


def finished_run(tmp_path, cfg):
    """A finished run directory whose config.yaml is `cfg`, resolved (as mode-train writes it)."""
    run = make_run(tmp_path)
    (run / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(to_container(cfg))))
    (run / "metrics.json").write_text(json.dumps({"rougeL": 12.5, "exact_match": 3.0}))
    return run


def test_resume_of_a_finished_run_reports_it_without_loading_anything(tmp_path, sni_fixture, monkeypatch, capsys):
    run = finished_run(tmp_path, tiny_cfg(sni_fixture))

    def no_model(*args, **kwargs):
        raise AssertionError("a finished run must not load a model")

    monkeypatch.setattr("mode.training.session.load_model_and_tokenizer", no_model)
    assert train(tiny_cfg(sni_fixture, "resume=true", "train.save_every=9"), str(run))["rougeL"] == 12.5
    assert "already finished: ROUGE-L 12.5" in capsys.readouterr().out


def test_resume_of_a_finished_run_with_other_settings_is_refused_naming_every_key(tmp_path, sni_fixture, monkeypatch):
    """A sweep rerun with other overrides must not re-report the old runs as if they were the new ones."""
    run = finished_run(tmp_path, tiny_cfg(sni_fixture))
    monkeypatch.setattr("mode.training.session.load_model_and_tokenizer", lambda *a, **k: pytest.fail("loaded a model"))
    cfg = tiny_cfg(sni_fixture, "resume=true", "train.max_steps=400", "eval.max_new_tokens=3")
    with pytest.raises(ModeError, match=r"eval.max_new_tokens=3 differs from the run's .*config.yaml \(\d+\) "
                                        r"\(also train.max_steps\); that run is finished with other settings"):
        train(cfg, str(run))
    assert json.loads((run / "metrics.json").read_text())["rougeL"] == 12.5  # untouched


def test_force_replaces_a_finished_run(tmp_path, sni_fixture):
    run = make_run(tmp_path, "config.yaml", "metrics.json", "predictions.jsonl")
    (run / "evals" / "old").mkdir(parents=True)
    (run / "checkpoints" / "step-00000009").mkdir(parents=True)
    train(tiny_cfg(sni_fixture, "force=true"), str(run))
    assert json.loads((run / "metrics.json").read_text())["train_steps"] == 6
    assert not (run / "evals").exists() and not (run / "checkpoints").exists()


def test_sweep_job_folders_ignore_resume_and_force():
    """A sweep rerun with resume=true must find the same job folders (hydra.sweep.subdir)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from mode.run.config import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose("train", return_hydra_config=True)
    excluded = set(cfg.hydra.job.config.override_dirname.exclude_keys)
    assert {"resume", "force", "train.save_every", "train.keep_checkpoints"} <= excluded
