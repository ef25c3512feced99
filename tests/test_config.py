"""Every config composes and resolves: each option of each group, and the eval entry point's config."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from mode.adapters import AdapterConfig
from mode.run.config import CONF_DIR, compose

GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "hydra" and any(p.rglob("*.yaml")))
# Nested options too (adapter=paper/mode_16x4x1, experiment=cpu_check/table2); experiment/<profile>/base.yaml
# files are fragments the tables include, but they compose on their own as well.
OPTIONS = [(g, f.relative_to(CONF_DIR / g).with_suffix("").as_posix())
           for g in GROUPS for f in sorted((CONF_DIR / g).rglob("*.yaml"))]
LAUNCHERS = sorted(f.stem for f in (CONF_DIR / "hydra" / "launcher").glob("*.yaml"))


def test_groups_exist():
    assert {"model", "adapter", "data", "train", "eval", "logger", "paths", "experiment"} <= set(GROUPS)


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_launcher_configs_compose(launcher):
    """The joblib (parallel local) and submitit (SLURM) launcher configs compose with a table sweep."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose("train", overrides=["experiment=cpu_check/table2", f"hydra/launcher={launcher}"],
                            return_hydra_config=True)
    GlobalHydra.instance().clear()
    assert cfg.hydra.launcher._target_.startswith("hydra_plugins.")
    assert "paper/mode_16x4x1" in cfg.hydra.sweeper.params.adapter


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_resolves(group, option):
    cfg = compose("train", [f"{group}={option}"])
    resolved = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    if group != "experiment":  # experiments are `@package _global_`: they set keys of other groups
        assert resolved[group] is not None
    AdapterConfig.from_mapping(cfg.adapter)  # and the adapter node is a valid adapter config


def test_cli_keys_of_the_spec_exist():
    cfg = compose("train")
    for key in ("adapter.method", "adapter.rank", "adapter.experts", "adapter.block_rank", "adapter.alpha",
                "adapter.dropout", "adapter.target_modules", "model.name_or_path", "data.sni_dir", "data.tasks",
                "data.max_instances_per_task", "seed", "train.max_steps", "train.batch_size", "train.save_every",
                "resume", "eval.max_instances_per_task", "logger"):
        assert OmegaConf.select(cfg, key, default="<absent>") != "<absent>", key


def test_paths_follow_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MODE_SNI_DIR", str(tmp_path))
    assert compose("train").data.sni_dir == str(tmp_path)


def test_eval_config_requires_run_dir():
    cfg = compose("eval", ["run_dir=/some/run"])
    assert cfg.run_dir == "/some/run" and cfg.eval.batch_size > 0
