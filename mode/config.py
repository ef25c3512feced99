"""Hydra/OmegaConf glue: where the configs live, custom resolvers, composing configs outside Hydra's CLI."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

REPO_DIR = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_DIR / "conf"


def _register_resolvers() -> None:
    # `${mode.repo:}` lets configs name files beside the checkout (../shared) without absolute paths.
    if not OmegaConf.has_resolver("mode.repo"):
        OmegaConf.register_new_resolver("mode.repo", lambda: str(REPO_DIR))


_register_resolvers()


def compose(config_name: str = "train", overrides: list[str] | None = None) -> DictConfig:
    """Compose a config exactly as the CLI would (used by tests, the params table and sweeps)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides or []), return_hydra_config=False)


def to_container(cfg) -> dict:
    """A plain, fully resolved dict of a config node (what run dirs and W&B record)."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return dict(cfg)
